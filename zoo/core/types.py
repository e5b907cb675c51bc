"""Plain data passed between the runtime and the components."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """A micro-batch in token space: ``x0`` ``(B, N, P)`` clean tokens, ``y`` ``(B,)`` int64 labels or None,
    ``raw`` the same samples in data space ``(B, *input_shape)`` (e.g. images in [-1, 1]) for objectives whose
    frozen teachers read the data itself (REPA's encoders); None when the run has only tokens."""

    x0: Tensor
    y: Tensor | None = None
    raw: Tensor | None = None


@dataclass
class BackboneOut:
    """``pred``: ``(B, N, P)`` velocity, None when the backbone stopped early;
    ``features``: 1-based block index -> hidden state after that block, ``(B, N, D)``."""

    pred: Tensor | None
    features: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class LossOut:
    """``loss``: scalar to backpropagate; ``metrics``: detached scalars to log (``loss`` is added by the loop)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class StepRNG:
    """Randomness of one micro-step that does not depend on how the batch is split over ranks.

    Every draw is made for the whole micro-batch of all ranks (``global_count`` samples) from a generator
    seeded by ``(seed, step, micro)``, and this rank keeps rows ``offset : offset + count``. A run on 1 or N
    processes therefore sees the same noise per sample, and a resumed run the same noise per step.
    """

    def __init__(self, seed: int, step: int, micro: int, offset: int, count: int, global_count: int,
                 device: torch.device | str = "cpu"):
        self.offset, self.count, self.global_count = offset, count, global_count
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63 - 1))

    def _local(self, x: Tensor) -> Tensor:
        return x[self.offset : self.offset + self.count]

    def rand(self, *shape: int) -> Tensor:
        """Uniform [0, 1), ``(count, *shape)``."""
        return self._local(torch.rand(self.global_count, *shape, generator=self.gen, device=self.device))

    def randn(self, *shape: int) -> Tensor:
        """Standard normal, ``(count, *shape)``."""
        return self._local(torch.randn(self.global_count, *shape, generator=self.gen, device=self.device))


@dataclass
class StepContext:
    """What an objective gets besides the student and the batch.

    ``ema``: the EMA backbone (eval mode; Self-Flow's teacher), or None when the run keeps none.
    """

    step: int
    rng: StepRNG
    ema: torch.nn.Module | None = None
