"""Samplers on an analytic Gaussian flow (zoo/solvers/ode.py, sde.py) and classifier-free guidance (guidance.py).

Data ``x0 ~ N(mu, s^2)`` per dimension, noise ``x1 ~ N(0, 1)``, linear path ``x_t = (1 - t) x0 + t x1``:
the exact marginal velocity is ``v(x, t) = -mu + ((t - (1 - t) s^2) / sigma_t^2) (x - (1 - t) mu)`` with
``sigma_t^2 = (1 - t)^2 s^2 + t^2``, and the ODE maps noise to ``x0 = mu + s x1`` exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

import zoo  # noqa: F401  registers the built-ins and resolves forward references
from registry.kinds import SOLVERS
from zoo.core.protocols import Solver
from zoo.core.time import shift_time
from zoo.solvers.guidance import guided
from zoo.solvers.sde import score_from_velocity

MU = torch.tensor([1.5, -0.5, 0.3], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


def gaussian_velocity(x, t):
    """Exact velocity of the linear path for data N(MU, S^2); ``x`` ``(B, N, 3)``, ``t`` ``(B,)``."""
    t = t.to(torch.float64)[:, None, None]
    var = (1 - t) ** 2 * S**2 + t**2
    return (-MU + (t - (1 - t) * S**2) / var * (x.to(torch.float64) - (1 - t) * MU)).to(x.dtype)


def solver(typ, **kw):
    return SOLVERS.build(SOLVERS.get(typ).Params.model_validate({"type": typ, **kw}))


def noise(b, n=1, seed=0, dtype=torch.float64):
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Recorder:
    """Wraps a velocity and records ``(x, t)`` of every call."""

    def __init__(self, v=gaussian_velocity):
        self.v, self.calls = v, []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return self.v(x, t)


# ------------------------------------------------------------------------------------------------ ODE
# REPA's Heun ends with an Euler step (local error O(h^2), like Heun's global error): still second order, with a
# larger constant where the shift makes the last step long
@pytest.mark.parametrize("typ, extra, lo, hi, tol", [("euler", {}, 0.8, 1.2, 0.3), ("heun", {}, 1.7, 2.3, 0.05),
                                                     ("heun", {"final_corrector": True}, 1.8, 2.3, 0.01)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ode_convergence_order(typ, extra, lo, hi, tol, shift):
    x1 = noise(64, 2)
    exact = MU + S * x1
    errs = [(solver(typ, steps=n, shift=shift, **extra).solve(gaussian_velocity, x1) - exact).abs().max().item()
            for n in (8, 16, 32)]
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(lo <= o <= hi for o in orders), (errs, orders)
    assert errs[-1] < tol


@pytest.mark.parametrize("typ, per_step, extra", [("euler", 1, {}), ("heun", 2, {}), ("heun", 2, {"final_corrector": True})])
def test_ode_nfe_and_grid(typ, per_step, extra):
    steps = 7
    repa_heun = typ == "heun" and not extra  # no corrector on the last step to t = 0
    for shift in (1.0, 3.0):
        rec = Recorder()
        sol = solver(typ, steps=steps, shift=shift, **extra)
        sol.solve(rec, noise(4))
        assert sol.nfe == steps * per_step - repa_heun == len(rec.calls)
        grid = shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)
        assert torch.allclose(sol.times, grid)
        seen = torch.tensor([float(t[0]) for _, t in rec.calls], dtype=torch.float64)
        expect = grid[:-1] if typ == "euler" else torch.stack([grid[:-1], grid[1:]], 1).flatten()
        if repa_heun:
            expect = expect[:-1]
        assert torch.allclose(seen, expect)
        assert all(t.shape == (4,) for _, t in rec.calls)
    # the shift moves every inner grid point toward noise, and shift 1 is the uniform grid
    assert (solver(typ, steps=steps, shift=3.0).times[1:-1] > solver(typ, steps=steps).times[1:-1]).all()
    assert torch.allclose(solver(typ, steps=steps).times, torch.linspace(1, 0, steps + 1, dtype=torch.float64))


def repa_euler_sampler_heun(model, latents, num_steps):
    """Transcription of REPA ``samplers.py:euler_sampler(..., heun=True)`` without guidance, from its documented rule:
    float64 state on ``linspace(1, 0, num_steps + 1)``, model inputs in the latents' dtype, an Euler predictor on every
    step and the trapezoidal corrector ``x_cur + dt (d_cur + d_prime) / 2`` only while ``i < num_steps - 1``."""
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        time_input = torch.ones(x_cur.size(0), dtype=torch.float64) * t_cur
        d_cur = model(x_cur.to(latents.dtype), time_input.to(latents.dtype)).to(torch.float64)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            time_input = torch.ones(x_cur.size(0), dtype=torch.float64) * t_next
            d_prime = model(x_next.to(latents.dtype), time_input.to(latents.dtype)).to(torch.float64)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_heun_matches_repa_euler_sampler(dtype):
    """Default ``heun`` = REPA's Heun bit for bit (2N - 1 evaluations); ``final_corrector`` = the 2N rule."""
    x1 = noise(16, 2, seed=3, dtype=dtype)
    ref = repa_euler_sampler_heun(gaussian_velocity, x1, 20)
    ours = solver("heun", steps=20).solve(gaussian_velocity, x1)
    assert torch.equal(ours, ref.to(dtype))
    rec = Recorder()
    solver("heun", steps=20).solve(rec, x1)
    assert len(rec.calls) == 39
    both = solver("heun", steps=20, final_corrector=True).solve(gaussian_velocity, x1)
    gap = (both.double() - ref).abs().max().item()
    assert 1e-6 < gap < 1e-2  # the last step alone differs


@pytest.mark.parametrize("typ", ["euler", "heun", "euler_maruyama"])
def test_solve_keeps_shape_and_dtype(typ):
    x1 = noise(4, 5, dtype=torch.float32)
    out = solver(typ, steps=4).solve(gaussian_velocity, x1, generator=torch.Generator().manual_seed(0))
    assert out.shape == x1.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_solver_params():
    assert solver("euler").params.steps == 50 and solver("heun").params.shift == 1.0
    p = solver("euler_maruyama").params
    assert (p.steps, p.last_step, p.diffusion_norm) == (250, 0.04, 1.0)
    for tag in ("euler", "heun", "euler_maruyama"):
        model = SOLVERS.get(tag).Params
        assert model.model_fields["type"].is_required()
        assert all(f.description for f in model.model_fields.values())
        assert isinstance(solver(tag), Solver)


# ------------------------------------------------------------------------------------------------ SDE
def test_score_from_velocity_is_exact_for_gaussian():
    x, t = noise(8, 2), 0.37
    v = gaussian_velocity(x, torch.full((8,), t, dtype=torch.float64))
    var = (1 - t) ** 2 * S**2 + t**2
    assert torch.allclose(score_from_velocity(v, x, t), -(x - (1 - t) * MU) / var)


def test_euler_maruyama_matches_target_distribution():
    x1 = noise(4000)
    out = solver("euler_maruyama").solve(gaussian_velocity, x1, generator=torch.Generator().manual_seed(1))
    flat = out.reshape(-1, 3)
    assert torch.allclose(flat.mean(0), MU, atol=0.15)
    assert torch.allclose(flat.std(0), S, rtol=0.08)
    # stochastic: not the ODE map of its own noise
    assert (out - (MU + S * x1)).abs().mean() > 0.1


def test_euler_maruyama_deterministic_given_generator():
    sol, x1 = solver("euler_maruyama", steps=20), noise(16)
    a = sol.solve(gaussian_velocity, x1, generator=torch.Generator().manual_seed(5))
    b = sol.solve(gaussian_velocity, x1, generator=torch.Generator().manual_seed(5))
    c = sol.solve(gaussian_velocity, x1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_euler_maruyama_grid_and_nfe():
    rec = Recorder()
    sol = solver("euler_maruyama", steps=10, last_step=0.05)
    sol.solve(rec, noise(3), generator=torch.Generator().manual_seed(0))
    grid = torch.cat([torch.linspace(1, 0.05, 10, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    assert torch.allclose(sol.times, grid)
    assert sol.nfe == 10 == len(rec.calls)
    assert torch.allclose(torch.tensor([float(t[0]) for _, t in rec.calls], dtype=torch.float64), grid[:-1])


def test_euler_maruyama_last_step_adds_no_noise(monkeypatch):
    """Exactly steps - 1 noise draws, and the output is the drift-only step from the last state seen."""
    draws = []
    real = torch.randn

    def counting(*a, **k):
        draws.append(1)
        return real(*a, **k)

    rec = Recorder()
    sol, x1 = solver("euler_maruyama", steps=12), noise(6)
    monkeypatch.setattr(torch, "randn", counting)
    out = sol.solve(rec, x1, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert len(draws) == 11
    x_last, t_last = rec.calls[-1]
    t = float(t_last[0])
    assert t == pytest.approx(0.04)
    expect = x_last + (0.0 - t) * sol.drift(gaussian_velocity(x_last, t_last), x_last, t)
    assert torch.allclose(out, expect, atol=1e-12)
    # a single step is only the deterministic one: independent of the generator
    one = solver("euler_maruyama", steps=1)
    a = one.solve(gaussian_velocity, noise(4), generator=torch.Generator().manual_seed(0))
    b = one.solve(gaussian_velocity, noise(4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_euler_maruyama_without_diffusion_is_euler():
    x1 = noise(8)
    sde = solver("euler_maruyama", steps=8, last_step=0.125, diffusion_norm=0.0)
    ode = solver("euler", steps=8)
    assert torch.allclose(sde.solve(gaussian_velocity, x1, torch.Generator().manual_seed(0)),
                          ode.solve(gaussian_velocity, x1), atol=1e-12)


# ------------------------------------------------------------------------------------------------ CFG
class Model:
    """``model(x, t, y)``: ``x + 10 (y + 1) + t``; the null label gives ``x + 10 (NULL + 1) + t``."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], None if y is None else y.clone()))
        base = x + t[:, None, None]
        return base if y is None else base + 10.0 * (y.to(x.dtype) + 1)[:, None, None]


NULL = 7


def test_cfg_scale_one_is_conditional_single_call():
    m, x, y = Model(), noise(3), torch.tensor([0, 1, 2])
    t = torch.full((3,), 0.5, dtype=torch.float64)
    v = guided(m, y, NULL, 1.0, 0.0, 1.0)(x, t)
    assert torch.equal(v, Model()(x, t, y)) and len(m.calls) == 1 and m.calls[0][0] == 3


def test_cfg_combination_formula_in_one_batched_call():
    m, x, y = Model(), noise(3), torch.tensor([0, 1, 2])
    t = torch.full((3,), 0.5, dtype=torch.float64)
    v = guided(m, y, NULL, 3.0, 0.0, 1.0)(x, t)
    ref = Model()
    vc, vu = ref(x, t, y), ref(x, t, torch.full_like(y, NULL))
    assert torch.allclose(v, vu + 3.0 * (vc - vu))
    assert len(m.calls) == 1 and m.calls[0][0] == 6 and m.calls[0][1].tolist() == [0, 1, 2, NULL, NULL, NULL]


def test_cfg_interval():
    m, x, y = Model(), noise(5), torch.tensor([0, 1, 2, 3, 4])
    t = torch.tensor([0.1, 0.2, 0.5, 0.7, 0.9], dtype=torch.float64)
    v = guided(m, y, NULL, 2.5, 0.2, 0.7)(x, t)
    ref = Model()
    vc, vu = ref(x, t, y), ref(x, t, torch.full_like(y, NULL))
    inside = torch.tensor([False, True, True, True, False])  # boundaries included
    assert torch.allclose(v[inside], (vu + 2.5 * (vc - vu))[inside])
    assert torch.equal(v[~inside], vc[~inside])
    # no sample inside the interval: a single conditional call
    m2 = Model()
    v2 = guided(m2, y, NULL, 2.5, 0.2, 0.7)(x, torch.full((5,), 0.9, dtype=torch.float64))
    assert len(m2.calls) == 1 and m2.calls[0][0] == 5
    assert torch.equal(v2, ref(x, torch.full((5,), 0.9, dtype=torch.float64), y))


def test_cfg_unconditional_model():
    m, x = Model(), noise(2)
    t = torch.full((2,), 0.3, dtype=torch.float64)
    v = guided(m, None, NULL, 4.0, 0.0, 1.0)(x, t)
    assert torch.equal(v, x + 0.3) and m.calls == [(2, None)]


def test_cfg_inside_a_solver():
    """Guided velocities plug into every solver (scale 1 = the conditional solve)."""
    y = torch.tensor([0, 1, 2, 3])
    for typ in ("euler", "heun", "euler_maruyama"):
        sol = solver(typ, steps=5)
        a = sol.solve(guided(Model(), y, NULL, 1.0), noise(4), torch.Generator().manual_seed(0))
        b = sol.solve(lambda x, t: Model()(x, t, y), noise(4), torch.Generator().manual_seed(0))
        assert torch.equal(a, b)
