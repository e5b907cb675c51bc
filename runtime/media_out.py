"""Writing samples as files a person can open: PNG contact sheets for images; for clips, MP4 files with the
audio track muxed in, WAV files, an animated GIF preview and a contact-sheet PNG (frames + spectrogram).

Samples are what :func:`runtime.sample.generate` returns: a tensor ``(B, C, H, W)`` (images), ``(B, C, T, H, W)``
(video) or ``(B, 1, L)`` (audio), or a dict ``{"video": ..., "audio": ...}``; all in [-1, 1]. ``rates`` is the
data's ``stream_rates()`` (``{"video": fps, "audio": sample_rate}``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.sample import grid_image, save_png


@dataclass
class Written:
    """Paths of one written sample set (empty lists for what the data has no stream for)."""

    sheet: Path
    gif: Path | None = None
    mp4: list[Path] = field(default_factory=list)
    wav: list[Path] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)


def streams_of(samples: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(images, video, audio)``: which kinds of media a sample batch holds (by stream name or tensor rank)."""
    if isinstance(samples, dict):
        return None, samples.get("video"), samples.get("audio")
    if samples.dim() == 4:
        return samples, None, None
    if samples.dim() == 5:
        return None, samples, None
    if samples.dim() == 3:
        return None, None, samples
    raise ValueError(f"cannot present samples of shape {tuple(samples.shape)}")


def tile_frames(video_u8: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """``(B, T, H, W, C)`` uint8 -> one animation ``(T, H', W', 3)`` with the clips tiled ``nrow`` per row."""
    b, t, h, w, c = video_u8.shape
    if c == 1:
        video_u8 = np.repeat(video_u8, 3, axis=-1)
    rows = math.ceil(b / nrow)
    out = np.full((t, rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = video_u8[i]
    return out


def write_samples(samples: Any, labels: torch.Tensor | None, rates: dict[str, float] | None, out_dir: Path,
                  name: str, *, nrow: int | None = None, scale: int = 4, tracker: Any = None,
                  step: int = 0) -> Written:
    """Write ``samples`` under ``out_dir`` with file names starting ``name``; log previews to ``tracker``."""
    from zoo import media

    out_dir.mkdir(parents=True, exist_ok=True)
    images, video, audio = streams_of(samples)
    rates = rates or {}
    labs = [int(v) for v in labels] if labels is not None else [None] * _count(samples)
    if images is not None:
        sheet = grid_image(images, nrow=nrow, scale=2)
        path = save_png(sheet, out_dir / f"{name}.png")
        if tracker is not None:
            tracker.image("samples/grid", step, sheet)
        return Written(sheet=path, labels=labs)

    fps, sr = rates.get("video"), rates.get("audio")
    vid_u8 = media.to_uint8_video(video) if video is not None else None            # (B, T, H, W, C)
    wav = audio[:, 0].float().clamp(-1, 1).numpy() if audio is not None else None  # (B, L)
    clip_dir = out_dir / name
    written = Written(sheet=out_dir / f"{name}.png", labels=labs)
    for i in range(_count(samples)):
        stem = f"{i:03d}" + (f"_label{labs[i]}" if labs[i] is not None else "")
        if vid_u8 is not None:
            written.mp4.append(media.write_mp4(clip_dir / f"{stem}.mp4", vid_u8[i], fps,
                                               audio=wav[i] if wav is not None else None, sample_rate=sr, scale=scale))
        if wav is not None:
            written.wav.append(media.write_wav(clip_dir / f"{stem}.wav", wav[i], sr))
    if vid_u8 is not None:
        tiled = tile_frames(vid_u8, nrow or min(len(labs), 8))
        written.gif = media.write_gif(out_dir / f"{name}.gif", tiled, fps, scale=2)
        if tracker is not None:
            tracker.gif("samples/preview", step, media.gif_bytes(tiled, fps, scale=2), tiled.shape[1] * 2, tiled.shape[2] * 2)
    sheet = media.contact_sheet(vid_u8 if vid_u8 is not None else None, wav, sample_rate=sr, scale=scale, labels=labs)
    save_png(sheet, written.sheet)
    if tracker is not None:
        tracker.image("samples/contact_sheet", step, sheet)
        if wav is not None:
            for i in range(min(4, len(wav))):
                tracker.audio(f"samples/audio_{i}", step, wav[i], int(sr))
    return written


def _count(samples: Any) -> int:
    return next(iter(samples.values())).shape[0] if isinstance(samples, dict) else samples.shape[0]
