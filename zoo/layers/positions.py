"""Position encodings for attention (registry kind ``position``): rotary embeddings over token coordinates.

Every entry is built as ``POSITIONS.build(params, head_dim=Dh)`` and offers::

    cos, sin = pos.angles(coords)        # coords (N, 3) = (time in seconds, row, column) -> (N, Dh // 2) each
    q, k = pos.apply(q, k, cos, sin)     # q, k (B, N, H, Dh) -> same shapes, rotated

``coords`` is :attr:`zoo.core.layout.TokenLayout.coords`. Entries hold no weights (they are not
``nn.Module`` s), like the attention backends.

* ``rope``: axial rotary position embedding (FLUX ``EmbedND`` / ``apply_rope``; the Self-Flow paper's
  3-D RoPE with 24 channels per axis at head dim 72). The head dim is split into per-axis blocks
  ``axes_dim = (d_time, d_row, d_col)`` (channels ``0 .. d_time - 1`` rotate with time, then row, then
  column; channels past ``sum(axes_dim)`` are not rotated). Within an axis block of ``d`` channels,
  adjacent channel pairs ``(2i, 2i + 1)`` rotate by ``pos * theta^(-2i / d)`` (FLUX's interleaved pairs).
  The time position is ``seconds * time_scale`` (default 100 = FLUX/Self-Flow's 10 ms time ids); rows and
  columns are used as given (token units). Audio and video tokens of the same instant share the time
  coordinate, so they get the same time-axis rotation. Since rotations compose, ``<R(p) q, R(p') k>``
  depends on the positions only through ``p - p'``.
* ``none``: no position information (an ablation); ``apply`` returns ``q, k`` unchanged.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from registry.kinds import POSITIONS
from zoo.core.params import ZooParams


def rope_axes(head_dim: int, axes_dim: tuple[int, ...] | None) -> tuple[int, int, int]:
    """Per-axis rotary channels for ``head_dim``: ``axes_dim`` checked (three even, non-negative values summing
    to at most ``head_dim``), or, for ``None``, the ``head_dim // 2`` channel pairs split into three parts as
    equal as possible, the extra pairs going to column, then row (FLUX also gives time the fewest channels):
    72 -> (24, 24, 24), 16 -> (4, 6, 6), 64 -> (20, 22, 22). Raises ValueError naming the problem."""
    head_dim = int(head_dim)
    if head_dim < 1:
        raise ValueError(f"rope: head_dim must be positive, got {head_dim}")
    if axes_dim is None:
        pairs = head_dim // 2
        base, extra = divmod(pairs, 3)
        # extra pairs (0, 1 or 2) go to the spatial axes first: column, then row
        return (2 * base, 2 * (base + (extra >= 2)), 2 * (base + (extra >= 1)))
    axes = tuple(int(a) for a in axes_dim)
    if len(axes) != 3:
        raise ValueError(f"rope: axes_dim needs 3 values (time, row, column); got {list(axes)}")
    if any(a < 0 or a % 2 for a in axes):
        raise ValueError(f"rope: every axes_dim value must be even and >= 0 (channels rotate in pairs); "
                         f"got {list(axes)}")
    if sum(axes) > head_dim:
        raise ValueError(f"rope: axes_dim {list(axes)} sums to {sum(axes)} > head dim {head_dim}")
    return axes  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------- rope
class RopeParams(ZooParams):
    """Axial rotary position embedding over (time, row, column)."""

    type: Literal["rope"] = Field(..., description="Axial (3-D) rotary position embedding over (time, row, column).")
    theta: float = Field(10000.0, gt=1.0, description="RoPE base: axis pair i of d channels rotates at "
                                                      "theta^(-2i/d) radians per position unit.")
    axes_dim: tuple[int, int, int] | None = Field(
        None, description="Rotary channels per axis (time, row, column), each even, summing to at most the head "
                          "dim (the rest is not rotated); null = split the head dim into three even parts as equal "
                          "as possible (the paper: 24/24/24 at head dim 72).")
    time_scale: float = Field(100.0, gt=0.0, description="Position units per second on the time axis (FLUX / "
                                                         "Self-Flow time ids are 10 ms: 100).")

    @field_validator("axes_dim")
    @classmethod
    def _even(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and any(a < 0 or a % 2 for a in v):
            raise ValueError(f"every axes_dim value must be even and >= 0 (channels rotate in pairs); got {list(v)}")
        return v


@POSITIONS.register
class Rope:
    """Axial RoPE (see the module docstring). ``head_dim``: the attention head dim ``Dh``.

    Example::

        rope = POSITIONS.build(RopeParams(type="rope"), head_dim=72)     # axes 24 / 24 / 24
        cos, sin = rope.angles(layout.coords)                            # (N, 36) each
        q, k = rope.apply(q, k, cos, sin)                                # (B, N, H, 72) each
    """

    Params = RopeParams
    name = "rope"

    def __init__(self, params: RopeParams, *, head_dim: int):
        self.params = params
        self.head_dim = int(head_dim)
        self.axes_dim = rope_axes(self.head_dim, params.axes_dim)
        self.rotary_dim = sum(self.axes_dim)

    def frequencies(self, device: torch.device | str | None = None) -> Tensor:
        """``(rotary_dim / 2,)`` float32 angular frequencies, axis blocks in order time, row, column."""
        parts = [self.params.theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
                 for d in self.axes_dim if d > 0]
        return torch.cat(parts).float() if parts else torch.zeros(0, device=device)

    def angles(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """``coords`` ``(N, 3)`` (seconds, row, column) -> ``(cos, sin)`` each ``(N, head_dim // 2)`` float32;
        pairs past ``rotary_dim / 2`` get ``cos = 1, sin = 0`` (not rotated)."""
        if coords.dim() != 2 or coords.shape[1] != 3:
            raise ValueError(f"rope: coords must be (N, 3) = (time s, row, column); got {tuple(coords.shape)}")
        pos = coords.float() * torch.tensor([self.params.time_scale, 1.0, 1.0], device=coords.device)
        # the axis of every frequency, from Python ints: a tensor of repeats would make the size data-dependent
        axis = torch.tensor([a for a, d in enumerate(self.axes_dim) for _ in range(d // 2)], dtype=torch.long,
                            device=coords.device)
        ang = pos[:, axis] * self.frequencies(coords.device)                  # (N, rotary_dim / 2)
        rest = self.head_dim // 2 - ang.shape[1]
        cos = torch.cat([torch.cos(ang), ang.new_ones(ang.shape[0], rest)], dim=1)
        sin = torch.cat([torch.sin(ang), ang.new_zeros(ang.shape[0], rest)], dim=1)
        return cos, sin

    def apply(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate ``q, k`` ``(B, N, H, Dh)`` by ``cos, sin`` ``(N, Dh // 2)`` (or ``(B, N, Dh // 2)``), in fp32;
        returns them in their own dtypes. An odd last channel is passed through."""
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"rope: built for head dim {self.head_dim}; got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if cos.shape[-1] != self.head_dim // 2 or cos.shape != sin.shape or cos.shape[-2] != q.shape[1]:
            raise ValueError(f"rope: cos/sin must be (N, {self.head_dim // 2}) with N = {q.shape[1]}; "
                             f"got {tuple(cos.shape)}, {tuple(sin.shape)}")
        c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)         # (..., N, 1, Dh/2)
        return _rotate(q, c, s), _rotate(k, c, s)

    def __repr__(self) -> str:
        return f"Rope(axes_dim={self.axes_dim}, theta={self.params.theta:g}, time_scale={self.params.time_scale:g})"


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` ``(B, N, H, Dh)``; interleaved pairs ``(x[2i], x[2i+1])`` rotate by the angle with ``cos, sin``
    ``(..., N, 1, Dh // 2)``."""
    pairs = cos.shape[-1]
    xf = x[..., : 2 * pairs].float().unflatten(-1, (pairs, 2))              # (B, N, H, Dh/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
    return out if 2 * pairs == x.shape[-1] else torch.cat([out, x[..., 2 * pairs:]], dim=-1)


# ------------------------------------------------------------------------------------------------- none
class NoPositionParams(ZooParams):
    """No position information (ablation)."""

    type: Literal["none"] = Field(..., description="No position encoding: attention is permutation-equivariant.")


@POSITIONS.register
class NoPosition:
    """Identity: ``angles`` gives empty ``(N, 0)`` tensors and ``apply`` returns ``q, k`` unchanged."""

    Params = NoPositionParams
    name = "none"

    def __init__(self, params: NoPositionParams, *, head_dim: int):
        self.params = params
        self.head_dim = int(head_dim)

    def angles(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """``coords`` ``(N, 3)`` -> two empty ``(N, 0)`` float32 tensors."""
        empty = coords.new_zeros(coords.shape[0], 0, dtype=torch.float32)
        return empty, empty

    def apply(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        return q, k

    def __repr__(self) -> str:
        return "NoPosition()"
