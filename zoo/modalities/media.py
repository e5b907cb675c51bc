"""Modalities ``video``, ``audio`` and ``audio_video``: media latents <-> token sequences.

* ``video``: latent ``(C, T, H, W)`` cut into ``pt x ph x pw`` patches on a ``(T/pt, H/ph, W/pw)`` grid,
  tokens row-major over (time, row, column), values in **(dt, dh, dw, c) order** (channel fastest), so
  ``P = pt ph pw C``::

      tokens[b, (i * h + j) * w + k, ((dt * ph + dh) * pw + dw) * C + c] == z[b, c, i pt + dt, j ph + dh, k pw + dw]

* ``audio``: latent ``(C, L)`` (a waveform ``(1, L)`` or STFT frames ``(2F, frames)``) cut into patches of ``p``
  time steps, values in **(dl, c) order**; the time axis is zero-padded at the end to a multiple of ``p`` and
  cropped again by ``from_tokens`` (so media -> tokens -> media is the identity).
* ``audio_video``: one sequence, the video tokens first, then the audio tokens of the same clip; each
  segment keeps its own token dim and the shorter one is zero-padded to the longer (:mod:`zoo.core.layout`).

Token coordinates (``layout.coords``): time in seconds at the centre of the patch (latent step ``i`` of a
stream lasts ``time_step_s`` seconds: ``1 / fps`` for identity video, ``hop / sample_rate`` for STFT audio),
row and column in token units (0 for audio). Simultaneous audio and video tokens share the time coordinate.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import MODALITIES
from zoo.core.layout import Segment, TokenLayout
from zoo.core.params import FieldError, ModalityParams, Root


def _stream(x: Any, name: str) -> Any:
    return x.get(name) if isinstance(x, dict) else x


def _time_coords(n: int, patch: int, step_s: float | None) -> Tensor:
    """Centre time in seconds of ``n`` consecutive patches of ``patch`` latent steps: ``(n,)``."""
    return (torch.arange(n, dtype=torch.float64) * patch + (patch - 1) / 2).float() * float(step_s or 0.0)


# ----------------------------------------------------------------------------------------------- video
def video_layout(latent_shape: tuple[int, ...], patch: tuple[int, int, int]) -> tuple[tuple[int, int, int], int]:
    """``((T/pt, H/ph, W/pw), P)`` for a latent ``(C, T, H, W)``; ValueError naming the axis that does not divide."""
    if len(latent_shape) != 4:
        raise ValueError(f"modality 'video' needs a 4-D latent (C, T, H, W); got {tuple(latent_shape)}")
    c, *sizes = (int(s) for s in latent_shape)
    for axis, size, p in zip(("time", "height", "width"), sizes, patch):
        if p <= 0 or size % p:
            raise ValueError(f"video latent {axis} {size} is not divisible by patch {p} (latent {tuple(latent_shape)})")
    return (sizes[0] // patch[0], sizes[1] // patch[1], sizes[2] // patch[2]), c * math.prod(patch)


class VideoModalityParams(ModalityParams):
    """Video latents ``(C, T, H, W)`` as space-time patch tokens."""

    type: Literal["video"] = Field(..., description="Video latents (C, T, H, W) as pt x ph x pw patch tokens.")
    segment_names: ClassVar[tuple[str, ...]] = ("video",)
    patch: tuple[int, int, int] | None = Field(
        None, description="Patch sizes (time, height, width); null = (1, p, p) with p = backbone.patch.")

    def resolved_patch(self, backbone_patch: int | None) -> tuple[int, int, int]:
        if self.patch is not None:
            return tuple(int(p) for p in self.patch)  # type: ignore[return-value]
        if backbone_patch is None:
            raise FieldError("patch", "the backbone has no patch size; give (time, height, width)")
        return (1, int(backbone_patch), int(backbone_patch))

    def problems(self, spec: Any) -> Iterator[tuple[str, str]]:
        try:
            patch = self.resolved_patch(getattr(spec.backbone, "patch", None))
        except FieldError as e:
            yield e.path, e.message
            return
        try:
            latent = spec.autoencoder.latent_shape(spec.data.sample_shape())
            video_layout(tuple(_stream(latent, "video")), patch)
        except ValueError as e:
            yield "patch", str(e)


class _VideoTokens:
    """Patchify / unpatchify of one video stream (no weights)."""

    def __init__(self, patch: tuple[int, int, int], latent_shape: tuple[int, ...], step_s: float | None):
        self.patch, self.latent_shape = patch, tuple(int(s) for s in latent_shape)
        self.grid, self.token_dim = video_layout(self.latent_shape, patch)
        self.num_tokens = math.prod(self.grid)
        t, h, w = self.grid
        ti, hi, wi = torch.meshgrid(_time_coords(t, patch[0], step_s), torch.arange(h).float(),
                                    torch.arange(w).float(), indexing="ij")
        self.coords = torch.stack([ti, hi, wi], dim=-1).reshape(-1, 3)             # (N, 3)

    def to_tokens(self, z: Tensor) -> Tensor:
        """``(B, C, T, H, W)`` -> ``(B, N, P)``."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected video latents (B, {', '.join(map(str, self.latent_shape))}); got {tuple(z.shape)}")
        b, c = z.shape[:2]
        (t, h, w), (pt, ph, pw) = self.grid, self.patch
        z = z.reshape(b, c, t, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)    # (B, t, h, w, pt, ph, pw, C)
        return z.reshape(b, self.num_tokens, self.token_dim)

    def from_tokens(self, tokens: Tensor) -> Tensor:
        """``(B, N, P)`` -> ``(B, C, T, H, W)``; the exact inverse."""
        b, c = tokens.shape[0], self.latent_shape[0]
        (t, h, w), (pt, ph, pw) = self.grid, self.patch
        x = tokens.reshape(b, t, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, t, pt, h, ph, w, pw)
        return x.reshape(b, c, t * pt, h * ph, w * pw)


# ----------------------------------------------------------------------------------------------- audio
class AudioModalityParams(ModalityParams):
    """Audio latents ``(C, L)`` as patches of ``patch`` time steps."""

    type: Literal["audio"] = Field(..., description="Audio latents (C, L) as patches of p time steps.")
    segment_names: ClassVar[tuple[str, ...]] = ("audio",)
    patch: int | None = Field(None, gt=0, description="Latent time steps per token; null = backbone.patch.")

    def resolved_patch(self, backbone_patch: int | None) -> int:
        if self.patch is not None:
            return int(self.patch)
        if backbone_patch is None:
            raise FieldError("patch", "the backbone has no patch size; give the audio patch")
        return int(backbone_patch)

    def problems(self, spec: Any) -> Iterator[tuple[str, str]]:
        try:
            self.resolved_patch(getattr(spec.backbone, "patch", None))
        except FieldError as e:
            yield e.path, e.message
            return
        try:
            latent = tuple(_stream(spec.autoencoder.latent_shape(spec.data.sample_shape()), "audio"))
            if len(latent) != 2:
                raise ValueError(f"modality 'audio' needs a 2-D latent (C, L); got {latent}")
        except ValueError as e:
            yield "", str(e)


class _AudioTokens:
    """Patchify / unpatchify of one audio stream, zero-padding the time axis to a multiple of the patch."""

    def __init__(self, patch: int, latent_shape: tuple[int, ...], step_s: float | None):
        if len(latent_shape) != 2:
            raise ValueError(f"modality 'audio' needs a 2-D latent (C, L); got {tuple(latent_shape)}")
        self.patch, self.latent_shape = int(patch), tuple(int(s) for s in latent_shape)
        c, length = self.latent_shape
        self.grid = (math.ceil(length / self.patch),)
        self.token_dim, self.num_tokens = c * self.patch, self.grid[0]
        self.pad = self.grid[0] * self.patch - length
        self.coords = torch.zeros(self.num_tokens, 3)
        self.coords[:, 0] = _time_coords(self.num_tokens, self.patch, step_s)

    def to_tokens(self, z: Tensor) -> Tensor:
        """``(B, C, L)`` -> ``(B, N, P)``."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected audio latents (B, {', '.join(map(str, self.latent_shape))}); got {tuple(z.shape)}")
        if self.pad:
            z = torch.nn.functional.pad(z, (0, self.pad))
        b, c = z.shape[:2]
        return z.reshape(b, c, self.num_tokens, self.patch).permute(0, 2, 3, 1).reshape(b, self.num_tokens, self.token_dim)

    def from_tokens(self, tokens: Tensor) -> Tensor:
        """``(B, N, P)`` -> ``(B, C, L)``; the exact inverse (the padding is cropped)."""
        b, c = tokens.shape[0], self.latent_shape[0]
        x = tokens.reshape(b, self.num_tokens, self.patch, c).permute(0, 3, 1, 2).reshape(b, c, -1)
        return x[..., : self.latent_shape[1]]


# ------------------------------------------------------------------------------------------ modalities
class _MediaModality(nn.Module):
    """Shared checks and the (B, N, P) <-> streams plumbing; ``self.parts`` maps stream name -> tokenizer."""

    parts: dict[str, Any]

    def _finish(self) -> None:
        segs, start = [], 0
        for name, part in self.parts.items():
            segs.append(Segment(name, start, part.num_tokens, part.token_dim, tuple(part.grid)))
            start += part.num_tokens
        self.layout = TokenLayout(tuple(segs), torch.cat([p.coords for p in self.parts.values()]))
        self.token_dim, self.num_tokens = self.layout.token_dim, self.layout.num_tokens
        self.grid = tuple(segs[0].grid) if len(segs) == 1 else (self.num_tokens,)

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ValueError(f"expected tokens (B, {self.num_tokens}, {self.token_dim}); got {tuple(tokens.shape)}")

    def extra_repr(self) -> str:
        return ", ".join(f"{s.name}: grid={s.grid} token_dim={s.token_dim}" for s in self.layout.segments)


class _OneStream(_MediaModality):
    """A modality of one stream (``stream``, cut by ``tokenizer``); its latents may come alone or under their
    stream name in a dict. deps: ``backbone_patch`` (used when the params give none), ``latent_shape``,
    ``time_step_s``."""

    stream: str
    tokenizer: type

    def __init__(self, params: Any, *, latent_shape: Any, backbone_patch: int | None = None,
                 time_step_s: Any = None, **deps: Any):
        super().__init__()
        self.params = params
        self.parts = {self.stream: self.tokenizer(params.resolved_patch(backbone_patch),
                                                  tuple(_stream(latent_shape, self.stream)),
                                                  _stream(time_step_s, self.stream))}
        self._finish()

    def to_tokens(self, z: Tensor) -> Tensor:
        return self.parts[self.stream].to_tokens(_stream(z, self.stream))

    def from_tokens(self, tokens: Tensor) -> Tensor:
        self._check_tokens(tokens)
        return self.parts[self.stream].from_tokens(tokens)


@MODALITIES.register
class VideoModality(_OneStream):
    """``to_tokens`` ``(B, C, T, H, W)`` -> ``(B, N, P)``; ``from_tokens`` the inverse (latent ``(C, T, H, W)``)."""

    Params = VideoModalityParams
    stream, tokenizer = "video", _VideoTokens


@MODALITIES.register
class AudioModality(_OneStream):
    """``to_tokens`` ``(B, C, L)`` -> ``(B, N, P)``; ``from_tokens`` the inverse (latent ``(C, L)``)."""

    Params = AudioModalityParams
    stream, tokenizer = "audio", _AudioTokens


class AudioVideoModalityParams(ModalityParams):
    """One sequence: the video tokens, then the audio tokens of the same clip."""

    type: Literal["audio_video"] = Field(..., description="Joint clip: video patch tokens then audio patch tokens, "
                                                          "on one time axis in seconds.")
    segment_names: ClassVar[tuple[str, ...]] = ("video", "audio")
    video_patch: tuple[int, int, int] = Field((1, 4, 4), description="Video patch sizes (time, height, width).")
    audio_patch: int = Field(4, gt=0, description="Audio latent time steps per token.")

    def problems(self, spec: Any) -> Iterator[tuple[str, str]]:
        try:
            latent = spec.autoencoder.latent_shape(spec.data.sample_shape())
        except ValueError:
            return  # the autoencoder's own check names the problem
        if not isinstance(latent, dict) or set(latent) != {"video", "audio"}:
            yield Root("data"), (f"modality 'audio_video' needs data with the streams video and audio; the latents "
                                 f"are {latent}")
            return
        try:
            video_layout(tuple(latent["video"]), tuple(self.video_patch))
        except ValueError as e:
            yield "video_patch", str(e)
        if len(tuple(latent["audio"])) != 2:
            yield "", f"the audio latent must be 2-D (C, L); got {tuple(latent['audio'])}"


@MODALITIES.register
class AudioVideoModality(_MediaModality):
    """``to_tokens`` ``{"video": (B, C, T, H, W), "audio": (B, C', L)}`` -> ``(B, Nv + Na, max(Pv, Pa))``;
    ``from_tokens`` the inverse. deps: ``latent_shape`` and ``time_step_s``, dicts by stream."""

    Params = AudioVideoModalityParams

    def __init__(self, params: AudioVideoModalityParams, *, latent_shape: Any, time_step_s: Any = None, **deps: Any):
        super().__init__()
        if not isinstance(latent_shape, dict) or set(latent_shape) != {"video", "audio"}:
            raise ValueError(f"modality 'audio_video' needs latents for the streams video and audio; got {latent_shape}")
        steps = time_step_s or {}
        self.params = params
        self.parts = {"video": _VideoTokens(tuple(params.video_patch), tuple(latent_shape["video"]), steps.get("video")),
                      "audio": _AudioTokens(params.audio_patch, tuple(latent_shape["audio"]), steps.get("audio"))}
        self._finish()

    def to_tokens(self, z: dict[str, Tensor]) -> Tensor:
        if not isinstance(z, dict) or set(z) != set(self.parts):
            raise ValueError(f"modality 'audio_video' expects a dict with video and audio latents; got "
                             f"{sorted(z) if isinstance(z, dict) else type(z).__name__}")
        toks = [part.to_tokens(z[name]) for name, part in self.parts.items()]
        p = self.token_dim
        return torch.cat([torch.nn.functional.pad(t, (0, p - t.shape[-1])) for t in toks], dim=1)

    def from_tokens(self, tokens: Tensor) -> dict[str, Tensor]:
        self._check_tokens(tokens)
        return {s.name: self.parts[s.name].from_tokens(tokens[:, s.tokens, : s.token_dim])
                for s in self.layout.segments}
