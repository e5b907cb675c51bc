"""What every autoencoder offers beyond ``encode``/``decode``: :class:`AutoencoderModule` declares the hooks once,
with the defaults of entries whose raw latent is already normalised. :class:`TrainableAutoencoder` is the contract
of the VAEs that objective ``autoencoder`` trains (registered as backbones, since they are the run's trained
network).

Raw units are the autoencoder's native latent, before its own normalisation: for an entry with published
constants ``shift`` and ``scale``, ``encode(x) == (moments(x)[0] - shift) * scale`` (posterior mean) and
``decode(z) == decode_raw(z / scale + shift)``. Latent caches store raw moments and normalise them with the
statistics of their manifest; weight-free entries (identity, STFT, ...) have raw == normalised.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class AutoencoderModule(nn.Module):
    """Base of every ``autoencoder`` entry (frozen). ``encode`` ``(B, *input_shape)`` -> ``(B, *latent_shape)``
    (normalised), ``decode`` the inverse; a dict of tensors by stream for multi-stream data."""

    def encode(self, x: Any) -> Any:
        raise NotImplementedError

    def decode(self, z: Any) -> Any:
        raise NotImplementedError

    def moments(self, x: Any) -> tuple[Any, Any]:
        """Raw posterior ``(mean, logvar)`` of ``x`` (``(B, *latent_shape)`` each); ``logvar`` is None for
        deterministic autoencoders (the default: ``(encode(x), None)``)."""
        return self.encode(x), None

    def decode_raw(self, z: Any) -> Any:
        """Decode a raw latent ``(B, *latent_shape)`` to data space (default: ``decode``)."""
        return self.decode(z)

    def published_stats(self) -> tuple[Any, Any]:
        """The autoencoder's own normalisation as ``(mean, std)`` of its raw latent, i.e. ``(shift, 1 / scale)``
        (scalars or per-channel sequences); ``(0.0, 1.0)`` by default (raw latent already normalised)."""
        return 0.0, 1.0


class TrainableAutoencoder(nn.Module):
    """Base of the VAEs trained by objective ``autoencoder`` (``conv_vae``, ``conv_vae_1d``, ``clip_vae``): what
    the objective, ``reconstruct`` and the runtime use of them, and nothing of the flow backbone protocol (no
    token ``forward``, no timesteps or labels).

    Built as a backbone (``cls(params, token_dim=..., grid=..., **deps)``: the modality's tokens are the latent
    positions, ``token_dim = C * prod(downsample)``) and then used on data only::

        encode_moments(x (B, C, *S)) -> (mean, logvar), each (B, z, *S / downsample)
        decode(z (B, z, *S / downsample)) -> (B, C, *S)
        flops(num_tokens) -> encoder + decoder forward FLOPs of one sample of num_tokens latent positions

    ``hidden`` (latent channels) and ``depth`` (1) are the objective deps the compiler passes to every objective.
    """

    hidden: int
    depth: int = 1

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must define encode_moments()")

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define decode()")

    def flops(self, num_tokens: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define flops()")
