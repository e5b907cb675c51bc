"""clip_vae: the 3-D network and its token order, a tiny AE run of the shipped training spec, export and the
frozen loader (round trip, tampered weights, wrong shapes, missing directory), and a flow run on its latent."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import zoo  # noqa: F401
from registry.errors import SpecError
from registry.kinds import AUTOENCODERS, BACKBONES, MODALITIES
from registry.spec import validate
from runtime import run as run_cli
from runtime.export_autoencoder import export, main as export_main
from zoo.autoencoders.clip_vae import CONFIG, WEIGHTS

from tests.helpers import AV_RUN_SETS

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
TINY_AE = ["train.steps=2", "train.warmup_steps=1", "train.batch_size=4", "train.checkpoint_every=2",
           "sample.n=4", "eval.num_samples=6", "log.every=1", "log.progress=false", "log.tensorboard=false",
           "data.length=64", "backbone.channels=[8,8,8]", "backbone.latent_channels=3", "backbone.groups=4"]


def random_export(out: Path, sample_shape: tuple[int, ...] = (1, 2, 8, 8), **backbone: Any) -> Path:
    """An exported ``clip_vae`` directory with random weights (the ``tiny`` preset unless ``backbone`` says
    otherwise) and unit latent statistics, in the layout ``runtime.export_autoencoder`` writes."""
    from zoo.autoencoders.clip_vae import ClipVAENet

    bp = BACKBONES.get("clip_vae").Params.model_validate({"type": "clip_vae", "preset": "tiny", **backbone})
    return write_export(out, bp, ClipVAENet.from_params(bp, sample_shape[0]), sample_shape)


def write_export(out: Path, bp: Any, net: torch.nn.Module, sample_shape: tuple[int, ...]) -> Path:
    """``net``'s weights and a config with unit latent statistics for backbone params ``bp``, in the layout
    ``runtime.export_autoencoder`` writes."""
    from safetensors.torch import save_file
    from storage.safe_state import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out / WEIGHTS))
    z = bp.latent_dim
    (out / CONFIG).write_text(json.dumps({"backbone": bp.model_dump(mode="json"), "sample_shape": list(sample_shape),
                                          "latent_mean": [0.0] * z, "latent_std": [1.0] * z,
                                          "sha256": sha256_file(out / WEIGHTS)}))
    return out


def _run(spec: Path, out: Path, sets: list[str]) -> int:
    argv = [str(spec), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    return run_cli.main(argv)


def test_network_shapes_and_latent_grid_matches_video_modality():
    torch.manual_seed(0)
    p = BACKBONES.get("clip_vae").Params(type="clip_vae", strides=[(2, 2, 2), (2, 1, 1)], channels=[8, 8],
                                         latent_channels=3, groups=4)
    assert p.downsample == (4, 2, 2)
    net = BACKBONES.build(p, token_dim=2 * 16, grid=(2, 3, 4))
    x = torch.rand(2, 2, 8, 6, 8) * 2 - 1
    mean, logvar = net.encode_moments(x)
    assert mean.shape == logvar.shape == (2, 3, 2, 3, 4) and net.decode(mean).shape == x.shape
    mod = MODALITIES.build(MODALITIES.get("video").Params(type="video", patch=(4, 2, 2)), backbone_patch=2,
                           latent_shape=(2, 8, 6, 8))
    assert tuple(mod.grid) == mean.shape[2:] and net.in_channels == 2  # token = latent position (patch = downsample)
    with pytest.raises(ValueError, match="divisible"):
        net.encode_moments(torch.zeros(1, 2, 6, 6, 8))


def test_training_spec_problems():
    raw = json.loads((SPECS / "vae_av_video.json").read_text())
    raw["modality"]["patch"] = [1, 4, 4]
    with pytest.raises(SpecError, match=r"modality\.patch"):
        validate(raw)
    raw["modality"]["patch"], raw["backbone"]["strides"] = [8, 4, 4], [[2, 2, 2], [1, 2, 2], [3, 1, 1]]
    with pytest.raises(SpecError, match=r"backbone\.strides"):
        validate(raw)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("clip_vae")
    assert _run(SPECS / "vae_av_video.json", tmp / "run", TINY_AE) == 0
    assert export_main([str(tmp / "run"), str(tmp / "export"), "--stats-samples", "16"]) == 0
    return tmp / "run", tmp / "export"


@pytest.mark.slow
def test_export_round_trip_and_normalised_latent(exported):
    run, out = exported
    cfg = json.loads((out / CONFIG).read_text())
    assert cfg["sample_shape"] == [1, 8, 16, 16] and len(cfg["latent_mean"]) == 3
    ae = AUTOENCODERS.build(AUTOENCODERS.get("clip_vae").Params(type="clip_vae", path=str(out)))
    from storage.checkpoint import find_checkpoint, load_weights
    _, ema, _ = load_weights(find_checkpoint(run))
    assert all(torch.equal(ae.net.state_dict()[k], v) for k, v in ((k[4:], v) for k, v in ema.items()))
    x = torch.rand(3, 1, 8, 16, 16) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (3, 3, 1, 4, 4)
    raw_mean, _ = ae.moments(x)
    shift = torch.tensor(cfg["latent_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg["latent_std"]).view(1, -1, 1, 1, 1)
    assert torch.allclose(z, (raw_mean - shift) / std, atol=1e-6)
    assert torch.allclose(ae.decode(z), ae.decode_raw(raw_mean), atol=1e-5)
    p = AUTOENCODERS.get("clip_vae").Params(type="clip_vae", path=str(out))
    assert p.latent_shape((1, 8, 16, 16)) == (3, 1, 4, 4) and p.time_stride((1, 8, 16, 16)) == 8
    with pytest.raises(ValueError, match=r"trained on clips \(1, 8, 16, 16\)"):
        p.latent_shape((1, 16, 16, 16))


@pytest.mark.slow
def test_tampered_weights_and_missing_export_are_refused(exported, tmp_path):
    _, out = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG).write_text((out / CONFIG).read_text())
    blob = bytearray((out / WEIGHTS).read_bytes())
    blob[-1] ^= 0xFF
    (bad / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256"):
        AUTOENCODERS.build(AUTOENCODERS.get("clip_vae").Params(type="clip_vae", path=str(bad)))
    with pytest.raises(ValueError, match="runtime.export_autoencoder"):
        AUTOENCODERS.get("clip_vae").Params(type="clip_vae", path=str(tmp_path / "nowhere"))
    cfg = json.loads((out / CONFIG).read_text())
    del cfg["latent_std"]
    (bad / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="latent_std"):
        AUTOENCODERS.get("clip_vae").Params(type="clip_vae", path=str(bad))


@pytest.mark.slow
def test_export_refuses_other_runs(tmp_path):
    from tests.helpers import tiny_spec_dict
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(tiny_spec_dict()))
    assert _run(spec, tmp_path / "run", ["train.steps=2", "train.checkpoint_every=2"]) == 0
    with pytest.raises(ValueError, match="exportable: clip_vae, sprite_vae"):
        export(tmp_path / "run", tmp_path / "out")


@pytest.mark.slow
def test_flow_run_on_the_exported_latent(exported, tmp_path):
    _, out = exported
    sets = AV_RUN_SETS + [f'autoencoder.parts.video={{"type": "clip_vae", "path": "{out}"}}',
                          "modality.video_patch=[1,1,1]", "eval.metrics=[]"]
    assert _run(SPECS / "selfflow_av.json", tmp_path / "flow", sets) == 0
    resolved = json.loads(next((tmp_path / "flow" / "checkpoints").glob("*/spec.resolved.json")).read_text())
    assert resolved["autoencoder"]["parts"]["video"]["path"] == str(out)
    assert list((tmp_path / "flow" / "samples").glob("*/*.mp4"))
