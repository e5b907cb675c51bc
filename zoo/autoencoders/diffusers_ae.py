"""Autoencoder ``diffusers``: a pretrained diffusers autoencoder loaded from a LOCAL directory in
``save_pretrained`` layout (never from the network), used frozen.

Latents are normalised as ``z = (latent - shift) * scale`` (SD-VAE: scale 0.18215, shift 0) and decoded
with the inverse. ``diffusers`` is an optional dependency (``pip install fmzoo[diffusers]``), imported only
when the autoencoder is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import AUTOENCODERS
from zoo.core.params import ZooParams


class DiffusersAutoencoderParams(ZooParams):
    type: Literal["diffusers"]
    class_name: Literal["AutoencoderKL"] = Field(
        "AutoencoderKL", description="diffusers class (SD-VAE and FLUX-family image autoencoders).")
    path: str = Field(..., description="Local directory written by `save_pretrained` (config.json + weights).")
    scale: float = Field(0.18215, gt=0, description="Latent scale factor (SD-VAE: 0.18215, DiT/SiT/REPA).")
    shift: float = Field(0.0, description="Latent shift subtracted before scaling (SD-VAE: 0).")
    latent_channels: int = Field(4, gt=0, description="Channels of the latent (SD-VAE: 4); checked on load.")
    downsample: int = Field(8, gt=0, description="Spatial downsampling factor (SD-VAE: 8); checked on load.")
    sample_posterior: bool = Field(
        False, description="Encode to a posterior sample (REPA) instead of the posterior mean.")

    def latent_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        _, h, w = input_shape
        return (self.latent_channels, h // self.downsample, w // self.downsample)

    def problems(self, spec) -> Iterable[tuple[str, str]]:
        shape = spec.data.sample_shape()
        if len(shape) != 3 or shape[0] != 3:
            yield "autoencoder", f"{self.class_name} encodes RGB images (C=3, H, W); the data gives {tuple(shape)}"
        elif shape[1] % self.downsample or shape[2] % self.downsample:
            yield "autoencoder.downsample", f"data size {shape[1]}x{shape[2]} is not divisible by {self.downsample}"


@AUTOENCODERS.register
class DiffusersAutoencoder(nn.Module):
    """Frozen diffusers autoencoder. ``encode``: ``(B, 3, H, W)`` in [-1, 1] -> ``(B, C, H/d, W/d)``."""

    Params = DiffusersAutoencoderParams

    def __init__(self, params: DiffusersAutoencoderParams):
        super().__init__()
        self.params = params
        path = Path(params.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"autoencoder.path: expected a local {params.class_name} directory with config.json and "
                f"diffusion_pytorch_model.safetensors (written by save_pretrained) at {path}; nothing is downloaded")
        try:
            import diffusers
        except ImportError as e:
            raise ImportError("autoencoder type 'diffusers' needs `pip install fmzoo[diffusers]`") from e
        self.vae = getattr(diffusers, params.class_name).from_pretrained(str(path), local_files_only=True,
                                                                         low_cpu_mem_usage=False)
        cfg = self.vae.config
        down = 2 ** (len(cfg.block_out_channels) - 1)
        if cfg.latent_channels != params.latent_channels or down != params.downsample:
            raise ValueError(f"autoencoder: {path} has latent_channels={cfg.latent_channels}, downsample={down}; "
                             f"the spec says {params.latent_channels}, {params.downsample}")

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        dist = self.vae.encode(x).latent_dist
        z = dist.sample() if self.params.sample_posterior else dist.mean
        return (z - self.params.shift) * self.params.scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z / self.params.scale + self.params.shift).sample
