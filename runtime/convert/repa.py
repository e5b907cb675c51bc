"""Source format ``repa``: ``sihyun-yu/REPA`` checkpoints, including its old split-block layout."""
from __future__ import annotations

import re

from torch import Tensor

from runtime.convert.base import PLAIN_TYPE, ConversionError, SourceFormat

LAYOUT = """\
* ``repa`` -- ``sihyun-yu/REPA`` ``models/sit.py``: the same layout without ``learn_sigma``, plus
  ``projectors.{k}.{0,2,4}`` (``Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU -> Linear(2048, z_k)``).
  RF time already (``loss.py``: ``x_t = (1 - t) x + t noise``, target ``noise - x``) -> backbone ``sit``.
  Old checkpoints split the blocks into ``blocks.{0..k-1}`` and ``decoder_blocks.{j}``; ``decoder_blocks.j``
  is ``blocks.{k + j}`` (REPA ``utils.load_legacy_checkpoints``). Projectors are dropped, or with
  ``--keep-heads`` become the ``repa`` objective's weights when that objective is registered and the spec
  uses it (their order and shapes must match the objective's parameters).
"""


def renumber_legacy_repa(sd: dict[str, Tensor], notes: list[str]) -> dict[str, Tensor]:
    """REPA's old split ``blocks.{0..k-1}`` + ``decoder_blocks.{j}`` -> ``blocks.{k + j}``."""
    if not any(k.startswith("decoder_blocks.") for k in sd):
        return sd
    k_enc = len({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    out: dict[str, Tensor] = {}
    for key, v in sd.items():
        if key.startswith("decoder_blocks."):
            parts = key.split(".")
            key = ".".join(["blocks", str(int(parts[1]) + k_enc), *parts[2:]])
            if key in sd:
                raise ConversionError(f"legacy REPA renumbering: {key!r} exists twice")
        out[key] = v
    notes.append(f"legacy REPA layout: decoder_blocks.j renamed to blocks.(j + {k_enc})")
    return out


FORMAT = SourceFormat(name="repa", backbone_type=PLAIN_TYPE, conv_embed=True, layout=LAYOUT,
                      head_keys=re.compile(r"^projectors\.\d+\."), head_objective="repa",
                      prepare=renumber_legacy_repa, learn_sigma_ok=False)
