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

import os
import warnings
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator
from torch import Tensor
from torch.utils.data import Dataset

from registry.kinds import DATASETS
from zoo.core.params import ZooParams
from zoo.data.errors import DataError, DataWarning

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_MAX_LISTED = 20  # bad files named in one error message


class ImageFolderDataParams(ZooParams):
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
    num_workers: int = Field(0, ge=0, description="data-loader worker processes")

    presets: ClassVar[dict[str, dict]] = {"tiny": {"size": 16}}

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(("." + e.lower().lstrip(".")) for e in v)
        if any(e == "." for e in out):
            raise ValueError("empty extension")
        return out

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


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


# --------------------------------------------------------------------------------------------- dataset
@DATASETS.register
class ImageFolder(Dataset):
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

    def __init__(self, params: ImageFolderDataParams, split: str = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"image_folder: unknown split {split!r} (known: train, eval)")
        self.params, self.split = params, split
        self.root = Path(params.eval_root if split == "eval" and params.eval_root else params.root).expanduser()
        self.bad: dict[str, str] = {}
        self.classes, self.samples = self._scan()
        if params.check_files:
            self._check_all()
        self.num_classes = len(self.classes)

    # ------------------------------------------------------------------------------------------ scan
    def _scan(self) -> tuple[list[str], list[tuple[str, int]]]:
        p = self.params
        if not self.root.exists():
            raise DataError(f"image_folder: root {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise DataError(f"image_folder: root {str(self.root)!r} is not a directory")
        entries = _visible(os.listdir(self.root))
        classes = [n for n in entries if (self.root / n).is_dir()]
        if not classes:
            raise DataError(f"image_folder: no class sub-folders in {str(self.root)!r} (expected root/<class>/<image>)")
        if len(classes) != p.num_classes:
            shown = ", ".join(classes[:_MAX_LISTED]) + (", ..." if len(classes) > _MAX_LISTED else "")
            raise DataError(f"image_folder: {str(self.root)!r} has {len(classes)} class folders ({shown}) "
                            f"but num_classes is {p.num_classes}")

        bad: list[tuple[str, str]] = [(str(self.root / n), "file outside any class folder")
                                      for n in entries if n not in classes]
        samples: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            found = 0
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames[:] = _visible(dirnames)
                for fn in _visible(filenames):
                    path = os.path.join(dirpath, fn)
                    if os.path.splitext(fn)[1].lower() in p.extensions:
                        samples.append((path, label))
                        found += 1
                    else:
                        bad.append((path, f"not an image file (extension not in {list(p.extensions)})"))
            if not found:
                raise DataError(f"image_folder: class folder {str(self.root / name)!r} holds no image files "
                                f"with extensions {list(p.extensions)}")
        self._report(bad)
        return classes, samples

    def _check_all(self) -> None:
        """Decode every file now (``check_files``); drop (``skip_bad``) or report the bad ones."""
        bad, good = [], []
        for path, label in self.samples:
            try:
                load_image(Path(path), self.params.channels)
                good.append((path, label))
            except _DECODE_ERRORS as e:
                bad.append((path, f"cannot be decoded ({type(e).__name__}: {e})"))
        self._report(bad)
        self.samples = good
        missing = sorted(set(range(len(self.classes))) - {y for _, y in good})
        if missing:
            raise DataError(f"image_folder: no readable image left in class folder(s) "
                            f"{[str(self.root / self.classes[y]) for y in missing]}")

    def _report(self, bad: list[tuple[str, str]]) -> None:
        """Raise one DataError naming the bad files, or (``skip_bad``) warn once per file and record it."""
        if not bad:
            return
        if not self.params.skip_bad:
            lines = [f"  {path}: {why}" for path, why in bad[:_MAX_LISTED]]
            more = [f"  ... and {len(bad) - _MAX_LISTED} more"] if len(bad) > _MAX_LISTED else []
            raise DataError("image_folder: bad files (set skip_bad to skip them):\n" + "\n".join(lines + more))
        for path, why in bad:
            self._skip(path, why)

    def _skip(self, path: str, why: str) -> None:
        if path not in self.bad:
            self.bad[path] = why
            warnings.warn(f"image_folder: skipping {path}: {why}", DataWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------ load
    def sample_shape(self) -> tuple[int, int, int]:
        return self.params.sample_shape()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self.samples)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"image_folder: index {index} out of range for length {n}")
        for k in range(n):  # sample i, or the next one whose file loads (skip_bad)
            path, label = self.samples[(index + k) % n]
            if path in self.bad:
                continue
            try:
                image = load_image(Path(path), self.params.channels)
            except _DECODE_ERRORS as e:
                why = f"cannot be decoded ({type(e).__name__}: {e})"
                if not self.params.skip_bad:
                    raise DataError(f"image_folder: {path}: {why} (set skip_bad to skip bad files)") from e
                self._skip(path, why)
                continue
            arr = center_crop_arr(image, self.params.size)
            x = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
            x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
            return x.div_(127.5).sub_(1.0), label
        raise DataError(f"image_folder: no file under {str(self.root)!r} could be decoded")

    def __repr__(self) -> str:
        return (f"ImageFolder(root={str(self.root)!r}, split={self.split!r}, classes={len(self.classes)}, "
                f"files={len(self.samples)}, size={self.params.size}, channels={self.params.channels})")
