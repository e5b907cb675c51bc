"""Attention backends (registry kind ``attention``): scaled dot-product attention over heads.

Every backend is a callable with the :class:`zoo.core.protocols.Attention` contract::

    out = attn(q, k, v, mask=None)   # q, k, v: (B, N, H, Dh) -> out: (B, N, H, Dh)

computing ``softmax(q k^T / sqrt(Dh)) v`` per sample and head. ``mask`` is an optional bool ``(B, N, N)``
with True where query ``i`` may attend to key ``j``; a query row with no allowed key gives NaN in every
backend (no backend invents a fallback).

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; ``kernel`` ``auto`` lets torch choose
  (flash / memory-efficient / cuDNN / math), or forces one (``flash``, ``efficient``, ``cudnn``, ``math``; with a
  mask, a forced kernel that takes none falls back to those that do); works on every device; the default off CUDA.
* ``xformers``: ``xformers.ops.memory_efficient_attention`` (FA3 where its op is installed, else FA2/cutlass);
  CUDA only (the ``gpu`` extra installs it); the mask is passed as an additive bias (0 allowed, -inf blocked).

On CUDA the default (:func:`default_attention`) is the fastest candidate that runs for the model's shapes,
timed once per (device, shapes) in bf16 forward + backward: SDPA cuDNN, SDPA flash, SDPA memory-efficient and
xformers when it works. ``kernel_name`` says which kernel a backend runs for given inputs (``meta.json`` and
``runtime.bench`` print it).
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
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    kernel: Literal["auto", "flash", "efficient", "cudnn", "math"] = Field(
        "auto", description="auto = torch's choice; else force that SDPA kernel (with a mask, a kernel that takes "
                            "no mask falls back to efficient / cuDNN / math).")


_SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
_MASKED = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]  # kernels taking a mask


@ATTENTION.register
class SDPAAttention:
    """``F.scaled_dot_product_attention`` on ``(B, H, N, Dh)`` views; q, k, v ``(B, N, H, Dh)`` -> ``(B, N, H, Dh)``."""

    Params = SDPAAttentionParams
    name = "sdpa"

    def __init__(self, params: SDPAAttentionParams):
        self.params = params
        forced = _SDPA_KERNELS.get(params.kernel)
        # (without a mask, with a mask): the forced kernel first, then, with a mask, the others that take one
        self._kernels = None if forced is None else ([forced], [forced] * (forced in _MASKED) + [
            k for k in _MASKED if k != forced])

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        _check(q, k, v, mask)
        attn_mask = None if mask is None else mask[:, None]  # (B, 1, N, N), broadcast over heads
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self._kernels is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask)
        else:
            with sdpa_kernel(self._kernels[mask is not None], set_priority=True):
                out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask)
        return out.transpose(1, 2)

    def kernel_name(self, q: Tensor, masked: bool = False) -> str:
        """``sdpa/<kernel>`` that runs for q, k, v like ``q`` ``(B, N, H, Dh)`` (torch's own choice for ``auto``)."""
        if self._kernels is not None:
            kernels = self._kernels[masked]
            if len(kernels) == 1:
                return f"sdpa/{kernels[0].name.lower()}"
        qt = q.transpose(1, 2)
        mask = torch.ones(q.shape[0], 1, q.shape[1], q.shape[1], dtype=torch.bool, device=q.device) if masked else None
        try:
            return f"sdpa/{SDPBackend(torch._fused_sdp_choice(qt, qt, qt, attn_mask=mask)).name.lower()}"
        except Exception:  # a torch without the private chooser
            return "sdpa/unknown"

    def __repr__(self) -> str:
        return "SDPAAttention()" if self.params.kernel == "auto" else f"SDPAAttention(kernel={self.params.kernel!r})"


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

    def kernel_name(self, q: Tensor, masked: bool = False) -> str:
        """``xformers/<op>``: the forward op xformers dispatches to for inputs like ``q`` (e.g. an FA3 op)."""
        try:
            from xformers.ops import fmha

            bias = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[1], dtype=q.dtype, device=q.device) if masked else None
            return f"xformers/{fmha._dispatch_fw(fmha.Inputs(q, q, q, attn_bias=bias), False).NAME}"
        except Exception:
            return "xformers/unknown"

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

    def kernel_name(self, q: Tensor, masked: bool = False) -> str:
        """Always ``math`` (the explicit fp32 formula)."""
        return "math"

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


def default_attention(device: torch.device | str, shape: tuple[int, int, int] | None = None) -> ZooParams:
    """Params of the backend to use on ``device``: ``sdpa`` (torch's choice) off CUDA; on CUDA the fastest
    candidate that runs for ``shape`` = ``(N, heads, head_dim)`` (:func:`fastest_attention`), or, without a
    shape, ``xformers`` when it works, else ``sdpa``."""
    device = torch.device(device)
    if device.type != "cuda":
        return SDPAAttentionParams(type="sdpa")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if shape is not None:
        return fastest_attention(index, *shape)
    if xformers_works(index):
        return XFormersAttentionParams(type="xformers")
    return SDPAAttentionParams(type="sdpa")


def attention_candidates(device_index: int) -> list[ZooParams]:
    """The CUDA backends worth timing: SDPA's cuDNN, flash and memory-efficient kernels, xformers if it works."""
    out: list[ZooParams] = [SDPAAttentionParams(type="sdpa", kernel=k) for k in ("cudnn", "flash", "efficient")]
    if xformers_works(device_index):
        out.append(XFormersAttentionParams(type="xformers"))
    return out


def time_attention(params: ZooParams, q: Tensor, reps: int = 5) -> float:
    """Median seconds of one forward + backward of backend ``params`` on ``q = k = v`` ``(B, N, H, Dh)``
    (CUDA events); raises whatever the backend raises when it cannot run these inputs."""
    attn = ATTENTION.build(params)
    x = q.detach().requires_grad_(True)
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        attn(x, x, x).sum().backward()
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=None)
def fastest_attention(device_index: int, n: int, heads: int, head_dim: int, batch: int = 8) -> ZooParams:
    """The fastest candidate (:func:`attention_candidates`) for bf16 ``(batch, n, heads, head_dim)`` on
    ``cuda:device_index``; candidates that fail on these shapes are skipped; ``sdpa`` auto if all fail."""
    q = torch.randn(batch, n, heads, head_dim, device=torch.device("cuda", device_index), dtype=torch.bfloat16)
    best: tuple[float, ZooParams] | None = None
    for params in attention_candidates(device_index):
        try:
            t = time_attention(params, q)
        except Exception:  # this kernel does not run these shapes (head dim, sequence length, GPU)
            continue
        if best is None or t < best[0]:
            best = (t, params)
    return best[1] if best is not None else SDPAAttentionParams(type="sdpa")


def build_attention(params: ZooParams | None, device: torch.device | str) -> Any:
    """The attention callable for ``params``; ``None`` = :func:`default_attention` of ``device``."""
    return ATTENTION.build(params if params is not None else default_attention(device))
