"""The ``sit`` backbone, its embeddings and the attention backends."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zoo  # noqa: F401  (registers the built-ins, resolves forward references)
from registry.kinds import ATTENTION, BACKBONES
from zoo.core.protocols import Attention, Backbone
from zoo.backbones.common import modulate as _modulate
from zoo.backbones.sit import SiT, SiTParams
from zoo.layers.attention import (MathAttentionParams, SDPAAttention, SDPAAttentionParams, XFormersAttention,
                                  XFormersAttentionParams, attention_candidates, build_attention,
                                  default_attention)
from zoo.layers.embed import LabelEmbedder, sincos_pos_embed_2d, timestep_embedding

P, NUM_CLASSES = 8, 5


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _tiny(grid: tuple[int, int] = (4, 4), random: bool = True) -> SiT:
    """A tiny SiT in eval mode; ``random`` replaces DiT's zero init (adaLN, output) by random weights so
    that the timestep actually changes the output."""
    torch.manual_seed(0)
    net = SiT(SiTParams(type="sit", preset="tiny"), token_dim=P, grid=grid, num_classes=NUM_CLASSES).eval()
    if random:
        with torch.no_grad():
            for prm in net.parameters():
                prm.normal_(0.0, 0.2)
    return net


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, msg: str = "") -> None:
    """``torch.allclose`` with the max error in the message (``torch.testing.assert_close`` costs ~2 s to
    import on first use)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.allclose(got, want, atol=atol, rtol=rtol), f"{msg} max abs err {(got - want).abs().max():.3g}"


def _inputs(b: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, P, generator=g)
    t = torch.rand(b, generator=g)
    y = torch.randint(0, NUM_CLASSES + 1, (b,), generator=g)
    return x, t, y


# ------------------------------------------------------------------------------------------------ params
def test_params_presets_and_defaults():
    d = SiTParams(type="sit")
    assert (d.hidden, d.depth, d.heads, d.patch, d.mlp_ratio, d.attention) == (768, 12, 12, 2, 4.0, None)
    want = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    for name, (hid, dep, hea) in want.items():
        for p in (2, 4, 8):
            q = SiTParams(type="sit", preset=f"{name}/{p}")
            assert (q.hidden, q.depth, q.heads, q.patch) == (hid, dep, hea, p)
    assert "tiny" in SiTParams.presets
    assert SiTParams(type="sit", preset="S/2", depth=3).depth == 3
    a = SiTParams.model_validate({"type": "sit", "attention": {"type": "math"}}).attention
    assert isinstance(a, MathAttentionParams)
    with pytest.raises(ValueError, match="divisible by heads"):
        SiTParams(type="sit", hidden=100, heads=3)


def test_registered():
    assert BACKBONES.get("sit") is SiT
    assert {"sdpa", "xformers", "math"} <= set(ATTENTION.names())
    net = BACKBONES.build(SiTParams(type="sit", preset="tiny"), token_dim=P, grid=(2, 3), num_classes=0)
    assert (net.depth, net.hidden, net.null_label) == (4, 64, 0)
    assert isinstance(net, Backbone) and isinstance(net.attention_backend, Attention)
    assert net.y_embedder.embedding_table.num_embeddings == 1  # unconditional: only the null row


# -------------------------------------------------------------------------------------------- forward
def test_shapes_and_zero_init():
    net = _tiny(random=False)
    x, t, y = _inputs(3, 16)
    out = net(x, t, y, taps=(1, 4))
    assert out.pred.shape == (3, 16, P) and sorted(out.features) == [1, 4]
    assert out.features[1].shape == (3, 16, 64)
    assert torch.equal(out.pred, torch.zeros_like(out.pred))  # adaLN-Zero: the output layer starts at zero
    assert not net.pos_embed.requires_grad and "pos_embed" in net.state_dict()


def test_taps_and_stop_after():
    net = _tiny()
    x, t, y = _inputs(2, 16)
    full = net(x, t, y, taps=(1, 2, 3, 4))
    part = net(x, t, y, taps=(1, 2), stop_after=2)
    assert part.pred is None and sorted(part.features) == [1, 2]
    for k in (1, 2):
        assert torch.equal(part.features[k], full.features[k])
    assert net(x, t, y, stop_after=4).pred is None
    for kwargs in ({"taps": (0,)}, {"taps": (5,)}, {"stop_after": 0}, {"stop_after": 5},
                   {"taps": (3,), "stop_after": 2}):
        with pytest.raises(ValueError):
            net(x, t, y, **kwargs)


def test_null_label_and_bad_shapes():
    net = _tiny()
    x, t, _ = _inputs(2, 16)
    null = torch.full((2,), net.null_label)
    assert torch.equal(net(x, t, None).pred, net(x, t, null).pred)
    with pytest.raises(ValueError, match="t must have shape"):
        net(x, torch.rand(2, 3), null)
    with pytest.raises(ValueError, match="x must be"):
        net(x[:, :5], t, null)


def test_backward_at_dit_init():
    net = SiT(SiTParams(type="sit", preset="tiny", depth=2), token_dim=P, grid=(2, 2), num_classes=3)
    x, t, _ = _inputs(2, 4)
    target = torch.randn(2, 4, P)
    (net(x, t, torch.tensor([0, 3])).pred * target).sum().backward()
    # at DiT init only the output linear gets a non-zero gradient (everything else sits behind its zero weight)
    assert net.final_layer.linear.weight.grad.abs().sum() > 0
    assert net.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ------------------------------------------------------------------------------- per-token timesteps
@settings(deadline=None, max_examples=25)
@given(b=st.integers(1, 3), h=st.integers(1, 3), w=st.integers(1, 4), seed=st.integers(0, 2**16),
       t_vals=st.lists(st.floats(0.0, 1.0, width=32), min_size=3, max_size=3))
def test_shared_per_token_t_equals_scalar_t(b, h, w, seed, t_vals):
    net = _tiny((h, w))
    x, _, y = _inputs(b, h * w, seed)
    t = torch.tensor(t_vals, dtype=torch.float32)[torch.arange(b) % 3]
    with torch.no_grad():
        ref = net(x, t, y, taps=(2,))
        tok = net(x, t[:, None].expand(b, h * w), y, taps=(2,))
    assert torch.equal(tok.pred, ref.pred)
    assert torch.equal(tok.features[2], ref.features[2])


def _per_token_reference(net: SiT, x, t, y):
    """Slow path of [note:per-token-adaln]: embed every token's t, run every adaLN MLP on all B*N tokens."""
    b, n, _ = x.shape
    c = net.t_embedder(t.reshape(-1)).reshape(b, n, -1) + net.y_embedder(y)[:, None]     # (B, N, D)
    h = net.x_embedder(x) + net.pos_embed
    for blk in net.blocks:
        s1, c1, g1, s2, c2, g2 = blk.adaLN_modulation(c).chunk(6, dim=-1)               # (B, N, D) each
        h = h + g1 * blk.attn(_modulate(blk.norm1(h), s1, c1))
        h = h + g2 * blk.mlp(_modulate(blk.norm2(h), s2, c2))
    fl = net.final_layer
    shift, scale = fl.adaLN_modulation(c).chunk(2, dim=-1)
    return fl.linear(_modulate(fl.norm_final(h), shift, scale))


def test_two_timesteps_per_sample_match_per_token_reference():
    net = _tiny()
    x, _, y = _inputs(3, 16, seed=1)
    g = torch.Generator().manual_seed(2)
    pair = torch.rand(3, 2, generator=g)
    pair[2, 1] = pair[0, 0]                      # a t value shared across samples must not mix their labels
    pick = torch.rand(3, 16, generator=g) < 0.5  # which of the two values each token gets
    t = torch.where(pick, pair[:, :1], pair[:, 1:])
    with torch.no_grad():
        c, index = net._conditioning(t, y, 16)
        assert c.shape[0] == int(sum(len(set(row.tolist())) for row in t))  # one row per distinct (b, t)
        got = net(x, t, y).pred
        want = _per_token_reference(net, x, t, y)
        scalar = net(x, t[:, 0], y).pred
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, scalar, atol=1e-3)  # the per-token t really matters


# ------------------------------------------------------------------------------------- size and cost
@functools.lru_cache(maxsize=None)
def _xl2_on_meta() -> SiT:
    with torch.device("meta"):
        return SiT(SiTParams(type="sit", preset="XL/2"), token_dim=16, grid=(16, 16), num_classes=1000)


def test_xl2_parameter_count_and_names():
    net = _xl2_on_meta()
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - 675e6) / 675e6 < 0.005, count  # DiT paper: 675M
    names = set(net.state_dict())
    for key in ("x_embedder.weight", "pos_embed", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
                "y_embedder.embedding_table.weight", "blocks.27.attn.qkv.weight", "blocks.27.attn.proj.bias",
                "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight"):
        assert key in names, key
    assert net.y_embedder.embedding_table.num_embeddings == 1001


def test_flops():
    xl = _xl2_on_meta()
    assert xl.flops(256) == pytest.approx(2 * 118.6e9, rel=1e-3)  # [DiT-paper]: 118.6 G multiply-adds
    with torch.device("meta"):
        b2 = SiT(SiTParams(type="sit", preset="B/2"), token_dim=16, grid=(16, 16), num_classes=1000)
    assert b2.flops(256) == pytest.approx(2 * 23.01e9, rel=2e-3)
    assert xl.flops(1024) > 4 * xl.flops(256)  # attention grows quadratically


# -------------------------------------------------------------------------------------------- embeddings
def _mae_pos_embed(dim: int, size: int) -> np.ndarray:
    """MAE / DiT ``get_2d_sincos_pos_embed`` (numpy, square grid), transcribed for the comparison."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)), 0)
    grid = grid.reshape(2, 1, size, size)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_pos_embed_matches_dit():
    ours = sincos_pos_embed_2d(64, (4, 4))
    assert ours.shape == (16, 64) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), _mae_pos_embed(64, 4).astype(np.float32), atol=1e-6)
    rect = sincos_pos_embed_2d(32, (2, 5))  # row-major: token i * w + j is cell (i, j); column first
    assert rect.shape == (10, 32)
    assert torch.allclose(rect[1 * 5 + 3, :16], sincos_pos_embed_2d(32, (1, 5))[3, :16])
    assert torch.allclose(rect[1 * 5 + 3, 16:], sincos_pos_embed_2d(32, (2, 1))[1, 16:])


def test_timestep_and_label_embedding():
    t = torch.tensor([0.0, 0.5, 1.0])
    e = timestep_embedding(t, 256)
    assert e.shape == (3, 256)
    assert torch.equal(e[0, :128], torch.ones(128)) and torch.equal(e[0, 128:], torch.zeros(128))  # cos first
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    assert_close(e[1], torch.cat([torch.cos(0.5 * freqs), torch.sin(0.5 * freqs)]), atol=1e-6, rtol=1e-5)
    lab = LabelEmbedder(10, 8)
    assert lab.embedding_table.num_embeddings == 11 and lab.null_label == 10


# ---------------------------------------------------------------------------------------- attention
def _qkv(b=2, n=10, h=3, dh=8, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, dh, generator=g, device=device, dtype=torch.float32).to(dtype) for _ in range(3))
    mask = torch.rand(b, n, n, generator=g, device=device) < 0.6
    mask |= torch.eye(n, dtype=torch.bool, device=device)  # every query sees at least itself
    return q, k, v, mask


def test_sdpa_matches_math_on_cpu():
    sdpa = build_attention(SDPAAttentionParams(type="sdpa"), "cpu")
    ref = build_attention(MathAttentionParams(type="math"), "cpu")
    q, k, v, mask = _qkv()
    assert_close(sdpa(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
    assert_close(sdpa(q, k, v, mask), ref(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref(q, k, v, mask), ref(q, k, v), atol=1e-3)
    with pytest.raises(ValueError, match="mask"):
        sdpa(q, k, v, mask.float())


@pytest.mark.parametrize("kernel", ["auto", "flash", "math", "efficient"])
def test_sdpa_forced_kernels_and_masks_on_cpu(kernel):
    """A forced SDPA kernel computes the same attention, with and without a mask (a kernel that takes no mask,
    or does not exist on CPU, falls back to those that do), and names what runs."""
    sdpa = build_attention(SDPAAttentionParams(type="sdpa", kernel=kernel), "cpu")
    ref = build_attention(MathAttentionParams(type="math"), "cpu")
    q, k, v, mask = _qkv()
    assert_close(sdpa(q, k, v, mask), ref(q, k, v, mask), atol=1e-5, rtol=1e-5)
    if kernel in ("auto", "flash", "math"):  # CPU has no memory-efficient kernel: only masked calls run it
        assert_close(sdpa(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
    name = sdpa.kernel_name(q)
    assert name == (f"sdpa/{'flash_attention' if kernel == 'flash' else kernel}" if kernel in ("flash", "math")
                    else name) and name.startswith("sdpa/") and name != "sdpa/unknown"
    assert ref.kernel_name(q) == "math"


def test_forced_sdpa_kernel_traces_into_one_graph():
    """The CUDA default is a forced SDPA kernel; its ``sdpa_kernel`` context must not break train.compile's graph."""
    attn = build_attention(SDPAAttentionParams(type="sdpa", kernel="math"), "cpu")
    q, k, v, mask = _qkv()
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, m: attn(q, k, v, m) + attn(q, k, v), backend="eager", fullgraph=True)
    assert_close(f(q, k, v, mask), attn(q, k, v, mask) + attn(q, k, v), atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_default_attention_and_cpu_errors():
    assert default_attention(torch.device("cpu")) == SDPAAttentionParams(type="sdpa")
    assert isinstance(build_attention(None, "cpu"), SDPAAttention)
    assert isinstance(build_attention(None, "meta"), SDPAAttention)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            XFormersAttention(XFormersAttentionParams(type="xformers"))


def test_backbone_uses_chosen_backend():
    params = SiTParams(type="sit", preset="tiny", attention={"type": "math"})
    torch.manual_seed(0)
    a = SiT(params, token_dim=P, grid=(4, 4), num_classes=NUM_CLASSES)
    b = SiT(params.model_copy(update={"attention": SDPAAttentionParams(type="sdpa")}), token_dim=P, grid=(4, 4),
            num_classes=NUM_CLASSES)
    b.load_state_dict(_tiny().state_dict())
    a.load_state_dict(_tiny().state_dict())
    assert "MathAttention" in repr(a.blocks[0].attn)
    x, t, y = _inputs(2, 16)
    assert_close(a(x, t, y).pred, b(x, t, y).pred, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_backends_agree_on_cuda(dtype, tol):
    ref = build_attention(MathAttentionParams(type="math"), "cuda")
    backends = [build_attention(SDPAAttentionParams(type="sdpa"), "cuda"),
                *(build_attention(p, "cuda") for p in attention_candidates(torch.cuda.current_device()))]
    for n in (10, 64):  # 10: the xformers bias needs padding to a multiple of 8
        q, k, v, mask = _qkv(b=2, n=n, h=4, dh=72, dtype=dtype, device="cuda")
        for m in (None, mask):
            want = ref(q, k, v, m).float()
            for attn in backends:
                got = attn(q, k, v, m)
                assert got.dtype == dtype and got.shape == q.shape
                assert_close(got.float(), want, atol=tol, rtol=tol, msg=f"{attn!r} n={n}")
    assert default_attention(torch.device("cuda")).type in ("xformers", "sdpa")
    best = default_attention(torch.device("cuda"), (256, 16, 72))              # SiT-XL/2 shapes
    assert best in attention_candidates(torch.cuda.current_device())
    q = torch.zeros(1, 256, 16, 72, device="cuda", dtype=torch.bfloat16)
    assert "unknown" not in build_attention(best, "cuda").kernel_name(q)
