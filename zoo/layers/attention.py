"""Attention backends (registry kind ``attention``): scaled dot-product attention over heads.

Every backend is a callable with the :class:`zoo.core.protocols.Attention` contract::

    out = attn(q, k, v, mask=None)   # q, k, v: (B, N, H, Dh) -> out: (B, N, H, Dh)

computing ``softmax(q k^T / sqrt(Dh)) v`` per sample and head. ``mask`` is an optional bool ``(B, N, N)``
with True where query ``i`` may attend to key ``j``; a query row with no allowed key gives NaN in every
backend (no backend invents a fallback).

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / math kernels
  chosen by torch); works on every device; the default off CUDA.
* ``xformers``: ``xformers.ops.memory_efficient_attention`` (FA2/FA3/cutlass kernels); CUDA only; the
  mask is passed as an additive bias (0 allowed, -inf blocked). The default on CUDA when it works.
* ``math``: the reference formula in fp32 (slow; for tests and debugging), output cast back to ``q.dtype``.

Backends hold no weights and are not ``nn.Module`` s, so they never appear in a state dict.

Example::

    attn = build_attention(None, torch.device("cpu"))      # SDPAAttention
    out = attn(q, k, v)                                    # (B, N, H, Dh)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from registry.kinds import ATTENTION
from zoo.core.params import ZooParams


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention expects q, k, v of one shape (B, N, H, Dh); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if mask is not None:
        b, n = q.shape[:2]
        if mask.dtype != torch.bool or tuple(mask.shape) != (b, n, n):
            raise ValueError(f"attention mask must be bool of shape (B, N, N) = ({b}, {n}, {n}); "
                             f"got {mask.dtype} {tuple(mask.shape)}")


# ------------------------------------------------------------------------------------------------- sdpa
class SDPAAttentionParams(ZooParams):
    """PyTorch's fused scaled dot-product attention."""

    type: Literal["sdpa"] = Field(..., description="torch.nn.functional.scaled_dot_product_attention.")


@ATTENTION.register
class SDPAAttention:
    """``F.scaled_dot_product_attention`` on ``(B, H, N, Dh)`` views; q, k, v ``(B, N, H, Dh)`` -> ``(B, N, H, Dh)``."""

    Params = SDPAAttentionParams
    name = "sdpa"

    def __init__(self, params: SDPAAttentionParams):
        self.params = params

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        _check(q, k, v, mask)
        attn_mask = None if mask is None else mask[:, None]  # (B, 1, N, N), broadcast over heads
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask)
        return out.transpose(1, 2)

    def __repr__(self) -> str:
        return "SDPAAttention()"


# --------------------------------------------------------------------------------------------- xformers
def _import_xformers() -> Any:
    """``xformers.ops.memory_efficient_attention``; raises RuntimeError saying why it is unavailable."""
    try:
        from xformers.ops import memory_efficient_attention
    except Exception as e:  # ImportError, or a broken build raising something else at import
        raise RuntimeError(
            f"attention 'xformers' needs the xformers package (xformers.ops.memory_efficient_attention), "
            f"which cannot be imported here: {type(e).__name__}: {e}. Install an xformers build matching "
            f"this torch, or use attention type 'sdpa'."
        ) from e
    return memory_efficient_attention


class XFormersAttentionParams(ZooParams):
    """xFormers memory-efficient attention (CUDA only)."""

    type: Literal["xformers"] = Field(..., description="xformers.ops.memory_efficient_attention (CUDA only).")


@ATTENTION.register
class XFormersAttention:
    """``xformers.ops.memory_efficient_attention``; q, k, v ``(B, N, H, Dh)`` (xformers' native layout)
    -> ``(B, N, H, Dh)``. The bool mask becomes an additive bias ``(B, H, N, N)`` in ``q.dtype``."""

    Params = XFormersAttentionParams
    name = "xformers"

    def __init__(self, params: XFormersAttentionParams):
        self.params = params
        if not torch.cuda.is_available():
            raise RuntimeError("attention 'xformers' needs a CUDA device, and CUDA is not available here; "
                               "use attention type 'sdpa' (or leave attention null for the automatic choice)")
        self._fn = _import_xformers()

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        _check(q, k, v, mask)
        if q.device.type != "cuda":
            raise RuntimeError(f"attention 'xformers' runs on CUDA tensors only; got tensors on {q.device}")
        bias = None
        if mask is not None:
            b, n, h = q.shape[0], q.shape[1], q.shape[2]
            # xformers wants the bias rows aligned to 8 elements: allocate a padded last dim, then slice.
            pad = (-n) % 8
            full = torch.zeros(b, h, n, n + pad, dtype=q.dtype, device=q.device)
            full[..., :n].masked_fill_(~mask[:, None], float("-inf"))
            bias = full[..., :n]
        return self._fn(q, k, v, attn_bias=bias)

    def __repr__(self) -> str:
        return "XFormersAttention()"


# ------------------------------------------------------------------------------------------------- math
class MathAttentionParams(ZooParams):
    """Reference attention, computed explicitly in fp32."""

    type: Literal["math"] = Field(..., description="Explicit softmax(q k^T / sqrt(Dh)) v in fp32 (reference; slow).")


@ATTENTION.register
class MathAttention:
    """``softmax(q k^T / sqrt(Dh)) v`` in fp32, masked entries set to -inf before the softmax;
    q, k, v ``(B, N, H, Dh)`` -> ``(B, N, H, Dh)`` in ``q.dtype``."""

    Params = MathAttentionParams
    name = "math"

    def __init__(self, params: MathAttentionParams):
        self.params = params

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        _check(q, k, v, mask)
        qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))          # (B, H, N, Dh)
        scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])          # (B, H, N, N)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        out = scores.softmax(dim=-1) @ vf                                    # (B, H, N, Dh)
        return out.transpose(1, 2).to(q.dtype)

    def __repr__(self) -> str:
        return "MathAttention()"


# ----------------------------------------------------------------------------------------------- choice
@functools.lru_cache(maxsize=None)
def xformers_works(device_index: int = 0) -> bool:
    """True when ``xformers.ops.memory_efficient_attention`` imports and runs a tiny fp16 call on
    ``cuda:device_index`` (an importable build compiled for another torch/CUDA fails only when called)."""
    if not torch.cuda.is_available():
        return False
    try:
        fn = _import_xformers()
        x = torch.zeros(1, 8, 1, 64, device=torch.device("cuda", device_index), dtype=torch.float16)
        fn(x, x, x)
        return True
    except Exception:
        return False


def default_attention(device: torch.device | str) -> ZooParams:
    """Params of the backend to use on ``device``: ``xformers`` on CUDA when it imports (and runs),
    else ``sdpa``."""
    device = torch.device(device)
    if device.type != "cuda":
        return SDPAAttentionParams(type="sdpa")
    if xformers_works(device.index if device.index is not None else torch.cuda.current_device()):
        return XFormersAttentionParams(type="xformers")
    return SDPAAttentionParams(type="sdpa")


def build_attention(params: ZooParams | None, device: torch.device | str) -> Any:
    """The attention callable for ``params``; ``None`` = :func:`default_attention` of ``device``."""
    return ATTENTION.build(params if params is not None else default_attention(device))
