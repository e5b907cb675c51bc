"""Plain data passed between the runtime and the components."""
from __future__ import annotations

import hashlib
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


def sample_seed(seed: int, index: int, stream: str = "noise") -> int:
    """The seed of sample ``index``'s own generator: the first 8 bytes of ``sha256(f"{seed}/{index}/{stream}")``
    as an integer below 2^63. A function of ``(seed, index, stream)`` alone, so a sample is the same whatever batch,
    rank or number of processes draws it (``stream`` separates the label draw from the noise draws)."""
    digest = hashlib.sha256(f"{seed}/{index}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SampleNoise:
    """Per-sample generators for a batch of samples with global indices ``indices``: row ``b`` of every draw comes
    from sample ``indices[b]``'s own CPU generator (seeded by :func:`sample_seed`), in draw order, so the batch
    composition changes nothing. Solvers take it where they take a ``torch.Generator``
    (:func:`normal_like`)."""

    def __init__(self, seed: int, indices: list[int]):
        self.indices = list(indices)
        self.gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in self.indices]

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> Tensor:
        """Standard normal ``shape`` = ``(len(indices), *per_sample)``, drawn per row on the CPU, then moved."""
        if shape[0] != len(self.gens):
            raise ValueError(f"SampleNoise has {len(self.gens)} samples, a draw of shape {tuple(shape)} was asked")
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.gens]
        return torch.stack(rows).to(device)


def normal_like(generator: "torch.Generator | SampleNoise | None", shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device | str) -> Tensor:
    """A standard-normal draw ``shape`` from a ``torch.Generator`` (on ``device``; the global RNG when None) or a
    :class:`SampleNoise` (per-sample rows)."""
    if isinstance(generator, SampleNoise):
        return generator.randn(tuple(shape), dtype, device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
