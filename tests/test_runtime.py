"""End-to-end runtime on CPU: smoke run, run directory layout, exact resume, sampling from a checkpoint,
non-finite step handling, and 2-process DDP against 1 process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo  # noqa: F401
from registry.spec import validate
from runtime import run as run_cli
from runtime import sample as sample_cli
from runtime.compiler import compile_spec
from runtime.data import build_loader
from runtime.distributed import DistInfo
from runtime.tracking import read_jsonl
from runtime.train import Stepper, TrainingStopped
from tests.helpers import tiny_spec_dict
from zoo.objectives.flow_matching import FlowMatching

ROOT = Path(__file__).resolve().parent.parent


def write_spec(tmp_path: Path, **overrides) -> Path:
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(tiny_spec_dict(**overrides)))
    return p


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("smoke")
    spec = write_spec(tmp, eval={"at_end": True, "num_samples": 20, "metrics": [{"type": "class_accuracy"}]})
    out = tmp / "run"
    assert run_cli.main([str(spec), "--out", str(out)]) == 0
    return out


def test_smoke_run_writes_the_documented_run_directory(finished_run):
    out = finished_run
    assert json.loads((out / "spec.resolved.json").read_text())["backbone"]["depth"] == 4
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and "grad_norm" in r and "lr" in r for r in rows if "loss" in r)
    assert any("eval/class_accuracy" in r and "real/class_accuracy" in r for r in rows)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    ck = out / "checkpoints" / "step_00000006"
    assert {"model.safetensors", "ema.safetensors", "optimizer.json", "optimizer.safetensors", "state.json",
            "state.safetensors", "spec.resolved.json", "manifest.json"} <= {p.name for p in ck.iterdir()}
    assert not list(ck.glob("*.pt"))  # nothing pickled
    assert any((out / "tb").iterdir())
    img = Image.open(out / "samples" / "step_00000006.png")
    assert img.size[0] > 16 and img.size[1] > 16


def test_sampling_needs_nothing_but_the_checkpoint(finished_run, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(finished_run / "checkpoints" / "step_00000006", ck)  # moved away from its run
    out = tmp_path / "s.png"
    assert sample_cli.main([str(ck), "--n", "6", "--steps", "3", "--solver", "heun", "--cfg", "1.5", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    assert sample_cli.main([str(finished_run), "--n", "2", "--out", str(tmp_path / "r.png")]) == 0  # a run dir
    assert sample_cli.main([str(tmp_path / "nothing")]) == 2


def test_sample_options_not_given_keep_the_specs_solver(finished_run, tmp_path, capsys):
    """The spec samples with 4 euler steps: ``--solver euler`` alone must not reset them to euler's default 50."""
    assert sample_cli.main([str(finished_run), "--n", "2", "--solver", "euler", "--out", str(tmp_path / "e.png")]) == 0
    assert "euler, 4 NFE" in capsys.readouterr().out
    saved = {"type": "euler", "steps": 25, "shift": 3.0, "preset": None}
    assert sample_cli.solver_override(saved, "euler", None) == saved
    assert sample_cli.solver_override(saved, None, 10) == {**saved, "steps": 10}
    assert sample_cli.solver_override(saved, "heun", None) == {"type": "heun", "steps": 25, "shift": 3.0}
    assert sample_cli.solver_override(saved, "heun", 7) == {"type": "heun", "steps": 7, "shift": 3.0}
    assert sample_cli.solver_override(saved, "euler_maruyama", None) == {"type": "euler_maruyama"}  # own defaults


@pytest.mark.slow  # trains through the CLI
def test_end_of_run_says_what_it_does_and_where_the_classifier_is(tmp_path, monkeypatch, capsys):
    """Sampling, evaluation and the digit classifier's cache are announced (the classifier is faked: no training)."""
    from zoo.metrics import classifier as clf

    def fake_train(size, channels, device):
        r = clf.RECIPE
        model = clf.DigitClassifier(size, channels, r["width"], r["feature_dim"], r["max_work_size"])
        model.eval_accuracy, model.train_seconds = 1.0, 0.5
        return model

    monkeypatch.setenv("FMZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(clf, "train_digit_classifier", fake_train)
    monkeypatch.setattr(clf, "_LOADED", {})
    spec = write_spec(tmp_path, train={"steps": 2, "batch_size": 4, "checkpoint_every": 2},
                      eval={"at_end": True, "num_samples": 8, "metrics": [{"type": "class_accuracy"}]})
    assert run_cli.main([str(spec), "--out", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "sampling 10 preview images (euler, 4 NFE)...\n" in out
    assert "evaluating class_accuracy on 8 generated images, then on up to 8 real ones (the ceiling)...\n" in out
    path = clf.cache_path(16, 1)
    assert f"digit classifier: trained in 0.5 s (eval accuracy 1.0000), saved to {path}\n" in err
    monkeypatch.setattr(clf, "_LOADED", {})
    clf.get_digit_classifier(16, 1)
    assert f"digit classifier: loaded {path}\n" in capsys.readouterr().err


@pytest.mark.slow  # trains through the CLI
def test_existing_run_dir_needs_resume(finished_run, tmp_path):
    spec = write_spec(tmp_path)
    assert run_cli.main([str(spec), "--out", str(finished_run)]) == 2


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("interrupt_at", [4, 5])
@pytest.mark.slow  # trains through the CLI
def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path, monkeypatch, interrupt_at):
    spec = write_spec(tmp_path)
    full = tmp_path / "full"
    assert run_cli.main([str(spec), "--out", str(full)]) == 0

    broken = tmp_path / "broken"
    orig = Stepper.step

    def dying(self, step, batches):
        if step + 1 == interrupt_at:  # killed while computing step `interrupt_at` (checkpoint at 3)
            raise _Interrupt
        return orig(self, step, batches)

    monkeypatch.setattr(Stepper, "step", dying)
    with pytest.raises(_Interrupt):
        run_cli.main([str(spec), "--out", str(broken)])
    monkeypatch.setattr(Stepper, "step", orig)
    assert max(losses(broken)) == interrupt_at - 1
    assert run_cli.main([str(spec), "--out", str(broken), "--resume", "auto"]) == 0
    steps = [r["step"] for r in read_jsonl(broken / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated or missing lines
    assert losses(broken) == losses(full)  # bit-exact
    for name in ("model.safetensors", "ema.safetensors"):
        from safetensors.torch import load_file

        a = load_file(full / "checkpoints" / "step_00000006" / name)
        b = load_file(broken / "checkpoints" / "step_00000006" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def _nan_objective(monkeypatch, bad_steps):
    orig = FlowMatching.forward

    def forward(self, student, batch, ctx):
        out = orig(self, student, batch, ctx)
        if bad_steps is None or ctx.step in bad_steps:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(FlowMatching, "forward", forward)


def test_non_finite_step_touches_nothing(monkeypatch):
    spec = validate(tiny_spec_dict())
    g = compile_spec(spec, torch.device("cpu"))
    stepper = Stepper(g, DistInfo())
    loader = build_loader(zoo_data(spec), global_batch=8, grad_accum=1, rank=0, world_size=1, seed=0, num_workers=0)
    it = iter(loader)
    assert stepper.step(0, [next(it)])[0]
    before = ({k: v.clone() for k, v in g.train_module.state_dict().items()},
              {k: v.clone() for k, v in g.ema.state_dict().items()},
              [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in stepper.opt.state.values()])
    _nan_objective(monkeypatch, {1})
    ok, metrics = stepper.step(1, [next(it)])
    assert not ok
    assert all(torch.equal(v, before[0][k]) for k, v in g.train_module.state_dict().items())
    assert all(torch.equal(v, before[1][k]) for k, v in g.ema.state_dict().items())
    after = [{k: v for k, v in s.items() if torch.is_tensor(v)} for s in stepper.opt.state.values()]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(after, before[2]) for k in a)
    assert g.ema.updates == 1


def zoo_data(spec):
    from registry.kinds import DATASETS

    return DATASETS.build(spec.data, split="train")


@pytest.mark.slow  # trains through the CLI
def test_skips_are_counted_and_too_many_stop_the_run(tmp_path, monkeypatch):
    spec = write_spec(tmp_path)
    out = tmp_path / "run"
    _nan_objective(monkeypatch, {3})  # 0-based step 3 = the 4th step
    assert run_cli.main([str(spec), "--out", str(out)]) == 0
    rows = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert "loss" not in rows[4] and rows[4]["skipped_steps"] == 1  # a window with only the skipped step
    assert [rows[s]["skipped_steps"] for s in (3, 5, 6)] == [0, 1, 1] and "loss" in rows[5]

    out2 = tmp_path / "run2"
    _nan_objective(monkeypatch, {3, 4, 5})
    spec2 = write_spec(tmp_path, train={**tiny_spec_dict()["train"], "max_consecutive_skips": 2})
    assert run_cli.main([str(spec2), "--out", str(out2)]) == 1
    assert [p.name for p in (out2 / "checkpoints").iterdir()] == ["step_00000003"]  # last good one intact
    with pytest.raises(TrainingStopped, match="consecutive"):
        from runtime.train import train

        g = compile_spec(validate(json.loads(spec2.read_text())), torch.device("cpu"))
        train(g, tmp_path / "run3", DistInfo())


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch: the per-step losses match the
    single-process run to 1e-5 relative (only the reduction order differs)."""
    spec = write_spec(tmp_path, train={**tiny_spec_dict()["train"], "grad_accum": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "runtime.run", str(spec), "--out", str(single)], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    ddp = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "runtime.run", str(spec), "--out", str(ddp)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(single), losses(ddp)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a[s], b[s])


@pytest.mark.slow  # trains through the CLI
def test_resuming_a_finished_run_changes_nothing(finished_run, tmp_path, capsys):
    before = (finished_run / "metrics.jsonl").read_bytes()
    spec = write_spec(tmp_path, eval={"at_end": True, "num_samples": 20, "metrics": [{"type": "class_accuracy"}]})
    assert run_cli.main([str(spec), "--out", str(finished_run), "--resume", "auto"]) == 0
    assert "already complete at step 6" in capsys.readouterr().out
    assert (finished_run / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow  # trains through the CLI
def test_fresh_start_drops_lines_of_a_run_that_died_before_its_first_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "lo')
    spec = write_spec(tmp_path)
    assert run_cli.main([str(spec), "--out", str(out), "--resume", "auto"]) == 0  # no checkpoint: fresh start
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[0]["loss"] != 9.0
