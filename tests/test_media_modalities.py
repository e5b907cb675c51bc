"""Media token layouts (zoo/modalities/media.py), the fixed audio autoencoders (zoo/autoencoders/audio.py,
streams.py), per-modality masks / timesteps / loss weights of the objectives."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zoo  # noqa: F401
from registry.kinds import AUTOENCODERS, DATASETS, MASKS, MODALITIES
from zoo.core.layout import Segment, TokenLayout
from zoo.core.types import StepRNG
from zoo.data.bouncing_av import render_clip
from zoo.metrics.dtmf import burst_onsets, decode_digit
from zoo.objectives.flow_matching import flow_loss
from zoo.objectives.masks import mask_count


def modality(tag, **kw):
    deps = {k: kw.pop(k) for k in ("latent_shape", "time_step_s") if k in kw}
    return MODALITIES.build(MODALITIES.get(tag).Params.model_validate({"type": tag, **kw}), **deps)


def av_modality(video=(1, 8, 8, 8), audio=(10, 13), vp=(2, 4, 4), ap=3, steps=None):
    return modality("audio_video", video_patch=vp, audio_patch=ap, latent_shape={"video": video, "audio": audio},
                    time_step_s=steps or {"video": 1 / 8, "audio": 0.02})


# ------------------------------------------------------------------------------------------ round trips
@settings(deadline=None, max_examples=25)
@given(st.integers(1, 3), st.sampled_from([(1, 1, 1), (2, 2, 2), (4, 4, 2), (1, 8, 4)]), st.integers(1, 3))
def test_video_round_trip(c, patch, k):
    shape = (c, 4 * k, 8, 8)
    mod = modality("video", patch=patch, latent_shape=shape, time_step_s=0.125)
    z = torch.randn(2, *shape)
    tok = mod.to_tokens(z)
    assert tok.shape == (2, math.prod(mod.grid), c * math.prod(patch))
    assert torch.equal(mod.from_tokens(tok), z)


def test_video_token_order_is_documented():
    mod = modality("video", patch=(2, 2, 2), latent_shape=(3, 4, 4, 6))
    z = torch.randn(1, 3, 4, 4, 6)
    tok = mod.to_tokens(z)
    (t, h, w), (pt, ph, pw), C = mod.grid, (2, 2, 2), 3
    for (i, j, k, dt, dh, dw, c) in [(1, 0, 2, 1, 0, 1, 2), (0, 1, 1, 0, 1, 0, 0)]:
        assert tok[0, (i * h + j) * w + k, ((dt * ph + dh) * pw + dw) * C + c] == z[0, c, i * pt + dt, j * ph + dh, k * pw + dw]


@settings(deadline=None, max_examples=25)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 7))
def test_audio_round_trip_with_padding(c, length, patch):
    mod = modality("audio", patch=patch, latent_shape=(c, length), time_step_s=0.01)
    z = torch.randn(3, c, length)
    tok = mod.to_tokens(z)
    assert tok.shape == (3, math.ceil(length / patch), c * patch)
    assert torch.equal(mod.from_tokens(tok), z)


def test_joint_round_trip_and_padding():
    mod = av_modality()
    z = {"video": torch.randn(2, 1, 8, 8, 8), "audio": torch.randn(2, 10, 13)}
    tok = mod.to_tokens(z)
    lay = mod.layout
    assert lay.names == ("video", "audio") and tok.shape == (2, lay.num_tokens, lay.token_dim)
    v, a = lay.segment("video"), lay.segment("audio")
    assert (v.length, v.token_dim, a.length, a.token_dim) == (4 * 2 * 2, 32, 5, 30)
    assert (tok[:, a.tokens, a.token_dim:] == 0).all()
    back = mod.from_tokens(tok)
    assert all(torch.equal(back[k], z[k]) for k in z)


def test_joint_media_round_trip_through_stft():
    """media -> latents -> tokens -> latents -> media is the identity for the joint layout."""
    ae = AUTOENCODERS.build(AUTOENCODERS.get("streams").Params.model_validate(
        {"type": "streams", "parts": {"video": {"type": "identity"}, "audio": {"type": "stft", "n_fft": 32}}}))
    x = {"video": torch.rand(2, 1, 4, 8, 8) * 2 - 1, "audio": torch.rand(2, 1, 256) * 2 - 1}
    shapes = ae.params.latent_shape({"video": (1, 4, 8, 8), "audio": (1, 256)})
    assert shapes == {"video": (1, 4, 8, 8), "audio": (34, 33)}
    mod = av_modality(video=shapes["video"], audio=shapes["audio"], vp=(1, 4, 4), ap=4)
    out = ae.decode(mod.from_tokens(mod.to_tokens(ae.encode(x))))
    assert torch.equal(out["video"], x["video"])
    assert torch.allclose(out["audio"], x["audio"], atol=1e-5)


def test_shared_time_coordinates():
    """A video frame and the audio at the same instant get the same time coordinate (seconds)."""
    fps, sr, hop = 8, 4000, 50
    mod = av_modality(video=(1, 16, 8, 8), audio=(10, 161), vp=(1, 4, 4), ap=1,
                      steps={"video": 1 / fps, "audio": hop / sr})
    lay = mod.layout
    v, a = lay.coords[lay.segment("video").tokens], lay.coords[lay.segment("audio").tokens]
    assert torch.allclose(v[:4, 0], torch.zeros(4)) and v[4, 0] == pytest.approx(1 / fps)
    assert (a[:, 1:] == 0).all()
    for frame in (0, 3, 15):  # audio frame j is centred at j * hop / sr seconds
        j = round(frame / fps * sr / hop)
        assert a[j, 0].item() == pytest.approx(v[frame * 4, 0].item(), abs=1e-6)


def test_patch_errors_name_the_axis():
    with pytest.raises(ValueError, match="height 8 is not divisible by patch 3"):
        modality("video", patch=(1, 3, 3), latent_shape=(1, 4, 8, 8))
    with pytest.raises(ValueError, match="video and audio"):
        modality("audio_video", latent_shape=(1, 4, 8, 8))


# --------------------------------------------------------------------------------------- autoencoders
@pytest.mark.parametrize("n_fft,hop,power", [(64, None, 1.0), (64, 32, 0.5), (128, 16, 0.3)])
def test_stft_is_invertible(n_fft, hop, power):
    ae = AUTOENCODERS.build(AUTOENCODERS.get("stft").Params(type="stft", n_fft=n_fft, hop=hop, scale=2.0, power=power))
    length = 40 * ae.hop
    x = torch.rand(3, 1, length) * 2 - 1
    z = ae.encode(x)
    assert tuple(z.shape[1:]) == ae.params.latent_shape((1, length)) == (n_fft + 2, length // ae.hop + 1)
    assert torch.allclose(ae.decode(z), x, atol=2e-5)
    assert ae.params.time_stride((1, length)) == ae.hop


def test_spectrogram_keeps_magnitude_and_dtmf_tones():
    """Griffin-Lim rebuilds a phase: the decoded clip has the same magnitude spectrogram (to within 10 %), the
    same DTMF digit and the same burst onsets as the clip it came from."""
    data = DATASETS.get("bouncing_digits_av").Params(type="bouncing_digits_av", noise=0.0)
    ae = AUTOENCODERS.build(AUTOENCODERS.get("spectrogram").Params(type="spectrogram", n_fft=128, hop=64, scale=8.0))
    clips = [render_clip(data, i, "train") for i in range(4)]
    x = torch.stack([torch.as_tensor(a["audio"]) for a, _ in clips]).float()       # (4, 1, L)
    z = ae.encode(x)
    assert tuple(z.shape[1:]) == ae.params.latent_shape(tuple(x.shape[1:])) == (65, x.shape[-1] // 64 + 1)
    assert (z >= 0).all()
    y = ae.decode(z)
    assert y.shape == x.shape
    rel = (ae.encode(y) - z).norm() / z.norm()
    assert rel < 0.1, rel
    for (_, label), a, b in zip(clips, x[:, 0].numpy(), y[:, 0].numpy()):
        assert decode_digit(b, data.sample_rate) == label
        assert np.allclose(burst_onsets(b, data.sample_rate), burst_onsets(a, data.sample_rate), atol=0.02)
    assert torch.equal(ae.decode(z), y)  # zero-phase start: deterministic


def test_stft_rejects_bad_lengths_and_hops():
    with pytest.raises(ValueError, match="multiple of hop"):
        AUTOENCODERS.get("stft").Params(type="stft", n_fft=64).latent_shape((1, 1001))
    with pytest.raises(Exception, match="invertible"):
        AUTOENCODERS.get("stft").Params(type="stft", n_fft=64, hop=40)


def test_streams_autoencoder_checks_streams():
    p = AUTOENCODERS.get("streams").Params.model_validate({"type": "streams", "parts": {"video": {"type": "identity"}}})
    with pytest.raises(ValueError, match="do not match"):
        p.latent_shape({"video": (1, 4, 8, 8), "audio": (1, 100)})


# -------------------------------------------------------------------------------- per-modality masks
def layout_of(n_video, n_audio, p=4):
    return TokenLayout((Segment("video", 0, n_video, p, (n_video,)), Segment("audio", n_video, n_audio, p, (n_audio,))),
                       torch.zeros(n_video + n_audio, 3))


def build_mask(tag, layout, **kw):
    return MASKS.build(MASKS.get(tag).Params.model_validate({"type": tag, **kw}), grid=(layout.num_tokens,), layout=layout)


def test_bernoulli_rate_per_modality():
    lay = layout_of(200, 100)
    m = build_mask("bernoulli", lay).sample(StepRNG(0, 0, 0, 0, 400, 400), lay.num_tokens)  # paper defaults
    vid, aud = m[:, :200].float().mean().item(), m[:, 200:].float().mean().item()
    assert abs(vid - 0.1) < 5 * math.sqrt(0.09 / 80000) and abs(aud - 0.5) < 5 * math.sqrt(0.25 / 40000)


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 60), st.integers(1, 60), st.floats(0, 1), st.floats(0, 1), st.integers(1, 5), st.integers(0, 999))
def test_exact_count_per_modality(nv, na, rv, ra, b, seed):
    lay = layout_of(nv, na)
    m = build_mask("exact_count", lay, ratio={"video": rv, "audio": ra}).sample(StepRNG(seed, 0, 0, 0, b, b), nv + na)
    assert (m[:, :nv].sum(1) == mask_count(rv, nv)).all() and (m[:, nv:].sum(1) == mask_count(ra, na)).all()


def test_mask_ratio_must_name_every_modality():
    with pytest.raises(KeyError, match="audio"):
        build_mask("bernoulli", layout_of(4, 4), ratio={"video": 0.1}).sample(StepRNG(0, 0, 0, 0, 2, 2), 8)
    with pytest.raises(Exception, match="0.5"):
        MASKS.get("bernoulli").Params.model_validate({"type": "bernoulli", "ratio": {"audio": 0.7}})


# ------------------------------------------------------------------------------------ loss weighting
def test_flow_loss_per_modality_ignores_padding():
    lay = TokenLayout((Segment("video", 0, 3, 4, (3,)), Segment("audio", 3, 2, 2, (2,))), torch.zeros(5, 3))
    pred, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    loss, parts = flow_loss(pred, target, lay, {"audio": 0.5})
    v = (pred[:, :3] - target[:, :3]).square().mean()
    a = (pred[:, 3:, :2] - target[:, 3:, :2]).square().mean()
    assert torch.allclose(loss, v + 0.5 * a) and torch.allclose(parts["loss_flow_audio"], a)
    target2 = target.clone()
    target2[:, 3:, 2:] += 100.0  # padding channels carry no loss
    assert torch.equal(flow_loss(pred, target2, lay, {"audio": 0.5})[0], loss)


@pytest.mark.parametrize("per_modality", [False, True])
def test_selfflow_timesteps_shared_or_per_modality(per_modality, monkeypatch):
    from zoo.objectives.selfflow import SelfFlow, SelfFlowParams

    lay = layout_of(6, 5)
    seen = {}

    class Net(torch.nn.Module):
        null_label, depth, hidden = 3, 4, 8

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 8)

        def forward(self, x, t, y, taps=(), stop_after=None, attn_mask=None):
            from zoo.core.time import token_times
            from zoo.core.types import BackboneOut
            seen.setdefault("t", token_times(t))
            h = self.lin(x)
            return BackboneOut(None if stop_after else x * 0 + h.sum(-1, keepdim=True), {k: h for k in taps})

    obj = SelfFlow(SelfFlowParams(type="selfflow", timesteps_per_modality=per_modality,
                                  mask={"type": "bernoulli", "ratio": {"video": 0.5, "audio": 0.5}}),
                   hidden=8, depth=4, layout=lay)
    from zoo.core.types import StepContext, TokenBatch
    net = Net()
    obj(net, TokenBatch(torch.randn(64, 11, 4)), StepContext(0, StepRNG(0, 0, 0, 0, 64, 64), ema=Net()))
    tau = seen["t"]                                           # (B, N): each token at t or s
    assert all(tau[b, :6].unique().numel() <= 2 and tau[b, 6:].unique().numel() <= 2 for b in range(64))
    shared = torch.tensor([tau[b].unique().numel() <= 2 for b in range(64)])  # one (t, s) pair for the whole sample
    assert shared.all() if not per_modality else not shared.all()


# ---------------------------------------------------------------------------------- REPA on video
def _repa_raw(spec_name: str) -> dict:
    import json
    from tests.helpers import SPECS

    raw = json.loads((SPECS / spec_name).read_text())
    raw["teachers"] = {"digits": {"type": "classifier"}}
    raw["objective"] = {"type": "repa"}
    return raw


def test_repa_aligns_video_frame_by_frame():
    from zoo.objectives.repa import REPA, REPAParams

    lay = TokenLayout((Segment("video", 0, 8, 16, (2, 2, 2)),), torch.zeros(8, 3))
    tp = {"t": type("TP", (), {"feature_dim": 5})()}
    obj = REPA(REPAParams(type="repa", encoders=["t"], align_depth=1), hidden=8, depth=2, teacher_params=tp, layout=lay)
    video = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(2, 1, 4, 4, 4)     # frame k holds the value k
    frames = obj.frames({"video": video, "audio": torch.zeros(2, 1, 10)})
    assert frames.shape == (4, 1, 4, 4) and obj.grid == (2, 2)
    assert frames[:, 0, 0, 0].tolist() == [1.0, 3.0, 1.0, 3.0]              # centre frame of each token time step


@pytest.mark.slow  # trains through the CLI
def test_repa_refuses_audio_only_and_runs_on_audio_video(tmp_path):
    import json

    from registry.errors import SpecError
    from registry.spec import validate
    from runtime import run as run_cli
    from runtime.tracking import read_jsonl

    with pytest.raises(SpecError, match="no encoder is registered for the audio tokens"):
        validate(_repa_raw("selfflow_audio.json"))
    spec = tmp_path / "repa_av.json"
    spec.write_text(json.dumps(_repa_raw("selfflow_av.json")))
    sets = ["train.steps=2", "train.warmup_steps=1", "train.batch_size=4", "eval.at_end=false", "log.every=1",
            "log.progress=false", "sample.n=2", "solver.steps=2", "backbone.hidden=32", "data.length=32"]
    argv = [str(spec), "--out", str(tmp_path / "run")] + [a for s in sets for a in ("--set", s)]
    assert run_cli.main(argv) == 0
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(0 < r["loss_rep"] < 2 and math.isfinite(r["loss"]) for r in rows)


def test_audio_video_spec_with_a_bad_hop_names_the_audio_part():
    """A clip length the audio autoencoder cannot take is one spec error at its JSON path, not a traceback."""
    import json
    from pathlib import Path

    from registry.errors import SpecError
    from registry.spec import validate

    raw = json.loads((Path(__file__).resolve().parent.parent / "specs" / "selfflow_av.json").read_text())
    raw["autoencoder"]["parts"]["audio"]["hop"] = 48
    with pytest.raises(SpecError) as err:
        validate(raw)
    assert "autoencoder.parts.audio" in str(err.value) and "not a multiple of hop 48" in str(err.value)


def test_image_spec_with_an_audio_autoencoder_is_one_spec_error():
    """The image modality and the autoencoder both notice the wrong input; the user reads it once, at its path."""
    import json
    from pathlib import Path

    from registry.errors import SpecError
    from registry.spec import validate

    raw = json.loads((Path(__file__).resolve().parent.parent / "specs" / "fm_digits_tiny.json").read_text())
    raw["autoencoder"] = {"type": "stft"}
    with pytest.raises(SpecError) as err:
        validate(raw)
    lines = [ln for ln in str(err.value).splitlines() if "takes mono audio" in ln]
    assert lines == ["autoencoder: autoencoder 'stft' takes mono audio (1, L); the data give (1, 16, 16)"]
