"""``runtime.convert`` and the ``sit_time_flip`` backbone (``zoo.backbones.converted``).

Small state dicts in each published key layout (willisma/SiT + facebookresearch/DiT ``models.py``,
sihyun-yu/REPA ``models/sit.py``, black-forest-labs/Self-Flow ``src/model.py``) are run through compact
reference implementations of the official forward passes written below, converted, and compared in RF
time: SiT ``v_RF(x, t) = -f_sit(x, 1 - t)``; REPA ``v_RF = f_repa(x, t)``; Self-Flow's public forward already
takes RF ``t`` and returns ``-net(x, 1 - t)``.
"""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import zoo  # noqa: F401
from registry.kinds import BACKBONES
from registry.spec import validate
from runtime import convert as cv
from storage.checkpoint import load_checkpoint
from runtime.compiler import compile_spec
from tests.helpers import tiny_spec_dict


D, DEPTH, HEADS, P, C, S, K = 64, 2, 4, 2, 4, 8, 5      # hidden, depth, heads, patch, latent C, latent side, classes
N = (S // P) ** 2


# ------------------------------------------------------------------------ official layouts (random weights)
def official_sd(kind: str, *, learn_sigma: bool, seed: int = 0, channels: int = C, classes: int = K,
                depth: int = DEPTH, z_dims: tuple[int, ...] = (12, 10)) -> dict[str, torch.Tensor]:
    """``kind``: sit | repa | selfflow. Label table ``classes + 1`` rows (DiT dropout row / Self-Flow's 1001)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    co = (2 if learn_sigma else 1) * channels
    w_in = r(D, channels, P, P, std=0.3)                    # conv (D, C, p, p); Self-Flow: Linear (D, C p p)
    sd = {"x_embedder.proj.weight": w_in if kind != "selfflow" else w_in.reshape(D, -1),
          "x_embedder.proj.bias": r(D), "pos_embed": r(1, N, D, std=0.5),
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(classes + 1, D, std=0.5)}
    for i in range(depth):
        for name, (o, n) in {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (4 * D, D),
                             "mlp.fc2": (D, 4 * D), "adaLN_modulation.1": (6 * D, D)}.items():
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = r(o, n), r(o)
    sd |= {"final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D),
           "final_layer.linear.weight": r(P * P * co, D), "final_layer.linear.bias": r(P * P * co)}
    if kind == "repa":  # build_mlp(D, 2048 -> 16 here, z) per encoder
        for k, z in enumerate(z_dims):
            for j, (o, n) in {0: (16, D), 2: (16, 16), 4: (z, 16)}.items():
                sd[f"projectors.{k}.{j}.weight"], sd[f"projectors.{k}.{j}.bias"] = r(o, n), r(o)
    if kind == "selfflow":  # SimpleHead(D, D): D -> 2D -> D
        sd |= {"projector.linear1.weight": r(2 * D, D), "projector.linear1.bias": r(2 * D),
               "projector.linear2.weight": r(D, 2 * D), "projector.linear2.bias": r(D)}
    return sd


# ------------------------------------------------------------------------ reference forward passes
def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _t_freq(t, dim=256):  # GLIDE/DiT sinusoid: [cos, sin], max period 10000
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = t[..., None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_trunk(sd, h, t, y, heads=HEADS):
    """DiT adaLN-Zero trunk (timm Attention/Mlp) on embedded tokens ``h`` (B, N, D); ``t`` (B,) or per token
    (B, N) (Self-Flow's PerTokenDiTBlock); returns the final linear output in the network's own time."""
    b, n, d = h.shape
    temb = _lin(F.silu(_lin(_t_freq(t), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y][:, None] if t.dim() == 2 else \
        (temb + sd["y_embedder.embedding_table.weight"][y])[:, None]         # (B, N or 1, D)
    ln = lambda x: F.layer_norm(x, (d,), eps=1e-6)  # noqa: E731
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        pre = f"blocks.{i}."
        s1, c1, g1, s2, c2, g2 = _lin(F.silu(c), sd, pre + "adaLN_modulation.1").chunk(6, dim=-1)
        qkv = _lin(ln(h) * (1 + c1) + s1, sd, pre + "attn.qkv")
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)          # timm Attention
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        h = h + g1 * _lin(att.transpose(1, 2).reshape(b, n, d), sd, pre + "attn.proj")
        mlp = _lin(F.gelu(_lin(ln(h) * (1 + c2) + s2, sd, pre + "mlp.fc1"), approximate="tanh"), sd, pre + "mlp.fc2")
        h = h + g2 * mlp
        i += 1
    shift, scale = _lin(F.silu(c), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    return _lin(ln(h) * (1 + scale) + shift, sd, "final_layer.linear")


def ref_sit(sd, x, t, y, learn_sigma):
    """SiT/DiT/REPA ``forward(x (B, C, H, W), t, y)`` -> ``(B, C, H, W)`` (conv PatchEmbed, unpatchify, chunk)."""
    w = sd["x_embedder.proj.weight"]
    p = w.shape[-1]
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    out = ref_trunk(sd, h, t, y)
    b, ch, hh, ww = x.shape
    co = out.shape[-1] // (p * p)
    img = out.reshape(b, hh // p, ww // p, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(b, co, hh, ww)
    return img.chunk(2, dim=1)[0] if learn_sigma else img


def sf_tokens(x, p=P):  # Self-Flow sample.py: b c (h p1) (w p2) -> b (c p1 p2) h w -> b (h w) (c p1 p2)
    b, ch, hh, ww = x.shape
    return x.reshape(b, ch, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, ch * p * p)


def sf_image(tok, ch, side, p=P):
    b = tok.shape[0]
    return tok.reshape(b, side // p, side // p, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, side, side)


def ref_selfflow(sd, x, t_rf, y, learn_sigma=True):
    """Self-Flow ``SelfFlowPerTokenDiT.forward(x tokens, timesteps (RF), vector)`` -> ``(B, C, H, W)``:
    ``t = 1 - timesteps``, linear patch embedding over (c, p, q), ``shufflechannel`` (p q c) -> (c p q),
    keep the first half with learn_sigma, negate."""
    ch, side = x.shape[1], x.shape[-1]
    h = _lin(sf_tokens(x), sd, "x_embedder.proj") + sd["pos_embed"]
    out = ref_trunk(sd, h, 1 - t_rf, y)
    b, n, _ = out.shape
    co = out.shape[-1] // (P * P)
    out = out.reshape(b, n, P, P, co).permute(0, 1, 4, 2, 3).reshape(b, n, co * P * P)  # (p q c) -> (c p q)
    if learn_sigma:
        out = out.chunk(2, dim=2)[0]
    return sf_image(-out, ch, side)


# ------------------------------------------------------------------------------------------- helpers
def load_graph(ck_dir):
    ck = load_checkpoint(ck_dir)
    g = compile_spec(validate(ck.spec), torch.device("cpu"), load_frozen=False)
    g.train_module.load_state_dict(ck.model)
    g.ema.module.load_state_dict(ck.ema)
    return g, ck


def ours(g, x, t, y):
    """The converted EMA backbone on images ``x`` (B, C, H, W) in RF time -> velocity image."""
    with torch.no_grad():
        return g.modality.from_tokens(g.ema.module(g.modality.to_tokens(x), t, y).pred)


def inputs(seed=1, b=3, classes=K):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, S, S, generator=g)
    t = torch.tensor([0.03, 0.5, 0.91])[:b]
    y = torch.tensor([0, classes - 1, classes])[:b]          # the last one is the null label
    return x, t, y


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def randomized(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


# ---------------------------------------------------------------------------------- the adapter itself
def _bb(tag, **kw):
    return BACKBONES.build(BACKBONES.get(tag).Params(type=tag, preset="tiny", depth=2, **kw),
                           token_dim=P * P * C, grid=(S // P, S // P), num_classes=K)


def test_time_flip_is_negated_sit_at_one_minus_t():
    sit, flip = randomized(_bb("sit")), _bb("sit_time_flip")
    assert list(flip.state_dict()) == list(sit.state_dict())           # same keys, loadable both ways
    flip.load_state_dict(sit.state_dict())
    x = torch.randn(2, N, P * P * C)
    y = torch.tensor([1, K])
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        out = flip(x, t, y, taps=(1,))
        close(out.pred, -sit(x, 1 - t, y).pred)
        close(out.features[1], sit(x, 1 - t, y, taps=(1,)).features[1])
        tt = torch.rand(2, N)                                            # per-token RF times
        close(flip(x, tt, y).pred, -sit(x, 1 - tt, y).pred)
        assert torch.equal(flip(x, t[:, None].expand(2, N), y).pred, out.pred)
    assert flip(x, t, y, taps=(1,), stop_after=1).pred is None


def test_time_flip_learn_sigma_keeps_first_c_channels_of_each_pixel():
    big, small = randomized(_bb("sit_time_flip", learn_sigma=True)), _bb("sit_time_flip")
    sd = big.state_dict()
    assert set(sd) == set(small.state_dict()) and sd["final_layer.linear.weight"].shape == (P * P * 2 * C, D)
    # DiT/SiT output per token: (ph, pw, 2C); the velocity is channels 0..C-1 of every latent pixel
    keep = torch.arange(P * P * 2 * C).reshape(P * P, 2 * C)[:, :C].reshape(-1)
    sd_small = dict(sd, **{"final_layer.linear.weight": sd["final_layer.linear.weight"][keep],
                           "final_layer.linear.bias": sd["final_layer.linear.bias"][keep]})
    small.load_state_dict(sd_small)
    x, t, y = torch.randn(2, N, P * P * C), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        close(big(x, t, y).pred, small(x, t, y).pred)
    assert big.flops(N) > small.flops(N)


def test_time_flip_spec_validates_and_registers():
    spec = validate(tiny_spec_dict(backbone={"type": "sit_time_flip", "preset": "tiny", "learn_sigma": True}))
    assert spec.backbone.type == "sit_time_flip" and spec.backbone.learn_sigma and spec.backbone.heads == 4
    assert "tiny" in BACKBONES.get("sit_time_flip").Params.presets


# ----------------------------------------------------------------------------------------- conversions
def test_convert_sit_training_checkpoint(tmp_path, capsys):
    sd = official_sd("sit", learn_sigma=True)
    decoy = official_sd("sit", learn_sigma=True, seed=9)              # "model" differs from "ema"
    src = tmp_path / "sit.pt"
    torch.save({"model": decoy, "ema": sd, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2")}, src)
    ck_dir = cv.convert(src, tmp_path / "run", "sit", preset="tiny", latent_size=S, latent_channels=C, num_classes=K)
    g, ck = load_graph(ck_dir)
    spec = g.spec
    assert ck_dir.name == "step_00000000" and (tmp_path / "run" / "spec.resolved.json").is_file()
    assert spec.backbone.type == "sit_time_flip" and spec.backbone.learn_sigma
    assert (spec.backbone.hidden, spec.backbone.depth, spec.backbone.heads) == (D, DEPTH, HEADS)
    assert spec.data.num_classes == K and g.ema.module.null_label == K      # table K + 1 rows, null last
    assert spec.autoencoder.latent_channels == C and g.latent_shape == (C, S, S)
    assert ck.meta["converted_from"]["entry"] == "ema" and ck.optimizer == {}
    raw_sd, entry = cv.load_source(src, weights="model")                   # --weights model: the other entry
    assert entry == "model" and torch.equal(raw_sd["pos_embed"], decoy["pos_embed"])
    assert set(ck.ema) == {k[len("backbone."):] for k in ck.model}
    x, t, y = inputs()
    close(ours(g, x, t, y), -ref_sit(sd, x, 1 - t, y, learn_sigma=True))  # v_RF(x, t) = -f_sit(x, 1 - t)
    assert "converted" in capsys.readouterr().out


def test_convert_repa_safetensors_and_legacy(tmp_path):
    sd = official_sd("repa", learn_sigma=False)
    src = tmp_path / "repa.safetensors"
    save_file(sd, src)
    ck_dir = cv.convert(src, tmp_path / "run", "repa", preset="tiny")
    g, ck = load_graph(ck_dir)
    assert g.spec.backbone.type == "sit" and g.ema.module.null_label == K  # RF time: no adapter
    assert sorted(ck.meta["dropped"]) == sorted(k for k in sd if k.startswith("projectors."))
    x, t, y = inputs()
    expected = ref_sit(sd, x, t, y, learn_sigma=False)                    # v_RF = f_repa(x, t)
    close(ours(g, x, t, y), expected)

    # REPA's old layout: blocks.0 + decoder_blocks.0 (= blocks.1), wrapped as a training checkpoint
    legacy = {k.replace("blocks.1.", "decoder_blocks.0.") if k.startswith("blocks.1.") else k: v for k, v in sd.items()}
    torch.save({"ema": legacy, "args": argparse.Namespace(legacy=True)}, tmp_path / "legacy.pt")
    g2, _ = load_graph(cv.convert(tmp_path / "legacy.pt", tmp_path / "run2", "repa", preset="tiny"))
    close(ours(g2, x, t, y), expected)

    # --keep-heads: the projectors belong to the 'repa' objective, so the spec must use it (the base spec's
    # objective is flow_matching)
    with pytest.raises(cv.ConversionError, match="--keep-heads: the spec's objective is 'flow_matching'"):
        cv.convert(src, tmp_path / "run3", "repa", preset="tiny", keep_heads=True)


def test_convert_selfflow_per_token(tmp_path):
    sd = official_sd("selfflow", learn_sigma=True)                        # K + 1 rows: K classes + null row K
    src = tmp_path / "selfflow.pt"
    decoy = official_sd("selfflow", learn_sigma=True, seed=9)
    # sample.py:load_model takes "model" (then "state_dict") and strips a DDP "module." prefix
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "ema": decoy}, src)
    g, ck = load_graph(cv.convert(src, tmp_path / "run", "selfflow", preset="tiny"))
    assert g.spec.backbone.type == "sit_time_flip" and g.spec.backbone.learn_sigma
    assert g.ema.module.null_label == K and g.spec.data.num_classes == K
    assert sorted(ck.meta["dropped"]) == [k for k in sorted(sd) if k.startswith("projector.")]
    x, t, y = inputs()
    close(ours(g, x, t, y), ref_selfflow(sd, x, t, y))                     # public forward is RF already
    tt = torch.rand(3, N, generator=torch.Generator().manual_seed(5))      # per-token RF times (row-major grid)
    close(ours(g, x, tt, y), ref_selfflow(sd, x, tt, y))


def test_selfflow_keep_heads():
    """SimpleHead ``projector.linear{1,2}`` (D -> 2D -> D) -> the 'selfflow' objective's ``mlp2`` projector."""
    sd = official_sd("selfflow", learn_sigma=True)
    base = json.loads(cv.DEFAULT_BASE_SPEC.read_text()) | {"objective": {"type": "selfflow", "projector": "mlp2"}}
    plan = cv.plan_conversion(sd, "selfflow", preset="tiny", keep_heads=True, base_spec=base)
    heads = {k: v for k, v in plan.model.items() if k.startswith("objective.")}
    assert not plan.dropped and len(heads) == 4
    assert torch.equal(heads["objective.projector.0.weight"], sd["projector.linear1.weight"])
    assert torch.equal(heads["objective.projector.2.bias"], sd["projector.linear2.bias"])


def _meta_official(kind: str) -> dict[str, torch.Tensor]:
    """Shapes of the released XL/2 checkpoints (SiT-XL-2-256x256.pt, REPA last.pt, selfflow_imagenet256.pt)."""
    d, depth, p, c = 1152, 28, 2, 4
    co = c if kind == "repa" else 2 * c
    shapes = {"x_embedder.proj.weight": (d, c, p, p) if kind != "selfflow" else (d, c * p * p),
              "x_embedder.proj.bias": (d,), "pos_embed": (1, 256, d), "t_embedder.mlp.0.weight": (d, 256),
              "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
              "y_embedder.embedding_table.weight": (1001, d), "final_layer.linear.weight": (p * p * co, d),
              "final_layer.linear.bias": (p * p * co,), "final_layer.adaLN_modulation.1.weight": (2 * d, d),
              "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    for i in range(depth):
        for name, (o, n) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (4 * d, d),
                             "mlp.fc2": (d, 4 * d), "adaLN_modulation.1": (6 * d, d)}.items():
            shapes[f"blocks.{i}.{name}.weight"], shapes[f"blocks.{i}.{name}.bias"] = (o, n), (o,)
    if kind == "repa":
        for j, (o, n) in {0: (2048, d), 2: (2048, 2048), 4: (768, 2048)}.items():
            shapes[f"projectors.0.{j}.weight"], shapes[f"projectors.0.{j}.bias"] = (o, n), (o,)
    if kind == "selfflow":
        shapes |= {"projector.linear1.weight": (2 * d, d), "projector.linear1.bias": (2 * d,),
                   "projector.linear2.weight": (d, 2 * d), "projector.linear2.bias": (d,)}
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("kind", ["sit", "repa", "selfflow"])
def test_released_xl2_layouts_map_completely(kind):
    src = _meta_official(kind)
    plan = cv.plan_conversion(src, kind, log=lambda m: None)
    bb, spec = plan.spec.backbone, plan.spec
    assert bb.preset == "XL/2" and (bb.hidden, bb.depth, bb.heads, bb.patch) == (1152, 28, 16, 2)
    assert bb.type == ("sit" if kind == "repa" else "sit_time_flip")
    assert getattr(bb, "learn_sigma", False) == (kind != "repa")
    assert spec.data.num_classes == 1000 and plan.arch.num_classes == 1000   # Self-Flow's 1001 = 1000 + null 1000
    assert spec.autoencoder.type == "diffusers" and spec.data.data_space().size == 256 and spec.autoencoder.latent_channels == 4
    assert plan.model["backbone.y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert plan.model["backbone.x_embedder.weight"].shape == (1152, 16)
    assert len(plan.model) == 2 + 1 + 4 + 1 + 28 * 10 + 4    # x_emb, pos_embed, t_emb, y_emb, blocks, final layer
    assert len(plan.model) + len(plan.dropped) == len(src)   # every source key used once or dropped (heads)


# ------------------------------------------------------------------------------------------------ errors
def test_unconsumed_mismatched_missing_and_wrong_format_errors(tmp_path, capsys):
    kw = dict(preset="tiny", log=lambda m: None)
    extra = official_sd("sit", learn_sigma=True) | {"blocks.0.attn.q_norm.weight": torch.ones(D // HEADS),
                                                      "blocks.1.attn.k_norm.weight": torch.ones(D // HEADS)}
    with pytest.raises(cv.ConversionError,
                       match=r"2 source keys .*blocks\.0\.attn\.q_norm\.weight, blocks\.1\.attn\.k_norm"):
        cv.plan_conversion(extra, "sit", **kw)

    bad = official_sd("sit", learn_sigma=True)
    bad["blocks.1.mlp.fc2.weight"] = bad["blocks.1.mlp.fc2.weight"][:, : 2 * D]
    with pytest.raises(cv.ConversionError, match=r"shape mismatch: backbone\.blocks\.1\.mlp\.fc2\.weight .*\(64, 128\)"):
        cv.plan_conversion(bad, "sit", **kw)

    missing = official_sd("sit", learn_sigma=True)
    del missing["blocks.0.attn.proj.bias"]
    with pytest.raises(cv.ConversionError, match=r"not in the source: backbone\.blocks\.0\.attn\.proj\.bias"):
        cv.plan_conversion(missing, "sit", **kw)

    with pytest.raises(cv.ConversionError, match="--format selfflow"):
        cv.plan_conversion(official_sd("selfflow", learn_sigma=True), "sit", **kw)
    with pytest.raises(cv.ConversionError, match="null label 5 in the last row"):
        cv.plan_conversion(official_sd("sit", learn_sigma=True), "sit", num_classes=6, **kw)
    with pytest.raises(cv.ConversionError, match="REPA SiT has no learn_sigma"):
        cv.plan_conversion(official_sd("repa", learn_sigma=True), "repa", **kw)

    src = tmp_path / "bad.pt"
    torch.save(extra, src)
    capsys.readouterr()
    assert cv.main([str(src), "--to", str(tmp_path / "run"), "--format", "sit", "--preset", "tiny"]) == 2
    assert "q_norm" in capsys.readouterr().err and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- sampling
def test_converted_run_samples_with_runtime_sample(tmp_path, capsys):
    from runtime.sample import main as sample_main

    ch, classes = 3, 3                                                     # identity AE: latent = image (C = 3)
    sd = official_sd("sit", learn_sigma=True, channels=ch, classes=classes, depth=1)
    torch.save(sd, tmp_path / "tiny_sit.pt")
    base = tiny_spec_dict(data={"type": "image_folder", "root": str(tmp_path / "no_data_needed"), "num_classes": 1},
                          solver={"type": "euler", "steps": 2}, sample={"n": 3})
    assert cv.main([str(tmp_path / "tiny_sit.pt"), "--to", str(tmp_path / "run"), "--format", "sit",
                    "--preset", "tiny", "--base-spec", _write(tmp_path / "base.json", base)]) == 0
    spec = json.loads((tmp_path / "run" / "spec.resolved.json").read_text())
    assert spec["data"]["num_classes"] == classes and spec["data"]["size"] == S and spec["data"]["channels"] == ch
    out = tmp_path / "grid.png"
    assert sample_main([str(tmp_path / "run"), "--device", "cpu", "--out", str(out)]) == 0
    assert out.is_file() and "3 samples" in capsys.readouterr().out


def _write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)
