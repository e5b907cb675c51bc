"""sprite_vae: one sprite per clip by construction, the translation convention, the spec's problems, and a tiny
AE run -> export -> frozen loader -> flow run on its latent."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zoo  # noqa: F401
from registry.errors import SpecError
from registry.kinds import AUTOENCODERS, BACKBONES
from registry.spec import validate
from runtime import run as run_cli
from runtime.export_autoencoder import main as export_main
from zoo.autoencoders.clip_vae import CONFIG, WEIGHTS
from zoo.autoencoders.sprite_vae import POS_LOGVAR, SpriteVAENet, _translate

from tests.helpers import AV_RUN_SETS
from tests.test_clip_vae import write_export

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
TINY_AE = ["train.steps=2", "train.warmup_steps=1", "train.batch_size=4", "train.checkpoint_every=2",
           "sample.n=4", "eval.num_samples=6", "log.every=1", "log.progress=false", "log.tensorboard=false",
           "data.length=64", "backbone.latent_channels=4", "backbone.width=8", "backbone.depth=1"]


def random_export(out: Path, sample_shape: tuple[int, ...] = (1, 2, 8, 8)) -> Path:
    """An exported ``sprite_vae`` (tiny preset, random weights, unit statistics) in the export layout."""
    bp = BACKBONES.get("sprite_vae").Params.model_validate({"type": "sprite_vae", "preset": "tiny"})
    net = SpriteVAENet(sample_shape[0], sample_shape[-1], bp.latent_channels, bp.width, bp.depth)
    return write_export(out, bp, net, sample_shape)


def test_latent_layout_and_fixed_position_variance():
    torch.manual_seed(0)
    net = SpriteVAENet(1, 16, latent_channels=5, width=8, depth=1)
    x = torch.rand(3, 1, 4, 16, 16) * 2 - 1
    mean, logvar = net.encode_moments(x)
    assert mean.shape == logvar.shape == (3, 7, 4, 1, 1)
    assert torch.equal(mean[:, :5], mean[:, :5, :1].expand(-1, -1, 4, -1, -1))  # one content for the clip
    assert (mean[:, 5:].abs() <= 1).all()                                        # positions inside the frame
    assert torch.equal(logvar[:, 5:], torch.full_like(logvar[:, 5:], POS_LOGVAR))
    assert net.decode(mean).shape == x.shape
    with pytest.raises(ValueError, match="expected"):
        net.encode_moments(torch.zeros(1, 1, 4, 12, 12))


def test_decoder_draws_one_sprite_and_moves_it_by_the_position():
    torch.manual_seed(0)
    net = SpriteVAENet(1, 16, latent_channels=6, width=8, depth=1)
    z = torch.randn(2, 8, 3, 1, 1)
    z[:, 6:] = 0.0
    z[:, 6, 1] = 2.0 / 16          # frame 1: one pixel to the right (x)
    z[:, 7, 2] = -4.0 / 16         # frame 2: two pixels up (y)
    out = net.decode(z)
    same = z.clone()
    same[:, :6] = z[:, :6].mean(2, keepdim=True)  # the content the decoder uses: the mean over frames
    assert torch.allclose(out, net.decode(same), atol=1e-6)
    f0, f1, f2 = out[:, 0, 0], out[:, 0, 1], out[:, 0, 2]
    # interior pixels: an exact whole-pixel translation of frame 0 (bilinear at integer offsets)
    assert torch.allclose(f1[:, 2:-2, 3:-2], f0[:, 2:-2, 2:-3], atol=1e-5)
    assert torch.allclose(f2[:, 2:-4, 2:-2], f0[:, 4:-2, 2:-2], atol=1e-5)
    assert not torch.allclose(f1, f0, atol=1e-3)  # it did move (the random sprite is not flat)


def test_translate_round_trip():
    img = torch.zeros(1, 1, 16, 16)
    img[0, 0, 5:9, 6:11] = 1.0
    pos = torch.tensor([[4.0 / 16, -2.0 / 16]])   # 2 px right, 1 px up
    moved = _translate(img, -pos, "zeros")         # the decoder's direction: content moves by +pos
    assert torch.equal((moved[0, 0] > 0.5).nonzero().min(0).values, torch.tensor([4, 8]))
    assert torch.allclose(_translate(moved, pos, "zeros"), img, atol=1e-6)  # the encoder's re-centring undoes it


def test_training_spec_problems():
    raw = json.loads((SPECS / "vae_av_sprite.json").read_text())
    raw["modality"]["patch"] = [2, 16, 16]
    with pytest.raises(SpecError, match=r"modality\.patch"):
        validate(raw)
    raw["modality"]["patch"], raw["autoencoder"] = [1, 16, 16], {"type": "waveform"}
    with pytest.raises(SpecError, match=r"autoencoder"):
        validate(raw)


@pytest.mark.slow
def test_run_export_load_and_flow_on_the_latent(tmp_path):
    assert run_cli.main([str(SPECS / "vae_av_sprite.json"), "--out", str(tmp_path / "run"),
                         *[a for s in TINY_AE for a in ("--set", s)]]) == 0
    out = tmp_path / "export"
    assert export_main([str(tmp_path / "run"), str(out), "--stats-samples", "16"]) == 0
    cfg = json.loads((out / CONFIG).read_text())
    assert cfg["format"] == "sprite_vae-export-1" and len(cfg["latent_mean"]) == 4 + 2
    p = AUTOENCODERS.get("sprite_vae").Params(type="sprite_vae", path=str(out))
    assert p.latent_shape((1, 8, 16, 16)) == (6, 8, 1, 1) and p.time_stride((1, 8, 16, 16)) == 1
    ae = AUTOENCODERS.build(p)
    x = torch.rand(2, 1, 8, 16, 16) * 2 - 1
    raw_mean, _ = ae.moments(x)
    assert torch.allclose(ae.decode(ae.encode(x)), ae.decode_raw(raw_mean), atol=1e-5)
    blob = bytearray((out / WEIGHTS).read_bytes())
    blob[-1] ^= 0xFF
    (out / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256"):
        AUTOENCODERS.build(p)
    (out / WEIGHTS).write_bytes(bytes(blob[:-1] + bytearray([blob[-1] ^ 0xFF])))
    sets = AV_RUN_SETS + [f'autoencoder.parts.video={{"type": "sprite_vae", "path": "{out}"}}',
                          "modality.video_patch=[1,1,1]", "eval.metrics=[]"]
    assert run_cli.main([str(SPECS / "selfflow_av.json"), "--out", str(tmp_path / "flow"),
                         *[a for s in sets for a in ("--set", s)]]) == 0
    assert list((tmp_path / "flow" / "samples").glob("*/*.mp4"))


def test_shipped_weights_reconstruct_the_main_jobs_clips():
    """The main job's video autoencoder (weights/sprite_vae_av16, made by specs/vae_av_sprite.json and
    runtime.export_autoencoder) loads with its hash checked and reconstructs held-out clips of the main job's
    data sharply; its position channels follow the glyph (a 1-pixel shift of the clip moves them by ~2 / 16)."""
    from registry.kinds import DATASETS
    from zoo.autoencoders.conv_vae import FrozenVAE

    raw = json.loads((SPECS / "selfflow_av.json").read_text())
    part = raw["autoencoder"]["parts"]["video"]
    assert part == {"type": "sprite_vae", "path": "weights/sprite_vae_av16"}
    ae = AUTOENCODERS.build(AUTOENCODERS.get("sprite_vae").Params(type="sprite_vae", path=str(ROOT / part["path"])))
    assert isinstance(ae, FrozenVAE)
    data = DATASETS.build(DATASETS.get("bouncing_digits_av").Params.model_validate({**raw["data"], "streams": ["video"]}),
                          split="eval")
    x = torch.stack([data[i][0] for i in range(16)])
    rec = ae.decode(ae.encode(x)).clamp(-1, 1)
    psnr = 10 * torch.log10(4 / (rec - x).square().mean())
    assert psnr > 24.0, psnr
    z = ae.moments(x)[0]
    shifted = ae.moments(torch.roll(x, 1, dims=-1))[0]  # the glyph one pixel to the right (the wrap hits background)
    dx = (shifted[:, 16] - z[:, 16]).median()
    assert abs(dx - 2 / 16) < 0.05, dx
