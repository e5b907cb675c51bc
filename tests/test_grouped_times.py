"""``GroupedTimes`` (zoo/core/time.py): the static-shape per-token path of every backbone equals the general
``(B, N)`` path, and the backbones and objective losses trace into one graph with no data-dependent op
(``torch.compile(fullgraph=True)``), compiled equal to eager."""
from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn

import zoo  # noqa: F401  (registers the built-ins)
from registry.kinds import BACKBONES
from tests.helpers import tiny_spec_dict
from tests.test_mmdit import NA, NV, PA, av_layout
from zoo.backbones.mmdit import Mmdit, MmditParams
from zoo.core.time import GroupedTimes, sit_time
from zoo.core.types import StepContext, StepRNG, TokenBatch

GRID, P, NCLS = (4, 4), 8, 3
N = GRID[0] * GRID[1]

# ops whose output size or value must be read by the host (a sync on CUDA, a graph break in torch.compile)
DATA_DEPENDENT = ("unique", "nonzero", "item", "local_scalar_dense", "assert_scalar", "masked_select",
                  "sym_constrain_range", "tolist")


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(net: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Random weights everywhere (adaLN-Zero would make every block the identity and hide the time path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * std)
    return net


@functools.lru_cache(maxsize=None)
def backbone(tag: str) -> nn.Module:
    """Tiny backbones with random weights, in eval mode; every kind the objectives may hand GroupedTimes."""
    torch.manual_seed(0)
    if tag.startswith("mmdit"):
        params = MmditParams(type="mmdit", preset="tiny", modulation="shared" if tag.endswith("shared") else "per_block")
        net = Mmdit(params, token_dim=PA, grid=(NV + NA,), num_classes=NCLS, layout=av_layout())
    else:
        extra = {"learn_sigma": True} if tag == "sit_time_flip" else {}
        net = BACKBONES.build(BACKBONES.get(tag).Params(type=tag, preset="tiny", **extra), token_dim=P, grid=GRID,
                              num_classes=NCLS)
    return _randomize(net).eval()


def _inputs(net: nn.Module, b: int, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, net.num_tokens, net.token_dim, generator=g)
    values = torch.rand(b, groups, generator=g)
    index = torch.randint(0, groups, (b, net.num_tokens), generator=g)
    return x, GroupedTimes(values, index), torch.tensor([0, 1, NCLS, 2][:b])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


BACKBONES_UNDER_TEST = ["sit", "sit_time_flip", "mmdit", "mmdit_shared"]


@pytest.mark.parametrize("tag", BACKBONES_UNDER_TEST)
@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_equals_per_token_path(tag, groups):
    net = backbone(tag)
    x, gt, y = _inputs(net, 4, groups, seed=groups)
    taps = (1, 2)
    with torch.no_grad():
        got = net(x, gt, y, taps=taps)
        want = net(x, gt.per_token(), y, taps=taps)                         # (B, N): torch.unique pairs
        other = net(x, gt.values[:, 0], y).pred                            # one time per sample
    assert rel_err(got.pred, want.pred) <= 1e-6
    for k in taps:
        assert rel_err(got.features[k], want.features[k]) <= 1e-6
    assert rel_err(got.pred, other) > 1e-3                                 # the groups' times really matter


@pytest.mark.parametrize("tag", BACKBONES_UNDER_TEST)
def test_one_group_is_the_per_sample_path(tag):
    net = backbone(tag)
    x, gt, y = _inputs(net, 3, 1)
    with torch.no_grad():
        assert torch.equal(net(x, gt, y).pred, net(x, gt.values[:, 0], y).pred)


def test_grouped_gradients_equal_per_token_gradients():
    net = backbone("sit")
    x, gt, y = _inputs(net, 4, 2, seed=5)
    grads = []
    for t in (gt, gt.per_token()):
        net.zero_grad()
        net(x, t, y).pred.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    net.zero_grad()
    for name, g in grads[0].items():
        assert rel_err(g, grads[1][name]) <= 1e-5, name


def test_grouped_times_helpers_and_checks():
    gt = GroupedTimes(torch.tensor([[0.2, 0.9], [0.5, 0.1]]), torch.tensor([[0, 1, 1], [1, 1, 0]]))
    assert torch.equal(gt.per_token(), torch.tensor([[0.2, 0.9, 0.9], [0.1, 0.1, 0.5]]))
    flipped = sit_time(gt)
    assert isinstance(flipped, GroupedTimes) and flipped.index is gt.index
    assert torch.allclose(flipped.values, 1 - gt.values)
    net = backbone("sit")
    x, good, y = _inputs(net, 2, 2)
    with pytest.raises(ValueError, match="GroupedTimes.index"):
        net(x, GroupedTimes(good.values, good.index[:, :3]), y)
    with pytest.raises(ValueError, match="GroupedTimes.index"):
        net(x, GroupedTimes(good.values, good.index.int()), y)
    with pytest.raises(ValueError, match="GroupedTimes.values"):
        net(x, GroupedTimes(good.values[:1], good.index), y)


# ------------------------------------------------------------------------------------ traced graphs
class Recorder:
    """A ``torch.compile`` backend that keeps the names of every op of the graphs it receives (forward and,
    through AOT autograd, backward) and runs them with the eager ``aot_eager`` backend."""

    def __init__(self):
        self.ops: set[str] = set()

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(g, _inputs):
            self.ops.update(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return make_boxed_func(g.forward)

        self.ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    def data_dependent(self) -> list[str]:
        """The recorded ops named (a word of the op's name, leading underscores ignored) in DATA_DEPENDENT."""
        def bad(op: str) -> bool:
            words = [w.lstrip("_") for w in re.split(r"\W+", op)]
            return any(w.startswith(name) for w in words for name in DATA_DEPENDENT)
        return sorted(op for op in self.ops if bad(op))


@pytest.mark.parametrize("tag", BACKBONES_UNDER_TEST[:3])
def test_backbone_forward_and_backward_trace_to_one_graph(tag):
    torch._dynamo.reset()
    net = backbone(tag)
    x, gt, y = _inputs(net, 3, 2, seed=1)
    rec = Recorder()
    compiled = torch.compile(net, backend=rec, fullgraph=True, dynamic=False)
    out = compiled(x, gt, y, taps=(1,))
    out.pred.square().mean().backward()
    assert rec.ops and not rec.data_dependent(), rec.data_dependent()
    assert "aten.index.Tensor" in rec.ops                                  # each token reads its row, traced
    with torch.no_grad():
        want = net(x, gt, y, taps=(1,))
    assert rel_err(out.pred.detach(), want.pred) <= 1e-6
    net.zero_grad()
    # the general (B, N) path searches its distinct times: dynamo must break the graph there
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(x, gt.per_token(), y)
    assert explained.graph_break_count > 0 and any("unique" in str(b.reason) for b in explained.break_reasons)
    torch._dynamo.reset()


def _graph(objective_spec: dict):
    """A tiny digits graph with random student and EMA weights; ``repa`` gets a random-weight tiny ViT encoder
    (a spec may not name one: random encoders are for tests), built here."""
    from registry.kinds import OBJECTIVES
    from registry.spec import validate
    from runtime.compiler import compile_spec
    from zoo.teachers.vit import ViTTeacher, ViTTeacherParams

    repa = objective_spec["type"] == "repa"
    g = compile_spec(validate(tiny_spec_dict(objective={"type": "flow_matching"} if repa else objective_spec)),
                     torch.device("cpu"))
    if repa:
        torch.manual_seed(0)
        tp = ViTTeacherParams(type="vit", preset="tiny", weights=None)
        teacher = ViTTeacher(tp, input_shape=tuple(g.input_shape), token_grid=tuple(g.modality.grid)).eval()
        g.teachers["enc"] = teacher.requires_grad_(False)
        params = OBJECTIVES.get("repa").Params.model_validate({**objective_spec, "encoders": ["enc"]})
        g.train_module.objective = OBJECTIVES.build(params, hidden=g.backbone.hidden, depth=g.backbone.depth,
                                                    grid=tuple(g.modality.grid), layout=g.modality.layout,
                                                    teachers=g.teachers, teacher_params={"enc": tp})
    _randomize(g.backbone, 1, 0.05)
    _randomize(g.ema.module, 2, 0.05)
    return g


def _batch(g, b: int = 4, seed: int = 0) -> TokenBatch:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, g.num_tokens, g.modality.token_dim, generator=gen)
    raw = torch.rand((b, *g.input_shape), generator=gen) * 2 - 1 if g.teachers else None
    return TokenBatch(x0, torch.arange(b) % max(g.num_classes, 1), raw)


OBJECTIVES_UNDER_TEST = {
    "flow_matching": {"type": "flow_matching"},
    "selfflow": {"type": "selfflow", "mask": {"type": "bernoulli", "ratio": 0.4}},
    "selfflow_sra_teacher": {"type": "selfflow", "teacher_time": "sra", "attention_separation": True},
    "repa": {"type": "repa", "align_depth": 2},
}


@pytest.mark.parametrize("name", list(OBJECTIVES_UNDER_TEST))
def test_objective_loss_traces_to_one_graph(name):
    """``loss(student, batch, draws, ema)`` (all randomness drawn before) is one graph, forward and backward,
    without data-dependent ops, and equals the eager loss."""
    torch._dynamo.reset()
    g = _graph(OBJECTIVES_UNDER_TEST[name])
    obj, student, ema = g.train_module.objective, g.backbone, g.ema.module
    batch = _batch(g)
    draws = obj.draw(student, batch, StepRNG(0, 3, 0, 0, 4, 4))
    rec = Recorder()
    compiled = torch.compile(obj.loss, backend=rec, fullgraph=True, dynamic=False)
    got = compiled(student, batch, draws, ema)
    got.loss.backward()
    assert rec.ops and not rec.data_dependent(), rec.data_dependent()
    want = obj.loss(student, batch, draws, ema)
    assert abs(float(got.loss) - float(want.loss)) <= 1e-6 * abs(float(want.loss))
    assert set(got.metrics) == set(want.metrics)
    # forward(student, batch, ctx) is exactly loss(draw(...)) with the step's generator
    again = obj(student, batch, StepContext(3, StepRNG(0, 3, 0, 0, 4, 4), ema=ema))
    assert torch.equal(again.loss, want.loss)
    torch._dynamo.reset()
