"""What a source format is to the converter (:class:`SourceFormat`), and the error every step raises."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

FLIP_TYPE, PLAIN_TYPE = "sit_time_flip", "sit"   # backbone for SiT-time weights, for RF-time weights
WEIGHTS_ORDER = ("ema", "model", "state_dict", "module")  # entries ``--weights auto`` tries (SiT/REPA loaders)


class ConversionError(Exception):
    """A checkpoint that cannot be converted faithfully; the message says what and where."""


def _keep(sd: dict[str, Tensor], notes: list[str]) -> dict[str, Tensor]:
    return sd


@dataclass(frozen=True)
class SourceFormat:
    """One published layout: ``layout`` is its key map in words (``--help`` and the package docstring)."""

    name: str
    backbone_type: str                  # FLIP_TYPE (network in SiT time) or PLAIN_TYPE (RF time)
    conv_embed: bool                    # x_embedder.proj is a Conv2d (SiT/REPA) rather than a Linear (Self-Flow)
    layout: str
    weights_order: tuple[str, ...] = WEIGHTS_ORDER
    head_keys: re.Pattern[str] | None = None   # training-only projector heads
    head_objective: str | None = None          # the objective that can own those heads (--keep-heads)
    prepare: Callable[[dict[str, Tensor], list[str]], dict[str, Tensor]] = _keep  # source-specific renaming
    learn_sigma_ok: bool = True         # False: a final layer with 2C outputs is refused
