"""Reading a published checkpoint: the formats by name, loading and unwrapping the file, and the network sizes
the weights imply (:class:`SourceArch`)."""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from runtime.convert import repa, selfflow, sit
from runtime.convert.base import WEIGHTS_ORDER, ConversionError, SourceFormat

BY_NAME: dict[str, SourceFormat] = {f.name: f for f in (sit.FORMAT, repa.FORMAT, selfflow.FORMAT)}
FORMATS = tuple(BY_NAME)
_STRIP_PREFIXES = ("module.", "_orig_mod.")


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
    else:
        order = BY_NAME[fmt].weights_order if fmt in BY_NAME else WEIGHTS_ORDER
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


def natural(key: str) -> list:
    """Sort key: digit runs as numbers (``blocks.2`` before ``blocks.10``)."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def param_order(key: str) -> tuple:
    """Module order of a parameter name: modules in natural order, ``weight`` before ``bias`` (as
    ``nn.Module.state_dict`` lists them)."""
    module, _, leaf = key.rpartition(".")
    return (natural(module), {"weight": 0, "bias": 1}.get(leaf, 2), leaf)


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
    source = BY_NAME.get(fmt)
    if source is not None and source.conv_embed and not conv:
        raise ConversionError(f"format {fmt!r} has a conv patch embedding (D, C, p, p); this one is a Linear "
                              f"{tuple(w_in.shape)} -- a Self-Flow checkpoint? (--format selfflow)")
    if source is not None and not source.conv_embed and conv:
        raise ConversionError(f"format {fmt!r} has a Linear patch embedding; this one is a conv "
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
