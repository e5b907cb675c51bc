"""Atomic checkpoints: round trip, tied weights, keep-last-K, crash leftovers, RNG."""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from storage import checkpoint as ckpt
from storage.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

DEAD_PID = 2**31 - 1  # above any pid_max: never a live process


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("t", torch.arange(12.0).view(3, 4).t())  # non-contiguous


def _trained():
    """A module and an AdamW-shaped optimizer state dict. (Built by hand: constructing a real
    torch.optim optimizer imports torch._dynamo, ~3-4 s on the 2-core CI box.)"""
    torch.manual_seed(0)
    m = Tied()
    params = list(m.parameters())
    opt = {
        "state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                  for i, p in enumerate(params)},
        "param_groups": [{"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 0.0, "params": list(range(len(params)))}],
    }
    return m, opt


def _save(root: Path, step: int, keep: int = 10, m=None, opt=None, **over):
    if m is None:
        m, opt = _trained()
    kw = dict(
        model=m.state_dict(),
        ema={k: v * 0.5 for k, v in m.state_dict().items()},
        optimizer=opt,
        state={"step": step, "rng": rng_state(), "loader": {"samples_seen": 8 * step}, "hist": [1, 2.5]},
        spec={"model": {"type": "dit", "depth": 2}, "seed": 1},
        meta={"torch": torch.__version__, "path": Path("/x")},
        keep=keep,
    )
    kw.update(over)
    return save_checkpoint(root, step, **kw)


def test_round_trip_with_tied_weights(tmp_path):
    m, opt = _trained()
    path = _save(tmp_path, 7, m=m, opt=opt)
    assert path == tmp_path / "step_00000007"
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "ema.safetensors", "optimizer.json", "optimizer.safetensors", "state.json",
            "state.safetensors", "spec.resolved.json", "meta.json", "manifest.json"} == names
    ck = load_checkpoint(path)
    assert ck.step == 7 and ck.path == path
    sd = m.state_dict()
    assert ck.model.keys() == sd.keys()
    for k in sd:
        assert torch.equal(ck.model[k], sd[k]) and torch.equal(ck.ema[k], sd[k] * 0.5)
    # Loads strictly into a fresh module; the tie is kept by the module itself.
    m2 = Tied()
    m2.load_state_dict(ck.model, strict=True)
    assert m2.head.weight is m2.emb.weight
    assert ck.optimizer["param_groups"] == opt["param_groups"]
    assert all(torch.equal(ck.optimizer["state"][i][k], v[k]) for i, v in opt["state"].items() for k in v)
    assert ck.state["loader"] == {"samples_seen": 56} and ck.state["hist"] == [1, 2.5]
    assert ck.spec == {"model": {"type": "dit", "depth": 2}, "seed": 1}
    assert ck.meta["path"] == "/x"  # meta is lenient (stringified)
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"step": "7"}
    # Sampling needs only the step directory.
    spec, weights, is_ema = load_weights(path)
    assert is_ema and spec["model"]["depth"] == 2 and torch.equal(weights["mid.weight"], sd["mid.weight"] * 0.5)
    assert load_weights(path, prefer_ema=False)[2] is False


def test_no_ema_and_strict_spec(tmp_path):
    path = _save(tmp_path, 1, ema=None)
    assert load_checkpoint(path).ema is None
    assert latest_checkpoint(tmp_path) == path
    with pytest.raises(TypeError):
        _save(tmp_path, 2, spec={"bad": object()})
    assert list_checkpoints(tmp_path) == [path]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_keep_last_k(tmp_path):
    m, opt = _trained()
    for s in (1, 2, 3, 4, 5):
        _save(tmp_path, s, keep=2, m=m, opt=opt)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
    # Re-saving an older step (resume from it) deletes neither the checkpoint just written nor the newest
    # verified ones (4 and 5 are the 2 newest).
    p = _save(tmp_path, 3, keep=2, m=m, opt=opt)
    assert p.is_dir() and [q.name for q in list_checkpoints(tmp_path)] == [
        "step_00000003", "step_00000004", "step_00000005"]


def test_resave_same_step_replaces(tmp_path):
    m, opt = _trained()
    _save(tmp_path, 3, m=m, opt=opt, spec={"v": 1})
    p = _save(tmp_path, 3, m=m, opt=opt, spec={"v": 2})
    assert load_checkpoint(p).spec == {"v": 2}
    assert [q.name for q in tmp_path.iterdir()] == ["step_00000003"]


def test_crash_leftovers_are_skipped_and_cleaned(tmp_path):
    m, opt = _trained()
    good = [_save(tmp_path, s, m=m, opt=opt) for s in (10, 20)]
    # A writer that died mid-save, and one still running (our parent process).
    dead = tmp_path / f".tmp-step_00000030-{DEAD_PID}"
    (dead).mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".tmp-step_00000031-{os.getppid()}"
    alive.mkdir()
    # Step 30: a file missing. Step 40: model header overwritten (same size). Step 50: truncated.
    for s in (30, 40, 50):
        _save(tmp_path, s, m=m, opt=opt)
    (tmp_path / "step_00000030" / "state.json").unlink()
    f40 = tmp_path / "step_00000040" / "model.safetensors"
    raw = bytearray(f40.read_bytes())
    raw[8:16] = b"garbage!"
    f40.write_bytes(bytes(raw))
    f50 = tmp_path / "step_00000050" / "ema.safetensors"
    f50.write_bytes(f50.read_bytes()[:-3])
    # Step 60: no manifest (e.g. copied by hand, half done).
    (tmp_path / "step_00000060").mkdir()

    with pytest.warns(UserWarning, match="skipping broken checkpoint") as rec:
        assert latest_checkpoint(tmp_path) == good[1]
    assert len(rec) == 4  # 60, 50, 40, 30
    # list_checkpoints does the cheap check only (files + sizes); the same-size corruption passes it.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010", "step_00000020", "step_00000040"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = _save(tmp_path, 70, m=m, opt=opt, keep=2)
    assert not dead.exists() and alive.exists()
    assert latest_checkpoint(tmp_path) == new
    # keep=2 counts verified checkpoints only (70 and 20): 10 is deleted; the broken 30-60 stay, never counted.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000020", "step_00000040", "step_00000070"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == [
        f"step_000000{s}0" for s in (2, 3, 4, 5, 6, 7)]


def test_failed_save_leaves_previous_state(tmp_path, monkeypatch):
    m, opt = _trained()
    prev = _save(tmp_path, 1, m=m, opt=opt)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_state", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, m=m, opt=opt)
    assert [p.name for p in tmp_path.iterdir()] == [prev.name]
    assert latest_checkpoint(tmp_path) == prev


def test_latest_on_missing_or_empty_root(tmp_path):
    assert latest_checkpoint(tmp_path / "nope") is None
    assert list_checkpoints(tmp_path / "nope") == []
    assert latest_checkpoint(tmp_path) is None


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    st = rng_state()
    expected = _draw()
    _draw()
    set_rng_state(st)
    assert _draw() == expected
    # Through a checkpoint file, loaded onto another map_location.
    m, opt = _trained()
    set_rng_state(st)
    path = _save(tmp_path, 4, m=m, opt=opt, state={"rng": rng_state()})
    _draw()
    set_rng_state(load_checkpoint(path, map_location=torch.device("cpu")).state["rng"])
    assert _draw() == expected


def test_manifest_lists_sizes_and_hashes(tmp_path):
    import hashlib

    path = _save(tmp_path, 5)
    man = json.loads((path / "manifest.json").read_text())
    assert man["step"] == 5 and man["format"] == ckpt.FORMAT_VERSION == 2
    f = path / "model.safetensors"
    assert man["files"]["model.safetensors"] == {"bytes": f.stat().st_size,
                                                 "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    assert set(man["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
