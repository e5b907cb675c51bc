"""``sprite_vae``: a video autoencoder that writes a clip of one moving object as *what* (a content latent, the
same for the whole clip) and *where* (a 2-D position per frame), and renders the clip by translating one
decoded sprite — a layered, transformation-based decoder in the spirit of sprite video models
[Sprites-paper], with differentiable translation by resampling [STN-paper]. A flow model on this latent cannot
draw different shapes in different frames: the decoder has only one shape per clip.

For a clip ``x`` ``(B, C, T, H, W)`` in [-1, 1] (square frames, ``H == W``)::

    heat_t  = CNN(x_t)                      (B, 1, H, W)   per frame, shared weights (width / 2, no norm)
    p_t     = soft-argmax(heat_t)           (B, 2)         (x, y) in grid_sample's [-1, 1] units
    crop_t  = x_t sampled at grid + p_t     (B, C, H, W)   the frame re-centred on p_t (border padding)
    content = MLP(CNN(mean_t crop_t))       (B, 2 z)       posterior (mean, logvar) of the clip's content
    latent  = [content mean repeated over t ; p_t]          (B, z + 2, T, 1, 1)

    decode:  c = mean_t latent[:, :z]; sprite, alpha = Dec(c) (B, C, H, W), (B, 1, H, W); background = Lin(c)
             frame_t = bg + shift(alpha, p_t) * (shift(sprite, p_t) - bg),  shift = bilinear translation by p_t

The position channels get a fixed tiny posterior variance (``exp(POS_LOGVAR)``): positions are geometry, not a
code to regularise. Two entries share the network, as for ``clip_vae``: backbone ``sprite_vae`` (trained by
objective ``autoencoder`` on one video stream; modality ``video`` with ``patch = (1, H, W)``, so one token is
one frame) and autoencoder ``sprite_vae`` (the frozen network loaded from ``python -m
runtime.export_autoencoder RUN DIR``: config.json + model.safetensors, SHA-256 checked, no code executed).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import AUTOENCODERS, BACKBONES
from zoo.autoencoders.base import TrainableAutoencoder
from zoo.autoencoders.clip_vae import ExportedVAEParams, load_export, read_export
from zoo.autoencoders.conv_vae import LOGVAR_RANGE, FrozenVAE
from zoo.core.params import Root, ZooParams

POS_LOGVAR = -9.0
"""Fixed log-variance of the position channels' posterior (std ~0.011 in [-1, 1] units, about 0.1 px at 16 px)."""


def _translate(img: Tensor, pos: Tensor, padding: str) -> Tensor:
    """Sample ``img`` ``(N, C, H, W)`` at the identity grid shifted by ``pos`` ``(N, 2)`` ((x, y), [-1, 1] units):
    ``out(g) = img(g + pos)`` (bilinear, ``align_corners=False``)."""
    n = img.shape[0]
    theta = torch.zeros(n, 2, 3, dtype=img.dtype, device=img.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = pos.to(img.dtype)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _cnn(c_in: int, width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(c_in if i == 0 else width, width, 3, padding=1), nn.GroupNorm(math.gcd(8, width), width),
                   nn.SiLU()]
    return nn.Sequential(*layers)


class SpriteVAENet(nn.Module):
    """``encode_moments(x (B, C, T, S, S)) -> (mean, logvar)`` each ``(B, z + 2, T, 1, 1)``; ``decode(latent)
    -> (B, C, T, S, S)`` (not clamped)."""

    def __init__(self, in_channels: int, size: int, latent_channels: int, width: int, depth: int):
        super().__init__()
        self.c, self.size, self.z = in_channels, size, latent_channels
        lw = max(width // 2, 4)
        self.locator = nn.Sequential(nn.Conv2d(in_channels, lw, 5, padding=2), nn.SiLU(),
                                     *[m for _ in range(depth - 1) for m in (nn.Conv2d(lw, lw, 3, padding=1), nn.SiLU())],
                                     nn.Conv2d(lw, 1, 1))
        self.temperature = nn.Parameter(torch.tensor(0.0))  # log of the soft-argmax's inverse temperature
        flat = width * (size // 4) ** 2
        self.content = nn.Sequential(_cnn(in_channels, width, depth), nn.AvgPool2d(2), _cnn(width, width, 1),
                                     nn.AvgPool2d(2), nn.Flatten(), nn.Linear(flat, 4 * width), nn.SiLU(),
                                     nn.Linear(4 * width, 2 * latent_channels))
        self.expand = nn.Sequential(nn.Linear(latent_channels, 4 * width), nn.SiLU(), nn.Linear(4 * width, flat))
        self.painter = nn.Sequential(nn.Upsample(scale_factor=2), _cnn(width, width, 1), nn.Upsample(scale_factor=2),
                                     _cnn(width, width, depth), nn.Conv2d(width, in_channels + 1, 1))
        self.background = nn.Linear(latent_channels, in_channels)
        self.width = width
        s = torch.linspace(-1 + 1 / size, 1 - 1 / size, size)  # pixel centres, align_corners=False
        self.register_buffer("coords", s, persistent=False)

    @classmethod
    def from_token_dim(cls, params: "SpriteVAEParams", token_dim: int) -> "SpriteVAENet":
        """The network for frames of ``token_dim = C S S`` values (``C`` 1 or 3, ``S`` divisible by 4)."""
        for c in (1, 3):
            side = math.isqrt(token_dim // c)
            if c * side * side == token_dim and side % 4 == 0:
                return cls(c, side, params.latent_channels, params.width, params.depth)
        raise ValueError(f"sprite_vae: token_dim {token_dim} is not C * S * S for C in (1, 3) and S divisible by 4")

    def locate(self, frames: Tensor) -> Tensor:
        """``(N, C, S, S)`` -> soft-argmax position ``(N, 2)`` as (x, y) in [-1, 1] units."""
        heat = self.locator(frames).flatten(1) * self.temperature.exp()
        w = heat.softmax(-1).view(-1, self.size, self.size)
        c = self.coords.to(w.dtype)
        return torch.stack([(w.sum(1) * c).sum(-1), (w.sum(2) * c).sum(-1)], dim=-1)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, T, S, S)`` -> ``(mean, logvar)`` ``(B, z + 2, T, 1, 1)``; content channels repeat over T."""
        if x.dim() != 5 or x.shape[1] != self.c or x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"sprite_vae: expected (B, {self.c}, T, {self.size}, {self.size}); got {tuple(x.shape)}")
        b, c, t = x.shape[:3]
        frames = x.transpose(1, 2).reshape(b * t, c, self.size, self.size)
        pos = self.locate(frames)                                                     # (B T, 2)
        centred = _translate(frames, pos, "border").view(b, t, c, self.size, self.size).mean(1)
        mean_c, logvar_c = self.content(centred).chunk(2, dim=-1)                    # (B, z) each
        pos = pos.view(b, t, 2).transpose(1, 2)                                       # (B, 2, T)
        mean = torch.cat([mean_c[:, :, None].expand(-1, -1, t), pos], dim=1)
        logvar = torch.cat([logvar_c.clamp(*LOGVAR_RANGE)[:, :, None].expand(-1, -1, t),
                            torch.full_like(pos, POS_LOGVAR)], dim=1)
        return mean[..., None, None], logvar[..., None, None]

    def decode(self, z: Tensor) -> Tensor:
        """``(B, z + 2, T, 1, 1)`` -> ``(B, C, T, S, S)``: the mean content over frames, one sprite, moved."""
        b, _, t = z.shape[:3]
        z = z.flatten(2)
        content, pos = z[:, :self.z].mean(-1), z[:, self.z:]                       # (B, z), (B, 2, T)
        h = self.expand(content).view(b, self.width, self.size // 4, self.size // 4)
        out = self.painter(h)
        layers = torch.cat([torch.tanh(out[:, :self.c]), torch.sigmoid(out[:, self.c:])], dim=1)  # (B, C + 1, S, S)
        layers = layers[:, None].expand(-1, t, -1, -1, -1).reshape(b * t, self.c + 1, self.size, self.size)
        moved = _translate(layers, -pos.transpose(1, 2).reshape(b * t, 2), "zeros")
        sprite, alpha = moved[:, :self.c], moved[:, self.c:]
        bg = torch.tanh(self.background(content))[:, None].expand(-1, t, -1).reshape(b * t, self.c, 1, 1)
        frames = bg + alpha * (sprite - bg)
        return frames.view(b, t, self.c, self.size, self.size).transpose(1, 2)

    def conv_macs(self) -> float:
        """Multiply-accumulates of encoder + decoder for one frame (convs and linears; the content CNN and
        the painter counted once per frame, an upper bound)."""
        total = 0.0
        s2 = self.size ** 2
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                total += m.weight.numel() * s2
            elif isinstance(m, nn.Linear):
                total += m.weight.numel()
        return total


# -------------------------------------------------------------------------------------------- backbone
class SpriteVAEParams(ZooParams):
    """Sprite + per-frame position VAE on video clips of one moving object, trained with objective ``autoencoder``."""

    type: Literal["sprite_vae"] = Field(..., description="Video VAE: one content latent per clip (a sprite) + one "
                                                         "2-D position per frame; objective autoencoder.")
    latent_channels: int = Field(16, gt=0, description="Content latent size z (the latent has z + 2 channels).")
    width: int = Field(32, gt=0, description="Channels of the convolutions.")
    depth: int = Field(2, ge=1, description="3x3 conv layers of the locator and at full resolution.")

    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {"latent_channels": 4, "width": 8, "depth": 1}}

    @property
    def latent_dim(self) -> int:
        """Latent channels: content z + 2 position channels."""
        return self.latent_channels + 2

    def token_layout(self, sample_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """``(token_dim, grid)`` for clips ``(C, T, H, W)``: one token per frame, ``(C H W, (T, 1, 1))``."""
        c, t, h, w = sample_shape
        return c * h * w, (t, 1, 1)

    def problems(self, spec: Any) -> Iterator[tuple[str, str]]:
        """Trains on data space: identity autoencoder, one video stream of square frames, patch = (1, H, W)."""
        if spec.autoencoder.type != "identity":
            yield Root("autoencoder.type"), "backbone 'sprite_vae' is trained on the data itself: use autoencoder identity"
        shape = spec.data.sample_shape()
        if isinstance(shape, dict) or len(tuple(shape)) != 4:
            yield Root("data"), f"backbone 'sprite_vae' needs one video stream (C, T, H, W); the data give {shape}"
            return
        _, _, h, w = (int(s) for s in shape)
        if h != w or h % 4:
            yield Root("data"), f"backbone 'sprite_vae' needs square frames with a side divisible by 4; got {h}x{w}"
        if tuple(getattr(spec.modality, "patch", None) or ()) != (1, h, w):
            yield Root("modality.patch"), f"set it to [1, {h}, {w}] (one token per frame = one latent position)"


@BACKBONES.register
class SpriteVAE(TrainableAutoencoder):
    """The VAE trained by objective ``autoencoder`` (:class:`TrainableAutoencoder`). deps: ``token_dim = C H W``
    and ``grid = (T, 1, 1)``; ``hidden`` = latent channels ``z + 2``.

    ``encode_moments(x (B, C, T, H, W)) -> (mean, logvar)`` each ``(B, z + 2, T, 1, 1)``; ``decode`` the inverse.
    """

    Params = SpriteVAEParams

    def __init__(self, params: SpriteVAEParams, *, token_dim: int, grid: tuple[int, ...], **deps: Any):
        super().__init__()
        if len(grid) != 3 or tuple(grid[1:]) != (1, 1):
            raise ValueError(f"sprite_vae: needs the token grid (T, 1, 1) (modality patch (1, H, W)); got {tuple(grid)}")
        self.params = params
        self.hidden = params.latent_dim
        self.net = SpriteVAENet.from_token_dim(params, token_dim)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.encode_moments(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.net.decode(z)

    def flops(self, num_tokens: int) -> float:
        """Encoder + decoder forward FLOPs for one clip of ``num_tokens`` frames (an upper bound)."""
        return 2.0 * 2.0 * self.net.conv_macs() * int(num_tokens)


# ------------------------------------------------------------------------------ frozen exported network
class SpriteVAEAutoencoderParams(ExportedVAEParams):
    """An exported ``sprite_vae`` as the frozen video autoencoder."""

    backbone_params = SpriteVAEParams
    type: Literal["sprite_vae"] = Field(..., description="A trained sprite_vae exported with runtime.export_autoencoder.")

    def latent_shape(self, input_shape: Any) -> tuple[int, ...]:
        """``(C, T, H, W)`` -> ``(z + 2, T, 1, 1)``; ValueError when the shape is not the trained one."""
        cfg = self._cfg()
        shape = tuple(int(s) for s in input_shape)
        if shape != tuple(cfg["sample_shape"]):
            raise ValueError(f"sprite_vae {self.path} was trained on clips {tuple(cfg['sample_shape'])}; the data "
                             f"give {shape}")
        return (SpriteVAEParams.model_validate(cfg["backbone"]).latent_dim, shape[1], 1, 1)

    def time_stride(self, input_shape: Any) -> int:
        """One latent position per frame."""
        return 1


@AUTOENCODERS.register
class SpriteVAEAutoencoder(FrozenVAE):
    """Frozen exported sprite VAE (:class:`~zoo.autoencoders.conv_vae.FrozenVAE`): ``encode`` ``(B, C, T, H, W)``
    -> normalised posterior mean ``(B, z + 2, T, 1, 1)``, ``decode`` the inverse."""

    Params = SpriteVAEAutoencoderParams

    def __init__(self, params: SpriteVAEAutoencoderParams):
        super().__init__()
        cfg = read_export(params.path, SpriteVAEParams)
        bp = SpriteVAEParams.model_validate(cfg["backbone"])
        c, _, h, w = (int(s) for s in cfg["sample_shape"])
        self.params = params
        self.net = SpriteVAENet(c, h, bp.latent_channels, bp.width, bp.depth)
        load_export(self.net, params.path, cfg)
        self.eval().requires_grad_(False)
        self.set_stats(cfg["latent_mean"], cfg["latent_std"])
