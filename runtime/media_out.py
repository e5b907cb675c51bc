"""Writing samples as files a person can open: PNG contact sheets for images; for clips, MP4 files with the
audio track muxed in and a PNG poster (first frame) beside each, WAV files, an animated GIF preview and a
contact-sheet PNG (frames + spectrogram), all scaled up nearest-neighbour so a clip shows at >= 128 px
(:data:`zoo.media.MIN_SHOWN_PX`); per-clip readings (``clips.json``) and real held-out clips of the same labels.

Samples are what :func:`runtime.sample.generate` returns: a tensor ``(B, C, H, W)`` (images), ``(B, C, T, H, W)``
(video) or ``(B, 1, L)`` (audio), or a dict ``{"video": ..., "audio": ...}``; all in [-1, 1]. ``rates`` is the
data's ``stream_rates()`` (``{"video": fps, "audio": sample_rate}``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

GIF_MAX_WIDTH = 1160
"""The tiled GIF preview wraps its clips into balanced rows no wider than this (pixels, after upscaling)."""


@dataclass
class Written:
    """Paths of one written sample set (empty lists for what the data has no stream for)."""

    sheet: Path
    gif: Path | None = None
    mp4: list[Path] = field(default_factory=list)
    wav: list[Path] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    posters: list[Path] = field(default_factory=list)

    @property
    def clip_dir(self) -> Path:
        """The folder of the per-clip files (``<out_dir>/<name>/``)."""
        return self.sheet.with_suffix("")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> uint8 ``(B, H, W, C)`` (C = 1 or 3)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid_image(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Contact sheet, uint8 ``(H', W', 3)``."""
    imgs = to_uint8(images)
    if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    b, h, w, _ = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    sheet = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, nrow)
        sheet[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    if scale > 1:
        sheet = sheet.repeat(scale, 0).repeat(scale, 1)
    return sheet


def save_png(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


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
                  name: str, *, nrow: int | None = None, scale: int | None = None, tracker: Any = None,
                  step: int = 0) -> Written:
    """Write ``samples`` under ``out_dir`` with file names starting ``name``; log previews to ``tracker``.

    Clips go to ``out_dir/name/NNN_labelL.{mp4,png,wav}`` (the PNG is the MP4's poster: its first frame), the GIF
    preview and contact sheet to ``out_dir/name.{gif,png}``. Video is upscaled by ``scale`` (default
    :func:`zoo.media.shown_scale`: 16 px -> 8, so a clip shows at 128 px) everywhere.
    """
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
    if vid_u8 is not None and scale is None:
        scale = media.shown_scale(*vid_u8.shape[2:4])
    wav = audio[:, 0].float().clamp(-1, 1).numpy() if audio is not None else None  # (B, L)
    clip_dir = out_dir / name
    written = Written(sheet=out_dir / f"{name}.png", labels=labs)
    for i in range(_count(samples)):
        stem = clip_stem(i, labs[i])
        if vid_u8 is not None:
            written.mp4.append(media.write_mp4(clip_dir / f"{stem}.mp4", vid_u8[i], fps,
                                               audio=wav[i] if wav is not None else None, sample_rate=sr, scale=scale))
            written.posters.append(media.write_png(clip_dir / f"{stem}.png", vid_u8[i, 0], scale))
        if wav is not None:
            written.wav.append(media.write_wav(clip_dir / f"{stem}.wav", wav[i], sr))
    if vid_u8 is not None:
        per_row, fit = nrow or min(len(labs), 8), max(1, GIF_MAX_WIDTH // ((vid_u8.shape[3] + 2) * scale))
        if per_row > fit:  # balanced rows that fit a page: 10 clips of 16 px at x8 -> 2 rows of 5
            per_row = math.ceil(len(labs) / math.ceil(len(labs) / fit))
        tiled = tile_frames(vid_u8, per_row)
        written.gif = media.write_gif(out_dir / f"{name}.gif", tiled, fps, scale=scale)
        if tracker is not None:
            tracker.gif("samples/preview", step, written.gif.read_bytes(), tiled.shape[1] * scale,
                        tiled.shape[2] * scale)
    sheet = media.contact_sheet(vid_u8 if vid_u8 is not None else None, wav, sample_rate=sr, scale=scale, labels=labs)
    save_png(sheet, written.sheet)
    if tracker is not None:
        tracker.image("samples/contact_sheet", step, sheet)
        if wav is not None:
            for i in range(min(4, len(wav))):
                tracker.audio(f"samples/audio_{i}", step, wav[i], int(sr))
    return written


def clip_stem(i: int, label: int | None) -> str:
    """File stem of clip ``i``: ``007_label3`` (``007`` when unconditional)."""
    return f"{i:03d}" + (f"_label{label}" if label is not None else "")


def write_clip_readings(rows: list[dict[str, Any]], written: Written) -> Path:
    """Write per-clip readings (e.g. :func:`zoo.metrics.av.read_clips`, one dict per clip, in order) as
    ``<clip_dir>/clips.json``: ``{"clips": [{"file": "000_label0", "label": 0, **reading}, ...]}``. Returns it."""
    if len(rows) != len(written.labels):
        raise ValueError(f"write_clip_readings: {len(rows)} readings for {len(written.labels)} clips")
    clips = [{"file": clip_stem(i, lab), "label": lab, **row}
             for i, (lab, row) in enumerate(zip(written.labels, rows))]
    path = written.clip_dir / "clips.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".clips.json.tmp")
    tmp.write_text('{"clips": [\n' + ",\n".join(json.dumps(c) for c in clips) + "\n]}\n")  # a clip a line
    tmp.replace(path)
    return path


def real_indices(dataset: Any, labels: list[int | None], scan: int = 200) -> list[int]:
    """Indices of ``dataset`` items (``(x, y)`` pairs) whose labels are ``labels`` in order, each item used once.

    Item ``i`` of a 10-class set is tried at ``label + 10 k`` first (``bouncing_digits_av`` and ``digits`` label
    item ``i`` as ``i % 10``), then the first ``scan`` items; a label found nowhere is left out. ``None`` labels
    (unconditional samples) take the next unused items.
    """
    used: set[int] = set()
    out: list[int] = []
    n = len(dataset)

    def label_of(i: int) -> int:
        return int(torch.as_tensor(dataset[i][1]).reshape(()))

    for lab in labels:
        if lab is None:
            pick = next((i for i in range(n) if i not in used), None)
        else:
            guess = [i for i in range(lab, n, 10) if i not in used][:1]
            pick = next((i for i in guess + list(range(min(n, scan))) if i not in used and label_of(i) == lab), None)
        if pick is not None:
            used.add(pick)
            out.append(pick)
    return out


def _count(samples: Any) -> int:
    return next(iter(samples.values())).shape[0] if isinstance(samples, dict) else samples.shape[0]
