"""Small convolutional VAEs the project trains itself: backbones ``conv_vae`` (images ``(C, H, W)``) and
``conv_vae_1d`` (mono audio ``(1, L)``), and the frozen autoencoder entries of the same tags that load a
trained run for flow specs.

Network (GroupNorm + SiLU residual blocks, no attention)::

    encoder: conv_in(C -> ch[0]); per level i: res_blocks x ResBlock(-> ch[i]), Down(/factor);
             ResBlock; GroupNorm, SiLU, conv_out(-> 2 * latent_channels)  = (mean, logvar)
    decoder: conv_in(latent_channels -> ch[-1]); ResBlock; per level (reversed): Up(x factor),
             res_blocks x ResBlock(-> ch[i]); GroupNorm, SiLU, conv_out(-> C)

so ``downsample = factor ** len(channels)``: ``(B, C, H, W)`` -> latent ``(B, z, H / f, W / f)`` (2-D),
``(B, 1, L)`` -> ``(B, z, L / f)`` (1-D).

Training (a spec with ``backbone.type = conv_vae``, ``objective.type = autoencoder``, ``autoencoder.type =
identity``): the backbone's ``patch`` is its downsample, so the modality's token grid is the latent grid; the
network is a :class:`zoo.autoencoders.base.TrainableAutoencoder` (no token ``forward``): the objective works on
the data (``encode_moments`` / ``decode``).

Using a trained run (``autoencoder: {"type": "conv_vae", "run": "runs/vae_digits"}``): the entry reads the
architecture from the checkpoint's ``spec.resolved.json`` (so ``latent_shape`` is known at validation time;
the resolved spec pins the exact checkpoint directory) and loads its EMA (or trained) weights. Latents are
normalised per channel: ``encode(x) = (mean(x) - m) / s`` where ``m``, ``s`` are the mean and std of the
posterior means of the first ``stats_samples`` training samples of the AE run, computed once when the entry
is first built and cached in ``<checkpoint>/latent_stats.json`` (keyed by step, weights and sample count;
written atomically). ``moments`` / ``decode_raw`` work in raw units and ``published_stats() = (m, s)``.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import Tensor, nn

from registry.kinds import AUTOENCODERS, BACKBONES
from storage.checkpoint import find_checkpoint, load_weights, step_of
from storage.files import write_json_atomic
from zoo.core.params import AutoencoderParams, Root, ZooParams
from zoo.autoencoders.base import AutoencoderModule, TrainableAutoencoder

LOGVAR_RANGE = (-30.0, 20.0)


# --------------------------------------------------------------------------------------------- network
def _conv(dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]


class ResBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` with a 1x1 skip when the width changes; ``(B, c_in, *S)`` ->
    ``(B, c_out, *S)``."""

    def __init__(self, c_in: int, c_out: int, groups: int, dims: int):
        super().__init__()
        conv = _conv(dims)
        self.norm1, self.conv1 = nn.GroupNorm(math.gcd(groups, c_in), c_in), conv(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(math.gcd(groups, c_out), c_out), conv(c_out, c_out, 3, padding=1)
        self.skip = conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Up(nn.Module):
    """Nearest-neighbour upsampling by ``factor`` then a 3-wide conv."""

    def __init__(self, c: int, factor: int, dims: int):
        super().__init__()
        self.factor, self.conv = factor, _conv(dims)(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


class ConvVAENet(nn.Module):
    """Encoder + decoder; ``scales`` lists ``(conv, divisor)`` for the analytic FLOP count.

    ``encode_moments(x (B, C, *S)) -> (mean, logvar)`` each ``(B, z, *S / f)``; ``decode(z) -> (B, C, *S)``.
    """

    def __init__(self, in_channels: int, channels: list[int], latent_channels: int, res_blocks: int, factor: int,
                 groups: int, dims: int):
        super().__init__()
        conv, self.dims, self.factor = _conv(dims), dims, factor
        self.downsample = factor ** len(channels)
        k, pad = 2 * factor, factor // 2  # L -> L / factor exactly
        enc: list[nn.Module] = [conv(in_channels, channels[0], 3, padding=1)]
        c_prev = channels[0]
        for c in channels:
            for _ in range(res_blocks):
                enc.append(ResBlock(c_prev, c, groups, dims))
                c_prev = c
            enc.append(conv(c, c, k, stride=factor, padding=pad))
        enc += [ResBlock(c_prev, c_prev, groups, dims), nn.GroupNorm(math.gcd(groups, c_prev), c_prev), nn.SiLU(),
                conv(c_prev, 2 * latent_channels, 3, padding=1)]
        dec: list[nn.Module] = [conv(latent_channels, c_prev, 3, padding=1), ResBlock(c_prev, c_prev, groups, dims)]
        for c in reversed(channels):
            dec.append(Up(c_prev, factor, dims))
            for _ in range(res_blocks):
                dec.append(ResBlock(c_prev, c, groups, dims))
                c_prev = c
        dec += [nn.GroupNorm(math.gcd(groups, c_prev), c_prev), nn.SiLU(), conv(c_prev, in_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, *S)`` -> posterior ``(mean, logvar)``, each ``(B, z, *S / downsample)``; logvar clamped."""
        if x.dim() != self.dims + 2 or any(s % self.downsample for s in x.shape[2:]):
            raise ValueError(f"conv_vae: expected (B, C, *S) with S divisible by {self.downsample}; got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """``(B, z, *S')`` -> ``(B, C, *S' x downsample)`` (not clamped)."""
        return self.decoder(z)

    def conv_macs(self, full_size: int) -> float:
        """Multiply-accumulates of encoder + decoder for one sample with ``full_size`` data positions."""
        total, div = 0.0, 1
        for m in self.encoder:                      # resolution drops after each strided conv
            total += _macs(m, full_size / div ** self.dims)
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.stride[0] > 1:
                div *= self.factor
        for m in self.decoder:
            if isinstance(m, Up):
                div //= self.factor
            total += _macs(m, full_size / div ** self.dims)
        return total


def _macs(m: nn.Module, positions: float) -> float:
    """Conv MACs of ``m`` (and its sub-convs) at ``positions`` output positions per sample."""
    out = 0.0
    for c in m.modules():
        if isinstance(c, (nn.Conv1d, nn.Conv2d)):
            stride = c.stride[0] ** len(c.stride)
            out += c.weight.numel() * positions / stride
    return out


# -------------------------------------------------------------------------------------------- backbone
class _VAEParamsBase(ZooParams):
    channels: list[int] = Field([32, 64], min_length=1, description="Width of each level; each level "
                                                                    "downsamples by `factor`.")
    latent_channels: int = Field(4, gt=0, description="Latent channels z (the flow model's C).")
    res_blocks: int = Field(1, ge=1, description="Residual blocks per level (encoder and decoder).")
    factor: int = Field(2, ge=2, description="Downsampling per level (even); downsample = factor ** levels.")
    groups: int = Field(8, gt=0, description="GroupNorm groups (gcd with each width).")

    dims: ClassVar[int] = 2

    @model_validator(mode="after")
    def _check(self) -> "_VAEParamsBase":
        if self.factor % 2:
            raise ValueError(f"factor must be even; got {self.factor}")
        if any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must be positive; got {self.channels}")
        return self

    @property
    def downsample(self) -> int:
        """Data positions per latent position along each axis: ``factor ** len(channels)``."""
        return self.factor ** len(self.channels)

    @property
    def patch(self) -> int:
        """The modality's patch: the downsample, so tokens and latent positions coincide."""
        return self.downsample

    def problems(self, spec: Any) -> Iterator[tuple[str, str]]:
        """Trains on data space: identity autoencoder, one stream of ``(C, *S)``, S divisible by downsample."""
        if spec.autoencoder.type != "identity":
            yield Root("autoencoder.type"), f"backbone {self.type!r} is trained on the data itself: use autoencoder identity"
        shape = spec.data.sample_shape()
        if isinstance(shape, dict) or len(tuple(shape)) != self.dims + 1:
            what = "images (C, H, W)" if self.dims == 2 else "mono audio (1, L) (one stream)"
            yield Root("data"), f"backbone {self.type!r} needs {what}; the data give {shape}"
            return
        bad = [s for s in tuple(shape)[1:] if int(s) % self.downsample]
        if bad:
            yield "channels", (f"downsample {self.downsample} (factor {self.factor} ** {len(self.channels)} "
                                        f"levels) does not divide the data size {tuple(shape)[1:]}")
        mp = getattr(spec.modality, "patch", None)
        if mp is not None and mp != self.downsample:
            yield Root("modality.patch"), f"leave it null: backbone {self.type!r} uses its downsample {self.downsample}"


class ConvVAEParams(_VAEParamsBase):
    """2-D convolutional VAE on images."""

    type: Literal["conv_vae"] = Field(..., description="Convolutional VAE on images (C, H, W); objective autoencoder.")
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {"channels": [8], "latent_channels": 2, "groups": 4}}


class ConvVAE1dParams(_VAEParamsBase):
    """1-D convolutional VAE on mono audio."""

    type: Literal["conv_vae_1d"] = Field(..., description="Convolutional VAE on mono audio (1, L); objective "
                                                          "autoencoder.")
    factor: int = Field(4, ge=2, description="Downsampling per level (even); downsample = factor ** levels.")
    dims: ClassVar[int] = 1
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {"channels": [8], "latent_channels": 2, "groups": 4,
                                                             "factor": 2}}


class _ConvVAEBackbone(TrainableAutoencoder):
    """The VAE trained by objective ``autoencoder`` (:class:`TrainableAutoencoder`). deps: ``token_dim = C *
    f**dims`` and ``grid`` = latent grid (data size / f; the 1-D network flattens a multi-axis grid into one time
    axis) give the data channels ``C``; ``hidden`` = latent channels ``z``.

    ``encode_moments(x (B, C, *S)) -> (mean, logvar)`` each ``(B, z, *S / f)``; ``decode(z) -> (B, C, *S)``.
    """

    def __init__(self, params: _VAEParamsBase, *, token_dim: int, grid: tuple[int, ...], **deps: Any):
        super().__init__()
        f, d = params.downsample, params.dims
        if d == 1:  # a 1-D network reads any token grid as one time axis (row-major)
            grid = (math.prod(int(g) for g in grid),)
        if len(grid) != d or token_dim % f ** d:
            raise ValueError(f"{params.type}: needs a {d}-D token grid with token_dim divisible by {f ** d} "
                             f"(patch = downsample {f}); got grid {tuple(grid)}, token_dim {token_dim}")
        self.params, self.dims, self.patch = params, d, f
        self.in_channels = token_dim // f ** d
        self.hidden = params.latent_channels
        self.net = ConvVAENet(self.in_channels, list(params.channels), params.latent_channels, params.res_blocks,
                              params.factor, params.groups, d)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.encode_moments(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.net.decode(z)

    def flops(self, num_tokens: int) -> float:
        """Encoder + decoder forward FLOPs for one sample of ``num_tokens`` tokens (convs only)."""
        return 2.0 * self.net.conv_macs(int(num_tokens) * self.patch ** self.dims)


@BACKBONES.register
class ConvVAE(_ConvVAEBackbone):
    """Backbone ``conv_vae``: images ``(B, C, H, W)``."""

    Params = ConvVAEParams


@BACKBONES.register
class ConvVAE1d(_ConvVAEBackbone):
    """Backbone ``conv_vae_1d``: mono audio ``(B, 1, L)``."""

    Params = ConvVAE1dParams


# ----------------------------------------------------------------------------------- trained run loader
@lru_cache(maxsize=32)
def _run_info(ck_dir: str, mtime_ns: int) -> tuple[dict, Any, tuple[int, ...]]:
    """``(raw resolved spec, backbone params, AE training sample shape)`` of a checkpoint directory."""
    from registry.kinds import DATASETS

    raw = json.loads((Path(ck_dir) / "spec.resolved.json").read_text())
    bb = raw.get("backbone", {})
    if bb.get("type") not in ("conv_vae", "conv_vae_1d"):
        raise ValueError(f"{ck_dir} is a {bb.get('type')!r} run, not a conv_vae / conv_vae_1d autoencoder run")
    params = BACKBONES.get(bb["type"]).Params.model_validate(bb)
    shape = DATASETS.get(raw["data"]["type"]).Params.model_validate(raw["data"]).sample_shape()
    return raw, params, tuple(int(s) for s in shape)


def run_info(run: str) -> tuple[Path, dict, Any, tuple[int, ...]]:
    """``(checkpoint dir, raw spec, backbone params, sample shape)``; FileNotFoundError / ValueError."""
    ck = find_checkpoint(Path(run))
    return (ck, *_run_info(str(ck), (ck / "spec.resolved.json").stat().st_mtime_ns))


class _VAEAutoencoderParams(AutoencoderParams):
    run: str = Field(..., description="Run directory (its newest checkpoint) or checkpoint directory of a trained "
                                      "conv VAE; the resolved spec pins the checkpoint directory.")
    weights: Literal["ema", "model"] = Field("ema", description="Which weights of the checkpoint to load.")
    stats_samples: int = Field(2048, gt=0, description="Training samples whose posterior means give the per-channel "
                                                       "latent mean/std (cached in <checkpoint>/latent_stats.json).")

    backbone_type: ClassVar[str] = "conv_vae"
    train_spec: ClassVar[str] = "specs/vae_digits.json"

    @field_validator("run")
    @classmethod
    def _trained(cls, v: str, info: ValidationInfo) -> str:
        try:
            _, _, params, _ = run_info(v)
        except FileNotFoundError:
            raise ValueError(f"no trained autoencoder at {v!r}: train it first with `python -m runtime.run "
                             f"{cls.train_spec}` (or name a run / checkpoint directory)") from None
        if params.type != cls.backbone_type:
            raise ValueError(f"{v!r} trained a {params.type!r} network; autoencoder {info.data.get('type', '?')!r} "
                             f"needs a {cls.backbone_type!r} run")
        return v

    def resolve(self, spec: Any) -> "_VAEAutoencoderParams":
        """Pin ``run`` to the checkpoint directory in use (a later checkpoint never silently replaces it)."""
        return self.model_copy(update={"run": str(run_info(self.run)[0])})

    def latent_shape(self, input_shape: Any) -> tuple[int, ...]:
        """``(C, *S)`` -> ``(z, *S / downsample)`` (sizes floored; :meth:`problems` reports what does not fit)."""
        _, _, p, _ = run_info(self.run)
        shape = tuple(int(s) for s in (input_shape if not isinstance(input_shape, dict) else ()))
        return (p.latent_channels, *(s // p.downsample for s in shape[1:]))

    def time_stride(self, input_shape: Any) -> int:
        """Input samples per latent step (1-D): the downsample."""
        return run_info(self.run)[2].downsample

    def input_problems(self, input_shape: Any, spec: Any) -> Iterator[tuple[str, str]]:
        """Samples like the ones it was trained on, sizes divisible by its downsample."""
        _, _, p, trained = run_info(self.run)
        shape = input_shape
        if isinstance(shape, dict) or len(tuple(shape)) != len(trained) or int(tuple(shape)[0]) != trained[0]:
            yield "run", f"the autoencoder was trained on samples {trained}; the data give {shape}"
            return
        bad = [int(s) for s in tuple(shape)[1:] if int(s) % p.downsample]
        if bad:
            yield "run", f"its downsample {p.downsample} does not divide the data size {tuple(shape)[1:]}"


class ConvVAEAutoencoderParams(_VAEAutoencoderParams):
    """A trained ``conv_vae`` run as the frozen image autoencoder."""

    type: Literal["conv_vae"] = Field(..., description="A conv_vae trained in-project (specs/vae_digits.json).")


class ConvVAE1dAutoencoderParams(_VAEAutoencoderParams):
    """A trained ``conv_vae_1d`` run as the frozen audio autoencoder."""

    type: Literal["conv_vae_1d"] = Field(..., description="A conv_vae_1d trained in-project (specs/vae_audio.json).")
    backbone_type: ClassVar[str] = "conv_vae_1d"
    train_spec: ClassVar[str] = "specs/vae_audio.json"


class FrozenVAE(AutoencoderModule):
    """A frozen VAE ``net`` (``encode_moments`` / ``decode``) with a per-channel latent normalisation: ``encode``
    ``(B, C, *S)`` -> normalised posterior mean ``(B, z, *S')``, ``decode`` the inverse; ``moments`` /
    ``decode_raw`` / ``published_stats`` in raw units (:mod:`zoo.autoencoders.base`). Subclasses build ``net``
    and call :meth:`set_stats`."""

    net: nn.Module

    def set_stats(self, mean: list[float], std: list[float]) -> None:
        """The raw latent's per-channel ``mean`` and ``std`` ``(z,)`` (non-persistent buffers)."""
        self.register_buffer("shift", torch.tensor(mean).float(), persistent=False)
        self.register_buffer("std", torch.tensor(std).float(), persistent=False)

    def published_stats(self) -> tuple[list[float], list[float]]:
        return self.shift.tolist(), self.std.tolist()

    def _view(self, v: Tensor, z: Tensor) -> Tensor:
        return v.to(z).view(1, -1, *([1] * (z.dim() - 2)))

    # -- raw interface
    @torch.no_grad()
    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, *S)`` -> raw posterior ``(mean, logvar)`` ``(B, z, *S / f)``."""
        return self.net.encode_moments(x.float())

    @torch.no_grad()
    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latent ``(B, z, *S')`` -> data ``(B, C, *S' f)``."""
        return self.net.decode(z.float())

    # -- normalised interface
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        mean, _ = self.moments(x)
        return (mean - self._view(self.shift, mean)) / self._view(self.std, mean)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.decode_raw(z.float() * self._view(self.std, z) + self._view(self.shift, z))


class _VAEAutoencoder(FrozenVAE):
    """Frozen trained ``conv_vae`` / ``conv_vae_1d`` run (:class:`FrozenVAE`), its statistics measured once and
    cached beside the checkpoint."""

    def __init__(self, params: _VAEAutoencoderParams):
        super().__init__()
        ck, raw, bp, shape = run_info(params.run)
        self.params, self.checkpoint = params, ck
        f, d = bp.downsample, bp.dims
        grid = tuple(s // f for s in shape[1:])
        self.net = BACKBONES.build(bp, token_dim=shape[0] * f ** d, grid=grid, num_classes=0)
        _, weights, is_ema = load_weights(ck, prefer_ema=params.weights == "ema")
        if params.weights == "ema" and not is_ema:
            raise FileNotFoundError(f"{ck}: no EMA weights (ema.safetensors); use autoencoder.weights = \"model\"")
        if not is_ema:
            weights = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
        self.net.load_state_dict(weights)
        self.eval().requires_grad_(False)
        self.step = _step(ck)
        self.set_stats(*self._stats(raw))

    # -- statistics
    def _stats(self, raw: dict) -> tuple[list[float], list[float]]:
        path = self.checkpoint / "latent_stats.json"
        key = f"{self.params.weights}:{self.params.stats_samples}"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        entry = cached.get(key) if cached.get("step") == self.step else None
        if entry is None:
            entry = dict(zip(("mean", "std"), compute_latent_stats(self.net, raw, self.params.stats_samples)))
            cached = {"step": self.step, **(cached if cached.get("step") == self.step else {}), key: entry}
            _atomic_write(path, cached)
        return list(entry["mean"]), list(entry["std"])


def _step(ck: Path) -> int:
    s = step_of(ck)
    return int(s) if s is not None else -1


@torch.no_grad()
def compute_latent_stats(net: nn.Module, raw_spec: dict, n: int, batch: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (population) of the posterior means of the first ``n`` training samples of
    the AE run's data: ``(z,)`` lists."""
    from registry.kinds import DATASETS

    data = DATASETS.build(DATASETS.get(raw_spec["data"]["type"]).Params.model_validate(raw_spec["data"]), split="train")
    n = min(n, len(data))
    dev = next(net.parameters()).device
    s1 = s2 = None
    count = 0
    for i in range(0, n, batch):
        x = torch.stack([data[j][0] for j in range(i, min(i + batch, n))]).to(dev)
        m = net.encode_moments(x)[0].double().transpose(0, 1).flatten(1)      # (z, b * positions)
        s1 = m.sum(1) if s1 is None else s1 + m.sum(1)
        s2 = m.square().sum(1) if s2 is None else s2 + m.square().sum(1)
        count += m.shape[1]
    mean = s1 / count
    std = (s2 / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _atomic_write(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file in the same directory (no torn reads); a read-only
    checkpoint directory is left alone (the statistics are then recomputed when next needed)."""
    try:
        write_json_atomic(path, obj)
    except OSError:
        return


@AUTOENCODERS.register
class ConvVAEAutoencoder(_VAEAutoencoder):
    """Autoencoder ``conv_vae``: images."""

    Params = ConvVAEAutoencoderParams


@AUTOENCODERS.register
class ConvVAE1dAutoencoder(_VAEAutoencoder):
    """Autoencoder ``conv_vae_1d``: mono audio."""

    Params = ConvVAE1dAutoencoderParams
