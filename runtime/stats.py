"""Small statistics for seed studies (pure Python + numpy; no scipy at run time).

* :func:`t_interval` -- mean and two-sided Student-t interval over seeds (``n - 1`` degrees of freedom);
* :func:`bootstrap_interval` -- percentile bootstrap of the mean (resampling seeds with replacement);
* :func:`welch_interval` -- interval of a difference of two means (Welch-Satterthwaite degrees of freedom);
* :func:`crossing_step` / :func:`steps_to_quality` -- the first evaluated step at which a method's mean curve
  reaches a target (the baseline's final mean), with a bootstrap interval over the seeds of both.

The t quantile comes from the regularised incomplete beta function (continued fraction, Lentz's method, as in
Press et al., *Numerical Recipes*, 3rd ed., section 6.4) inverted by bisection; it is exact to ~1e-10 for any
real ``df > 0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

_EPS, _TINY = 1e-15, 1e-300


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1 (got a={a}, b={b}, x={x})")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """``P(T <= x)`` for Student's t with ``df > 0`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0 (got {df})")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + x * x))  # P(T > |x|)
    return 1.0 - tail if x >= 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (``0 < q < 1``, ``df > 0``), by bisection on :func:`t_cdf`."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q must be in (0, 1) (got {q})")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """A mean (or mean difference) with its two-sided interval; ``n`` finite values went in (NaN bounds when
    fewer than two)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0

    def overlaps(self, other: "Interval") -> bool:
        """The two intervals share a point (False when either is undefined)."""
        return bool(self.lo <= other.hi and other.lo <= self.hi)


def _finite(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return v[np.isfinite(v)]


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of the finite ``values`` and ``mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n)``."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = t_ppf(0.5 + level / 2.0, n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def bootstrap_interval(values: Sequence[float], level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> Interval:
    """Mean of the finite ``values`` and the percentile-bootstrap interval of the mean: ``resamples`` draws of
    ``n`` values with replacement (``numpy.random.default_rng(seed)``), the ``(1 -/+ level) / 2`` percentiles
    (linear interpolation) of their means. With few seeds it is narrower than the t-interval (it ignores the
    uncertainty of the spread itself)."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if n < 2:
        return Interval(float(v.mean()), math.nan, math.nan, n)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = v[idx].mean(axis=1)
    lo, hi = np.percentile(means, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return Interval(float(v.mean()), float(lo), float(hi), n)


def mean_interval(values: Sequence[float], level: float = 0.95, method: str = "t") -> Interval:
    """:func:`t_interval` (``method="t"``) or :func:`bootstrap_interval` (``"bootstrap"``)."""
    if method == "t":
        return t_interval(values, level)
    if method == "bootstrap":
        return bootstrap_interval(values, level)
    raise ValueError(f"interval method must be 't' or 'bootstrap' (got {method!r})")


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """``mean(a) - mean(b)`` with Welch's t-interval (unequal variances, Welch-Satterthwaite df); NaN bounds
    when either side has fewer than two finite values. ``n`` is ``len(a) + len(b)``."""
    x, y = _finite(a), _finite(b)
    if len(x) == 0 or len(y) == 0:
        return Interval(math.nan, math.nan, math.nan, len(x) + len(y))
    diff = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return Interval(diff, math.nan, math.nan, len(x) + len(y))
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0.0:
        return Interval(diff, diff, diff, len(x) + len(y))
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = t_ppf(0.5 + level / 2.0, df) * se
    return Interval(diff, diff - half, diff + half, len(x) + len(y))


def crossing_step(steps: Sequence[int], curve: Sequence[float], target: float, higher_is_better: bool) -> int | None:
    """The first ``steps[i]`` whose ``curve[i]`` is at least as good as ``target`` (``>=`` when higher is better,
    ``<=`` otherwise); None when no point reaches it (NaN points never do)."""
    c = np.asarray(curve, dtype=np.float64)
    if len(c) != len(steps):
        raise ValueError(f"crossing_step: {len(steps)} steps but {len(c)} curve points")
    hit = c >= target if higher_is_better else c <= target
    where = np.flatnonzero(hit)
    return int(steps[where[0]]) if len(where) else None


@dataclass(frozen=True)
class Crossing:
    """Steps to reach a target: ``step`` from the mean curves (None = not reached), ``lo``/``hi`` the bootstrap
    percentiles (``inf`` = not reached within the evaluated steps), ``reached`` the share of resamples that
    reached it."""

    step: int | None
    lo: float
    hi: float
    reached: float


def steps_to_quality(steps: Sequence[int], runs: np.ndarray, baseline: np.ndarray | None, higher_is_better: bool,
                     level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Crossing:
    """First step at which the seed-mean of ``runs`` ``(seeds, len(steps))`` reaches the seed-mean of the
    baseline's final values ``baseline (baseline_seeds,)`` -- or, with ``baseline=None`` (the method IS the
    baseline), its own final mean.

    The interval resamples the seeds of the method and of the baseline independently with replacement
    (``resamples`` times, ``numpy.random.default_rng(seed)``), recomputes both means and the crossing step, and
    takes the ``(1 -/+ level) / 2`` percentiles (``inverted_cdf``: always an evaluated step, or ``inf`` when
    that share of resamples never reaches the target). Seeds with a NaN at a step make that step's mean NaN.
    """
    runs = np.asarray(runs, dtype=np.float64)
    if runs.ndim != 2 or runs.shape[1] != len(steps):
        raise ValueError(f"steps_to_quality: runs must be (seeds, {len(steps)}), got {runs.shape}")
    own = baseline is None
    base = runs[:, -1] if own else np.asarray(baseline, dtype=np.float64).reshape(-1)
    step = crossing_step(steps, runs.mean(axis=0), float(base.mean()), higher_is_better)
    rng = np.random.default_rng(seed)
    n, m = runs.shape[0], len(base)
    found = np.empty(resamples)
    for r in range(resamples):
        rows = rng.integers(0, n, size=n)
        target = runs[rows, -1].mean() if own else base[rng.integers(0, m, size=m)].mean()
        s = crossing_step(steps, runs[rows].mean(axis=0), float(target), higher_is_better)
        found[r] = math.inf if s is None else s
    lo, hi = np.percentile(found, [50.0 * (1.0 - level), 50.0 * (1.0 + level)], method="inverted_cdf")
    return Crossing(step, float(lo), float(hi), float(np.isfinite(found).mean()))
