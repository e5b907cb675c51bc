"""Convert a published SiT / REPA / Self-Flow checkpoint into a zoo run directory.

Usage::

    python -m runtime.convert SRC --to DIR --format sit|repa|selfflow [--preset XL/2] [--heads H]
        [--num-classes N] [--latent-size 32] [--latent-channels 4] [--base-spec SPEC.json]
        [--set KEY=VALUE]... [--name NAME] [--weights auto|ema|model] [--keep-heads] [--step N] [--force]

``SRC`` is a ``.pt``/``.pth`` torch file (read with ``torch.load(weights_only=True)``; the training
checkpoints of SiT/REPA are ``{"model", "ema", "opt", "args"}`` dicts, ``args`` an ``argparse.Namespace``,
which is the one non-tensor class allowed) or a ``.safetensors`` file. ``--weights auto`` picks what the
official loaders pick: ``ema`` for SiT/REPA, ``model`` (then ``state_dict``) for Self-Flow, else the other
entry, else the file itself; a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix is removed.

Writes ``DIR/checkpoints/step_XXXXXXXX/`` (:func:`storage.checkpoint.save_checkpoint`: ``model.safetensors``
with ``backbone.*`` / ``objective.*`` keys, ``ema.safetensors`` = the same backbone weights, an empty
optimizer state, ``spec.resolved.json``, ``meta.json`` with the provenance), plus ``DIR/spec.resolved.json``
and ``DIR/conversion.json``. ``python -m runtime.sample DIR`` then samples from it. The directory is for
sampling and evaluation (or as weights to start a new run from); it is not a ``--resume`` target (no
optimizer/loader state).

The spec starts from ``--base-spec`` (default ``specs/fm_imagenet256_xl2.json``: ImageNet 256, SD-VAE
``weights/sd-vae-ft-ema``, SDE 250 steps); the backbone is replaced by the converted one (preset + the sizes
read from the weights), ``data.num_classes``, the data size and the autoencoder's latent channels are set
to fit the weights, then ``--set`` edits are applied and the result is validated. To sample real images a
user needs a local SD-VAE in diffusers ``save_pretrained`` layout (``config.json`` +
``diffusion_pytorch_model.safetensors``, e.g. ``stabilityai/sd-vae-ft-ema``) at ``weights/sd-vae-ft-ema``
relative to the working directory, or ``--set autoencoder.path=/path/to/sd-vae-ft-ema``; nothing is
downloaded. Sampling does not read the data; evaluation may.

Key layouts (every source key must be consumed, every target key filled with its exact shape):

* ``sit`` -- ``willisma/SiT`` ``models.py`` (= ``facebookresearch/DiT`` ``models.py``): timm ``PatchEmbed``
  conv ``x_embedder.proj.weight`` ``(D, C, p, p)`` -> our ``Linear(P, D)`` over tokens in (ph, pw, c) order
  (``w.permute(0, 2, 3, 1).reshape(D, p*p*C)``); ``pos_embed`` ``(1, N, D)`` (a frozen parameter there, a
  buffer here); ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table`` (``num_classes + 1`` rows, null
  label last, when trained with label dropout), ``blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
  adaLN_modulation.1}``, ``final_layer.{adaLN_modulation.1, linear}``. ``learn_sigma=True`` (the default
  there): ``final_layer.linear`` has ``p*p*2C`` rows in (ph, pw, c) order, kept whole, the backbone uses the
  first ``C`` channels. SiT time: data at ``t = 1``, output ``data - noise`` -> backbone ``sit_time_flip``.
  (DiT's own released weights have this layout but are DDPM epsilon models, not velocity fields: converting
  them gives a well-formed but meaningless flow model.)
* ``repa`` -- ``sihyun-yu/REPA`` ``models/sit.py``: the same layout without ``learn_sigma``, plus
  ``projectors.{k}.{0,2,4}`` (``Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU -> Linear(2048, z_k)``).
  RF time already (``loss.py``: ``x_t = (1 - t) x + t noise``, target ``noise - x``) -> backbone ``sit``.
  Old checkpoints split the blocks into ``blocks.{0..k-1}`` and ``decoder_blocks.{j}``; ``decoder_blocks.j``
  is ``blocks.{k + j}`` (REPA ``utils.load_legacy_checkpoints``). Projectors are dropped, or with
  ``--keep-heads`` become the ``repa`` objective's weights when that objective is registered and the spec
  uses it (their order and shapes must match the objective's parameters).
* ``selfflow`` -- ``black-forest-labs/Self-Flow`` ``src/model.py`` (``SelfFlowPerTokenDiT``, loaded by
  ``sample.py:load_model`` with ``num_classes=1001, learn_sigma=True``): ``x_embedder.proj`` is a
  ``Linear(C*p*p, D)`` over tokens patchified ``b c (h p) (w q) -> b (h w) (c p q)`` (channel slowest) -> the
  same permutation as the conv; the output layer predicts (p, q, 2C) internally (its ``shufflechannel``
  reorders to (c, p, q) only outside the network) -> kept as is; the per-token blocks and final layer have
  the ordinary DiT keys; the 1001-row label table is 1000 classes + null row 1000 (no label dropout inside
  the embedder); ``projector.linear{1,2}`` (``SimpleHead`` D -> 2D -> D) is dropped, or kept with
  ``--keep-heads`` as the ``selfflow`` objective's projector under the same rule as REPA's. Its ``forward``
  takes RF time and returns ``-net(x, 1 - t)``: the network itself is SiT time -> ``sit_time_flip``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

FORMATS = ("sit", "repa", "selfflow")
HEAD_OBJECTIVE = {"repa": "repa", "selfflow": "selfflow"}  # format -> objective that can own its heads
HEAD_KEYS = {"repa": re.compile(r"^projectors\.\d+\."), "selfflow": re.compile(r"^projector\.")}
FLIP_TYPE, PLAIN_TYPE = "sit_time_flip", "sit"
DEFAULT_BASE_SPEC = Path(__file__).resolve().parent.parent / "specs" / "fm_imagenet256_xl2.json"
_STRIP_PREFIXES = ("module.", "_orig_mod.")


class ConversionError(Exception):
    """A checkpoint that cannot be converted faithfully; the message says what and where."""


# ------------------------------------------------------------------------------------------- loading
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def unwrap(obj: Any, weights: str = "auto", fmt: str | None = None) -> tuple[dict[str, Tensor], str]:
    """The weights inside a loaded checkpoint object, and where they were found (``"ema"``, ``"model"``,
    ``"."`` for a bare state dict...). ``weights``: ``auto``, ``ema`` or ``model``. ``auto`` follows the
    official loaders: SiT/REPA (``download.find_model``, ``generate.py``) take ``ema``, Self-Flow
    (``sample.py:load_model``) takes ``model``, then ``state_dict``; then the other entries."""
    if weights not in ("auto", "ema", "model"):
        raise ConversionError(f"--weights must be auto, ema or model; got {weights!r}")
    if _is_state_dict(obj):
        if weights != "auto":
            raise ConversionError(f"--weights {weights}: the file is a bare state dict, not a {{{weights!r}: ...}} dict")
        return dict(obj), "."
    if not isinstance(obj, dict):
        raise ConversionError(f"expected a dict of tensors or a checkpoint dict; got {type(obj).__name__}")
    if weights != "auto":
        order: tuple[str, ...] = (weights,)
    elif fmt == "selfflow":
        order = ("model", "state_dict", "ema", "module")
    else:
        order = ("ema", "model", "state_dict", "module")
    for name in order:
        if _is_state_dict(obj.get(name)):
            return dict(obj[name]), name
    keys = ", ".join(repr(k) for k in list(obj)[:12])
    raise ConversionError(f"no state dict under {', '.join(map(repr, order))} in the checkpoint (top-level keys: {keys})")


def strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) from every key."""
    out = {}
    for k, v in sd.items():
        while k.startswith(_STRIP_PREFIXES):
            k = k.split(".", 1)[1]
        if k in out:
            raise ConversionError(f"two source keys become {k!r} after removing module./_orig_mod. prefixes")
        out[k] = v
    return out


def load_source(path: str | Path, weights: str = "auto", fmt: str | None = None) -> tuple[dict[str, Tensor], str]:
    """Read ``path`` -> ``(state dict, entry)``: ``.safetensors``, or a torch file through
    ``torch.load(weights_only=True)`` with one allowed global, ``argparse.Namespace`` (the ``args`` that SiT/REPA
    training checkpoints store); anything else a pickle names is refused, nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return strip_prefixes(load_file(path)), "."
    try:  # SiT/REPA training checkpoints pickle their argparse.Namespace next to the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle errors come in many types)
        raise ConversionError(
            f"{path}: cannot be read with torch.load(weights_only=True): {e}\n"
            "Re-save just the weights (torch.save(ckpt['ema'], 'weights.pt')) or as .safetensors.") from None
    sd, entry = unwrap(obj, weights, fmt)
    return strip_prefixes(sd), entry


# ------------------------------------------------------------------------------------ architecture
@dataclass
class SourceArch:
    """What the source weights say about the network."""

    hidden: int
    depth: int
    patch: int
    channels: int              # latent channels C
    grid: int | None           # token grid side (None: no pos_embed in the source)
    label_rows: int            # rows of the label table = num_classes + 1 (null row last)
    learn_sigma: bool
    mlp_ratio: float
    conv_embed: bool           # x_embedder.proj is a Conv2d (SiT/REPA) rather than a Linear (Self-Flow)

    @property
    def num_classes(self) -> int:
        return self.label_rows - 1

    @property
    def token_dim(self) -> int:
        return self.patch * self.patch * self.channels


def _need(sd: dict[str, Tensor], key: str, fmt: str) -> Tensor:
    if key not in sd:
        some = ", ".join(sorted(sd)[:8])
        raise ConversionError(f"the source has no {key!r}; is it a {fmt!r} checkpoint? (first keys: {some} ...)")
    return sd[key]


def _natural(key: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def _param_order(key: str) -> tuple:
    """Module order of a parameter name: modules in natural order, ``weight`` before ``bias`` (as
    ``nn.Module.state_dict`` lists them)."""
    module, _, leaf = key.rpartition(".")
    return (_natural(module), {"weight": 0, "bias": 1}.get(leaf, 2), leaf)


def renumber_legacy_repa(sd: dict[str, Tensor], notes: list[str]) -> dict[str, Tensor]:
    """REPA's old split ``blocks.{0..k-1}`` + ``decoder_blocks.{j}`` -> ``blocks.{k + j}``."""
    if not any(k.startswith("decoder_blocks.") for k in sd):
        return sd
    k_enc = len({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    out: dict[str, Tensor] = {}
    for key, v in sd.items():
        if key.startswith("decoder_blocks."):
            parts = key.split(".")
            key = ".".join(["blocks", str(int(parts[1]) + k_enc), *parts[2:]])
            if key in sd:
                raise ConversionError(f"legacy REPA renumbering: {key!r} exists twice")
        out[key] = v
    notes.append(f"legacy REPA layout: decoder_blocks.j renamed to blocks.(j + {k_enc})")
    return out


def infer_arch(sd: dict[str, Tensor], fmt: str, patch: int | None = None) -> SourceArch:
    """Sizes from the weights; ``patch`` is needed only for a linear patch embedding (Self-Flow; default 2)."""
    w_in = _need(sd, "x_embedder.proj.weight", fmt)
    hidden = int(w_in.shape[0])
    if w_in.dim() == 4:                                       # Conv2d (D, C, p, p)
        if w_in.shape[2] != w_in.shape[3]:
            raise ConversionError(f"x_embedder.proj.weight {tuple(w_in.shape)}: non-square patches are not supported")
        conv, channels, p = True, int(w_in.shape[1]), int(w_in.shape[2])
        if patch is not None and patch != p:
            raise ConversionError(f"the conv patch embedding has patch {p}, but patch {patch} was asked for")
    elif w_in.dim() == 2:                                     # Linear (D, C p p)
        conv, p = False, int(patch or 2)
        if w_in.shape[1] % (p * p):
            raise ConversionError(f"x_embedder.proj.weight {tuple(w_in.shape)}: {w_in.shape[1]} inputs are not "
                                  f"C x {p} x {p}; pass the right --preset/--patch")
        channels = int(w_in.shape[1]) // (p * p)
    else:
        raise ConversionError(f"x_embedder.proj.weight has shape {tuple(w_in.shape)}; expected 4-D (conv) or 2-D")
    if fmt in ("sit", "repa") and not conv:
        raise ConversionError(f"format {fmt!r} has a conv patch embedding (D, C, p, p); this one is a Linear "
                              f"{tuple(w_in.shape)} -- a Self-Flow checkpoint? (--format selfflow)")
    if fmt == "selfflow" and conv:
        raise ConversionError("format 'selfflow' has a Linear patch embedding; this one is a conv "
                              f"{tuple(w_in.shape)} -- a SiT or REPA checkpoint? (--format sit|repa)")

    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not blocks or blocks != list(range(len(blocks))):
        more = " ..." if len(blocks) > 6 else ""
        raise ConversionError(f"blocks must be numbered 0..depth-1; found {blocks[:6]}{more}")
    fc1 = _need(sd, "blocks.0.mlp.fc1.weight", fmt)
    out_rows = int(_need(sd, "final_layer.linear.weight", fmt).shape[0])
    p2c = p * p * channels
    if out_rows not in (p2c, 2 * p2c):
        raise ConversionError(f"final_layer.linear.weight has {out_rows} outputs; expected {p2c} (p*p*C) or "
                              f"{2 * p2c} (learn_sigma)")
    grid = None
    if "pos_embed" in sd:
        n = int(sd["pos_embed"].shape[-2])
        g = math.isqrt(n)
        if g * g != n:
            raise ConversionError(f"pos_embed has {n} positions, not a square grid")
        grid = g
    table = _need(sd, "y_embedder.embedding_table.weight", fmt)
    return SourceArch(hidden=hidden, depth=len(blocks), patch=p, channels=channels, grid=grid,
                      label_rows=int(table.shape[0]), learn_sigma=out_rows == 2 * p2c,
                      mlp_ratio=float(fc1.shape[0]) / hidden, conv_embed=conv)


def patch_embed_to_linear(w: Tensor, channels: int, patch: int) -> Tensor:
    """Conv ``(D, C, p, p)`` or Linear ``(D, C*p*p)`` over (c, ph, pw) -> our Linear ``(D, p*p*C)`` over
    tokens in (ph, pw, c) order."""
    d = w.shape[0]
    return w.reshape(d, channels, patch, patch).permute(0, 2, 3, 1).reshape(d, patch * patch * channels)


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


# ------------------------------------------------------------------------------------------ the plan
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


def _read_base(base_spec: str | Path | dict | None) -> dict:
    if isinstance(base_spec, dict):
        return json.loads(json.dumps(base_spec))
    from registry.spec import read_json

    return read_json(base_spec or DEFAULT_BASE_SPEC)


def _spec_error(e: Exception) -> ConversionError:
    problems = getattr(e, "problems", None)
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
    from registry.errors import SpecError
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
    if fmt == "repa" and arch.learn_sigma:
        raise ConversionError("a REPA SiT has no learn_sigma output, but final_layer.linear has 2C channels")

    raw = _read_base(base_spec)
    raw.pop("$schema", None)
    bb: dict[str, Any] = {"type": FLIP_TYPE if fmt in ("sit", "selfflow") else PLAIN_TYPE}
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


def _target_shapes(spec: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of everything the run checkpoints (built on the meta device: no memory)."""
    from runtime.compiler import compile_spec

    g = compile_spec(spec, torch.device("meta"), with_ema=False)
    return {k: (tuple(v.shape), v.dtype) for k, v in g.train_module.state_dict().items()}


def plan_conversion(sd: dict[str, Tensor], fmt: str, *, keep_heads: bool = False, patch: int | None = None,
                    log: Callable[[str], None] = print, **spec_kw: Any) -> ConversionPlan:
    """Map a source state dict (already unwrapped and de-prefixed) onto the zoo layout; raise
    :class:`ConversionError` unless every source key is consumed (or dropped for a stated reason) and every
    target key is filled with its exact shape. ``spec_kw`` go to :func:`build_spec`. Works on meta tensors."""
    from registry.kinds import OBJECTIVES
    from zoo.layers.embed import sincos_pos_embed_2d

    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    notes: list[str] = []
    if fmt == "repa":
        sd = renumber_legacy_repa(sd, notes)
    if patch is None and spec_kw.get("preset"):
        from zoo.backbones.sit import SiTParams

        patch = SiTParams.presets.get(spec_kw["preset"], {}).get("patch")
    arch = infer_arch(sd, fmt, patch)
    spec = build_spec(arch, fmt, notes=notes, **spec_kw)
    target = _target_shapes(spec)

    mapped: dict[str, tuple[str, Tensor]] = {}   # target key -> (source key, value)
    dropped: dict[str, str] = {}

    def put(tkey: str, skey: str, value: Tensor) -> None:
        if tkey in mapped:
            raise ConversionError(f"source keys {mapped[tkey][0]!r} and {skey!r} both map to {tkey!r}")
        mapped[tkey] = (skey, value)

    head_re = HEAD_KEYS.get(fmt)
    head_keys = sorted((k for k in sd if head_re is not None and head_re.match(k)), key=_param_order)
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
        obj = HEAD_OBJECTIVE[fmt]
        what = f"{len(head_keys)} head tensors ({head_keys[0].split('.')[0]}.*)"
        if not keep_heads:
            reason = "projector head (training only); --keep-heads keeps it"
            dropped.update({k: reason for k in head_keys})
            log(f"dropping {what}: not needed for sampling (--keep-heads keeps them)")
        elif obj not in OBJECTIVES.names():
            reason = f"--keep-heads, but no {obj!r} objective is registered"
            dropped.update({k: reason for k in head_keys})
            log(f"dropping {what}: no {obj!r} objective is registered to own them")
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
    unconsumed = sorted((k for k in sd if k not in consumed and k not in dropped), key=_natural)
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
    extra = sorted(set(mapped) - set(target))
    if extra:  # cannot happen with the rules above; kept as a guard
        raise ConversionError(f"mapped keys outside the model: {', '.join(extra)}")
    if arch.learn_sigma:
        notes.append("learn_sigma: final_layer.linear kept with 2C channels per pixel; the first C are used")
    return ConversionPlan(spec=spec, model=model, arch=arch, fmt=fmt, dropped=dropped, notes=notes)


# ------------------------------------------------------------------------------------------ writing
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    meta = {"path": str(src.resolve()), "sha256": _sha256(src), "entry": entry, "num_tensors": len(sd)}
    ck = write_run(plan, out_dir, step=step, meta=meta, force=force)
    bb = plan.spec.backbone
    log(f"converted {src} [{entry}] ({fmt}, {len(sd)} tensors, {len(plan.dropped)} dropped) -> {ck}")
    log(f"backbone {bb.type} {bb.preset or ''} hidden {bb.hidden} depth {bb.depth} heads {bb.heads} patch {bb.patch}"
        f"{' learn_sigma' if getattr(bb, 'learn_sigma', False) else ''}; {plan.arch.num_classes} classes, null label "
        f"{plan.arch.num_classes}; latent {plan.arch.channels}x{plan.arch.grid * plan.arch.patch}^2")
    for note in plan.notes:
        log(f"note: {note}")
    return ck


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="published checkpoint (.pt/.pth or .safetensors)")
    ap.add_argument("--to", dest="out", type=Path, required=True, help="run directory to write")
    ap.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    ap.add_argument("--preset", default=None, help="SiT preset (default: the one matching the weights, e.g. XL/2)")
    ap.add_argument("--heads", type=int, default=None,
                    help="attention heads (not in the weights; default: the preset's)")
    ap.add_argument("--patch", type=int, default=None,
                    help="patch size for a Linear patch embedding (default: the preset's, else 2)")
    ap.add_argument("--num-classes", type=int, default=None, help="check: classes without the null row")
    ap.add_argument("--latent-size", type=int, default=None, help="check (or set, without pos_embed): latent side")
    ap.add_argument("--latent-channels", type=int, default=None, help="check: latent channels")
    ap.add_argument("--base-spec", type=Path, default=None,
                    help=f"spec to start from (default specs/{DEFAULT_BASE_SPEC.name})")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="edit the spec before validation (VALUE parsed as JSON, else a string)")
    ap.add_argument("--name", default=None, help="run name in the spec (default <format>_<file stem>)")
    ap.add_argument("--weights", default="auto", choices=("auto", "ema", "model"),
                    help="which weights of a training checkpoint (auto: as the official loader)")
    ap.add_argument("--keep-heads", action="store_true", help="keep projector heads as the objective's weights")
    ap.add_argument("--step", type=int, default=0, help="step number of the written checkpoint")
    ap.add_argument("--force", action="store_true", help="write into a run directory that has checkpoints")
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.out, args.fmt, weights=args.weights, step=args.step, force=args.force,
                keep_heads=args.keep_heads, patch=args.patch, base_spec=args.base_spec, preset=args.preset,
                heads=args.heads, num_classes=args.num_classes, latent_size=args.latent_size,
                latent_channels=args.latent_channels, sets=args.sets, name=args.name)
    except ConversionError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
