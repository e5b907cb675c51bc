"""``video_folder``, ``audio_folder`` and ``av_folder``: class-labelled media files on disk.

Layout (as ``image_folder``)::

    root/
      cat/   a.mp4  b.mkv  sub/c.webm ...     -> class 0   (sorted folder names -> class ids)
      dog/   ...                               -> class 1

A sample is a time window of one file, decoded lazily in ``__getitem__`` with PyAV (:mod:`zoo.media`):

* ``video_folder``: ``(C, T, size, size)`` float32 in [-1, 1]: ``T = frames`` frames at ``fps`` taken at
  times ``t0 + k / fps`` (the source frame nearest in time, so any source rate works), the short side resized
  to ``size`` (antialiased bilinear) and centre-cropped.
* ``audio_folder``: ``(1, L)`` float32 in [-1, 1], ``L = round(duration_s * sample_rate)``: mixed down to
  mono, resampled to ``sample_rate``; a file shorter than the window is zero-padded at the end.
* ``av_folder``: ``{"video": (C, T, size, size), "audio": (1, L)}`` of the same window,
  ``L = round(frames / fps * sample_rate)`` (audio zero-padded where the track ends early).

The window start of sample ``index`` is drawn from ``numpy.random.default_rng([seed, split_stream, index])``
(``train`` = 0, ``eval`` = 1), so a sample is a fixed function of ``(seed, split, index)`` and training
resumes exactly. ``split="eval"`` reads ``eval_root`` when set, else the same files as ``train`` (with other
windows: a held-out set needs ``eval_root``).

Every file is probed when the dataset is built (the container opens, the wanted tracks exist, a video is at
least one window long), so bad files are found before training starts. Bad files are never skipped
silently: with ``on_error="stop"`` a :class:`DataError` names them; with ``on_error="skip"`` each is
reported once (a :class:`DataWarning` naming the file) and dropped; a file that fails to decode later makes
sample ``i`` the next index whose file loads (deterministic). Hidden names ('.DS_Store') are ignored.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor
from torch.utils.data import Dataset

from registry.kinds import DATASETS
from zoo.core.params import ZooParams
from zoo.data.errors import DataError, DataWarning
from zoo.media import MediaInfo, probe_media, read_frames_at, read_media

_SPLIT_STREAM = {"train": 0, "eval": 1}
_MAX_LISTED = 20  # bad files named in one error message
_VIDEO_EXT = (".mp4", ".mov", ".mkv", ".webm", ".avi")
_AUDIO_EXT = (".wav", ".flac", ".mp3", ".ogg")
_LUMA = torch.tensor([0.299, 0.587, 0.114])


# ---------------------------------------------------------------------------------------------- params
class _MediaFolderParams(ZooParams):
    """Fields shared by the three media folders."""

    root: str = Field(..., min_length=1, description="Folder holding one sub-folder per class (sorted names -> ids).")
    eval_root: str | None = Field(
        None, description="Folder of the eval split, same layout; null = the eval split reads `root` too.")
    num_classes: int = Field(..., ge=1, description="Number of class folders; must match what is on disk.")
    on_error: Literal["stop", "skip"] = Field(
        "stop", description="Bad file: 'stop' raises an error naming it; 'skip' reports it once and skips it.")
    seed: int = Field(0, ge=0, description="Seed of the window positions; each (seed, split, index) gives one window.")
    num_workers: int = Field(0, ge=0, description="data-loader worker processes")

    @field_validator("extensions", check_fields=False)
    @classmethod
    def _normalise_extensions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(("." + e.lower().lstrip(".")) for e in v)
        if any(e == "." for e in out):
            raise ValueError("empty extension")
        return out


class _VideoFields(_MediaFolderParams):
    frames: int = Field(16, ge=1, le=1024, description="Frames per sample (T).")
    fps: float = Field(8.0, gt=0, le=240, description="Frame rate of a sample; source frames are picked by time.")
    size: int = Field(64, ge=8, le=4096, description="Output side: resize the shorter side to it, then center-crop.")
    channels: Literal[1, 3] = Field(3, description="1 = greyscale (luma), 3 = RGB.")
    extensions: tuple[str, ...] = Field(
        _VIDEO_EXT, min_length=1, description="Video file extensions (case-insensitive).")

    def video_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of one video sample."""
        return (self.channels, self.frames, self.size, self.size)


class VideoFolderDataParams(_VideoFields):
    """Videos under ``root/<class>/...``; samples are ``(C, T, size, size)`` float32 in [-1, 1]."""

    type: Literal["video_folder"] = Field(..., description="Class-labelled video clips, one sub-folder per class.")

    presets: ClassVar[dict[str, dict]] = {"tiny": {"frames": 4, "fps": 8.0, "size": 16}}

    def sample_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of one sample."""
        return self.video_shape()

    def stream_rates(self) -> dict[str, float]:
        return {"video": self.fps}


class AudioFolderDataParams(_MediaFolderParams):
    """Audio files under ``root/<class>/...``; samples are ``(1, L)`` float32 in [-1, 1]."""

    type: Literal["audio_folder"] = Field(..., description="Class-labelled audio clips, one sub-folder per class.")
    sample_rate: int = Field(16000, ge=1000, le=192000, description="Output sample rate in Hz (files are resampled).")
    duration_s: float = Field(1.0, gt=0, le=600, description="Window length in seconds; shorter files are zero-padded.")
    extensions: tuple[str, ...] = Field(
        _AUDIO_EXT, min_length=1, description="Audio file extensions (case-insensitive).")

    presets: ClassVar[dict[str, dict]] = {"tiny": {"sample_rate": 8000, "duration_s": 0.25}}

    @property
    def length(self) -> int:
        """Samples per window, ``round(duration_s * sample_rate)``."""
        return max(1, round(self.duration_s * self.sample_rate))

    def sample_shape(self) -> tuple[int, int]:
        """``(1, L)`` of one sample."""
        return (1, self.length)

    def stream_rates(self) -> dict[str, int]:
        return {"audio": self.sample_rate}


class AVFolderDataParams(_VideoFields):
    """Videos with sound under ``root/<class>/...``; samples are ``{"video": (C, T, S, S), "audio": (1, L)}``."""

    type: Literal["av_folder"] = Field(..., description="Class-labelled video clips with audio, one folder per class.")
    sample_rate: int = Field(16000, ge=1000, le=192000, description="Output audio sample rate in Hz.")

    presets: ClassVar[dict[str, dict]] = {"tiny": {"frames": 4, "fps": 8.0, "size": 16, "sample_rate": 8000}}

    @property
    def audio_length(self) -> int:
        """Audio samples per window, ``round(frames / fps * sample_rate)``."""
        return max(1, round(self.frames / self.fps * self.sample_rate))

    def sample_shape(self) -> dict[str, tuple[int, ...]]:
        """``{"video": (C, T, H, W), "audio": (1, L)}`` of one sample."""
        return {"video": self.video_shape(), "audio": (1, self.audio_length)}

    def stream_rates(self) -> dict[str, float]:
        return {"video": self.fps, "audio": self.sample_rate}


# --------------------------------------------------------------------------------------------- helpers
def resize_crop_video(frames: np.ndarray, size: int, channels: int) -> Tensor:
    """uint8 ``(T, H, W, 3)`` -> float32 ``(C, T, size, size)`` in [-1, 1]: the short side resized to ``size``
    (bilinear, antialiased), centre-cropped; ``channels == 1`` takes the luma (ITU-R 601)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    if channels == 1:
        x = torch.einsum("tchw,c->thw", x, _LUMA).unsqueeze(1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    return x.div_(127.5).sub_(1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def _fit(audio: np.ndarray, length: int) -> Tensor:
    """Mono audio ``(n,)`` cut or zero-padded at the end to ``(1, length)`` float32 in [-1, 1]."""
    out = np.zeros(length, np.float32)
    out[:min(length, len(audio))] = audio[:length]
    return torch.from_numpy(out).clamp_(-1.0, 1.0).unsqueeze(0)


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


# --------------------------------------------------------------------------------------------- dataset
class _MediaFolder(Dataset):
    """Shared scanning, probing, error reporting and index handling; subclasses define ``_check`` and ``_load``.

    Attributes:
        classes: class folder names, index = label.
        samples: ``[(path, label), ...]`` of the files in use, in sorted order.
        info: ``{path: MediaInfo}`` of the files in use (from the probe).
        bad: ``{path: reason}`` of every file skipped so far (``on_error="skip"``).
    """

    tag: ClassVar[str] = ""
    what: ClassVar[str] = ""  # "video" / "audio": the word in messages

    @property
    def _a_what(self) -> str:
        return ("an " if self.what[:1] in "aeiou" else "a ") + self.what

    def __init__(self, params: Any, split: str = "train"):
        if split not in _SPLIT_STREAM:
            raise ValueError(f"{self.tag}: unknown split {split!r} (known: {', '.join(_SPLIT_STREAM)})")
        self.params, self.split = params, split
        self.root = Path(params.eval_root if split == "eval" and params.eval_root else params.root).expanduser()
        self.bad: dict[str, str] = {}
        self.info: dict[str, MediaInfo] = {}
        self.classes, self.samples = self._scan()
        self._probe_all()
        self.num_classes = len(self.classes)

    # ------------------------------------------------------------------------------------------ scan
    def _scan(self) -> tuple[list[str], list[tuple[str, int]]]:
        p = self.params
        if not self.root.exists():
            raise DataError(f"{self.tag}: root {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise DataError(f"{self.tag}: root {str(self.root)!r} is not a directory")
        entries = _visible(os.listdir(self.root))
        classes = [n for n in entries if (self.root / n).is_dir()]
        if not classes:
            raise DataError(f"{self.tag}: no class sub-folders in {str(self.root)!r} (expected root/<class>/<file>)")
        if len(classes) != p.num_classes:
            shown = ", ".join(classes[:_MAX_LISTED]) + (", ..." if len(classes) > _MAX_LISTED else "")
            raise DataError(f"{self.tag}: {str(self.root)!r} has {len(classes)} class folders ({shown}) "
                            f"but num_classes is {p.num_classes}")
        bad = [(str(self.root / n), "file outside any class folder") for n in entries if n not in classes]
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
                        bad.append((path, f"not {self._a_what} file (extension not in {list(p.extensions)})"))
            if not found:
                raise DataError(f"{self.tag}: class folder {str(self.root / name)!r} holds no {self.what} files "
                                f"with extensions {list(p.extensions)}")
        self._report(bad)
        return classes, samples

    def _probe_all(self) -> None:
        """Probe every file (no decoding); drop (``skip``) or report the bad ones."""
        bad, good = [], []
        for path, label in self.samples:
            try:
                info = probe_media(path)
                why = self._check(info)
            except DataError as e:
                info, why = None, str(e).removeprefix(f"{path}: ").removeprefix(f"{path} ")
            if why:
                bad.append((path, why))
            else:
                self.info[path] = info
                good.append((path, label))
        self._report(bad)
        self.samples = good
        missing = sorted(set(range(len(self.classes))) - {y for _, y in good})
        if missing:
            raise DataError(f"{self.tag}: no usable {self.what} file left in class folder(s) "
                            f"{[str(self.root / self.classes[y]) for y in missing]}")

    def _check(self, info: MediaInfo) -> str | None:
        """Why the probed file cannot be used, or None."""
        raise NotImplementedError

    def _check_video(self, info: MediaInfo) -> str | None:
        p = self.params
        if not info.has_video:
            return "has no video track"
        window = p.frames / p.fps
        if info.video_duration_s + 1e-3 < window:
            return (f"is {info.video_duration_s:.3f} s long, shorter than one window of {p.frames} frames "
                    f"at {p.fps:g} fps ({window:.3f} s)")
        return None

    def _report(self, bad: list[tuple[str, str]]) -> None:
        """Raise one DataError naming the bad files, or (``skip``) warn once per file and record it."""
        if not bad:
            return
        if self.params.on_error == "stop":
            lines = [f"  {path}: {why}" for path, why in bad[:_MAX_LISTED]]
            more = [f"  ... and {len(bad) - _MAX_LISTED} more"] if len(bad) > _MAX_LISTED else []
            raise DataError(f"{self.tag}: bad files (set on_error: skip to skip them):\n" + "\n".join(lines + more))
        for path, why in bad:
            self._skip(path, why)

    def _skip(self, path: str, why: str) -> None:
        if path not in self.bad:
            self.bad[path] = why
            warnings.warn(f"{self.tag}: skipping {path}: {why}", DataWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------ load
    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.params.seed, _SPLIT_STREAM[self.split], index])

    def _load(self, path: str, rng: np.random.Generator) -> Any:
        """One sample of ``path`` (its window drawn from ``rng``). Raises DataError on decode errors."""
        raise NotImplementedError

    def _video_window(self, path: str, rng: np.random.Generator) -> tuple[Tensor, float]:
        """``((C, T, S, S) float32, window start in seconds)`` of a random window of ``path``."""
        p = self.params
        window = p.frames / p.fps
        t0 = float(rng.random()) * max(0.0, self.info[path].video_duration_s - window)
        frames = read_frames_at(path, [t0 + k / p.fps for k in range(p.frames)])
        return resize_crop_video(frames, p.size, p.channels), t0

    def sample_shape(self) -> Any:
        return self.params.sample_shape()

    def stream_rates(self) -> dict[str, float]:
        return self.params.stream_rates()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.tag}: index {index} out of range for length {n}")
        for k in range(n):  # sample i, or the next one whose file loads (on_error: skip)
            path, label = self.samples[(index + k) % n]
            if path in self.bad:
                continue
            try:
                return self._load(path, self._rng(index)), label
            except DataError as e:
                if self.params.on_error == "stop":
                    raise DataError(f"{self.tag}: {e} (set on_error: skip to skip bad files)") from e
                self._skip(path, str(e))
        raise DataError(f"{self.tag}: no file under {str(self.root)!r} could be decoded")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, classes={len(self.classes)}, "
                f"files={len(self.samples)}, sample_shape={self.sample_shape()})")


@DATASETS.register
class VideoFolder(_MediaFolder):
    """Map-style dataset: ``ds[i] -> (x (C, T, size, size) float32 in [-1, 1], y int in 0..num_classes-1)``.

    Args:
        params: :class:`VideoFolderDataParams`.
        split: ``"train"`` reads ``root``; ``"eval"`` reads ``eval_root`` when set, else ``root``.
    """

    Params = VideoFolderDataParams
    tag, what = "video_folder", "video"

    def _check(self, info: MediaInfo) -> str | None:
        return self._check_video(info)

    def _load(self, path: str, rng: np.random.Generator) -> Tensor:
        return self._video_window(path, rng)[0]


@DATASETS.register
class AudioFolder(_MediaFolder):
    """Map-style dataset: ``ds[i] -> (x (1, L) float32 in [-1, 1], y int in 0..num_classes-1)``.

    Args:
        params: :class:`AudioFolderDataParams`.
        split: ``"train"`` reads ``root``; ``"eval"`` reads ``eval_root`` when set, else ``root``.
    """

    Params = AudioFolderDataParams
    tag, what = "audio_folder", "audio"

    def _check(self, info: MediaInfo) -> str | None:
        return None if info.has_audio else "has no audio track"

    def _load(self, path: str, rng: np.random.Generator) -> Tensor:
        p, length = self.params, self.params.length
        total = math.floor(self.info[path].audio_duration_s * p.sample_rate)
        start = int(rng.integers(0, max(0, total - length) + 1))
        clip = read_media(path, want_video=False, sample_rate=p.sample_rate, start_s=start / p.sample_rate,
                          end_s=(start + length) / p.sample_rate)
        return _fit(clip.audio, length)


@DATASETS.register
class AVFolder(_MediaFolder):
    """Map-style dataset: ``ds[i] -> ({"video": (C, T, S, S), "audio": (1, L)} float32 in [-1, 1], y)``.

    Both streams cover the same window ``[t0, t0 + frames / fps)``.

    Args:
        params: :class:`AVFolderDataParams`.
        split: ``"train"`` reads ``root``; ``"eval"`` reads ``eval_root`` when set, else ``root``.
    """

    Params = AVFolderDataParams
    tag, what = "av_folder", "video"

    def _check(self, info: MediaInfo) -> str | None:
        return self._check_video(info) or (None if info.has_audio else "has no audio track")

    def _load(self, path: str, rng: np.random.Generator) -> dict[str, Tensor]:
        p, length = self.params, self.params.audio_length
        video, t0 = self._video_window(path, rng)
        start = round(t0 * p.sample_rate)
        clip = read_media(path, want_video=False, sample_rate=p.sample_rate, start_s=start / p.sample_rate,
                          end_s=(start + length) / p.sample_rate)
        return {"video": video, "audio": _fit(clip.audio, length)}
