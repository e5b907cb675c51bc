"""What every autoencoder offers beyond ``encode``/``decode``, with fallbacks for entries that do not define it.

Raw units are the autoencoder's native latent, before its own normalisation: for an entry with published
constants ``shift`` and ``scale``, ``encode(x) == (moments(x)[0] - shift) * scale`` (posterior mean) and
``decode(z) == decode_raw(z / scale + shift)``. Latent caches store raw moments and normalise them with the
statistics of their manifest; weight-free entries (identity, STFT, ...) have raw == normalised.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def moments(ae: nn.Module, x: Any) -> tuple[Any, Any]:
    """Raw posterior ``(mean, logvar)`` of ``x`` (``(B, *latent_shape)`` each); ``logvar`` is None for
    deterministic autoencoders."""
    fn = getattr(ae, "moments", None)
    return fn(x) if fn is not None else (ae.encode(x), None)


def decode_raw(ae: nn.Module, z: Any) -> Any:
    """Decode a raw latent ``(B, *latent_shape)`` to data space."""
    fn = getattr(ae, "decode_raw", None)
    return fn(z) if fn is not None else ae.decode(z)


def published_stats(ae: nn.Module) -> tuple[Any, Any]:
    """The autoencoder's own normalisation as ``(mean, std)`` of its raw latent, i.e. ``(shift, 1 / scale)``
    (scalars or per-channel sequences); ``(0.0, 1.0)`` for entries whose raw latent is already normalised."""
    fn = getattr(ae, "published_stats", None)
    return fn() if fn is not None else (0.0, 1.0)
