"""The SiT / REPA / Self-Flow SDE sampler (Euler-Maruyama), written in RF time ([note:sde-sampler]).

Going backwards in time (``dt < 0``), the reverse SDE with the same marginals as the flow is

    dx = [v - 0.5 g^2 score] dt + g dW,   g^2 = 2 w(t),   w(t) = diffusion_norm * t  (SiT "sigma" form)

and for the linear path ``x_t = (1 - t) x0 + t x1`` the score follows from the velocity:
``score(x, t) = -(x + (1 - t) v) / t``. So the drift is ``d = v - w(t) score = v + (w(t) / t) (x + (1 - t) v)``
and one step is ``x_next = x + d dt + sqrt(2 w(t)) sqrt(|dt|) eps`` (REPA ``samplers.py``; with norm 1,
``2 w = 2t`` is REPA's ``compute_diffusion``).

Grid: ``linspace(1, last_step, steps)`` then 0 (``steps`` velocity evaluations): ``steps - 1`` stochastic
steps, then a deterministic last step (drift only, no noise) from ``last_step`` to 0 -- SiT's "Mean" last step.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from registry.kinds import SOLVERS
from zoo.core.params import ZooParams
from zoo.core.protocols import Velocity
from zoo.core.types import SampleNoise, normal_like
from zoo.solvers.ode import eval_velocity


def sde_grid(steps: int, last_step: float) -> Tensor:
    """``(steps + 1,)`` float64: ``linspace(1, last_step, steps)`` followed by 0."""
    return torch.cat([torch.linspace(1.0, last_step, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def score_from_velocity(v: Tensor, x: Tensor, t: float) -> Tensor:
    """``grad log p_t(x) = -(x + (1 - t) v) / t`` for the linear path (REPA ``get_score_from_velocity``); ``t > 0``."""
    return -(x + (1.0 - t) * v) / t


class EulerMaruyamaParams(ZooParams):
    """SDE sampling with ``steps`` velocity evaluations."""

    type: Literal["euler_maruyama"] = Field(..., description="SiT/REPA Euler-Maruyama SDE sampler with a deterministic last step.")
    steps: int = Field(250, gt=0, description="Velocity evaluations, the last one the deterministic step (SiT/REPA/Self-Flow: 250).")
    last_step: float = Field(0.04, gt=0, lt=1, description="Time of the last stochastic grid point; the final step goes "
                                                            "deterministically from it to 0 (SiT/REPA: 0.04).")
    diffusion_norm: float = Field(1.0, ge=0, description="w(t) = diffusion_norm * t, noise sqrt(2 w) dW "
                                                          "(SiT 'sigma' diffusion form, diffusion_norm 1.0; 0 = the ODE).")


@SOLVERS.register
class EulerMaruyama:
    Params = EulerMaruyamaParams

    def __init__(self, params: EulerMaruyamaParams, **deps: Any):
        self.params = params
        self.times = sde_grid(params.steps, params.last_step)  # (steps + 1,) float64, 1 -> last_step -> 0
        self.nfe = params.steps

    def drift(self, v: Tensor, x: Tensor, t: float) -> Tensor:
        """``v - w(t) score(x, t)`` ``(B, N, P)``, the reverse-time drift (``dt < 0``)."""
        return v - self.params.diffusion_norm * t * score_from_velocity(v, x, t)

    @torch.no_grad()
    def solve(self, velocity: Velocity, noise: Tensor, generator: torch.Generator | SampleNoise | None = None) -> Tensor:
        """``noise`` ``(B, N, P)`` at t = 1 -> ``x0`` ``(B, N, P)`` in ``noise``'s dtype. The per-step Gaussian
        noise is drawn (float64, on ``noise``'s device) from ``generator`` (the global RNG when None; a
        :class:`SampleNoise` draws each row from its sample's own generator)."""
        x = noise.to(torch.float64)
        ts = self.times.tolist()
        for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            dt = t_next - t_cur
            d = self.drift(eval_velocity(velocity, x, t_cur, noise), x, t_cur)
            x = x + d * dt
            if i < len(ts) - 2:  # every step but the last adds noise
                eps = normal_like(generator, x.shape, x.dtype, x.device)
                g = (2.0 * self.params.diffusion_norm * t_cur) ** 0.5
                x = x + g * abs(dt) ** 0.5 * eps
        return x.to(noise.dtype)
