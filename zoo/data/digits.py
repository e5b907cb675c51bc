"""``digits``: an embedded, procedurally generated, class-labelled digit image dataset.

Nothing is downloaded and no package beyond Pillow is needed: the glyphs '0'-'9' are drawn with Pillow's
built-in scalable font (``ImageFont.load_default(size=...)``, Aileron Regular), then placed with a random
scale, rotation, position and stroke width, coloured (random foreground / background with a minimum
contrast) and given additive Gaussian noise.

Every sample is a pure function of ``(seed, split, index)``: the same index always gives the same image,
in any process and any worker. The label of index ``i`` is ``i % 10`` (exactly balanced when ``length``
is a multiple of 10). The ``eval`` split draws from a different random stream than ``train``, so the two
never share an image.

Rendering: the glyph is drawn once per (digit, font size, stroke) into a cached master mask, mapped into
a supersampled frame by one affine transform (rotation + scale + translation) and box-reduced to the
target size, which anti-aliases it. A 32x32 RGB sample takes about 0.3-0.4 ms on one CPU core
(``tests/test_data.py::test_digits_render_time`` checks < 2 ms).
"""
from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor
from torch.utils.data import Dataset

from registry.kinds import DATASETS
from zoo.core.params import DataParams
from zoo.data.errors import check_index, check_split

GENERATOR_VERSION = "digits-v1"
"""Changes whenever the rendering changes; cached models trained on digits (the metric classifier) key on it."""

NUM_CLASSES = 10
_SPLIT_STREAM = {"train": 0, "eval": 1}
_FONT_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # master font sizes (px per em)
_INK_PER_EM = 0.72  # ink height of a digit in Aileron, as a fraction of the font size
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


_BOUNDS = {"scale": (0.05, 1.5), "rotation": (-180.0, 180.0), "stroke": (0.0, 0.3), "noise": (0.0, 1.0)}
"""Allowed (low, high) of each range field."""


def ordered_range(v: tuple[float, float], lo: float, hi: float) -> tuple[float, float]:
    """A range field's value ``v = (low, high)``, checked: ``ValueError`` unless ``lo <= low <= high <= hi``."""
    if not lo <= v[0] <= v[1] <= hi:
        raise ValueError(f"expected {lo} <= low <= high <= {hi}, got {list(v)}")
    return v


class DigitsDataParams(DataParams):
    """Procedural digits '0'-'9'. Samples are ``(C, size, size)`` float32 in [-1, 1] with labels 0..9."""

    type: Literal["digits"] = Field(..., description="Procedurally rendered digits '0'-'9' (no download).")
    size: int = Field(32, ge=8, le=1024, description="Image side in pixels (images are square).")
    channels: Literal[1, 3] = Field(3, description="1 = grey digits on grey background, 3 = coloured (RGB).")
    length: int = Field(60000, gt=0, description="Virtual number of samples per split (label of index i is i % 10).")
    seed: int = Field(0, ge=0, description="Seed of the generator; each (seed, split, index) gives one fixed image.")
    scale: tuple[float, float] = Field(
        (0.5, 0.85), description="Range of the digit's ink height as a fraction of the image side.")
    rotation: tuple[float, float] = Field((-15.0, 15.0), description="Range of the rotation angle in degrees.")
    stroke: tuple[float, float] = Field(
        (0.0, 0.05), description="Range of the extra stroke width (each side), as a fraction of the font size (em).")
    noise: tuple[float, float] = Field(
        (0.0, 0.06), description="Range of the std of additive Gaussian noise, in [0, 1] intensity units.")
    min_contrast: float = Field(
        0.35, ge=0.0, le=0.9, description="Minimum luma difference between foreground and background (in [0, 1]).")

    presets: ClassVar[dict[str, dict]] = {
        "tiny": {"size": 16, "channels": 1, "length": 512},
    }

    @field_validator("scale", "rotation", "stroke", "noise")
    @classmethod
    def _ordered_range(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        return ordered_range(v, *_BOUNDS[info.field_name])

    @property
    def num_classes(self) -> int:
        """Always 10 (the digits '0'-'9')."""
        return NUM_CLASSES

    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        return (self.channels, self.size, self.size)


# ------------------------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _glyph(digit: int, font_px: int, stroke_px: int) -> Image.Image:
    """Master mask (mode ``L``) of one digit, cropped to its ink with a 2-pixel empty border."""
    font = _font(font_px)
    text = str(digit)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke_px)
    pad = 4
    img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill=255, font=font,
                             stroke_width=stroke_px, stroke_fill=255)
    l, t, r, b = img.getbbox() or (0, 0, img.width, img.height)
    return img.crop((l - 2, t - 2, r + 2, b + 2))


def _supersampling(size: int) -> int:
    return 4 if size <= 32 else 2 if size <= 128 else 1


def _colours(rng: np.random.Generator, channels: int, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours ``(C,)`` in [0, 1] whose luma differs by at least ``min_contrast``.

    Draws 16 candidate pairs at once and keeps the first that qualifies (falls back to white on black),
    so the result is a fixed function of the generator state.
    """
    cand = rng.random((16, 2, channels), dtype=np.float32)
    luma = cand[..., 0] if channels == 1 else cand @ _LUMA
    ok = np.nonzero(np.abs(luma[:, 0] - luma[:, 1]) >= min_contrast)[0]
    if len(ok) == 0:
        return np.ones(channels, np.float32), np.zeros(channels, np.float32)
    fg, bg = cand[ok[0]]
    return fg, bg


def render_digit(params: DigitsDataParams, index: int, split: str = "train") -> tuple[np.ndarray, int]:
    """Render sample ``index`` of ``split``: returns ``(img (C, H, W) float32 in [0, 1], label)``.

    Deterministic: a fixed function of ``(params, split, index)``.
    """
    size, ss = params.size, _supersampling(params.size)
    label = index % NUM_CLASSES
    rng = np.random.default_rng([params.seed, _SPLIT_STREAM[split], index])
    u = rng.random(6)

    # geometry, in supersampled pixels
    big = size * ss
    ink_h = (params.scale[0] + u[0] * (params.scale[1] - params.scale[0])) * big
    theta = math.radians(params.rotation[0] + u[1] * (params.rotation[1] - params.rotation[0]))
    font_px = next((b for b in _FONT_BUCKETS if b * _INK_PER_EM >= ink_h), _FONT_BUCKETS[-1])
    stroke_px = round((params.stroke[0] + u[2] * (params.stroke[1] - params.stroke[0])) * font_px)
    glyph = _glyph(label, font_px, stroke_px)
    gw, gh = glyph.size
    s = ink_h / (gh - 4)  # output pixels per master pixel (the mask has a 2-px border)
    cos, sin = math.cos(theta), math.sin(theta)
    rot_w = s * (gw * abs(cos) + gh * abs(sin))  # bounding box of the rotated, scaled glyph
    rot_h = s * (gw * abs(sin) + gh * abs(cos))
    cx = rot_w / 2 + u[3] * (big - rot_w) if rot_w < big else big / 2
    cy = rot_h / 2 + u[4] * (big - rot_h) if rot_h < big else big / 2
    # inverse map (output -> master): p_in = centre_in + R(-theta) (p_out - c) / s
    a, b, d, e = cos / s, sin / s, -sin / s, cos / s
    coeffs = (a, b, gw / 2 - (a * cx + b * cy), d, e, gh / 2 - (d * cx + e * cy))
    mask = glyph.transform((big, big), Image.Transform.AFFINE, coeffs,
                           resample=Image.Resampling.BILINEAR, fillcolor=0)
    if ss > 1:
        mask = mask.reduce(ss)
    m = np.asarray(mask, dtype=np.float32) * (1.0 / 255.0)

    fg, bg = _colours(rng, params.channels, params.min_contrast)
    img = bg[:, None, None] + (fg - bg)[:, None, None] * m[None]
    sigma = params.noise[0] + u[5] * (params.noise[1] - params.noise[0])
    if sigma > 0:
        img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0.0, 1.0), label


# --------------------------------------------------------------------------------------------- dataset
class GeneratedDataset(Dataset):
    """Base of the embedded, generated datasets (``digits``, ``bouncing_digits_av``): ``len(ds) == length``,
    labels ``0..9``, samples a pure function of ``(params, split, index)``; ``tag`` names the dataset in
    messages. ``params`` has ``length`` and ``sample_shape()``; ``split`` is ``"train"`` or ``"eval"``.
    Subclasses define ``__getitem__`` (starting with ``index = check_index(self.tag, index, len(self))``).
    """

    tag: ClassVar[str] = ""

    def __init__(self, params: Any, split: str = "train"):
        check_split(self.tag, split)
        self.params, self.split = params, split
        self.num_classes = NUM_CLASSES

    def sample_shape(self) -> Any:
        return self.params.sample_shape()

    def __len__(self) -> int:
        return self.params.length


@DATASETS.register
class Digits(GeneratedDataset):
    """Map-style dataset: ``ds[i] -> (x (C, H, W) float32 in [-1, 1], y int in 0..9)``, ``len(ds) == length``.

    Args:
        params: :class:`DigitsDataParams`.
        split: ``"train"`` or ``"eval"`` (a disjoint random stream of the same distribution).
    """

    Params = DigitsDataParams
    tag = "digits"

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        index = check_index(self.tag, index, len(self))
        img, label = render_digit(self.params, index, self.split)
        return torch.from_numpy(img).mul_(2.0).sub_(1.0), label

    def __repr__(self) -> str:
        p = self.params
        return f"Digits(split={self.split!r}, size={p.size}, channels={p.channels}, length={p.length}, seed={p.seed})"
