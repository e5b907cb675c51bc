"""Classifier-free guidance as a velocity wrapper ([note:cfg-interval]): ``v_u + scale (v_c - v_u)`` for samples
whose RF time lies in ``[low, high]`` (REPA: scale 1.8, high 0.7), the conditional velocity elsewhere."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from zoo.core.protocols import Velocity
from zoo.core.time import expand_time

Model = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""``model(x (B, N, P), t (B,), y (B,) | None) -> velocity (B, N, P)``."""


def guided(model: Model, y: Tensor | None, null_label: int, scale: float = 1.0, low: float = 0.0,
           high: float = 1.0) -> Velocity:
    """The velocity ``v(x, t)`` to hand to a solver.

    * ``y`` None: unconditional calls ``model(x, t, None)`` (no guidance is possible);
    * ``scale == 1``: one conditional call ``model(x, t, y)``;
    * otherwise conditional and null-label rows go through one batched call of ``2B`` rows, and
      ``v_u + scale (v_c - v_u)`` replaces ``v_c`` for the samples with ``low <= t <= high``. When no
      sample of the batch is inside the interval only the conditional call is made.
    """
    if y is None:
        return lambda x, t: model(x, t, None)
    if scale == 1.0:
        return lambda x, t: model(x, t, y)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        inside = (t >= low) & (t <= high)                                 # (B,) or (B, N)
        if not bool(inside.any()):
            return model(x, t, y)
        b = x.shape[0]
        null = torch.full_like(y, null_label)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        v_c, v_u = out[:b], out[b:]
        return torch.where(expand_time(inside, v_c), v_u + scale * (v_c - v_u), v_c)

    return velocity
