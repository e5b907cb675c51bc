"""``image_folder``: class-labelled images on disk, one sub-folder per class.

Layout::

    root/
      cat/   a.png  b.jpg  sub/c.jpeg ...     -> class 0   (sorted folder names -> class ids)
      dog/   ...                               -> class 1

Images are resized so the shorter side equals ``size`` and center-cropped (ADM's ``center_crop_arr``:
halving with a box filter while the image is at least twice the target, then one bicubic resize).

Bad data is never skipped silently. A missing root, no class folders, a class count other than
``num_classes`` or a class folder without images raise :class:`DataError`. A file that is not an image
(its extension is not in ``extensions``) or cannot be decoded raises :class:`DataError` naming it, or,
with ``skip_bad``, is reported once (a :class:`DataWarning` naming the file) and skipped: files found bad
while scanning are dropped from the index; a file found bad while loading sample ``i`` is recorded and
sample ``i`` becomes the next index whose file loads (deterministic). Names starting with '.' (hidden
files such as ``.DS_Store``) are ignored by convention.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator
from torch import Tensor
from torch.utils.data import Dataset

from registry.kinds import DATASETS
from zoo.core.params import DataParams
from zoo.data.errors import ClassFolderChecks, DataError, check_index, normalise_extensions

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageFolderDataParams(DataParams):
    """Images under ``root/<class>/...``; samples are ``(C, size, size)`` float32 in [-1, 1]."""

    type: Literal["image_folder"] = Field(..., description="Class-labelled images, one sub-folder per class.")
    root: str = Field(..., min_length=1, description="Folder holding one sub-folder per class (sorted names -> ids).")
    eval_root: str | None = Field(
        None, description="Folder of the eval split, same layout; null = the eval split reads `root` too.")
    size: int = Field(64, ge=8, le=4096, description="Output side: resize the shorter side to it, then center-crop.")
    channels: Literal[1, 3] = Field(3, description="1 = greyscale (L), 3 = RGB.")
    num_classes: int = Field(..., ge=1, description="Number of class folders; must match what is on disk.")
    extensions: tuple[str, ...] = Field(
        (".png", ".jpg", ".jpeg"), min_length=1, description="Image file extensions (case-insensitive).")
    skip_bad: bool = Field(
        False, description="Skip non-image and corrupt files, reporting each once, instead of stopping the run.")
    check_files: bool = Field(
        False, description="Decode every file when the dataset is built (slow; finds bad files early).")

    presets: ClassVar[dict[str, dict]] = {"tiny": {"size": 16}}

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return normalise_extensions(v)

    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        return (self.channels, self.size, self.size)


# --------------------------------------------------------------------------------------------- helpers
def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: ``image`` (any size) -> ``(size, size[, C])`` uint8 array."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(max(size, round(x * scale)) for x in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def load_image(path: Path, channels: int) -> Image.Image:
    """Decode ``path`` fully into mode ``L`` or ``RGB`` (transparent pixels over white). Raises decode errors."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return im.convert("L" if channels == 1 else "RGB")


# --------------------------------------------------------------------------------------------- dataset
@DATASETS.register
class ImageFolder(ClassFolderChecks, Dataset):
    """Map-style dataset: ``ds[i] -> (x (C, size, size) float32 in [-1, 1], y int in 0..num_classes-1)``.

    Args:
        params: :class:`ImageFolderDataParams`.
        split: ``"train"`` reads ``root``; ``"eval"`` reads ``eval_root`` when set, else ``root``.

    Attributes:
        classes: class folder names, index = label.
        samples: ``[(path, label), ...]`` of the files in use, in sorted order.
        bad: ``{path: reason}`` of every file skipped so far (``skip_bad``).
    """

    Params = ImageFolderDataParams
    tag, what, leaf = "image_folder", "image", "image"
    skip_hint: ClassVar[str] = "set skip_bad to skip"

    def __init__(self, params: ImageFolderDataParams, split: str = "train"):
        self._open(params, split)
        self.classes, self.samples = self._scan()
        if params.check_files:
            self._check_all()
        self.num_classes = len(self.classes)

    @property
    def _skip_bad(self) -> bool:
        return self.params.skip_bad

    def _check_all(self) -> None:
        """Decode every file now (``check_files``); drop (``skip_bad``) or report the bad ones."""
        bad, good = [], []
        for path, label in self.samples:
            try:
                load_image(Path(path), self.params.channels)
                good.append((path, label))
            except _DECODE_ERRORS as e:
                bad.append((path, f"cannot be decoded ({type(e).__name__}: {e})"))
        self._keep(good, bad, "readable image")

    # ------------------------------------------------------------------------------------------ load
    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        index = check_index(self.tag, index, len(self))
        for path, label in self._candidates(index):  # sample i, or the next one whose file loads (skip_bad)
            try:
                image = load_image(Path(path), self.params.channels)
            except _DECODE_ERRORS as e:
                why = f"cannot be decoded ({type(e).__name__}: {e})"
                if not self._skip_bad:
                    raise DataError(f"{self.tag}: {path}: {why} ({self.skip_hint} bad files)") from e
                self._skip(path, why)
                continue
            arr = center_crop_arr(image, self.params.size)
            x = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
            x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
            return x.div_(127.5).sub_(1.0), label

    def __repr__(self) -> str:
        return (f"ImageFolder(root={str(self.root)!r}, split={self.split!r}, classes={len(self.classes)}, "
                f"files={len(self.samples)}, size={self.params.size}, channels={self.params.channels})")
