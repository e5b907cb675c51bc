"""Compile a validated spec into :class:`RunComponents`, the live components of one run.

Order: autoencoder (frozen) -> modality -> backbone -> objective -> EMA -> solver, each built through its
registry as ``cls(params, **deps)`` with the deps passed explicitly here. What is trainable (backbone +
objective heads) is what the optimizer, DDP and checkpoints see; frozen modules are never saved; the EMA
copy of the backbone is saved, evaluated and (for Self-Flow) used as the teacher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from registry.kinds import AUTOENCODERS, BACKBONES, MODALITIES, OBJECTIVES, SOLVERS, TEACHERS
from runtime.latents import is_latent_data
from storage.latent_cache import CacheMismatch, autoencoder_identity, describe_identity, stats_tensors
from runtime.optim import EMA
from zoo.core.protocols import DrawnObjective
from zoo.core.types import LossOut, StepContext, TokenBatch
from zoo.layers.attention import default_attention


class TrainModule(nn.Module):
    """Backbone + objective: the one module DDP wraps. ``forward(batch, ctx) -> LossOut``.

    After :meth:`compile_step` an objective with separate draws (:class:`~zoo.core.protocols.DrawnObjective`)
    runs as ``draws = objective.draw(...)`` (eager: the step's generator) then one compiled graph of
    ``objective.loss(backbone, batch, draws, ema)`` -- student, teacher pass, heads and loss together."""

    def __init__(self, backbone: nn.Module, objective: nn.Module):
        super().__init__()
        self.backbone, self.objective = backbone, objective
        self.compiled_loss: Any = None    # torch.compile of _loss, set by compile_step

    def compile_step(self, **options: Any) -> str:
        """``torch.compile`` the whole loss (``options`` go to it; shapes are static: ``dynamic=False``); an
        objective that draws inside its forward gets its backbone compiled instead. Returns what was compiled."""
        if isinstance(self.objective, DrawnObjective):
            self.compiled_loss = torch.compile(self._loss, dynamic=False, **options)
            return "loss"
        self.backbone.compile(**options)  # in place: state-dict keys stay the same
        return "backbone"

    def _loss(self, batch: TokenBatch, draws: Any, ema: nn.Module | None) -> LossOut:
        return self.objective.loss(self.backbone, batch, draws, ema)

    def forward(self, batch: TokenBatch, ctx: StepContext) -> LossOut:
        if self.compiled_loss is None:
            return self.objective(self.backbone, batch, ctx)
        return self.compiled_loss(batch, self.objective.draw(self.backbone, batch, ctx.rng), ctx.ema)


@dataclass
class RunComponents:
    """What :func:`compile_spec` builds for one run: the spec, device and shapes, and every live component
    (frozen autoencoder and teachers, modality, trainable backbone + objective, EMA, solver)."""

    spec: Any
    device: torch.device
    autocast_dtype: torch.dtype | None   # None = fp32
    input_shape: Any                     # one data sample, e.g. (C, H, W), or a dict of shapes by stream
    latent_shape: Any
    num_classes: int
    autoencoder: nn.Module | None        # frozen; None on the meta device (dry run: weights not loaded)
    teachers: dict[str, nn.Module]       # frozen external encoders by spec name (empty on the meta device)
    modality: Any
    train_module: TrainModule            # trainable: .backbone, .objective
    ema: EMA | None
    solver: Any
    attention: str | None                # the attention backend actually used (None: a backbone without attention)
    latent_stats: Any = None             # latent-cache data: manifest (mean, std), each (C, 1, ..) (dict by stream)
    attention_kernel: str | None = None  # the kernel the backend runs for this model's shapes, e.g. "sdpa/flash_attention"

    @property
    def latent_data(self) -> bool:
        """True when the data's samples are cached latents (``latent_shards``), already normalised."""
        return is_latent_data(self.spec.data)

    @property
    def backbone(self) -> nn.Module:
        return self.train_module.backbone

    @property
    def num_tokens(self) -> int:
        return int(self.modality.layout.num_tokens)

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def to_tokens(self, x: Any, y: torch.Tensor | None) -> TokenBatch:
        """Data ``(B, *input_shape)`` (or a dict of such tensors by stream) -> clean tokens ``(B, N, P)`` on the
        device (frozen encoder, no grad)."""
        x = tree_map(lambda v: v.to(self.device, non_blocking=True), x)
        y = y.to(self.device, non_blocking=True) if (y is not None and self.num_classes > 0) else None
        needs_raw = bool(self.teachers) or self.train_module.objective.needs_raw
        if self.latent_data:  # cached latents, already normalised with the manifest's statistics: no encoder
            z, raw = (x["latent"], x["raw"]) if self.spec.data.raw else (x, None)
            return TokenBatch(self.modality.to_tokens(tree_map(lambda v: v.float(), z)), y,
                              raw=raw if needs_raw else None)
        z = tree_map(lambda v: v.float(), self.autoencoder.encode(x))
        return TokenBatch(self.modality.to_tokens(z), y, raw=x if needs_raw else None)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> Any:
        """Tokens ``(B, N, P)`` -> data space ``(B, *input_shape)`` (a dict by stream for multi-stream data).
        Cached latents are un-normalised with the SAME manifest statistics, ``decode_raw(z * std + mean)``."""
        z = self.modality.from_tokens(tokens.float())
        if self.latent_data:
            return self.autoencoder.decode_raw(denormalise(z, self.latent_stats, self.device))
        return self.autoencoder.decode(z)

    def train_flops_per_sample(self) -> float:
        """Analytic training FLOPs per sample: 3 x the backbone forward (forward + backward) plus what the
        objective adds (e.g. a teacher pass: its ``extra_forward_flops``)."""
        return 3 * self.backbone.flops(self.num_tokens) + self.train_module.objective.extra_forward_flops(
            self.backbone, self.num_tokens)


def denormalise(z: Any, stats: Any, device: torch.device) -> Any:
    """Normalised latent ``(B, C, ...)`` -> raw units ``z * std + mean`` per channel (per stream for dicts)."""
    if isinstance(z, dict):
        return {k: denormalise(v, stats[k], device) for k, v in z.items()}
    mean, std = stats
    return z * std.to(device) + mean.to(device)


def tree_map(fn: Any, x: Any) -> Any:
    """Apply ``fn`` to a tensor, or to every tensor of a dict of streams."""
    return {k: fn(v) for k, v in x.items()} if isinstance(x, dict) else fn(x)


def latent_step_seconds(spec: Any) -> Any:
    """Seconds per latent time step, per stream (``{"video": 1 / fps, "audio": hop / sample_rate}``), from the
    data's ``stream_rates()`` and the autoencoder's ``time_stride``; None for data without a time axis."""
    rates, shape = spec.data.stream_rates(), spec.data.sample_shape()
    if rates is None:  # images, or a latent cache of data without a time axis
        return None
    strides = spec.autoencoder.time_stride(shape)
    out = {k: (strides.get(k, 1) if isinstance(strides, dict) else strides) / float(r) for k, r in rates.items()}
    return out if isinstance(shape, dict) else next(iter(out.values()))


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def compile_spec(spec: Any, device: torch.device, *, with_ema: bool = True, load_frozen: bool = True,
                 load_teachers: bool = True, random_teachers: bool = False) -> RunComponents:
    """Build every component of ``spec`` on ``device``. On ``torch.device("meta")`` (``--dry-run``) only the
    shapes are built; there, and with ``load_frozen=False`` (benchmarks on synthetic latents), the frozen
    autoencoder is not loaded and the components take token batches only. Sampling and evaluating need no teachers
    (``load_teachers=False``): the objective's heads are sized from the teachers' params alone. Benchmarks
    time the teachers without their weight files: ``random_teachers=True`` builds them (also with
    ``load_frozen=False``) with random weights (``weights`` null)."""
    input_shape = _shape(spec.data.sample_shape())
    latent_shape = _shape(spec.autoencoder.latent_shape(input_shape))
    num_classes = int(spec.data.num_classes)
    modality = MODALITIES.build(spec.modality, backbone_patch=getattr(spec.backbone, "patch", None), latent_shape=latent_shape,
                                time_step_s=latent_step_seconds(spec))
    autoencoder, teachers, latent_stats = None, {}, None
    if device.type != "meta" and load_frozen:
        autoencoder = AUTOENCODERS.build(spec.autoencoder).to(device).eval().requires_grad_(False)
        if is_latent_data(spec.data):
            latent_stats = check_latent_cache(spec, autoencoder, latent_shape)
        teachers = {name: TEACHERS.build(p, input_shape=teacher_input_shape(input_shape), token_grid=tuple(modality.grid))
                    .to(device).eval().requires_grad_(False) for name, p in spec.teachers.items()} if load_teachers else {}
    if device.type != "meta" and random_teachers:
        random = {name: p.model_copy(update={"weights": None}) if "weights" in type(p).model_fields else p
                  for name, p in spec.teachers.items()}
        teachers = {name: TEACHERS.build(p, input_shape=teacher_input_shape(input_shape), token_grid=tuple(modality.grid))
                    .to(device).eval().requires_grad_(False) for name, p in random.items()}

    bb_params = spec.backbone
    attn_dev = torch.device("cpu") if device.type == "meta" else device
    has_attention = "attention" in type(bb_params).model_fields  # conv backbones (conv_vae) have none
    if has_attention and bb_params.attention is None:  # auto: on CUDA the fastest kernel for these shapes, else SDPA
        heads, hidden = getattr(bb_params, "heads", None), getattr(bb_params, "hidden", None)
        shape = (int(modality.layout.num_tokens), heads, hidden // heads) if heads and hidden else None
        bb_params = bb_params.model_copy(update={"attention": default_attention(attn_dev, shape)})
    torch.manual_seed(spec.train.seed)  # initialisation depends only on the seed
    with torch.device(device):
        backbone = BACKBONES.build(bb_params, token_dim=modality.token_dim, grid=tuple(modality.grid),
                                   num_classes=num_classes, layout=modality.layout)
        objective = OBJECTIVES.build(spec.objective, hidden=backbone.hidden, depth=backbone.depth,
                                     grid=tuple(modality.grid), layout=modality.layout, teachers=teachers,
                                     teacher_params=dict(spec.teachers))
    train_module = TrainModule(backbone, objective).to(device)
    autocast_dtype = resolve_autocast(spec.train.precision, device)
    ema = EMA(backbone, spec.train.ema.decay, spec.train.ema.warmup_steps) if with_ema else None
    return RunComponents(
        spec=spec, device=device, autocast_dtype=autocast_dtype,
        input_shape=input_shape, latent_shape=latent_shape, num_classes=num_classes,
        autoencoder=autoencoder, teachers=teachers, modality=modality, train_module=train_module, ema=ema,
        solver=SOLVERS.build(spec.solver), attention=bb_params.attention.type if has_attention else None, latent_stats=latent_stats,
        attention_kernel=attention_kernel(backbone, device, autocast_dtype),
    )


def attention_kernel(backbone: nn.Module, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Which kernel the backbone's attention backend runs for one sample of its shapes (``kernel_name``); None
    for backbones without attention and on the meta device."""
    attn = getattr(backbone, "attention_backend", None)
    heads, hidden = getattr(backbone, "heads", None), getattr(backbone, "hidden", None)
    if attn is None or device.type == "meta" or not heads or not hidden:
        return None
    q = torch.zeros(1, int(backbone.num_tokens), heads, hidden // heads, device=device, dtype=dtype or torch.float32)
    return attn.kernel_name(q)


def check_latent_cache(spec: Any, autoencoder: nn.Module, latent_shape: Any) -> Any:
    """The cache's normalisation as tensors (:func:`storage.latent_cache.stats_tensors`), after checking that the
    cache was made by THIS autoencoder (type, params, weights hash) with this latent shape. Raises
    :class:`storage.latent_cache.CacheMismatch` (a ValueError naming both) or FileNotFoundError (no cache)."""
    from zoo.data.latent_shards import stats_body

    m = spec.data.manifest("train")
    mine, theirs = autoencoder_identity(spec.autoencoder, autoencoder), m["identity"]
    if mine != theirs:
        raise CacheMismatch(
            f"the latent cache at {spec.data.path} was made with a different autoencoder than the spec's:\n"
            f"  cache: {describe_identity(theirs)}\n  spec:  {describe_identity(mine)}\n"
            f"re-cache with `python -m runtime.cache SPEC` (or point data.path at the matching cache)")
    if _shape(m["latent_shape"]) != latent_shape:
        raise CacheMismatch(f"the latent cache at {spec.data.path} holds latents {m['latent_shape']}; the spec's "
                            f"autoencoder gives {latent_shape}; re-cache")
    return stats_tensors(stats_body(m["stats"]), latent_shape)


def teacher_input_shape(input_shape: Any) -> tuple[int, ...]:
    """What an image encoder sees of one sample: the image, or one video frame ``(C, H, W)``."""
    shape = input_shape.get("video", input_shape) if isinstance(input_shape, dict) else input_shape
    return (shape[0], *shape[2:]) if len(shape) == 4 else tuple(shape)


def _shape(shape: Any) -> Any:
    return {k: tuple(int(s) for s in v) for k, v in shape.items()} if isinstance(shape, dict) else tuple(shape)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def components_from_checkpoint(path: Any, device: torch.device,
                               edit: Any = None) -> tuple[RunComponents, Any]:
    """A checkpoint directory or a run directory (its newest checkpoint) -> (run components with the saved weights,
    checkpoint, weights only: nothing but safetensors and JSON is read). ``edit(raw_spec)`` may change the saved
    spec before validation (e.g. another solver). The checkpoint is verified first. Raises FileNotFoundError,
    :class:`storage.checkpoint.CheckpointError` or SpecError with a message for the user."""
    import json
    from pathlib import Path

    from registry.plugins import load_plugins
    from registry.spec import validate
    from storage.checkpoint import CheckpointError, find_checkpoint, load_checkpoint

    import sys

    ck_dir = find_checkpoint(Path(path), on_skip=lambda p, f: sys.stderr.write(f"warning: skipping checkpoint "
                                                                                 f"{p.name}: {f}\n"))
    load_plugins()
    raw = json.loads((ck_dir / "spec.resolved.json").read_text())
    if edit is not None:
        edit(raw)
    run = compile_spec(validate(raw), device, load_teachers=False)  # frozen encoders: training only
    ck = load_checkpoint(ck_dir, map_location=device, training_state=False)
    for name, module, sd in (("model", run.train_module, ck.model),
                             ("ema", run.ema.module if run.ema is not None else None, ck.ema)):
        try:
            if module is not None and sd is not None:
                module.load_state_dict(sd)
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            detail = lines[min(1, len(lines) - 1)].strip()[:200]  # the first mismatch
            raise CheckpointError(ck_dir / f"{name}.safetensors", f"does not fit the spec's model ({detail})") from None
    return run, ck
