"""The main job ``specs/selfflow_av.json`` end to end for a few steps (``--set``): the run directory holds MP4
files with one video and one audio stream and a poster each, WAV files, a GIF preview, a contact sheet, real
clips of the same labels, per-clip readings, run facts, tensorboard audio/GIF summaries, metrics beside their
real-data ceiling, and a report.html that plays the clips."""
from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runtime import run as run_cli
from runtime.tracking import read_jsonl
from tests.helpers import AV_RUN_SETS

ROOT = Path(__file__).resolve().parent.parent
SETS = AV_RUN_SETS  # the av_run fixture (tests/conftest.py) runs specs/selfflow_av.json with these


@pytest.mark.slow  # trains through the CLI
def test_av_run_writes_playable_clips(av_run):
    spec = json.loads((av_run / "spec.resolved.json").read_text())
    clips = sorted((av_run / "samples" / "step_00000003").glob("*.mp4"))
    assert len(clips) == 4 and len(list(clips[0].parent.glob("*.wav"))) == 4
    duration = spec["data"]["duration_s"]
    with av.open(str(clips[0])) as c:
        assert [s.type for s in c.streams] in (["video", "audio"], ["audio", "video"])
        v = c.streams.video[0]
        assert float(v.duration * v.time_base) == pytest.approx(duration, abs=1 / spec["data"]["fps"])
        a = c.streams.audio[0]
        assert float(a.duration * a.time_base) == pytest.approx(duration, abs=0.1)
    assert (av_run / "samples" / "step_00000003.gif").is_file() and (av_run / "samples" / "step_00000003.png").is_file()


@pytest.mark.slow  # trains through the CLI
def test_av_run_writes_posters_real_clips_readings_and_facts(av_run):
    gen, real = av_run / "samples" / "step_00000003", av_run / "samples" / "real"
    assert sorted(p.stem for p in gen.glob("*.png")) == sorted(p.stem for p in gen.glob("*.mp4"))
    assert sorted(p.name for p in real.glob("*.mp4")) == sorted(p.name for p in gen.glob("*.mp4"))  # same labels
    assert len(list(real.glob("*.png"))) == len(list(real.glob("*.wav"))) == 4
    for folder in (gen, real):
        clips = json.loads((folder / "clips.json").read_text())["clips"]
        assert [c["file"] for c in clips] == sorted(p.stem for p in folder.glob("*.mp4"))
        assert all({"video_digit", "audio_digit", "sync_ms", "consistent", "frame_digits"} <= set(c) for c in clips)
    real_clips = json.loads((real / "clips.json").read_text())["clips"]
    assert all(c["video_digit"] == c["label"] == c["audio_digit"] for c in real_clips)
    facts = json.loads((av_run / "run_facts.json").read_text())
    assert facts["steps"] == 3 and facts["device"] == "cpu" and facts["parameters"] > 0 and facts["wall_s"] > 0
    assert facts["started"] <= facts["finished"]


@pytest.mark.slow  # trains through the CLI
def test_av_run_metrics_and_ceiling(av_run):
    rows = [r for r in read_jsonl(av_run / "metrics.jsonl") if any(k.startswith("real/") for k in r)]
    assert rows, "no evaluation row"
    for m in ("av_agreement", "av_sync_ms", "video_class_accuracy", "audio_class_accuracy", "video_consistency"):
        assert f"eval/{m}" in rows[-1] and f"real/{m}" in rows[-1]
    assert rows[-1]["real/av_agreement"] >= 0.8 and rows[-1]["real/audio_class_accuracy"] >= 0.8
    losses = [r for r in read_jsonl(av_run / "metrics.jsonl") if "loss" in r]
    assert all("loss_flow_video" in r and "loss_flow_audio" in r and "loss_rep" in r for r in losses)


@pytest.mark.slow  # trains through the CLI
def test_av_run_report_and_tensorboard(av_run):
    page = (av_run / "report.html").read_text()
    assert page.count("<video") == 8 and "samples/step_00000003/000_label0.mp4" in page  # generated + real
    assert 'poster="samples/step_00000003/000_label0.png"' in page and "samples/real/000_label0.mp4" in page
    assert "real data (ceiling)" in page and "av_agreement" in page and "step_00000003.gif" in page
    assert (av_run / "report" / "losses.png").is_file()
    acc = EventAccumulator(str(av_run / "tb"), size_guidance={"audio": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "samples/preview" in tags["images"] and "samples/contact_sheet" in tags["images"]
    assert any(t.startswith("samples/audio_") for t in tags["audio"])
    gif = acc.Images("samples/preview")[-1].encoded_image_string
    assert gif[:6] in (b"GIF87a", b"GIF89a")


@pytest.mark.parametrize("name,kind", [("selfflow_video.json", ".mp4"), ("selfflow_audio.json", ".wav"),
                                       ("fm_av.json", ".mp4")])
@pytest.mark.slow  # trains through the CLI
def test_other_media_specs_run(tmp_path, name, kind):
    """The one-stream specs (video only, audio only) and the vanilla baseline run end to end and write media."""
    out = tmp_path / "run"
    argv = [str(ROOT / "specs" / name), "--out", str(out)]
    for s in SETS + ["eval.num_samples=4"]:
        argv += ["--set", s]
    assert run_cli.main(argv) == 0
    clips = sorted((out / "samples" / "step_00000003").glob(f"*{kind}"))
    assert len(clips) == 4 and (out / "samples" / "step_00000003.png").is_file()
    assert (out / "report.html").is_file()


@pytest.mark.slow  # trains through the CLI
def test_unnormalised_latents_are_reported_before_training(tmp_path, capsys):
    """A latent scale far off (here the spectrogram's scale x 100) is said on stderr before step 1; the run goes on."""
    argv = [str(ROOT / "specs" / "selfflow_audio.json"), "--out", str(tmp_path / "run"), "--set", "autoencoder.scale=800",
            "--set", "eval.at_end=false"]
    for s in SETS:
        argv += ["--set", s]
    assert run_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: latents look unnormalised" in err and "autoencoder.scale/shift" in err
