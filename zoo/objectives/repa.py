"""REPA: flow matching plus alignment of a student block to frozen external encoders ([note:repa-recipe]).

    L = L_flow + proj_coeff * mean_e mean_{b,n} ( -cos( proj_e(h_l[b, n]), z_e[b, n] ) )

* ``L_flow``: vanilla flow matching exactly as :mod:`zoo.objectives.flow_matching` (same draws from ``ctx.rng``
  in the same order: t, noise, label dropout; with ``proj_coeff = 0`` the loss equals ``flow_matching``'s);
* ``h_l`` ``(B, N, D)``: the student's hidden state after block ``align_depth`` on the noisy input
  ([REPA-code] ``--encoder-depth``: 8 for SiT-XL/2 and L, 4 for B; REPA README, REPA issue #5);
* ``proj_e``: one per encoder, REPA's ``build_mlp`` ``Linear(D, W) -> SiLU -> Linear(W, W) -> SiLU ->
  Linear(W, F_e)``, W = 2048 (``zoo.layers.heads`` ``mlp3``), trained and saved with the backbone;
* ``z_e`` ``(B, N, F_e)``: the frozen teacher's patch features of the clean data-space batch (``batch.raw``),
  computed under ``torch.no_grad``; a teacher whose feature grid is not the token grid is resampled to it
  (bilinear, antialiased when shrinking; [note:repa-other-grids] -- REPA itself resizes the encoder input so
  the grids match, which the ``vit`` teacher does by default);
* the cosine is per token over channels (``dim=-1``) after ``F.normalize`` of both sides, in fp32 outside
  autocast ([note:cosine-fp32]), averaged over tokens and batch, then over encoders ([REPA-code] ``loss.py``).

Metrics: ``loss_flow``; ``loss_rep`` = ``1 - mean cos`` (in [0, 2], the same form Self-Flow logs, so curves
compare); with several encoders also ``loss_rep_<name>`` each.
"""
from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from registry.errors import closest
from registry.kinds import OBJECTIVES
from zoo.core.layout import TokenLayout
from zoo.core.params import FieldError, ZooParams
from zoo.core.protocols import ObjectiveModule
from zoo.core.types import LossOut, StepContext, StepRNG, TokenBatch
from zoo.layers.heads import build_projector, projector_flops
from zoo.objectives.flow_matching import (FlowDraws, draw_noise, drop_labels, flow_loss, noised, null_label_of,
                                         null_label_problems)
from zoo.objectives.timesteps import UniformTimestepsParams, build_timesteps


def default_align_depth(depth: int) -> int:
    """REPA's rule: block 8 for backbones of depth >= 24 (SiT-L, SiT-XL), else block 4 (SiT-B); never past the
    last block (``min(rule, depth)``)."""
    return min(8 if depth >= 24 else 4, depth)


def _token_grid(spec: Any) -> tuple[int, ...] | None:
    try:
        latent = spec.autoencoder.latent_shape(spec.data.sample_shape())
        p = spec.backbone.patch
        return (latent[-2] // p, latent[-1] // p)
    except Exception:  # a layout without an image-style patch grid
        return None


class REPAParams(ZooParams):
    """REPA (Yu et al., ICLR 2025): flow matching + cosine alignment of block ``align_depth`` to frozen encoders."""

    type: Literal["repa"] = Field(..., description="Flow matching + REPA representation alignment to external encoders.")
    encoders: list[str] | None = Field(
        None, description="Names of frozen encoders under the spec's `teachers` (several are averaged, [REPA-code] "
                          "loss.py); null = every teacher of the spec, so switching objective.type to repa needs no "
                          "other edit in a spec that declares its teachers.")
    align_depth: int | None = Field(None, ge=1, description="1-based student block whose output is projected ([REPA-code] "
                                                            "--encoder-depth). null = 8 if backbone depth >= 24 else 4 "
                                                            "(REPA README / REPA issue #5), written into the resolved spec.")
    proj_coeff: float = Field(0.5, ge=0, description="Weight lambda of the alignment loss ([REPA-code] --proj-coeff: 0.5).")
    projector_width: int = Field(2048, gt=0, description="Hidden width of the 3-layer MLP projector ([REPA-code] "
                                                         "models/sit.py projector_dim: 2048).")
    timesteps: "TimestepsSpec" = Field(default_factory=lambda: UniformTimestepsParams(type="uniform"),  # noqa: F821
                                       description="Training p(t) in RF time ([REPA-code] train.py: uniform).")
    label_dropout: float = Field(0.1, ge=0.0, le=1.0, description="Probability of replacing a class label by the null "
                                                                  "label, for CFG ([REPA-code] class_dropout_prob: 0.1).")

    def resolve(self, spec: Any) -> "REPAParams":
        """Fill ``encoders`` (every teacher of the spec) and ``align_depth`` (from the backbone depth, REPA's
        rule, :func:`default_align_depth`)."""
        if self.encoders is None:
            if not spec.teachers:
                raise FieldError("encoders", "REPA aligns to frozen encoders and the spec declares none; add "
                                             "one under `teachers` (e.g. {\"digits\": {\"type\": \"classifier\"}})")
            return self.model_copy(update={"encoders": sorted(spec.teachers)}).resolve(spec)
        if self.align_depth is not None:
            return self
        depth = getattr(spec.backbone, "depth", None)
        if depth is None:
            raise FieldError("align_depth", f"backbone {spec.backbone.type!r} has no depth to derive the "
                                            f"alignment block from; set objective.align_depth")
        return self.model_copy(update={"align_depth": default_align_depth(int(depth))})

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        names = tuple(spec.modality.segment_names)
        if "image" not in names and "video" not in names:
            yield ("type",
                   f"REPA aligns image or video tokens to image encoders (frame by frame for video), and no encoder is "
                   f"registered for the {' + '.join(names)} tokens of modality {spec.modality.type!r}; use objective "
                   f"'selfflow' (no external encoder) or 'flow_matching' here "
                   f"([note:repa-other-grids]: external alignment "
                   f"is a baseline for video/audio)")
            return
        known = sorted(spec.teachers)
        if not self.encoders:
            yield "encoders", "REPA needs at least one encoder (a name under `teachers`)"
        for i, name in enumerate(self.encoders or ()):
            if name not in spec.teachers:
                near = closest(name, known)
                yield (f"encoders[{i}]",
                       f"unknown teacher {name!r} (known: {', '.join(known) if known else 'none; declare it under teachers'})"
                       + (f"; did you mean {near!r}?" if near else ""))
            elif name in self.encoders[:i]:
                yield f"encoders[{i}]", f"teacher {name!r} is listed twice"
        depth = getattr(spec.backbone, "depth", None)
        if self.align_depth is not None and depth is not None and self.align_depth > depth:
            yield "align_depth", f"block {self.align_depth} is past the backbone's last block ({depth})"
        yield from null_label_problems(spec, self.label_dropout)

    def warnings(self, spec: Any) -> Iterable[str]:
        """Advice printed by ``runtime.run``: audio tokens without an encoder; encoders whose feature grid is
        resampled to the token grid."""
        names = tuple(spec.modality.segment_names)
        if "audio" in names:
            yield ("the audio tokens carry no REPA loss: no audio encoder is registered; the video tokens are aligned "
                   "frame by frame")
        grid = _token_grid(spec)
        for name in self.encoders:
            tp = spec.teachers.get(name)
            if tp is None or grid is None:
                continue
            try:
                fg = tuple(tp.feature_grid(tuple(spec.data.sample_shape()), grid))
            except ValueError:
                continue
            if fg != tuple(grid):
                yield (f"teacher {name!r} gives a {fg[0]}x{fg[1]} feature grid; it is resampled (bilinear) to the "
                       f"{grid[0]}x{grid[1]} token grid")


# --------------------------------------------------------------------------------------------- pieces
def match_grid(z: Tensor, src: tuple[int, ...] | None, dst: tuple[int, ...] | None) -> Tensor:
    """Teacher features ``z`` ``(B, M, F)`` on the row-major grid ``src`` -> ``(B, N, F)`` on ``dst``.

    Unchanged when the grids agree (or ``src`` is unknown and ``M == N``); else the ``(B, F, h, w)`` map is
    resampled with bilinear interpolation (``align_corners=False``; antialiased when it shrinks).
    """
    if dst is None or (src is not None and tuple(src) == tuple(dst)):
        return z
    n = 1
    for g in dst:
        n *= int(g)
    if src is None:
        if z.shape[1] == n:
            return z
        raise ValueError(f"teacher features have {z.shape[1]} tokens, the token grid {tuple(dst)} has {n}, and the "
                         f"teacher declares no feature grid to resample from")
    if len(src) != 2 or len(dst) != 2:
        raise ValueError(f"REPA resamples 2-D feature grids only; got {tuple(src)} -> {tuple(dst)}")
    (h, w), (hh, ww) = src, dst
    b, m, f = z.shape
    if m != h * w:
        raise ValueError(f"teacher features have {m} tokens but its feature grid {h}x{w} has {h * w}")
    fmap = z.transpose(1, 2).reshape(b, f, h, w)
    out = F.interpolate(fmap, size=(hh, ww), mode="bilinear", align_corners=False, antialias=(hh < h or ww < w))
    return out.flatten(2).transpose(1, 2)


def raw_batch(raw: Any) -> int:
    return next(iter(raw.values())).shape[0] if isinstance(raw, dict) else raw.shape[0]


def cosine_per_token(a: Tensor, b: Tensor) -> Tensor:
    """``cos(a, b)`` over the last dim in fp32 (autocast off): ``(B, N, F), (B, N, F)`` -> ``(B, N)``;
    ``F.normalize`` on both sides then a dot product, as [REPA-code] ``loss.py``."""
    with torch.autocast(a.device.type, enabled=False):
        return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(dim=-1)


# ------------------------------------------------------------------------------------------ objective
@OBJECTIVES.register
class REPA(ObjectiveModule):
    """``forward(student, batch, ctx) -> LossOut``; parameters: one projector per encoder (``projectors[i]``).

    deps: ``hidden``, ``depth``, ``grid`` (token grid), ``teachers`` (frozen modules by spec name; may be empty on
    the meta device, then only ``forward`` fails) and ``teacher_params`` (sizes: ``feature_dim`` per encoder).
    The teachers are held outside the module tree: they are not trained, saved, moved or put in train mode here.
    """

    Params = REPAParams

    def __init__(self, params: REPAParams, *, hidden: int | None = None, depth: int | None = None,
                 grid: tuple[int, ...] | None = None, teachers: dict[str, nn.Module] | None = None,
                 teacher_params: dict[str, Any] | None = None, layout: TokenLayout | None = None, **deps: Any):
        super().__init__()
        if hidden is None or teacher_params is None:
            raise TypeError("objective 'repa' needs the deps hidden (backbone width) and teacher_params (the spec's "
                            "teachers); runtime.compiler passes them")
        missing = [n for n in params.encoders if n not in teacher_params]
        if missing:
            raise ValueError(f"objective 'repa': encoders {missing} are not among the teachers "
                             f"({', '.join(sorted(teacher_params)) or 'none'})")
        self.params = params
        self.align_depth = params.align_depth if params.align_depth is not None else (
            default_align_depth(depth) if depth is not None else 4)
        if depth is not None and not 1 <= self.align_depth <= depth:
            raise ValueError(f"objective 'repa': align_depth {self.align_depth} is outside the blocks 1..{depth}")
        self.hidden = int(hidden)
        self.grid = tuple(int(g) for g in grid) if grid is not None else None
        self.segment = None  # the aligned tokens: all of them, or (video / joint layouts) the video segment
        if layout is not None and "video" in layout.names:
            self.segment = layout.segment("video")
            self.grid = self.segment.grid[1:]                               # (h, w) of one latent frame
        elif layout is not None and "image" not in layout.names:
            raise ValueError(f"objective 'repa': no encoder can align the {' + '.join(layout.names)} tokens")
        self.names = list(params.encoders)
        self.teacher_params = {n: teacher_params[n] for n in self.names}
        self.teachers = {n: (teachers or {}).get(n) for n in self.names}  # plain dict: not submodules
        self.projectors = nn.ModuleList(
            build_projector("mlp3", self.hidden, int(self.teacher_params[n].feature_dim), params.projector_width)
            for n in self.names)
        self.timesteps = build_timesteps(params.timesteps)

    # ------------------------------------------------------------------------------------ targets
    @torch.no_grad()
    def targets(self, raw: Tensor | None) -> list[Tensor]:
        """Frozen teacher features of the clean batch, one ``(B, N, F_e)`` fp32 tensor per encoder on the token
        grid (no grad)."""
        if raw is None:
            raise ValueError("objective 'repa' needs the data-space batch (TokenBatch.raw) for its teachers; token-only "
                             "runs (e.g. runtime.bench --synthetic) cannot train REPA")
        out = []
        for name in self.names:
            teacher, tp = self.teachers[name], self.teacher_params[name]
            if teacher is None:
                raise RuntimeError(f"objective 'repa': teacher {name!r} is not loaded (graphs built on the meta device "
                                   f"or without frozen modules have none)")
            frames = self.frames(raw) if self.segment is not None else raw
            z = teacher.features(frames, grid=self.grid)  # the Teacher contract (zoo.core.protocols)
            src = tuple(tp.feature_grid(tuple(frames.shape[1:]), self.grid))
            z = match_grid(z.float(), src, self.grid)                       # (B or B t', h w, F)
            out.append(z.reshape(raw_batch(raw), -1, z.shape[-1]))
        return out

    def frames(self, raw: Any) -> Tensor:
        """Video ``(B, C, T, H, W)`` (alone or under ``raw["video"]``) -> one frame per latent time step of the token
        grid, the frame at the centre of its span: ``(B t', C, H, W)``, ordered like the video tokens."""
        video = raw["video"] if isinstance(raw, dict) else raw
        b, c, frames_in, h, w = video.shape
        steps = self.segment.grid[0]
        idx = ((torch.arange(steps, device=video.device) + 0.5) * frames_in / steps).long().clamp_max(frames_in - 1)
        return video[:, :, idx].permute(0, 2, 1, 3, 4).reshape(b * steps, c, h, w)

    # ------------------------------------------------------------------------------------ forward
    def draw(self, student: nn.Module, batch: TokenBatch, rng: StepRNG) -> FlowDraws:
        """The step's randomness: exactly :meth:`FlowMatching.draw`'s (t, noise, label dropout)."""
        x0 = batch.x0
        t = self.timesteps.sample(rng).to(x0.device)                        # (B,)
        x1 = draw_noise(rng, x0)                                            # (B, N, P)
        null = null_label_of(student) if batch.y is not None else -1
        y = drop_labels(batch.y, rng, self.params.label_dropout, null)     # (B,) or None
        return FlowDraws(t, x1, y)

    def forward(self, student: nn.Module, batch: TokenBatch, ctx: StepContext) -> LossOut:
        """``batch.x0`` ``(B, N, P)``, ``batch.y`` ``(B,)`` or None, ``batch.raw`` ``(B, *input_shape)`` in [-1, 1]:
        ``loss(draw(...))``."""
        return self.loss(student, batch, self.draw(student, batch, ctx.rng), ctx.ema)

    def loss(self, student: nn.Module, batch: TokenBatch, d: FlowDraws, ema: nn.Module | None = None) -> LossOut:
        """Pure tensor code (one ``torch.compile`` graph with the frozen encoders)."""
        p = self.params
        xt, target = noised(batch.x0, d.x1, d.t)
        out = student(xt, d.t, d.y, taps=(self.align_depth,))
        loss_flow, _ = flow_loss(out.pred, target)
        h = out.features[self.align_depth]                                  # (B, N, D)
        if self.segment is not None:
            h = h[:, self.segment.tokens]                                   # the video tokens
        zs = self.targets(batch.raw)
        if zs and zs[0].shape[:2] != h.shape[:2]:
            raise ValueError(f"teacher features {tuple(zs[0].shape)} do not match the student tokens {tuple(h.shape)}")
        negs = [-cosine_per_token(proj(h), z).mean() for proj, z in zip(self.projectors, zs)]  # each a scalar
        loss_rep = torch.stack(negs).mean()
        loss = loss_flow + p.proj_coeff * loss_rep
        metrics = {"loss_flow": loss_flow.detach(), "loss_rep": 1.0 + loss_rep.detach()}
        if len(negs) > 1:
            metrics.update({f"loss_rep_{n}": 1.0 + v.detach() for n, v in zip(self.names, negs)})
        return LossOut(loss=loss, metrics=metrics)

    def extra_forward_flops(self, backbone: nn.Module, num_tokens: int) -> float:
        """FLOPs per sample REPA adds to ``3 x backbone forward``: the trained projectors (3 x their forward:
        forward + backward) and each teacher's forward (its params' ``flops``: ``vit`` counts, 0 for the others)."""
        proj = sum(projector_flops("mlp3", self.hidden, int(tp.feature_dim), self.params.projector_width)
                   for tp in self.teacher_params.values()) * num_tokens
        teach = sum(float(tp.flops(self.grid)) for tp in self.teacher_params.values())
        return 3.0 * proj + teach
