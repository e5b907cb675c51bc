"""Mapping a source state dict onto the zoo layout (:func:`plan_conversion`) and writing the run directory
(:func:`write_run`, :func:`convert`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from runtime.convert.base import FLIP_TYPE, ConversionError
from runtime.convert.source import BY_NAME, FORMATS, SourceArch, infer_arch, load_source, natural, param_order
from runtime.convert.source import patch_embed_to_linear
from runtime.convert.target import build_spec, target_shapes
from storage.safe_state import sha256_file


@dataclass
class ConversionPlan:
    """Everything to write: the validated spec, the target weights (``backbone.*``, ``objective.*``), what
    was dropped and why, and notes for the record."""

    spec: Any
    model: dict[str, Tensor]
    arch: SourceArch
    fmt: str
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def backbone(self) -> dict[str, Tensor]:
        return {k[len("backbone."):]: v for k, v in self.model.items() if k.startswith("backbone.")}


def plan_conversion(sd: dict[str, Tensor], fmt: str, *, keep_heads: bool = False, patch: int | None = None,
                    log: Callable[[str], None] = print, **spec_kw: Any) -> ConversionPlan:
    """Map a source state dict (already unwrapped and de-prefixed) onto the zoo layout; raise
    :class:`ConversionError` unless every source key is consumed (or dropped for a stated reason) and every
    target key is filled with its exact shape. ``spec_kw`` go to :func:`build_spec`. Works on meta tensors."""
    from zoo.layers.embed import sincos_pos_embed_2d

    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    source = BY_NAME[fmt]
    notes: list[str] = []
    sd = source.prepare(sd, notes)
    if patch is None and spec_kw.get("preset"):
        from zoo.backbones.sit import SiTParams

        patch = SiTParams.presets.get(spec_kw["preset"], {}).get("patch")
    arch = infer_arch(sd, fmt, patch)
    spec = build_spec(arch, fmt, notes=notes, **spec_kw)
    target = target_shapes(spec)

    mapped: dict[str, tuple[str, Tensor]] = {}   # target key -> (source key, value)
    dropped: dict[str, str] = {}

    def put(tkey: str, skey: str, value: Tensor) -> None:
        if tkey in mapped:
            raise ConversionError(f"source keys {mapped[tkey][0]!r} and {skey!r} both map to {tkey!r}")
        mapped[tkey] = (skey, value)

    head_re = source.head_keys
    head_keys = sorted((k for k in sd if head_re is not None and head_re.match(k)), key=param_order)
    for key, value in sd.items():
        if key in head_keys:
            continue
        if key == "x_embedder.proj.weight":
            put("backbone.x_embedder.weight", key, patch_embed_to_linear(value, arch.channels, arch.patch))
        elif key == "x_embedder.proj.bias":
            put("backbone.x_embedder.bias", key, value)
        elif f"backbone.{key}" in target:
            put(f"backbone.{key}", key, value)
    if "pos_embed" not in sd and "backbone.pos_embed" in target:
        grid = (arch.grid, arch.grid)
        mapped["backbone.pos_embed"] = ("<2-D sin-cos>", sincos_pos_embed_2d(arch.hidden, grid)[None])
        notes.append("pos_embed not in the source: filled with the fixed 2-D sin-cos table that SiT/DiT "
                     "initialise and never train")
    elif "pos_embed" in sd and sd["pos_embed"].device.type != "meta":
        ours = sincos_pos_embed_2d(arch.hidden, (arch.grid, arch.grid))[None]
        dev = float((sd["pos_embed"].float().reshape(ours.shape) - ours).abs().max()) \
            if sd["pos_embed"].numel() == ours.numel() else float("inf")
        if dev > 1e-4:
            notes.append(f"pos_embed differs from the 2-D sin-cos table by up to {dev:.3g}; the source's is kept")

    if head_keys:
        obj = source.head_objective
        what = f"{len(head_keys)} head tensors ({head_keys[0].split('.')[0]}.*)"
        if not keep_heads:
            reason = "projector head (training only); --keep-heads keeps it"
            dropped.update({k: reason for k in head_keys})
            log(f"dropping {what}: not needed for sampling (--keep-heads keeps them)")
        elif spec.objective.type != obj:
            raise ConversionError(f"--keep-heads: the spec's objective is {spec.objective.type!r}; the heads belong to a "
                                  f"{obj!r} objective (use --set objective=... or a --base-spec with one)")
        else:
            tkeys = [k for k in target if k.startswith("objective.")]
            shapes_src = [tuple(sd[k].shape) for k in head_keys]
            shapes_tgt = [target[k][0] for k in tkeys]
            if shapes_src != shapes_tgt:
                raise ConversionError(
                    f"--keep-heads: the source heads {list(zip(head_keys, shapes_src))} do not match the {obj!r} "
                    f"objective's parameters {list(zip(tkeys, shapes_tgt))} (same order and shapes needed)")
            for skey, tkey in zip(head_keys, tkeys):
                put(tkey, skey, sd[skey])
            notes.append(f"heads kept as the {obj!r} objective's parameters: " +
                         ", ".join(f"{s} -> {t}" for s, t in zip(head_keys, tkeys)))

    consumed = {s for s, _ in mapped.values()}
    unconsumed = sorted((k for k in sd if k not in consumed and k not in dropped), key=natural)
    if unconsumed:
        raise ConversionError(f"{len(unconsumed)} source keys have no place in the converted model "
                              f"({fmt!r} format): " + ", ".join(unconsumed))
    model: dict[str, Tensor] = {}
    missing = []
    for tkey, (shape, dtype) in target.items():
        if tkey not in mapped:
            missing.append(tkey)
            continue
        skey, value = mapped[tkey]
        if tuple(value.shape) != shape:
            raise ConversionError(f"shape mismatch: {tkey} (from source {skey!r}) is {tuple(value.shape)} in the "
                                  f"source, the converted model needs {shape}")
        model[tkey] = value.to(dtype)
    if missing:
        raise ConversionError(f"{len(missing)} weights of the converted model are not in the source: "
                              + ", ".join(missing))
    if arch.learn_sigma:
        notes.append("learn_sigma: final_layer.linear kept with 2C channels per pixel; the first C are used")
    return ConversionPlan(spec=spec, model=model, arch=arch, fmt=fmt, dropped=dropped, notes=notes)


# ------------------------------------------------------------------------------------------ writing
def write_run(plan: ConversionPlan, out_dir: str | Path, *, step: int = 0, meta: dict | None = None,
              force: bool = False) -> Path:
    """Write the run directory; returns the checkpoint directory."""
    from registry.spec import resolved_dict
    from storage.checkpoint import list_checkpoints, save_checkpoint

    out_dir = Path(out_dir)
    if list_checkpoints(out_dir / "checkpoints") and not force:
        raise ConversionError(f"{out_dir} already holds checkpoints; pass --force to add/replace step {step}")
    spec = resolved_dict(plan.spec)
    info = {
        "converted_from": meta or {},
        "format": plan.fmt,
        "time_convention": ("SiT time in the weights; backbone sit_time_flip serves v_RF(x, t) = -net(x, 1 - t)"
                            if plan.spec.backbone.type == FLIP_TYPE else "RF time (as the zoo)"),
        "architecture": {**plan.arch.__dict__, "num_classes": plan.arch.num_classes,
                         "null_label": plan.arch.num_classes},
        "dropped": plan.dropped,
        "notes": plan.notes,
    }
    ck = save_checkpoint(out_dir / "checkpoints", step, model=plan.model, ema=plan.backbone, optimizer={},
                         state={"converted": True}, spec=spec, meta=info, keep=0)
    (out_dir / "spec.resolved.json").write_text(json.dumps(spec, indent=2) + "\n")
    (out_dir / "conversion.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return ck


def convert(src: str | Path, out_dir: str | Path, fmt: str, *, weights: str = "auto", step: int = 0,
            force: bool = False, log: Callable[[str], None] = print, **plan_kw: Any) -> Path:
    """Load ``src``, convert it (:func:`plan_conversion`) and write the run directory ``out_dir``; returns
    the checkpoint directory."""
    src = Path(src)
    sd, entry = load_source(src, weights, fmt)
    plan_kw.setdefault("name", f"{fmt}_{src.stem}")
    plan = plan_conversion(sd, fmt, log=log, **plan_kw)
    meta = {"path": str(src.resolve()), "sha256": sha256_file(src), "entry": entry, "num_tensors": len(sd)}
    ck = write_run(plan, out_dir, step=step, meta=meta, force=force)
    bb = plan.spec.backbone
    log(f"converted {src} [{entry}] ({fmt}, {len(sd)} tensors, {len(plan.dropped)} dropped) -> {ck}")
    log(f"backbone {bb.type} {bb.preset or ''} hidden {bb.hidden} depth {bb.depth} heads {bb.heads} patch {bb.patch}"
        f"{' learn_sigma' if getattr(bb, 'learn_sigma', False) else ''}; {plan.arch.num_classes} classes, null label "
        f"{plan.arch.num_classes}; latent {plan.arch.channels}x{plan.arch.grid * plan.arch.patch}^2")
    for note in plan.notes:
        log(f"note: {note}")
    return ck
