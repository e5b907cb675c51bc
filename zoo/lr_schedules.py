"""Learning-rate schedules: ``factor(step, total_steps, warmup_steps)`` multiplies the base learning rate.

Every schedule starts with the same linear warm-up, ``(step + 1) / warmup_steps`` for ``step < warmup_steps``
(so the last warm-up step reaches 1), then decays over the remaining steps with progress
``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1]: ``p = 0`` at the first step after
warm-up (factor 1) and ``p = 1`` at ``step == total_steps`` (factor ``final_fraction``), one past the last
optimizer step, so no step is spent at the final value (the HuggingFace / timm convention).
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from registry.kinds import LR_SCHEDULES
from zoo.core.params import ZooParams


class _Schedule:
    """Warm-up, then ``decay(p)`` for progress ``p`` in [0, 1]."""

    def __init__(self, params: Any, **deps: Any):
        self.params = params

    def factor(self, step: int, total_steps: int, warmup_steps: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return self.decay(min(1.0, max(0.0, (step - warmup_steps) / span)))

    def decay(self, p: float) -> float:
        raise NotImplementedError


class ConstantLRParams(ZooParams):
    """Factor 1 after warm-up."""

    type: Literal["constant"] = Field(..., description="Constant learning rate after warm-up (SiT/REPA: constant 1e-4).")


@LR_SCHEDULES.register
class ConstantLR(_Schedule):
    Params = ConstantLRParams

    def decay(self, p: float) -> float:
        return 1.0


class _DecayToParams(ZooParams):
    """Common field of the schedules that decay from 1 to ``final_fraction``."""

    final_fraction: float = Field(0.0, ge=0, le=1, description="Factor reached at the end of the run (default 0).")


class CosineLRParams(_DecayToParams):
    """Half-cosine from 1 to ``final_fraction``."""

    type: Literal["cosine"] = Field(..., description="Cosine decay after warm-up.")


@LR_SCHEDULES.register
class CosineLR(_Schedule):
    Params = CosineLRParams

    def decay(self, p: float) -> float:
        f = self.params.final_fraction
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * p))


class LinearLRParams(_DecayToParams):
    """Straight line from 1 to ``final_fraction``."""

    type: Literal["linear"] = Field(..., description="Linear decay after warm-up.")


@LR_SCHEDULES.register
class LinearLR(_Schedule):
    Params = LinearLRParams

    def decay(self, p: float) -> float:
        f = self.params.final_fraction
        return 1.0 + (f - 1.0) * p
