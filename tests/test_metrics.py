"""Metrics: the Fréchet distance and the digit-classifier metrics (class_accuracy, classifier_fd)."""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zoo  # noqa: F401  (registers the built-ins)
from registry.kinds import METRICS
from zoo.data.digits import DigitsDataParams
from zoo.metrics import classifier as clf
from zoo.metrics.classifier import (
    ClassAccuracy, ClassAccuracyMetricParams, ClassifierFD, ClassifierFDMetricParams, get_digit_classifier,
    render_digits,
)
from zoo.metrics.frechet import feature_stats, frechet_distance

SIZE, CHANNELS = 16, 1


# ----------------------------------------------------------------------------------------------- Fréchet
def _random_stats(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    feats = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    return feature_stats(feats)


def _fd_general_eig(mu1, s1, mu2, s2) -> float:
    """The textbook route: eigenvalues of the non-symmetric S1 S2 (real, >= 0 up to round-off)."""
    ev = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def test_feature_stats_float64_and_unbiased():
    feats = torch.randn(50, 6, dtype=torch.float32)
    mu, sigma = feature_stats(feats)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (6, 6)
    ref = feats.double().numpy()
    np.testing.assert_allclose(mu, ref.mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), atol=1e-12)
    with pytest.raises(ValueError):
        feature_stats(torch.randn(1, 6))
    with pytest.raises(ValueError):
        feature_stats(torch.tensor([[0.0, math.nan], [1.0, 2.0]]))


def test_frechet_identical_is_zero():
    mu, sigma = _random_stats(np.random.default_rng(0), 200, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    low_rank_mu, low_rank = _random_stats(np.random.default_rng(1), 5, 16)  # rank 4 < 16
    assert abs(frechet_distance(low_rank_mu, low_rank, low_rank_mu, low_rank)) < 1e-6


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10, abs=1e-12)
    # torch inputs work too, and a pure shift costs |shift|^2
    s = torch.tensor(np.diag(a))
    assert frechet_distance(torch.zeros(8), s, torch.full((8,), 0.5), s) == pytest.approx(8 * 0.25, rel=1e-9)


def test_frechet_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(1, 12), n1=st.integers(2, 40), n2=st.integers(2, 40))
def test_frechet_symmetric_nonnegative_matches_eig(seed, d, n1, n2):
    rng = np.random.default_rng(seed)
    mu1, s1 = _random_stats(rng, n1, d)
    mu2, s2 = _random_stats(rng, n2, d)
    fd12, fd21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    scale = 1.0 + np.trace(s1) + np.trace(s2) + ((mu1 - mu2) ** 2).sum()
    assert fd12 >= 0.0 and fd21 >= 0.0
    assert abs(fd12 - fd21) <= 1e-7 * scale
    assert abs(fd12 - max(_fd_general_eig(mu1, s1, mu2, s2), 0.0)) <= 1e-6 * scale


# ------------------------------------------------------------------------------------ digit classifier
@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """The 16x16 grey digit classifier, trained once per test session into a temporary cache."""
    cache = tmp_path_factory.mktemp("fmzoo_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMZOO_CACHE", str(cache))
        t = time.perf_counter()
        model = get_digit_classifier(SIZE, CHANNELS, torch.device("cpu"))
        print(f"digit classifier {SIZE}x{SIZE} c{CHANNELS}: ready in {time.perf_counter() - t:.1f} s, "
              f"eval accuracy {model.eval_accuracy:.4f}")
        yield model


@pytest.fixture(scope="session")
def data_params() -> DigitsDataParams:
    return DigitsDataParams(type="digits", size=SIZE, channels=CHANNELS)


@pytest.fixture(scope="session")
def real(data_params):
    """1000 real digits from the train split (the metric's references come from the eval split)."""
    return render_digits(data_params, "train", 1000)


def test_classifier_accuracy_on_eval_split(classifier, data_params):
    x, y = render_digits(data_params, "eval", 1000, start=5000)
    acc = (classifier.predict(x) == y).float().mean().item()
    print(f"digit classifier accuracy on eval digits: {acc:.4f}")
    assert acc >= 0.97 and classifier.eval_accuracy >= 0.97
    feats = classifier.features(x[:4])
    assert feats.shape == (4, classifier.feature_dim) and (feats >= 0).all()
    assert classifier.logits(x[:4]).shape == (4, 10)
    with pytest.raises(ValueError, match="expected images"):
        classifier.logits(torch.zeros(2, 3, SIZE, SIZE))


def test_classifier_disk_cache(classifier, data_params):
    path = clf.cache_path(SIZE, CHANNELS)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    assert get_digit_classifier(SIZE, CHANNELS, "cpu") is classifier  # in-memory reuse
    loaded = clf._load(path, SIZE, CHANNELS).eval()  # what a new process gets from disk
    x, _ = render_digits(data_params, "eval", 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(x), classifier.logits(x))
    assert loaded.eval_accuracy == pytest.approx(classifier.eval_accuracy)
    keys = {clf.cache_key(16, 1), clf.cache_key(16, 3), clf.cache_key(32, 1)}
    assert len(keys) == 3


def test_cache_key_follows_recipe_and_generator(monkeypatch):
    before = clf.cache_key(SIZE, CHANNELS)
    monkeypatch.setitem(clf.RECIPE, "epochs", clf.RECIPE["epochs"] + 1)
    assert clf.cache_key(SIZE, CHANNELS) != before
    monkeypatch.undo()
    monkeypatch.setattr(clf, "GENERATOR_VERSION", "digits-vX")
    assert clf.cache_key(SIZE, CHANNELS) != before


def test_class_accuracy_metric(classifier, data_params, real):
    x, y = real
    metric = METRICS.build(ClassAccuracyMetricParams(type="class_accuracy"), data_params=data_params,
                           device=torch.device("cpu"))
    assert isinstance(metric, ClassAccuracy)
    right = metric(x, y)["class_accuracy"]
    wrong = metric(x, (y + 1) % 10)["class_accuracy"]
    assert right >= 0.97 and wrong <= 0.05
    with pytest.warns(UserWarning, match="NaN"):
        assert math.isnan(metric(torch.full_like(x[:4], math.nan), y[:4])["class_accuracy"])
    with pytest.raises(ValueError, match="labels"):
        metric(x, None)


def test_classifier_fd_metric(classifier, data_params, real):
    metric = METRICS.build(ClassifierFDMetricParams(type="classifier_fd", num_real=1000), data_params=data_params,
                           device=torch.device("cpu"))
    assert isinstance(metric, ClassifierFD)
    x, y = real
    fd_real = metric(x, y)["classifier_fd"]
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_noise = metric(noise, y)["classifier_fd"]
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    fd_blur = metric(blurred, y)["classifier_fd"]
    print(f"classifier_fd: real {fd_real:.3f}, blurred {fd_blur:.3f}, noise {fd_noise:.3f}")
    assert 0 <= fd_real < fd_blur < fd_noise
    assert fd_noise > 20 * fd_real
    ref = metric.reference_stats()
    assert metric.reference_stats() is ref  # computed once


@pytest.mark.parametrize("params", [ClassAccuracyMetricParams(type="class_accuracy"),
                                    ClassifierFDMetricParams(type="classifier_fd")])
def test_metric_problems_need_digits(params):
    other = SimpleNamespace(type="image_folder", num_classes=3)
    other.data_space = lambda: other  # the DataParams hook: image folders are their own data space
    spec = SimpleNamespace(data=other)
    probs = list(params.problems(spec))
    assert len(probs) == 1 and probs[0][0] == "" and "needs data.type 'digits'" in probs[0][1]
    assert list(params.problems(SimpleNamespace(data=DigitsDataParams(type="digits", preset="tiny")))) == []
    with pytest.raises(ValueError, match="digits"):
        METRICS.build(params, data_params=other, device=torch.device("cpu"))


def test_training_under_inference_mode_and_low_accuracy_warning(tmp_path, monkeypatch):
    """A metric built inside an eval loop (inference mode) can still train; a weak classifier warns."""
    monkeypatch.setenv("FMZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(clf, "RECIPE", {**clf.RECIPE, "train_samples": 128, "epochs": 1, "eval_samples": 100})
    with torch.inference_mode(), pytest.warns(UserWarning, match="eval accuracy"):
        model = get_digit_classifier(8, 1, "cpu")
    assert model.eval_accuracy < 0.97 and clf.cache_path(8, 1).is_file()
    clf.cache_path(8, 1).write_bytes(b"not safetensors")  # a corrupt cache file is replaced, with a warning
    monkeypatch.setattr(clf, "_LOADED", {})
    with pytest.warns(UserWarning) as record:
        get_digit_classifier(8, 1, "cpu")
    assert any("ignoring unreadable cached digit classifier" in str(w.message) for w in record)
    assert clf._load(clf.cache_path(8, 1), 8, 1) is not None
