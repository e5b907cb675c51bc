"""Tracker: jsonl lines, non-finite values, crash-safe resume, TensorBoard, disabled ranks."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.tracking import Tracker, read_jsonl, truncate_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_scalars_one_json_object_per_line(tmp_path):
    with Tracker(tmp_path, tensorboard=False) as tr:
        tr.scalars(0, {"loss": 1.5, "lr": np.float32(0.25), "n": 3, "t": torch.tensor(2.0), "ok": True})
        tr.scalars(1, {"loss": math.nan, "grad": math.inf, "neg": -math.inf})
        with pytest.raises(ValueError):
            tr.scalars(2, {"step": 1})
    raw = _lines(tmp_path / "metrics.jsonl")
    assert len(raw) == 2
    assert json.loads(raw[0]) == {"step": 0, "loss": 1.5, "lr": 0.25, "n": 3, "t": 2.0, "ok": 1}
    # Non-finite values are strings in the file (valid strict JSON) and floats after read_jsonl.
    assert json.loads(raw[1]) == {"step": 1, "loss": "nan", "grad": "inf", "neg": "-inf"}
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert math.isnan(rows[1]["loss"]) and rows[1]["grad"] == math.inf and rows[1]["neg"] == -math.inf


def test_torn_line_then_resume_from_earlier_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with Tracker(tmp_path, tensorboard=False) as tr:
        for s in range(10):
            tr.scalars(s, {"loss": float(s)})
    with open(path, "ab") as f:  # a kill in the middle of a write
        f.write(b'{"step": 10, "loss": 1')
    assert [r["step"] for r in read_jsonl(path)] == list(range(10))

    # Resume from a checkpoint at step 6: the lines of steps 7.. (and the torn one) go away.
    with Tracker(tmp_path, tensorboard=False, resume_step=6) as tr:
        assert [r["step"] for r in read_jsonl(path)] == list(range(7))
        for s in range(7, 12):
            tr.scalars(s, {"loss": -float(s)})
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == list(range(12))  # no duplicates, no gaps
    assert rows[8]["loss"] == -8.0
    assert all(json.loads(line) for line in _lines(path))  # every line valid JSON


def test_truncate_jsonl_keeps_only_well_formed(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1, "a": 1}\nnot json\n{"a": 2}\n{"step": "3"}\n{"step": 2}\n{"step": 5}\n{"st')
    assert truncate_jsonl(path, 4) == 2
    assert path.read_bytes() == b'{"step": 1, "a": 1}\n{"step": 2}\n'
    assert truncate_jsonl(tmp_path / "missing.jsonl", 4) == 0
    assert not (tmp_path / "missing.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temp file left


_WRITER = """
import sys
from runtime.tracking import Tracker
tr = Tracker(sys.argv[1], tensorboard=False)
print("ready", flush=True)
s = 0
while True:
    tr.scalars(s, {"loss": s * 0.5, **{f"metric_{i}": i / 7 for i in range(40)}})
    s += 1
"""


def test_sigkill_leaves_only_whole_lines(tmp_path):
    with subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.3)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    raw = (tmp_path / "metrics.jsonl").read_bytes()
    pieces = raw.split(b"\n")
    assert len(pieces) > 10
    whole = [json.loads(p) for p in pieces[:-1]]
    assert [r["step"] for r in whole] == list(range(len(whole)))
    with Tracker(tmp_path, tensorboard=False, resume_step=len(whole) // 2) as tr:
        tr.scalars(len(whole) // 2 + 1, {"loss": 0.0})
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == list(range(len(whole) // 2 + 2))


def _scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)], acc


def test_tensorboard_events_and_purge_on_resume(tmp_path):
    with Tracker(tmp_path, tensorboard=True) as tr:
        for s in range(6):
            tr.scalars(s, {"train/loss": float(s)})
        tr.image("samples", 5, np.full((4, 6, 3), 200, np.uint8))
        tr.text("notes", 5, "hello")
    got, acc = _scalars(tmp_path / "tb", "train/loss")
    assert got == [(s, float(s)) for s in range(6)]
    tags = acc.Tags()
    assert "samples" in tags["images"]
    img = acc.Images("samples")[0]
    assert (img.step, img.width, img.height) == (5, 6, 4)
    assert any(t.startswith("notes") for t in tags["tensors"])

    # Crash after step 5, resume from the checkpoint at step 2: TensorBoard drops steps 3..5.
    with Tracker(tmp_path, tensorboard=True, resume_step=2) as tr:
        for s in range(3, 5):
            tr.scalars(s, {"train/loss": 100.0 + s})
    got, _ = _scalars(tmp_path / "tb", "train/loss")
    assert got == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)]


def test_disabled_is_a_no_op(tmp_path):
    run = tmp_path / "run"
    tr = Tracker(run, tensorboard=True, enabled=False, resume_step=3)
    tr.scalars(0, {"loss": 1.0})
    tr.image("x", 0, np.zeros((2, 2, 3), np.uint8))
    tr.text("t", 0, "x")
    tr.flush()
    tr.close()
    assert not run.exists()


def test_image_validation(tmp_path):
    with Tracker(tmp_path, tensorboard=True) as tr:
        with pytest.raises(TypeError):
            tr.image("x", 0, np.zeros((2, 2, 3), np.float32))
        with pytest.raises(ValueError):
            tr.image("x", 0, np.zeros((2, 2, 2), np.uint8))
        tr.image("gray", 0, np.zeros((2, 2), np.uint8))
