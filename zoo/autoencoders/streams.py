"""Autoencoder ``streams``: one autoencoder per named stream of a multi-stream sample (audio + video).

``{"type": "streams", "parts": {"video": {"type": "identity"}, "audio": {"type": "stft"}}}`` encodes the dict
``{"video": (B, C, T, H, W), "audio": (B, 1, L)}`` stream by stream into a dict of latents and decodes it back.
Every stream of the data needs a part, and every part a stream.
"""
from __future__ import annotations

from typing import Annotated, Any, Iterator, Literal

from pydantic import Field
from torch import Tensor, nn

from registry.errors import under
from registry.kinds import AUTOENCODERS
from zoo.core.params import AutoencoderParams, StreamKeys
from zoo.autoencoders.base import AutoencoderModule


class StreamsParams(AutoencoderParams):
    """One autoencoder per stream."""

    type: Literal["streams"] = Field(..., description="A separate autoencoder per named stream (audio+video).")
    parts: Annotated[dict[str, "AutoencoderSpec"], StreamKeys()] = Field(  # noqa: F821 (resolved by registry.spec.rebuild)
        ..., min_length=1, description="Stream name -> its autoencoder, e.g. {\"video\": {...}, \"audio\": {...}}.")

    def _check_streams(self, input_shape: Any) -> dict:
        if not isinstance(input_shape, dict):
            raise ValueError(f"autoencoder 'streams' needs multi-stream data; the data give one stream {input_shape}")
        if set(input_shape) != set(self.parts):
            raise ValueError(f"autoencoder 'streams': parts {sorted(self.parts)} do not match the data streams "
                             f"{sorted(input_shape)}")
        return input_shape

    def latent_shape(self, input_shape: Any) -> dict[str, tuple[int, ...]]:
        shapes = self._check_streams(input_shape)
        return {k: tuple(self.parts[k].latent_shape(v)) for k, v in shapes.items()}

    def time_stride(self, input_shape: Any) -> dict[str, int]:
        shapes = self._check_streams(input_shape)
        return {k: int(self.parts[k].time_stride(v)) for k, v in shapes.items()}

    def input_problems(self, input_shape: Any, spec: Any) -> Iterator[tuple[str, str]]:
        """Parts match the data streams (a part named after no modality is the spec checker's
        ``unknown modality``); each part's own ``input_problems`` for its stream, under ``parts.<stream>``."""
        modalities = spec.modality.segment_names
        if isinstance(input_shape, dict) and any(k not in modalities for k in self.parts):
            return
        try:
            self._check_streams(input_shape)
        except ValueError as e:
            yield "parts", str(e)
            return
        for name, part in self.parts.items():
            yield from under(f"parts.{name}", part.input_problems(input_shape[name], spec))


@AUTOENCODERS.register
class Streams(AutoencoderModule):
    """``encode``/``decode`` map dicts of tensors stream by stream."""

    Params = StreamsParams

    def __init__(self, params: StreamsParams):
        super().__init__()
        self.params = params
        self.parts = nn.ModuleDict({k: AUTOENCODERS.build(p) for k, p in params.parts.items()})

    def _each(self, x: dict[str, Tensor], fn: str) -> dict[str, Tensor]:
        if not isinstance(x, dict) or set(x) != set(self.parts):
            got = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(f"autoencoder 'streams' expects a dict with streams {sorted(self.parts)}; got {got}")
        return {k: getattr(self.parts[k], fn)(v) for k, v in x.items()}

    def encode(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._each(x, "encode")

    def decode(self, z: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._each(z, "decode")
