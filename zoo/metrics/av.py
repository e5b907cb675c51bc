"""Audio-video metrics for the ``bouncing_digits_av`` data (built as ``cls(params, data_params=..., device=...)``,
called as ``metric(samples, labels) -> dict[str, float]``).

``samples`` is ``{"video": (B, C, T, H, W), "audio": (B, 1, L)}`` in [-1, 1], or the bare tensor of the one
stream the data has; ``labels`` is ``(B,)`` int64 or None. Rates come from ``data_params.stream_rates()``.

* ``av_agreement``: share of clips whose video digit (frame classifier, majority vote over the frames)
  equals the DTMF digit decoded from the audio;
* ``av_sync_ms``: median |offset| in ms between the bounces seen in the video and the nearest burst onset
  heard in the audio (the start burst is not matched), plus ``av_sync_detected``: the share of clips where
  both were found;
* ``video_class_accuracy`` / ``audio_class_accuracy``: share of class-conditional samples whose video
  (resp. audio) digit is the requested label;
* ``video_consistency``: share of clips whose frame classifier reads the same digit in every frame.

:func:`read_clips` gives the same readings per clip (for reports that show which clips fail).

The frame classifier is the project's digit classifier (:func:`zoo.metrics.classifier.get_digit_classifier`)
when its per-clip majority vote is right on at least :data:`MIN_CLIP_ACCURACY` of ``CHECK_CLIPS`` real eval
clips; otherwise the same network is trained on the clips' own labelled frames (seconds on a CPU) and cached
under ``$FMZOO_CACHE`` keyed by a hash of the data fields that shape the frames and :data:`RECIPE`.
At the defaults (16x16 grey, 16 frames) the project classifier is used (per frame 0.95, per clip 0.996 right);
on 1000 real eval clips ``av_agreement`` = ``video_class_accuracy`` = 0.996, ``audio_class_accuracy`` = 1.0,
``av_sync_ms`` = 1.7 ms with ``av_sync_detected`` = 0.97 (a few clips bounce only at the very start or end):
the ceiling the samples' values are read against.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import Tensor

from registry.kinds import METRICS
from zoo.core.params import ZooParams
from zoo.core.protocols import Metric
from zoo.data.bouncing_av import GENERATOR_VERSION, BouncingDigitsAVDataParams, render_clip
from zoo.metrics.classifier import DigitClassifier, cache_dir, fit_classifier, get_digit_classifier
from zoo.metrics.dtmf import burst_onsets, decode_digit, video_bounces

log = logging.getLogger(__name__)

DATA_TYPE = "bouncing_digits_av"
MIN_CLIP_ACCURACY = 0.95
CHECK_CLIPS = 200
RECIPE: dict[str, Any] = {
    "arch": "digit-cnn-v1", "width": 16, "feature_dim": 128, "max_work_size": 32,
    "train_clips": 1500, "frames_per_clip": 4, "epochs": 2, "batch_size": 64, "lr": 5e-3,
    "weight_decay": 1e-4, "label_smoothing": 0.05, "warmup_fraction": 0.15, "seed": 0,
}
"""Recipe of the fallback frame classifier (trained on the data's own train-split frames); part of its cache key."""
_CHUNK = 100  # clips rendered at a time
_FRAME_FIELDS = ("size", "channels", "fps", "duration_s", "speed", "scale", "stroke", "min_contrast")


# ------------------------------------------------------------------------------------- frame classifier
def _real_video(dp: BouncingDigitsAVDataParams, split: str, n: int, start: int = 0) -> tuple[Tensor, Tensor]:
    """Clips ``start .. start + n - 1``: ``(video (n, C, T, H, W) in [-1, 1], labels (n,) int64)``."""
    vp = dp.model_copy(update={"streams": ("video",)})
    xs, ys = zip(*(render_clip(vp, i, split) for i in range(start, start + n)))
    return torch.from_numpy(np.stack([x["video"] for x in xs])).mul_(2).sub_(1), torch.tensor(ys)


@torch.no_grad()
def frame_probs(classifier: DigitClassifier, video: Tensor, batch_size: int = 500) -> Tensor:
    """Class probabilities of every frame: ``video (B, C, T, H, W)`` -> ``(B, T, classes)`` float32 (CPU)."""
    B, C, T, H, W = video.shape
    frames = video.transpose(1, 2).reshape(B * T, C, H, W).clamp(-1, 1)
    dev = next(classifier.parameters()).device
    probs = torch.cat([classifier.logits(c.to(dev)).float().softmax(1).cpu() for c in frames.split(batch_size)])
    return probs.view(B, T, -1)


def vote(probs: Tensor) -> Tensor:
    """Majority vote over frames: ``probs (B, T, classes)`` -> digits ``(B,)`` int64 (ties go to the digit with
    the larger summed probability)."""
    T = probs.shape[1]
    votes = F.one_hot(probs.argmax(2), probs.shape[2]).sum(1).float()
    return (votes + probs.sum(1) / (T + 1)).argmax(1)


def clip_digits(classifier: DigitClassifier, video: Tensor, batch_size: int = 500) -> Tensor:
    """Majority vote of the frame classifier: ``video (B, C, T, H, W)`` -> digits ``(B,)`` int64."""
    return vote(frame_probs(classifier, video, batch_size))


def _frame_cache_path(dp: BouncingDigitsAVDataParams) -> Path:
    blob = json.dumps({"data": {k: getattr(dp, k) for k in _FRAME_FIELDS}, "generator": GENERATOR_VERSION,
                       "recipe": RECIPE}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return cache_dir() / f"bouncing_av_frame_classifier_{dp.size}px_c{dp.channels}_{key}.safetensors"


def _new_net(dp: BouncingDigitsAVDataParams) -> DigitClassifier:
    return DigitClassifier(dp.size, dp.channels, RECIPE["width"], RECIPE["feature_dim"], RECIPE["max_work_size"])


def train_frame_classifier(dp: BouncingDigitsAVDataParams, device: torch.device | str = "cpu") -> DigitClassifier:
    """Train the fallback classifier on ``train_clips x frames_per_clip`` train-split frames (deterministic;
    global RNG untouched; works under ``torch.no_grad()``)."""
    r, device = RECIPE, torch.device(device)
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(r["seed"])
        model = _new_net(dp)
        gen = torch.Generator().manual_seed(r["seed"])
        xs, ys = [], []
        for start in range(0, r["train_clips"], _CHUNK):  # keep only prepared (<= 32 px) frames in memory
            video, y = _real_video(dp, "train", min(_CHUNK, r["train_clips"] - start), start)
            pick = torch.randint(0, video.shape[2], (len(y), r["frames_per_clip"]), generator=gen)
            frames = video.transpose(1, 2)[torch.arange(len(y))[:, None], pick].flatten(0, 1)  # (n, C, H, W)
            xs.append(model.prepare(frames))
            ys.append(y.repeat_interleave(r["frames_per_clip"]))
        x, y = torch.cat(xs).contiguous(memory_format=torch.channels_last), torch.cat(ys)
        fit_classifier(model, x, y, r, device, gen)
    model.train_seconds = time.perf_counter() - t0
    return model.eval()


def _save_atomic(model: DigitClassifier, path: Path, meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def clip_accuracy(classifier: DigitClassifier, dp: BouncingDigitsAVDataParams, n: int = CHECK_CLIPS) -> float:
    """Per-clip majority-vote accuracy of ``classifier`` on the first ``n`` real eval clips."""
    right = 0
    for start in range(0, n, _CHUNK):
        video, y = _real_video(dp, "eval", min(_CHUNK, n - start), start)
        right += int((clip_digits(classifier, video) == y).sum())
    return right / n


@dataclass(frozen=True)
class FrameClassifier:
    """The classifier the video metrics use: ``model`` (frozen, eval mode), ``source`` (``"digits"``: the project's
    digit classifier, or ``"bouncing_av"``: trained on these clips' frames) and ``clip_accuracy`` (majority vote
    on the first ``CHECK_CLIPS`` real eval clips)."""

    model: DigitClassifier
    source: str
    clip_accuracy: float


_LOADED: dict[tuple[str, str], FrameClassifier] = {}


def get_frame_classifier(dp: BouncingDigitsAVDataParams, device: torch.device | str | None = None) -> FrameClassifier:
    """The frame classifier for ``dp``'s clips on ``device`` (kept in memory for the process).

    Order: a cached fallback classifier for these data fields; else the project's digit classifier if its
    clip accuracy reaches :data:`MIN_CLIP_ACCURACY`; else a fallback trained now and written to the cache
    atomically.
    """
    device = torch.device(device or "cpu")
    path = _frame_cache_path(dp)
    key = (str(path), str(device))
    if key in _LOADED:
        return _LOADED[key]
    model: DigitClassifier | None = None
    if path.is_file():
        try:
            model = _new_net(dp)
            model.load_state_dict(load_file(str(path)))
            log.info("%s frame classifier: loaded %s", DATA_TYPE, path)
        except Exception as e:  # a truncated or foreign file: retrain rather than fail
            warnings.warn(f"ignoring unreadable cached frame classifier {path}: {e}", stacklevel=2)
            model = None
    source = "bouncing_av"
    if model is None:
        digits = get_digit_classifier(dp.size, dp.channels, device)
        acc = clip_accuracy(digits, dp)
        if acc >= MIN_CLIP_ACCURACY:
            model, source = digits, "digits"
        else:
            log.info("digit classifier: clip accuracy %.3f < %.2f on %s clips; training a frame classifier",
                     acc, MIN_CLIP_ACCURACY, DATA_TYPE)
            model = train_frame_classifier(dp, device)
            _save_atomic(model, path, {"generator": GENERATOR_VERSION, "recipe": json.dumps(RECIPE, sort_keys=True)})
            log.info("%s frame classifier: trained in %.1f s, saved to %s", DATA_TYPE, model.train_seconds, path)
    if source == "bouncing_av":
        model = model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
        acc = clip_accuracy(model, dp)
    if acc < MIN_CLIP_ACCURACY:
        warnings.warn(f"frame classifier for {DATA_TYPE} reaches only {acc:.3f} clip accuracy on real clips "
                      f"(< {MIN_CLIP_ACCURACY}); the video digit metrics are less reliable", stacklevel=2)
    _LOADED[key] = FrameClassifier(model, source, acc)
    return _LOADED[key]


# --------------------------------------------------------------------------------------------- metrics
def _data_problems(name: str, data: Any, needs: tuple[str, ...]) -> Iterable[tuple[str, str]]:
    """``("", message)`` pairs (the caller adds the metric's path) when ``data`` cannot feed metric ``name``."""
    data = data.data_space()
    if data.type != DATA_TYPE:
        yield "", f"{name} needs data.type {DATA_TYPE!r} (digit glyphs + DTMF tones), got {data.type!r}"
        return
    missing = [s for s in needs if s not in data.streams]
    if missing:
        yield "", (f"{name} needs the data stream(s) {missing}, but data.streams is {list(data.streams)}; "
                   f"add {' and '.join(repr(s) for s in missing)} to data.streams")


class _AVMetric(Metric):
    """Shared plumbing: data checks, stream selection, finiteness."""

    name: str = ""
    needs: tuple[str, ...] = ()
    Params: Any = None

    def __init__(self, params: Any, data_params: Any, device: torch.device | str = "cpu"):
        probs = list(_data_problems(self.name, data_params, self.needs))
        if probs:
            raise ValueError(probs[0][1])
        self.params, self.data_params, self.device = params, data_params, torch.device(device)
        self.rates = data_params.stream_rates()
        self.classifier = get_frame_classifier(data_params, self.device) if "video" in self.needs else None

    def clip_readings(self, samples: Any) -> list[dict[str, Any]]:
        """Every reading of :func:`read_clips` per clip (the same for each AV metric)."""
        return read_clips(samples, self.data_params, self.device)

    def _streams(self, samples: Any) -> dict[str, Tensor] | None:
        """The needed streams (clamped to [-1, 1], on the CPU), or None (with a warning) if any is not finite."""
        if isinstance(samples, dict):
            missing = [s for s in self.needs if s not in samples]
            if missing:
                raise ValueError(f"{self.name}: samples lack stream(s) {missing} (got {sorted(samples)})")
            out = {s: samples[s] for s in self.needs}
        elif len(self.data_params.streams) == 1 and self.needs == self.data_params.streams:
            out = {self.needs[0]: samples}
        else:
            raise ValueError(f"{self.name}: expected samples as a dict with {list(self.needs)}, got a "
                             f"{type(samples).__name__}")
        shapes = self.data_params.sample_shape()
        shapes = shapes if isinstance(shapes, dict) else {self.data_params.streams[0]: shapes}
        for s, x in out.items():
            if x.ndim != len(shapes[s]) + 1:
                raise ValueError(f"{self.name}: {s} samples must be (B, {', '.join(map(str, shapes[s]))}), "
                                 f"got {tuple(x.shape)}")
            if not bool(torch.isfinite(x).all()):
                warnings.warn(f"{self.name}: {s} samples contain NaN or inf; the metric is NaN", stacklevel=3)
                return None
        return {s: x.detach().float().cpu().clamp(-1, 1) for s, x in out.items()}

    def _video_digits(self, video: Tensor) -> Tensor:
        return clip_digits(self.classifier.model, video, getattr(self.params, "batch_size", 500))

    def _audio_digits(self, audio: Tensor) -> Tensor:
        """``(B, 1, L)`` -> ``(B,)`` int64 digits, -1 where no digit was decoded."""
        digits = [decode_digit(a[0], self.rates["audio"]) for a in audio]
        return torch.tensor([-1 if d is None else d for d in digits], dtype=torch.int64)

    @staticmethod
    def _labels(name: str, labels: Tensor | None, n: int) -> Tensor:
        if labels is None:
            raise ValueError(f"{name} needs the requested labels (class-conditional samples)")
        labels = torch.as_tensor(labels).reshape(-1).cpu().long()
        if len(labels) != n:
            raise ValueError(f"{name}: {n} samples but {len(labels)} labels")
        return labels


class AVAgreementMetricParams(ZooParams):
    """Share of clips whose video digit equals the digit decoded from their audio."""

    type: Literal["av_agreement"] = Field(..., description="Video digit (classifier) == audio digit (DTMF) share.")
    batch_size: int = Field(500, gt=0, description="Frames per classifier forward pass.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        yield from _data_problems("av_agreement", spec.data, ("video", "audio"))


@METRICS.register
class AVAgreement(_AVMetric):
    """``metric({"video": (B, C, T, H, W), "audio": (B, 1, L)}, labels ignored) -> {"av_agreement": [0, 1]}``."""

    Params = AVAgreementMetricParams
    higher_is_better = True
    name, needs = "av_agreement", ("video", "audio")

    def __call__(self, samples: Any, labels: Tensor | None = None) -> dict[str, float]:
        x = self._streams(samples)
        if x is None:
            return {"av_agreement": math.nan}
        agree = self._video_digits(x["video"]) == self._audio_digits(x["audio"])
        return {"av_agreement": agree.float().mean().item()}


def sync_offsets(video: Tensor, audio: Tensor, fps: float, sample_rate: float, start_s: float = 0.03) -> list[float] | None:
    """|offset| in seconds from each bounce of one clip's ``video (C, T, H, W)`` to the nearest burst onset of its
    ``audio (1, L)`` at or after ``start_s``; None when the clip has no bounce or no such onset."""
    bounces = video_bounces(video, fps)
    onsets = np.array([t for t in burst_onsets(audio[0], sample_rate) if t >= start_s])
    if not bounces or not len(onsets):
        return None
    return [float(np.abs(onsets - b).min()) for b in bounces]


class AVSyncMetricParams(ZooParams):
    """Offset between the bounces seen in the video and the burst onsets heard in the audio."""

    type: Literal["av_sync_ms"] = Field(..., description="Median |video bounce - audio onset| in ms.")
    start_s: float = Field(0.03, ge=0, description="Onsets before this time (s) are the start burst: not matched.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        yield from _data_problems("av_sync_ms", spec.data, ("video", "audio"))


@METRICS.register
class AVSync(_AVMetric):
    """``metric({"video": ..., "audio": ...}, labels ignored) -> {"av_sync_ms": float >= 0 (NaN when no clip has
    both a video bounce and an audio onset), "av_sync_detected": share of such clips}``.

    Every video bounce is matched to the nearest audio onset of its clip; the median is over all matches.
    """

    Params = AVSyncMetricParams

    @classmethod
    def directions(cls, params: Any) -> dict[str, bool]:
        return {"av_sync_ms": False, "av_sync_detected": True}
    name, needs = "av_sync_ms", ("video", "audio")

    def __call__(self, samples: Any, labels: Tensor | None = None) -> dict[str, float]:
        x = self._streams(samples)
        if x is None:
            return {"av_sync_ms": math.nan, "av_sync_detected": math.nan}
        fps, sr = self.rates["video"], self.rates["audio"]
        offsets, detected = [], 0
        for v, a in zip(x["video"], x["audio"]):
            got = sync_offsets(v, a, fps, sr, self.params.start_s)
            if got is not None:
                detected += 1
                offsets += got
        return {"av_sync_ms": float(np.median(offsets)) * 1e3 if offsets else math.nan,
                "av_sync_detected": detected / max(len(x["video"]), 1)}


class VideoClassAccuracyMetricParams(ZooParams):
    """Share of class-conditional clips whose video digit is the requested label."""

    type: Literal["video_class_accuracy"] = Field(..., description="Frame-classifier (majority vote) accuracy.")
    batch_size: int = Field(500, gt=0, description="Frames per classifier forward pass.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        yield from _data_problems("video_class_accuracy", spec.data, ("video",))


@METRICS.register
class VideoClassAccuracy(_AVMetric):
    """``metric(video (B, C, T, H, W) or {"video": ...}, labels (B,)) -> {"video_class_accuracy": [0, 1]}``."""

    Params = VideoClassAccuracyMetricParams
    higher_is_better = True
    name, needs = "video_class_accuracy", ("video",)

    def __call__(self, samples: Any, labels: Tensor | None) -> dict[str, float]:
        x = self._streams(samples)
        if x is None:
            return {self.name: math.nan}
        y = self._labels(self.name, labels, len(x["video"]))
        return {self.name: (self._video_digits(x["video"]) == y).float().mean().item()}


class AudioClassAccuracyMetricParams(ZooParams):
    """Share of class-conditional clips whose audio (DTMF) digit is the requested label."""

    type: Literal["audio_class_accuracy"] = Field(..., description="DTMF-decoder accuracy on conditional samples.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        yield from _data_problems("audio_class_accuracy", spec.data, ("audio",))


@METRICS.register
class AudioClassAccuracy(_AVMetric):
    """``metric(audio (B, 1, L) or {"audio": ...}, labels (B,)) -> {"audio_class_accuracy": [0, 1]}``."""

    Params = AudioClassAccuracyMetricParams
    higher_is_better = True
    name, needs = "audio_class_accuracy", ("audio",)

    def __call__(self, samples: Any, labels: Tensor | None) -> dict[str, float]:
        x = self._streams(samples)
        if x is None:
            return {self.name: math.nan}
        y = self._labels(self.name, labels, len(x["audio"]))
        return {self.name: (self._audio_digits(x["audio"]) == y).float().mean().item()}


class VideoConsistencyMetricParams(ZooParams):
    """Share of clips whose frame classifier reads one digit in every frame."""

    type: Literal["video_consistency"] = Field(..., description="Share of clips read as one digit in every frame.")
    batch_size: int = Field(500, gt=0, description="Frames per classifier forward pass.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        yield from _data_problems("video_consistency", spec.data, ("video",))


@METRICS.register
class VideoConsistency(_AVMetric):
    """``metric(video (B, C, T, H, W) or {"video": ...}, labels ignored) -> {"video_consistency": [0, 1]}``.

    A clip counts when the frame classifier's argmax is the same digit in all T frames (a glyph that morphs
    into another digit mid-clip does not). Real eval clips of ``specs/selfflow_av.json``'s data (8 frames)
    read 0.965 on 200 clips; at the data defaults (16 frames, smaller glyphs) 0.665.
    """

    Params = VideoConsistencyMetricParams
    higher_is_better = True
    name, needs = "video_consistency", ("video",)

    def __call__(self, samples: Any, labels: Tensor | None = None) -> dict[str, float]:
        x = self._streams(samples)
        if x is None:
            return {self.name: math.nan}
        digits = frame_probs(self.classifier.model, x["video"], self.params.batch_size).argmax(2)  # (B, T)
        return {self.name: (digits == digits[:, :1]).all(1).float().mean().item()}


# ------------------------------------------------------------------------------------ per-clip readings
def read_clips(samples: Any, data_params: Any, device: torch.device | str | None = None, *,
               start_s: float = 0.03, batch_size: int = 500) -> list[dict[str, Any]]:
    """What the metrics read in each clip of ``bouncing_digits_av`` samples, one JSON-ready dict per clip.

    ``samples``: ``{"video": (B, C, T, H, W), "audio": (B, 1, L)}`` in [-1, 1] (either stream may be absent) or
    the bare tensor of a one-stream data. Keys (None where the stream is missing or nothing was found):
    ``video_digit`` (majority vote of the frame classifier, as ``video_class_accuracy``), ``frame_digits``
    (T ints), ``consistent`` (every frame gives one digit, as ``video_consistency``), ``audio_digit`` (DTMF
    decoder, as ``audio_class_accuracy``), ``sync_ms`` (median |video bounce - nearest audio onset| of the
    clip in ms, as ``av_sync_ms``) and ``finite`` (False: the clip holds NaN/inf and every reading is None).
    """
    data_params = data_params.data_space()
    if data_params.type != DATA_TYPE:
        raise ValueError(f"read_clips needs data.type {DATA_TYPE!r}, got {data_params.type!r}")
    if not isinstance(samples, dict):
        samples = {data_params.streams[0]: samples}
    x = {s: samples[s].detach().float().cpu() for s in ("video", "audio") if s in samples}
    n = next(iter(x.values())).shape[0]
    finite = torch.ones(n, dtype=torch.bool)
    for s, t in x.items():
        finite &= torch.isfinite(t.flatten(1)).all(1)
        x[s] = torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
    rates = data_params.stream_rates()
    out: list[dict[str, Any]] = [{"video_digit": None, "frame_digits": None, "consistent": None,
                                  "audio_digit": None, "sync_ms": None, "finite": bool(ok)} for ok in finite]
    if "video" in x:
        probs = frame_probs(get_frame_classifier(data_params, device).model, x["video"], batch_size)
        frames, digits = probs.argmax(2), vote(probs)
        for r, f, d in zip(out, frames.tolist(), digits.tolist()):
            r.update(video_digit=d, frame_digits=f, consistent=len(set(f)) == 1)
    if "audio" in x:
        for r, a in zip(out, x["audio"]):
            r["audio_digit"] = decode_digit(a[0], rates["audio"])
    if "video" in x and "audio" in x:
        for r, v, a in zip(out, x["video"], x["audio"]):
            got = sync_offsets(v, a, rates["video"], rates["audio"], start_s)
            r["sync_ms"] = None if got is None else float(np.median(got)) * 1e3
    for r in out:
        if not r["finite"]:
            r.update({k: None for k in r if k != "finite"})
    return out
