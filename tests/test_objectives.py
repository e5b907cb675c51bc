"""Flow-matching objective identities (zoo/objectives/flow_matching.py, zoo/core/time.py) and LR schedules."""
from __future__ import annotations

import math

import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import zoo  # noqa: F401  registers the built-ins and resolves forward references
from registry.kinds import LR_SCHEDULES, OBJECTIVES
from zoo.core.protocols import LRSchedule, Objective
from zoo.core.time import interpolate, velocity_target
from zoo.core.types import BackboneOut, StepContext, StepRNG, TokenBatch
from zoo.objectives.flow_matching import FlowMatchingParams, drop_labels, noised
from zoo.objectives.timesteps import build_timesteps

NULL = 10


def objective(**kw):
    return OBJECTIVES.build(FlowMatchingParams.model_validate({"type": "flow_matching", **kw}))


def ctx(seed=0, step=0, offset=0, count=None, total=8):
    count = total if count is None else count
    return StepContext(step=step, rng=StepRNG(seed, step, 0, offset, count, total))


class Stub(nn.Module):
    """A student ``f(x_t, t, y)`` that records its inputs and returns ``fn(x_t, t, y)``."""

    null_label = NULL

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, x, t, y, *, taps=(), stop_after=None):
        self.calls.append((x, t, y))
        return BackboneOut(pred=self.fn(x, t, y))


def replay(obj, x0, rng: StepRNG):
    """The documented draw order: t, then x1, then the label-dropout uniforms."""
    t = obj.timesteps.sample(rng)
    x1 = rng.randn(*x0.shape[1:])
    u = rng.rand()
    return t, x1, u


# ------------------------------------------------------------------------------------ time identities
xs = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**16))


def tokens(b, n, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, p, generator=g, dtype=torch.float64), torch.randn(b, n, p, generator=g, dtype=torch.float64)


@settings(deadline=None, max_examples=30)
@given(xs)
def test_interpolate_endpoints(shape):
    x0, x1 = tokens(*shape)
    b, n = shape[:2]
    for t in (torch.zeros(b, dtype=torch.float64), torch.zeros(b, n, dtype=torch.float64)):
        assert torch.equal(interpolate(x0, x1, t), x0)
        assert torch.equal(interpolate(x0, x1, t + 1), x1)


@settings(deadline=None, max_examples=30)
@given(xs, st.floats(0.01, 0.99))
def test_target_is_central_difference(shape, t0):
    x0, x1 = tokens(*shape)
    h = 1e-4
    t = torch.full((shape[0],), t0, dtype=torch.float64)
    fd = (interpolate(x0, x1, t + h) - interpolate(x0, x1, t - h)) / (2 * h)
    assert torch.allclose(fd, velocity_target(x0, x1), atol=1e-8)
    xt, target = noised(x0, x1, t)
    assert torch.equal(xt, interpolate(x0, x1, t)) and torch.equal(target, x1 - x0)


@settings(deadline=None, max_examples=30)
@given(xs, st.integers(0, 2**16))
def test_per_token_time(shape, seed):
    """With t (B, N) every token is interpolated with its own t, and the target is unchanged."""
    x0, x1 = tokens(*shape)
    b, n, _ = x0.shape
    t = torch.rand(b, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    xt, target = noised(x0, x1, t)
    for i in range(b):
        for j in range(n):
            tij = t[i, j]
            assert torch.allclose(xt[i, j], (1 - tij) * x0[i, j] + tij * x1[i, j])
    assert torch.equal(target, x1 - x0)
    # a per-token t that is constant over tokens equals the per-sample t
    ts = t[:, 0]
    assert torch.allclose(noised(x0, x1, ts[:, None].expand(b, n))[0], noised(x0, x1, ts)[0])


# ------------------------------------------------------------------------------------------- objective
def test_oracle_student_has_zero_loss_and_draw_order():
    obj = objective(timesteps={"type": "logit_normal"})
    x0 = torch.randn(8, 6, 4)
    t, x1, _ = replay(obj, x0, ctx().rng)
    student = Stub(lambda x, tt, y: x1 - x0)
    out = obj(student, TokenBatch(x0=x0), ctx())
    assert out.loss.item() == 0.0
    (xt_seen, t_seen, y_seen), = student.calls
    assert torch.equal(t_seen, t) and t_seen.shape == (8,) and y_seen is None
    assert torch.allclose(xt_seen, interpolate(x0, x1, t))
    assert set(out.metrics) == {"loss_flow"} and not out.metrics["loss_flow"].requires_grad


def test_zero_student_loss_is_mean_squared_target():
    obj = objective()
    x0 = torch.randn(64, 16, 8)
    _, x1, _ = replay(obj, x0, ctx(total=64).rng)
    out = obj(Stub(lambda x, t, y: torch.zeros_like(x)), TokenBatch(x0=x0), ctx(total=64))
    assert out.loss.item() == pytest.approx(((x1 - x0) ** 2).mean().item(), rel=1e-6)
    # E ||x1 - x0||^2 per coordinate = 1 + mean(x0^2) over the noise
    assert out.loss.item() == pytest.approx(1 + (x0 ** 2).mean().item(), rel=0.05)


def test_objective_has_no_parameters_and_gradients_reach_student():
    obj = objective()
    assert isinstance(obj, Objective) and list(obj.parameters()) == []
    lin = nn.Linear(4, 4)
    out = obj(Stub(lambda x, t, y: lin(x)), TokenBatch(x0=torch.randn(8, 3, 4)), ctx())
    out.loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_loss_is_split_invariant_over_ranks():
    """Two ranks with half the batch each see the same noise; their mean loss is the one-rank loss."""
    obj = objective(timesteps={"type": "shifted", "shift": 3.0})
    x0, y = torch.randn(8, 5, 3), torch.arange(8) % 4
    f = lambda x, t, yy: x * t[:, None, None] + yy[:, None, None]  # noqa: E731
    full = obj(Stub(f), TokenBatch(x0, y), ctx(seed=3, step=7)).loss
    halves = [obj(Stub(f), TokenBatch(x0[s], y[s]), ctx(seed=3, step=7, offset=s.start, count=4)).loss
              for s in (slice(0, 4), slice(4, 8))]
    assert torch.allclose((halves[0] + halves[1]) / 2, full)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_label_dropout_rate(rate):
    n = 20000
    obj = objective(label_dropout=rate)
    student = Stub(lambda x, t, y: torch.zeros_like(x))
    y = torch.randint(0, NULL, (n,))
    obj(student, TokenBatch(torch.zeros(n, 1, 1), y), ctx(total=n))
    seen = student.calls[0][2]
    dropped = seen == NULL
    assert abs(dropped.float().mean().item() - rate) < 0.015  # ~5 sigma
    assert torch.equal(seen[~dropped], y[~dropped])


def test_label_dropout_zero_never_drops_and_none_stays_none():
    n = 20000
    y = torch.randint(0, NULL, (n,))
    rng = StepRNG(0, 0, 0, 0, n, n)
    assert torch.equal(drop_labels(y, rng, 0.0, NULL), y)
    assert drop_labels(y, rng, 1.0, NULL).eq(NULL).all()
    assert drop_labels(None, rng, 0.5, NULL) is None
    student = Stub(lambda x, t, yy: torch.zeros_like(x))
    objective(label_dropout=0.0)(student, TokenBatch(torch.zeros(n, 1, 1), y), ctx(total=n))
    assert torch.equal(student.calls[0][2], y)


def test_label_dropout_draw_is_made_without_labels():
    """The dropout uniforms are drawn even when y is None, so later draws never depend on labels."""
    obj = objective()
    rng_a, rng_b = StepRNG(1, 2, 0, 0, 4, 4), StepRNG(1, 2, 0, 0, 4, 4)
    obj(Stub(lambda x, t, y: torch.zeros_like(x)), TokenBatch(torch.zeros(4, 2, 2)), StepContext(0, rng_a))
    obj(Stub(lambda x, t, y: torch.zeros_like(x)), TokenBatch(torch.zeros(4, 2, 2), torch.zeros(4, dtype=torch.long)),
        StepContext(0, rng_b))
    assert torch.equal(rng_a.rand(), rng_b.rand())


def test_params():
    p = FlowMatchingParams(type="flow_matching")
    assert p.label_dropout == 0.1 and p.timesteps.type == "uniform"
    assert FlowMatchingParams.model_fields["type"].is_required()
    assert all(f.description for f in FlowMatchingParams.model_fields.values())
    q = FlowMatchingParams.model_validate({"type": "flow_matching", "timesteps": {"type": "shifted", "shift": 2.0}})
    assert build_timesteps(q.timesteps).params.shift == 2.0
    with pytest.raises(pydantic.ValidationError, match="label_dropout"):
        FlowMatchingParams.model_validate({"type": "flow_matching", "label_dropout": 1.5})


# ------------------------------------------------------------------------------------------ LR schedules
def schedule(d):
    return LR_SCHEDULES.build(LR_SCHEDULES.get(d["type"]).Params.model_validate(d))


@pytest.mark.parametrize("d", [{"type": "constant"}, {"type": "cosine"}, {"type": "cosine", "final_fraction": 0.1},
                               {"type": "linear"}, {"type": "linear", "final_fraction": 0.25}])
def test_lr_warmup_and_endpoints(d):
    s, total, warm = schedule(d), 1000, 100
    assert isinstance(s, LRSchedule)
    final = d.get("final_fraction", 0.0) if d["type"] != "constant" else 1.0
    assert [s.factor(i, total, warm) for i in (0, 49, 99)] == pytest.approx([0.01, 0.5, 1.0])
    assert s.factor(warm, total, warm) == pytest.approx(1.0)
    assert s.factor(total, total, warm) == pytest.approx(final)
    assert s.factor(total + 10, total, warm) == pytest.approx(final)
    assert s.factor(0, total, 0) == pytest.approx(1.0)  # no warm-up
    after = [s.factor(i, total, warm) for i in range(warm, total + 1)]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # non-increasing after warm-up
    mid = s.factor(warm + (total - warm) // 2, total, warm)
    assert mid == pytest.approx((1 + final) / 2)  # cosine and linear both pass the midpoint at (1 + final) / 2


def test_lr_cosine_shape():
    s = schedule({"type": "cosine"})
    assert s.factor(250, 1000, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
