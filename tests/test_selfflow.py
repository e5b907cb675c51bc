"""Self-Flow: token masks (zoo/objectives/masks.py), the ``selfflow`` objective (zoo/objectives/selfflow.py),
SiT's ``attn_mask`` and the Self-Flow / SRA specs."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import zoo  # noqa: F401  (registers the built-ins)
from registry.errors import SpecError
from registry.kinds import MASKS, OBJECTIVES
from registry.spec import load_spec, resolved_dict, validate
from tests.helpers import SPECS, load_raw
from zoo.backbones.sit import SiT, SiTParams
from zoo.core.protocols import Objective, TokenMask
from zoo.core.time import token_times
from zoo.core.types import BackboneOut, StepContext, StepRNG, TokenBatch
from zoo.objectives.masks import mask_count
from zoo.objectives.selfflow import SelfFlow, SelfFlowParams, default_blocks
from zoo.objectives.timesteps import build_timesteps

P, NCLS, GRID = 8, 3, (4, 4)
N = GRID[0] * GRID[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- helpers
def rng(b, seed=0, step=0):
    return StepRNG(seed, step, 0, 0, b, b)


def mask(tag, **kw):
    return MASKS.build(MASKS.get(tag).Params.model_validate({"type": tag, **kw}), grid=GRID)


def objective(hidden=8, depth=4, **kw) -> SelfFlow:
    torch.manual_seed(0)
    return OBJECTIVES.build(SelfFlowParams.model_validate({"type": "selfflow", **kw}), hidden=hidden, depth=depth,
                            grid=GRID)


class Rec(nn.Module):
    """A backbone stub recording its calls; features are a fixed linear map of the input."""

    null_label, depth, hidden = NCLS, 4, 8

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(P, self.hidden, generator=torch.Generator().manual_seed(1)))
        self.calls = []

    def forward(self, x, t, y, *, taps=(), stop_after=None, attn_mask=None):
        self.calls.append(dict(x=x, t=token_times(t), y=y, taps=taps, stop_after=stop_after, attn_mask=attn_mask))
        feats = {k: x @ self.w.to(x.dtype) for k in taps}
        return BackboneOut(None if stop_after else x * self.w.sum(), feats)


def run_rec(obj, b, seed=0, y=None, dtype=torch.float32):
    student, teacher = Rec(), Rec()
    x0 = torch.randn(b, N, P, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    out = obj(student, TokenBatch(x0, y), StepContext(0, rng(b, seed), ema=teacher))
    return out, student.calls[0], teacher.calls[0], x0


def tiny_sit(seed=0, random=True, num_classes=NCLS) -> SiT:
    torch.manual_seed(seed)
    net = SiT(SiTParams(type="sit", preset="tiny"), token_dim=P, grid=GRID, num_classes=num_classes)
    if random:  # DiT's zero init makes every block the identity; random weights make attention matter
        with torch.no_grad():
            for prm in net.parameters():
                prm.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed + prm.numel()))
    return net


def replay(obj, x0, r):
    """The documented draw order of ``selfflow`` with a ``bernoulli`` mask."""
    mp = obj.params.mask
    t, s = obj.timesteps.sample(r), obj.timesteps.sample(r)
    m = (r.rand(x0.shape[1]) < obj.mask.token_ratios(x0.shape[1])) & ~(r.rand() < mp.full_sample_prob)[:, None]
    x1 = r.randn(*x0.shape[1:]).to(x0.dtype)
    u_label = r.rand()
    u = r.rand(2)
    return t, s, m, x1, u_label, u


def cos_loss(a, b):
    a, b = a.double(), b.double()
    return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


# ------------------------------------------------------------------------------------------------ masks
@settings(deadline=None, max_examples=40)
@given(st.integers(1, 300), st.floats(0.0, 1.0), st.integers(1, 6), st.integers(0, 2**16))
def test_exact_count_is_exact(n, ratio, b, seed):
    m = mask("exact_count", ratio=ratio).sample(rng(b, seed), n)
    assert m.shape == (b, n) and m.dtype == torch.bool
    assert (m.sum(1) == math.floor(ratio * n + 0.5)).all() and mask_count(ratio, n) == math.floor(ratio * n + 0.5)


@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.5])
def test_bernoulli_rate(ratio):
    b, n = 256, 256
    m = mask("bernoulli", ratio=ratio).sample(rng(b, 3), n)
    sd = math.sqrt(ratio * (1 - ratio) / (b * n))
    assert abs(m.float().mean().item() - ratio) < 5 * sd
    counts = m.sum(1).float()  # Binomial(N, ratio) per sample, not a fixed count
    assert counts.std() > 0.5 * math.sqrt(n * ratio * (1 - ratio))
    assert not mask("bernoulli", ratio=0.0).sample(rng(4), n).any()


def test_bernoulli_ratio_at_most_half():
    with pytest.raises(Exception, match="0.5"):
        MASKS.get("bernoulli").Params.model_validate({"type": "bernoulli", "ratio": 0.6})
    raw = load_raw("selfflow_digits_tiny.json")
    raw["objective"]["mask"]["ratio"] = 0.75
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert any(p == "objective.mask.ratio" for p, _ in e.value.problems)


@pytest.mark.parametrize("tag", ["bernoulli", "exact_count"])
def test_masks_differ_across_samples_and_are_seeded(tag):
    mk = mask(tag, ratio=0.25)
    assert isinstance(mk, TokenMask)
    m = mk.sample(rng(8, 5), 64)
    assert len({tuple(row.tolist()) for row in m}) == 8
    assert torch.equal(m, mk.sample(rng(8, 5), 64))
    # rank split invariance: rows 2..5 of the global draw
    assert torch.equal(m[2:6], mk.sample(StepRNG(5, 0, 0, 2, 4, 8), 64))


@pytest.mark.parametrize("tag", ["bernoulli", "exact_count"])
def test_full_sample_prob(tag):
    m = mask(tag, ratio=0.5, full_sample_prob=1.0).sample(rng(16), 32)
    assert not m.any()
    m = mask(tag, ratio=0.5, full_sample_prob=0.5).sample(rng(400, 1), 32)
    empty = (~m.any(1)).float().mean().item()
    assert abs(empty - 0.5) < 0.1


# ------------------------------------------------------------------------------------ timestep marginals
def _ks(samples: torch.Tensor, dist) -> float:
    """Kolmogorov-Smirnov distance between ``samples`` and the distribution with inverse CDF ``dist.icdf``."""
    grid = dist.icdf(torch.linspace(0, 1, 20001, dtype=torch.float64))
    cdf = torch.searchsorted(grid, samples.double().sort().values, right=True).double() / grid.numel()
    emp = torch.arange(1, samples.numel() + 1, dtype=torch.float64) / samples.numel()
    return max((cdf - emp).abs().max().item(), (cdf - emp + 1 / samples.numel()).abs().max().item())


@pytest.mark.parametrize("timesteps", [{"type": "uniform"}, {"type": "logit_normal", "mean": 0.5, "std": 1.2}])
def test_every_token_marginal_is_p_t(timesteps):
    b = 3000
    obj = objective(timesteps=timesteps)
    _, sc, _, _ = run_rec(obj, b, seed=7)
    tau = sc["t"]
    assert tau.shape == (b, N)
    crit = 1.95 / math.sqrt(b)  # KS critical value at 0.1 %
    dist = build_timesteps(obj.params.timesteps)
    for i in (0, 5, N - 1):
        assert _ks(tau[:, i], dist) < crit, i
    # the test has power: sorting makes the masked tokens' marginal the max of two draws
    obj = objective(timesteps=timesteps, sort_timesteps=True, mask={"type": "exact_count", "ratio": 0.5})
    tau = run_rec(obj, b, seed=7)[1]["t"]
    assert _ks(tau.max(1).values, dist) > 3 * crit


def test_unsorted_half_the_time_and_sorted_always():
    b = 4000
    obj = objective(mask={"type": "exact_count", "ratio": 0.25})
    _, sc, _, x0 = run_rec(obj, b, seed=2)
    t, s, *_ = replay(obj, x0, rng(b, 2))
    tau = sc["t"]
    assert (tau.min(1).values == torch.minimum(t, s)).all() and (tau.max(1).values == torch.maximum(t, s)).all()
    frac = (s < t).float().mean().item()
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / b)
    obj = objective(mask={"type": "exact_count", "ratio": 0.25}, sort_timesteps=True)
    _, sc, _, x0 = run_rec(obj, b, seed=2)
    tau = sc["t"]
    u = rng(b, 2)
    t, s = obj.timesteps.sample(u), obj.timesteps.sample(u)
    g = u.rand(N).argsort(1)[:, : mask_count(0.25, N)]
    masked = torch.zeros(b, N, dtype=torch.bool).scatter_(1, g, True)
    assert (tau[masked].view(b, -1) == torch.maximum(t, s)[:, None]).all()
    assert (tau[~masked].view(b, -1) == torch.minimum(t, s)[:, None]).all()


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 2**16), st.sampled_from(["bernoulli", "exact_count"]), st.booleans(),
       st.floats(0.0, 0.5), st.floats(0.0, 1.0))
def test_teacher_time_is_min(seed, tag, sort, ratio, fsp):
    obj = objective(mask={"type": tag, "ratio": ratio, "full_sample_prob": fsp}, sort_timesteps=sort)
    out, sc, tc, x0 = run_rec(obj, 6, seed)
    tau, t_te = sc["t"], tc["t"]
    assert t_te.shape == (6,) and (t_te[:, None] <= tau).all() and torch.equal(t_te, tau.min(1).values)
    assert tc["stop_after"] == obj.teacher_block and tc["taps"] == (obj.teacher_block,)
    assert sc["taps"] == (obj.student_block,) and sc["attn_mask"] is None
    # one noise draw for both: x_teacher = (1 - t) x0 + t x1 with the student's x1
    x1 = (sc["x"] - (1 - tau[..., None]) * x0) / tau[..., None].clamp_min(1e-6)
    ok = tau[..., None].expand_as(x0) > 1e-3
    want = (1 - t_te[:, None, None]) * x0 + t_te[:, None, None] * x1
    assert torch.allclose(tc["x"][ok], want[ok], atol=1e-3)
    assert 0 <= out.metrics["mask_frac"] <= 1


def test_full_sample_prob_one_gives_one_timestep():
    obj = objective(mask={"type": "bernoulli", "ratio": 0.5, "full_sample_prob": 1.0})
    out, sc, tc, _ = run_rec(obj, 32, 4)
    tau = sc["t"]
    assert (tau == tau[:, :1]).all() and torch.equal(tc["t"], tau[:, 0])
    assert out.metrics["mask_frac"] == 0


# ------------------------------------------------------------------------------------ attention separation
def test_attention_separation_mask():
    obj = objective(attention_separation=True, mask={"type": "bernoulli", "ratio": 0.5})
    _, sc, tc, x0 = run_rec(obj, 8, 3)
    m = replay(obj, x0, rng(8, 3))[2]
    am = sc["attn_mask"]
    assert am.shape == (8, N, N) and am.dtype == torch.bool
    assert torch.equal(am, m[:, :, None] == m[:, None, :])
    assert am.diagonal(dim1=1, dim2=2).all()
    assert tc["attn_mask"] is None  # the teacher keeps full attention


def test_attention_separation_blocks_other_group_in_sit():
    net = tiny_sit().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, N, P, generator=g), torch.tensor([0, 1])
    m = torch.zeros(2, N, dtype=torch.bool)
    m[0, [1, 4, 7, 9]] = True
    m[1, [0, 2, 3, 15]] = True
    tau = torch.where(m, 0.8, 0.3)
    am = m[:, :, None] == m[:, None, :]
    with torch.no_grad():
        base = net(x, tau, y, attn_mask=am).pred
        for b, j in ((0, 4), (1, 15), (0, 0), (1, 5)):  # perturb token j of sample b
            x2 = x.clone()
            x2[b, j] += 3.0
            out = net(x2, tau, y, attn_mask=am).pred
            same, other = (m[b] == m[b, j]), (m[b] != m[b, j])
            same[j] = False
            assert torch.allclose(out[b, other], base[b, other], atol=1e-6)
            assert (out[b, same] - base[b, same]).abs().max() > 1e-3
            assert torch.equal(out[1 - b], base[1 - b])
        # one group: the separation mask is all True and equals full attention
        full = torch.ones(2, N, N, dtype=torch.bool)
        assert torch.allclose(net(x, tau, y, attn_mask=full).pred, net(x, tau, y).pred, atol=1e-6)
    with pytest.raises(ValueError, match="attn_mask"):
        net(x, tau, y, attn_mask=full[:, :3])


def test_attention_separation_with_one_group_is_full_attention():
    kw = dict(mask={"type": "bernoulli", "ratio": 0.25, "full_sample_prob": 1.0})
    student, ema = tiny_sit(1), tiny_sit(2).eval()
    x0, y = torch.randn(4, N, P, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])
    losses = [objective(hidden=64, depth=4, attention_separation=sep, **kw)(
        student, TokenBatch(x0, y), StepContext(0, rng(4), ema=ema)).loss for sep in (False, True)]
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


# --------------------------------------------------------------------------------------- the loss itself
def hand_loss(obj, student, ema, x0, y, r, scalar=False):
    """Self-Flow written out from [note:selfflow-step], replaying the documented draws."""
    p = obj.params
    t, s, m, x1, u_label, u = replay(obj, x0, r)
    y = torch.where(u_label < p.label_dropout, torch.full_like(y, NCLS), y)
    if p.sort_timesteps:
        t, s = torch.minimum(t, s), torch.maximum(t, s)
    tau = torch.where(m, s[:, None], t[:, None])
    tt = tau[..., None].to(x0.dtype)
    xt = (1 - tt) * x0 + tt * x1
    l, k = obj.student_block, obj.teacher_block
    out = student(xt, tau[:, 0] if scalar else tau, y, taps=(l,))
    t_min = tau.min(1).values
    tm = t_min[:, None, None].to(x0.dtype)
    with torch.no_grad():
        zt = ema((1 - tm) * x0 + tm * x1, t_min, y, taps=(k,)).features[k]  # full pass: stop_after changes nothing
    rep = cos_loss(obj.projector(out.features[l]), zt)
    if p.rep_tokens == "noisier":
        sel = tau == tau.max(1, keepdim=True).values
        rep_l = rep[sel].mean()
    else:
        rep_l = rep.mean()
    gen = ((out.pred.double() - (x1 - x0).double()) ** 2).mean()
    return gen + p.gamma * rep_l, gen, rep_l


@pytest.mark.parametrize("kw", [
    {},
    {"sort_timesteps": True, "gamma": 0.3, "label_dropout": 0.5},
    {"rep_tokens": "noisier", "mask": {"type": "bernoulli", "ratio": 0.5}, "projector": "mlp3", "projector_width": 32},
    {"student_block": 2, "teacher_block": 3, "timesteps": {"type": "logit_normal"}},
])
def test_loss_equals_hand_computation(kw):
    obj = objective(hidden=64, depth=4, **kw)
    assert isinstance(obj, Objective)
    student, ema = tiny_sit(1), tiny_sit(2).eval()
    x0, y = torch.randn(6, N, P, generator=torch.Generator().manual_seed(9)), torch.tensor([0, 1, 2, 0, 1, 2])
    out = obj(student, TokenBatch(x0, y), StepContext(0, rng(6, 9), ema=ema))
    want, gen, rep = hand_loss(obj, student, ema, x0, y, rng(6, 9))
    assert torch.allclose(out.loss.double(), want, atol=1e-5)
    assert torch.allclose(out.metrics["loss_flow"].double(), gen, atol=1e-5)
    assert torch.allclose(out.metrics["loss_rep"].double(), rep, atol=1e-5)
    assert set(out.metrics) == {"loss_flow", "loss_rep", "mask_frac"}
    assert all(v.ndim == 0 and not v.requires_grad for v in out.metrics.values())


def test_per_token_and_scalar_paths_agree():
    """All tokens share a timestep (full-sample masks): the objective's per-token call equals a scalar-t pass."""
    obj = objective(hidden=64, depth=4, mask={"type": "bernoulli", "ratio": 0.25, "full_sample_prob": 1.0})
    student, ema = tiny_sit(1), tiny_sit(2).eval()
    x0, y = torch.randn(5, N, P, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 0, 1])
    out = obj(student, TokenBatch(x0, y), StepContext(0, rng(5, 3), ema=ema))
    want = hand_loss(obj, student, ema, x0, y, rng(5, 3), scalar=True)[0]
    assert torch.allclose(out.loss.double(), want, atol=1e-6)


def test_gradients_reach_student_and_projector_not_teacher():
    obj = objective(hidden=64, depth=4)
    student, ema = tiny_sit(1), tiny_sit(2)  # the EMA copy deliberately left with requires_grad=True
    x0, y = torch.randn(4, N, P), torch.tensor([0, 1, 2, 0])
    obj(student, TokenBatch(x0, y), StepContext(0, rng(4), ema=ema)).loss.backward()
    assert all(p.grad is None for p in ema.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.projector.parameters())
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="EMA"):
        obj(student, TokenBatch(x0, y), StepContext(0, rng(4), ema=None))


def test_dtype_and_device_preserved():
    obj = objective(hidden=64, depth=4).double()
    student, ema = tiny_sit(1).double(), tiny_sit(2).double().eval()
    x0 = torch.randn(3, N, P, dtype=torch.float64)
    out = obj(student, TokenBatch(x0, torch.tensor([0, 1, 2])), StepContext(0, rng(3), ema=ema))
    assert out.loss.dtype == torch.float32 and out.loss.device == x0.device and torch.isfinite(out.loss)
    _, sc, tc, x0 = run_rec(objective().double(), 3, dtype=torch.float64)
    assert sc["x"].dtype == tc["x"].dtype == torch.float64 and sc["x"].device == x0.device
    assert sc["t"].device == x0.device and sc["t"].is_floating_point()


def test_labels_dropped_once_and_shared():
    obj = objective(label_dropout=0.5)
    y = torch.arange(64) % NCLS
    _, sc, tc, x0 = run_rec(obj, 64, 1, y=y)
    u_label = replay(obj, x0, rng(64, 1))[4]
    assert torch.equal(sc["y"], torch.where(u_label < 0.5, NCLS, y)) and torch.equal(tc["y"], sc["y"])
    assert 0 < (sc["y"] == NCLS).sum() < 64


# -------------------------------------------------------------------------------------------------- SRA
def test_sra_spec_equals_direct_sra():
    """specs/sra_digits_tiny.json (mask ratio 0, teacher_time sra) is SRA: student at t on all tokens, teacher
    at clamp(t - 0.2 u, 0, 1) per sample, same noise, same dropped labels, cosine weight 0.5."""
    from runtime.compiler import compile_spec

    spec = load_spec(SPECS / "sra_digits_tiny.json")
    g = compile_spec(spec, torch.device("cpu"))
    student, obj, ema = g.backbone, g.train_module.objective, g.ema.module
    with torch.no_grad():  # a teacher that differs from the student, and non-identity blocks
        for i, prm in enumerate(ema.parameters()):
            prm.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(i))
        for i, prm in enumerate(student.parameters()):
            prm.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1000 + i))
    b, n, p = 4, g.num_tokens, g.modality.token_dim
    x0, y = torch.randn(b, n, p, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 5, 9, 0])
    out = obj(student, TokenBatch(x0, y), StepContext(0, rng(b, 11), ema=ema))

    r = rng(b, 11)
    t = obj.timesteps.sample(r)
    r.rand()                                  # s (unused: no second group)
    r.rand(n), r.rand()                       # mask draws (ratio 0)
    x1 = r.randn(n, p)
    y = torch.where(r.rand() < 0.1, student.null_label, y)
    t_te = (t - 0.2 * r.rand(2)[:, 0]).clamp(0, 1)
    so = student((1 - t[:, None, None]) * x0 + t[:, None, None] * x1, t, y, taps=(2,))
    with torch.no_grad():
        zt = ema((1 - t_te[:, None, None]) * x0 + t_te[:, None, None] * x1, t_te, y, taps=(4,)).features[4]
    want = ((so.pred - (x1 - x0)) ** 2).mean() + 0.5 * cos_loss(obj.projector(so.features[2]), zt).mean()
    assert (obj.student_block, obj.teacher_block, obj.params.gamma) == (2, 4, 0.5)
    assert torch.allclose(out.loss.double(), want.double(), atol=1e-5)
    assert out.metrics["mask_frac"] == 0


# ------------------------------------------------------------------------------------------------ specs
def test_resolve_blocks_and_explicit_resolved_spec():
    assert default_blocks(28) == (8, 20) and default_blocks(12) == (4, 8) and default_blocks(24) == (7, 17)
    assert default_blocks(4) == (1, 3) and default_blocks(2) == (1, 2)
    spec = load_spec(SPECS / "selfflow_imagenet256_xl2.json",
                     ["objective.student_block=null", "objective.teacher_block=null"])
    d = resolved_dict(spec)["objective"]
    assert (d["student_block"], d["teacher_block"], d["projector_width"]) == (8, 20, 2304)
    assert resolved_dict(validate(resolved_dict(spec))) == resolved_dict(spec)  # re-validating it is a no-op


@pytest.mark.parametrize("sets,path", [
    (["objective.student_block=20"], "objective.student_block"),
    (["objective.teacher_block=29"], "objective.teacher_block"),
    (["objective.student_block=0"], "objective.student_block"),
])
def test_block_problems(sets, path):
    with pytest.raises(SpecError) as e:
        load_spec(SPECS / "selfflow_imagenet256_xl2.json", sets)
    assert path in [p for p, _ in e.value.problems]


def test_ema_warning():
    spec = load_spec(SPECS / "selfflow_digits_tiny.json")
    assert list(spec.objective.warnings(spec)) == []
    short = load_spec(SPECS / "selfflow_digits_tiny.json", ["train.steps=50", "train.warmup_steps=5"])
    (msg,) = list(short.objective.warnings(short))
    assert "ema" in msg.lower() and "50" in msg
    xl = load_spec(SPECS / "selfflow_imagenet256_xl2.json")
    assert list(xl.objective.warnings(xl)) == []
    assert list(xl.objective.warnings(load_spec(SPECS / "selfflow_imagenet256_xl2.json", ["train.steps=5000"])))


def test_specs_and_flops():
    xl = load_spec(SPECS / "selfflow_imagenet256_xl2.json")
    o = xl.objective
    assert (o.type, o.timesteps.type, o.mask.type, o.mask.ratio, o.gamma, o.projector) == \
           ("selfflow", "uniform", "bernoulli", 0.25, 0.8, "mlp2")
    assert (xl.train.steps, xl.train.ema.decay, xl.train.grad_clip, xl.train.precision) == (4_000_000, 0.9999, 1.0, "auto")
    assert (xl.solver.type, xl.solver.steps, xl.sample.cfg_scale) == ("euler_maruyama", 250, 1.0)
    fm, sf = load_raw("fm_digits_tiny.json"), load_raw("selfflow_digits_tiny.json")
    for raw in (sf, load_raw("sra_digits_tiny.json")):
        assert {k: v for k, v in raw.items() if k not in ("name", "objective", "train")} == \
               {k: v for k, v in fm.items() if k not in ("name", "objective", "train")}
        assert {**raw["train"], "ema": None} == {**fm["train"], "ema": None}
    obj = objective(hidden=64, depth=4)
    bb = tiny_sit(random=False)
    want = 3 / 4 * bb.flops(N) + 3 * 2.0 * (64 * 128 + 128 * 64) * N
    assert obj.extra_forward_flops(bb, N) == pytest.approx(want)
    assert sum(q.numel() for q in obj.parameters()) == 64 * 128 + 128 + 128 * 64 + 64


def test_contract_like_use_is_seeded():
    obj = objective(hidden=64, depth=4, attention_separation=True)
    student, ema = tiny_sit(1), tiny_sit(2).eval()
    batch = TokenBatch(torch.randn(4, N, P), torch.tensor([0, 1, 2, 0]))
    a = obj(student, batch, StepContext(0, rng(4), ema=ema)).loss
    assert torch.equal(a, obj(student, batch, StepContext(0, rng(4), ema=ema)).loss)
    c = copy.deepcopy(obj)
    assert torch.equal(a, c(student, batch, StepContext(0, rng(4), ema=ema)).loss)
