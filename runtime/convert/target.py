"""The converted run's spec: the base spec with the converted backbone and the data / autoencoder sizes the
weights need, validated (:func:`build_spec`); and the names and shapes of the weights it checkpoints."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from registry.errors import SpecError
from runtime.convert.base import FLIP_TYPE, ConversionError
from runtime.convert.source import BY_NAME, SourceArch

DEFAULT_BASE_SPEC = Path(__file__).resolve().parent.parent.parent / "specs" / "fm_imagenet256_xl2.json"


def _preset_for(arch: SourceArch, preset: str | None, heads: int | None) -> str | None:
    from zoo.backbones.sit import SiTParams

    if preset is not None:
        if preset not in SiTParams.presets:
            raise ConversionError(f"unknown preset {preset!r} (known: {', '.join(SiTParams.presets)})")
        if SiTParams.presets[preset]["patch"] != arch.patch:
            raise ConversionError(f"preset {preset!r} has patch {SiTParams.presets[preset]['patch']}, "
                                  f"the weights patch {arch.patch}")
        return preset
    for name, vals in SiTParams.presets.items():
        if name != "tiny" and (vals["hidden"], vals["depth"], vals["patch"]) == (arch.hidden, arch.depth, arch.patch):
            return name
    if heads is None:
        raise ConversionError(f"hidden {arch.hidden}, depth {arch.depth}, patch {arch.patch} match no SiT preset; "
                              "pass --preset or --heads (the number of heads is not in the weights)")
    return None


def _read_base(base_spec: str | Path | dict | None) -> dict:
    if isinstance(base_spec, dict):
        return json.loads(json.dumps(base_spec))
    from registry.spec import read_json

    return read_json(base_spec or DEFAULT_BASE_SPEC)


def _spec_error(e: SpecError) -> ConversionError:
    problems = e.problems
    if problems:
        return ConversionError("the converted spec does not validate:\n" +
                               "\n".join(f"  {p or '<root>'}: {m}" for p, m in problems))
    return ConversionError(f"the converted spec does not validate: {e}")


def build_spec(arch: SourceArch, fmt: str, *, base_spec: str | Path | dict | None = None, preset: str | None = None,
               heads: int | None = None, num_classes: int | None = None, latent_size: int | None = None,
               latent_channels: int | None = None, sets: Iterable[str] = (), name: str | None = None,
               notes: list[str] | None = None) -> Any:
    """The validated spec of the converted run (see the module docstring); remarks go to ``notes``."""
    import zoo  # noqa: F401  (built-ins)
    from registry.kinds import DATASETS
    from registry.spec import parse_set, set_path, validate

    if num_classes is not None and num_classes != arch.num_classes:
        raise ConversionError(
            f"--num-classes {num_classes}: the label table has {arch.label_rows} rows, i.e. {arch.num_classes} "
            f"classes and the null label {arch.num_classes} in the last row (a table without a null row cannot be used "
            "for classifier-free guidance here)")
    if latent_channels is not None and latent_channels != arch.channels:
        raise ConversionError(f"--latent-channels {latent_channels}: the patch embedding reads {arch.channels} channels")
    if arch.grid is None:
        if latent_size is None:
            raise ConversionError("the source has no pos_embed; pass --latent-size")
        if latent_size % arch.patch:
            raise ConversionError(f"--latent-size {latent_size} is not divisible by patch {arch.patch}")
        arch.grid = latent_size // arch.patch
    size = arch.grid * arch.patch
    if latent_size is not None and latent_size != size:
        raise ConversionError(f"--latent-size {latent_size}: pos_embed covers a {arch.grid}x{arch.grid} token grid, "
                              f"i.e. a {size}x{size} latent at patch {arch.patch}")
    source = BY_NAME[fmt]
    if arch.learn_sigma and not source.learn_sigma_ok:
        raise ConversionError("a REPA SiT has no learn_sigma output, but final_layer.linear has 2C channels")

    raw = _read_base(base_spec)
    raw.pop("$schema", None)
    bb: dict[str, Any] = {"type": source.backbone_type}
    chosen = _preset_for(arch, preset, heads)
    if chosen is not None:
        bb["preset"] = chosen
        from zoo.backbones.sit import SiTParams

        pv = SiTParams.presets[chosen]
        if (pv["hidden"], pv["depth"]) != (arch.hidden, arch.depth) and notes is not None:
            notes.append(f"preset {chosen!r} is hidden {pv['hidden']}, depth {pv['depth']}; the weights' hidden "
                         f"{arch.hidden}, depth {arch.depth} are used, heads {heads or pv['heads']}")
    bb.update(hidden=arch.hidden, depth=arch.depth, patch=arch.patch, mlp_ratio=arch.mlp_ratio)
    if heads is not None:
        bb["heads"] = heads
    if bb["type"] == FLIP_TYPE:
        bb["learn_sigma"] = arch.learn_sigma
    raw["backbone"] = bb
    raw["name"] = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or f"converted_{fmt}")

    data = raw.setdefault("data", {})
    if isinstance(data.get("source"), dict):  # a latent cache: the sizes belong to the data it encodes
        data = data["source"]
    data_fields = DATASETS.get(data["type"]).Params.model_fields if data.get("type") in DATASETS.names() else {}
    if "num_classes" in data_fields:
        data["num_classes"] = arch.num_classes
    ae = raw.setdefault("autoencoder", {"type": "identity"})
    if ae.get("type") == "diffusers":
        ae["latent_channels"] = arch.channels
        data["size"] = size * int(ae.get("downsample") or 8)
    elif ae.get("type") == "identity":
        data["size"] = size
        if "channels" in data_fields:
            data["channels"] = arch.channels
    for item in sets:
        try:
            set_path(raw, *parse_set(item))
        except SpecError as e:
            raise _spec_error(e) from None
    try:
        spec = validate(raw)
    except SpecError as e:
        raise _spec_error(e) from None

    latent = tuple(spec.autoencoder.latent_shape(spec.data.sample_shape()))
    if latent != (arch.channels, size, size):
        raise ConversionError(f"the spec's data/autoencoder give latents {latent}, the weights need "
                              f"{(arch.channels, size, size)}; fix data/autoencoder with --set or --base-spec")
    if int(spec.data.num_classes) != arch.num_classes:
        raise ConversionError(f"the spec's data has {spec.data.num_classes} classes, the label table "
                              f"{arch.num_classes} (+ null row); use data with num_classes = {arch.num_classes}")
    return spec


def target_shapes(spec: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of everything the run checkpoints (built on the meta device: no memory)."""
    from runtime.compiler import compile_spec

    g = compile_spec(spec, torch.device("meta"), with_ema=False)
    return {k: (tuple(v.shape), v.dtype) for k, v in g.train_module.state_dict().items()}
