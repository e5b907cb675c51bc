"""Projector heads that map a student's hidden states onto a target's feature space (Self-Flow, SRA, REPA).

* ``mlp2``: ``Linear(D, 2D) -> SiLU -> Linear(2D, out)`` -- the official Self-Flow / SRA ``SimpleHead``
  (about 5.3M parameters at D = 1152, out = D);
* ``mlp3``: ``Linear(D, W) -> SiLU -> Linear(W, W) -> SiLU -> Linear(W, out)`` with W = 2048 -- REPA's
  ``build_mlp`` projector (about 8.9M parameters at D = 1152, out = 1152).

Both act per token: ``(B, N, D) -> (B, N, out)``.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

ProjectorKind = Literal["mlp2", "mlp3"]


def build_projector(kind: ProjectorKind, in_dim: int, out_dim: int, width: int | None = None) -> nn.Sequential:
    """A per-token MLP head; ``width`` defaults to ``2 * in_dim`` for ``mlp2`` and 2048 for ``mlp3``."""
    if kind == "mlp2":
        w = width or 2 * in_dim
        return nn.Sequential(nn.Linear(in_dim, w), nn.SiLU(), nn.Linear(w, out_dim))
    if kind == "mlp3":
        w = width or 2048
        return nn.Sequential(nn.Linear(in_dim, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(), nn.Linear(w, out_dim))
    raise ValueError(f"unknown projector kind {kind!r} (known: mlp2, mlp3)")


def projector_flops(kind: ProjectorKind, in_dim: int, out_dim: int, width: int | None = None) -> float:
    """Forward FLOPs per token (2 x MACs)."""
    if kind == "mlp2":
        w = width or 2 * in_dim
        return 2.0 * (in_dim * w + w * out_dim)
    w = width or 2048
    return 2.0 * (in_dim * w + w * w + w * out_dim)
