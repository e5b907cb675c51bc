"""conv_vae / conv_vae_1d: networks, the ``autoencoder`` objective's loss terms, tiny AE runs of the shipped
specs, a latent Self-Flow run on the trained AE (and the same spec in pixel space), missing-run errors and
the cached latent statistics."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import zoo  # noqa: F401
import zoo.objectives.autoencoder as aeo
from registry.errors import SpecError
from registry.kinds import AUTOENCODERS, BACKBONES, MODALITIES, OBJECTIVES
from registry.spec import load_spec
from runtime import run as run_cli
from zoo.core.types import StepContext, StepRNG, TokenBatch

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
COMMON = ["train.steps=3", "train.warmup_steps=1", "train.batch_size=4", "train.checkpoint_every=3",
          "sample.n=4", "eval.num_samples=6", "log.every=1", "log.progress=false", "log.tensorboard=false"]
AE_IMAGE = COMMON + ["data.size=16", "backbone.channels=[8,8]", "backbone.groups=4"]
AE_AUDIO = COMMON + ["data.length=64", "data.duration_s=0.5", "backbone.channels=[8,8]", "backbone.groups=4"]
FLOW = COMMON + ["data.size=16", "solver.steps=2", "backbone.hidden=32", "backbone.depth=2", "backbone.heads=2",
                 "autoencoder.stats_samples=20"]


def _argv(spec: str, out: Path, sets: list[str]) -> list[str]:
    argv = [str(SPECS / spec), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    return argv


# ------------------------------------------------------------------------------------------ networks
def test_network_shapes_2d_and_latent_grid_matches_image_modality():
    torch.manual_seed(0)
    params = BACKBONES.get("conv_vae").Params(type="conv_vae", channels=[8, 16], latent_channels=3, groups=4)
    assert params.downsample == params.patch == 4
    net = BACKBONES.build(params, token_dim=2 * 16, grid=(3, 5), num_classes=10)
    x = torch.rand(2, 2, 12, 20) * 2 - 1
    mean, logvar = net.encode_moments(x)
    assert mean.shape == logvar.shape == (2, 3, 3, 5) and net.decode(mean).shape == x.shape
    mod = MODALITIES.build(MODALITIES.get("image").Params(type="image"), backbone_patch=params.patch,
                           latent_shape=(2, 12, 20))
    assert tuple(mod.grid) == mean.shape[2:] and net.in_channels == 2  # token = latent position (patch = downsample)


def test_network_shapes_1d_and_flops():
    params = BACKBONES.get("conv_vae_1d").Params(type="conv_vae_1d", channels=[8, 16], latent_channels=5, groups=4)
    assert params.downsample == 16
    net = BACKBONES.build(params, token_dim=16, grid=(10,), num_classes=0)
    x = torch.rand(3, 1, 160) * 2 - 1
    mean, _ = net.encode_moments(x)
    assert mean.shape == (3, 5, 10) and net.decode(mean).shape == (3, 1, 160)
    mod = MODALITIES.build(MODALITIES.get("audio").Params(type="audio"), backbone_patch=16, latent_shape=(1, 160),
                           time_step_s=0.001)
    assert tuple(mod.grid) == mean.shape[2:]
    with pytest.raises(ValueError, match="divisible"):
        net.encode_moments(torch.zeros(1, 1, 150))
    # the first conv (1 -> 8 channels, width 3) alone is 2 * 24 * 160 FLOPs; doubling the length doubles the count
    assert net.flops(10) > 2 * 24 * 160 and net.flops(20) == pytest.approx(2 * net.flops(10))


# --------------------------------------------------------------------------------------- loss terms
def test_kl_reconstruction_and_psnr_against_hand_computation():
    mean = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, math.log(0.5)]])
    # 0.5 * (m^2 + v - 1 - log v) per element
    terms = [0.0, 0.5 * (1 + 2 - 1 - math.log(2)), 0.5 * 4, 0.5 * (1 + 0.5 - 1 - math.log(0.5))]
    assert aeo.kl_to_standard_normal(mean, logvar).item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    rec, x = torch.tensor([0.5, -0.5, 1.0]), torch.tensor([0.0, 0.0, 0.0])
    assert aeo.reconstruction_loss(rec, x, "l1").item() == pytest.approx(2.0 / 3)
    assert aeo.reconstruction_loss(rec, x, "mse").item() == pytest.approx(1.5 / 3)
    assert aeo.psnr(rec, x).item() == pytest.approx(10 * math.log10(4 / 0.5), rel=1e-5)


def test_objective_loss_is_rec_plus_weighted_kl_with_step_rng_noise():
    torch.manual_seed(1)
    net = BACKBONES.build(BACKBONES.get("conv_vae").Params(type="conv_vae", preset="tiny"), token_dim=8, grid=(4, 4))
    obj = OBJECTIVES.build(OBJECTIVES.get("autoencoder").Params(type="autoencoder", reconstruction="mse",
                                                                kl_weight=0.25), teachers={})
    x = torch.rand(3, 2, 8, 8) * 2 - 1
    batch = TokenBatch(torch.zeros(3, 16, 8), None, raw=x)
    out = obj(net, batch, StepContext(5, StepRNG(0, 5, 0, 0, 3, 3)))
    mean, logvar = net.encode_moments(x)
    eps = StepRNG(0, 5, 0, 0, 3, 3).randn(*mean.shape[1:])
    rec = net.decode(mean + (0.5 * logvar).exp() * eps)
    kl = (0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)).mean()
    assert out.metrics["loss_rec"].item() == pytest.approx(((rec - x) ** 2).mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(((rec - x) ** 2).mean().item() + 0.25 * kl.item(), rel=1e-5)
    other = obj(net, batch, StepContext(6, StepRNG(0, 6, 0, 0, 3, 3)))
    assert other.loss.item() != out.loss.item()  # a different step draws different noise


def test_eval_indices_follow_labels():
    data = [(None, j % 3) for j in range(12)]
    assert aeo.eval_indices(data, 4, None) == [0, 1, 2, 3]
    assert aeo.eval_indices(data, 4, torch.tensor([2, 2, 0, 1])) == [2, 5, 0, 1]
    with pytest.raises(ValueError, match="lacks"):
        aeo.eval_indices(data, 1, torch.tensor([7]))


def test_spec_problems():
    with pytest.raises(SpecError) as e:
        load_spec(SPECS / "vae_digits.json", ["modality.patch=2", "objective.perceptual_teacher=nope"])
    text = str(e.value)
    assert "modality.patch" in text and "objective.perceptual_teacher" in text and "nope" in text
    with pytest.raises(SpecError, match="objective.perceptual_weight"):
        load_spec(SPECS / "vae_audio.json", ["objective.perceptual_weight=0.1"])
    with pytest.raises(SpecError, match="does not divide"):
        load_spec(SPECS / "vae_audio.json", ["data.sample_rate=4001"])


# ----------------------------------------------------------------------------------------- tiny runs
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae") / "run"
    assert run_cli.main(_argv("vae_digits.json", out, AE_IMAGE)) == 0
    return out


def test_vae_run_writes_checkpoint_and_reconstruction_metrics(vae_run):
    ck = vae_run / "checkpoints" / "step_00000003"
    assert (ck / "ema.safetensors").is_file() and (ck / "spec.resolved.json").is_file()
    rows = [json.loads(line) for line in (vae_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss_rec" in r]
    assert len(train) == 3 and all({"loss_kl", "loss_perc", "psnr"} <= set(r) for r in train)
    ev = [r for r in rows if "eval/class_accuracy" in r][-1]
    assert "real/classifier_fd" in ev and (vae_run / "samples" / "step_00000003.png").is_file()


@pytest.mark.slow  # trains through the CLI
def test_vae_audio_run(tmp_path):
    out = tmp_path / "run"
    assert run_cli.main(_argv("vae_audio.json", out, AE_AUDIO)) == 0
    assert (out / "checkpoints" / "step_00000003" / "ema.safetensors").is_file()
    assert len(list((out / "samples" / "step_00000003").glob("*.wav"))) == 4
    ae = AUTOENCODERS.build(AUTOENCODERS.get("conv_vae_1d").Params(type="conv_vae_1d", run=str(out), stats_samples=8))
    x = torch.rand(2, 1, 2000) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 8, 125) and ae.decode(z).shape == x.shape


@pytest.mark.slow  # trains through the CLI
def test_latent_flow_run_decodes_data_shape(vae_run, tmp_path):
    out = tmp_path / "flow"
    assert run_cli.main(_argv("selfflow_digits_latent.json", out, FLOW + [f"autoencoder.run={vae_run}"])) == 0
    spec = json.loads((out / "spec.resolved.json").read_text())
    assert spec["autoencoder"]["run"] == str(vae_run / "checkpoints" / "step_00000003")  # pinned checkpoint
    from PIL import Image

    sheet = Image.open(out / "samples" / "step_00000003.png")
    k = sheet.size[0] // (4 * 18 + 2)  # 4 samples of 16 x 16 px (the data shape), 2-px padding, upscaled k x
    assert k >= 1 and sheet.size == (k * (4 * 18 + 2), k * (18 + 2))
    from runtime.compiler import components_from_checkpoint
    from runtime.sample import generate

    graph, _ = components_from_checkpoint(out, torch.device("cpu"))
    assert graph.latent_shape == (4, 4, 4) and graph.num_tokens == 4
    assert generate(graph, 3, torch.tensor([0, 1, 2]), seed=0).shape == (3, 1, 16, 16)


@pytest.mark.slow  # trains through the CLI
def test_same_flow_spec_in_pixel_space(tmp_path):
    out = tmp_path / "pixels"
    sets = [s for s in FLOW if not s.startswith("autoencoder.")] + ['autoencoder={"type": "identity"}']
    assert run_cli.main(_argv("selfflow_digits_latent.json", out, sets)) == 0
    assert (out / "checkpoints" / "step_00000003").is_dir()


def test_missing_run_names_autoencoder_run(tmp_path, capsys):
    missing = tmp_path / "nothing_here"
    with pytest.raises(SpecError) as e:
        load_spec(SPECS / "selfflow_digits_latent.json", [f"autoencoder.run={missing}"])
    msgs = [msg for path, msg in e.value.problems if path == "autoencoder.run"]
    assert len(msgs) == 1 and "train it first" in msgs[0] and "specs/vae_digits.json" in msgs[0]
    assert run_cli.main(_argv("selfflow_digits_latent.json", tmp_path / "r", [f"autoencoder.run={missing}"])) == 2
    assert "autoencoder.run" in capsys.readouterr().err


def test_wrong_kind_of_run_is_refused(vae_run):
    with pytest.raises(SpecError, match="conv_vae_1d"):
        load_spec(SPECS / "vae_audio.json", [f'autoencoder={{"type": "conv_vae_1d", "run": "{vae_run}"}}',
                                             'backbone={"type": "sit", "preset": "tiny"}'])


def test_latent_stats_equal_direct_computation_and_are_cached(vae_run):
    params = AUTOENCODERS.get("conv_vae").Params(type="conv_vae", run=str(vae_run), stats_samples=30)
    ae = AUTOENCODERS.build(params)
    ck = vae_run / "checkpoints" / "step_00000003"
    raw = json.loads((ck / "spec.resolved.json").read_text())
    from registry.kinds import DATASETS

    data = DATASETS.build(DATASETS.get("digits").Params.model_validate(raw["data"]), split="train")
    x = torch.stack([data[i][0] for i in range(30)])
    mean = ae.net.encode_moments(x)[0]                                          # (30, z, 4, 4)
    m = mean.mean(dim=(0, 2, 3))
    s = mean.transpose(0, 1).flatten(1).std(dim=1, unbiased=False)
    got_m, got_s = ae.published_stats()
    assert torch.allclose(torch.tensor(got_m), m, atol=1e-5) and torch.allclose(torch.tensor(got_s), s, atol=1e-5)
    z = ae.encode(x)
    assert torch.allclose(z, (mean - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1), atol=1e-4)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(len(m)), atol=1e-4)
    assert torch.allclose(ae.decode(z), ae.decode_raw(mean), atol=1e-4)
    cache = json.loads((ck / "latent_stats.json").read_text())
    assert cache["step"] == 3 and cache["ema:30"]["mean"] == pytest.approx(got_m)
    cache["ema:30"]["mean"] = [9.0] * len(m)  # the cache is what later builds read
    (ck / "latent_stats.json").write_text(json.dumps(cache))
    assert AUTOENCODERS.build(params).published_stats()[0] == [9.0] * len(m)


# ------------------------------------------------------------------------ for tests/test_zoo_contracts.py
def vae_run_fields(tmp: Path, tag: str) -> dict:
    """Train a 1-step tiny ``tag`` run under ``tmp`` (digits 3 x 16 x 16, or 1-D audio) and return the fields of
    an autoencoder entry that loads it (the contract tests' ``REQUIRED`` row)."""
    spec = "vae_digits.json" if tag == "conv_vae" else "vae_audio.json"
    sets = ["train.steps=1", "train.warmup_steps=0", "train.batch_size=2", "sample.n=2", "eval.at_end=false",
            "log.progress=false", "log.tensorboard=false", f'backbone={{"type": "{tag}", "preset": "tiny"}}']
    sets += (["data.size=16", "data.channels=3", "objective.perceptual_weight=0"] if tag == "conv_vae"
             else ["data.length=8", "data.duration_s=0.5"])
    assert run_cli.main(_argv(spec, tmp / tag, sets)) == 0
    return {"run": str(tmp / tag), "stats_samples": 8}
