"""bf16 autocast numerics on CPU (``train.precision: bf16``): norms, the timestep embedding, the cosine of L_rep and
the loss reduction stay fp32, and the Self-Flow loss of the first steps stays within 2 % of the fp32 run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo  # noqa: F401
from registry.spec import validate
from runtime.compiler import compile_spec
from runtime.distributed import DistInfo
from runtime.train import Stepper
from tests.helpers import tiny_spec_dict
from zoo.core.types import StepContext, StepRNG, TokenBatch
from zoo.layers.embed import TimestepEmbedder

STEPS, BATCH = 4, 8
BACKBONES = {"sit": {"type": "sit", "preset": "tiny"}, "mmdit": {"type": "mmdit", "preset": "tiny"}}
MODALITY = {"sit": {"type": "image"}, "mmdit": {"type": "image", "patch": 2}}
SELFFLOW = {"type": "selfflow", "mask": {"type": "bernoulli", "ratio": 0.25}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _graph(name: str, precision: str):
    raw = tiny_spec_dict(backbone=BACKBONES[name], modality=MODALITY[name], objective=SELFFLOW)
    raw["train"] = {**raw["train"], "precision": precision, "batch_size": BATCH}
    return compile_spec(validate(raw), torch.device("cpu"))


def _batches(g, steps: int) -> list[TokenBatch]:
    gen = torch.Generator().manual_seed(0)
    return [TokenBatch(torch.randn(BATCH, g.num_tokens, g.modality.token_dim, generator=gen),
                       torch.arange(BATCH) % g.num_classes) for _ in range(steps)]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_bf16_losses_track_fp32_over_the_first_steps(name):
    runs = {}
    for precision in ("fp32", "bf16"):
        g = _graph(name, precision)
        stepper = Stepper(g, DistInfo())
        losses = []
        for i, batch in enumerate(_batches(g, STEPS)):
            ok, metrics = stepper.step(i, [batch])
            assert ok
            losses.append(float(metrics["loss"]))
        runs[precision] = (g, losses)
    assert runs["bf16"][0].autocast_dtype == torch.bfloat16 and runs["fp32"][0].autocast_dtype is None
    fp32, bf16 = runs["fp32"][1], runs["bf16"][1]
    assert fp32 != bf16                                                     # autocast really ran in bf16
    for a, b in zip(fp32, bf16):
        assert abs(b - a) <= 0.02 * abs(a), (fp32, bf16)


def test_fp32_islands_under_bf16_autocast():
    g = _graph("sit", "bf16")
    with torch.no_grad():
        for p in g.backbone.parameters():
            p.normal_(0.0, 0.05)
    seen: dict[str, set] = {"norm": set(), "time": set(), "linear": set()}

    def hook(kind):
        return lambda module, inputs, out: seen[kind].add(out.dtype)

    time_mlp = set(map(id, g.backbone.t_embedder.modules()))              # fp32 on purpose (checked as "time")
    for m in g.backbone.modules():
        if id(m) in time_mlp and not isinstance(m, TimestepEmbedder):
            continue
        if isinstance(m, nn.LayerNorm):
            m.register_forward_hook(hook("norm"))
        elif isinstance(m, TimestepEmbedder):
            m.register_forward_hook(hook("time"))
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(hook("linear"))
    batch = _batches(g, 1)[0]
    obj = g.train_module.objective
    draws = obj.draw(g.backbone, batch, StepRNG(0, 0, 0, 0, BATCH, BATCH))
    with g.autocast():
        out = obj.loss(g.backbone, batch, draws, g.ema.module)
        z = torch.randn(BATCH, g.num_tokens, g.backbone.hidden).bfloat16()
        rep = obj.rep_loss(z, z + 0.1, torch.zeros(BATCH, g.num_tokens))   # bf16 features in, fp32 cosine out
    assert seen["linear"] == {torch.bfloat16}                               # the matmuls do run in bf16
    assert seen["norm"] == {torch.float32} and seen["time"] == {torch.float32}
    assert out.loss.dtype == torch.float32 and rep.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.metrics.values())
    ctx = StepContext(0, StepRNG(0, 0, 0, 0, BATCH, BATCH), ema=g.ema.module)
    with g.autocast():
        assert torch.equal(obj(g.backbone, batch, ctx).loss, out.loss)   # forward == loss(draw)
