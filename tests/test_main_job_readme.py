"""The README's main-job paragraph describes the shipped spec, and the vanilla baseline is the same run with
only the objective changed, so the two rows of the README's table compare like with like."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import zoo  # noqa: F401
from registry.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _measured_sentence() -> re.Match:
    m = re.search(r"`python -m runtime\.run specs/selfflow_av\.json`; ([\d,]+) trainable parameters, ([\d,]+) steps of "
                  r"batch (\d+), (\d+) clips sampled with (\d+) Euler steps at guidance scale ([\d.]+)", README)
    assert m is not None, "README: the main job's 'Measured on ...' sentence is missing or reworded"
    return m


def test_readme_main_job_sentence_matches_the_shipped_spec():
    params, steps, batch, clips, nfe, cfg = _measured_sentence().groups()
    spec = load_spec(ROOT / "specs" / "selfflow_av.json", [])
    assert int(steps.replace(",", "")) == spec.train.steps
    assert int(batch) == spec.train.batch_size
    assert int(clips) == spec.eval.num_samples
    assert spec.solver.type == "euler" and int(nfe) == spec.solver.steps
    assert float(cfg) == spec.sample.cfg_scale

    from runtime.compiler import compile_spec
    graph = compile_spec(spec, torch.device("cpu"))
    trainable = sum(p.numel() for p in graph.train_module.parameters() if p.requires_grad)
    assert int(params.replace(",", "")) == trainable


def test_vanilla_baseline_differs_from_the_main_job_only_in_its_objective():
    sf = json.loads((ROOT / "specs" / "selfflow_av.json").read_text())
    fm = json.loads((ROOT / "specs" / "fm_av.json").read_text())
    assert (sf.pop("name"), fm.pop("name")) == ("selfflow_av", "fm_av")
    sf_obj, fm_obj = sf.pop("objective"), fm.pop("objective")
    assert sf == fm
    assert (sf_obj["type"], fm_obj["type"]) == ("selfflow", "flow_matching")
    shared = {k: v for k, v in sf_obj.items() if k not in ("type", "mask")}
    assert shared == {k: v for k, v in fm_obj.items() if k != "type"}


def test_readme_table_has_both_objectives_and_every_required_metric():
    table = README.split("| metric (100 clips) |", 1)[1].split("\n\n", 1)[0]
    for metric in ("av_agreement", "video_class_accuracy", "audio_class_accuracy", "av_sync_ms", "video_consistency"):
        row = next((line for line in table.splitlines() if f"`{metric}`" in line), None)
        assert row is not None, metric
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) >= 4 and all(re.fullmatch(r"[\d.]+( \([\d.–-]+\))?", c) for c in cells[1:4]), row
