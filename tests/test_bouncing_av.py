"""The embedded audio+video dataset ``bouncing_digits_av``: shapes, ranges, determinism, ground truth."""
from __future__ import annotations


import numpy as np
import pydantic
import pytest
import torch
from torch.utils.data import DataLoader

import zoo  # noqa: F401  (registers the built-ins)
from registry.kinds import DATASETS
from zoo.data.bouncing_av import (BouncingDigitsAV, BouncingDigitsAVDataParams, clip_events, dtmf_freqs,
                                  render_clip)


def params(**kw) -> BouncingDigitsAVDataParams:
    return BouncingDigitsAVDataParams(type="bouncing_digits_av", **kw)


def test_registered_with_tiny_preset():
    assert DATASETS.get("bouncing_digits_av") is BouncingDigitsAV
    p = params(preset="tiny")
    assert p.length == 64 and p.num_classes == 10
    assert p.sample_shape() == {"video": (1, 16, 16, 16), "audio": (1, 8000)}
    assert p.stream_rates() == {"video": 8, "audio": 4000}
    ds = DATASETS.build(p, split="eval")
    assert isinstance(ds, BouncingDigitsAV) and len(ds) == 64


@pytest.mark.parametrize("kw", [{}, {"channels": 3, "size": 32, "fps": 12, "duration_s": 1.5, "sample_rate": 8000}])
def test_shapes_ranges_labels(kw):
    p = params(**kw)
    ds = BouncingDigitsAV(p)
    for i in (0, 1, 7, 13, 29):
        x, y = ds[i]
        assert y == i % 10
        assert {k: tuple(v.shape) for k, v in x.items()} == p.sample_shape()
        for v in x.values():
            assert v.dtype == torch.float32 and -1 <= v.min() and v.max() <= 1
        assert x["video"].max() - x["video"].min() > 0.9  # min_contrast 0.5 in [0, 1] units
        assert x["audio"].abs().max() > 0.5 * p.amplitude


def test_deterministic_and_splits_disjoint():
    a, b = BouncingDigitsAV(params()), BouncingDigitsAV(params())
    for i in (5, 2, 5, 9999):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert ya == yb and all(torch.equal(xa[k], xb[k]) for k in xa)
    assert torch.equal(a[-1][0]["audio"], a[len(a) - 1][0]["audio"])
    other = BouncingDigitsAV(params(seed=1))
    ev = BouncingDigitsAV(params(), split="eval")
    train = {a[i][0]["video"].numpy().tobytes() for i in range(60)}
    assert len(train) == 60
    assert not train & {ev[i][0]["video"].numpy().tobytes() for i in range(60)}
    assert not train & {other[i][0]["video"].numpy().tobytes() for i in range(60)}
    with pytest.raises(IndexError):
        a[len(a)]
    with pytest.raises(ValueError, match="unknown split"):
        BouncingDigitsAV(params(), split="test")


def test_bursts_sound_exactly_at_the_ground_truth_times():
    p = params(noise=0.0)
    sr, n_burst, fade = p.sample_rate, round(p.burst_s * p.sample_rate), round(p.fade_s * p.sample_rate)
    bounces = 0
    for i in range(40):
        x, label = render_clip(p, i, "eval")
        a = x["audio"][0]
        ev = clip_events(p, i, "eval")
        assert ev.label == label and ev.burst_onsets == (0.0, *ev.bounce_times)
        bounces += len(ev.bounce_times)
        inside = np.zeros(len(a), bool)
        for t in ev.burst_onsets:
            s = round(t * sr)
            inside[s:s + n_burst] = True
            steady = a[s + fade:s + n_burst - fade]
            if len(steady) > 40:  # the tone pair at full level: RMS = amplitude / 2
                assert np.sqrt(np.mean(steady ** 2)) == pytest.approx(p.amplitude / 2, rel=0.1)
        assert np.all(a[~inside] == 0)  # silent between bursts (no noise here)
        for t in ev.audible_onsets[1:]:  # no earlier burst still sounds at an audible onset; it sounds right after
            s = round(t * sr)
            assert not inside[s - 1] or all(round(o * sr) + n_burst <= s for o in ev.burst_onsets if o < t)
            assert np.abs(a[s:s + 2]).max() < 0.03 * p.amplitude  # a raised-cosine fade-in starts at ~0
            assert np.abs(a[s + fade:s + fade + 40]).max() > 0.3 * p.amplitude
        spec = np.abs(np.fft.rfft(a))
        top = sorted(np.argsort(spec)[-2:] * sr / len(a))
        assert top == pytest.approx(dtmf_freqs(label), abs=1.0)
    assert bounces >= 40  # 1-3 bounces per 2 s clip on average


def test_glyph_stays_inside_and_bounces_at_walls():
    p = params(fps=100, streams=["video"])
    counts = []
    for i in range(60):
        ev = clip_events(p, i)
        c, (w, h) = ev.centres, ev.box
        assert (c[:, 0] - w / 2 >= -1e-9).all() and (c[:, 0] + w / 2 <= p.size + 1e-9).all()
        assert (c[:, 1] - h / 2 >= -1e-9).all() and (c[:, 1] + h / 2 <= p.size + 1e-9).all()
        step = np.abs(np.diff(c, axis=0)).max(0)  # px per frame per axis
        for t, ax in zip(ev.bounce_times, ev.bounce_axes):
            k, half = "xy".index(ax), (w, h)["xy".index(ax)] / 2
            f = min(round(t * p.fps), p.num_frames - 1)
            wall_gap = min(c[f, k] - half, p.size - half - c[f, k])
            assert wall_gap <= step[k] + 1e-9  # at a bounce the box touches a wall
        flips = sum(int((np.diff(np.sign(np.diff(c[:, k]))) != 0).sum()) for k in range(2))
        interior = sum(1 / p.fps < t < (p.num_frames - 2) / p.fps for t in ev.bounce_times)
        assert interior <= flips <= len(ev.bounce_times)  # velocity reversals = bounces (edges may hide one)
        counts.append(len(ev.bounce_times))
        video = render_clip(p, i)[0]["video"][0]  # (T, H, W): ink only inside the box (+1 px anti-aliasing)
        fg = np.abs(video - np.median(video)) > 1e-3
        ys, xs = np.nonzero(fg[50])
        assert xs.min() >= np.floor(c[50, 0] - w / 2) - 1 and xs.max() <= np.ceil(c[50, 0] + w / 2)
        assert ys.min() >= np.floor(c[50, 1] - h / 2) - 1 and ys.max() <= np.ceil(c[50, 1] + h / 2)
    assert 1.0 <= np.mean(counts) <= 3.0


def test_one_stream_variants_match_the_dict():
    both = BouncingDigitsAV(params())
    for s in ("video", "audio"):
        p = params(streams=[s])
        ds = BouncingDigitsAV(p)
        x, y = ds[3]
        assert isinstance(x, torch.Tensor) and y == 3 and torch.equal(x, both[3][0][s])
        assert p.sample_shape() == tuple(x.shape) and p.stream_rates() == {s: both.params.stream_rates()[s]}
    assert params(streams=["audio", "video"]).streams == ("video", "audio")


def test_dataloader_collates_dicts():
    batch, y = next(iter(DataLoader(BouncingDigitsAV(params(preset="tiny")), batch_size=4)))
    assert batch["video"].shape == (4, 1, 16, 16, 16) and batch["audio"].shape == (4, 1, 8000)
    assert y.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("bad, match", [
    ({"sample_rate": 3000}, "Nyquist"), ({"streams": []}, "streams"), ({"streams": ["video", "video"]}, "once"),
    ({"streams": ["text"]}, "video"), ({"speed": (0.5, 0.2)}, "low <= high"), ({"scale": (0.3, 0.95)}, "0.9"),
    ({"channels": 2}, "1 or 3"), ({"fade_s": 0.06}, "half of burst_s"), ({"duration_s": 0.1}, "fewer than 2"),
    ({"colour": 1}, "colour"), ({"noise": -0.1}, "greater than or equal"),
])
def test_bad_params_rejected_clearly(bad, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        params(**bad)

