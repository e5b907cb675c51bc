"""Embeddings shared by the DiT-family backbones: timestep, class label, fixed 2-D sin-cos positions.

All three follow DiT/SiT (``facebookresearch/DiT`` ``models.py``) exactly, so official weights load
without changes:

* :class:`TimestepEmbedder`: ``t`` ``(M,)`` -> ``(M, D)``: 256-d sinusoid of the raw ``t`` (cos half first,
  then sin; frequencies ``10000^(-i/128)``), then ``Linear(256, D) -> SiLU -> Linear(D, D)`` (``mlp.0``,
  ``mlp.2``). Our ``t`` lies in [0, 1] in RF time (:mod:`zoo.core.time`).
* :class:`LabelEmbedder`: a table of ``num_classes + 1`` rows; row ``num_classes`` is the null label used
  for classifier-free guidance. Label dropout is the objective's job, never done here.
* :func:`sincos_pos_embed_2d`: the MAE recipe (DiT ``get_2d_sincos_pos_embed``) on an ``h x w`` grid.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of ``t`` ``(M,)`` -> ``(M, dim)`` in fp32: ``[cos(t w_i), sin(t w_i)]`` with
    ``w_i = max_period^(-i / (dim // 2))``, ``i = 0 .. dim//2 - 1`` (a zero column is appended for odd ``dim``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """``t`` ``(M,)`` -> ``(M, hidden)``: sinusoid (``frequency_dim``) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        """In the weights' dtype (fp32 in training) with autocast off: bf16 would round nearby times together."""
        freq = timestep_embedding(t, self.frequency_dim)
        with _autocast_off(freq.device):
            return self.mlp(freq.to(self.mlp[0].weight.dtype))


def _autocast_off(device: torch.device) -> Any:
    """``torch.autocast(..., enabled=False)`` on CPU / CUDA; nothing elsewhere (e.g. the meta device)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


class LabelEmbedder(nn.Module):
    """``y`` ``(M,)`` int64 in ``0 .. num_classes`` -> ``(M, hidden)``. Row ``num_classes`` (the last) is the
    null label; with ``num_classes = 0`` (unconditional) the table holds only that row."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """MAE ``get_1d_sincos_pos_embed_from_grid``: ``pos`` ``(M,)`` float64 -> ``(M, dim)``, ``[sin, cos]``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """Fixed 2-D sin-cos positions ``(h * w, dim)`` in fp32, rows in row-major grid order (token
    ``i * w + j`` is grid cell ``(i, j)``).

    As MAE/DiT ``get_2d_sincos_pos_embed`` (computed in float64): the first ``dim / 2`` channels embed the
    column index ``j``, the last ``dim / 2`` the row index ``i`` (MAE's ``meshgrid(w, h)`` order); for a
    square grid this equals DiT's table exactly. ``dim`` must be divisible by 4.
    """
    h, w = grid
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    rows = torch.arange(h, dtype=torch.float64, device=device)
    cols = torch.arange(w, dtype=torch.float64, device=device)
    ii, jj = torch.meshgrid(rows, cols, indexing="ij")                 # (h, w) each
    emb = torch.cat([_sincos_1d(dim // 2, jj), _sincos_1d(dim // 2, ii)], dim=1)
    return emb.float()
