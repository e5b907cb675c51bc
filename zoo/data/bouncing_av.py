"""``bouncing_digits_av``: an embedded, procedurally generated audio + video dataset (no download).

Each clip shows one digit glyph (the glyph masks of :mod:`zoo.data.digits`, anti-aliased, placed with
sub-pixel accuracy) moving at constant velocity in a square frame and bouncing off the walls: the glyph's
ink box stays inside the frame, and touching a wall reverses the x or the y velocity. The audio is the
digit's DTMF tone pair (keypad rows 697/770/852/941 Hz, columns 1209/1336/1477 Hz; '1' = 697 + 1209 Hz,
'0' = 941 + 1336 Hz), played as a short burst (raised-cosine fades) at the clip start (t = 0) and at every
wall bounce, so the sound tells which digit it is and when it bounces. Bursts that overlap merge (the
envelope is the maximum of the bursts' envelopes, so the level never exceeds ``amplitude``).

Every clip is a pure function of ``(seed, split, index)``; the label of index ``i`` is ``i % 10``; the
``eval`` split is a different random stream than ``train``. A sample is ``{"video": (C, T, H, W),
"audio": (1, L)}`` float32 in [-1, 1] with ``T = round(duration_s * fps)`` and ``L = round(duration_s *
sample_rate)``, or the bare tensor when ``streams`` names one stream.

Rendering: the glyph tile is rasterised once per clip (supersampled affine transform, box-reduced), then
shifted per frame by bilinear weights (sub-pixel motion) and pasted. A default clip (16x16, 16 frames,
2 s of 4 kHz audio) took about 0.7 ms on one CPU core (0.3 ms video, 0.4 ms audio; measured 2026-11, not a
timed test).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import Tensor

from registry.kinds import DATASETS
from zoo.core.params import DataParams
from zoo.data.digits import (_FONT_BUCKETS, _INK_PER_EM, NUM_CLASSES, GeneratedDataset, _colours, _glyph,
                              _supersampling, ordered_range)
from zoo.data.errors import check_index, check_split

GENERATOR_VERSION = "bouncing-av-v1"
"""Changes whenever the rendering changes; cached models trained on these clips key on it."""

DTMF_ROWS = (697.0, 770.0, 852.0, 941.0)
DTMF_COLS = (1209.0, 1336.0, 1477.0)
DTMF_KEYS = {1: (0, 0), 2: (0, 1), 3: (0, 2), 4: (1, 0), 5: (1, 1), 6: (1, 2), 7: (2, 0), 8: (2, 1), 9: (2, 2),
             0: (3, 1)}
"""digit -> (row index, column index) on the telephone keypad."""
MAX_DTMF_HZ = 1633.0  # the highest DTMF frequency (column 'A'-'D'); sample_rate must exceed twice it
STREAMS = ("video", "audio")

_SPLIT_STREAM = {"train": 0, "eval": 1}
_BOUNDS = {"speed": (0.0, 5.0), "scale": (0.1, 0.9), "stroke": (0.0, 0.2)}
_MIN_AXIS_ANGLE = math.radians(20.0)  # the direction keeps at least this angle from both axes


def dtmf_freqs(digit: int) -> tuple[float, float]:
    """``(row Hz, column Hz)`` of a digit 0..9."""
    r, c = DTMF_KEYS[digit]
    return DTMF_ROWS[r], DTMF_COLS[c]


class BouncingDigitsAVDataParams(DataParams):
    """Bouncing digit clips with DTMF bursts at the start and at each wall bounce."""

    type: Literal["bouncing_digits_av"] = Field(
        ..., description="Procedural audio+video clips: a bouncing digit and its DTMF tone at each bounce.")
    size: int = Field(16, ge=8, le=256, description="Frame side in pixels (frames are square).")
    channels: Literal[1, 3] = Field(1, description="1 = grey glyph on grey background, 3 = coloured (RGB).")
    fps: int = Field(8, ge=1, le=120, description="Video frames per second.")
    duration_s: float = Field(2.0, gt=0, le=60, description="Clip length in seconds.")
    sample_rate: int = Field(4000, ge=1, le=48000, description="Audio samples per second (> 2 x 1633 Hz).")
    burst_s: float = Field(0.1, gt=0, le=2.0, description="Length of one tone burst in seconds (fades included).")
    fade_s: float = Field(0.004, ge=0, description="Raised-cosine fade-in / fade-out of a burst, in seconds.")
    speed: tuple[float, float] = Field(
        (0.3, 0.5), description="Range of the glyph speed in frame sides per second (direction uniform, "
                                  "kept >= 20 degrees from both axes).")
    scale: tuple[float, float] = Field(
        (0.45, 0.6), description="Range of the glyph's ink height as a fraction of the frame side.")
    stroke: tuple[float, float] = Field(
        (0.0, 0.04), description="Range of the extra stroke width (each side), as a fraction of the font size (em).")
    min_contrast: float = Field(
        0.5, ge=0.0, le=0.9, description="Minimum luma difference between glyph and background (in [0, 1]).")
    amplitude: float = Field(0.8, gt=0, le=1.0, description="Peak amplitude of a burst (each tone gets half).")
    noise: float = Field(0.01, ge=0, le=0.5, description="Std of the Gaussian background noise of the audio.")
    length: int = Field(10000, gt=0, description="Virtual number of clips per split (label of index i is i % 10).")
    seed: int = Field(0, ge=0, description="Seed of the generator; each (seed, split, index) gives one fixed clip.")
    streams: tuple[Literal["video", "audio"], ...] = Field(
        STREAMS, description="Streams of a sample: 'video', 'audio' or both (a dict); one stream = a bare tensor.")

    presets: ClassVar[dict[str, dict]] = {
        "tiny": {"length": 64},
    }

    @field_validator("speed", "scale", "stroke")
    @classmethod
    def _ordered_range(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        return ordered_range(v, *_BOUNDS[info.field_name])

    @field_validator("sample_rate")
    @classmethod
    def _above_nyquist(cls, v: int) -> int:
        if v <= 2 * MAX_DTMF_HZ:
            raise ValueError(f"sample_rate {v} Hz cannot carry DTMF tones: it must exceed 2 x {MAX_DTMF_HZ:g} = "
                             f"{2 * MAX_DTMF_HZ:g} Hz (Nyquist)")
        return v

    @field_validator("streams")
    @classmethod
    def _streams(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"streams must name 'video' and/or 'audio' once each, got {list(v)}")
        return tuple(s for s in STREAMS if s in v)  # canonical order

    @model_validator(mode="after")
    def _timing(self) -> "BouncingDigitsAVDataParams":
        if self.num_frames < 2:
            raise ValueError(f"duration_s * fps = {self.duration_s * self.fps:g} gives fewer than 2 frames")
        if 2 * self.fade_s > self.burst_s:
            raise ValueError(f"fade_s {self.fade_s} is more than half of burst_s {self.burst_s}")
        return self

    @property
    def num_classes(self) -> int:
        """Always 10 (the digits '0'-'9')."""
        return NUM_CLASSES

    @property
    def num_frames(self) -> int:
        """``T = round(duration_s * fps)``."""
        return round(self.duration_s * self.fps)

    @property
    def num_audio_samples(self) -> int:
        """``L = round(duration_s * sample_rate)``."""
        return round(self.duration_s * self.sample_rate)

    def sample_shape(self) -> dict[str, tuple[int, ...]] | tuple[int, ...]:
        """``{"video": (C, T, H, W), "audio": (1, L)}`` for the selected streams; the bare tuple for one."""
        shapes = {"video": (self.channels, self.num_frames, self.size, self.size),
                  "audio": (1, self.num_audio_samples)}
        out = {s: shapes[s] for s in self.streams}
        return out[self.streams[0]] if len(out) == 1 else out

    def stream_rates(self) -> dict[str, int]:
        """``{"video": fps, "audio": sample_rate}`` for the selected streams."""
        rates = {"video": self.fps, "audio": self.sample_rate}
        return {s: rates[s] for s in self.streams}


# ------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class ClipEvents:
    """Ground truth of one clip.

    Attributes:
        label: the digit 0..9.
        bounce_times: wall bounces in seconds, sorted, in ``(0, duration_s]``.
        bounce_axes: ``"x"`` or ``"y"`` per bounce.
        burst_onsets: start of every tone burst (0.0 and each bounce), sorted.
        audible_onsets: starts of the merged bursts (a burst starting inside an earlier one extends it).
        centres: ``(T, 2)`` float64 ink-box centre ``(x, y)`` per frame, in pixels (pixel ``i`` spans
            ``[i, i + 1]``).
        box: ``(width, height)`` of the glyph's ink box in pixels.
    """

    label: int
    bounce_times: tuple[float, ...]
    bounce_axes: tuple[str, ...]
    burst_onsets: tuple[float, ...]
    audible_onsets: tuple[float, ...]
    centres: np.ndarray
    box: tuple[float, float]


@dataclass(frozen=True)
class _Layout:
    label: int
    glyph: Image.Image
    ink: tuple[float, float]  # ink box (w, h) in output pixels
    k: float  # output pixels per master pixel
    p0: np.ndarray  # (2,) start offset of the box centre from its lowest position, px
    vel: np.ndarray  # (2,) px / s
    span: np.ndarray  # (2,) free travel per axis, px
    fg: np.ndarray
    bg: np.ndarray
    phases: np.ndarray  # (2,) radians
    rng: np.random.Generator  # continues with the audio noise


def _layout(params: BouncingDigitsAVDataParams, index: int, split: str) -> _Layout:
    check_split("bouncing_digits_av", split)
    label = index % NUM_CLASSES
    rng = np.random.default_rng([params.seed, _SPLIT_STREAM[split], index])
    u = rng.random(9)
    size, ss = params.size, _supersampling(params.size)
    ink_h = (params.scale[0] + u[0] * (params.scale[1] - params.scale[0])) * size
    font_px = next((b for b in _FONT_BUCKETS if b * _INK_PER_EM >= ink_h * ss), _FONT_BUCKETS[-1])
    stroke_px = round((params.stroke[0] + u[1] * (params.stroke[1] - params.stroke[0])) * font_px)
    glyph = _glyph(label, font_px, stroke_px)
    k = ink_h / (glyph.height - 4)  # the master mask has a 2-pixel empty border
    ink = (min((glyph.width - 4) * k, float(size)), ink_h)
    span = np.maximum(size - np.array(ink), 0.0)
    p0 = np.array([u[2], u[3]]) * span
    speed = (params.speed[0] + u[4] * (params.speed[1] - params.speed[0])) * size
    angle = math.floor(u[5] * 4) * math.pi / 2 + _MIN_AXIS_ANGLE + u[6] * (math.pi / 2 - 2 * _MIN_AXIS_ANGLE)
    vel = speed * np.array([math.cos(angle), math.sin(angle)])
    fg, bg = _colours(rng, params.channels, params.min_contrast)
    phases = 2 * math.pi * u[7:9]
    return _Layout(label, glyph, ink, k, p0, vel, span, fg, bg, phases, rng)


def _positions(lay: _Layout, t: np.ndarray) -> np.ndarray:
    """Ink-box centres ``(len(t), 2)`` at times ``t`` (seconds): reflection of the free motion in the walls."""
    span = lay.span
    free = lay.p0[None] + lay.vel[None] * t[:, None]
    period = np.where(span > 0, 2 * span, 1.0)
    w = np.mod(free, period)
    folded = np.where(w <= span, w, period - w)
    return np.where(span > 0, folded, 0.0) + np.array(lay.ink) / 2


def _bounces(lay: _Layout, duration: float) -> list[tuple[float, str]]:
    """``[(time s, axis)]`` of the wall bounces in ``(0, duration]``, sorted."""
    out = []
    for ax, name in enumerate("xy"):
        a0, v, span = lay.p0[ax], lay.vel[ax], lay.span[ax]
        if span <= 0 or v == 0:
            continue
        a1 = a0 + v * duration
        lo, hi = min(a0, a1), max(a0, a1)
        for n in range(math.floor(lo / span), math.ceil(hi / span) + 1):
            t = (n * span - a0) / v
            if 0 < t <= duration:
                out.append((float(t), name))
    return sorted(out)


def clip_events(params: BouncingDigitsAVDataParams, index: int, split: str = "train") -> ClipEvents:
    """The ground truth of clip ``index`` of ``split`` (bounces, burst onsets, glyph track)."""
    lay = _layout(params, index, split)
    bounces = _bounces(lay, params.duration_s)
    onsets = (0.0, *(t for t, _ in bounces))
    starts = {s for s, _ in _burst_intervals(params, onsets)}
    audible = [t for t in onsets if round(t * params.sample_rate) in starts]
    centres = _positions(lay, np.arange(params.num_frames) / params.fps)
    return ClipEvents(lay.label, tuple(t for t, _ in bounces), tuple(a for _, a in bounces), onsets,
                      tuple(audible), centres, (float(lay.ink[0]), float(lay.ink[1])))


# ------------------------------------------------------------------------------------------- rendering
def _tile(lay: _Layout, size: int) -> np.ndarray:
    """The glyph rasterised with its ink box at ``[1, 1 + w] x [1, 1 + h]``: ``(th, tw)`` float32 in [0, 1]."""
    ss = _supersampling(size)
    tw, th = math.ceil(lay.ink[0]) + 2, math.ceil(lay.ink[1]) + 2
    a = 1.0 / (lay.k * ss)  # output (supersampled) -> master; the ink starts at master pixel 2
    coeffs = (a, 0.0, 2.0 - 1.0 / lay.k, 0.0, a, 2.0 - 1.0 / lay.k)
    mask = lay.glyph.transform((tw * ss, th * ss), Image.Transform.AFFINE, coeffs,
                               resample=Image.Resampling.BILINEAR, fillcolor=0)
    if ss > 1:
        mask = mask.reduce(ss)
    return np.asarray(mask, dtype=np.float32) * (1.0 / 255.0)


def _render_video(params: BouncingDigitsAVDataParams, lay: _Layout) -> np.ndarray:
    """``(C, T, H, W)`` float32 in [0, 1]."""
    size, T = params.size, params.num_frames
    tile = _tile(lay, size)
    th, tw = tile.shape
    q = np.zeros((th + 2, tw + 2), np.float32)
    q[1:-1, 1:-1] = tile
    origin = _positions(lay, np.arange(T) / params.fps) - np.array(lay.ink) / 2 - 1.0  # tile top-left
    io = np.floor(origin).astype(np.int64)
    fx, fy = (origin - io).astype(np.float32).T[:, :, None, None]
    shifted = ((1 - fy) * ((1 - fx) * q[None, 1:, 1:] + fx * q[None, 1:, :-1])
               + fy * ((1 - fx) * q[None, :-1, 1:] + fx * q[None, :-1, :-1]))  # (T, th + 1, tw + 1)
    mask = np.zeros((T, size, size), np.float32)
    for f in range(T):
        x0, y0 = io[f]
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + tw + 1, size), min(y0 + th + 1, size)
        if xa < xb and ya < yb:
            mask[f, ya:yb, xa:xb] = shifted[f, ya - y0:yb - y0, xa - x0:xb - x0]
    fg, bg = lay.fg[:, None, None, None], lay.bg[:, None, None, None]
    return bg + (fg - bg) * mask[None]


def _burst_intervals(params: BouncingDigitsAVDataParams, onsets: tuple[float, ...]) -> list[tuple[int, int]]:
    """Sample ranges ``[start, end)`` of the sounding bursts, sorted: a burst that starts before the previous
    one ends extends it (one merged burst, one onset)."""
    n = max(round(params.burst_s * params.sample_rate), 1)
    out: list[list[int]] = []
    for s in sorted(round(t * params.sample_rate) for t in onsets):
        if out and s < out[-1][1]:
            out[-1][1] = max(out[-1][1], s + n)
        else:
            out.append([s, s + n])
    return [(s, e) for s, e in out]


def _burst_envelope(params: BouncingDigitsAVDataParams, onsets: tuple[float, ...]) -> np.ndarray:
    """``(L,)`` float32 in [0, 1]: 1 inside the (merged) bursts, with raised-cosine fades at their ends."""
    sr, L = params.sample_rate, params.num_audio_samples
    nf = round(params.fade_s * sr)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(nf, dtype=np.float32) + 0.5) / max(nf, 1))
    env = np.zeros(L, np.float32)
    for s, e in _burst_intervals(params, onsets):
        win = np.ones(e - s, np.float32)
        f = min(nf, (e - s) // 2)
        if f > 0:
            win[:f], win[len(win) - f:] = ramp[:f], ramp[:f][::-1]
        if s < L:
            env[s:min(e, L)] = win[: min(e, L) - s]
    return env


def _render_audio(params: BouncingDigitsAVDataParams, lay: _Layout, onsets: tuple[float, ...]) -> np.ndarray:
    """``(1, L)`` float32 in [-1, 1]."""
    sr, L = params.sample_rate, params.num_audio_samples
    t = np.arange(L, dtype=np.float64) / sr
    fr, fc = dtmf_freqs(lay.label)
    tone = np.sin(2 * np.pi * fr * t + lay.phases[0]) + np.sin(2 * np.pi * fc * t + lay.phases[1])
    audio = (0.5 * params.amplitude) * tone.astype(np.float32) * _burst_envelope(params, onsets)
    if params.noise > 0:
        audio += params.noise * lay.rng.standard_normal(L, dtype=np.float32)
    return np.clip(audio, -1.0, 1.0)[None]


def render_clip(params: BouncingDigitsAVDataParams, index: int, split: str = "train") -> tuple[dict, int]:
    """Clip ``index`` of ``split``: ``({"video": (C, T, H, W) in [0, 1], "audio": (1, L) in [-1, 1]}, label)``
    as float32 numpy arrays, for the selected ``streams`` only. Deterministic per ``(params, split, index)``."""
    lay = _layout(params, index, split)
    out: dict[str, np.ndarray] = {}
    if "video" in params.streams:
        out["video"] = _render_video(params, lay)
    if "audio" in params.streams:
        onsets = (0.0, *(t for t, _ in _bounces(lay, params.duration_s)))
        out["audio"] = _render_audio(params, lay, onsets)
    return out, lay.label


# --------------------------------------------------------------------------------------------- dataset
@DATASETS.register
class BouncingDigitsAV(GeneratedDataset):
    """Map-style dataset: ``ds[i] -> (x, y)`` with ``y = i % 10`` and ``x`` a dict ``{"video": (C, T, H, W),
    "audio": (1, L)}`` of float32 in [-1, 1] (the bare tensor when one stream is selected).

    Args:
        params: :class:`BouncingDigitsAVDataParams`.
        split: ``"train"`` or ``"eval"`` (a disjoint random stream of the same distribution).
    """

    Params = BouncingDigitsAVDataParams
    tag = "bouncing_digits_av"

    def __getitem__(self, index: int) -> tuple[Tensor | dict[str, Tensor], int]:
        index = check_index(self.tag, index, len(self))
        arrays, label = render_clip(self.params, index, self.split)
        x = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if "video" in x:
            x["video"].mul_(2.0).sub_(1.0)
        return (x[self.params.streams[0]] if len(x) == 1 else x), label

    def __repr__(self) -> str:
        p = self.params
        return (f"BouncingDigitsAV(split={self.split!r}, size={p.size}, channels={p.channels}, frames={p.num_frames}, "
                f"audio={p.num_audio_samples}@{p.sample_rate}Hz, streams={list(p.streams)}, length={p.length})")
