"""Objective ``selfflow``: Self-Flow (Chefer, Esser et al. 2026) -- Dual-Timestep Scheduling plus
self-distillation from the EMA teacher ([note:selfflow-step]), in RF time (t = 0 data, t = 1 noise).

One step ([note:selfflow-step]; ``B`` batch, ``N`` tokens, ``P`` token dim, ``D`` backbone width)::

    t, s ~ p(t) independently per sample                        # (B,), (B,); unsorted by default
    M = mask.sample(rng, N)                                     # (B, N) bool, the second-timestep group
    tau = where(M, s, t)                                        # (B, N)   [SF-paper] Eq. 4
    x_tau = (1 - tau) x0 + tau x1                               # one noise x1 for student and teacher (Eq. 5)
    out = student(x_tau, G(t, s; M), y, taps=(l,))              # tau as GroupedTimes((t, s), M); y dropped once
    z_t = sg(ema(x_tmin, tau_min, y, taps=(k,), stop_after=k))  # teacher: first k blocks only, no grad
    L_gen = mean (out.pred - (x1 - x0))^2                       # all tokens and channels (Eq. 2)
    L_rep = mean_{b, i} [1 - cos(h(z_s[b, i]), z_t[b, i])]      # cosine over channels (dim=-1), fp32 (Eq. 6)
    loss = L_gen + gamma * L_rep                                # Eq. 7

``tau_min`` is the paper's ``min(tau)`` per sample ([SF-paper] §3.4): ``min(t, s)`` whenever both groups are
non-empty, the sample's only time when one group is empty (``full_sample_prob`` draws, an empty Bernoulli
mask). ``h`` is the projector (``mlp2`` = the official ``SimpleHead``, [note:projector-size]).

Options beyond the paper ([note:dts-options]; off by default): ``teacher_time="sra"`` (per group
``clamp(t_g - sra_max_shift * u_g, 0, 1)``, ``u_g ~ U(0, 1)`` per sample and group, mixed with the same mask;
with mask ratio 0 this is SRA, [note:sra-teacher]), ``teacher_time="same"`` (teacher sees the student's input),
``rep_tokens="noisier"`` (only tokens at the sample's largest time carry ``L_rep``), ``attention_separation``
(student tokens attend only within their timestep group; the teacher keeps full attention) and
``sort_timesteps`` (the masked group gets ``max(t, s)``; [SRA2SF]'s sorted variant, an ablation).

The student gets ``tau`` as :class:`~zoo.core.time.GroupedTimes` (``values = (t, s)`` ``(B, 2)``, ``index = M``),
so the backbone conditions on two rows per sample with static shapes. ``draw`` makes every random draw (eager:
a ``torch.Generator`` cannot be traced); ``loss`` is pure tensor code that ``torch.compile(fullgraph=True)``
traces into one graph with no host synchronisation; ``forward = loss(draw)``.

Draw order from ``ctx.rng`` (fixed; every draw is made whatever the options are):

1. ``t``: ``timesteps.sample(rng)`` -- ``rng.rand()`` ``(B,)``;
2. ``s``: ``timesteps.sample(rng)`` -- ``rng.rand()`` ``(B,)``;
3. mask: ``mask.sample(rng, N)`` -- its own documented draws (:mod:`zoo.objectives.masks`: ``rng.rand(N)``
   ``(B, N)`` then ``rng.rand()`` ``(B,)``);
4. ``x1``: ``rng.randn(N, P)`` ``(B, N, P)`` (:func:`draw_noise`);
5. label dropout: ``rng.rand()`` ``(B,)`` (:func:`drop_labels`);
6. teacher shifts: ``rng.rand(2)`` ``(B, 2)``, column 0 for the ``t`` group, column 1 for the ``s`` group
   (used by ``teacher_time="sra"`` only).

The EMA teacher is also the evaluated model ([SF-paper] App. A.3, decay 0.9999): for short runs lower
``train.ema.decay`` (``warnings`` says when its horizon ``1 / (1 - decay)`` exceeds the run; [note:ema-teacher]).
The digits specs use 0.99 for that reason.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import OBJECTIVES
from zoo.core.params import FieldError, StreamKeys, ZooParams
from zoo.core.protocols import ObjectiveModule
from zoo.core.time import GroupedTimes, Times
from zoo.core.types import LossOut, StepContext, StepRNG, TokenBatch
from zoo.layers.heads import build_projector, projector_flops
from zoo.core.layout import TokenLayout
from zoo.objectives.flow_matching import (draw_noise, drop_labels, flow_loss, noised, null_label_of,
                                         null_label_problems)
from zoo.objectives.masks import BernoulliMaskParams, build_mask
from zoo.objectives.timesteps import UniformTimestepsParams, build_timesteps

STUDENT_FRACTION, TEACHER_FRACTION = 0.3, 0.7  # [SF-paper] App. A.3: l = 0.3 D, k = 0.7 D (8 / 20 at D = 28)


class SelfFlowDraws(NamedTuple):
    """Self-Flow's draws (the documented order): ``t``, ``s`` ``(B,)`` or ``(B, S)`` per modality, mask ``m``
    ``(B, N)`` bool, noise ``x1`` ``(B, N, P)``, labels ``y`` ``(B,)`` after dropout (or None), teacher shift
    uniforms ``u`` ``(B, 2)``."""

    t: Tensor
    s: Tensor
    m: Tensor
    x1: Tensor
    y: Tensor | None
    u: Tensor


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def default_blocks(depth: int) -> tuple[int, int]:
    """``(l, k)`` = ``(round(0.3 D), round(0.7 D))`` (halves up), with ``l >= 1`` and ``k >= l + 1`` where the
    depth allows: 8 / 20 at D = 28, 4 / 8 at D = 12, 7 / 17 at D = 24 ([note:block-ratio])."""
    depth = int(depth)
    student = max(1, _round_half_up(STUDENT_FRACTION * depth))
    teacher = min(depth, max(student + 1, _round_half_up(TEACHER_FRACTION * depth)))
    return student, teacher


def _block_problems(student: int | None, teacher: int | None, depth: int | None):
    """``(json_path, message)`` for tap blocks violating ``1 <= student < teacher <= depth``."""
    if student is not None and student < 1:
        yield ("student_block", f"student_block must be >= 1 (1-based block index); got {student}")
    if teacher is not None and teacher < 1:
        yield ("teacher_block", f"teacher_block must be >= 1 (1-based block index); got {teacher}")
    if depth is not None and teacher is not None and teacher > depth:
        yield ("teacher_block", f"teacher_block {teacher} exceeds the backbone's {depth} blocks")
    if depth is not None and student is not None and student > depth:
        yield ("student_block", f"student_block {student} exceeds the backbone's {depth} blocks")
    if student is not None and teacher is not None and student >= teacher:
        yield ("student_block", f"student_block {student} must be smaller than teacher_block {teacher} "
                                          f"(the student's layer aligns to a deeper teacher layer)")


class SelfFlowParams(ZooParams):
    """Self-Flow: dual-timestep scheduling + cosine alignment to the EMA teacher's deeper features."""

    type: Literal["selfflow"] = Field(..., description="Self-Flow objective ([SF-paper] §3.3-3.4; [note:selfflow-step]).")
    timesteps: "TimestepsSpec" = Field(  # noqa: F821 (resolved by registry.spec.rebuild)
        default_factory=lambda: UniformTimestepsParams(type="uniform"),
        description="p(t) for both t and s, in RF time ([SF-paper] App. A.2, ImageNet: uniform).")
    mask: "MaskSpec" = Field(  # noqa: F821
        default_factory=lambda: BernoulliMaskParams(type="bernoulli"),
        description="Which tokens get the second timestep s ([SF-paper] §3.3: Bernoulli per token; App. A.3 "
                    "ratio 0.25 image, 0.1 video, 0.5 audio). Ratio 0 = one timestep per sample (SRA).")
    gamma: float = Field(0.8, ge=0.0, description="Weight of L_rep in L_gen + gamma L_rep ([SF-paper] App. A.3, "
                                                  "Eq. 7: 0.8, fixed; SRA README: 0.5).")
    student_block: int | None = Field(
        None, json_schema_extra={"minimum": 1},
        description="1-based block whose output feeds the projector; null = round(0.3 depth), resolved from the "
                    "backbone ([SF-paper] App. A.3/H: 8 for SiT-XL/2).")
    teacher_block: int | None = Field(
        None, json_schema_extra={"minimum": 1},
        description="1-based EMA-teacher block used as the target (raw, no projector); null = round(0.7 depth), "
                    "resolved from the backbone ([SF-paper] App. A.3/H: 20 for SiT-XL/2).")
    projector: Literal["mlp2", "mlp3"] = Field(
        "mlp2", description="Projector h: mlp2 = Linear(D, 2D)-SiLU-Linear(2D, D), the official Self-Flow/SRA "
                            "SimpleHead ([SF-code]); mlp3 = REPA's 3-layer MLP (paper's '~10M params', [note:projector-size]).")
    projector_width: int | None = Field(
        None, gt=0, description="Hidden width of the projector; null = the head's default (mlp2: 2D, mlp3: 2048), "
                                "resolved from the backbone width.")
    teacher_time: Literal["min", "sra", "same"] = Field(
        "min", description="Teacher input: min = clean-most time tau_min = min(tau) on all tokens ([SF-paper] §3.4); "
                           "sra = per group clamp(t_g - sra_max_shift U(0,1), 0, 1) ([SRA-DTS] train.sh default); "
                           "same = the student's input and times ([SRA-DTS]).")
    sra_max_shift: float = Field(0.2, ge=0.0, le=1.0, description="Largest teacher shift of teacher_time='sra' "
                                                                  "([SRA-code] loss.py: t_max = 0.2).")
    rep_tokens: Literal["all", "noisier"] = Field(
        "all", description="Tokens carrying L_rep: all ([SF-paper] Eq. 6, [note:rep-tokens]) or only those at the "
                           "sample's larger time (ablation).")
    attention_separation: bool = Field(
        False, description="Student tokens attend only within their timestep group ([SRA-DTS] "
                           "GroupSeparatedAttention, [SRA2SF] Eq. 8-9); not in the paper: off.")
    sort_timesteps: bool = Field(
        False, description="Give the masked group max(t, s) ([SRA2SF] sorted variant); the paper leaves t, s "
                           "unsorted ([SF-paper] §3.3, [SF-iss#2]): off.")
    label_dropout: float = Field(0.1, ge=0.0, le=1.0,
                                 description="Probability of the null label, drawn once per sample and shared by "
                                             "student and teacher ([SF-iss#10]; SiT/REPA: 0.1).")
    timesteps_per_modality: bool = Field(
        False, description="Draw (t, s) separately for each modality of a sample; default false = one (t, s) pair "
                           "shared by all modalities of a sample ([note:joint-av-times]).")
    modality_weights: Annotated[dict[str, float], StreamKeys()] = Field(
        default_factory=dict, description="Flow-loss weight per modality; a modality not named weighs 1. L_rep is "
                                          "over all tokens of all modalities.")

    def resolve(self, spec: Any) -> "SelfFlowParams":
        """Fill ``student_block``/``teacher_block`` from ``spec.backbone.depth`` and ``projector_width`` from
        ``spec.backbone.hidden``, so the resolved spec holds explicit values."""
        update: dict[str, Any] = {}
        if self.student_block is None or self.teacher_block is None:
            depth = getattr(spec.backbone, "depth", None)
            if depth is None:
                raise FieldError("student_block/teacher_block", f"backbone {spec.backbone.type!r} has no "
                                                                 f"'depth' to derive them from; set both explicitly")
            student, teacher = default_blocks(depth)
            if self.student_block is None:
                update["student_block"] = student
            if self.teacher_block is None:
                update["teacher_block"] = teacher
        hidden = getattr(spec.backbone, "hidden", None)
        if self.projector_width is None and hidden is not None:
            with torch.device("meta"):
                update["projector_width"] = build_projector(self.projector, hidden, hidden)[0].out_features
        return self.model_copy(update=update) if update else self

    def problems(self, spec: Any):
        """Tap blocks inside the backbone and ordered; a guided sampler needs a trained null label."""
        yield from _block_problems(self.student_block, self.teacher_block, getattr(spec.backbone, "depth", None))
        ratio, names = getattr(self.mask, "ratio", None), spec.modality.segment_names
        if isinstance(ratio, dict) and names:
            missing = [n for n in names if n not in ratio]
            if missing:
                yield "mask.ratio", f"no mask ratio for modality {', '.join(map(repr, missing))} (given: {sorted(ratio)})"
        yield from null_label_problems(spec, self.label_dropout)

    def warnings(self, spec: Any):
        """The EMA is the teacher: warn when its averaging horizon exceeds the run ([note:ema-teacher])."""
        decay, steps = spec.train.ema.decay, spec.train.steps
        horizon = 1.0 / (1.0 - decay)
        if horizon > steps:
            target = max(1, steps // 10)
            yield (f"train.ema.decay {decay:g} averages over ~{horizon:,.0f} steps, more than the run's {steps:,}: the "
                   f"EMA teacher lags the student for the whole run ([note:ema-teacher]); consider a decay of at most "
                   f"{1 - 1 / target:.4g} (horizon {target:,} steps)")


@OBJECTIVES.register
class SelfFlow(ObjectiveModule):
    """Self-Flow loss. Trainable: the projector ``self.projector`` (``(B, N, D) -> (B, N, D)``).

    deps: ``hidden`` (``D``), ``depth`` (block count; resolves null tap blocks), ``grid`` (token grid, for the
    mask). ``forward(student, batch, ctx) -> LossOut`` with metrics ``loss_flow``, ``loss_rep`` (the
    ``1 - cos`` mean) and ``mask_frac`` (share of tokens in the second-timestep group); needs ``ctx.ema``.
    """

    Params = SelfFlowParams

    def __init__(self, params: SelfFlowParams, *, hidden: int | None = None, depth: int | None = None,
                 grid: tuple[int, ...] | None = None, layout: TokenLayout | None = None, **deps: Any):
        super().__init__()
        if hidden is None or depth is None:
            raise TypeError("objective 'selfflow' needs the deps hidden and depth (backbone width and block count); "
                            "build it as OBJECTIVES.build(params, hidden=..., depth=..., grid=...)")
        self.params = params
        student, teacher = default_blocks(depth)
        self.student_block = params.student_block if params.student_block is not None else student
        self.teacher_block = params.teacher_block if params.teacher_block is not None else teacher
        bad = list(_block_problems(self.student_block, self.teacher_block, depth))
        if bad:
            raise ValueError("; ".join(f"objective.{p}: {m}" for p, m in bad))
        self.hidden, self.depth = int(hidden), int(depth)
        self.timesteps = build_timesteps(params.timesteps)
        self.mask = build_mask(params.mask, grid=grid, layout=layout)
        self.layout = layout
        self.num_segments = len(layout.segments) if (layout is not None and params.timesteps_per_modality) else 1
        self.register_buffer("segment_ids", layout.segment_ids() if layout is not None else torch.zeros(0, dtype=torch.long),
                             persistent=False)
        self.projector = build_projector(params.projector, self.hidden, self.hidden, params.projector_width)

    # ------------------------------------------------------------------------------------------ pieces
    def groups(self, t: Tensor, s: Tensor, m: Tensor) -> GroupedTimes:
        """The student's times as groups: ``t``, ``s`` ``(B, 1)`` -> ``values`` ``(B, 2)`` (group 0 = ``t``,
        1 = ``s``), ``index = m`` ``(B, N)``; per modality (``(B, S)`` each) group ``2 j + m`` of segment ``j``."""
        if t.shape[1] == 1:
            return GroupedTimes(torch.cat([t, s], dim=1), m.long())
        values = torch.stack([t, s], dim=2).reshape(t.shape[0], -1)              # (B, 2S): t_0, s_0, t_1, ...
        return GroupedTimes(values, 2 * self.segment_ids[None] + m.long())

    def _teacher_input(self, x0: Tensor, x1: Tensor, x_tau: Tensor, times: GroupedTimes, tau: Tensor, m: Tensor,
                       t: Tensor, s: Tensor, u: Tensor) -> tuple[Tensor, Times]:
        """Teacher ``(x, time)``: ``x`` ``(B, N, P)``, time ``(B,)`` (``min``) or the student's groups with their
        own times (``sra``, ``same``); ``t``, ``s`` ``(B, 1)`` or, per modality, ``(B, S)``."""
        mode = self.params.teacher_time
        if mode == "same":
            return x_tau, times
        if mode == "min":
            t_min = tau.min(dim=1).values                                     # (B,)
            return noised(x0, x1, t_min)[0], t_min
        shift = self.params.sra_max_shift
        t_te = (t - shift * u[:, :1]).clamp(0.0, 1.0)                         # (B, 1) or (B, S)
        s_te = (s - shift * u[:, 1:]).clamp(0.0, 1.0)
        te = self.groups(t_te, s_te, m)
        return noised(x0, x1, te.per_token())[0], te

    def rep_loss(self, z_student: Tensor, z_teacher: Tensor, tau: Tensor) -> Tensor:
        """``mean [1 - cos(h(z_student), z_teacher)]`` over the selected tokens of the batch, in fp32;
        ``z_*`` ``(B, N, D)``, ``tau`` ``(B, N)`` (selects the noisier group with ``rep_tokens="noisier"``)."""
        proj = self.projector(z_student)
        with torch.autocast(proj.device.type, enabled=False):
            rep = 1.0 - F.cosine_similarity(proj.float(), z_teacher.float(), dim=-1)  # (B, N)
        if self.params.rep_tokens == "all":
            return rep.mean()
        sel = (tau == tau.max(dim=1, keepdim=True).values).to(rep.dtype)          # (B, N), >= 1 per sample
        return (rep * sel).sum() / sel.sum()

    # ----------------------------------------------------------------------------------------- forward
    def draw(self, student: nn.Module, batch: TokenBatch, rng: StepRNG) -> SelfFlowDraws:
        """The step's randomness in the documented order (eager: the generator cannot be traced)."""
        p, x0 = self.params, batch.x0
        dev = x0.device
        shape = (self.num_segments,) if self.num_segments > 1 else ()
        t = self.timesteps.sample(rng, *shape).to(dev)                        # 1: (B,) or (B, S) per modality
        s = self.timesteps.sample(rng, *shape).to(dev)                        # 2: likewise
        m = self.mask.sample(rng, x0.shape[1]).to(dev)                        # 3: (B, N) bool
        x1 = draw_noise(rng, x0)                                              # 4: (B, N, P)
        null = null_label_of(student) if batch.y is not None else -1
        y = drop_labels(batch.y, rng, p.label_dropout, null)                  # 5: (B,) or None
        u = rng.rand(2).to(dev)                                               # 6: (B, 2)
        return SelfFlowDraws(t, s, m, x1, y, u)

    def forward(self, student: nn.Module, batch: TokenBatch, ctx: StepContext) -> LossOut:
        """``batch.x0`` ``(B, N, P)``, ``batch.y`` ``(B,)`` or None: ``loss(draw(...))`` with ``ctx.ema`` as
        the teacher."""
        if ctx.ema is None:
            raise RuntimeError("objective 'selfflow' needs the EMA backbone as its teacher, but ctx.ema is None "
                               "(compile the spec with its EMA)")
        return self.loss(student, batch, self.draw(student, batch, ctx.rng), ctx.ema)

    def loss(self, student: nn.Module, batch: TokenBatch, d: SelfFlowDraws, ema: nn.Module | None = None) -> LossOut:
        """Pure tensor code (one ``torch.compile`` graph, no host sync). The student is called as
        ``student(x_tau, GroupedTimes((B, G), (B, N)), y, taps=(l,)[, attn_mask=(B, N, N) bool])``, the teacher
        (``ema``, no grad) as ``ema(x_teacher, t_teacher, y, taps=(k,), stop_after=k)``."""
        if ema is None:
            raise RuntimeError("objective 'selfflow' needs the EMA backbone as its teacher (ema is None)")
        p, x0, m = self.params, batch.x0, d.m
        l, k = self.student_block, self.teacher_block
        t, s = d.t, d.s
        if p.sort_timesteps:
            t, s = torch.minimum(t, s), torch.maximum(t, s)
        t, s = (t, s) if t.dim() == 2 else (t[:, None], s[:, None])          # (B, S) or (B, 1)
        times = self.groups(t, s, m)
        tau = times.per_token()                                               # (B, N)
        x_tau, target = noised(x0, d.x1, tau)

        kw = {"attn_mask": m[:, :, None] == m[:, None, :]} if p.attention_separation else {}  # (B, N, N)
        out = student(x_tau, times, d.y, taps=(l,), **kw)
        x_te, t_te = self._teacher_input(x0, d.x1, x_tau, times, tau, m, t, s, d.u)
        with torch.no_grad():
            z_teacher = ema(x_te, t_te, d.y, taps=(k,), stop_after=k).features[k].detach()

        loss_flow, per_modality = flow_loss(out.pred, target, self.layout, p.modality_weights)
        loss_rep = self.rep_loss(out.features[l], z_teacher, tau)
        loss = loss_flow + p.gamma * loss_rep
        return LossOut(loss=loss, metrics={"loss_flow": loss_flow.detach(), "loss_rep": loss_rep.detach(),
                                           "mask_frac": m.float().mean(), **per_modality})

    def extra_forward_flops(self, backbone: nn.Module, num_tokens: int) -> float:
        """Per sample: the teacher's first ``k`` blocks (``k / depth`` of a forward) plus the projector's
        forward and backward (3 x its per-token FLOPs x ``num_tokens``)."""
        teacher = self.teacher_block / backbone.depth * backbone.flops(num_tokens)
        proj = projector_flops(self.params.projector, self.hidden, self.hidden, self.params.projector_width)
        return teacher + 3.0 * proj * num_tokens
