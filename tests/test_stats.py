"""``runtime.stats``: t quantiles and intervals against scipy and printed tables, bootstrap against a numpy
re-implementation, crossing steps on synthetic curves."""
from __future__ import annotations

import math

import numpy as np
import pytest

from runtime import stats

# two-sided 95 % critical values t_{0.975, df} as printed in standard tables (e.g. NIST/SEMATECH e-Handbook
# of Statistical Methods, section 1.3.6.7.2)
TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 30: 2.042, 100: 1.984}


@pytest.mark.parametrize("df,value", sorted(TABLE_975.items()))
def test_t_ppf_matches_printed_table(df, value):
    assert stats.t_ppf(0.975, df) == pytest.approx(value, abs=6e-4)


def test_t_ppf_and_cdf_match_scipy():
    sp = pytest.importorskip("scipy.stats")
    for df in (1, 1.5, 2, 3.7, 5, 12, 60, 400):
        for q in (0.001, 0.05, 0.5, 0.9, 0.975, 0.9995):
            assert stats.t_ppf(q, df) == pytest.approx(sp.t.ppf(q, df), rel=1e-8, abs=1e-9)
        for x in (-30.0, -2.0, 0.0, 0.3, 4.0):
            assert stats.t_cdf(x, df) == pytest.approx(sp.t.cdf(x, df), rel=1e-9, abs=1e-12)


def test_t_interval_matches_scipy_and_formula():
    sp = pytest.importorskip("scipy.stats")
    v = [0.61, 0.70, 0.66]
    got = stats.t_interval(v)
    lo, hi = sp.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=sp.sem(v))
    assert (got.lo, got.hi, got.n) == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9), 3)
    assert got.half_width == pytest.approx(4.302653 * np.std(v, ddof=1) / math.sqrt(3), rel=1e-6)


def test_t_interval_edge_cases():
    assert stats.t_interval([0.5, math.nan, 0.7]).n == 2  # non-finite seeds are not averaged in, but counted out
    one = stats.t_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.lo) and math.isnan(one.hi)
    assert math.isnan(stats.t_interval([]).mean)
    assert stats.t_interval([2.0, 2.0, 2.0]).half_width == 0.0


def test_bootstrap_matches_numpy_reimplementation():
    v = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0])
    got = stats.bootstrap_interval(v, resamples=4000, seed=7)
    rng = np.random.default_rng(7)
    means = np.array([v[rng.integers(0, 6, size=6)].mean() for _ in range(4000)])
    assert (got.lo, got.hi) == (pytest.approx(np.percentile(means, 2.5)), pytest.approx(np.percentile(means, 97.5)))
    assert got.lo < v.mean() < got.hi


def test_bootstrap_close_to_scipy_percentile_bootstrap():
    sp = pytest.importorskip("scipy.stats")
    v = np.random.default_rng(0).normal(1.0, 0.3, size=12)
    got = stats.bootstrap_interval(v, resamples=20000, seed=1)
    ref = sp.bootstrap((v,), np.mean, method="percentile", n_resamples=20000, random_state=2).confidence_interval
    assert got.lo == pytest.approx(ref.low, abs=0.01) and got.hi == pytest.approx(ref.high, abs=0.01)


def test_welch_interval_matches_scipy():
    sp = pytest.importorskip("scipy.stats")
    a, b = [0.80, 0.78, 0.83, 0.79], [0.70, 0.76, 0.69]
    got = stats.welch_interval(a, b)
    ci = sp.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (got.lo, got.hi) == (pytest.approx(ci.low, rel=1e-8), pytest.approx(ci.high, rel=1e-8))


def test_overlap():
    a, b = stats.Interval(1.0, 0.5, 1.5, 3), stats.Interval(2.0, 1.4, 2.6, 3)
    assert a.overlaps(b) and b.overlaps(a)
    assert not a.overlaps(stats.Interval(2.0, 1.6, 2.4, 3))
    assert not a.overlaps(stats.Interval(1.0, math.nan, math.nan, 1))


STEPS = [100, 200, 300, 400, 500]


def test_crossing_step_both_directions():
    acc = [0.2, 0.5, 0.7, 0.8, 0.9]
    assert stats.crossing_step(STEPS, acc, 0.7, higher_is_better=True) == 300
    fd = [9.0, 5.0, 3.0, 2.5, 2.0]
    assert stats.crossing_step(STEPS, fd, 4.0, higher_is_better=False) == 300
    assert stats.crossing_step(STEPS, fd, 1.0, higher_is_better=False) is None
    assert stats.crossing_step(STEPS, [math.nan] * 5, 0.0, higher_is_better=True) is None


def test_steps_to_quality_faster_method():
    """A method whose FD curve is the baseline's shifted two evaluations earlier reaches its final mean at
    300 of 500 steps (60 %), and every resample reaches it."""
    base_curve = np.array([10.0, 8.0, 6.0, 4.0, 2.0])
    noise = np.array([[0.0], [0.1], [-0.1]])
    baseline = base_curve + noise
    fast = np.array([6.0, 4.0, 2.0, 1.8, 1.6]) + noise
    got = stats.steps_to_quality(STEPS, fast, baseline[:, -1], higher_is_better=False)
    assert got.step == 300 and got.reached == 1.0
    assert 200 <= got.lo <= 300 <= got.hi <= 400
    own = stats.steps_to_quality(STEPS, baseline, None, higher_is_better=False)
    assert own.step == 500


def test_steps_to_quality_never_reached():
    baseline = np.array([[0.2, 0.6, 0.8]] * 3) + np.array([[0.0], [0.01], [0.02]])
    slow = np.array([[0.1, 0.3, 0.5]] * 3)
    got = stats.steps_to_quality([1, 2, 3], slow, baseline[:, -1], higher_is_better=True)
    assert got.step is None and got.reached == 0.0 and got.lo == math.inf and got.hi == math.inf


def test_steps_to_quality_rejects_bad_shapes():
    with pytest.raises(ValueError, match="runs must be"):
        stats.steps_to_quality([1, 2], np.zeros((2, 3)), None, higher_is_better=True)
