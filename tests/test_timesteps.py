"""Property tests of the training timestep distributions (zoo/objectives/timesteps.py) and of StepRNG."""
from __future__ import annotations

import math

import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zoo  # noqa: F401  registers the built-ins and resolves forward references
from registry.kinds import TIMESTEPS
from zoo.core.protocols import Timesteps
from zoo.core.time import shift_time
from zoo.core.types import StepRNG
from zoo.objectives.timesteps import ShiftedTimestepsParams, build_timesteps


def make(d: dict):
    """Raw spec dict -> validated params -> distribution, the way a spec builds one."""
    return build_timesteps(TIMESTEPS.get(d["type"]).Params.model_validate(d))


means = st.floats(-3.0, 3.0)
stds = st.floats(0.1, 3.0)
shifts = st.floats(0.1, 20.0)
uniform = st.just({"type": "uniform"})
logit_normal = st.builds(lambda m, s: {"type": "logit_normal", "mean": m, "std": s}, means, stds)
simple = st.one_of(uniform, logit_normal)
shifted = st.builds(lambda a, b: {"type": "shifted", "shift": a, "base": b}, shifts, simple)
any_dist = st.one_of(simple, shifted, st.builds(lambda a, b: {"type": "shifted", "shift": a, "base": b}, shifts, shifted))
us = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=64)
dtypes = st.sampled_from([torch.float32, torch.float64])


@settings(deadline=None, max_examples=60)
@given(any_dist, us, dtypes)
def test_icdf_in_unit_interval_and_monotone(d, u, dtype):
    u = torch.tensor(sorted(u), dtype=dtype)
    t = make(d).icdf(u)
    assert t.shape == u.shape and t.dtype == dtype
    assert torch.isfinite(t).all()
    assert (t >= 0).all() and (t <= 1).all()
    assert (t[1:] >= t[:-1]).all(), "icdf must be non-decreasing"


@settings(deadline=None, max_examples=30)
@given(any_dist)
def test_icdf_endpoints(d):
    t = make(d).icdf(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert t.tolist() == pytest.approx([0.0, 1.0], abs=1e-12)  # shift_time(1, a) = a / (1 + (a - 1)) is 1 up to rounding


@settings(deadline=None, max_examples=30)
@given(us)
def test_uniform_is_identity(u):
    u = torch.tensor(u, dtype=torch.float64)
    assert torch.equal(make({"type": "uniform"}).icdf(u), u)


@settings(deadline=None, max_examples=40)
@given(means, stds)
def test_logit_normal_median(m, s):
    med = make({"type": "logit_normal", "mean": m, "std": s}).icdf(torch.tensor([0.5], dtype=torch.float64))
    assert med.item() == pytest.approx(1 / (1 + math.exp(-m)), abs=1e-12)


@settings(deadline=None, max_examples=40)
@given(stds, us)
def test_logit_normal_symmetric_at_mean_zero(s, u):
    dist = make({"type": "logit_normal", "mean": 0.0, "std": s})
    u = torch.tensor(u, dtype=torch.float64)
    w = torch.maximum(u, 1 - u)  # (1 - w, w) is an exact complementary pair (1 - w is exact for w >= 0.5); 1 - u
    assert torch.allclose(dist.icdf(1 - w) + dist.icdf(w), torch.ones_like(u), atol=1e-9)  # may round for tiny u


@settings(deadline=None, max_examples=40)
@given(simple, us)
def test_shift_one_is_identity(base, u):
    u = torch.tensor(u, dtype=torch.float64)
    assert torch.allclose(make({"type": "shifted", "shift": 1.0, "base": base}).icdf(u), make(base).icdf(u), atol=1e-12)


@settings(deadline=None, max_examples=40)
@given(st.floats(1.0, 20.0), simple, us)
def test_shift_above_one_dominates_base(a, base, u):
    u = torch.tensor(u, dtype=torch.float64)
    assert (make({"type": "shifted", "shift": a, "base": base}).icdf(u) >= make(base).icdf(u)).all()


@settings(deadline=None, max_examples=40)
@given(st.floats(0.1, 1.0), simple, us)
def test_shift_below_one_is_dominated_by_base(a, base, u):
    u = torch.tensor(u, dtype=torch.float64)
    assert (make({"type": "shifted", "shift": a, "base": base}).icdf(u) <= make(base).icdf(u)).all()


@settings(deadline=None, max_examples=40)
@given(means, stds, shifts, us)
def test_shifted_logit_normal_is_logit_normal(m, s, a, u):
    """Self-Flow App. A.2 Eq. 10: s(a, .) of logit-normal(m, s) = logit-normal(m + log a, s)."""
    u = torch.tensor(u, dtype=torch.float64)
    lhs = make({"type": "shifted", "shift": a, "base": {"type": "logit_normal", "mean": m, "std": s}}).icdf(u)
    rhs = make({"type": "logit_normal", "mean": m + math.log(a), "std": s}).icdf(u)
    assert torch.allclose(lhs, rhs, atol=1e-9)


@settings(deadline=None, max_examples=30)
@given(shifts, us)
def test_shifted_uniform_is_shift_time(a, u):
    u = torch.tensor(u, dtype=torch.float64)
    assert torch.allclose(make({"type": "shifted", "shift": a}).icdf(u), shift_time(u, a), atol=1e-12)


@settings(deadline=None, max_examples=15)
@given(any_dist, st.integers(0, 2**31 - 1))
def test_sample_quantiles_match_icdf(d, seed):
    """Empirical CDF of 4000 draws at icdf(q) is q within 0.04 (DKW: failure probability < 1e-5)."""
    n = 4000
    dist = make(d)
    t = dist.sample(StepRNG(seed, 0, 0, 0, n, n)).double()
    assert t.shape == (n,)
    q = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    ecdf = (t[None, :] <= dist.icdf(q)[:, None]).double().mean(1)
    assert (ecdf - q).abs().max() < 0.04


def test_sample_shape_and_range():
    dist = make({"type": "shifted", "preset": "flux2_image"})
    t = dist.sample(StepRNG(0, 3, 1, 0, 8, 8), 5)
    assert t.shape == (8, 5) and ((t >= 0) & (t <= 1)).all()


def test_presets_and_default_base():
    p = ShiftedTimestepsParams.model_validate({"type": "shifted", "preset": "wan22_video"})
    assert p.shift == 2.95 and p.base.type == "logit_normal"
    assert ShiftedTimestepsParams(type="shifted", shift=2.0).base.type == "uniform"
    with pytest.raises(pydantic.ValidationError, match="shift"):
        ShiftedTimestepsParams.model_validate({"type": "shifted", "shift": 0.0})
    with pytest.raises(pydantic.ValidationError, match="nope"):
        ShiftedTimestepsParams.model_validate({"type": "shifted", "shift": 2.0, "base": {"type": "nope"}})


def test_params_fields_described_and_type_required():
    for tag in ("uniform", "logit_normal", "shifted"):
        model = TIMESTEPS.get(tag).Params
        assert model.model_fields["type"].is_required()
        assert all(f.description for f in model.model_fields.values())
    assert isinstance(make({"type": "shifted", "shift": 2.0}), Timesteps)


# --------------------------------------------------------------------------------------------- StepRNG
@settings(deadline=None, max_examples=40)
@given(st.integers(0, 2**20), st.integers(0, 10**6), st.integers(0, 7), st.integers(2, 64), st.data())
def test_step_rng_two_ranks_concatenate_to_one(seed, step, micro, total, data):
    """Rows drawn by 2 ranks (offset/count slices) concatenate to the single-rank draw, for every draw kind."""
    split = data.draw(st.integers(1, total - 1))
    dist = make(data.draw(any_dist))
    one = StepRNG(seed, step, micro, 0, total, total)
    ranks = [StepRNG(seed, step, micro, 0, split, total), StepRNG(seed, step, micro, split, total - split, total)]

    def draws(r):
        return [r.rand(), r.randn(3, 2), dist.sample(r), r.rand(4)]

    full = draws(one)
    parts = [draws(r) for r in ranks]
    for i, f in enumerate(full):
        assert torch.equal(torch.cat([p[i] for p in parts]), f)
