"""The papers' image metrics (zoo/metrics/standard.py) against reference implementations.

No real weights can be had here: the Inception is a random state dict in the published file's layout
(tests.helpers.random_inception_weights), DINOv2 the ``vit`` teacher's tiny preset. The ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``) needs TensorFlow, which cannot be imported next to this
torch: its FID / sFID, IS and precision/recall are transcribed below in numpy/scipy from its published code and
compared on synthetic features.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import zoo  # noqa: F401
from registry.kinds import METRICS
from tests.helpers import random_inception_weights
from zoo.metrics import standard as st
from zoo.metrics.frechet import feature_stats


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")


def images(n, seed, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------- ADM evaluator, numpy
def adm_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM ``FIDStatistics.frechet_distance``: scipy sqrtm of the product, eps offset when singular, real part."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def adm_is(preds, split_size=5000):
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_pairwise(u, v):
    nu, nv = np.sum(u * u, 1)[:, None], np.sum(v * v, 1)[None]
    return np.maximum(nu - 2 * u @ v.T + nv, 0.0)


def adm_prec_recall(ref, sample, k=3):
    """ADM ``ManifoldEstimator`` (nhood 3): radii = k-th entry of the partitioned squared-distance rows;
    ``evaluate_pr`` with ref as features_1 and samples as features_2, returning (precision, recall)."""
    def radii(f):
        d = adm_pairwise(f, f)
        return np.partition(d, k, axis=1)[:, k]

    r1, r2 = radii(ref), radii(sample)
    d = adm_pairwise(ref, sample)                      # (ref, sample)
    f1_status = np.any(d <= r2[None], axis=1)          # ref point inside some sample ball
    f2_status = np.any(d <= r1[:, None], axis=0)       # sample point inside some ref ball
    return float(f2_status.mean()), float(f1_status.mean())


# ---------------------------------------------------------------------------------- formulas
def test_fid_formula_matches_adm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(0.3, 1.2, size=(200, 16)) @ rng.normal(size=(16, 16)) * 0.4
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    from zoo.metrics.frechet import frechet_distance

    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(adm_fid(m1, s1, m2, s2), rel=1e-9, abs=1e-9)


def test_inception_score_matches_adm():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7000, 1008)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert st.inception_score(logits) == pytest.approx(adm_is(p), rel=1e-10)  # two splits: 5000 + 2000


@pytest.mark.parametrize("chunk", [4096, 7])
def test_precision_recall_matches_adm(chunk):
    rng = np.random.default_rng(2)
    ref, fake = rng.normal(size=(60, 8)), rng.normal(0.5, 1.3, size=(45, 8))
    got = st.precision_recall(ref, fake, chunk=chunk)
    assert got == pytest.approx(adm_prec_recall(ref, fake), abs=0)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert st.precision_recall(ref, ref) == (1.0, 1.0)


# ---------------------------------------------------------------------------------- features vs libraries
def test_inception_features_equal_the_libraries(inception):
    """pool3 and logits are torch-fidelity's outputs; spatial is torch-fidelity's Mixed_6d.branch1x1 (TF
    mixed_6/conv) [:7] in NHWC order; FID equals torchmetrics' FrechetInceptionDistance on the same uint8 images
    and weights (its TF1-style resize: antialias=False)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    x, y = images(6, 0), images(6, 1, size=24)
    f = st.inception_features(x, inception)
    net = st.fidelity_inception_class()("inception-v3-compat", ["2048", "logits_unbiased"],
                                        feature_extractor_weights_path=inception)
    q = st.quantize(x)
    pool, logits = net(q)
    assert np.allclose(f["pool"], pool.double().numpy(), rtol=0, atol=1e-6)
    assert np.allclose(f["logits"], logits.double().numpy(), rtol=0, atol=1e-6)
    # the 17 x 17 block: run the trunk by hand up to Mixed_6c
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    h = interpolate_bilinear_2d_like_tensorflow1x(q.float(), size=(299, 299), align_corners=False)
    h = (h - 128) / 128
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
        h = getattr(net, name)(h)
    conv = net.Mixed_6d.branch1x1(h)
    assert conv.shape[1:] == (192, 17, 17)
    spatial = conv[:, :7].permute(0, 2, 3, 1).reshape(6, -1).double().numpy()
    assert f["spatial"].shape == (6, 2023) and np.allclose(f["spatial"], spatial, rtol=0, atol=1e-6)

    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception, antialias=False)
    tm.update(st.quantize(y), real=True)
    tm.update(q, real=False)
    ref = st.inception_features(y, inception)
    from zoo.metrics.frechet import frechet_distance

    ours = frechet_distance(*feature_stats(f["pool"]), *feature_stats(ref["pool"]))
    assert ours == pytest.approx(float(tm.compute()), rel=1e-4)


def test_quantize_is_the_sample_ddp_rule():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.9999, 1.0, 2.0]).view(1, 1, 1, 8)
    ref = np.clip(127.5 * x.numpy() + 128.0, 0, 255).astype(np.uint8)
    q = st.quantize(x)
    assert q.shape == (1, 3, 1, 8) and (q[0, 0].numpy() == ref[0, 0]).all() and (q[:, 1] == q[:, 0]).all()


def test_inception_weights_must_be_a_plain_state_dict(tmp_path):
    import pickle

    bad = tmp_path / "bad.pth"

    bad.write_bytes(pickle.dumps({"fn": print}))
    with pytest.raises(ValueError, match="not a plain state dict"):
        st.InceptionFeatures(str(bad))
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        st.InceptionFeatures(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------- entries and references
def _build(raw, data=None):
    from registry.kinds import DATASETS

    data = data or DATASETS.get("digits").Params(type="digits", preset="tiny")
    return METRICS.build(METRICS.get(raw["type"]).Params.model_validate(raw), data_params=data, device="cpu")


def test_entries_on_an_adm_reference_batch(inception, tmp_path, monkeypatch):
    """A reference npz in the ADM layout (mu, sigma, mu_s, sigma_s, arr_0 only): FID/sFID hand the Fréchet
    distance (checked against ADM's above) our features' statistics and the file's; precision/recall reads the
    Inception features of arr_0; IS equals ADM's on our logits. (A spy stands in for the 2048-d distance: 5 s each.)"""
    real, fake = images(8, 3), images(8, 4)
    arrays = st.reference_arrays(real, inception=inception, images=True)
    adm = {k: arrays[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "arr_0")}
    assert adm["arr_0"].dtype == np.uint8 and adm["arr_0"].shape == (8, 32, 32, 3)
    np.savez(tmp_path / "ref.npz", **adm)
    calls = []
    monkeypatch.setattr(st, "frechet_distance", lambda *a: calls.append(a) or 1.5)
    kw = {"weights": inception, "reference": str(tmp_path / "ref.npz")}
    f = st.inception_features(fake, inception)
    got = {}
    for tag in ("fid", "sfid", "inception_score", "precision_recall"):
        got.update(_build({"type": tag, **kw})(fake, None))
    assert got["fid"] == got["sfid"] == 1.5 and len(calls) == 2
    for (mu, sigma, mu_r, sigma_r), key, suffix in zip(calls, ("pool", "spatial"), ("", "_s")):
        want = feature_stats(f[key])
        assert np.allclose(mu, want[0], atol=1e-6) and np.allclose(sigma, want[1], atol=1e-6)
        assert np.array_equal(mu_r, adm["mu" + suffix]) and np.array_equal(sigma_r, adm["sigma" + suffix])
    p = torch.softmax(torch.as_tensor(f["logits"]), 1).numpy()
    assert got["inception_score"] == pytest.approx(adm_is(p), rel=1e-9)
    assert (got["precision"], got["recall"]) == pytest.approx(adm_prec_recall(arrays["pool"], f["pool"]), abs=0)


def test_fd_dinov2_uses_the_vit_teacher_cls_token():
    from zoo.metrics.frechet import frechet_distance

    x = images(6, 5)
    m = _build({"type": "fd_dinov2", "weights": None, "preset": "tiny", "num_real": 6})
    got = m(x, None)["fd_dinov2"]
    net = st.build_dinov2(None, "tiny", "cpu")
    with torch.no_grad():
        q = st.quantize(x).float() / 255
        q = torch.nn.functional.interpolate(q, size=(224, 224), mode="bicubic", antialias=True)
        mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        cls = net.forward_tokens((q - mean) / std)[:, 0].double().numpy()
    ref = m.reference()
    assert got == pytest.approx(frechet_distance(*feature_stats(cls), ref["mu_dinov2"], ref["sigma_dinov2"]), rel=1e-6)


def test_evaluate_reference_writes_the_adm_layout(inception, tmp_path):
    """``python -m runtime.evaluate --reference DATA --out ref.npz``: the ADM keys, readable by the entries."""
    import json

    from runtime import evaluate

    (tmp_path / "data.json").write_text(json.dumps({"type": "digits", "preset": "tiny"}))
    out = tmp_path / "ref.npz"
    assert evaluate.main(["--reference", str(tmp_path / "data.json"), "--out", str(out), "--inception", inception,
                          "--num", "6", "--batch-size", "4", "--images", "--split", "eval", "--device", "cpu"]) == 0
    ref = st.read_reference(str(out))
    assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0", "pool"} <= set(ref)
    assert ref["mu"].shape == (2048,) and ref["sigma_s"].shape == (2023, 2023) and ref["arr_0"].dtype == np.uint8
    from registry.kinds import DATASETS

    ds = DATASETS.build(DATASETS.get("digits").Params(type="digits", preset="tiny"), split="eval")
    x = torch.stack([ds[i][0] for i in range(6)])
    f = st.inception_features(x, inception)
    assert np.allclose(ref["mu"], f["pool"].mean(0), atol=1e-5) and np.allclose(ref["pool"], f["pool"], atol=1e-5)
    assert evaluate.main(["--reference", str(tmp_path / "data.json"), "--out", str(out)]) == 2
