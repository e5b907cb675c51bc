"""Contract tests generated from the registries: every registered entry of every kind is built at its
``tiny`` preset (plus the few fields an entry needs to exist at all, listed in ``REQUIRED``) and checked
against its kind's contract. A new entry is tested here without writing a test; an entry that needs
fields this file does not know fails loudly until they are added to ``REQUIRED``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

import zoo  # noqa: F401
from registry.kinds import (ATTENTION, AUTOENCODERS, BACKBONES, DATASETS, LR_SCHEDULES, MASKS, METRICS,
                            MODALITIES, OBJECTIVES, POSITIONS, SOLVERS, TEACHERS, TIMESTEPS)
from zoo.autoencoders.base import TrainableAutoencoder
from zoo.core import protocols
from zoo.core.types import StepContext, StepRNG, TokenBatch


def _image_folder(tmp: Path) -> dict:
    for c in range(3):
        (tmp / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 24), (40 * c, 30 * i, 200)).save(tmp / f"class{c}" / f"{i}.png")
    return {"root": str(tmp), "num_classes": 3}


def _media_folder(tmp: Path, kind: str) -> dict:
    """2 classes x 1 file: a 6-frame 8 fps MP4 (with 8 kHz sound for av_folder) or a 0.3 s 8 kHz WAV."""
    import numpy as np

    from zoo.media import write_mp4, write_wav
    for c in range(2):
        if kind == "audio":
            write_wav(tmp / f"class{c}" / "0.wav", np.full(2400, 0.1 * (c + 1), np.float32), 8000)
        else:
            video = np.full((6, 12, 14, 3), 60 * (c + 1), np.uint8)
            audio = np.full(6000, 0.2, np.float32) if kind == "av" else None
            write_mp4(tmp / f"class{c}" / "0.mp4", video, 8, audio, 8000 if kind == "av" else None)
    return {"root": str(tmp), "num_classes": 2}


def _diffusers_vae(tmp: Path) -> dict:
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=32)
    vae.save_pretrained(tmp / "vae")
    return {"path": str(tmp / "vae"), "downsample": 2}


def _latent_cache(tmp: Path) -> dict:
    """A 20-sample identity cache of tiny digits, normalised with the identity's (0, 1): items stay in [-1, 1]."""
    from registry.spec import validate
    from runtime.cache import build_cache
    from zoo.data.latent_shards import without_cache_checks

    source = {"type": "digits", "preset": "tiny", "length": 20}
    raw = {"version": 1, "name": "contract", "modality": {"type": "image"}, "backbone": {"type": "sit", "preset": "tiny"},
           "objective": {"type": "flow_matching"}, "train": {"steps": 1, "batch_size": 2},
           "data": {"type": "latent_shards", "path": str(tmp / "cache"), "source": source, "stats": "autoencoder"}}
    with without_cache_checks():
        build_cache(validate(raw), tmp / "cache", shard_size=8, progress=False)
    return {"path": str(tmp / "cache"), "source": source, "stats": "autoencoder"}


def _vae_run(tmp: Path, tag: str) -> dict:
    """A trained 1-step ``tag`` run: the ``conv_vae`` / ``conv_vae_1d`` autoencoders load one."""
    from tests.test_conv_vae import vae_run_fields

    return vae_run_fields(tmp, tag)


def _clip_export(tmp: Path) -> Path:
    """An exported ``clip_vae`` (random weights, tiny preset) for clips ``(1, 2, 8, 8)``."""
    from tests.test_clip_vae import random_export

    return random_export(tmp / "clip_vae")


def _sprite_export(tmp: Path) -> Path:
    """An exported ``sprite_vae`` (random weights, tiny preset) for clips ``(1, 2, 8, 8)``."""
    from tests.test_sprite_vae import random_export

    return random_export(tmp / "sprite_vae")


_INCEPTION: list[str] = []


def _inception(tmp: Path) -> dict:
    """One random FID-Inception file per session (shared path: the reference statistics are computed once)."""
    if not _INCEPTION:
        import tempfile

        from tests.helpers import random_inception_weights
        _INCEPTION.append(random_inception_weights(Path(tempfile.mkdtemp()) / "pt_inception-random.pth"))
    return {"weights": _INCEPTION[0], "num_real": 8, "batch_size": 8}


REQUIRED: dict[str, Callable[[Path], dict]] = {  # tag (or "kind:tag") -> fields an entry cannot exist without
    "latent_shards": _latent_cache,
    "image_folder": _image_folder,
    "video_folder": lambda tmp: _media_folder(tmp, "video"),
    "audio_folder": lambda tmp: _media_folder(tmp, "audio"),
    "av_folder": lambda tmp: _media_folder(tmp, "av"),
    "diffusers": _diffusers_vae,
    "shifted": lambda tmp: {"shift": 3.0},
    "linear_probe": lambda tmp: {"block": 2, "num_train": 100, "num_test": 50},
    "repa": lambda tmp: {"encoders": ["t"]},
    "vit": lambda tmp: {"weights": None},
    "autoencoder:conv_vae": lambda tmp: _vae_run(tmp, "conv_vae"),  # the backbones of the same tags need nothing
    "autoencoder:conv_vae_1d": lambda tmp: _vae_run(tmp, "conv_vae_1d"),
    "autoencoder:clip_vae": lambda tmp: {"path": str(_clip_export(tmp))},
    "autoencoder:sprite_vae": lambda tmp: {"path": str(_sprite_export(tmp))},
    **{tag: _inception for tag in ("fid", "sfid", "inception_score", "precision_recall")},
    "fd_dinov2": lambda tmp: {"weights": None, "preset": "tiny", "num_real": 8},  # random init: tests only
    "fvd": lambda tmp: {"weights": None, "num_real": 2, "batch_size": 2},  # random init: tests only; 224-px I3D
    "fad": lambda tmp: {"weights": None, "num_real": 4},                   # random init: tests only
    "streams": lambda tmp: {"parts": {"video": {"type": "identity"}, "audio": {"type": "stft", "n_fft": 32}}},  # random init: allowed for tests only (specs must name a file)
}


# Per-tag examples for entries that do not take the default image-shaped inputs of the contracts below.
# Shapes are one sample's; a dict means a multi-stream sample (e.g. {"video": ..., "audio": ...}).
AUTOENCODER_INPUT: dict[str, Any] = {    # tag -> input shape (default (3, 16, 16))
    "waveform": (1, 256),
    "stft": (1, 256),
    "spectrogram": (1, 256),
    "conv_vae_1d": (1, 256),
    "clip_vae": (1, 2, 8, 8),
    "sprite_vae": (1, 2, 8, 8),
    "streams": {"video": (1, 4, 8, 8), "audio": (1, 256)},
}
MODALITY_EXAMPLE: dict[str, Callable[[], dict]] = {  # tag -> build deps (default backbone_patch=2, latent (3, 8, 12))
    "video": lambda: {"backbone_patch": 2, "latent_shape": (3, 4, 8, 12), "time_step_s": 0.125},
    "audio": lambda: {"backbone_patch": 3, "latent_shape": (4, 25), "time_step_s": 0.01},
    "audio_video": lambda: {"latent_shape": {"video": (1, 4, 8, 8), "audio": (6, 30)},
                            "time_step_s": {"video": 0.125, "audio": 0.01}},
}
METRIC_SAMPLES = {**{tag: 8 for tag in ("fid", "sfid", "inception_score", "precision_recall", "fd_dinov2")},  # 299-px nets
                  "fvd": 2, "fad": 4}                                                      # 16 x 224 x 224 I3D
METRIC_DATA: dict[str, Callable[[], Any]] = {        # tag -> data params to evaluate on (default digits tiny)
    **{tag: (lambda: DATASETS.get("bouncing_digits_av").Params(type="bouncing_digits_av", preset="tiny"))
       for tag in ("av_agreement", "av_sync_ms", "video_class_accuracy", "audio_class_accuracy", "video_consistency",
                   "fvd", "fad")},
}


def random_like(shape: Any, batch: int) -> Any:
    """A batch of uniform [-1, 1] data for a sample shape (tuple) or a dict of them."""
    if isinstance(shape, dict):
        return {k: random_like(v, batch) for k, v in shape.items()}
    return torch.rand(batch, *shape) * 2 - 1


def shape_of(x: Any) -> Any:
    """Per-sample shape of a batch (tensor or dict of tensors)."""
    return {k: shape_of(v) for k, v in x.items()} if isinstance(x, dict) else tuple(x.shape[1:])


def stack(xs: list) -> Any:
    return {k: torch.stack([x[k] for x in xs]) for k in xs[0]} if isinstance(xs[0], dict) else torch.stack(xs)


def params_for(reg, tag: str, tmp: Path) -> Any:
    raw: dict = {"type": tag}
    if "tiny" in reg.get(tag).Params.presets:
        raw["preset"] = "tiny"
    key = f"{reg.kind}:{tag}" if f"{reg.kind}:{tag}" in REQUIRED else tag  # "kind:tag" where one tag names two
    raw.update(REQUIRED[key](tmp) if key in REQUIRED else {})
    return reg.get(tag).Params.model_validate(raw)


def entries(reg) -> list:
    return [pytest.param(tag, id=f"{reg.kind}:{tag}") for tag in reg.names()]


def tiny_backbone(num_classes: int = 3) -> torch.nn.Module:
    return BACKBONES.build(BACKBONES.get("sit").Params(type="sit", preset="tiny"), token_dim=8, grid=(4, 4),
                           num_classes=num_classes)


OBJECTIVE_STUDENT: dict[str, Callable[[], torch.nn.Module]] = {  # tag -> the student it trains (default sit tiny)
    # a VAE of the contract batch's raw (3, 8, 8) images: downsample 2 -> token_dim 3 * 2 * 2, grid 4 x 4
    "autoencoder": lambda: BACKBONES.build(BACKBONES.get("conv_vae").Params(type="conv_vae", preset="tiny"),
                                           token_dim=12, grid=(4, 4), num_classes=3),
}


VAE_DATA: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {  # tag -> (data sample, latent grid), tiny presets
    "conv_vae": ((3, 8, 8), (4, 4)),          # downsample 2
    "conv_vae_1d": ((1, 32), (16,)),          # downsample 2
    "clip_vae": ((1, 2, 8, 8), (1, 4, 4)),    # downsample 2 x 2 x 2
    "sprite_vae": ((1, 2, 8, 8), (2, 1, 1)),  # one latent position per frame
}


def is_vae(tag: str) -> bool:
    return issubclass(BACKBONES.get(tag), TrainableAutoencoder)


@pytest.mark.parametrize("tag", entries(BACKBONES))
def test_backbone_contract(tag, tmp_path):
    if is_vae(tag):
        pytest.skip("a TrainableAutoencoder (objective autoencoder), not a flow backbone: see "
                    "test_trainable_autoencoder_contract")
    torch.manual_seed(0)
    grid = (4, 4)
    net = BACKBONES.build(params_for(BACKBONES, tag, tmp_path), token_dim=8, grid=grid, num_classes=3)
    assert isinstance(net, protocols.Backbone) and net.null_label == 3
    # zero-initialised output layers (adaLN-Zero) would make every check below hold for any weights: perturb first
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 16, 8), torch.rand(2), torch.tensor([0, 3])
    out = net(x, t, y, taps=(1, net.depth))
    assert out.pred.shape == x.shape and torch.isfinite(out.pred).all() and out.pred.abs().mean() > 1e-4
    assert set(out.features) == {1, net.depth} and out.features[1].shape == (2, 16, net.hidden)
    assert net(x, t, y, taps=(1,), stop_after=1).pred is None
    out = net(x, t.view(2, 1).expand(2, 16), torch.tensor([0, 1]))   # labels 0, 1: no parameter may be unused
    out.pred.square().mean().backward()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    twin = BACKBONES.build(params_for(BACKBONES, tag, tmp_path), token_dim=8, grid=grid, num_classes=3)
    twin.load_state_dict(net.state_dict())
    assert torch.equal(twin(x, t, y).pred, net(x, t, y).pred)
    fresh = BACKBONES.build(params_for(BACKBONES, tag, tmp_path), token_dim=8, grid=grid, num_classes=3)
    assert not torch.equal(fresh(x, t, y).pred, net(x, t, y).pred)  # the twin check can tell weights apart
    assert net.flops(16) > 0


@pytest.mark.parametrize("tag", [t for t in BACKBONES.names() if is_vae(t)])
def test_trainable_autoencoder_contract(tag, tmp_path):
    assert tag in VAE_DATA, f"give the VAE {tag!r} a data sample and latent grid in VAE_DATA"
    torch.manual_seed(0)
    shape, grid = VAE_DATA[tag]
    token_dim = shape[0] * math.prod(s // g for s, g in zip(shape[1:], grid))

    def build() -> Any:
        return BACKBONES.build(params_for(BACKBONES, tag, tmp_path), token_dim=token_dim, grid=grid, num_classes=3)

    net = build()
    assert isinstance(net, TrainableAutoencoder) and not isinstance(net, protocols.Backbone)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(2, *shape) * 2 - 1
    mean, logvar = net.encode_moments(x)
    assert mean.shape == logvar.shape == (2, net.hidden, *grid) and torch.isfinite(mean).all()
    rec = net.decode(mean + (0.5 * logvar).exp() * torch.randn_like(mean))
    assert rec.shape == x.shape and torch.isfinite(rec).all() and rec.abs().mean() > 1e-4
    ((rec - x).square().mean() + (mean.square() + logvar.exp() - logvar).mean()).backward()
    no_grad = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    twin, fresh = build(), build()
    twin.load_state_dict(net.state_dict())
    assert torch.equal(twin.decode(mean.detach()), net.decode(mean.detach()))
    assert not torch.equal(fresh.decode(mean.detach()), net.decode(mean.detach()))
    assert net.flops(math.prod(grid)) > 0
    obj = OBJECTIVES.build(OBJECTIVES.get("autoencoder").Params(type="autoencoder"), teachers={})
    batch = TokenBatch(torch.zeros(2, math.prod(grid), token_dim), None, raw=x)
    assert torch.isfinite(obj(net, batch, StepContext(0, StepRNG(0, 0, 0, 0, 2, 2))).loss)
    with pytest.raises(TypeError, match="trains a VAE backbone"):
        obj(tiny_backbone(), batch, StepContext(0, StepRNG(0, 0, 0, 0, 2, 2)))


@pytest.mark.parametrize("tag", entries(OBJECTIVES))
def test_objective_contract(tag, tmp_path):
    torch.manual_seed(0)
    make = OBJECTIVE_STUDENT.get(tag, tiny_backbone)
    student, ema = make(), make()
    tp = TEACHERS.get("vit").Params(type="vit", preset="tiny", weights=None)
    teacher = TEACHERS.build(tp, input_shape=(3, 8, 8))
    obj = OBJECTIVES.build(params_for(OBJECTIVES, tag, tmp_path), hidden=student.hidden, depth=student.depth,
                           grid=(4, 4), teachers={"t": teacher}, teacher_params={"t": tp})
    batch = TokenBatch(torch.randn(4, 16, 8), torch.tensor([0, 1, 2, 0]), raw=torch.rand(4, 3, 8, 8) * 2 - 1)
    ctx = StepContext(0, StepRNG(0, 0, 0, 0, 4, 4), ema=ema.eval().requires_grad_(False))
    out = obj(student, batch, ctx)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(v.ndim == 0 and not v.requires_grad for v in out.metrics.values())
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in [*student.parameters(), *obj.parameters()])
    assert all(p.grad is None for p in ema.parameters()) and all(p.grad is None for p in teacher.parameters())
    again = obj(student, batch, StepContext(0, StepRNG(0, 0, 0, 0, 4, 4), ema=ema))
    assert torch.equal(again.loss, out.loss)  # all randomness comes from the step RNG


@pytest.mark.parametrize("tag", entries(TIMESTEPS))
def test_timesteps_contract(tag, tmp_path):
    dist = TIMESTEPS.build(params_for(TIMESTEPS, tag, tmp_path))
    u = torch.linspace(0, 1, 101)
    t = dist.icdf(u)
    assert t.shape == u.shape and (t >= 0).all() and (t <= 1).all() and (t.diff() >= 0).all()
    s = dist.sample(StepRNG(0, 0, 0, 0, 5, 5), 3)
    assert s.shape == (5, 3) and (s >= 0).all() and (s <= 1).all()


@pytest.mark.parametrize("tag", entries(TEACHERS))
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32)])
def test_teacher_contract(tag, shape, tmp_path):
    params = params_for(TEACHERS, tag, tmp_path)
    try:
        t = TEACHERS.build(params, input_shape=shape)
    except ImportError as e:  # an optional weights package (efficientnet_lite0: fmzoo[encoders])
        pytest.skip(str(e))
    assert isinstance(t, protocols.Teacher) and not t.training and not any(p.requires_grad for p in t.parameters())
    raw = torch.rand(2, *shape) * 2 - 1
    z = t.features(raw, grid=(4, 4))
    gh, gw = params.feature_grid(shape, (4, 4))
    assert z.shape == (2, gh * gw, params.feature_dim) and torch.isfinite(z).all()
    assert torch.equal(t.features(raw, grid=(4, 4)), z)


@pytest.mark.parametrize("tag", entries(MASKS))
def test_mask_contract(tag, tmp_path):
    mask = MASKS.build(params_for(MASKS, tag, tmp_path), grid=(4, 4))
    m = mask.sample(StepRNG(3, 1, 0, 0, 6, 6), 16)
    assert m.shape == (6, 16) and m.dtype == torch.bool
    assert torch.equal(m, mask.sample(StepRNG(3, 1, 0, 0, 6, 6), 16))  # a function of the step RNG
    halves = [mask.sample(StepRNG(3, 1, 0, r * 3, 3, 6), 16) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), m)  # the same rows however the batch is split over ranks


@pytest.mark.parametrize("tag", entries(SOLVERS))
def test_solver_contract(tag, tmp_path):
    solver = SOLVERS.build(params_for(SOLVERS, tag, tmp_path))
    calls = []
    x0 = torch.randn(3, 5, 2)

    def velocity(x, t):  # straight-line flow to the fixed data x0
        calls.append(t)
        assert t.shape == (3,) and (t >= 0).all() and (t <= 1).all()
        return (x - x0) / t.clamp_min(1e-3).view(-1, 1, 1)

    out = solver.solve(velocity, torch.randn(3, 5, 2), generator=torch.Generator().manual_seed(0))
    assert out.shape == x0.shape and torch.isfinite(out).all()
    assert len(calls) == solver.nfe


@pytest.mark.parametrize("tag", entries(ATTENTION))
def test_attention_contract(tag, tmp_path):
    if tag == "xformers" and not torch.cuda.is_available():
        pytest.skip("xformers runs on CUDA only")
    attn = ATTENTION.build(params_for(ATTENTION, tag, tmp_path))
    q, k, v = (torch.randn(2, 6, 3, 8) for _ in range(3))
    ref = ATTENTION.build(ATTENTION.get("math").Params(type="math"))
    assert torch.allclose(attn(q, k, v), ref(q, k, v), atol=1e-5)
    mask = torch.rand(2, 6, 6) > 0.3
    mask |= torch.eye(6, dtype=torch.bool)
    assert torch.allclose(attn(q, k, v, mask), ref(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("tag", entries(AUTOENCODERS))
def test_autoencoder_contract(tag, tmp_path):
    params = params_for(AUTOENCODERS, tag, tmp_path)
    ae = AUTOENCODERS.build(params).eval()
    shape = AUTOENCODER_INPUT.get(tag, (3, 16, 16))
    x = random_like(shape, 2)
    z = ae.encode(x)
    assert shape_of(z) == _tuples(params.latent_shape(shape))
    assert shape_of(ae.decode(z)) == _tuples(shape)


@pytest.mark.parametrize("tag", entries(MODALITIES))
def test_modality_contract(tag, tmp_path):
    deps = MODALITY_EXAMPLE.get(tag, lambda: {"backbone_patch": 2, "latent_shape": (3, 8, 12)})()
    mod = MODALITIES.build(params_for(MODALITIES, tag, tmp_path), **deps)
    z = random_like(deps["latent_shape"], 2)
    tok = mod.to_tokens(z)
    layout = mod.layout
    assert tok.shape == (2, layout.num_tokens, layout.token_dim) and mod.token_dim == layout.token_dim
    for seg in layout.segments:  # padding channels of shorter segments are zero
        assert (tok[:, seg.tokens, seg.token_dim:] == 0).all()
    back = mod.from_tokens(tok)
    assert shape_of(back) == shape_of(z)
    assert all(torch.equal(a, b) for a, b in zip(_leaves(back), _leaves(z)))


@pytest.mark.parametrize("tag", entries(DATASETS))
def test_dataset_contract(tag, tmp_path):
    params = params_for(DATASETS, tag, tmp_path)
    ds = DATASETS.build(params, split="train")
    x, y = ds[0]
    assert _tuples(shape_of_sample(x)) == _tuples(params.sample_shape())
    for leaf in _leaves(x):
        assert leaf.dtype == torch.float32 and -1 <= leaf.min() and leaf.max() <= 1
    assert 0 <= y < params.num_classes and len(ds) > 0
    assert all(torch.equal(a, b) for a, b in zip(_leaves(ds[0][0]), _leaves(x)))


@pytest.mark.parametrize("tag", entries(METRICS))
def test_metric_contract(tag, tmp_path):
    data = METRIC_DATA.get(tag, lambda: DATASETS.get("digits").Params(type="digits", preset="tiny"))()
    metric = METRICS.build(params_for(METRICS, tag, tmp_path), data_params=data, device=torch.device("cpu"))
    if getattr(metric, "uses_model", False):  # reads the (EMA) model of a compiled graph
        from registry.spec import validate
        from runtime.compiler import compile_spec
        from tests.helpers import tiny_spec_dict

        out = metric.evaluate_model(compile_spec(validate(tiny_spec_dict()), torch.device("cpu")))
    else:
        ds = DATASETS.build(data, split="eval")
        xs, ys = zip(*(ds[i] for i in range(min(METRIC_SAMPLES.get(tag, 40), len(ds)))))
        out = metric(stack(list(xs)), torch.tensor(ys))
    assert out and all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    # every value it returns has a declared direction (seed studies read it: runtime.study_report)
    assert set(type(metric).directions(metric.params)) == set(out)


@pytest.mark.parametrize("tag", entries(LR_SCHEDULES))
def test_lr_schedule_contract(tag, tmp_path):
    sched = LR_SCHEDULES.build(params_for(LR_SCHEDULES, tag, tmp_path))
    f = [sched.factor(s, 100, 10) for s in range(100)]
    assert all(0 < v <= 1 for v in f) and f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)


def _tuples(shape: Any) -> Any:
    return {k: _tuples(v) for k, v in shape.items()} if isinstance(shape, dict) else tuple(int(s) for s in shape)


def _leaves(x: Any) -> list:
    return [x[k] for k in sorted(x)] if isinstance(x, dict) else [x]


def shape_of_sample(x: Any) -> Any:
    return {k: tuple(v.shape) for k, v in x.items()} if isinstance(x, dict) else tuple(x.shape)


@pytest.mark.parametrize("tag", entries(POSITIONS))
def test_position_contract(tag, tmp_path):
    pos = POSITIONS.build(params_for(POSITIONS, tag, tmp_path), head_dim=24)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 3, 24, generator=g), torch.randn(2, 6, 3, 24, generator=g)
    rq, rk = pos.apply(q, k, *pos.angles(torch.randn(6, 3, generator=g) * 4))
    assert rq.shape == q.shape and rk.shape == k.shape and rq.dtype == q.dtype
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # rotations keep each head's norm
    assert torch.allclose(rk.norm(dim=-1), k.norm(dim=-1), atol=1e-5)


KIND_BASES = {"data": "DataParams", "modality": "ModalityParams", "autoencoder": "AutoencoderParams",
              "teacher": "TeacherParams"}


def test_every_entry_derives_from_its_kinds_hook_base():
    """The optional hooks are declared once per kind (``zoo.core.params``, ``zoo.core.protocols``,
    ``zoo.autoencoders.base``) and called without probing: every entry must inherit them."""
    from registry.kinds import ALL, AUTOENCODERS, METRICS, OBJECTIVES
    from zoo.autoencoders.base import AutoencoderModule
    from zoo.core import params as zp

    for kind, base in KIND_BASES.items():
        bad = [t for t, c in ALL[kind].items() if not issubclass(c.Params, getattr(zp, base))]
        assert not bad, f"{kind} params not derived from {base}: {bad}"
    assert all(issubclass(c, protocols.ObjectiveModule) for _, c in OBJECTIVES.items())
    assert all(issubclass(c, protocols.Metric) for _, c in METRICS.items())
    assert all(issubclass(c, AutoencoderModule) for _, c in AUTOENCODERS.items())


def test_a_misspelt_hook_is_an_error():
    from typing import Literal

    from zoo.core.params import DataParams

    with pytest.raises(TypeError, match="did you mean 'stream_rates'"):
        class _Bad(DataParams):
            type: Literal["bad"]

            def stream_rate(self) -> dict:
                return {}
    with pytest.raises(TypeError, match="did you mean 'problems'"):
        class _AlsoBad(DataParams):
            type: Literal["also_bad"]

            def problem(self, spec):
                return ()
