"""Params base classes for components; they live in :mod:`registry.params` so that the registry can be
imported without importing the zoo first."""
from registry.params import Settings, StreamKeys, ZooParams

from typing import Any

__all__ = ["Settings", "StreamKeys", "ZooParams", "data_space"]


def data_space(data: Any) -> Any:
    """The params of the data a spec's samples come from: for a latent cache the data it encodes (its
    ``data_space()``), otherwise ``data`` itself. Metrics and teachers that read data-space samples check this."""
    fn = getattr(data, "data_space", None)
    return fn() if fn is not None else data
