"""Atomic, self-describing checkpoints.

Layout of one checkpoint (``root/step_{step:08d}/``)::

    model.safetensors     trainable weights (flat ``name -> Tensor``), metadata {"step": "<step>"}
    ema.safetensors       EMA weights, same format (only if an EMA was given)
    optimizer.pt          torch.save of the optimizer state dict
    state.pt              torch.save of the run state: step counters, RNG states (``rng_state()``),
                          data-loader state, LR-scheduler state, ... (any picklable dict)
    spec.resolved.json    the resolved spec, so sampling/resuming needs nothing else
    meta.json             package/plugin versions, git hash, ... (whatever the caller passes)
    manifest.json         written last by this module: format, step, and every file's byte size

A step directory is therefore a complete input for sampling (spec + weights).

Atomicity: everything is written into ``root/.tmp-step_{step:08d}-{pid}/``, every file and the
directory are fsync'ed, the directory is renamed to its final name, and ``root`` is fsync'ed. A
crash leaves either the previous state plus a stale ``.tmp-*`` directory (removed by the next
successful save) or the complete new checkpoint. Readers still verify what they load
(``latest_checkpoint`` checks the manifest, file sizes and safetensors headers), because files
can also be damaged after the fact (disk full on a copy, manual edits, partial rsync).

Trust: ``optimizer.pt`` and ``state.pt`` are loaded with ``torch.load(weights_only=False)``,
because ``state.pt`` holds arbitrary picklable objects (numpy's RNG state tuple with an
ndarray, scheduler and data-loader states). These files are written by this module for our own
runs; do not load checkpoints from untrusted sources. Weights (``*.safetensors``) never go
through pickle, and ``load_weights`` reads only them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_weights",
    "list_checkpoints",
    "latest_checkpoint",
    "verify_checkpoint",
    "rng_state",
    "set_rng_state",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``model``/``ema`` are flat ``name -> Tensor`` dicts."""

    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    state: dict[str, Any]
    spec: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the directory it was loaded from


# ----------------------------------------------------------------------------------- helpers
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes renames/creations durable (POSIX); not supported everywhere.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _plain_tensors(sd: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies: safetensors refuses shared storage (tied weights) and
    non-contiguous tensors, and a copy cannot change under us while it is written."""
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what}[{k!r}] is {type(v).__name__}, expected a Tensor")
        out[k] = v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
    return out


def _write_json(path: Path, obj: Any, *, strict: bool) -> None:
    text = json.dumps(obj, indent=2, default=None if strict else str)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _torch_save(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_dir(path: Path) -> None:
    """Rename to a ``.tmp-`` name first (atomic), so a crash during the removal leaves no
    half-deleted ``step_*`` directory behind, only a stale ``.tmp-*`` one."""
    doomed = path.with_name(f"{_TMP_PREFIX}del-{path.name}-{os.getpid()}")
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_tmp(root: Path) -> None:
    """Remove ``.tmp-*`` directories whose writer is this process or no longer running.

    Only one process (rank 0) writes checkpoints; the pid check keeps a concurrent writer on the
    same host safe, but cannot see writers on other hosts sharing the filesystem.
    """
    for p in root.iterdir():
        if not p.name.startswith(_TMP_PREFIX) or not p.is_dir():
            continue
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            pid = -1
        if pid == os.getpid() or pid < 0 or not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------- save
def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    optimizer: dict,
    state: dict,
    spec: dict,
    meta: dict,
    keep: int,
) -> Path:
    """Write ``root/step_{step:08d}/`` atomically and return its path.

    ``model``/``ema``: flat state dicts of tensors (tied or non-contiguous entries are fine: each
    is copied). ``optimizer``/``state``: anything ``torch.save`` can pickle. ``spec``: plain JSON
    (strict: a non-JSON value is an error). ``meta``: JSON, with non-JSON values stringified.
    Re-saving an existing step replaces it. Afterwards the oldest complete checkpoints beyond
    ``keep`` are deleted (``keep <= 0`` keeps all; the one just written is never deleted) and
    stale ``.tmp-*`` directories of crashed writers are removed.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    step = int(step)
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        st_meta = {"step": str(step)}
        save_file(_plain_tensors(model, "model"), tmp / "model.safetensors", metadata=st_meta)
        _fsync_file(tmp / "model.safetensors")
        if ema is not None:
            save_file(_plain_tensors(ema, "ema"), tmp / "ema.safetensors", metadata=st_meta)
            _fsync_file(tmp / "ema.safetensors")
        _torch_save(tmp / "optimizer.pt", optimizer)
        _torch_save(tmp / "state.pt", state)
        _write_json(tmp / "spec.resolved.json", spec, strict=True)
        _write_json(tmp / "meta.json", meta, strict=False)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        _write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": files}, strict=True)
        _fsync_dir(tmp)

        old = None
        if final.exists():
            # Move the previous version aside under a .tmp- name (cleaned up if we crash now).
            old = root / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)  # put the previous version back
            raise
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if keep > 0:
        complete = list_checkpoints(root)
        excess = len(complete) - keep
        for p in [c for c in complete if c != final][: max(0, excess)]:
            _delete_dir(p)
    _remove_stale_tmp(root)
    return final


# ---------------------------------------------------------------------------------- discovery
def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        man = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: missing or unreadable {MANIFEST} ({e})") from None
    if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
        raise ValueError(f"{path}: malformed {MANIFEST}")
    return man


def _check_files(path: Path) -> dict[str, Any]:
    """Cheap completeness check: manifest present, every listed file present with its size."""
    man = _read_manifest(path)
    for name in ("model.safetensors", "optimizer.pt", "state.pt", "spec.resolved.json", "meta.json"):
        if name not in man["files"]:
            raise ValueError(f"{path}: manifest does not list {name}")
    for name, size in man["files"].items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"{path}: missing {name}")
        if f.stat().st_size != size:
            raise ValueError(f"{path}: {name} has {f.stat().st_size} bytes, manifest says {size}")
    return man


def _check_safetensors_header(f: Path) -> None:
    """Parse the header (u64 little-endian length + JSON) and check that the data section it
    describes is exactly what follows it in the file."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{f}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{f}: header length {n} exceeds the file")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise ValueError(f"{f}: header is not JSON ({e})") from None
    try:
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"] or [0])
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{f}: malformed header ({e!r})") from None
    if 8 + n + end != size:
        raise ValueError(f"{f}: header describes {8 + n + end} bytes, file has {size}")


def verify_checkpoint(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a complete checkpoint whose safetensors headers
    parse and match the file sizes (does not unpickle or hash anything)."""
    path = Path(path)
    man = _check_files(path)
    for name in man["files"]:
        if name.endswith(".safetensors"):
            _check_safetensors_header(path / name)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root`` (manifest and every file present with the
    recorded size), sorted by step, oldest first. Missing ``root`` gives ``[]``."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = _step_of(p)
        if step is None or not p.is_dir():
            continue
        try:
            _check_files(p)
        except ValueError:
            continue
        found.append((step, p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that passes ``verify_checkpoint``; broken ones
    (including step directories that ``list_checkpoints`` already rejects) are skipped with a
    warning. ``None`` if there is none."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted(
        ((s, p) for p in root.iterdir() if (s := _step_of(p)) is not None and p.is_dir()), reverse=True
    )
    for _, p in candidates:
        try:
            verify_checkpoint(p)
        except (ValueError, OSError) as e:
            warnings.warn(f"skipping broken checkpoint {p}: {e}", stacklevel=2)
            continue
        return p
    return None


# --------------------------------------------------------------------------------------- load
def _safetensors_device(map_location: Any) -> str:
    if isinstance(map_location, torch.device):
        return str(map_location)
    if isinstance(map_location, str):
        return map_location
    return "cpu"  # dicts/callables only make sense for torch.load


def load_weights(
    path: Path, *, prefer_ema: bool = True, map_location: Any = "cpu"
) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """For sampling: ``(spec, weights, is_ema)`` from a checkpoint directory without unpickling
    anything. ``weights`` is the EMA if present and ``prefer_ema``, else the trained weights."""
    path = Path(path)
    spec = json.loads((path / "spec.resolved.json").read_text(encoding="utf-8"))
    dev = _safetensors_device(map_location)
    if prefer_ema and (path / "ema.safetensors").is_file():
        return spec, load_file(path / "ema.safetensors", device=dev), True
    return spec, load_file(path / "model.safetensors", device=dev), False


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Checkpoint:
    """Load everything in a checkpoint directory.

    ``map_location`` is passed to ``torch.load`` (str, ``torch.device``, dict or callable) and,
    when it is a str/device, also used as the device of the safetensors weights (else CPU).
    See the module docstring for why ``weights_only=False`` is used.
    """
    path = Path(path)
    dev = _safetensors_device(map_location)
    man = _read_manifest(path) if (path / MANIFEST).is_file() else {}
    step = man.get("step", _step_of(path))
    ema_file = path / "ema.safetensors"
    return Checkpoint(
        step=int(step) if step is not None else -1,
        model=load_file(path / "model.safetensors", device=dev),
        ema=load_file(ema_file, device=dev) if ema_file.is_file() else None,
        # Our own files; they contain non-tensor Python objects (see module docstring).
        optimizer=torch.load(path / "optimizer.pt", map_location=map_location, weights_only=False),
        state=torch.load(path / "state.pt", map_location=map_location, weights_only=False),
        spec=json.loads((path / "spec.resolved.json").read_text(encoding="utf-8")),
        meta=json.loads((path / "meta.json").read_text(encoding="utf-8")),
        path=path,
    )


# ---------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Global RNG states: ``{"python": random.getstate(), "numpy": np.random.get_state(),
    "torch": ByteTensor, "cuda": list[ByteTensor] (only if CUDA is available)}``."""
    d: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        d["cuda"] = torch.cuda.get_rng_state_all()
    return d


def set_rng_state(d: dict[str, Any]) -> None:
    """Restore what ``rng_state()`` captured (tensors may come back on any device). A saved
    CUDA state is restored for as many devices as both runs have, with a warning on mismatch."""
    if "python" in d:
        py = d["python"]
        # torch.load may turn the inner tuple into a list; random.setstate wants tuples.
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in d:
        np.random.set_state(tuple(d["numpy"]))
    if "torch" in d:
        torch.set_rng_state(torch.as_tensor(d["torch"]).to("cpu", torch.uint8))
    cuda = d.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            warnings.warn("checkpoint has CUDA RNG states but CUDA is not available; ignored", stacklevel=2)
            return
        n = torch.cuda.device_count()
        if len(cuda) != n:
            warnings.warn(f"checkpoint has {len(cuda)} CUDA RNG states, this process sees {n} devices", stacklevel=2)
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(torch.as_tensor(s).to("cpu", torch.uint8), i)


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint directory, else the newest good checkpoint of the run directory
    ``path``; FileNotFoundError (with a message for the user) when there is none."""
    path = Path(path)
    if (path / "spec.resolved.json").is_file() and any(path.glob("*.safetensors")):
        return path
    ck = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if ck is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints")
    return ck
