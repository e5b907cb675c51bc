"""Deterministic samplers of the probability-flow ODE ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0 (data).

Grid: ``shift_time(linspace(1, 0, steps + 1), shift)`` (REPA ``euler_sampler``; Self-Flow / FLUX sampleshift,
[note:ode-grid]). The state is integrated in float64 (as REPA does); the velocity sees ``x`` in the
noise's dtype and ``t`` ``(B,)`` in at least float32.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from registry.kinds import SOLVERS
from zoo.core.params import ZooParams
from zoo.core.protocols import Velocity
from zoo.core.time import shift_time


def time_grid(steps: int, shift: float = 1.0) -> Tensor:
    """``(steps + 1,)`` float64 times from 1 down to 0: the uniform grid warped by ``s(shift, t)``."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def eval_velocity(velocity: Velocity, x: Tensor, t: float, like: Tensor) -> Tensor:
    """``velocity(x, t)`` with ``x`` cast to ``like``'s dtype and ``t`` as a ``(B,)`` tensor; result in float64."""
    t_dtype = torch.promote_types(like.dtype, torch.float32)
    tt = torch.full((x.shape[0],), float(t), dtype=t_dtype, device=x.device)
    return velocity(x.to(like.dtype), tt).to(torch.float64)


class _ODESolverParams(ZooParams):
    steps: int = Field(50, gt=0, description="Steps on the grid (REPA ODE / Self-Flow T2I, T2V, T2A: 50).")
    shift: float = Field(1.0, gt=0, description="Sampleshift a applied to the uniform grid, s(a, t) = a t / (1 + (a - 1) t) "
                                                "(1 = none; Self-Flow: 1.78 SD-VAE T2I, 6.93 FLUX.2 AE, 15.0 Wan2.2).")


class EulerParams(_ODESolverParams):
    """First-order Euler on the (shifted) grid; ``steps`` velocity evaluations."""

    type: Literal["euler"] = Field(..., description="Euler ODE solver (REPA euler_sampler, FLUX denoise).")


class HeunParams(_ODESolverParams):
    """Second-order Heun: trapezoidal corrector on every step but the last one to t = 0, which is a plain Euler step
    (REPA ``samplers.py:euler_sampler(heun=True)``): ``2 * steps - 1`` velocity evaluations. ``final_corrector``
    corrects the last step too (``2 * steps``; this project's rule before REPA parity, max difference ~3e-4 at 20 steps)."""

    type: Literal["heun"] = Field(..., description="Heun ODE solver, REPA euler_sampler(heun=True): trapezoidal corrector on "
                                                   "every step but the last (2 * steps - 1 evaluations).")
    final_corrector: bool = Field(False, description="Also correct the last step to t = 0 (2 * steps evaluations; "
                                                     "differs from REPA's sampler by the last step).")


class _ODESolver:
    def __init__(self, params: _ODESolverParams, **deps: Any):
        self.params = params
        self.times = time_grid(params.steps, params.shift)  # (steps + 1,) float64, 1 -> 0

    @torch.no_grad()
    def solve(self, velocity: Velocity, noise: Tensor, generator: Any = None) -> Tensor:
        """``noise`` ``(B, N, P)`` at t = 1 -> ``x0`` ``(B, N, P)`` in ``noise``'s dtype. ``generator`` is unused."""
        x = noise.to(torch.float64)
        ts = self.times.tolist()
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            x = self.step(velocity, x, t_cur, t_next, noise)
        return x.to(noise.dtype)

    def step(self, velocity: Velocity, x: Tensor, t_cur: float, t_next: float, like: Tensor) -> Tensor:
        raise NotImplementedError


@SOLVERS.register
class Euler(_ODESolver):
    Params = EulerParams

    def __init__(self, params: EulerParams, **deps: Any):
        super().__init__(params, **deps)
        self.nfe = params.steps

    def step(self, velocity: Velocity, x: Tensor, t_cur: float, t_next: float, like: Tensor) -> Tensor:
        return x + (t_next - t_cur) * eval_velocity(velocity, x, t_cur, like)


@SOLVERS.register
class Heun(_ODESolver):
    Params = HeunParams

    def __init__(self, params: HeunParams, **deps: Any):
        super().__init__(params, **deps)
        self.final_corrector = params.final_corrector
        self._t_end = float(self.times[-1])  # 0.0: shift_time keeps the grid's ends
        self.nfe = 2 * params.steps - (0 if params.final_corrector else 1)

    def step(self, velocity: Velocity, x: Tensor, t_cur: float, t_next: float, like: Tensor) -> Tensor:
        dt = t_next - t_cur
        d_cur = eval_velocity(velocity, x, t_cur, like)
        x_pred = x + dt * d_cur
        if t_next == self._t_end and not self.final_corrector:  # the grid ends exactly at 0: REPA's last step is Euler
            return x_pred
        d_next = eval_velocity(velocity, x_pred, t_next, like)  # at t = 0 too: v is defined there for the linear path
        return x + dt * 0.5 * (d_cur + d_next)
