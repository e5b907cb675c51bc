"""``runtime.study``: same budget enforced, curves and table written."""
from __future__ import annotations

import json

from PIL import Image

from runtime import study
from tests.helpers import tiny_spec_dict


def _spec(tmp_path, name, **objective):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(tiny_spec_dict(name=name, objective={"type": "flow_matching", **objective},
                                           eval={"num_samples": 20, "metrics": [{"type": "class_accuracy"}]})))
    return str(p)


def test_study_writes_curves_and_table(tmp_path):
    a = _spec(tmp_path, "uniform_t")
    b = _spec(tmp_path, "logit_normal_t", timesteps={"type": "logit_normal"})
    docs = tmp_path / "docs" / "results.md"
    assert study.main([a, b, "--eval-every", "3", "--probe-blocks", "2", "--out", str(tmp_path / "runs"),
                       "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert "| uniform_t |" in text and "| logit_normal_t |" in text and "linear_probe_b2" in text
    assert "python -m runtime.study" in text and "Real held-out data" in text
    charts = sorted((docs.parent / "figures").glob("study_*.png"))
    assert [c.name for c in charts] == ["study_class_accuracy.png", "study_linear_probe_b2.png"]
    assert Image.open(charts[0]).size == (640, 400)


def test_study_refuses_different_budgets(tmp_path, capsys):
    a = _spec(tmp_path, "a")
    raw = json.loads(open(a).read())
    raw["name"], raw["train"]["steps"] = "b", 7
    (tmp_path / "b.json").write_text(json.dumps(raw))
    assert study.main([a, str(tmp_path / "b.json"), "--out", str(tmp_path / "runs"),
                       "--docs", str(tmp_path / "r.md")]) == 2
    assert "one budget" in capsys.readouterr().err
