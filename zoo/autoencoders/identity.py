"""Autoencoder ``identity``: pixel space (or pre-extracted latents) as the latent; ``encode`` and
``decode`` return their input unchanged, ``(B, *shape)`` -> ``(B, *shape)``."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from registry.kinds import AUTOENCODERS
from zoo.core.params import AutoencoderParams
from zoo.autoencoders.base import AutoencoderModule


class IdentityAutoencoderParams(AutoencoderParams):
    """No autoencoder: the data sample is the latent."""

    type: Literal["identity"] = Field(..., description="Pass-through: latent = input (pixel space, tests).")

    def latent_shape(self, input_shape: Any) -> Any:
        """The latent shape of one sample: the input shape itself (a dict of shapes for multi-stream data)."""
        if isinstance(input_shape, dict):
            return {k: tuple(v) for k, v in input_shape.items()}
        return tuple(input_shape)


@AUTOENCODERS.register
class IdentityAutoencoder(AutoencoderModule):
    """Frozen pass-through; no weights."""

    Params = IdentityAutoencoderParams

    def __init__(self, params: IdentityAutoencoderParams):
        super().__init__()
        self.params = params

    def encode(self, x: Tensor) -> Tensor:
        """``(B, *input_shape)`` -> the same tensor."""
        return x

    def decode(self, z: Tensor) -> Tensor:
        """``(B, *latent_shape)`` -> the same tensor."""
        return z
