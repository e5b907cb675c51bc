"""``clip_vae``: a 3-D convolutional VAE that folds a short video clip ``(C, T, H, W)`` into a small latent
``(z, T / dt, H / dh, W / dw)`` — with ``dt = T`` the whole clip's time goes into the channels, so one latent
position describes its patch of the frame over the entire clip and a flow model on the latent cannot draw
different shapes in different frames (the decoder renders the motion).

Network (GroupNorm + SiLU 3-D residual blocks, no attention); level ``i`` has a stride ``s_i`` (time, height,
width) and a width ``c_i``::

    encoder: per level: Conv3d(kernel = stride = s_i, -> c_i), res_blocks x ResBlock(c_i);
             mid_blocks x ResBlock; GroupNorm, SiLU, 1x1x1 conv (-> 2 z)           = posterior (mean, logvar)
    decoder: 1x1x1 conv (z -> c_last), mid_blocks x ResBlock; per level (reversed): res_blocks x ResBlock(c_i),
             [GroupNorm, SiLU on the last] ConvTranspose3d(kernel = stride = s_i, -> c_{i-1} or C)

``downsample = prod_i s_i`` per axis. Two entries share the network:

* backbone ``clip_vae`` — trained by objective ``autoencoder`` on one video stream (``autoencoder: identity``,
  modality ``video`` whose ``patch`` is the downsample, so tokens and latent positions coincide);
* autoencoder ``clip_vae`` — the frozen network for flow specs, loaded from an exported directory
  (``python -m runtime.export_autoencoder RUN DIR``): ``config.json`` (the architecture, the sample shape it was
  trained on, the per-channel latent mean/std, the SHA-256 of the weights) and ``model.safetensors``. Nothing in
  it executes code; a weights file whose hash differs from the config's is refused.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_file
from torch import Tensor, nn

from registry.kinds import AUTOENCODERS, BACKBONES
from storage.safe_state import sha256_file
from zoo.autoencoders.base import TrainableAutoencoder
from zoo.autoencoders.conv_vae import LOGVAR_RANGE, FrozenVAE, ResBlock
from zoo.core.params import AutoencoderParams, Root, ZooParams

CONFIG, WEIGHTS = "config.json", "model.safetensors"


class ClipVAENet(nn.Module):
    """``encode_moments(x (B, C, T, H, W)) -> (mean, logvar)`` each ``(B, z, T/dt, H/dh, W/dw)``;
    ``decode(z) -> (B, C, T, H, W)`` (not clamped)."""

    def __init__(self, in_channels: int, strides: list[tuple[int, int, int]], channels: list[int],
                 latent_channels: int, res_blocks: int, mid_blocks: int, groups: int):
        super().__init__()
        self.downsample = tuple(math.prod(s[a] for s in strides) for a in range(3))
        enc: list[nn.Module] = []
        c_prev = in_channels
        for s, c in zip(strides, channels):
            enc.append(nn.Conv3d(c_prev, c, s, stride=s))
            enc += [ResBlock(c, c, groups, 3) for _ in range(res_blocks)]
            c_prev = c
        enc += [ResBlock(c_prev, c_prev, groups, 3) for _ in range(mid_blocks)]
        enc += [nn.GroupNorm(math.gcd(groups, c_prev), c_prev), nn.SiLU(), nn.Conv3d(c_prev, 2 * latent_channels, 1)]
        dec: list[nn.Module] = [nn.Conv3d(latent_channels, c_prev, 1)]
        dec += [ResBlock(c_prev, c_prev, groups, 3) for _ in range(mid_blocks)]
        for i in reversed(range(len(strides))):
            c = channels[i]
            dec += [ResBlock(c, c, groups, 3) for _ in range(res_blocks)]
            c_out = channels[i - 1] if i > 0 else in_channels
            if i == 0:
                dec += [nn.GroupNorm(math.gcd(groups, c), c), nn.SiLU()]
            dec.append(nn.ConvTranspose3d(c, c_out, strides[i], stride=strides[i]))
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    @classmethod
    def from_params(cls, params: "ClipVAEParams", in_channels: int) -> "ClipVAENet":
        """The network a ``clip_vae`` backbone's params describe, for clips of ``in_channels`` channels."""
        return cls(in_channels, [tuple(s) for s in params.strides], list(params.channels), params.latent_channels,
                   params.res_blocks, params.mid_blocks, params.groups)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, T, H, W)`` -> posterior ``(mean, logvar)``; logvar clamped to a safe range."""
        if x.dim() != 5 or any(s % d for s, d in zip(x.shape[2:], self.downsample)):
            raise ValueError(f"clip_vae: expected (B, C, T, H, W) with (T, H, W) divisible by {self.downsample}; "
                             f"got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """``(B, z, T', H', W')`` -> ``(B, C, T' dt, H' dh, W' dw)``."""
        return self.decoder(z)

    def conv_macs(self, data_positions: float) -> float:
        """Multiply-accumulates of encoder + decoder for one clip of ``data_positions`` = T H W positions."""
        total, pos = 0.0, float(data_positions)
        for m in self.encoder:
            if isinstance(m, nn.Conv3d) and m.stride != (1, 1, 1):
                pos /= math.prod(m.stride)
            total += sum(c.weight.numel() for c in m.modules() if isinstance(c, nn.Conv3d)) * pos
        for m in self.decoder:
            total += sum(c.weight.numel() for c in m.modules() if isinstance(c, (nn.Conv3d, nn.ConvTranspose3d))) * pos
            if isinstance(m, nn.ConvTranspose3d):
                pos *= math.prod(m.stride)
        return total


# -------------------------------------------------------------------------------------------- backbone
class ClipVAEParams(ZooParams):
    """3-D convolutional VAE on video clips, trained with objective ``autoencoder``."""

    type: Literal["clip_vae"] = Field(..., description="3-D conv VAE folding a video clip (C, T, H, W) into a small "
                                                       "latent; objective autoencoder.")
    strides: list[tuple[int, int, int]] = Field(
        [(2, 2, 2), (1, 2, 2), (4, 1, 1)], min_length=1,
        description="Per level (time, height, width) stride of its down/up convolution; downsample = product.")
    channels: list[int] = Field([32, 64, 64], min_length=1, description="Width of each level.")
    latent_channels: int = Field(16, gt=0, description="Latent channels z (the flow model's C).")
    res_blocks: int = Field(1, ge=0, description="Residual blocks per level (encoder and decoder).")
    mid_blocks: int = Field(1, ge=0, description="Residual blocks at the latent resolution (encoder and decoder).")
    groups: int = Field(8, gt=0, description="GroupNorm groups (gcd with each width).")

    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {"strides": [(2, 2, 2)], "channels": [8],
                                                             "latent_channels": 2, "groups": 4}}

    @model_validator(mode="after")
    def _check(self) -> "ClipVAEParams":
        if len(self.strides) != len(self.channels):
            raise ValueError(f"strides has {len(self.strides)} levels, channels {len(self.channels)}: give one "
                             f"width per level")
        if any(s <= 0 for st in self.strides for s in st) or any(c <= 0 for c in self.channels):
            raise ValueError(f"strides and channels must be positive; got {self.strides}, {self.channels}")
        return self

    @property
    def downsample(self) -> tuple[int, int, int]:
        """Data positions per latent position along (time, height, width)."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(3))

    @property
    def latent_dim(self) -> int:
        """Channels of the latent (the flow model's C)."""
        return self.latent_channels

    def token_layout(self, sample_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """``(token_dim, grid)`` of the backbone for clips ``(C, T, H, W)``: one token per latent position."""
        return sample_shape[0] * math.prod(self.downsample), tuple(s // d for s, d in zip(sample_shape[1:],
                                                                                          self.downsample))

    def problems(self, spec: Any) -> Iterator[tuple[str, str]]:
        """Trains on data space: identity autoencoder, one video stream, sizes divisible, patch = downsample."""
        if spec.autoencoder.type != "identity":
            yield Root("autoencoder.type"), "backbone 'clip_vae' is trained on the data itself: use autoencoder identity"
        shape = spec.data.sample_shape()
        if isinstance(shape, dict) or len(tuple(shape)) != 4:
            yield Root("data"), f"backbone 'clip_vae' needs one video stream (C, T, H, W); the data give {shape}"
            return
        if any(int(s) % d for s, d in zip(tuple(shape)[1:], self.downsample)):
            yield "strides", f"downsample {self.downsample} does not divide the clip size {tuple(shape)[1:]}"
        if tuple(getattr(spec.modality, "patch", None) or ()) != self.downsample:
            yield Root("modality.patch"), f"set it to the downsample {list(self.downsample)} (tokens = latent positions)"


@BACKBONES.register
class ClipVAE(TrainableAutoencoder):
    """The VAE trained by objective ``autoencoder`` (:class:`TrainableAutoencoder`). deps: ``token_dim = C dt dh
    dw`` and ``grid`` = latent grid ``(T', H', W')`` give the data channels ``C``; ``hidden`` = latent channels.

    ``encode_moments(x (B, C, T, H, W)) -> (mean, logvar)`` each ``(B, z, T', H', W')``; ``decode(z) -> (B, C, T,
    H, W)``.
    """

    Params = ClipVAEParams

    def __init__(self, params: ClipVAEParams, *, token_dim: int, grid: tuple[int, ...], **deps: Any):
        super().__init__()
        d = params.downsample
        if len(grid) != 3 or token_dim % math.prod(d):
            raise ValueError(f"clip_vae: needs a 3-D token grid with token_dim divisible by {math.prod(d)}; got grid "
                             f"{tuple(grid)}, token_dim {token_dim}")
        self.params, self.patch = params, d
        self.in_channels = token_dim // math.prod(d)
        self.hidden = params.latent_channels
        self.net = ClipVAENet.from_params(params, self.in_channels)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.encode_moments(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.net.decode(z)

    def flops(self, num_tokens: int) -> float:
        """Encoder + decoder forward FLOPs for one clip of ``num_tokens`` latent positions (convs only)."""
        return 2.0 * self.net.conv_macs(int(num_tokens) * math.prod(self.patch))


# ------------------------------------------------------------------------------ frozen exported network
def read_export(path: str | Path, params_cls: type[ZooParams] | None = None) -> dict[str, Any]:
    """The ``config.json`` of an exported VAE directory (``clip_vae``, or the backbone whose params class is
    ``params_cls``), checked for the fields the loader needs; FileNotFoundError / ValueError naming the file and
    the field."""
    f = Path(path) / CONFIG
    if not f.is_file() or not (Path(path) / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: not an exported autoencoder (needs {CONFIG} and {WEIGHTS}; write one with "
                                f"`python -m runtime.export_autoencoder RUN {path}`)")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: unreadable JSON ({e})") from None
    for key in ("backbone", "sample_shape", "latent_mean", "latent_std", "sha256"):
        if key not in cfg:
            raise ValueError(f"{f}: missing field {key!r}")
    params_cls = params_cls or ClipVAEParams
    try:
        bp = params_cls.model_validate(cfg["backbone"])
    except ValueError as e:
        raise ValueError(f"{f}: field 'backbone' is not a {params_cls.__name__} ({str(e).splitlines()[0]})") from None
    z = bp.latent_dim
    for key in ("latent_mean", "latent_std"):
        if len(cfg[key]) != z:
            raise ValueError(f"{f}: {key} has {len(cfg[key])} values, the network has {z} latent channels")
    if any(s <= 0 for s in cfg["latent_std"]):
        raise ValueError(f"{f}: latent_std must be positive")
    return cfg


def load_export(net: nn.Module, path: str | Path, cfg: dict[str, Any]) -> None:
    """Load ``model.safetensors`` of the exported directory ``path`` into ``net`` after checking its SHA-256
    against ``cfg``; ValueError naming the file when the hash or the tensors do not match."""
    weights = Path(path) / WEIGHTS
    if sha256_file(weights) != cfg["sha256"]:
        raise ValueError(f"{weights}: SHA-256 differs from {CONFIG}'s (the file changed after export)")
    try:
        net.load_state_dict(load_file(weights))
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not match the architecture in {CONFIG} ({str(e).splitlines()[0]})") from None


class ExportedVAEParams(AutoencoderParams):
    """Base of the autoencoder entries that load a directory written by ``runtime.export_autoencoder``; a subclass
    sets ``type`` and ``backbone_params`` (the params class of the backbone that was trained)."""

    backbone_params: ClassVar[type[ZooParams]]
    path: str = Field(..., description="Exported directory (config.json + model.safetensors), relative to the "
                                       "working directory or absolute.")

    @field_validator("path")
    @classmethod
    def _exported(cls, v: str) -> str:
        try:
            read_export(v, cls.backbone_params)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        return v

    def _cfg(self) -> dict[str, Any]:
        return read_export(self.path, self.backbone_params)


class ClipVAEAutoencoderParams(ExportedVAEParams):
    """An exported ``clip_vae`` as the frozen video autoencoder."""

    backbone_params = ClipVAEParams
    type: Literal["clip_vae"] = Field(..., description="A trained clip_vae exported with runtime.export_autoencoder.")

    def latent_shape(self, input_shape: Any) -> tuple[int, ...]:
        """``(C, T, H, W)`` -> ``(z, T/dt, H/dh, W/dw)``; ValueError when the shape is not the trained one."""
        cfg = self._cfg()
        shape = tuple(int(s) for s in input_shape)
        if shape != tuple(cfg["sample_shape"]):
            raise ValueError(f"clip_vae {self.path} was trained on clips {tuple(cfg['sample_shape'])}; the data "
                             f"give {shape}")
        p = ClipVAEParams.model_validate(cfg["backbone"])
        return (p.latent_channels, *(s // d for s, d in zip(shape[1:], p.downsample)))

    def time_stride(self, input_shape: Any) -> int:
        """Frames per latent time step."""
        return ClipVAEParams.model_validate(self._cfg()["backbone"]).downsample[0]


@AUTOENCODERS.register
class ClipVAEAutoencoder(FrozenVAE):
    """Frozen exported VAE (:class:`~zoo.autoencoders.conv_vae.FrozenVAE`): ``encode`` ``(B, C, T, H, W)`` ->
    normalised posterior mean ``(B, z, T', H', W')``, ``decode`` the inverse."""

    Params = ClipVAEAutoencoderParams

    def __init__(self, params: ClipVAEAutoencoderParams):
        super().__init__()
        cfg = read_export(params.path)
        bp = ClipVAEParams.model_validate(cfg["backbone"])
        self.params = params
        self.net = ClipVAENet.from_params(bp, int(cfg["sample_shape"][0]))
        load_export(self.net, params.path, cfg)
        self.eval().requires_grad_(False)
        self.set_stats(cfg["latent_mean"], cfg["latent_std"])

