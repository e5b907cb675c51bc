"""Params base classes for components; they live in :mod:`registry.params` so that the registry can be
imported without importing the zoo first."""
from registry.params import Settings, ZooParams

__all__ = ["Settings", "ZooParams"]
