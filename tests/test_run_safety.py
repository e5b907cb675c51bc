"""End to end (issue 14, items 1-7): planted pickles, damaged checkpoints, bad updates, a busy run directory,
names that leave it, and resuming with a changed spec, through ``runtime.run``, ``runtime.sample``,
``runtime.evaluate`` and ``runtime.cache``. One 4-step run (checkpoints at 2 and 4) is copied per test."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo  # noqa: F401
from registry.spec import validate
from runtime import cache as cache_cli
from runtime import evaluate as evaluate_cli
from runtime import run as run_cli
from runtime import sample as sample_cli
from storage.checkpoint import verify_checkpoint
from runtime.resume import Refused, plan
from runtime.rundir import RunLock
from tests.helpers import tiny_spec_dict
from tests.test_checkpoint_safety import garble, plant_format1, rehash
from tests.test_runtime import losses

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {**tiny_spec_dict()["train"], "steps": 4, "checkpoint_every": 2}
EVAL = {"at_end": False, "num_samples": 8, "metrics": [{"type": "class_accuracy"}]}


def spec_file(tmp: Path, fname: str = "spec.json", **over) -> Path:
    p = tmp / fname
    p.write_text(json.dumps(tiny_spec_dict(train=TRAIN, eval=EVAL, **over)))
    return p


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("safety")
    spec = spec_file(tmp)
    assert run_cli.main([str(spec), "--out", str(tmp / "run")]) == 0
    return spec, tmp / "run"


def copy_run(base, tmp_path: Path) -> tuple[str, Path, Path, Path]:
    """(spec path, run dir, step 2, step 4) of a fresh copy of the base run."""
    spec, src = base
    run = tmp_path / "run"
    shutil.copytree(src, run)
    ck = run / "checkpoints"
    return str(spec), run, ck / "step_00000002", ck / "step_00000004"


def err_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------------------------------ item 1
@pytest.mark.slow  # trains through the CLI
def test_a_planted_pickle_runs_in_none_of_the_five_paths(base, tmp_path, monkeypatch, capsys):
    from zoo.metrics import classifier as clf

    spec, run, _, ck4 = copy_run(base, tmp_path)
    marker = tmp_path / "PWNED"
    evil = run / "checkpoints" / "step_00000006"  # newest, and past train.steps: the finished-run check reads it
    shutil.copytree(ck4, evil)
    plant_format1(evil, marker)
    capsys.readouterr()
    # 1 + 3: --resume auto names and skips it, then finds the run complete at step 4
    assert run_cli.main([spec, "--out", str(run), "--resume", "auto"]) == 0
    out, err = capsys.readouterr()
    assert "note: skipping checkpoint step_00000006: " in err and "optimizer.pt: a pickle" in err
    assert "already complete at step 4" in out
    # 2: --resume PATH refuses in one line naming the file
    assert run_cli.main([spec, "--out", str(tmp_path / "other"), "--resume", str(evil)]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "step_00000006/optimizer.pt: a pickle of an older fmzoo" in lines[0]
    # 4, 5: sampling and evaluation read only its safetensors and JSON
    assert sample_cli.main([str(evil), "--n", "2", "--out", str(tmp_path / "s.png")]) == 0

    def fake_train(size, channels, device):  # no classifier training in this test
        r = clf.RECIPE
        return clf.DigitClassifier(size, channels, r["width"], r["feature_dim"], r["max_work_size"])

    monkeypatch.setenv("FMZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(clf, "train_digit_classifier", fake_train)
    monkeypatch.setattr(clf, "_LOADED", {})
    assert evaluate_cli.main([str(evil), "--n", "4"]) == 0
    assert not marker.exists()


# ------------------------------------------------------------------------------------ items 3, 6
@pytest.mark.slow  # trains through the CLI
def test_resume_auto_skips_a_damaged_checkpoint_names_it_and_reproduces_the_run(base, tmp_path, capsys):
    spec, run, _, ck4 = copy_run(base, tmp_path)
    garble(ck4 / "optimizer.safetensors")  # same size: only the SHA-256 sees it
    capsys.readouterr()
    assert run_cli.main([spec, "--out", str(run), "--resume", "auto"]) == 0
    notes = [ln for ln in err_lines(capsys) if "skipping" in ln]
    assert len(notes) == 1 and notes[0].startswith("note: skipping checkpoint step_00000004: ")
    assert "optimizer.safetensors: SHA-256 differs" in notes[0]
    assert losses(run) == losses(base[1])  # resumed from step 2: steps 3, 4 bit for bit, no duplicate lines
    verify_checkpoint(ck4)  # rewritten


@pytest.mark.slow  # trains through the CLI
def test_when_no_checkpoint_verifies_resume_auto_refuses_and_touches_nothing(base, tmp_path, capsys):
    spec, run, ck2, ck4 = copy_run(base, tmp_path)
    garble(ck2 / "state.json")
    (ck4 / "meta.json").write_bytes(b"x" * (ck4 / "meta.json").stat().st_size)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert run_cli.main([spec, "--out", str(run), "--resume", "auto"]) == 2
    lines = err_lines(capsys)
    assert "no checkpoint in" in lines[0] and "to start over" in lines[0]
    assert "step_00000004: " in lines[1] and "meta.json: SHA-256 differs" in lines[1]
    assert "step_00000002: " in lines[2] and "state.json: SHA-256 differs" in lines[2]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


def _rewrite(f: Path, edit) -> None:
    t = load_file(f)
    edit(t)
    save_file(t, f)
    rehash(f.parent)  # a consistent manifest: the fault is in what the file holds


@pytest.mark.parametrize("damage, file, fault", [
    ("shape", "model.safetensors", "has shape"), ("missing", "model.safetensors", "missing tensor"),
    ("moment", "optimizer.json", "state exp_avg of parameter"), ("ema", "ema.safetensors", "unexpected tensor")])
def test_tensors_that_do_not_fit_are_skipped_by_auto_and_refused_by_path(base, tmp_path, damage, file, fault):
    spec, run, ck2, ck4 = copy_run(base, tmp_path)
    if damage == "shape":
        _rewrite(ck4 / "model.safetensors", lambda t: t.update({k: t[k][:1] for k in [sorted(t)[-1]]}))
    elif damage == "missing":
        _rewrite(ck4 / "model.safetensors", lambda t: t.pop(sorted(t)[0]))
    elif damage == "moment":
        _rewrite(ck4 / "optimizer.safetensors", lambda t: t.update({k: torch.zeros(3) for k in t if "exp_avg" in k}))
    else:
        _rewrite(ck4 / "ema.safetensors", lambda t: t.update(extra=torch.zeros(1)))
    s = validate(json.loads(Path(spec).read_text()))
    chosen = plan("auto", run, s)
    assert chosen.path == ck2 and chosen.step == 2
    assert chosen.notes[0].startswith("skipping checkpoint step_00000004: ")
    assert re.search(rf"step_00000004/{file}: .*{fault}", chosen.notes[0])
    with pytest.raises(Refused) as e:
        plan(str(ck4), tmp_path / "new", s)
    assert len(e.value.lines) == 1 and re.search(rf"step_00000004/{file}: .*{fault}", e.value.lines[0])
    assert plan(str(run), tmp_path / "new", s).path == ck2  # --resume RUN_DIR: its newest that verifies


@pytest.mark.slow  # trains through the CLI
def test_resume_run_dir_is_its_newest_checkpoint(base, tmp_path, capsys):
    spec, run, _, _ = copy_run(base, tmp_path)
    assert run_cli.main([spec, "--out", str(tmp_path / "new"), "--resume", str(run)]) == 0
    assert "already complete at step 4" in capsys.readouterr().out
    assert run_cli.main([spec, "--out", str(tmp_path / "new"), "--resume", str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------------------------------ item 2a
@pytest.mark.parametrize("bad", ["lr_1e12", "lr_inf", "weight_decay_1e30"])
@pytest.mark.slow  # trains through the CLI
def test_a_bad_update_stops_the_run_before_any_checkpoint_holds_it(base, tmp_path, capsys, monkeypatch, bad):
    from runtime.optim import LearningRate

    spec, run, ck2, ck4 = copy_run(base, tmp_path)
    good = load_file(ck4 / "model.safetensors")
    orig = LearningRate.apply

    def apply(self, opt, step):  # from step 5 on (0-based 4): what a broken spec or schedule would give
        lr = orig(self, opt, step)
        if step >= 4:
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = {"lr_1e12": (1e12, 0.0), "lr_inf": (float("inf"), 0.0),
                                              "weight_decay_1e30": (lr, 1e30)}[bad]
        return lr

    monkeypatch.setattr(LearningRate, "apply", apply)
    sets = ["--set", "train.steps=8", "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=1"]
    capsys.readouterr()
    assert run_cli.main([spec, "--out", str(run), "--resume", "auto", *sets]) == 1
    err = capsys.readouterr().err
    assert "stopped after step 5: the update made a weight" in err, err
    assert f"the last good checkpoint is in {ck4}" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    verify_checkpoint(ck4)
    assert all(torch.equal(v, good[k]) for k, v in load_file(ck4 / "model.safetensors").items())


# ------------------------------------------------------------------------------------------- item 4
@pytest.mark.slow  # trains through the CLI
def test_a_second_process_in_a_run_directory_in_use_exits_2_naming_the_holder(base, tmp_path, capsys):
    spec, run, _, _ = copy_run(base, tmp_path)
    code = ("import sys, time; from runtime.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        capsys.readouterr()
        for extra in ([], ["--resume", "auto"]):
            assert run_cli.main([spec, "--out", str(run), *extra]) == 2
            lines = err_lines(capsys)
            assert len(lines) == 1 and f"{run} is in use by pid {holder.pid} on " in lines[0]
    finally:
        holder.kill()  # SIGKILL: it never releases the lock itself
        holder.wait()
    with RunLock(run) as lock:
        note = lock.acquire()
    assert f"took over the lock of pid {holder.pid}" in note
    assert RunLock(run).acquire() is None  # a clean release leaves no stale holder


_DIE_IN_SAVE = """
import os, signal, sys
import storage.checkpoint as c
orig = c._write_state
def dying(tmp, name, obj):  # kill -9 halfway through writing checkpoint 3 (weights written, state not)
    if name == "state" and "step_00000003" in str(tmp):
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(tmp, name, obj)
c._write_state = dying
from runtime.run import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # trains through the CLI
def test_kill_9_in_a_save_then_resume_auto_takes_over_the_lock_and_reproduces_the_run(base, tmp_path, capsys):
    spec, src = base
    run = tmp_path / "run"
    sets = ["--set", "train.checkpoint_every=1"]
    r = subprocess.run([sys.executable, "-c", _DIE_IN_SAVE, str(spec), "--out", str(run), *sets], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    ck = run / "checkpoints"
    assert [p.name for p in ck.glob(".tmp-step_00000003-*")] and verify_checkpoint(ck / "step_00000002")
    capsys.readouterr()
    assert run_cli.main([str(spec), "--out", str(run), "--resume", "auto", *sets]) == 0
    assert "took over the lock of pid" in capsys.readouterr().err
    assert losses(run) == losses(src)  # bit for bit, no duplicate or missing lines
    assert sorted(p.name for p in ck.iterdir()) == [f"step_0000000{i}" for i in (1, 2, 3, 4)]  # leftovers gone


# ------------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("name", ["..", ".", "a/b", ""])
def test_names_and_outs_that_leave_the_run_directory_are_refused(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    good, bad = spec_file(tmp_path), spec_file(tmp_path, "bad.json", name=name)
    assert run_cli.main([str(good), "--out", ""]) == 2
    assert run_cli.main([str(good), "--out", "  "]) == 2
    assert cache_cli.main([str(good), "--out", ""]) == 2
    for argv in ([str(bad)], [str(bad), "--dry-run"], [str(bad), "--resume", "auto"]):
        assert run_cli.main(argv) == 2
    assert cache_cli.main([str(bad)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "spec.json"]  # nothing written


# ------------------------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("sets, path", [
    (["backbone.hidden=96"], "backbone.hidden"), (["backbone.depth=3"], "backbone.depth"),
    (['objective.timesteps={"type": "logit_normal"}'], "objective.timesteps"), (["train.seed=1"], "train.seed"),
    (["data.length=256"], "data.length"), (["train.batch_size=12"], "train.batch_size")])
@pytest.mark.slow  # trains through the CLI
def test_a_spec_change_that_cannot_resume_is_refused_with_its_paths(base, tmp_path, capsys, sets, path):
    spec, run, _, _ = copy_run(base, tmp_path)
    capsys.readouterr()
    argv = [spec, "--out", str(run), "--resume", "auto", "--set", "train.steps=8"]
    for s in sets:
        argv += ["--set", s]
    assert run_cli.main(argv) == 2
    lines = err_lines(capsys)
    assert "the spec differs from step_00000004's where a run cannot continue" in lines[0]
    assert any(ln.startswith(f"error:   {path}") and "in the checkpoint" in ln for ln in lines[1:]), lines
    assert not any("train.steps" in ln for ln in lines)  # a let-through change is not listed as a refusal


def test_a_spec_change_that_can_resume_goes_through_with_a_note(base, tmp_path):
    spec, run, _, ck4 = copy_run(base, tmp_path)
    raw = tiny_spec_dict(train={**TRAIN, "steps": 8, "batch_size": 16, "lr": 5e-4},
                         eval={**EVAL, "every": 4}, log={"every": 2, "progress": False}, sample={"n": 10, "every": 4})
    chosen = plan("auto", run, validate(raw))  # the saved position (32 samples) is two batches of 16
    assert chosen.path == ck4 and len(chosen.notes) == 1
    for change in ("train.steps: 4 in the checkpoint, 8 now", "train.batch_size: 8 in the checkpoint, 16 now",
                   "log.every: 1 in the checkpoint, 2 now", "sample.every: null in the checkpoint, 4 now",
                   "eval.every: null in the checkpoint, 4 now", "train.lr"):
        assert change in chosen.notes[0]
