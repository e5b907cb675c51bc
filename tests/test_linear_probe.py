"""The linear probe: its closed-form fit, and the ``runtime.evaluate`` CLI on a checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

import zoo  # noqa: F401
from registry.kinds import METRICS
from zoo.data.digits import DigitsDataParams


def _probe(**kw):
    params = METRICS.get("linear_probe").Params(type="linear_probe", block=1, **kw)
    return METRICS.build(params, data_params=DigitsDataParams(type="digits", preset="tiny"), device="cpu")


@pytest.mark.parametrize("separable,expected", [(True, (0.97, 1.0)), (False, (0.0, 0.25))])
def test_fit_separates_what_is_separable_and_nothing_else(monkeypatch, separable, expected):
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=gen, dtype=torch.float64) * 4

    def features(self, graph, dataset, n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 10, (n,), generator=g)
        x = torch.randn(n, 32, generator=g, dtype=torch.float64) + (centres[y] if separable else 0)
        return x, y

    monkeypatch.setattr(type(_probe()), "_features", features)
    acc = _probe(num_train=500, num_test=300).evaluate_model(graph=None)["linear_probe_b1"]
    assert expected[0] <= acc <= expected[1]


@pytest.mark.slow  # trains through the CLI
def test_evaluate_cli_probes_a_checkpoint(tmp_path):
    from runtime import evaluate
    from runtime import run as run_cli
    from tests.helpers import tiny_spec_dict

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec_dict()))
    out = tmp_path / "run"
    assert run_cli.main([str(spec), "--out", str(out)]) == 0
    probe = '{"type": "linear_probe", "block": 2, "num_train": 200, "num_test": 100}'
    assert evaluate.main([str(out), "--metric", probe, "--metric", probe.replace('"block": 2', '"block": 3, "t": 0.5')]) == 0
    vals = json.loads((out / "eval" / "step_00000006.json").read_text())
    assert set(vals) == {"eval/linear_probe_b2", "eval/linear_probe_b3_t0.5"}
    assert all(0.0 <= v <= 1.0 for v in vals.values())
    assert evaluate.main([str(out), "--metric", "{bad json"]) == 2
