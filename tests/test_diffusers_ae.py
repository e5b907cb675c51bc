"""The ``diffusers`` autoencoder: tiny AutoencoderKL / AutoencoderKLWan / AutoencoderOobleck models built here,
saved, loaded through spec params, and compared with the directly constructed model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import zoo  # noqa: E402,F401
from registry.errors import SpecError  # noqa: E402
from registry.kinds import AUTOENCODERS  # noqa: E402
from registry.spec import validate  # noqa: E402
from PIL import Image  # noqa: E402

from runtime import run as run_cli  # noqa: E402
from runtime.compiler import compile_spec  # noqa: E402
from runtime.tracking import read_jsonl  # noqa: E402
from tests.helpers import load_raw, tiny_spec_dict  # noqa: E402

WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, 0.0], [0.5, 2.0, 1.5, 1.0]


def tiny_kl(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                   norm_num_groups=4, **kw).eval()


def tiny_wan() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[True, True], latents_mean=WAN_MEAN,
                                      latents_std=WAN_STD).eval()


def tiny_oobleck() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=[2, 4], channel_multiples=[1, 2],
                                        decoder_channels=8, decoder_input_channels=4, audio_channels=2,
                                        sampling_rate=8000).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """class name -> (directly constructed model, save_pretrained directory)."""
    root = tmp_path_factory.mktemp("vaes")
    out = {}
    for name, make in (("AutoencoderKL", lambda: tiny_kl(scaling_factor=0.5, shift_factor=0.1)),
                       ("AutoencoderKLWan", tiny_wan), ("AutoencoderOobleck", tiny_oobleck)):
        model = make()
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out


def build(**fields):
    params = AUTOENCODERS.get("diffusers").Params.model_validate({"type": "diffusers", **fields})
    return params, AUTOENCODERS.build(params).eval()


def test_kl_matches_the_direct_model(saved):
    vae, path = saved["AutoencoderKL"]
    params, ae = build(path=str(path))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = ae.encode(x)
    assert tuple(z.shape[1:]) == params.latent_shape((3, 16, 16)) == (4, 8, 8) and z.dtype == torch.float32
    with torch.no_grad():
        ref = (vae.encode(x).latent_dist.mean - 0.1) * 0.5      # the config's shift_factor / scaling_factor
        assert torch.allclose(z, ref, atol=1e-5)
        assert torch.allclose(ae.decode(z), vae.decode(z / 0.5 + 0.1).sample, atol=1e-5)
    assert ae.decode(z).shape == x.shape
    mean, logvar = ae.moments(x)
    assert torch.allclose((mean - 0.1) * 0.5, z, atol=1e-6) and logvar.shape == mean.shape
    assert torch.allclose(ae.decode_raw(mean), ae.decode(z), atol=1e-5)
    shift, std = ae.published_stats()
    assert shift == pytest.approx(0.1) and std == pytest.approx(2.0)
    assert params.time_stride((3, 16, 16)) == 1


def test_kl_posterior_sample_and_explicit_per_channel_stats(saved):
    vae, path = saved["AutoencoderKL"]
    scale, shift = [1.0, 2.0, 0.5, 4.0], [0.0, 0.1, -0.1, 0.2]
    _, ae = build(path=str(path), scale=scale, shift=shift, sample_posterior=True)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.manual_seed(3)
    z = ae.encode(x)
    mean, logvar = ae.moments(x)
    torch.manual_seed(3)
    eps = torch.randn_like(mean)
    s, m = torch.tensor(scale).view(1, 4, 1, 1), torch.tensor(shift).view(1, 4, 1, 1)
    assert torch.allclose(z, (mean + torch.exp(0.5 * logvar) * eps - m) * s, atol=1e-5)
    assert not torch.allclose(z, (mean - m) * s, atol=1e-3)          # a sample, not the mean
    assert ae.published_stats()[1] == pytest.approx([1 / v for v in scale])


def test_wan_video_shapes_stats_and_outputs(saved):
    vae, path = saved["AutoencoderKLWan"]
    params, ae = build(class_name="AutoencoderKLWan", path=str(path))
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = ae.encode(x)
    assert tuple(z.shape[1:]) == params.latent_shape((3, 5, 16, 16)) == (4, 2, 4, 4)
    assert params.latent_shape((3, 9, 8, 8)) == (4, 3, 2, 2) and params.time_stride((3, 9, 8, 8)) == 4
    m, s = torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1), torch.tensor(WAN_STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        ref = (vae.encode(x).latent_dist.mean - m) / s                # per-channel mean/std from the config
        assert torch.allclose(z, ref, atol=1e-5)
        assert torch.allclose(ae.decode(z), vae.decode(z * s + m).sample, atol=1e-5)
    assert ae.decode(z).shape == x.shape
    shift, std = ae.published_stats()
    assert shift == pytest.approx(WAN_MEAN) and std == pytest.approx(WAN_STD)


def test_oobleck_mono_data_on_a_stereo_model(saved):
    vae, path = saved["AutoencoderOobleck"]
    params, ae = build(class_name="AutoencoderOobleck", path=str(path))
    x = torch.rand(2, 1, 64) * 2 - 1
    z = ae.encode(x)
    assert tuple(z.shape[1:]) == params.latent_shape((1, 64)) == (4, 8) and params.time_stride((1, 64)) == 8
    with torch.no_grad():
        dist = vae.encode(x.repeat(1, 2, 1)).latent_dist              # mono duplicated on both channels
        assert torch.allclose(z, dist.mean, atol=1e-5)                # Oobleck: shift 0, scale 1
        assert torch.allclose(ae.moments(x)[1], torch.log(dist.std ** 2), atol=1e-5)
        stereo = vae.decode(z).sample
        assert stereo.shape == (2, 2, 64)
        assert torch.allclose(ae.decode(z), stereo.mean(dim=1, keepdim=True), atol=1e-5)
    assert ae.published_stats() == (0.0, 1.0)
    with pytest.raises(ValueError, match="not a multiple of the hop 8"):
        params.latent_shape((1, 60))


def test_single_safetensors_file_with_a_config(saved, tmp_path):
    vae, path = saved["AutoencoderKL"]
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    _, ref = build(path=str(path))
    _, beside = build(path=str(path / "diffusion_pytorch_model.safetensors"))   # config.json beside the file
    elsewhere = tmp_path / "weights" / "vae.safetensors"
    elsewhere.parent.mkdir()
    shutil.copy(path / "diffusion_pytorch_model.safetensors", elsewhere)
    shutil.copy(path / "config.json", tmp_path / "kl.json")
    _, named = build(path=str(elsewhere), config=str(tmp_path / "kl.json"))
    for ae in (beside, named):
        assert torch.equal(ae.encode(x), ref.encode(x))
    with pytest.raises(FileNotFoundError, match="config.json"):
        build(path=str(elsewhere))                                   # no config beside it


def test_missing_paths_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained.*config.json.*diffusion_pytorch_model"):
        build(path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope.safetensors not found"):
        build(path=str(tmp_path / "nope.safetensors"))


def test_wrong_latent_channels_and_downsample_name_both(saved):
    _, path = saved["AutoencoderKL"]
    with pytest.raises(ValueError, match=r"latent_channels: the spec says 16 but .* gives 4"):
        build(path=str(path), latent_channels=16)
    _, ae = build(path=str(path), latent_channels=4, downsample=2)      # matching explicit values are accepted
    assert ae.layout.latent_channels == 4
    raw = tiny_spec_dict(data={"type": "digits", "preset": "tiny", "channels": 3, "size": 16},
                         autoencoder={"type": "diffusers", "path": str(path), "downsample": 8})
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert any(p == "autoencoder.downsample" and "8" in m and "2" in m for p, m in e.value.problems)


def test_strict_weights_name_the_missing_key(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = saved["AutoencoderKL"]
    state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    state.pop("decoder.conv_out.bias")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \[decoder.conv_out.bias\]"):
        build(path=str(tmp_path))


def test_legacy_attention_key_names_load(saved, tmp_path):
    """Old diffusers files (e.g. SD-VAE's) name the VAE attention query/key/value/proj_attn."""
    from safetensors.torch import load_file, save_file
    _, path = saved["AutoencoderKL"]
    names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for k, v in load_file(str(path / "diffusion_pytorch_model.safetensors")).items():
        for new, old in names.items():
            k = k.replace(new, old) if "attentions" in k else k
        state[k] = v
    assert any(".proj_attn." in k for k in state)
    save_file(state, str(tmp_path / "old.safetensors"))
    _, old = build(path=str(tmp_path / "old.safetensors"), config=str(path / "config.json"))
    _, ref = build(path=str(path))
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(old.encode(x), ref.encode(x))


def test_wan_temporal_field_and_layout_without_a_config(saved, tmp_path):
    _, path = saved["AutoencoderKLWan"]
    with pytest.raises(ValueError, match=r"temporal_downsample: the spec says 2 but .* gives 4"):
        build(class_name="AutoencoderKLWan", path=str(path), temporal_downsample=2)
    with pytest.raises(ValueError, match="AutoencoderKLWan only"):
        build(path=str(path), temporal_downsample=4)
    params = AUTOENCODERS.get("diffusers").Params.model_validate(
        {"type": "diffusers", "class_name": "AutoencoderKLWan", "path": str(tmp_path / "absent")})
    assert params.latent_shape((3, 17, 64, 64)) == (16, 5, 8, 8)        # Wan2.1's layout until the files exist
    params = params.model_copy(update={"latent_channels": 48, "downsample": 16})
    assert params.latent_shape((3, 17, 64, 64)) == (48, 5, 4, 4)        # explicit fields (Wan2.2-like)


def test_missing_published_statistics_name_the_field(saved, tmp_path):
    _, path = saved["AutoencoderKLWan"]
    shutil.copytree(path, tmp_path / "wan")
    cfg = json.loads((tmp_path / "wan" / "config.json").read_text())
    del cfg["latents_mean"]
    (tmp_path / "wan" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="^shift: .* has no latents_mean; set it in the spec"):
        build(class_name="AutoencoderKLWan", path=str(tmp_path / "wan"))
    _, ae = build(class_name="AutoencoderKLWan", path=str(tmp_path / "wan"), shift=0.0)
    assert ae.published_stats()[0] == 0.0
    with pytest.raises(ValueError, match="^scale: the spec gives 3 values for 4 latent channels"):
        build(class_name="AutoencoderKLWan", path=str(tmp_path / "wan"), shift=0.0, scale=[1.0, 1.0, 1.0])


def _av_spec(path: Path, cls: str, **data) -> dict:
    return tiny_spec_dict(modality={"type": "video" if "video" in data["streams"] else "audio"},
                          data={"type": "bouncing_digits_av", "size": 16, "fps": 8, **data},
                          autoencoder={"type": "diffusers", "class_name": cls, "path": str(path)},
                          backbone={"type": "sit", "preset": "tiny", "patch": 1})


def test_spec_problems_point_at_the_data_field(saved):
    _, wan = saved["AutoencoderKLWan"]
    with pytest.raises(SpecError) as e:                                  # 8 frames: T - 1 = 7
        validate(_av_spec(wan, "AutoencoderKLWan", streams=["video"], channels=3, duration_s=1.0))
    assert any(p == "data.duration_s" and "T - 1 must be a multiple of 4" in m for p, m in e.value.problems)
    with pytest.raises(SpecError) as e:
        validate(_av_spec(wan, "AutoencoderKLWan", streams=["video"], channels=1, duration_s=1.125))
    assert any(p == "data.channels" and "3-channel" in m for p, m in e.value.problems)
    _, oob = saved["AutoencoderOobleck"]
    with pytest.raises(SpecError) as e:
        validate(_av_spec(oob, "AutoencoderOobleck", streams=["audio"], sample_rate=4000, duration_s=0.5))
    assert any(p == "data.sample_rate" and "8000 Hz" in m for p, m in e.value.problems)


def test_imagenet_specs_still_validate_without_the_weights():
    for name in ("fm_imagenet256_xl2.json", "repa_imagenet256_xl2.json", "selfflow_imagenet256_xl2.json"):
        spec = validate(load_raw(name))
        if spec.autoencoder.type == "diffusers":
            assert spec.autoencoder.latent_shape(spec.data.sample_shape()) == (4, 32, 32)


@pytest.mark.slow  # trains through the CLI
def test_pixel_spec_moves_to_a_diffusers_latent_space_by_its_autoencoder(saved, tmp_path):
    """fm_digits_tiny in RGB pixel space; replacing only `autoencoder` trains in the tiny KL's latent space."""
    raw = load_raw("fm_digits_tiny.json")
    raw["data"].update(size=32, channels=3)
    pixel = validate(raw)
    raw["autoencoder"] = {"type": "diffusers", "class_name": "AutoencoderKL", "path": str(saved["AutoencoderKL"][1])}
    latent = validate(raw)
    assert pixel.autoencoder.latent_shape((3, 32, 32)) == (3, 32, 32)
    assert latent.autoencoder.latent_shape((3, 32, 32)) == (4, 16, 16)
    spec = tmp_path / "latent.json"
    spec.write_text(json.dumps(raw))
    sets = ["train.steps=2", "train.warmup_steps=1", "train.batch_size=4", "train.checkpoint_every=2",
            "sample.n=4", "solver.steps=2", "eval.at_end=false", "log.every=1", "log.progress=false",
            "backbone.hidden=32", "backbone.depth=2", "backbone.heads=2",
            "teachers={}", "eval.metrics=[]"]  # speed only: no digit classifier to train for a teacher/metric
    argv = [str(spec), "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert run_cli.main(argv) == 0
    resolved = json.loads((tmp_path / "run" / "spec.resolved.json").read_text())
    assert resolved["autoencoder"]["type"] == "diffusers"
    assert list((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [1, 2]
    with Image.open(tmp_path / "run" / "samples" / "step_00000002.png") as im:   # decoded through the KL
        assert im.mode == "RGB"
    graph = compile_spec(validate(json.loads(json.dumps(resolved))), torch.device("cpu"), with_ema=False)
    assert graph.latent_shape == (4, 16, 16) and isinstance(graph.autoencoder, AUTOENCODERS.get("diffusers"))
