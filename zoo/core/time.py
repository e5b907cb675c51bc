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

from typing import NamedTuple, Union

from torch import Tensor


class GroupedTimes(NamedTuple):
    """Per-token times given by groups: ``G`` distinct times per sample and each token's group.

    ``values`` ``(B, G)`` float RF times; ``index`` ``(B, N)`` int64 in ``0 .. G - 1``. Token ``i`` of sample
    ``b`` has time ``values[b, index[b, i]]``. Self-Flow's dual-timestep scheduling is ``G = 2``
    (``values = (t, s)``, ``index`` = the mask); per-modality draws use ``G = 2 S``. Backbones run their
    conditioning once per ``(sample, group)``, with shapes fixed by ``(B, G, N)`` (no search for distinct
    times, no host synchronisation). Indices outside ``0 .. G - 1`` are not checked (that would read the
    device); they are an error of the caller.
    """

    values: Tensor
    index: Tensor

    def per_token(self) -> Tensor:
        """``(B, N)`` time of every token."""
        return self.values.gather(1, self.index)

    def with_values(self, values: Tensor) -> "GroupedTimes":
        """The same groups with other ``(B, G)`` times (e.g. ``1 - values``)."""
        return GroupedTimes(values, self.index)


Times = Union[Tensor, GroupedTimes]
"""What a backbone's ``forward`` takes as ``t``: ``(B,)``, ``(B, N)`` or :class:`GroupedTimes`."""


def token_times(t: Times) -> Tensor:
    """``t`` as a plain tensor: ``(B,)`` or ``(B, N)`` unchanged, :class:`GroupedTimes` -> ``(B, N)``."""
    return t.per_token() if isinstance(t, GroupedTimes) else t


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


def sit_time(t: Times) -> Times:
    """Our time to SiT's (``1 - t``); the same map converts back. Keeps the groups of a :class:`GroupedTimes`."""
    return t.with_values(1 - t.values) if isinstance(t, GroupedTimes) else 1 - t

