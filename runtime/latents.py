"""Latent helpers of the runtime: the autoencoder's published statistics as a cache's per-channel lists, and the
health check of one batch of training latents. The cache's on-disk format lives in :mod:`storage.latent_cache`."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from storage.latent_cache import leaves


def published_channel_stats(ae: nn.Module, latent_shape: Any) -> dict[str, Any]:
    """The autoencoder's own ``(shift, 1/scale)`` as per-channel lists (per stream for dict latents)."""
    def expand(v: Any, c: int) -> list[float]:
        v = v.tolist() if isinstance(v, Tensor) else v
        return [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * c

    def one(mod: nn.Module, shape: Any) -> dict[str, Any]:
        m, s = mod.published_stats()
        return {"mean": expand(m, shape[0]), "std": expand(s, shape[0])}

    if isinstance(latent_shape, dict):
        parts = getattr(ae, "parts", None)
        return {k: one(parts[k] if parts is not None and k in parts else ae, v) for k, v in latent_shape.items()}
    return one(ae, latent_shape)



def is_latent_data(data_params: Any) -> bool:
    """True when the data's samples are already (normalised) latents from a cache (``latent_shards``)."""
    return bool(data_params.latent_cache)


def latent_health(graph: Any, batch: Any) -> list[str]:
    """Warnings when one batch of training latents does not look normalised (overall std outside [0.2, 5] or a
    channel's |mean| > 2). ``batch``: a data pair ``(x, y)`` or a ``TokenBatch``; latents are taken after the
    frozen encoder / the cache's normalisation, i.e. exactly what the backbone learns."""
    from zoo.core.types import TokenBatch

    tokens = batch if isinstance(batch, TokenBatch) else graph.to_tokens(*batch)
    z = graph.modality.from_tokens(tokens.x0.float())
    out = []
    for name, v in leaves(z).items():
        c = v.shape[1]
        flat = v.detach().double().transpose(0, 1).reshape(c, -1)
        std, ch_mean = float(flat.std(unbiased=False)), flat.mean(1)
        worst = float(ch_mean.abs().max())
        if not (0.2 <= std <= 5.0) or worst > 2.0:
            where = f" ({name})" if name else ""
            out.append(f"latents look unnormalised{where}: std {std:.3g}, per-channel mean up to {worst:.3g} "
                       f"(expected std in [0.2, 5], |mean| <= 2); check autoencoder.scale/shift or the cache statistics")
    return out
