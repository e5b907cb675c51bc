"""Teacher ``classifier``: the project's own frozen digit classifier (:mod:`zoo.metrics.classifier`) as REPA's
external encoder for runs on the embedded ``digits`` data (CPU-sized REPA without any download).

``features`` is the classifier's spatial feature map before global pooling: the output of its last conv
layer (``4 x width = 64`` channels after ReLU), on a ``work / 4`` grid for work sizes below 32 and ``work / 8``
at 32 (work = min(size, 32); 16-px digits: 4 x 4, the token grid of ``specs/repa_digits_tiny.json``),
flattened row-major to ``(B, h*w, 64)``. The classifier does its own preprocessing (resize to the work size,
per-image normalisation), so no ImageNet statistics are involved. It is trained on the digits generator on
first use (seconds on a CPU) and cached like the metrics' copy; this module holds its own copy, so moving
it to a device does not move the metrics' instance.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Literal

from pydantic import Field
from torch import Tensor, nn

from registry.kinds import TEACHERS
from zoo.core.params import TeacherParams
from zoo.metrics.classifier import RECIPE, get_digit_classifier


def _grid(size: int) -> int:
    work = min(size, RECIPE["max_work_size"])
    return work // (8 if work >= 32 else 4)


class DigitClassifierTeacherParams(TeacherParams):
    """The digit classifier's last conv feature map (spatial, before pooling); needs ``data.type`` digits."""

    type: Literal["classifier"] = Field(..., description="The project's digit classifier (zoo.metrics.classifier) "
                                                         "as a frozen encoder; digits data only.")

    @property
    def feature_dim(self) -> int:
        """Channels of the last conv layer (4 x the recipe's width = 64)."""
        return 4 * RECIPE["width"]

    def feature_grid(self, input_shape: tuple[int, ...] | None = None,
                     token_grid: tuple[int, ...] | None = None) -> tuple[int, int]:
        """``(g, g)``, g = work/4 (work < 32) or work/8 (work = 32), work = min(H, 32)."""
        if input_shape is None:
            raise ValueError("teacher 'classifier': the feature grid depends on the input size")
        return (_grid(int(input_shape[-1])),) * 2

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        data = spec.data.data_space()  # a latent cache: the data it encodes
        if data.type not in ("digits", "bouncing_digits_av"):
            yield ("type",
                   f"teacher 'classifier' is trained on the digits generator and needs data.type 'digits' (or the "
                   f"frames of 'bouncing_digits_av', which draw the same glyphs), got {data.type!r}")


@TEACHERS.register
class DigitClassifierTeacher(nn.Module):
    """``features(raw (B, C, S, S) in [-1, 1], grid=None) -> (B, g*g, 64)`` (``grid`` is ignored: the map is
    fixed by the classifier; REPA resamples it to the token grid when they differ).

    Args:
        params: :class:`DigitClassifierTeacherParams`.
        input_shape: one digits sample ``(C, S, S)``, or a clip ``(C, T, S, S)`` whose frames ``features`` gets.
    """

    Params = DigitClassifierTeacherParams

    def __init__(self, params: DigitClassifierTeacherParams, input_shape: tuple[int, ...] | None = None, **deps: Any):
        super().__init__()
        if input_shape is not None and len(input_shape) == 4:  # a clip (C, T, S, S): features of its frames
            input_shape = (input_shape[0], *input_shape[2:])
        if input_shape is None or len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise ValueError(f"teacher 'classifier' needs square digit images input_shape (C, S, S) or clips "
                             f"(C, T, S, S); got {input_shape}")
        c, s, _ = (int(v) for v in input_shape)
        self.params, self.input_shape = params, (c, s, s)
        self.feature_dim = params.feature_dim
        self.grid = params.feature_grid(self.input_shape)
        clf = get_digit_classifier(s, c, "cpu")  # cached / trained once per process
        self.classifier = copy.deepcopy(clf).float()
        self.eval().requires_grad_(False)

    def features(self, raw: Tensor, grid: tuple[int, ...] | None = None) -> Tensor:
        """``(B, C, S, S)`` in [-1, 1] -> ``(B, g*g, 64)``."""
        x = self.classifier.prepare(raw)
        for layer in self.classifier.body[:-2]:  # everything before AdaptiveAvgPool2d + Flatten
            x = layer(x)                                                       # -> (B, 64, g, g)
        fmap = x
        return fmap.flatten(2).transpose(1, 2).contiguous()
