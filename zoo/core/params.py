"""Params base classes for components: :class:`ZooParams` (in :mod:`registry.params`, so that the registry can be
imported without the zoo) and one small base per kind that has optional hooks, declaring each hook once with
its default. Every registered params model of such a kind derives from its base (checked in
``tests/test_zoo_contracts.py``); ``hooks`` names what the misspelling check of :class:`ZooParams` guards."""
from __future__ import annotations

from typing import Any, ClassVar, Iterable

from pydantic import Field

from registry.errors import FieldError, Root
from registry.params import Settings, StreamKeys, ZooParams

__all__ = ["AutoencoderParams", "DataParams", "FieldError", "ModalityParams", "Root", "Settings", "StreamKeys",
           "TeacherParams", "ZooParams", "data_space"]

Shape = Any
"""One sample's shape: a tuple ``(C, *S)``, or a dict of such tuples by stream for multi-stream data."""


class DataParams(ZooParams):
    """Params of a ``data`` entry. Required: ``num_classes`` (field or property; 0 = unconditional) and
    :meth:`sample_shape`."""

    hooks: ClassVar[tuple[str, ...]] = ("sample_shape", "stream_rates", "data_space", "latent_cache")
    latent_cache: ClassVar[bool] = False
    """True for data whose samples are already normalised latents from a cache (``latent_shards``)."""

    num_workers: int = Field(0, ge=0, description="data-loader worker processes")

    def sample_shape(self) -> Shape:
        """The shape of one sample (what the autoencoder reads)."""
        raise NotImplementedError(f"{type(self).__name__} must define sample_shape()")

    def stream_rates(self) -> dict[str, float] | None:
        """Samples per second of each stream with a time axis (``{"video": fps, "audio": sample_rate}``); None for
        data without one (images)."""
        return None

    def data_space(self) -> "DataParams":
        """The params of the data the samples come from: for a latent cache the data it encodes, else ``self``.
        Metrics and teachers that read data-space samples check this."""
        return self


class ModalityParams(ZooParams):
    """Params of a ``modality`` entry."""

    hooks: ClassVar[tuple[str, ...]] = ("segment_names",)
    segment_names: ClassVar[tuple[str, ...]] = ()
    """The token segments (streams) it lays out, in order: keys of per-modality spec fields."""


class AutoencoderParams(ZooParams):
    """Params of an ``autoencoder`` entry. Required: :meth:`latent_shape`."""

    hooks: ClassVar[tuple[str, ...]] = ("latent_shape", "time_stride", "input_problems")

    def latent_shape(self, input_shape: Shape) -> Shape:
        """The latent shape for one data sample of ``input_shape`` (checked before anything is built)."""
        raise NotImplementedError(f"{type(self).__name__} must define latent_shape()")

    def time_stride(self, input_shape: Shape) -> Any:
        """Input samples per latent time step (per stream for dict shapes); 1 by default."""
        return 1

    def input_problems(self, input_shape: Shape, spec: Any) -> Iterable[tuple[str, str]]:
        """Why it cannot take samples of ``input_shape``: ``(path, message)`` pairs, paths relative to this
        component or a :class:`Root` (the spec checker passes the data's sample shape; ``streams`` passes each part
        its stream's). By default the ValueError of :meth:`latent_shape`, at the component itself."""
        try:
            self.latent_shape(input_shape)
        except ValueError as e:
            return [("", str(e))]
        return ()


class TeacherParams(ZooParams):
    """Params of a ``teacher`` entry: sizes and costs known before any weights load. Required: :attr:`feature_dim`
    and :meth:`feature_grid`."""

    hooks: ClassVar[tuple[str, ...]] = ("feature_dim", "feature_grid", "flops")

    @property
    def feature_dim(self) -> int:
        """F, the width of each patch feature."""
        raise NotImplementedError(f"{type(self).__name__} must define feature_dim")

    def feature_grid(self, input_shape: tuple[int, ...] | None = None,
                     token_grid: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The grid of the ``(B, M, F)`` patch features for one input of ``input_shape`` (``grid``: the generator's
        token grid, for encoders that resize to it)."""
        raise NotImplementedError(f"{type(self).__name__} must define feature_grid()")

    def flops(self, token_grid: tuple[int, ...] | None = None) -> float:
        """Forward FLOPs of one sample (counted by ``--dry-run`` and ``runtime.bench``); 0 when not declared."""
        return 0.0

