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
sample ``i`` the next index whose file loads (deterministic), counted in ``skipped_samples`` (a metric of
the run). A file fails to decode when FFmpeg cannot read it, when its audio holds NaN or Inf samples, and a
WAV whose header declares more samples than the file holds is bad at the probe: a short file is zero-padded,
a damaged one is not. Hidden names ('.DS_Store') are ignored.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor
from torch.utils.data import Dataset

from registry.kinds import DATASETS
from zoo.core.params import DataParams
from zoo.data.errors import ClassFolderChecks, DataError, check_index, normalise_extensions
from zoo.media import MediaInfo, probe_media, read_frames_at, read_media

_SPLIT_STREAM = {"train": 0, "eval": 1}
_VIDEO_EXT = (".mp4", ".mov", ".mkv", ".webm", ".avi")
_AUDIO_EXT = (".wav", ".flac", ".mp3", ".ogg")
_LUMA = torch.tensor([0.299, 0.587, 0.114])


# ---------------------------------------------------------------------------------------------- params
class _MediaFolderParams(DataParams):
    """Fields shared by the three media folders."""

    root: str = Field(..., min_length=1, description="Folder holding one sub-folder per class (sorted names -> ids).")
    eval_root: str | None = Field(
        None, description="Folder of the eval split, same layout; null = the eval split reads `root` too.")
    num_classes: int = Field(..., ge=1, description="Number of class folders; must match what is on disk.")
    on_error: Literal["stop", "skip"] = Field(
        "stop", description="Bad file: 'stop' raises an error naming it; 'skip' reports it once and skips it.")
    seed: int = Field(0, ge=0, description="Seed of the window positions; each (seed, split, index) gives one window.")

    @field_validator("extensions", check_fields=False)
    @classmethod
    def _normalise_extensions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return normalise_extensions(v)


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


# --------------------------------------------------------------------------------------------- dataset
class _MediaFolder(ClassFolderChecks, Dataset):
    """Shared scanning, probing, error reporting and index handling; subclasses define ``_check`` and ``_load``.

    Attributes:
        classes: class folder names, index = label.
        samples: ``[(path, label), ...]`` of the files in use, in sorted order.
        info: ``{path: MediaInfo}`` of the files in use (from the probe).
        bad: ``{path: reason}`` of every file skipped so far (``on_error="skip"``).
    """

    skip_hint: ClassVar[str] = "set on_error: skip to skip"

    def __init__(self, params: Any, split: str = "train"):
        self._open(params, split)
        self.info: dict[str, MediaInfo] = {}
        self.classes, self.samples = self._scan()
        self._probe_all()
        self.num_classes = len(self.classes)

    @property
    def _skip_bad(self) -> bool:
        return self.params.on_error == "skip"

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
        self._keep(good, bad, f"usable {self.what} file")

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

    def stream_rates(self) -> dict[str, float]:
        return self.params.stream_rates()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        index = check_index(self.tag, index, len(self))
        for path, label in self._candidates(index):  # sample i, or the next one whose file loads (on_error: skip)
            try:
                return self._load(path, self._rng(index)), label
            except DataError as e:
                if not self._skip_bad:
                    raise DataError(f"{self.tag}: {e} ({self.skip_hint} bad files)") from e
                self._skip(path, str(e))

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
