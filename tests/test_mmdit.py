"""The ``mmdit`` backbone and the ``position`` kind (rotary embeddings)."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pydantic
import pytest
import torch

import zoo  # noqa: F401  (registers the built-ins, resolves forward references)
from registry.kinds import BACKBONES, POSITIONS
from zoo.backbones.mmdit import Mmdit, MmditParams
from zoo.core.layout import Segment, TokenLayout
from zoo.layers.positions import NoPositionParams, Rope, RopeParams, rope_axes
from zoo.objectives.selfflow import SelfFlowParams

NV, NA, PV, PA = 8, 6, 12, 20   # video-like tokens (2 frames x 2 x 2) and audio-like tokens, their token dims


pytestmark = pytest.mark.usefixtures("one_thread")


def av_layout() -> TokenLayout:
    """Video (t 2, h 2, w 2) at 0.16 s per frame, then audio (6 tokens) at 0.04 s per token; P = 20."""
    ft, rr, cc = torch.meshgrid(torch.arange(2.0), torch.arange(2.0), torch.arange(2.0), indexing="ij")
    video = torch.stack([ft.reshape(-1) * 0.16, rr.reshape(-1), cc.reshape(-1)], dim=1)
    audio = torch.stack([torch.arange(NA) * 0.04, torch.zeros(NA), torch.zeros(NA)], dim=1)
    segs = (Segment("video", 0, NV, PV, (2, 2, 2)), Segment("audio", NV, NA, PA, (NA,)))
    return TokenLayout(segs, torch.cat([video, audio]))


@functools.lru_cache(maxsize=None)
def _net(av: bool = True, random: bool = True) -> Mmdit:
    """A tiny mmdit in eval mode; ``random`` replaces the zero init by random weights so every path matters."""
    torch.manual_seed(0)
    params = MmditParams(type="mmdit", preset="tiny")
    kw = dict(token_dim=PA, grid=(NV + NA,), layout=av_layout()) if av else dict(token_dim=8, grid=(4, 4))
    net = Mmdit(params, num_classes=3, **kw).eval()
    if random:
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.2)
    return net


def _inputs(b: int = 2, n: int = NV + NA, p: int = PA, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, p, generator=g)
    if (n, p) == (NV + NA, PA):
        x[:, :NV, PV:] = 0                                               # the modality pads video tokens with zeros
    return x, torch.rand(b, generator=g), torch.randint(0, 4, (b,), generator=g)


# ------------------------------------------------------------------------------------------------ RoPE
def test_rope_axes_default_split_and_validation():
    assert rope_axes(72, None) == (24, 24, 24) and rope_axes(16, None) == (4, 6, 6)
    assert rope_axes(64, None) == (20, 22, 22) and rope_axes(24, (8, 8, 4)) == (8, 8, 4)
    with pytest.raises(ValueError, match="sums to 30 > head dim 24"):
        rope_axes(24, (10, 10, 10))
    with pytest.raises(ValueError, match="even"):
        rope_axes(24, (3, 8, 8))
    with pytest.raises(pydantic.ValidationError, match="even"):
        RopeParams(type="rope", axes_dim=(3, 4, 4))
    with pytest.raises(pydantic.ValidationError, match="sums to 24 > head dim 16"):  # tiny: 64 / 4 heads
        MmditParams.model_validate({"type": "mmdit", "preset": "tiny",
                                    "positions": {"type": "rope", "axes_dim": [8, 8, 8]}})


def test_rope_depends_only_on_coordinate_difference():
    torch.manual_seed(0)
    rope = POSITIONS.build(RopeParams(type="rope", theta=100.0, time_scale=10.0), head_dim=24)
    q, k = torch.randn(1, 1, 2, 24), torch.randn(1, 1, 2, 24)

    def score(pq, pk):
        cq, sq = rope.angles(torch.tensor([pq]))
        ck, sk = rope.angles(torch.tensor([pk]))
        return (rope.apply(q, q, cq, sq)[0] * rope.apply(k, k, ck, sk)[1]).sum(-1)   # (1, 1, 2) per head

    base = score([0.3, 1.0, 2.0], [0.1, 4.0, -1.0])
    shifted = score([1.3, -2.0, 7.5], [1.1, 1.0, 4.5])                 # both moved by (1.0, -3.0, 5.5)
    assert torch.allclose(base, shifted, atol=1e-4)
    for other in ([0.5, 1.0, 2.0], [0.3, 2.0, 2.0], [0.3, 1.0, 3.0]):  # each axis matters
        assert not torch.allclose(base, score(other, [0.1, 4.0, -1.0]), atol=1e-3)


def test_same_instant_gets_same_time_rotation():
    layout = av_layout()
    rope = POSITIONS.build(RopeParams(type="rope"), head_dim=24)        # axes 8 / 8 / 8
    cos, sin = rope.angles(layout.coords)                               # (N, 12)
    assert cos.shape == sin.shape == (NV + NA, 12)
    frame1, audio4, audio5 = 7, NV + 4, NV + 5    # video frame 1 (row 1, col 1) and audio token 4: both at 0.16 s
    assert layout.coords[frame1, 0] == layout.coords[audio4, 0]
    tpairs = slice(0, 4)                                                # the time axis's 4 pairs
    assert torch.equal(cos[frame1, tpairs], cos[audio4, tpairs]) and torch.equal(sin[frame1, tpairs], sin[audio4, tpairs])
    assert not torch.allclose(cos[audio4, tpairs], cos[audio5, tpairs])  # 10 ms ids: 40 ms apart differ
    assert not torch.allclose(cos[frame1, 4:], cos[audio4, 4:])        # their rows/columns differ
    q = torch.zeros(1, NV + NA, 1, 24)
    q[..., :8] = torch.randn(8)                                          # time channels only
    rq, _ = rope.apply(q, q, cos, sin)
    assert torch.allclose(rq[0, frame1], rq[0, audio4]) and not torch.allclose(rq[0, frame1], rq[0, audio5])


def test_rope_leaves_extra_channels_and_none_is_identity():
    rope = Rope(RopeParams(type="rope", axes_dim=(4, 4, 4)), head_dim=16)
    coords = torch.randn(5, 3)
    q, k = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 16)
    rq, rk = rope.apply(q, k, *rope.angles(coords))
    assert torch.equal(rq[..., 12:], q[..., 12:]) and not torch.allclose(rq[..., :12], q[..., :12])
    with pytest.raises(ValueError, match="head dim 16"):
        rope.apply(q[..., :8], k[..., :8], *rope.angles(coords))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        rope.angles(torch.zeros(5, 2))
    none = POSITIONS.build(NoPositionParams(type="none"), head_dim=16)
    nq, nk = none.apply(q, k, *none.angles(coords))
    assert nq is q and nk is k


# ----------------------------------------------------------------------------------------------- mmdit
def test_shapes_default_layout_and_init():
    net = _net(av=False, random=False)
    x, t, y = _inputs(2, 16, 8)
    out = net(x, t, y, taps=(1, 2, 3, 4))
    assert net.depth == 4 and net.null_label == 3 and out.pred.shape == (2, 16, 8)
    assert torch.equal(out.pred, torch.zeros_like(out.pred))            # zero-init output projection
    for k in (2, 3, 4):                                                  # zero gates: every block is the identity
        assert torch.equal(out.features[k], out.features[1]) and out.features[k].shape == (2, 16, 64)


def test_two_segments_padding_and_ignored_channels():
    net = _net()
    x, t, y = _inputs()
    pred = net(x, t, y).pred
    assert pred.shape == (2, NV + NA, PA) and torch.isfinite(pred).all()
    assert torch.equal(pred[:, :NV, PV:], torch.zeros(2, NV, PA - PV))  # video padding exactly zero
    assert pred[:, :NV, :PV].abs().min() > 0 and pred[:, NV:].abs().min() > 0
    x2 = x.clone()
    x2[:, :NV, PV:] = 5.0                                                # padding channels are never read
    assert torch.equal(net(x2, t, y).pred, pred)
    with pytest.raises(ValueError, match="token_dim 16 differs"):
        Mmdit(MmditParams(type="mmdit", preset="tiny"), token_dim=16, grid=(14,), num_classes=0, layout=av_layout())
    with pytest.raises(ValueError, match=r"x must be \(B, N, P\)"):
        net(x[..., :PV], t, y)


def test_per_token_t_matches_per_sample_t():
    net = _net()
    x, t, y = _inputs()
    ref = net(x, t, y, taps=(2, 3)).pred
    out = net(x, t[:, None].expand(2, NV + NA), y, taps=(2, 3))
    assert torch.allclose(out.pred, ref, atol=1e-5)
    mixed = t[:, None].repeat(1, NV + NA)
    mixed[1, NV:] = 0.9                                                  # sample 1: audio at another time
    got = net(x, mixed, y).pred
    assert torch.allclose(got[0], ref[0], atol=1e-5) and not torch.allclose(got[1], ref[1], atol=1e-3)
    with pytest.raises(ValueError, match=r"t must have shape"):
        net(x, torch.rand(2, 3), y)


def test_taps_and_stop_after():
    net = _net()
    x, t, y = _inputs()
    full = net(x, t, y, taps=(1, 2, 3, 4))
    assert set(full.features) == {1, 2, 3, 4} and all(f.shape == (2, NV + NA, 64) for f in full.features.values())
    assert len({id(f) for f in full.features.values()}) == 4
    assert not torch.allclose(full.features[2], full.features[3])
    for k in (2, 3):                                                     # last double, first single block
        part = net(x, t, y, taps=(1, k), stop_after=k)
        assert part.pred is None and set(part.features) == {1, k}
        assert torch.equal(part.features[k], full.features[k])
    for bad in [dict(taps=(0,)), dict(taps=(5,)), dict(stop_after=0), dict(stop_after=5),
                dict(taps=(3,), stop_after=2)]:
        with pytest.raises(ValueError, match="taps|stop_after"):
            net(x, t, y, **bad)


def test_attn_mask():
    net = _net()
    x, t, y = _inputs()
    ref = net(x, t, y).pred
    n = NV + NA
    assert torch.allclose(net(x, t, y, attn_mask=torch.ones(2, n, n, dtype=torch.bool)).pred, ref, atol=1e-5)
    ids = av_layout().segment_ids()
    within = (ids[:, None] == ids[None, :]).expand(2, n, n)              # each modality attends to itself only
    a = net(x, t, y, attn_mask=within).pred
    x2 = x.clone()
    x2[:, NV:] = torch.randn(2, NA, PA)
    b = net(x2, t, y, attn_mask=within).pred
    assert torch.allclose(a[:, :NV], b[:, :NV], atol=1e-6) and not torch.allclose(a[:, :NV], ref[:, :NV], atol=1e-4)
    assert not torch.allclose(net(x2, t, y).pred[:, :NV], ref[:, :NV], atol=1e-4)  # unmasked: audio reaches video
    with pytest.raises(ValueError, match="attn_mask"):
        net(x, t, y, attn_mask=torch.ones(2, n, n))


def test_gradients_reach_every_parameter():
    torch.manual_seed(1)
    net = MmditParams(type="mmdit", preset="tiny")
    net = Mmdit(net, token_dim=PA, grid=(NV + NA,), num_classes=3, layout=av_layout())
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    x, t, y = _inputs()
    net(x, torch.rand(2, NV + NA), y).pred.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert any("streams.video" in n for n, _ in net.named_parameters())
    assert any("streams.audio" in n for n, _ in net.named_parameters())


def test_625m_preset_and_selfflow_blocks():
    params = MmditParams(type="mmdit", preset="625M")
    assert (params.hidden, params.heads, params.double_blocks, params.single_blocks) == (1152, 16, 7, 14)
    assert params.depth == 21 and "depth" not in params.model_dump()
    assert MmditParams.model_validate(params.model_dump()) == params
    segs = (Segment("video", 0, 1024, 48, (4, 16, 16)), Segment("audio", 1024, 48, 64, (48,)))
    layout = TokenLayout(segs, torch.zeros(1072, 3))
    with torch.device("meta"):
        net = BACKBONES.build(params, token_dim=64, grid=(1072,), num_classes=0, layout=layout)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - 625e6) / 625e6 < 0.05, count
    assert net.positions.axes_dim == (24, 24, 24)
    sf = SelfFlowParams(type="selfflow").resolve(SimpleNamespace(backbone=params))
    assert (sf.student_block, sf.teacher_block, sf.projector_width) == (6, 15, 2304)


def test_flops():
    net = _net()
    f = [net.flops(n) for n in (7, 14, 28)]
    assert 0 < f[0] < f[1] < f[2]
    d, m, n = 64, 256, NV + NA
    blocks = 4 * (n * (4 * d * d + 3 * d * m) + 2 * n * n * d)
    assert net.flops(n) > 2 * blocks and net.flops(n) < 2 * blocks * 1.5


def test_selfflow_objective_runs_through_mmdit():
    from registry.kinds import OBJECTIVES
    from zoo.core.types import StepContext, StepRNG, TokenBatch

    torch.manual_seed(0)
    student, ema = (Mmdit(MmditParams(type="mmdit", preset="tiny"), token_dim=8, grid=(4, 4), num_classes=3)
                    for _ in range(2))
    ema.eval().requires_grad_(False)
    params = OBJECTIVES.get("selfflow").Params(type="selfflow", attention_separation=True)
    obj = OBJECTIVES.build(params, hidden=student.hidden, depth=student.depth, grid=(4, 4), teachers={},
                           teacher_params={})
    out = obj(student, TokenBatch(torch.randn(4, 16, 8), torch.tensor([0, 1, 2, 0])),
              StepContext(0, StepRNG(0, 0, 0, 0, 4, 4), ema=ema))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.metrics["loss_rep"] > 0
    assert student.final["image"].linear.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- absolute positions
def test_abs_pos_breaks_translation_invariance_that_rope_alone_has():
    """With RoPE alone, full attention sees only relative positions: shifting every coordinate by a constant
    changes nothing, so no token can tell where the frame edge or the clip start is. ``abs_pos`` adds a learned
    ``(N, D)`` table indexed by token, and the output depends on it."""
    layout = av_layout()
    shifted = TokenLayout(layout.segments, layout.coords + torch.tensor([0.5, 3.0, 3.0]))
    x, t, y = _inputs()

    def build(lay: TokenLayout, abs_pos: bool) -> Mmdit:
        torch.manual_seed(1)
        net = Mmdit(MmditParams(type="mmdit", preset="tiny", abs_pos=abs_pos), num_classes=3, token_dim=PA,
                    grid=(NV + NA,), layout=lay).eval()
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
        return net

    with torch.no_grad():
        base, moved = build(layout, False)(x, t, y).pred, build(shifted, False)(x, t, y).pred
        assert base.abs().mean() > 1e-3
        torch.testing.assert_close(base, moved, rtol=1e-4, atol=1e-5)
        net = build(layout, True)
        assert tuple(net.pos_embed.shape) == (NV + NA, net.hidden)
        before = net(x, t, y).pred
        net.pos_embed.copy_(net.pos_embed.flip(0))   # the same table, rows given to other tokens
        after = net(x, t, y).pred
    assert (before - after).abs().max() > 1e-2
    assert "pos_embed" in net.state_dict() and "pos_embed" not in _net().state_dict()
