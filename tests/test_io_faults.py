"""IO faults and runs that learn nothing are one line, never a traceback (issue 14 items 9 and 10): an ``--out``
that is a file, read-only or too long a name (exit 2), a full disk or a file past the size limit while saving
(exit 1, naming the path), and a run whose every step was non-finite (exit 1)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import cache as cache_cli
from runtime import run as run_cli
from tests.helpers import tiny_spec_dict

ROOT = Path(__file__).resolve().parent.parent
CLIS = {"run": run_cli.main, "cache": cache_cli.main}


def write_spec(tmp_path: Path) -> Path:
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(tiny_spec_dict()))
    return p


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("cli", CLIS)
def test_an_out_that_cannot_be_a_directory_is_exit_2(tmp_path, capsys, cli):
    spec = write_spec(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub", tmp_path / ("x" * 300)):
        assert CLIS[cli]([str(spec), "--out", str(out)]) == 2, out
        line = one_error_line(capsys.readouterr().err)
        assert str(out) in line, line
    assert afile.read_text() == "x"


@pytest.mark.parametrize("cli", CLIS)
def test_a_read_only_out_is_exit_2(tmp_path, capsys, monkeypatch, cli):
    spec, ro = write_spec(tmp_path), tmp_path / "ro"
    ro.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *a, **kw):  # what a read-only mount says (root ignores permission bits, so it is simulated)
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert CLIS[cli]([str(spec), "--out", str(ro / "run")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(ro / "run") in line and "Read-only file system" in line


@pytest.mark.slow  # trains through the CLI
def test_a_file_too_large_while_saving_a_checkpoint_is_exit_1(tmp_path):
    """RLIMIT_FSIZE makes every write past 256 KiB fail with EFBIG, as a full quota does: the 1.3 MB model file
    of the first checkpoint cannot be written."""
    spec, out = write_spec(tmp_path), tmp_path / "run"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024)); "
            f"from runtime.run import main; sys.exit(main([{str(spec)!r}, '--out', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    line = one_error_line(r.stderr)
    assert "stopped after step 3: its checkpoint could not be written" in line
    assert str(out / "checkpoints") in line and "File too large" in line
    assert not [p for p in (out / "checkpoints").glob("step_*")]


@pytest.mark.slow  # trains through the CLI
def test_a_full_disk_mid_run_is_exit_1_naming_the_run_directory(tmp_path, capsys, monkeypatch):
    from runtime.tracking import Tracker

    def scalars(self, step, values):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write() fault carries no file name

    monkeypatch.setattr(Tracker, "scalars", scalars)
    out = tmp_path / "run"
    assert run_cli.main([str(write_spec(tmp_path)), "--out", str(out)]) == 1
    assert one_error_line(capsys.readouterr().err) == f"error: IO fault: {out}: No space left on device"


def test_a_file_too_large_while_caching_is_exit_1_naming_the_shard(tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*a, **kw):
        Path(a[1]).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "cache"
    assert cache_cli.main([str(write_spec(tmp_path)), "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: IO fault: {out / 'shard_00_00000.safetensors'}: File too large"), line
    assert not [p for p in out.iterdir() if p.name.startswith(".shard")]  # no partial shard left


@pytest.mark.slow  # trains through the CLI
def test_a_run_whose_every_step_is_non_finite_is_exit_1(tmp_path, capsys, monkeypatch):
    from zoo.objectives.flow_matching import FlowMatching

    orig = FlowMatching.forward

    def forward(self, student, batch, ctx):
        out = orig(self, student, batch, ctx)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(FlowMatching, "forward", forward)
    assert run_cli.main([str(write_spec(tmp_path)), "--out", str(tmp_path / "run")]) == 1  # 6 steps < 20 allowed
    assert "all 6 steps of this run had a non-finite loss or gradient" in one_error_line(capsys.readouterr().err)
