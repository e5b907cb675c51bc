"""Training timestep distributions ``p(t)`` on [0, 1] (RF time: 0 = data, 1 = noise), each given by its
inverse CDF so a draw is ``icdf(U(0, 1))`` ([note:timestep-densities]).

Inverse CDFs are evaluated in float64 and cast back to the input's dtype, so they are monotone
non-decreasing in ``u`` and stay inside [0, 1] even where float32 ``erfinv`` saturates.

* ``uniform``: ``t = u`` (SiT/REPA/Self-Flow ImageNet and T2I default);
* ``logit_normal``: ``logit(t) ~ N(mean, std)``, ``t = sigmoid(mean + std * sqrt(2) * erfinv(2u - 1))``;
* ``shifted``: ``t = s(shift, base.icdf(u))`` with ``s(a, t) = a t / (1 + (a - 1) t)`` (Self-Flow App. A.2 Eq. 8);
  a shifted logit-normal(mean, std) is the logit-normal(mean + log(shift), std) (Eq. 10).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from registry.kinds import TIMESTEPS
from zoo.core.params import ZooParams
from zoo.core.time import shift_time
from zoo.core.types import StepRNG


class _InverseCDF:
    """Base of the timestep distributions: ``sample`` = ``icdf`` of uniform draws; subclasses define
    ``_icdf64(u)`` on float64 ``u`` of any shape."""

    def icdf(self, u: Tensor) -> Tensor:
        """``u`` any shape in [0, 1] -> ``t`` of the same shape and dtype, in [0, 1], non-decreasing in ``u``."""
        out_dtype = u.dtype if u.is_floating_point() else torch.get_default_dtype()
        return self._icdf64(u.to(torch.float64)).clamp(0.0, 1.0).to(out_dtype)

    def _icdf64(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, rng: StepRNG, *shape: int) -> Tensor:
        """``(rng.count, *shape)`` draws; one ``rng.rand`` call (so the draw is split-invariant over ranks)."""
        return self.icdf(rng.rand(*shape))


# --------------------------------------------------------------------------------------------- uniform
class UniformTimestepsParams(ZooParams):
    """``t ~ U(0, 1)``."""

    type: Literal["uniform"] = Field(..., description="Uniform on [0, 1] (REPA/SiT default; Self-Flow ImageNet and T2I).")


@TIMESTEPS.register
class UniformTimesteps(_InverseCDF):
    Params = UniformTimestepsParams

    def __init__(self, params: UniformTimestepsParams, **deps: Any):
        self.params = params

    def _icdf64(self, u: Tensor) -> Tensor:
        return u


# ---------------------------------------------------------------------------------------- logit-normal
class LogitNormalTimestepsParams(ZooParams):
    """``logit(t) ~ N(mean, std^2)``."""

    type: Literal["logit_normal"] = Field(..., description="Logit-normal (REPA 'lognormal', SD3/FLUX).")
    mean: float = Field(0.0, description="Mean of logit(t) (REPA 'lognormal': 0; Self-Flow base assumed 0, [note:logit-normal-base]).")
    std: float = Field(1.0, gt=0, description="Standard deviation of logit(t) (REPA 'lognormal': 1; Self-Flow base assumed 1).")


@TIMESTEPS.register
class LogitNormalTimesteps(_InverseCDF):
    Params = LogitNormalTimestepsParams

    def __init__(self, params: LogitNormalTimestepsParams, **deps: Any):
        self.params = params

    def _icdf64(self, u: Tensor) -> Tensor:
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)  # standard normal quantile; +-inf at u = 1 / 0
        return torch.sigmoid(self.params.mean + self.params.std * z)


# -------------------------------------------------------------------------------------------- shifted
class ShiftedTimestepsParams(ZooParams):
    """``t = s(shift, t_base)`` with ``s(a, t) = a t / (1 + (a - 1) t)``; ``shift > 1`` moves mass toward noise."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # [SF-paper] App. A.2 ([note:timestep-densities]): trainshift per autoencoder, on a logit-normal(0, 1) base.
        "flux2_image": {"shift": 4.63, "base": {"type": "logit_normal"}},
        "wan22_video": {"shift": 2.95, "base": {"type": "logit_normal"}},
        "songbloom_audio": {"shift": 1.0, "base": {"type": "logit_normal"}},
    }

    type: Literal["shifted"] = Field(..., description="A base distribution passed through the time shift (Self-Flow Eq. 8).")
    shift: float = Field(..., gt=0, description="Shift a of s(a, t) = a t / (1 + (a - 1) t); 1 = no shift "
                                                "(Self-Flow trainshifts: 4.63 FLUX.2 AE, 2.95 Wan2.2, 1.0 audio).")
    base: "TimestepsSpec" = Field(default_factory=lambda: UniformTimestepsParams(type="uniform"),
                                  description="Distribution that is shifted (default uniform = Self-Flow Eq. 9's shifted uniform).")


@TIMESTEPS.register
class ShiftedTimesteps(_InverseCDF):
    Params = ShiftedTimestepsParams

    def __init__(self, params: ShiftedTimestepsParams, **deps: Any):
        self.params = params
        self.base = build_timesteps(params.base)

    def _icdf64(self, u: Tensor) -> Tensor:
        return shift_time(self.base.icdf(u), self.params.shift)  # u is float64, so base.icdf is too


def build_timesteps(params: Any) -> _InverseCDF:
    """Params of any registered timestep distribution -> the distribution (through ``TIMESTEPS``)."""
    return TIMESTEPS.build(params)
