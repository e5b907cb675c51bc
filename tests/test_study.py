"""``runtime.study``: seeds, intervals, steps-to-quality, charts and the docs block, on a user's image folder
(the hidden-data check) and on digits; finished runs skipped on a rerun; budgets and baselines checked."""
from __future__ import annotations

import json
import math
import re

import pytest
from PIL import Image, ImageDraw

from runtime import study
from runtime.study_report import replace_block
from tests.helpers import tiny_spec_dict

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2,
                  "keep_checkpoints": 2, "ema": {"decay": 0.9}},
        "solver": {"type": "euler", "steps": 2}, "sample": {"n": 4}}


def _folder(root):
    """2 classes x 10 greyscale 16x16 PNGs (discs and squares) in the image_folder layout."""
    for c, name in enumerate(("disc", "square")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            im = Image.new("L", (16, 16), 0)
            box = [2 + i % 4, 2 + i // 4, 10 + i % 4, 10 + i // 4]
            (ImageDraw.Draw(im).ellipse if c == 0 else ImageDraw.Draw(im).rectangle)(box, fill=255)
            im.save(root / name / f"{i}.png")
    return {"type": "image_folder", "root": str(root), "size": 16, "channels": 1, "num_classes": 2}


def _write(tmp_path, name, **sections):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(tiny_spec_dict(name=name, **{**FAST, **sections})))
    return str(p)


def test_study_on_an_image_folder_with_seeds_and_rerun(tmp_path, capsys):
    """The hidden-data check: vanilla and Self-Flow on a folder of PNGs the test writes, 2 seeds; the block has a
    row per spec with finite intervals, charts exist, and a rerun trains nothing and keeps the rest of the docs."""
    data = _folder(tmp_path / "images")
    fm = _write(tmp_path, "vanilla", data=data, eval={"num_samples": 4, "metrics": []})
    sf = _write(tmp_path, "selfflow", data=data, objective={"type": "selfflow"}, eval={"num_samples": 4, "metrics": []})
    docs = tmp_path / "docs" / "results.md"
    docs.parent.mkdir()
    docs.write_text("# Results\n\nkept text\n")
    argv = [fm, sf, "--seeds", "2", "--eval-every", "2", "--probe-blocks", "1", "--out", str(tmp_path / "runs"),
            "--docs", str(docs), "--section", "folder"]
    assert study.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("train  ") == 4 and "skip   " not in out
    for name in ("vanilla", "selfflow"):
        for s in (0, 1):
            facts = json.loads((tmp_path / "runs" / name / f"seed{s}" / "run_facts.json").read_text())
            assert facts["steps"] == 4
            resolved = json.loads((tmp_path / "runs" / name / f"seed{s}" / "spec.resolved.json").read_text())
            assert resolved["train"]["seed"] == s
    text = docs.read_text()
    assert text.startswith("# Results\n\nkept text\n") and text.count("<!-- study:folder -->") == 1
    assert "python -m runtime.study" in text and "--seeds 2" in text and "Baseline: `vanilla`" in text
    row = re.search(r"^\| selfflow \| (.+) \|$", text, re.M).group(1)  # final values: mean ± hw [lo, hi] (n=2)
    mean, hw, lo, hi = map(float, re.match(r"([\d.]+) ± ([\d.e-]+) \[([\d.]+), ([\d.]+)\] \(n=2\)", row).groups())
    assert lo <= mean <= hi and math.isclose(hi - lo, 2 * hw, rel_tol=1e-2, abs_tol=2e-4)
    assert "### Steps to `vanilla`'s final quality" in text and re.search(r"\*\*(overlap|separate)", text)
    summary = json.loads((tmp_path / "runs" / "study_summary.json").read_text())
    probe = summary["metrics"]["linear_probe_b1"]
    assert probe["higher_is_better"] is True
    assert len(probe["specs"]["selfflow"]["values"]) == 2 and probe["specs"]["selfflow"]["steps"] == [2, 4]
    assert all(math.isfinite(v) for v in probe["specs"]["selfflow"]["lo"] + probe["specs"]["selfflow"]["hi"])
    assert probe["specs"]["vanilla"]["steps_to_baseline"]["step"] in (2, 4)
    chart = tmp_path / "docs" / "figures" / "study_folder_linear_probe_b1.png"
    assert Image.open(chart).size == (640, 400) and "(figures/study_folder_linear_probe_b1.png)" in text

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/seed*/run_facts.json")}
    assert study.main(argv) == 0  # rerun: all four finished -> skipped, block replaced, not appended
    out = capsys.readouterr().out
    assert out.count("skip   ") == 4 and "train  " not in out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = docs.read_text()
    assert again.count("<!-- study:folder -->") == 1 and again.startswith("# Results\n\nkept text\n")


def test_study_resumes_an_unfinished_run_and_refuses_a_changed_finished_one(tmp_path, capsys):
    spec = _write(tmp_path, "vanilla", eval={"num_samples": 4, "metrics": []})
    base = [spec, "--seeds", "1", "--eval-every", "2", "--probe-blocks", "1", "--out", str(tmp_path / "runs"),
            "--docs", str(tmp_path / "r.md")]
    assert study.main([*base, "--set", "train.steps=2"]) == 0  # a finished 2-step run ...
    capsys.readouterr()
    assert study.main(base) == 0  # ... is unfinished for a 4-step study: resumed, not restarted
    out = capsys.readouterr().out
    assert "resume vanilla seed 0" in out and "resuming from" in out
    assert json.loads((tmp_path / "runs" / "vanilla" / "seed0" / "run_facts.json").read_text())["steps"] == 4
    assert study.main([*base, "--eval-every", "1"]) == 2  # finished, but evaluated on another cadence
    assert "under a different spec (eval.every)" in capsys.readouterr().err


def test_study_digits_metrics_and_directions(tmp_path):
    """Class accuracy (higher is better) and classifier FD (lower is better) on digits, two objectives."""
    ev = {"num_samples": 10, "metrics": [{"type": "class_accuracy"}, {"type": "classifier_fd", "num_real": 50}]}
    a = _write(tmp_path, "uniform_t", eval=ev)
    b = _write(tmp_path, "logit_normal_t", eval=ev, objective={"type": "flow_matching",
                                                                "timesteps": {"type": "logit_normal"}})
    docs = tmp_path / "results.md"
    assert study.main([a, b, "--seeds", "2", "--eval-every", "4", "--probe-blocks", "", "--baseline", "uniform_t",
                       "--out", str(tmp_path / "runs"), "--docs", str(docs), "--interval", "bootstrap"]) == 0
    text = docs.read_text()
    assert "class_accuracy ↑" in text and "classifier_fd ↓" in text and "Real held-out data" in text
    assert "percentile-bootstrap" in text and "| logit_normal_t | Δ" in text
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.png")) == [
        "study_runs_class_accuracy.png", "study_runs_classifier_fd.png"]


def test_study_refuses_different_budgets_and_unclear_baselines(tmp_path, capsys):
    a = _write(tmp_path, "a")
    raw = json.loads(open(a).read())
    raw["name"], raw["train"]["steps"] = "b", 7
    (tmp_path / "b.json").write_text(json.dumps(raw))
    common = ["--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "r.md")]
    assert study.main([a, str(tmp_path / "b.json"), *common]) == 2
    assert "b differs from a in train.steps" in capsys.readouterr().err
    c = _write(tmp_path, "c")
    assert study.main([a, c, *common]) == 2  # two flow_matching specs: which is the baseline?
    assert "name the baseline with --baseline" in capsys.readouterr().err
    assert study.main([a, c, "--baseline", "z", *common]) == 2
    assert "--baseline 'z' is not one of the specs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_study_refuses_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert study.main([_write(tmp_path, "a"), "--out", str(tmp_path / "runs")]) == 2
    assert "launch it without torchrun" in capsys.readouterr().err


def test_run_argv_and_launcher(tmp_path):
    job = study.Job("s.json", None, 1, ["train.seed=1"], tmp_path / "a" / "seed1")
    assert study.run_argv(job) == ["s.json", "--out", str(job.out), "--set", "train.seed=1"]
    (job.out / "checkpoints").mkdir(parents=True)
    assert study.run_argv(job)[3:5] == ["--resume", "auto"]
    assert study.execute(job, ["false"]) == 1  # a launcher's failure is the run's failure, its output logged
    assert (job.out / "study.log").is_file()


def test_replace_block_keeps_the_rest(tmp_path):
    p = tmp_path / "r.md"
    replace_block(p, "x", "one")
    replace_block(p, "y", "two")
    replace_block(p, "x", "three")
    assert p.read_text() == "<!-- study:x -->\nthree\n<!-- /study:x -->\n\n<!-- study:y -->\ntwo\n<!-- /study:y -->\n"


def test_train_seed_drives_init_data_order_and_noise():
    """What ``--seeds`` varies: the initial weights, the order of the training data and the per-step noise all
    follow ``train.seed`` (the data set itself, ``data.seed``, stays the same)."""
    import torch

    from registry.kinds import DATASETS
    from registry.spec import validate
    from runtime.compiler import compile_spec
    from runtime.data import build_loader
    from zoo.core.types import StepRNG

    def parts(seed):
        spec = validate(tiny_spec_dict(train={**FAST["train"], "seed": seed}))
        weights = torch.cat([p.detach().flatten() for p in compile_spec(spec, torch.device("cpu")).backbone.parameters()])
        ds = DATASETS.build(spec.data, split="train")
        loader = build_loader(ds, global_batch=8, grad_accum=1, rank=0, world_size=1, seed=spec.train.seed,
                              num_workers=0)
        x, _ = next(iter(loader))
        return weights, x, StepRNG(spec.train.seed, 0, 0, 0, 4, 4).randn(3)

    (w0, x0, n0), (w0b, x0b, n0b), (w1, x1, n1) = parts(0), parts(0), parts(1)
    assert torch.equal(w0, w0b) and torch.equal(x0, x0b) and torch.equal(n0, n0b)  # reproducible
    assert not torch.equal(w0, w1) and not torch.equal(x0, x1) and not torch.equal(n0, n1)


def test_report_on_known_curves(tmp_path):
    """write_study on hand-written metrics.jsonl files: the faster method reaches the baseline's final accuracy
    at 200 of 300 steps (67 %), a slower one never does, an all-NaN metric gets no chart and "n/a" marks."""
    from types import SimpleNamespace

    from registry.spec import validate
    from runtime.study_report import write_study

    curves = {"base": [0.5, 0.7, 0.8], "fast": [0.7, 0.8, 0.9], "slow": [0.3, 0.4, 0.5]}
    ev = {"metrics": [{"type": "class_accuracy"}, {"type": "classifier_fd"}]}
    jobs = []
    for name, acc in curves.items():
        spec = validate(tiny_spec_dict(name=name, eval=ev, train={**FAST["train"], "steps": 300}))
        for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
            out = tmp_path / "runs" / name / f"seed{seed}"
            out.mkdir(parents=True)
            rows = [{"step": 100 * (i + 1), "eval/class_accuracy": a + jitter, "eval/classifier_fd": "nan"}
                    for i, a in enumerate(acc)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            jobs.append(SimpleNamespace(spec=spec, seed=seed, out=out))
    args = SimpleNamespace(seeds=3, interval="t", eval_every=100, section="known", docs=tmp_path / "r.md",
                           out=tmp_path / "runs")
    doc, charts = write_study(jobs, "base", args, "python -m runtime.study ...", wall_s=1.0)
    text = doc.read_text()
    assert [c.name for c in charts] == ["study_known_class_accuracy.png"]
    assert "none for classifier_fd (no finite value in any run)" in text
    # a resample of fast's lowest seed three times (0.79 at step 200) against base's highest (0.81) reaches it at 300
    assert "| fast | 200 (67 %) [200, 300] |" in text
    assert "| slow | not reached [not reached, not reached]; reached in 0 % of resamples |" in text
    assert "| base | 300 (100 %) [300, 300] |" in text
    # final accuracy: base 0.8 ± t(0.975, 2) * 0.01 / sqrt(3) = 0.8 ± 0.02484
    assert "| base | 0.8 ± 0.02484 [0.7752, 0.8248] (n=3) | n/a (n=0) |" in text
    assert re.search(r"\| fast \| Δ 0\.1 \[0\.07\d*, 0\.12\d*\]; \*\*separate, better\*\* \| Δ n/a \[n/a, n/a\]; \*\*n/a\*\* \|",
                     text)
    summary = json.loads((tmp_path / "runs" / "study_summary.json").read_text())
    assert summary["metrics"]["class_accuracy"]["specs"]["slow"]["steps_to_baseline"]["step"] is None
    assert summary["metrics"]["classifier_fd"]["specs"]["base"]["mean"] == [None, None, None]
