"""THE time convention of the zoo: rectified flow (the Self-Flow paper's, REPA's, FLUX's).

* ``t = 0`` is data ``x0``, ``t = 1`` is Gaussian noise ``x1 ~ N(0, I)``;
* ``x_t = (1 - t) * x0 + t * x1`` (per token when ``t`` is per token);
* velocity target ``v = d x_t / dt = x1 - x0``;
* samplers integrate from ``t = 1`` down to ``t = 0``; guidance intervals and shifts are stated in this time.

Foreign weights that use another convention are converted when they are loaded, never at run time
inside a backbone: SiT's ``ICPlan`` puts data at ``t_sit = 1`` (``t_sit = 1 - t``) and predicts
``x0 - x1``, so a SiT-time network ``f`` serves here as ``v(x, t) = -f(x, 1 - t)``.
"""
from __future__ import annotations

from torch import Tensor


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """Broadcast ``t`` of shape ``(B,)`` or ``(B, N)`` against tokens ``like`` of shape ``(B, N, ...)``."""
    return t.reshape(*t.shape, *([1] * (like.dim() - t.dim())))


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t x1``; ``t``: ``(B,)`` or ``(B, N)``, ``x0, x1``: ``(B, N, P)``."""
    tt = expand_time(t, x0)
    return (1 - tt) * x0 + tt * x1


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    """``d x_t / dt = x1 - x0`` (independent of ``t``)."""
    return x1 - x0


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Time shift ``s(a, t) = a t / (1 + (a - 1) t)``; ``a > 1`` moves mass toward noise (t = 1)."""
    # = a t / (1 + (a - 1) t), written as t plus a correction whose sign is that of (a - 1): exact at
    # t = 0 and t = 1, and never on the wrong side of t in floating point
    return t + t * (1 - t) * (shift - 1) / (1 + (shift - 1) * t)


def sit_time(t: Tensor) -> Tensor:
    """Our time to SiT's (``1 - t``); the same map converts back."""
    return 1 - t
