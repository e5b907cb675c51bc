"""Modality ``image``: latents ``(B, C, H, W)`` <-> patch tokens ``(B, N, P)``.

The latent is cut into ``p x p`` patches on an ``h x w = (H / p) x (W / p)`` grid; token ``i * w + j``
(row-major) holds patch ``(i, j)`` flattened in **(ph, pw, c) order** (channel fastest), so
``P = p * p * C``. This is DiT's ``unpatchify`` order, the one :mod:`zoo.backbones.sit` expects::

    tokens[b, i * w + j, (di * p + dj) * C + c] == z[b, c, i * p + di, j * p + dj]

Example::

    mod = ImageModality(ImageModalityParams(type="image"), backbone_patch=2, latent_shape=(4, 32, 32))
    tokens = mod.to_tokens(z)          # (B, 256, 16)
    z == mod.from_tokens(tokens)       # exact inverse
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator, Literal

from pydantic import Field
from torch import Tensor, nn

from registry.kinds import MODALITIES
from zoo.core.layout import TokenLayout
from zoo.core.params import ModalityParams, Root


class ImageModalityParams(ModalityParams):
    """Image latents ``(C, H, W)`` split into ``p x p`` patch tokens (p = ``backbone.patch``)."""

    type: Literal["image"] = Field(..., description="Image latents (C, H, W) as p x p patch tokens, (ph, pw, c) order.")
    patch: int | None = Field(None, gt=0, description="Patch size p; null = backbone.patch (backbones without one, "
                                                      "e.g. mmdit, need it here).")

    segment_names: ClassVar[tuple[str, ...]] = ("image",)

    @staticmethod
    def layout(latent_shape: tuple[int, ...], patch: int) -> tuple[tuple[int, int], int]:
        """``((h, w), P)`` for a latent ``(C, H, W)`` and patch ``p``: ``h = H / p``, ``w = W / p``,
        ``P = C * p * p``. Raises ValueError when the latent is not 3-D or not divisible by ``p``."""
        if len(latent_shape) != 3:
            raise ValueError(f"modality 'image' needs a 3-D latent (C, H, W); got {tuple(latent_shape)}")
        c, h, w = (int(s) for s in latent_shape)
        if patch <= 0 or h % patch or w % patch:
            raise ValueError(f"latent height/width {h}x{w} is not divisible by patch {patch}")
        return (h // patch, w // patch), c * patch * patch

    def problems(self, spec: Any) -> Iterator[tuple[str, str]]:
        """Spec checks before any tensor exists: a 3-D latent whose H and W the backbone patch divides."""
        try:
            latent = tuple(spec.autoencoder.latent_shape(spec.data.sample_shape()))
        except ValueError as e:
            yield Root("autoencoder"), str(e)  # data the autoencoder cannot take (wrong rank, several streams)
            return
        if len(latent) != 3:
            yield Root("data"), f"modality 'image' needs a 3-D latent (C, H, W); the data/autoencoder give {latent}"
            return
        patch = self.patch or getattr(spec.backbone, "patch", None)
        if patch is None:
            yield "patch", f"backbone {spec.backbone.type!r} has no patch size; set modality.patch"
        elif latent[1] % patch or latent[2] % patch:
            yield ("patch" if self.patch else Root("backbone.patch"),
                   f"patch {patch} does not divide the latent height/width {latent[1]}x{latent[2]} (latent {latent})")


@MODALITIES.register
class ImageModality(nn.Module):
    """Patchify / unpatchify (no weights).

    Args:
        params: :class:`ImageModalityParams`.
        backbone_patch: ``p`` when the params give none (the backbone's patch size).
        latent_shape: ``(C, H, W)``.

    Attributes: ``token_dim`` ``P = C p^2``, ``grid`` ``(H / p, W / p)``, ``num_tokens`` ``N``, ``layout``.
    """

    Params = ImageModalityParams

    def __init__(self, params: ImageModalityParams, *, latent_shape: tuple[int, ...], backbone_patch: int | None = None,
                 **deps: Any):
        super().__init__()
        patch = params.patch or backbone_patch
        if patch is None:
            raise ValueError("modality 'image' needs a patch size: modality.patch or the backbone's")
        self.params = params
        self.grid, self.token_dim = params.layout(latent_shape, patch)
        self.patch = int(patch)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.layout = TokenLayout.single("image", self.grid, self.token_dim)  # time 0, (row, column) per token

    def to_tokens(self, z: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, N, P)``."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected latents (B, {', '.join(map(str, self.latent_shape))}); got {tuple(z.shape)}")
        b, c = z.shape[:2]
        (h, w), p = self.grid, self.patch
        z = z.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)               # (B, h, w, p, p, C)
        return z.reshape(b, h * w, self.token_dim)

    def from_tokens(self, tokens: Tensor) -> Tensor:
        """``(B, N, P)`` -> ``(B, C, H, W)``; the exact inverse of :meth:`to_tokens`."""
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ValueError(f"expected tokens (B, {self.num_tokens}, {self.token_dim}); got {tuple(tokens.shape)}")
        b = tokens.shape[0]
        (h, w), p, c = self.grid, self.patch, self.latent_shape[0]
        x = tokens.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)           # (B, C, h, p, w, p)
        return x.reshape(b, c, h * p, w * p)

    def extra_repr(self) -> str:
        return f"patch={self.patch}, latent_shape={self.latent_shape}, grid={self.grid}, token_dim={self.token_dim}"
