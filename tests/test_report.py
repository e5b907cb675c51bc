"""``runtime.report`` on a synthetic run directory (no training): run facts, posters, generated clips beside
real ones with what the metrics read in each, the metrics explained, the folded spec, matplotlib charts."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from runtime import report
from runtime.media_out import write_clip_readings, write_samples
from runtime.plots import line_chart, panel_chart

RATES = {"video": 8, "audio": 4000}
SPEC = {"name": "toy_av", "data": {"type": "bouncing_digits_av", "fps": 8, "streams": ["video", "audio"]},
        "backbone": {"type": "mmdit"}, "objective": {"type": "selfflow"},
        "train": {"steps": 4, "seed": 7, "batch_size": 16}}


def _clips(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.rand(n, 1, 8, 16, 16, generator=g) * 2 - 1,
            "audio": (torch.rand(n, 1, 4000, generator=g) * 2 - 1) * 0.5}


def _reading(video: int, audio: int | None, sync: float | None, frames: list[int]) -> dict:
    return {"video_digit": video, "audio_digit": audio, "sync_ms": sync, "frame_digits": frames,
            "consistent": len(set(frames)) == 1, "finite": True}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    run.mkdir()
    (run / "spec.resolved.json").write_text(json.dumps(SPEC, indent=2))
    rows = [{"step": s, "loss": 2.0 / s, "loss_flow": 1.5 / s, "loss_rep": 0.5 / s} for s in (1, 2, 3, 4)]
    ev = {"eval/av_agreement": 0.25, "real/av_agreement": 1.0, "eval/av_sync_ms": float("nan"),
          "real/av_sync_ms": 1.5, "eval/video_consistency": 0.5, "real/video_consistency": 0.96,
          "eval/linear_probe_b2": 0.4, "eval/foo_score": 3.0}
    rows += [{"step": 2, **{k: v / 2 for k, v in ev.items() if k.startswith("eval/")}}, {"step": 4, **ev}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r).replace("NaN", '"nan"') for r in rows) + "\n")
    (run / "eval").mkdir()
    (run / "eval" / "step_00000004.json").write_text(json.dumps(ev).replace("NaN", '"nan"'))
    labels = torch.arange(4)
    gen = write_samples(_clips(4, 0), labels, RATES, run / "samples", "step_00000004", nrow=4)
    real = write_samples(_clips(4, 1), labels, RATES, run / "samples", "real", nrow=4)
    write_clip_readings([_reading(0, 0, 3.2, [0] * 8), _reading(5, None, None, [1, 1, 1, 5, 5, 5, 5, 5]),
                         _reading(2, 7, 300.0, [2] * 8), _reading(3, 3, 10.0, [3] * 8)], gen)
    write_clip_readings([_reading(i, i, 1.0, [i] * 8) for i in range(4)], real)
    (run / "run_facts.json").write_text(json.dumps({
        "started": "2026-11-24T10:00:00+00:00", "finished": "2026-11-24T10:01:05+00:00", "wall_s": 65.0,
        "wall_s_total": 65.0, "device": "cpu", "device_name": "CPU (2 cores)", "world_size": 1,
        "parameters": 2_887_588, "trainable_parameters": 2_953_508, "steps": 4, "skipped_steps": 0}))
    report.write_report(run)
    return run


def test_run_facts_at_the_top(run_dir):
    page = (run_dir / "report.html").read_text()
    facts = page[page.index('<dl class="facts">'):page.index("</dl>")]
    assert page.index('<dl class="facts">') < page.index("<h2>Samples")
    for text in ("2026-11-24 10:01:05+00:00", "CPU (2 cores)", "1 min 5 s", "4 of 4", "2.9M (mmdit)", "selfflow",
                 "<dd>7</dd>", "<dd>16</dd>"):
        assert text in facts, text


def test_posters_and_generated_beside_real_with_readings(run_dir):
    page = (run_dir / "report.html").read_text()
    assert page.count('<div class="pair">') == 4 and page.count("<video") == 8
    for i in range(4):
        for folder in ("step_00000004", "real"):
            stem = f"samples/{folder}/{i:03d}_label{i}"
            assert f'poster="{stem}.png" src="{stem}.mp4"' in page
            assert (run_dir / f"{stem}.png").is_file()
    first = page[page.index('<div class="pair">'):page.index('<div class="pair">', page.index('<div class="pair">') + 1)]
    assert 'class="generated"' in first and 'class="real"' in first and first.count("label 0") == 2
    assert '<span class="ok">video 0</span>' in first and '<span class="ok">sync 3 ms</span>' in first
    assert '<span class="bad">video 5</span>' in page and '<span class="bad">audio none</span>' in page
    assert '<span class="bad">frames 11155555</span>' in page
    assert '<span class="bad">audio 7</span>' in page and '<span class="bad">sync 300 ms</span>' in page
    assert '<span class="na">sync n/a</span>' in page and "62 ms" in page  # half a frame at 8 fps


def test_metrics_explained_and_spec_folded(run_dir):
    page = (run_dir / "report.html").read_text()
    table = page[page.index("<table class=metrics>"):page.index("</table>")]
    assert "what it measures" in table
    assert report.METRIC_HELP["av_agreement"] in table and report.METRIC_HELP["video_consistency"] in table
    assert "after block 2" in table and "its class docstring" in table  # linear probe, unknown metric
    for name in ("av_sync_ms", "av_sync_detected", "video_class_accuracy", "audio_class_accuracy",
                 "class_accuracy", "classifier_fd"):
        assert report.metric_help(name) == report.METRIC_HELP[name]
    assert re.search(r"<details><summary>Resolved spec \(JSON\)</summary><pre>.*toy_av.*</pre></details>", page,
                     re.S)


def test_charts_are_matplotlib_pngs(run_dir):
    page = (run_dir / "report.html").read_text()
    assert 'src="report/losses.png"' in page and 'src="report/eval.png"' in page
    assert Image.open(run_dir / "report" / "losses.png").size == (760, 420)
    assert Image.open(run_dir / "report" / "eval.png").size[0] == 3 * 340  # one panel per metric, 3 a row


def test_facts_fallbacks_without_run_facts(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "meta.json").write_text(json.dumps({"device": "cuda:0",
                                                                                "world_size": 2}))
    (run / "spec.resolved.json").write_text(json.dumps(SPEC))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    facts = report.run_facts(run, SPEC, [{"step": 2, "loss": 1.0}])
    assert facts["device"] == "cuda:0 x 2" and facts["steps"] == "2 of 4" and facts["wall time"] == "—"
    assert facts["parameters"] == "—" and facts["date"] != "—"
    page = report.write_report(run).read_text()
    assert "No samples yet" in page and "No evaluation was run" in page


def test_audio_only_clips_pair_with_real_audio(tmp_path):
    run = tmp_path / "run"
    spec = {**SPEC, "data": {"type": "bouncing_digits_av", "fps": 8, "streams": ["audio"]}}
    run.mkdir()
    (run / "spec.resolved.json").write_text(json.dumps(spec))
    audio = _clips(2, 0)["audio"]
    gen = write_samples(audio, torch.arange(2), RATES, run / "samples", "step_00000001")
    write_samples(audio, torch.arange(2), RATES, run / "samples", "real")
    write_clip_readings([{"video_digit": None, "frame_digits": None, "consistent": None, "audio_digit": 0,
                          "sync_ms": None, "finite": True}, {"finite": False}], gen)
    page = report.write_report(run).read_text()
    assert page.count("<audio") == 4 and "<video" not in page and page.count('<div class="pair">') == 2
    assert '<span class="ok">audio 0</span>' in page and "NaN/inf in the clip" in page and "sync" not in page


def test_line_chart_and_panels(tmp_path):
    path = line_chart({"a": [(0, 1.0), (10, float("nan")), (20, 0.5)], "b": [(0, 2.0)]}, tmp_path / "c.png",
                      title="t", xlabel="step", ylabel="v")
    assert Image.open(path).size == (640, 400)
    assert np.asarray(Image.open(path).convert("L")).std() > 5  # something drawn
    with pytest.raises(ValueError, match="nothing to plot"):
        line_chart({"a": [(0, float("nan"))]}, tmp_path / "d.png", title="t", xlabel="x", ylabel="y")
    path = panel_chart({"m1": {"s": [(1, 0.1), (2, 0.2)]}, "m2": {"s": [(1, 5.0), (2, 4.0)]},
                        "m3": {"s": [(1, float("nan"))]}}, tmp_path / "p.png", title="t", xlabel="step",
                       ceilings={"m1": 1.0})
    assert Image.open(path).size == (2 * 340, 240 + 30)  # the all-NaN panel is left out
    assert report.main([str(tmp_path)]) == 2  # not a run directory
