"""Sample-quality metrics for the ``digits`` data, from a small CNN digit classifier.

The classifier is trained on the digits generator itself (train split, a slightly wider range of
scale / rotation / stroke / noise than the defaults), in seconds on a CPU, and cached on disk under
``$FMZOO_CACHE`` (default ``~/.cache/fmzoo``) in a safetensors file whose name carries a hash of
``(size, channels, digits GENERATOR_VERSION, training recipe)``; any change to one retrains it.

Metrics (``eval.metrics`` entries; built as ``cls(params, data_params=..., device=...)`` and called as
``metric(samples (N, C, H, W) in [-1, 1], labels (N,)) -> dict[str, float]``):

* ``class_accuracy``: share of class-conditional samples that the classifier assigns their requested label;
* ``classifier_fd``: Fréchet distance between the classifier's penultimate features of the samples and
  of ``num_real`` images of the digits eval split (FID's formula with a digits-specific extractor).

The classifier normalises each input image (per channel: minus its mean, over its std + 0.1), so its
features describe digit shape and placement, not the global colour: ``classifier_fd`` does not see a
wrong colour distribution.
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
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from registry.kinds import METRICS
from zoo.core.params import ZooParams
from zoo.core.protocols import Metric
from zoo.data.digits import GENERATOR_VERSION, NUM_CLASSES, DigitsDataParams, render_digit
from zoo.metrics.frechet import feature_stats, frechet_distance

log = logging.getLogger(__name__)

CLASSIFIER_VERSION = "digit-cnn-v1"
RECIPE: dict[str, Any] = {
    "arch": CLASSIFIER_VERSION,
    "width": 16,
    "feature_dim": 128,
    "max_work_size": 32,  # larger inputs are resized to 32x32 inside the classifier
    "train_samples": 6000,
    "epochs": 2,
    "batch_size": 64,
    "lr": 5e-3,
    "weight_decay": 1e-4,
    "label_smoothing": 0.05,
    "warmup_fraction": 0.15,
    "seed": 0,
    "data": {"seed": 777, "scale": [0.45, 0.9], "rotation": [-20.0, 20.0], "stroke": [0.0, 0.06], "noise": [0.0, 0.08]},
    "eval_samples": 2000,
}
"""The training recipe; part of the cache key."""

MIN_ACCURACY = 0.97


# ------------------------------------------------------------------------------------------ the network
def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitClassifier(nn.Module):
    """CNN for ``(N, channels, size, size)`` images in [-1, 1] -> 10 digit classes.

    Inputs larger than ``max_work_size`` are resized (antialiased bilinear) to it, every image is
    normalised per channel, then 5-6 conv layers with two or three 2x2 max-pools, global average pooling,
    a ``feature_dim`` ReLU layer (``features``) and a linear head (``logits``).
    """

    def __init__(self, size: int, channels: int, width: int = 16, feature_dim: int = 128, max_work_size: int = 32):
        super().__init__()
        self.size, self.channels, self.feature_dim = size, channels, feature_dim
        self.work_size = min(size, max_work_size)
        w = width
        extra = [nn.MaxPool2d(2), *_conv(4 * w, 4 * w)] if self.work_size >= 32 else []
        self.body = nn.Sequential(
            *_conv(channels, w), *_conv(w, w), nn.MaxPool2d(2),
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w), *extra, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feat = nn.Sequential(nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, NUM_CLASSES)
        self.eval_accuracy = float("nan")  # set when trained or loaded
        self.train_seconds = float("nan")  # set when trained here

    def prepare(self, x: Tensor) -> Tensor:
        """``(N, C, size, size)`` -> ``(N, C, work, work)`` float32, per-image normalised, channels-last."""
        if x.shape[1:] != (self.channels, self.size, self.size):
            raise ValueError(f"digit classifier: expected images (N, {self.channels}, {self.size}, {self.size}), "
                             f"got {tuple(x.shape)}")
        x = x.float()
        if self.work_size != self.size:
            x = F.interpolate(x, size=(self.work_size, self.work_size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 0.1)
        return x.contiguous(memory_format=torch.channels_last)

    def _trunk(self, x: Tensor, prepared: bool) -> Tensor:
        return self.feat(self.body(x if prepared else self.prepare(x)))

    def features(self, x: Tensor, prepared: bool = False) -> Tensor:
        """``(N, C, H, W)`` -> penultimate features ``(N, feature_dim)`` (non-negative)."""
        return self._trunk(x, prepared)

    def logits(self, x: Tensor, prepared: bool = False) -> Tensor:
        """``(N, C, H, W)`` -> class logits ``(N, 10)``."""
        return self.head(self._trunk(x, prepared))

    forward = logits

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """``(N, C, H, W)`` -> predicted labels ``(N,)`` int64 (batched, no grad)."""
        dev = next(self.parameters()).device
        return torch.cat([self.logits(c.to(dev)).argmax(1).cpu() for c in x.split(batch_size)])

    @torch.no_grad()
    def batched_features(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, feature_dim)`` float32 on the CPU (batched, no grad)."""
        dev = next(self.parameters()).device
        return torch.cat([self.features(c.to(dev)).float().cpu() for c in x.split(batch_size)])


# ------------------------------------------------------------------------------------- train and cache
def cache_dir() -> Path:
    """``$FMZOO_CACHE``, else ``~/.cache/fmzoo``."""
    return Path(os.environ.get("FMZOO_CACHE") or Path.home() / ".cache" / "fmzoo").expanduser()


def cache_key(size: int, channels: int) -> str:
    blob = json.dumps({"size": size, "channels": channels, "generator": GENERATOR_VERSION, "recipe": RECIPE},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(size: int, channels: int) -> Path:
    return cache_dir() / f"digit_classifier_{size}px_c{channels}_{cache_key(size, channels)}.safetensors"


def render_digits(params: DigitsDataParams, split: str, n: int, start: int = 0) -> tuple[Tensor, Tensor]:
    """Samples ``start .. start + n - 1`` of a digits split (the generator is not bounded by ``length``):
    ``(x (n, C, H, W) float32 in [-1, 1], y (n,) int64)``."""
    xs, ys = zip(*(render_digit(params, i, split) for i in range(start, start + n)))
    return torch.from_numpy(np.stack(xs)).mul_(2.0).sub_(1.0), torch.tensor(ys, dtype=torch.int64)


def _prepared_split(model: DigitClassifier, params: DigitsDataParams, split: str, n: int) -> tuple[Tensor, Tensor]:
    """Render in chunks and keep only the prepared (work-size) images, so large sizes stay small in memory."""
    xs, ys = [], []
    for start in range(0, n, 500):
        x, y = render_digits(params, split, min(500, n - start), start)
        xs.append(model.prepare(x))
        ys.append(y)
    return torch.cat(xs).contiguous(memory_format=torch.channels_last), torch.cat(ys)


@torch.no_grad()
def _accuracy(model: DigitClassifier, x: Tensor, y: Tensor, device: torch.device) -> float:
    model.eval()
    pred = torch.cat([model.logits(c.to(device), prepared=True).argmax(1).cpu() for c in x.split(500)])
    return (pred == y).float().mean().item()


def train_digit_classifier(size: int, channels: int, device: torch.device | str = "cpu") -> DigitClassifier:
    """Train a classifier with :data:`RECIPE` (deterministic init and order; global RNG untouched).

    Works when called under ``torch.no_grad()`` / ``torch.inference_mode()`` (e.g. from an eval loop).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train(size, channels, torch.device(device))


def _train(size: int, channels: int, device: torch.device) -> DigitClassifier:
    r = RECIPE
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r["seed"])
        model = DigitClassifier(size, channels, r["width"], r["feature_dim"], r["max_work_size"])
    train_params = DigitsDataParams(type="digits", size=size, channels=channels, length=r["train_samples"],
                                    **r["data"])
    x, y = _prepared_split(model, train_params, "train", r["train_samples"])
    fit_classifier(model, x, y, r, device, torch.Generator().manual_seed(r["seed"]))
    train_s = time.perf_counter() - t0
    xe, ye = _prepared_split(model, DigitsDataParams(type="digits", size=size, channels=channels), "eval",
                             r["eval_samples"])
    model.eval_accuracy = _accuracy(model, xe, ye, device)
    model.train_seconds = train_s
    if model.eval_accuracy < MIN_ACCURACY:
        warnings.warn(f"digit classifier {size}x{size} c{channels} reached only {model.eval_accuracy:.3f} eval "
                      f"accuracy (< {MIN_ACCURACY}); class_accuracy / classifier_fd are less reliable", stacklevel=2)
    return model.eval()


def fit_classifier(model: DigitClassifier, x: Tensor, y: Tensor, r: dict[str, Any], device: torch.device,
                   gen: torch.Generator) -> None:
    """Train ``model`` in place on prepared inputs ``x`` ``(n, C, h, w)`` and labels ``y`` ``(n,)``: AdamW with a
    one-cycle schedule for ``r["epochs"]`` epochs of shuffled (``gen``) batches, label smoothing (recipe ``r``)."""
    model.to(device, memory_format=torch.channels_last).train()
    steps_per_epoch = len(x) // r["batch_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * steps_per_epoch,
                                                pct_start=r["warmup_fraction"])
    for _ in range(r["epochs"]):
        order = torch.randperm(len(x), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * r["batch_size"] : (b + 1) * r["batch_size"]]
            loss = F.cross_entropy(model.logits(x[idx].to(device), prepared=True), y[idx].to(device),
                                   label_smoothing=r["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def _save_atomic(model: DigitClassifier, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"eval_accuracy": repr(model.eval_accuracy), "generator": GENERATOR_VERSION,
            "recipe": json.dumps(RECIPE, sort_keys=True), "size": str(model.size), "channels": str(model.channels)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path, size: int, channels: int) -> DigitClassifier | None:
    """The cached classifier, or None (with a warning) when the file is unreadable or does not fit."""
    r = RECIPE
    model = DigitClassifier(size, channels, r["width"], r["feature_dim"], r["max_work_size"])
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        model.load_state_dict(load_file(str(path)))
        model.eval_accuracy = float(meta.get("eval_accuracy", "nan"))
    except Exception as e:  # a truncated or foreign file: retrain rather than fail
        warnings.warn(f"ignoring unreadable cached digit classifier {path}: {e}", stacklevel=3)
        return None
    return model


_LOADED: dict[tuple[str, str], DigitClassifier] = {}


def get_digit_classifier(size: int, channels: int, device: torch.device | str | None = None) -> DigitClassifier:
    """The digit classifier for ``(size, channels)`` images on ``device``, in eval mode, frozen.

    Loaded from the disk cache, else trained (seconds on a CPU) and written there atomically; kept in
    memory for the rest of the process.
    """
    device = torch.device(device or "cpu")
    path = cache_path(size, channels)
    key = (str(path), str(device))
    if key not in _LOADED:
        model = _load(path, size, channels) if path.is_file() else None
        if model is None:
            model = train_digit_classifier(size, channels, device)
            _save_atomic(model, path)
            log.info("digit classifier: trained in %.1f s (eval accuracy %.4f), saved to %s",
                     model.train_seconds, model.eval_accuracy, path)
        else:
            log.info("digit classifier: loaded %s", path)
        _LOADED[key] = model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    return _LOADED[key]


# --------------------------------------------------------------------------------------------- metrics
def _needs_digits(name: str, spec: Any) -> Iterable[tuple[str, str]]:
    data = spec.data.data_space()
    if data.type != "digits":
        yield ("", f"{name} needs data.type 'digits' (its classifier is trained on the digits "
                     f"generator), got {data.type!r}")


def _finite(samples: Tensor, name: str) -> bool:
    """All of ``samples`` finite (a bool tensor: all True); warns when not."""
    ok = bool(samples.all()) if samples.dtype == torch.bool else bool(torch.isfinite(samples).all())
    if not ok:
        warnings.warn(f"{name}: samples contain NaN or inf; the metric is NaN", stacklevel=3)
    return ok


class ClassAccuracyMetricParams(ZooParams):
    """Share of class-conditional samples that the digit classifier assigns their requested label."""

    type: Literal["class_accuracy"] = Field(..., description="Digit-classifier accuracy on conditional samples.")
    batch_size: int = Field(500, gt=0, description="Samples per classifier forward pass.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        yield from _needs_digits("class_accuracy", spec)


@METRICS.register
class ClassAccuracy(Metric):
    """``metric(samples (N, C, H, W) in [-1, 1], labels (N,)) -> {"class_accuracy": float in [0, 1]}``."""

    Params = ClassAccuracyMetricParams
    higher_is_better = True

    def __init__(self, params: ClassAccuracyMetricParams, data_params: Any, device: torch.device | str = "cpu"):
        data_params = data_params.data_space()
        if data_params.type != "digits":
            raise ValueError(f"class_accuracy needs data.type 'digits', got {data_params.type!r}")
        self.params = params
        self.classifier = get_digit_classifier(data_params.size, data_params.channels, device)

    def __call__(self, samples: Tensor, labels: Tensor | None) -> dict[str, float]:
        return self.from_features(self.sample_features(samples, labels), labels)

    def sample_features(self, samples: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
        """``{"pred": (B,) int64 predicted digit (-1 where the sample is not finite)}``."""
        finite = torch.isfinite(samples.reshape(len(samples), -1)).all(1).cpu()
        pred = self.classifier.predict(torch.nan_to_num(samples).clamp(-1, 1), self.params.batch_size)
        return {"pred": torch.where(finite, pred, torch.full_like(pred, -1))}

    def from_features(self, features: dict[str, Tensor], labels: Tensor | None) -> dict[str, float]:
        if labels is None:
            raise ValueError("class_accuracy needs the requested labels (class-conditional samples)")
        pred = features["pred"]
        labels = torch.as_tensor(labels).reshape(-1).cpu().long()
        if len(labels) != len(pred):
            raise ValueError(f"class_accuracy: {len(pred)} samples but {len(labels)} labels")
        if not _finite(pred.ge(0), "class_accuracy"):
            return {"class_accuracy": math.nan}
        return {"class_accuracy": (pred == labels).float().mean().item()}


class ClassifierFDMetricParams(ZooParams):
    """Fréchet distance between digit-classifier features of samples and of real eval-split digits."""

    type: Literal["classifier_fd"] = Field(..., description="Fréchet distance in digit-classifier feature space.")
    num_real: int = Field(
        2000, ge=2, description="Real images (digits eval split, indices 0..num_real-1) for the reference stats.")
    batch_size: int = Field(500, gt=0, description="Images per classifier forward pass.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        yield from _needs_digits("classifier_fd", spec)


_REF_STATS: dict[tuple, tuple[Any, Any]] = {}


@METRICS.register
class ClassifierFD(Metric):
    """``metric(samples (N, C, H, W) in [-1, 1], labels ignored) -> {"classifier_fd": float >= 0}``.

    Samples are clamped to [-1, 1]; the reference statistics of the ``num_real`` eval images are computed
    once per process and data params.
    """

    Params = ClassifierFDMetricParams
    higher_is_better = False

    def __init__(self, params: ClassifierFDMetricParams, data_params: Any, device: torch.device | str = "cpu"):
        data_params = data_params.data_space()
        if data_params.type != "digits":
            raise ValueError(f"classifier_fd needs data.type 'digits', got {data_params.type!r}")
        self.params, self.data_params = params, data_params
        self.classifier = get_digit_classifier(data_params.size, data_params.channels, device)

    def reference_stats(self) -> tuple[Any, Any]:
        """``(mu (F,), sigma (F, F))`` float64 of the real eval images (cached in memory)."""
        dp = self.data_params
        key = (dp.model_dump_json(exclude={"num_workers"}), self.params.num_real, cache_key(dp.size, dp.channels))
        if key not in _REF_STATS:
            x, _ = render_digits(dp, "eval", self.params.num_real)
            _REF_STATS[key] = feature_stats(self.classifier.batched_features(x, self.params.batch_size))
        return _REF_STATS[key]

    def __call__(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        return self.from_features(self.sample_features(samples, labels), labels)

    def sample_features(self, samples: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
        """``{"features": (B, F) float32, "finite": (B,) bool}``."""
        finite = torch.isfinite(samples.reshape(len(samples), -1)).all(1).cpu()
        feats = self.classifier.batched_features(torch.nan_to_num(samples).clamp(-1, 1), self.params.batch_size)
        return {"features": feats, "finite": finite}

    def from_features(self, features: dict[str, Tensor], labels: Tensor | None) -> dict[str, float]:
        if not _finite(features["finite"], "classifier_fd"):
            return {"classifier_fd": math.nan}
        mu, sigma = feature_stats(features["features"])
        return {"classifier_fd": frechet_distance(mu, sigma, *self.reference_stats())}
