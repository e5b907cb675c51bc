"""DTMF / onset / bounce signal tools and the four audio-video metrics of ``bouncing_digits_av``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import zoo  # noqa: F401  (registers the built-ins)
import zoo.metrics.av as av
from registry.kinds import DATASETS, METRICS
from zoo.data.bouncing_av import BouncingDigitsAVDataParams, clip_events, dtmf_freqs, render_clip
from zoo.metrics.dtmf import burst_onsets, decode_digit, goertzel_power, video_bounces, video_track

SR = 4000
ROOT = Path(__file__).resolve().parent.parent
TAGS = ("av_agreement", "av_sync_ms", "video_class_accuracy", "audio_class_accuracy")


def data(**kw) -> BouncingDigitsAVDataParams:
    return BouncingDigitsAVDataParams(type="bouncing_digits_av", **kw)


def metric(tag: str, dp=None, **kw):
    return METRICS.build(METRICS.get(tag).Params(type=tag, **kw), data_params=dp or data(), device="cpu")


@pytest.fixture(scope="module")
def real():
    """100 real eval clips: ``({"video": (100, 1, 16, 16, 16), "audio": (100, 1, 8000)}, labels (100,))``."""
    ds = DATASETS.build(data(), split="eval")
    xs, ys = zip(*(ds[i] for i in range(100)))
    return {k: torch.stack([x[k] for x in xs]) for k in xs[0]}, torch.tensor(ys)


@pytest.fixture(scope="module")
def real_spec():
    """60 real eval clips of ``specs/selfflow_av.json``'s data (8 frames of 16x16 at 8 fps, 4 kHz audio)."""
    raw = json.loads((ROOT / "specs" / "selfflow_av.json").read_text())["data"]
    dp = data(**{k: v for k, v in raw.items() if k != "type"})
    ds = DATASETS.build(dp, split="eval")
    xs, ys = zip(*(ds[i] for i in range(60)))
    return dp, {k: torch.stack([x[k] for x in xs]) for k in xs[0]}, torch.tensor(ys)


def tones(digit: int, rng: np.random.Generator, seconds: float = 0.3, noise: float = 0.05) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    fr, fc = dtmf_freqs(digit)
    ph = rng.uniform(0, 2 * np.pi, 2)
    a = 0.3 * np.sin(2 * np.pi * fr * t + ph[0]) + 0.3 * np.sin(2 * np.pi * fc * t + ph[1])
    return a + noise * rng.standard_normal(len(t))


# ------------------------------------------------------------------------------------------- signal tools
def test_goertzel_power_reads_amplitude_squared():
    t = np.arange(2000) / SR
    x = np.stack([0.5 * np.sin(2 * np.pi * 697 * t + 1.0), 0.2 * np.cos(2 * np.pi * 1336 * t)])
    p = goertzel_power(x, SR, [697, 1336, 1000])
    assert isinstance(p, np.ndarray) and p.shape == (2, 3)
    np.testing.assert_allclose(p, [[0.25, 0, 0], [0, 0.04, 0]], atol=2e-3)
    pt = goertzel_power(torch.from_numpy(x).float(), SR, [697], window=True)
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 1) and pt[0, 0].item() == pytest.approx(0.25, rel=0.02)


def test_decode_digit_exact_on_noisy_tones_with_random_phase():
    rng = np.random.default_rng(0)
    for trial in range(3):
        for d in range(10):
            a = np.zeros(SR)
            a[1000:2200] = tones(d, rng, 0.3)
            a += 0.02 * rng.standard_normal(SR)
            assert decode_digit(a, SR) == d
            assert decode_digit(torch.from_numpy(a).float()[None], SR) == d  # (1, L) tensors too


def test_decode_digit_none_without_tone():
    rng = np.random.default_rng(1)
    assert decode_digit(np.zeros(SR), SR) is None
    assert decode_digit(0.3 * rng.standard_normal(SR), SR) is None  # loud noise, no tone
    t = np.arange(SR) / SR  # '*' = 941 + 1209 Hz is not a digit
    assert decode_digit(0.3 * np.sin(2 * np.pi * 941 * t) + 0.3 * np.sin(2 * np.pi * 1209 * t), SR) is None


def test_burst_onsets_within_a_few_ms():
    rng = np.random.default_rng(2)
    truth = [0.0, 0.37, 0.9, 1.41, 1.6]
    a = 0.01 * rng.standard_normal(2 * SR)
    n, f = round(0.08 * SR), round(0.003 * SR)
    env = np.ones(n)
    env[:f] = env[-f:][::-1] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(f) + 0.5) / f)
    for t in truth:
        s = round(t * SR)
        a[s:s + n] += env * tones(3 + int(t * 10) % 5, rng, 0.08, noise=0.0)
    found = burst_onsets(a, SR)
    assert len(found) == len(truth)
    assert np.abs(np.array(found) - truth).max() < 0.003
    assert burst_onsets(np.zeros(SR), SR) == [] and burst_onsets(0.01 * rng.standard_normal(SR), SR) == []


def test_video_bounces_match_ground_truth_within_one_frame():
    p = data()
    fps, T = p.fps, p.num_frames
    checked = 0
    for i in range(60):
        v = torch.from_numpy(render_clip(p, i, "eval")[0]["video"]) * 2 - 1
        ev = clip_events(p, i, "eval")
        found = video_bounces(v, fps)
        for b in found:  # no false bounce
            assert min(abs(b - g) for g in ev.bounce_times) < 1 / fps
        for g in ev.bounce_times:  # every bounce with frames on both sides is found
            if 1 / fps <= g <= (T - 2) / fps:
                assert min(abs(b - g) for b in found) < 1 / fps
                checked += 1
        track = video_track(v)  # the centroid moves with the box centre
        np.testing.assert_allclose(np.diff(track, axis=0), np.diff(ev.centres, axis=0), atol=0.25)
    assert checked >= 60


# ------------------------------------------------------------------------------------------------ metrics
def test_real_clips_score_at_the_ceiling(real):
    x, y = real
    out = {}
    for tag in TAGS:
        out.update(metric(tag)(x, y))
    assert set(out) == {*TAGS, "av_sync_detected"} and all(isinstance(v, float) for v in out.values())
    # measured on 1000 eval clips: agreement / video accuracy 0.996, audio accuracy 1.0, sync 1.7 ms, detected 0.97
    assert out["av_agreement"] >= 0.95 and out["video_class_accuracy"] >= 0.95
    assert out["audio_class_accuracy"] == 1.0
    assert out["av_sync_ms"] < 5.0 and out["av_sync_detected"] >= 0.9


def test_other_digits_audio_breaks_agreement(real):
    x, y = real
    swapped = {"video": x["video"], "audio": x["audio"].roll(1, 0)}  # clip i gets the tones of digit (i - 1) % 10
    assert metric("av_agreement")(swapped, y)["av_agreement"] <= 0.05
    assert metric("audio_class_accuracy")(swapped, y)["audio_class_accuracy"] == 0.0
    assert metric("video_class_accuracy")(swapped, y)["video_class_accuracy"] >= 0.95


def test_audio_delayed_by_250ms_reads_250ms(real):
    x, y = real
    shift = round(0.25 * SR)
    late = torch.cat([torch.zeros_like(x["audio"][..., :shift]), x["audio"][..., :-shift]], -1)
    out = metric("av_sync_ms")({"video": x["video"], "audio": late}, y)
    assert 200 <= out["av_sync_ms"] <= 260 and out["av_sync_detected"] >= 0.9


def test_one_stream_data_takes_bare_tensors(real):
    x, y = real
    assert metric("video_class_accuracy", data(streams=["video"]))(x["video"], y)["video_class_accuracy"] >= 0.95
    assert metric("audio_class_accuracy", data(streams=["audio"]))(x["audio"], y)["audio_class_accuracy"] == 1.0
    with pytest.raises(ValueError, match="needs the data stream"):
        metric("av_agreement", data(streams=["video"]))
    with pytest.raises(ValueError, match="samples lack stream"):
        metric("av_sync_ms")({"video": x["video"]}, y)
    with pytest.raises(ValueError, match="needs the requested labels"):
        metric("audio_class_accuracy")(x, None)


def test_problems_name_the_missing_stream_or_data():
    for tag, needs in zip(TAGS, [("video", "audio")] * 2 + [("video",), ("audio",)]):
        p = METRICS.get(tag).Params(type=tag)
        assert list(p.problems(SimpleNamespace(data=data()))) == []
        for present in ("video", "audio"):
            probs = list(p.problems(SimpleNamespace(data=data(streams=[present]))))
            missing = [s for s in needs if s != present]
            assert len(probs) == (1 if missing else 0)
            if missing:
                assert tag in probs[0][1] and repr(missing[0]) in probs[0][1]
        digits = DATASETS.get("digits").Params(type="digits", preset="tiny")
        assert "bouncing_digits_av" in list(p.problems(SimpleNamespace(data=digits)))[0][1]


def test_non_finite_samples_give_nan(real):
    x, y = real
    bad = {"video": x["video"][:4].clone(), "audio": x["audio"][:4]}
    bad["video"][0, 0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN"):
        assert math.isnan(metric("av_agreement")(bad, y[:4])["av_agreement"])


def test_fallback_frame_classifier_is_trained_cached_and_reloaded(monkeypatch):
    monkeypatch.setattr(av, "MIN_CLIP_ACCURACY", 1.01)  # the project classifier "fails": train on the clips
    monkeypatch.setattr(av, "CHECK_CLIPS", 50)
    monkeypatch.setattr(av, "RECIPE", {**av.RECIPE, "train_clips": 300, "frames_per_clip": 8})
    monkeypatch.setattr(av, "_LOADED", {})
    dp = data()
    with pytest.warns(UserWarning, match="less reliable"):
        fc = av.get_frame_classifier(dp)
    assert fc.source == "bouncing_av" and fc.clip_accuracy >= 0.9  # ~0.99 with this short recipe
    assert av._frame_cache_path(dp).is_file()
    monkeypatch.setattr(av, "_LOADED", {})
    monkeypatch.setattr(av, "train_frame_classifier", lambda *a, **k: pytest.fail("retrained despite the cache"))
    with pytest.warns(UserWarning, match="less reliable"):
        again = av.get_frame_classifier(dp)
    assert again.source == "bouncing_av" and again.model is not fc.model
    assert all(torch.equal(a, b) for a, b in zip(fc.model.state_dict().values(), again.model.state_dict().values()))


# ------------------------------------------------------------------------ consistency and per-clip readings
def test_video_consistency_high_on_real_clips_low_on_shuffled_frames(real_spec):
    dp, x, y = real_spec
    m = metric("video_consistency", dp)
    assert m(x, y)["video_consistency"] >= 0.9  # 0.965 on 200 clips
    v = x["video"]
    order = torch.argsort(y)  # frame t of clip i comes from clip (i + t) % B of the label-sorted clips
    by_label = v[order]
    shuffled = torch.stack([by_label[(torch.arange(len(v)) + 7 * t) % len(v), :, t] for t in range(v.shape[2])], 2)
    assert m({"video": shuffled}, None)["video_consistency"] <= 0.2
    bad = {"video": v[:2].clone()}
    bad["video"][0, 0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN"):
        assert math.isnan(m(bad)["video_consistency"])


def test_read_clips_per_clip_readings_match_the_metrics(real_spec):
    dp, x, y = real_spec
    x = {k: v[:20] for k, v in x.items()}
    y = y[:20]
    rows = av.read_clips(x, dp)
    assert len(rows) == 20 and set(rows[0]) == {"video_digit", "frame_digits", "consistent", "audio_digit",
                                                 "sync_ms", "finite"}
    json.dumps(rows)  # JSON-ready
    video = torch.tensor([r["video_digit"] for r in rows])
    audio = torch.tensor([-1 if r["audio_digit"] is None else r["audio_digit"] for r in rows])
    assert (video == y).float().mean().item() == metric("video_class_accuracy", dp)(x, y)["video_class_accuracy"]
    assert (audio == y).float().mean().item() == metric("audio_class_accuracy", dp)(x, y)["audio_class_accuracy"]
    assert all(len(r["frame_digits"]) == 8 and r["consistent"] == (len(set(r["frame_digits"])) == 1) for r in rows)
    sync = metric("av_sync_ms", dp)(x, y)
    found = [r["sync_ms"] for r in rows if r["sync_ms"] is not None]
    assert len(found) / 20 == sync["av_sync_detected"] and float(np.median(found)) < 5.0  # a real clip may be off
    # delayed audio shows in every clip that has a bounce; silence gives no audio digit and no sync
    shift = round(0.25 * SR)
    late = torch.cat([torch.zeros_like(x["audio"][..., :shift]), x["audio"][..., :-shift]], -1)
    off = [r["sync_ms"] for r in av.read_clips({"video": x["video"], "audio": late}, dp) if r["sync_ms"] is not None]
    assert len(off) >= 15 and 200 <= float(np.median(off)) <= 260
    quiet = av.read_clips({"video": x["video"][:2], "audio": torch.zeros_like(x["audio"][:2])}, dp)
    assert [r["audio_digit"] for r in quiet] == [None, None] and [r["sync_ms"] for r in quiet] == [None, None]


def test_read_clips_one_stream_non_finite_and_wrong_data(real_spec):
    dp, x, y = real_spec
    vid = x["video"][:3].clone()
    vid[1, 0, 2, 3, 3] = float("inf")
    rows = av.read_clips(vid, dp.model_copy(update={"streams": ("video",)}))
    assert [r["finite"] for r in rows] == [True, False, True]
    assert rows[1]["video_digit"] is None and rows[0]["video_digit"] == int(y[0])
    assert all(r["audio_digit"] is None and r["sync_ms"] is None for r in rows)
    only_audio = av.read_clips({"audio": x["audio"][:2]}, dp)
    assert [r["audio_digit"] for r in only_audio] == y[:2].tolist() and only_audio[0]["video_digit"] is None
    with pytest.raises(ValueError, match="bouncing_digits_av"):
        av.read_clips(vid, DATASETS.get("digits").Params(type="digits", preset="tiny"))
