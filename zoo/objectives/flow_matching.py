"""Vanilla flow matching (SiT / REPA without alignment): ``E || f(x_t, t, y) - (x1 - x0) ||^2`` in RF time
([note:rf-time]), with class-label dropout for classifier-free guidance.

The small functions below (noise draw, label dropout, noising, loss) are the shared pieces that the
other objectives (Self-Flow, REPA) reuse, so every objective draws its randomness the same way.

Draw order from ``ctx.rng`` in :class:`FlowMatching` (fixed; changing it changes every run's noise):

1. ``t``: ``timesteps.sample(rng)`` -- one ``rng.rand()`` ``(B,)``;
2. ``x1``: ``rng.randn(N, P)`` ``(B, N, P)``;
3. label dropout: ``rng.rand()`` ``(B,)`` -- drawn always (also when ``y`` is None or the rate is 0), so
   the draws that follow never depend on whether labels exist.
"""
from __future__ import annotations

from typing import Annotated, Any, Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import OBJECTIVES
from zoo.core.params import StreamKeys, ZooParams
from zoo.core.protocols import ObjectiveModule
from zoo.core.layout import TokenLayout
from zoo.core.time import interpolate, velocity_target
from zoo.core.types import LossOut, StepContext, StepRNG, TokenBatch
from zoo.objectives.timesteps import UniformTimestepsParams, build_timesteps


# ------------------------------------------------------------------------------------ shared pieces
def draw_noise(rng: StepRNG, x0: Tensor) -> Tensor:
    """``x1 ~ N(0, I)`` shaped like ``x0`` ``(B, N, P)`` (one ``rng.randn(N, P)`` call), on ``x0``'s device and dtype."""
    return rng.randn(*x0.shape[1:]).to(device=x0.device, dtype=x0.dtype)


def drop_labels(y: Tensor | None, rng: StepRNG, rate: float, null_label: int) -> Tensor | None:
    """Replace each label ``y`` ``(B,)`` by ``null_label`` with probability ``rate``.

    Always makes one ``rng.rand()`` ``(B,)`` draw (whatever ``y`` and ``rate`` are); ``y`` None stays None
    and ``rate == 0`` never drops (the test is ``u < rate`` with ``u`` in [0, 1)).
    """
    u = rng.rand()
    if y is None:
        return None
    drop = (u < rate).to(y.device)
    return torch.where(drop, torch.full_like(y, null_label), y)


def noised(x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_t, target)``: ``x_t = (1 - t) x0 + t x1`` and ``target = x1 - x0``; ``t`` ``(B,)`` or ``(B, N)``,
    ``x0, x1`` ``(B, N, P)``."""
    t = t.to(device=x0.device, dtype=x0.dtype)
    return interpolate(x0, x1, t), velocity_target(x0, x1)


def flow_loss(pred: Tensor, target: Tensor, layout: TokenLayout | None = None,
              weights: dict[str, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Squared error in fp32: ``(B, N, P), (B, N, P)`` -> ``(loss, per-modality metrics)``.

    One modality filling all ``P`` channels (or no layout): the mean over all tokens and channels. Several
    modalities (:class:`~zoo.core.layout.TokenLayout`): ``sum_m w_m * mean over modality m's tokens and its own
    channels`` (the zero padding beyond a segment's ``token_dim`` carries no loss), ``w_m = weights.get(m, 1)``;
    the metrics then hold each modality's unweighted mean as ``loss_flow_<name>``.
    """
    weights = weights or {}
    segs = layout.segments if layout is not None else ()
    if len(segs) <= 1 and (not segs or segs[0].token_dim == pred.shape[-1]):
        w = weights.get(segs[0].name, 1.0) if segs else 1.0
        return w * F.mse_loss(pred.float(), target.float()), {}
    parts = {s.name: F.mse_loss(pred[:, s.tokens, : s.token_dim].float(), target[:, s.tokens, : s.token_dim].float())
             for s in segs}
    loss = sum(weights.get(name, 1.0) * v for name, v in parts.items())
    return loss, ({f"loss_flow_{k}": v.detach() for k, v in parts.items()} if len(parts) > 1 else {})


class FlowDraws(NamedTuple):
    """Vanilla flow matching's draws: ``t`` ``(B,)``, ``x1`` ``(B, N, P)``, ``y`` ``(B,)`` after label dropout
    (None without labels)."""

    t: Tensor
    x1: Tensor
    y: Tensor | None


def null_label_problems(spec: Any, label_dropout: float) -> Iterator[tuple[str, str]]:
    """The rule every class-conditional objective shares: guided sampling (``sample.cfg_scale != 1``) needs the
    null label trained, i.e. ``label_dropout > 0``; yields ``("label_dropout", message)`` when it is not."""
    if getattr(spec.sample, "cfg_scale", 1.0) != 1.0 and label_dropout == 0 and spec.data.num_classes > 0:
        yield ("label_dropout",
               f"sample.cfg_scale is {spec.sample.cfg_scale:g} but label_dropout is 0: the null label is never trained")


def null_label_of(student: nn.Module) -> int:
    """The backbone's CFG null label (``num_classes``), looking through a DDP / compile wrapper."""
    for m in (student, getattr(student, "module", None), getattr(student, "_orig_mod", None)):
        if m is not None and hasattr(m, "null_label"):
            return int(m.null_label)
    raise AttributeError(f"{type(student).__name__} has no null_label")


# ---------------------------------------------------------------------------------------- objective
class FlowMatchingParams(ZooParams):
    """Plain flow matching with per-sample timesteps."""

    type: Literal["flow_matching"] = Field(..., description="Vanilla flow matching, velocity target x1 - x0 (SiT/REPA).")
    timesteps: "TimestepsSpec" = Field(default_factory=lambda: UniformTimestepsParams(type="uniform"),
                                       description="Training p(t) in RF time (SiT/REPA/Self-Flow ImageNet: uniform).")
    label_dropout: float = Field(0.1, ge=0.0, le=1.0,
                                 description="Probability of replacing a class label by the null label, for CFG "
                                             "(SiT/REPA class_dropout_prob: 0.1).")
    modality_weights: Annotated[dict[str, float], StreamKeys()] = Field(
        default_factory=dict, description="Flow-loss weight per modality, e.g. {\"video\": 1, \"audio\": 0.5}; a "
                                          "modality not named weighs 1 ([SF-paper] §4.2 weighs the loss per modality).")

    def problems(self, spec: Any):
        """A guided sampler needs a trained null label."""
        yield from null_label_problems(spec, self.label_dropout)


@OBJECTIVES.register
class FlowMatching(ObjectiveModule):
    """No parameters. ``forward(student, batch, ctx) -> LossOut`` with metric ``loss_flow``."""

    Params = FlowMatchingParams

    def __init__(self, params: FlowMatchingParams, *, layout: TokenLayout | None = None, **deps: Any):
        super().__init__()
        self.params, self.layout = params, layout
        self.timesteps = build_timesteps(params.timesteps)

    def draw(self, student: nn.Module, batch: TokenBatch, rng: StepRNG) -> FlowDraws:
        """The step's randomness, in the documented order (eager: the generator cannot be traced)."""
        x0 = batch.x0
        t = self.timesteps.sample(rng).to(x0.device)                        # (B,)
        x1 = draw_noise(rng, x0)                                            # (B, N, P)
        null = null_label_of(student) if batch.y is not None else -1
        y = drop_labels(batch.y, rng, self.params.label_dropout, null)     # (B,) or None
        return FlowDraws(t, x1, y)

    def loss(self, student: nn.Module, batch: TokenBatch, d: FlowDraws, ema: nn.Module | None = None) -> LossOut:
        """Pure tensor code (one ``torch.compile`` graph): ``student(x_t, t (B,), y).pred`` ``(B, N, P)``."""
        xt, target = noised(batch.x0, d.x1, d.t)
        pred = student(xt, d.t, d.y).pred
        loss, per_modality = flow_loss(pred, target, self.layout, self.params.modality_weights)
        return LossOut(loss=loss, metrics={"loss_flow": loss.detach(), **per_modality})

    def forward(self, student: nn.Module, batch: TokenBatch, ctx: StepContext) -> LossOut:
        """``batch.x0`` ``(B, N, P)``, ``batch.y`` ``(B,)`` or None: ``loss(draw(...))``."""
        return self.loss(student, batch, self.draw(student, batch, ctx.rng), ctx.ema)
