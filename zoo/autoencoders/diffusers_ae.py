"""Autoencoder ``diffusers``: a pretrained diffusers autoencoder read from LOCAL files (never from the network),
used frozen.

Classes (``class_name``) and the data they take (channel-first, values in [-1, 1]):

* ``AutoencoderKL`` (SD-VAE, FLUX.1-family image AEs): image ``(C, H, W)`` -> ``(latent_channels, H/d, W/d)``,
  ``d = 2 ** (len(block_out_channels) - 1)``.
* ``AutoencoderKLWan`` (Wan2.1/2.2 video AEs): video ``(3, T, H, W)`` -> ``(z_dim, 1 + (T-1)/t, H/s, W/s)``,
  ``t = 2 ** (number of temporal downsamplings)`` (``temperal_downsample``), ``s = 2 ** (len(dim_mult)-1) *
  (patch_size or 1)``. diffusers encodes the first frame alone, then chunks of 4 frames, so ``T - 1`` must be a
  multiple of 4. The config's ``scale_factor_spatial``/``scale_factor_temporal`` are declarative only (diffusers
  defaults them to 8/4 whatever the architecture), so the factors are derived from the architecture.
* ``AutoencoderOobleck`` (Stable Audio's AE): mono audio ``(1, L)`` -> ``(decoder_input_channels, L / hop)``,
  ``hop = prod(downsampling_ratios)``. A stereo model (``audio_channels = 2``) gets the mono clip on both
  channels when encoding, and its two decoded channels are averaged back to mono.

Loading: ``path`` is a directory in ``save_pretrained`` layout (``config.json`` plus
``diffusion_pytorch_model.safetensors`` or its sharded ``.index.json``) or one ``.safetensors`` file whose config
is ``config`` (default: ``config.json`` beside it). The model is built with ``from_config`` and the weights are
loaded strictly (a missing or unexpected key is an error naming it).

Normalisation: ``z = (raw - shift) * scale`` with scalar or per-channel ``shift``/``scale``; null takes the
published constants from the config: ``scaling_factor``/``shift_factor`` for KL (with ``latents_mean``/
``latents_std`` when the config has them: ``shift = mean``, ``scale = scaling_factor / std``), ``latents_mean``/
``latents_std`` for Wan (``shift = mean``, ``scale = 1 / std``); Oobleck publishes none and Stable Audio uses its raw
latent, so its defaults are ``shift = 0``, ``scale = 1`` (a latent cache measures real statistics).

When no config is readable (a spec checked on a machine without the weights) the latent layout is the reference
model's (SD-VAE, Wan2.1, Stable Audio Open) or the spec's explicit fields; building always checks the real config.
``diffusers`` is an optional dependency (``pip install fmzoo[diffusers]``), imported only when the AE is built.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from registry.kinds import AUTOENCODERS
from zoo.core.params import AutoencoderParams, FieldError, Root
from zoo.autoencoders.base import AutoencoderModule

WEIGHTS = "diffusion_pytorch_model.safetensors"
WAN_CHUNK = 4  # diffusers' AutoencoderKLWan encodes frame 0, then chunks of this many frames


@dataclass(frozen=True)
class Layout:
    """What one config implies: data kind, data channels, latent channels, downsampling factors."""

    kind: Literal["image", "video", "audio"]
    in_channels: int       # channels of the data the model takes (Oobleck: the model's own audio_channels)
    latent_channels: int
    downsample: int        # spatial factor (image, video) or samples per latent step (audio)
    temporal: int = 1      # frames per latent step after the first (video)
    sample_rate: int | None = None


REFERENCE = {  # layouts assumed when no config is readable: SD-VAE, Wan2.1 VAE, Stable Audio Open 1.0
    "AutoencoderKL": Layout("image", 3, 4, 8),
    "AutoencoderKLWan": Layout("video", 3, 16, 8, 4),
    "AutoencoderOobleck": Layout("audio", 2, 64, 2048, sample_rate=44100),
}


def layout_from_config(class_name: str, cfg: dict) -> Layout:
    """The layout of a diffusers config (missing keys take diffusers 0.42's defaults)."""
    g = cfg.get
    if class_name == "AutoencoderKL":
        return Layout("image", int(g("in_channels", 3)), int(g("latent_channels", 4)),
                      2 ** (len(g("block_out_channels", (64,))) - 1))
    if class_name == "AutoencoderKLWan":
        dim_mult, patch = list(g("dim_mult", [1, 2, 4, 4])), int(g("patch_size") or 1)
        stages = len(dim_mult) - 1
        temporal = 2 ** sum(bool(b) for b in list(g("temperal_downsample", [False, True, True]))[:stages])
        if WAN_CHUNK % temporal:
            raise FieldError("path", f"temporal downsampling {temporal} does not divide diffusers' "
                                     f"encoding chunk of {WAN_CHUNK} frames; this AutoencoderKLWan config is unsupported")
        return Layout("video", int(g("in_channels", 3)) // patch ** 2, int(g("z_dim", 16)), 2 ** stages * patch,
                      temporal)
    ratios = list(g("downsampling_ratios", [2, 4, 4, 8, 8]))
    return Layout("audio", int(g("audio_channels", 2)), int(g("decoder_input_channels", 64)), math.prod(ratios),
                  sample_rate=int(g("sampling_rate", 44100)))


Number = float | list[float]


class DiffusersAutoencoderParams(AutoencoderParams):
    """A frozen diffusers autoencoder from local files; latent layout and statistics default to its config."""

    type: Literal["diffusers"]
    class_name: Literal["AutoencoderKL", "AutoencoderKLWan", "AutoencoderOobleck"] = Field(
        "AutoencoderKL", description="diffusers class: AutoencoderKL (images: SD-VAE, FLUX.1), AutoencoderKLWan "
                                     "(video: Wan2.1/2.2), AutoencoderOobleck (audio: Stable Audio).")
    path: str = Field(..., min_length=1, description="Local directory written by `save_pretrained` (config.json + "
                                                     "diffusion_pytorch_model.safetensors) or one .safetensors file.")
    config: str | None = Field(None, description="config.json to build the model from; null = config.json in `path` "
                                                 "(a directory) or beside it (a .safetensors file).")
    scale: Number | None = Field(
        None, description="Latent scale, scalar or per channel (z = (raw - shift) * scale); null = the config's "
                          "published value (KL scaling_factor, Wan 1/latents_std, Oobleck 1). SD-VAE: 0.18215.")
    shift: Number | None = Field(
        None, description="Latent shift, scalar or per channel; null = the config's published value (KL "
                          "shift_factor or 0, Wan latents_mean, Oobleck 0).")
    latent_channels: int | None = Field(
        None, gt=0, description="Latent channels (KL latent_channels, Wan z_dim, Oobleck decoder_input_channels); "
                                "null = from the config; checked against it on load.")
    downsample: int | None = Field(
        None, gt=0, description="Spatial downsampling (KL, Wan) or audio samples per latent step (Oobleck); "
                                "null = from the config; checked against it on load.")
    temporal_downsample: int | None = Field(
        None, gt=0, description="AutoencoderKLWan only: frames per latent step after the first; null = from the "
                                "config (Wan: 4).")
    sample_posterior: bool = Field(
        False, description="Encode to a posterior sample (REPA) instead of the posterior mean.")

    @model_validator(mode="after")
    def _check(self) -> "DiffusersAutoencoderParams":
        if self.temporal_downsample is not None and self.class_name != "AutoencoderKLWan":
            raise ValueError(f"temporal_downsample applies to AutoencoderKLWan only, not {self.class_name}")
        for name in ("scale", "shift"):
            v = getattr(self, name)
            if isinstance(v, list) and not v:
                raise ValueError(f"{name}: a per-channel list must not be empty")
        s = self.scale
        if s is not None and any(x <= 0 for x in (s if isinstance(s, list) else [s])):
            raise ValueError(f"scale must be positive; got {s}")
        return self

    # ------------------------------------------------------------------------------------------ files
    def config_path(self) -> Path:
        """The config.json the model is built from."""
        if self.config is not None:
            return Path(self.config).expanduser()
        p = Path(self.path).expanduser()
        return p.parent / "config.json" if p.suffix == ".safetensors" else p / "config.json"

    def weight_files(self) -> list[Path]:
        """The safetensors file(s) to load; FileNotFoundError naming what is expected."""
        p = Path(self.path).expanduser()
        if p.suffix == ".safetensors":
            if not p.is_file():
                raise FileNotFoundError(f"autoencoder.path: {p} not found; expected a local {self.class_name} "
                                        f".safetensors file (nothing is downloaded)")
            return [p]
        if (p / WEIGHTS).is_file():
            return [p / WEIGHTS]
        index = p / f"{WEIGHTS}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [p / s for s in shards]
        raise FileNotFoundError(
            f"autoencoder.path: expected a local {self.class_name} directory written by save_pretrained, holding "
            f"config.json and {WEIGHTS} (or its .index.json), or a .safetensors file; {p} has "
            f"{'no such directory' if not p.is_dir() else 'neither'} (nothing is downloaded)")

    def read_config(self) -> dict | None:
        """The raw config.json, or None when it is not there; ValueError when it is not a JSON object."""
        p = self.config_path()
        if not p.is_file():
            return None
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise FieldError("config", f"{p} is not valid JSON ({e.msg})") from None
        if not isinstance(cfg, dict):
            raise FieldError("config", f"{p} must hold a JSON object")
        return cfg

    # ----------------------------------------------------------------------------------------- layout
    def layout_problems(self, layout: Layout, source: str) -> list[tuple[str, str]]:
        """Spec fields that contradict ``layout`` (read from ``source``)."""
        out = []
        for name, value in (("latent_channels", layout.latent_channels), ("downsample", layout.downsample),
                            ("temporal_downsample", layout.temporal if layout.kind == "video" else None)):
            given = getattr(self, name)
            if given is not None and value is not None and given != value:
                out.append((name, f"the spec says {given} but {source} gives {value}"))
        return out

    def layout(self, cfg: dict | None = None, check: bool = True) -> Layout:
        """The layout from ``cfg`` (default: the config file), checked against the spec's fields (ValueError naming
        both; ``check=False`` skips that and returns the config's), or the reference layout overridden by those
        fields when there is no config."""
        cfg = self.read_config() if cfg is None else cfg
        if cfg is None:
            base = REFERENCE[self.class_name]
            return replace(base, latent_channels=self.latent_channels or base.latent_channels,
                           downsample=self.downsample or base.downsample,
                           temporal=self.temporal_downsample or base.temporal)
        lay = layout_from_config(self.class_name, cfg)
        bad = self.layout_problems(lay, f"{self.class_name} config {self.config_path()}") if check else []
        if bad:
            raise ValueError("; ".join(f"{p}: {m}" for p, m in bad))
        return lay

    def latent_shape(self, input_shape: Any) -> tuple[int, ...]:
        """Image ``(C, H, W)`` -> ``(Cz, H/d, W/d)``; video ``(C, T, H, W)`` -> ``(Cz, 1 + (T-1)/t, H/s, W/s)``;
        audio ``(1, L)`` -> ``(Cz, L/hop)``. ValueError for data of the wrong rank, and for video or audio the
        autoencoder cannot take; image sizes are floor-divided (``problems`` reports them, and spec fields that
        contradict the config; the config's layout is used here)."""
        lay = self.layout(check=False)
        for field, msg in self.shape_problems(input_shape, lay):
            if lay.kind != "image" or not field:
                raise ValueError(f"autoencoder {self.class_name}: {msg}")
        shape = tuple(int(s) for s in input_shape)
        if lay.kind == "image":
            return lay.latent_channels, shape[1] // lay.downsample, shape[2] // lay.downsample
        if lay.kind == "video":
            return (lay.latent_channels, 1 + (shape[1] - 1) // lay.temporal, shape[2] // lay.downsample,
                    shape[3] // lay.downsample)
        return lay.latent_channels, shape[1] // lay.downsample

    def time_stride(self, input_shape: Any) -> int:
        """Input time steps per latent step: frames (video), samples (audio); 1 for images."""
        lay = self.layout(check=False)
        return {"image": 1, "video": lay.temporal, "audio": lay.downsample}[lay.kind]

    def shape_problems(self, input_shape: Any, lay: Layout | None = None) -> Iterator[tuple[str, str]]:
        """``(fields, message)`` for each reason the autoencoder cannot take samples of ``input_shape``; ``fields``
        names the data fields that may set it ("frames|duration_s": the first one the data has), "" = the sample."""
        lay = lay or self.layout(check=False)
        if isinstance(input_shape, dict):
            yield "", (f"takes one stream; the data give {sorted(input_shape)} (wrap it in an autoencoder of "
                       f"type 'streams')")
            return
        shape = tuple(int(s) for s in input_shape)
        rank = {"image": 3, "video": 4, "audio": 2}[lay.kind]
        layout = {"image": "(C, H, W)", "video": "(C, T, H, W)", "audio": "(1, L)"}[lay.kind]
        if len(shape) != rank:
            yield "", f"encodes {lay.kind} samples {layout}; the data give {shape}"
            return
        want = 1 if lay.kind == "audio" else lay.in_channels
        if shape[0] != want:
            yield "channels", f"takes {want}-channel {lay.kind} {layout}; the data give {shape[0]} channels"
        if lay.kind == "audio":
            if shape[1] % lay.downsample:
                yield "duration_s", f"clip length {shape[1]} is not a multiple of the hop {lay.downsample} samples"
            return
        if lay.kind == "video" and (shape[1] - 1) % WAN_CHUNK:
            lo = 1 + WAN_CHUNK * ((shape[1] - 1) // WAN_CHUNK)
            yield "frames|duration_s", (f"{shape[1]} frames: T - 1 must be a multiple of {WAN_CHUNK} (frame 0, then "
                                        f"chunks of {WAN_CHUNK}; temporal downsampling {lay.temporal}): use "
                                        f"{lo} or {lo + WAN_CHUNK} frames")
        h, w = shape[-2:]
        if h % lay.downsample or w % lay.downsample:
            yield "size", f"frame size {h}x{w} is not divisible by the downsampling {lay.downsample}"

    def _checked_layout(self) -> tuple[dict | None, Layout] | None:
        """``(config, layout)``, or None when the config or its layout has a fault (:meth:`problems` names it)."""
        try:
            cfg = self.read_config()
            if cfg is not None and self.layout_problems(layout_from_config(self.class_name, cfg),
                                                        f"{self.class_name} config {self.config_path()}"):
                return None
        except ValueError:
            return None
        return cfg, self.layout(cfg)

    def problems(self, spec: Any) -> Iterator[tuple[str, str]]:
        """Spec checks that need no data: the config is readable, the spec's fields agree with it, the latent
        statistics are known."""
        try:
            cfg = self.read_config()
        except FieldError as e:
            yield e.path, e.message
            return
        if cfg is not None:
            try:
                lay = layout_from_config(self.class_name, cfg)
            except FieldError as e:
                yield e.path, e.message
                return
            bad = self.layout_problems(lay, f"{self.class_name} config {self.config_path()}")
            yield from bad
            if bad:
                return
            try:
                self.normalisation(cfg, lay.latent_channels)
            except FieldError as e:
                yield e.path, e.message

    def input_problems(self, input_shape: Any, spec: Any) -> Iterator[tuple[str, str]]:
        """The data shape (reported at the data field that sets it) and sample rate (audio)."""
        checked = self._checked_layout()
        if checked is None:
            return
        cfg, lay = checked
        data = spec.data
        for fields, msg in self.shape_problems(input_shape, lay):
            field = next((f for f in fields.split("|") if f and hasattr(data, f)), None)
            yield Root(f"data.{field}" if field else "data"), f"autoencoder {self.class_name}: {msg}"
        rates = data.stream_rates() or {}
        if lay.sample_rate is not None and cfg is not None and "audio" in rates and rates["audio"] != lay.sample_rate:
            yield (Root("data.sample_rate" if hasattr(data, "sample_rate") else "data"),
                   f"autoencoder {self.class_name} was trained on {lay.sample_rate} Hz audio; the data give "
                   f"{rates['audio']} Hz")

    # ---------------------------------------------------------------------------------- normalisation
    def normalisation(self, cfg: dict, channels: int) -> tuple[Number, Number]:
        """``(shift, scale)``: the spec's values, else the config's published constants; ValueError naming the
        field to set when neither gives them, or when a per-channel list has the wrong length."""
        src = f"{self.class_name} config {self.config_path()}"
        shift, scale = self.shift, self.scale
        if self.class_name == "AutoencoderKL":
            mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
            if scale is None and "scaling_factor" not in cfg:
                raise FieldError("scale", f"{src} has no scaling_factor; set it in the spec")
            factor = cfg.get("scaling_factor")
            if mean is not None and std is not None:   # SDXL-style per-channel statistics
                shift = list(map(float, mean)) if shift is None else shift
                scale = [float(factor) / float(s) for s in std] if scale is None else scale
            else:
                shift = float(cfg.get("shift_factor") or 0.0) if shift is None else shift
                scale = float(factor) if scale is None else scale
        elif self.class_name == "AutoencoderKLWan":
            for name, key in (("shift", "latents_mean"), ("scale", "latents_std")):
                if getattr(self, name) is None and cfg.get(key) is None:
                    raise FieldError(name, f"{src} has no {key}; set it in the spec")
            shift = list(map(float, cfg["latents_mean"])) if shift is None else shift
            if scale is None:
                if any(float(s) <= 0 for s in cfg["latents_std"]):
                    raise FieldError("scale", f"{src} has a non-positive latents_std")
                scale = [1.0 / float(s) for s in cfg["latents_std"]]
        else:  # Oobleck publishes no statistics; Stable Audio uses the raw latent
            shift = 0.0 if shift is None else shift
            scale = 1.0 if scale is None else scale
        for name, v in (("shift", shift), ("scale", scale)):
            if isinstance(v, list) and len(v) != channels:
                given = "the spec" if getattr(self, name) is not None else src
                raise FieldError(name, f"{given} gives {len(v)} values for {channels} latent channels")
        return shift, scale


def _load_weights(files: list[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    state: dict[str, Tensor] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"autoencoder.path: weight shard {f} not found")
        state.update(load_file(str(f)))
    return state


def _keys(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


@AUTOENCODERS.register
class DiffusersAutoencoder(AutoencoderModule):
    """Frozen diffusers autoencoder (see the module docstring for shapes). ``encode(x)`` = normalised posterior mean
    (or sample), ``(B, *input_shape)`` -> ``(B, *latent_shape)`` float32; ``decode`` the inverse."""

    Params = DiffusersAutoencoderParams

    def __init__(self, params: DiffusersAutoencoderParams):
        super().__init__()
        self.params = params
        cfg_path, files = params.config_path(), params.weight_files()
        cfg = params.read_config()
        if cfg is None:
            raise FileNotFoundError(f"autoencoder.config: {cfg_path} not found; the {params.class_name} config.json "
                                    f"must be a local file (set autoencoder.config for a single .safetensors file)")
        try:
            import diffusers
        except ImportError as e:
            raise ImportError("autoencoder type 'diffusers' needs `pip install fmzoo[diffusers]`") from e
        self.vae = getattr(diffusers, params.class_name).from_config(cfg)
        state = _load_weights(files)
        fix = getattr(self.vae, "_fix_state_dict_keys_on_load", None)  # pre-0.15 attention names (SD-VAE files)
        if fix is not None:
            state = fix(state) or state
        missing, unexpected = self.vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"autoencoder.path: the weights in {', '.join(map(str, files))} do not match "
                             f"{params.class_name}({cfg_path}): missing keys [{_keys(list(missing))}], unexpected "
                             f"keys [{_keys(list(unexpected))}]")
        self.vae.eval().requires_grad_(False)
        self.layout = params.layout(dict(self.vae.config))
        shift, scale = params.normalisation(cfg, self.layout.latent_channels)
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32), persistent=False)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32), persistent=False)

    def _bcast(self, v: Tensor, z: Tensor) -> Tensor:
        return v.view(1, -1, *([1] * (z.dim() - 2))) if v.dim() else v

    def _stereo(self) -> bool:
        return self.layout.kind == "audio" and self.layout.in_channels == 2

    @torch.no_grad()
    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw posterior ``(mean, logvar)``, each ``(B, *latent_shape)`` float32."""
        rank = {"image": 4, "video": 5, "audio": 3}[self.layout.kind]
        if x.dim() != rank:
            raise ValueError(f"{self.params.class_name}: expected a {rank}-D batch; got {tuple(x.shape)}")
        x = x.to(self.shift.device, torch.float32)
        if self._stereo():
            if x.shape[1] != 1:
                raise ValueError(f"{self.params.class_name}: expected mono audio (B, 1, L); got {tuple(x.shape)}")
            x = x.expand(-1, 2, -1).contiguous()  # mono -> both channels of the stereo model
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float(), dist.logvar.float()

    @torch.no_grad()
    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latent ``(B, *latent_shape)`` -> data ``(B, *input_shape)`` float32 (stereo output averaged)."""
        x = self.vae.decode(z.to(self.shift.device, torch.float32)).sample.float()
        return x.mean(dim=1, keepdim=True) if self._stereo() else x

    def published_stats(self) -> tuple[Number, Number]:
        """``(shift, 1 / scale)``: the mean and std of the raw latent this entry normalises with."""
        shift = self.shift.tolist()
        std = (1.0 / self.scale).tolist()
        return shift, std

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """``(B, *input_shape)`` -> normalised ``(B, *latent_shape)`` = ``(mean - shift) * scale``."""
        mean, logvar = self.moments(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.params.sample_posterior else mean
        return (z - self._bcast(self.shift, z)) * self._bcast(self.scale, z)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalised ``(B, *latent_shape)`` -> ``(B, *input_shape)`` = ``decode_raw(z / scale + shift)``."""
        z = z.float()
        return self.decode_raw(z / self._bcast(self.scale, z) + self._bcast(self.shift, z))
