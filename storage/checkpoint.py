"""Atomic, verified checkpoints in which nothing is unpickled.

Layout of one checkpoint (``root/step_{step:08d}/``, format 2)::

    model.safetensors      trainable weights (flat ``name -> Tensor``), metadata {"step": "<step>"}
    ema.safetensors        EMA weights, same format (only if an EMA was given)
    optimizer.json         the optimizer state dict, each tensor replaced by a reference (:mod:`storage.safe_state`)
    optimizer.safetensors  those tensors (AdamW moments, step counts)
    state.json             the run state: step, skip counter, data-loader position, RNG states (Python's and
                           numpy's as integer lists), ...
    state.safetensors      its tensors (the torch / CUDA RNG byte tensors)
    spec.resolved.json     the resolved spec, so sampling/resuming needs nothing else
    meta.json              package/plugin versions, device, ... (whatever the caller passes)
    manifest.json          written last: {"format": 2, "step": s, "files": {name: {"bytes": n, "sha256": hex}}}

Atomicity: everything is written into ``root/.tmp-step_{step:08d}-{pid}/``, every file is fsync'ed and hashed,
the directory is verified, fsync'ed and renamed to its final name, and ``root`` is fsync'ed. A crash leaves
the previous state plus a stale ``.tmp-*`` directory (removed by the next save) or the complete new checkpoint.

Verification (:func:`verify_checkpoint`, done before anything is used): the manifest parses and lists every
required file; each file is a regular file with the recorded size and SHA-256; safetensors headers are
consistent with their data; JSON files parse; every tensor a JSON file refers to exists. A fault is a
:class:`CheckpointError` naming the file. Rotation (``keep``) keeps every step directory from the
``keep``-th newest checkpoint that verifies on and deletes only older ones, so a damaged checkpoint never
causes a deletion and the newest verified one always stays.

Format 3 (``train.parallel`` fsdp2/hsdp) is format 2 plus ``.metadata`` and one ``__<rank>_0.distcp`` per rank:
the sharded weights, EMA and AdamW state written by ``torch.distributed.checkpoint`` into the same temporary
directory before the files above (:mod:`storage.sharded`, which also says how ``.metadata`` is read without
unpickling); ``optimizer.json`` then holds only the param groups. ``model``/``ema.safetensors`` are the gathered,
consolidated weights, so everything that reads weights works on one process as for format 2.

Format 1 (older runs) held ``optimizer.pt``/``state.pt`` pickles and sizes only in the manifest. Its weights
and spec are still read (sampling, evaluation); its pickles are only ever read with
``torch.load(weights_only=True)``, which executes nothing and refuses the numpy RNG arrays in a format-1
``state.pt``, so such a checkpoint cannot be resumed (the error says so).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from storage import safe_state
from storage.safe_state import rng_state, set_rng_state  # noqa: F401  (re-exported)

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "staging_dir", "load_checkpoint", "load_weights", "list_checkpoints",
           "latest_checkpoint", "scan_checkpoints", "checkpoint_format", "verify_checkpoint", "find_checkpoint", "rng_state",
           "set_rng_state"]

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_REQUIRED = {
    1: ("model.safetensors", "optimizer.pt", "state.pt", "spec.resolved.json", "meta.json"),
    2: ("model.safetensors", "optimizer.json", "optimizer.safetensors", "state.json", "state.safetensors",
        "spec.resolved.json", "meta.json"),
}
_REQUIRED[3] = (*_REQUIRED[2], ".metadata")  # format 2 + the DCP shards of a sharded run (storage.sharded)
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; ``str(e)`` is one line: ``<file>: <fault>``."""

    def __init__(self, path: Path, fault: str):
        self.path, self.fault = Path(path), fault
        super().__init__(f"{path}: {fault}")


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
    format: int = FORMAT_VERSION


# ----------------------------------------------------------------------------------- helpers
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
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


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any, *, strict: bool) -> None:
    _write_text(path, json.dumps(obj, indent=2, default=None if strict else str))


def _write_state(tmp: Path, name: str, obj: Any) -> None:
    """``name.json`` + ``name.safetensors`` (:func:`storage.safe_state.split`); TypeError for unstorable values."""
    doc, tensors = safe_state.split(obj)
    save_file(tensors, tmp / f"{name}.safetensors")
    _fsync_file(tmp / f"{name}.safetensors")
    _write_text(tmp / f"{name}.json", safe_state.dumps(doc))


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
    """Remove ``.tmp-*`` directories whose writer is this process or no longer running (same host only)."""
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
def staging_dir(root: Path, step: int) -> Path:
    """A fresh, empty ``root/.tmp-step_{step:08d}-{pid}/`` (what :func:`save_checkpoint` writes into; the
    ranks of a sharded save write their shards there first and pass it as ``staged``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}{step_dir_name(int(step))}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def save_checkpoint(root: Path, step: int, *, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                    optimizer: dict, state: dict, spec: dict, meta: dict, keep: int, staged: Path | None = None) -> Path:
    """Write ``root/step_{step:08d}/`` atomically and return its path.

    ``model``/``ema``: flat state dicts of tensors (tied or non-contiguous entries are fine: each is copied).
    ``optimizer``/``state``: nested dicts/lists/tuples of numbers, strings and tensors (TypeError otherwise).
    ``spec``: plain JSON (strict). ``meta``: JSON, non-JSON values stringified. Re-saving a step replaces it.
    The new directory is verified before it is renamed into place (CheckpointError otherwise). Then
    rotation runs (``keep <= 0`` keeps all; see the module docstring; the new one is never deleted) and
    stale ``.tmp-*`` directories of crashed writers are removed. ``staged``: the :func:`staging_dir` of this
    step, already holding a sharded run's DCP files (:mod:`storage.sharded`); the checkpoint is then format 3.
    """
    root = Path(root)
    step = int(step)
    final = root / step_dir_name(step)
    tmp = Path(staged) if staged is not None else staging_dir(root, step)
    fmt = 3 if staged is not None else FORMAT_VERSION
    try:
        st_meta = {"step": str(step)}
        save_file(_plain_tensors(model, "model"), tmp / "model.safetensors", metadata=st_meta)
        _fsync_file(tmp / "model.safetensors")
        if ema is not None:
            save_file(_plain_tensors(ema, "ema"), tmp / "ema.safetensors", metadata=st_meta)
            _fsync_file(tmp / "ema.safetensors")
        _write_state(tmp, "optimizer", optimizer)
        _write_state(tmp, "state", state)
        _write_json(tmp / "spec.resolved.json", spec, strict=True)
        _write_json(tmp / "meta.json", meta, strict=False)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": safe_state.sha256_file(p)}
                 for p in sorted(tmp.iterdir())}
        _write_json(tmp / MANIFEST, {"format": fmt, "step": step, "files": files}, strict=True)
        verify_checkpoint(tmp, step=step)
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
        rotate(root, keep, protect=final)
    _remove_stale_tmp(root)
    return final


def rotate(root: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete the step directories older than the ``keep``-th newest checkpoint that verifies (never
    ``protect``); with fewer than ``keep`` verified checkpoints nothing is deleted. Returns what was deleted."""
    found = _step_dirs(root)
    verified, cutoff = 0, None
    for step, p in found:
        if p == protect or _fault(p) is None:
            verified += 1
            if verified == keep:
                cutoff = step
                break
    if cutoff is None:
        return []
    doomed = [p for step, p in found if step < cutoff and p != protect]
    for p in doomed:
        _delete_dir(p)
    return doomed


# ------------------------------------------------------------------------------- verification
def step_of(path: Path) -> int | None:
    """The step of a ``step_XXXXXXXX`` directory name, else None."""
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*`` directory under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(((s, p) for p in root.iterdir() if (s := step_of(p)) is not None and p.is_dir()), reverse=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(path, f"not readable JSON ({str(e).splitlines()[0][:120]})") from None


def _read_manifest(path: Path) -> dict[str, Any]:
    man = _read_json(path / MANIFEST)
    if not isinstance(man, dict) or not isinstance(man.get("files"), dict) or man.get("format") not in _REQUIRED:
        raise CheckpointError(path / MANIFEST, "not a checkpoint manifest (format 1, 2 or 3 with a files table)")
    step = man.get("step")
    if type(step) is not int or step < 0:
        raise CheckpointError(path / MANIFEST, f"step {step!r} is not a step number")
    return man


def _check_safetensors_header(f: Path) -> dict[str, Any]:
    try:
        return safe_state.safetensors_header(f)
    except ValueError as e:
        raise CheckpointError(f, str(e)) from None


def verify_checkpoint(path: Path, *, step: int | None = None) -> dict[str, Any]:
    """Return the manifest of ``path`` after checking everything listed in the module docstring (format 1:
    sizes instead of hashes); raise :class:`CheckpointError` naming the first faulty file. ``step``: the step
    the manifest must record (default: the one in the directory name, if it has one)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "not a directory")
    man = _read_manifest(path)
    fmt, files = man["format"], man["files"]
    want = step if step is not None else step_of(path)
    if want is not None and man["step"] != want:
        raise CheckpointError(path / MANIFEST, f"records step {man['step']}, the directory is step {want}")
    for name in _REQUIRED[fmt]:
        if name not in files:
            raise CheckpointError(path / MANIFEST, f"does not list {name}")
    for name, rec in files.items():
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise CheckpointError(path / MANIFEST, f"lists {name!r}, which is not a file of the checkpoint")
        f = path / name
        if f.is_symlink() or not f.is_file():
            raise CheckpointError(f, "missing" if not f.exists() else "not a regular file")
        if fmt == 1:
            size, digest = rec, None
        else:
            size, digest = (rec.get("bytes"), rec.get("sha256")) if isinstance(rec, dict) else (None, None)
        if type(size) is not int or (fmt >= 2 and not isinstance(digest, str)):
            raise CheckpointError(path / MANIFEST, f"malformed entry for {name}")
        if f.stat().st_size != size:
            raise CheckpointError(f, f"has {f.stat().st_size} bytes, the manifest says {size}")
        if digest is not None and safe_state.sha256_file(f) != digest:
            raise CheckpointError(f, "SHA-256 differs from the manifest's (the file changed after it was written)")
    headers = {n: _check_safetensors_header(path / n) for n in files if n.endswith(".safetensors")}
    for name in files:
        if name.endswith(".json") and not isinstance(_read_json(path / name), (dict, list)):
            raise CheckpointError(path / name, "not a JSON object")
    if fmt == 3:  # the DCP metadata, read without unpickling (storage.sharded), names only listed shard files
        from storage.sharded import read_metadata

        try:
            md = read_metadata(path / ".metadata")
        except ValueError as e:
            raise CheckpointError(path / ".metadata", str(e).removeprefix(f"{path / '.metadata'}: ")) from None
        for info in (md.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            if name not in files:
                raise CheckpointError(path / ".metadata", f"refers to {name!r}, which the manifest does not list")
    if fmt >= 2:
        for part in ("optimizer", "state"):
            have = headers[f"{part}.safetensors"]
            for key in safe_state.tensor_refs(_read_json(path / f"{part}.json")):
                if key not in have:
                    raise CheckpointError(path / f"{part}.safetensors",
                                          f"has no tensor {key!r} ({part}.json refers to it)")
    return man


def checkpoint_format(path: Path) -> int:
    """The format (1, 2 or 3) its manifest records; :class:`CheckpointError` for a missing or bad manifest."""
    return int(_read_manifest(Path(path))["format"])


def _fault(path: Path) -> str | None:
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        return str(e)
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    return None


def scan_checkpoints(root: Path) -> Iterator[tuple[Path, str | None]]:
    """``(step directory, fault or None)`` for every ``step_*`` directory under ``root``, newest first,
    verified lazily (stop iterating once you have what you need)."""
    for _, p in _step_dirs(root):
        yield p, _fault(p)


def list_checkpoints(root: Path) -> list[Path]:
    """Step directories under ``root`` whose manifest lists files that are all present with their recorded
    sizes (a cheap completeness check, no hashing), oldest first. Missing ``root`` gives ``[]``."""
    out = []
    for _, p in reversed(_step_dirs(root)):
        try:
            man = _read_manifest(p)
            if all((p / n).is_file() and (p / n).stat().st_size == (r if man["format"] == 1 else r.get("bytes"))
                   for n, r in man["files"].items() if isinstance(n, str) and "/" not in n):
                out.append(p)
        except (CheckpointError, AttributeError, OSError):
            continue
    return out


def latest_checkpoint(root: Path, on_skip: Callable[[Path, str], None] | None = None) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; each newer one that does not is passed to
    ``on_skip(path, fault)`` (default: a warning). ``None`` if there is none."""
    for p, fault in scan_checkpoints(root):
        if fault is None:
            return p
        if on_skip is None:
            warnings.warn(f"skipping broken checkpoint {p.name}: {fault}", stacklevel=2)
        else:
            on_skip(p, fault)
    return None


def find_checkpoint(path: Path, on_skip: Callable[[Path, str], None] | None = None) -> Path:
    """``path`` itself if it is a checkpoint directory (verified), else the newest verified checkpoint of
    the run directory ``path``. FileNotFoundError when there is none, CheckpointError for a damaged one."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / "spec.resolved.json").is_file() and any(path.glob("*.safetensors")):
        verify_checkpoint(path)
        return path
    faults: list[str] = []
    ck = latest_checkpoint(path / "checkpoints", on_skip or (lambda p, f: faults.append(f)))
    if ck is not None:
        return ck
    if faults:
        raise CheckpointError(path / "checkpoints", "no checkpoint verifies: " + "; ".join(faults))
    raise FileNotFoundError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints")


# --------------------------------------------------------------------------------------- load
def _safetensors_device(map_location: Any) -> str:
    if isinstance(map_location, (torch.device, str)):
        return str(map_location)
    return "cpu"  # dicts/callables only make sense for torch.load


def _tensors(f: Path, dev: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(f, device=dev)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error type)
        raise CheckpointError(f, f"unreadable safetensors ({str(e).splitlines()[0][:120]})") from None


def _legacy(f: Path, map_location: Any) -> Any:
    """A format-1 pickle, read only with ``torch.load(weights_only=True)`` (no code runs)."""
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 (the unpickler raises many types)
        why = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f, "a pickle of an older fmzoo (checkpoint format 1) that torch.load(weights_only=True) "
                                 f"refuses ({why}); it is not unpickled. Its weights still sample and evaluate; "
                                 "to train on, start a new run") from None


def load_checkpoint(path: Path, map_location: Any = "cpu", *, verify: bool = True,
                    training_state: bool = True, weights: bool = True) -> Checkpoint:
    """Load a checkpoint directory (verified first unless ``verify=False``). ``map_location``: the device of
    the tensors (format 1: passed to ``torch.load``). ``training_state=False`` reads only the weights, spec
    and meta (sampling, evaluation); ``optimizer``/``state`` are then ``{}``. ``weights=False`` skips the
    weights (``model`` ``{}``, ``ema`` None): a sharded resume reads them from the shards."""
    path = Path(path)
    man = verify_checkpoint(path) if verify else _read_manifest(path)
    dev = _safetensors_device(map_location)
    optimizer: Any = {}
    state: Any = {}
    if training_state and man["format"] == 1:
        optimizer, state = _legacy(path / "optimizer.pt", map_location), _legacy(path / "state.pt", map_location)
    elif training_state:
        try:
            optimizer, state = (safe_state.join(_read_json(path / f"{p}.json"), _tensors(path / f"{p}.safetensors", dev))
                                for p in ("optimizer", "state"))
        except (KeyError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(path, f"optimizer/state JSON does not match its tensors ({e})") from None
    ema_file = path / "ema.safetensors"
    return Checkpoint(step=int(man["step"]), model=_tensors(path / "model.safetensors", dev) if weights else {},
                      ema=_tensors(ema_file, dev) if ema_file.is_file() and weights else None, optimizer=optimizer,
                      state=state,
                      spec=_read_json(path / "spec.resolved.json"), meta=_read_json(path / "meta.json"), path=path,
                      format=man["format"])


def load_weights(path: Path, *, prefer_ema: bool = True,
                 map_location: Any = "cpu") -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """For sampling: ``(spec, weights, is_ema)`` from a verified checkpoint directory. ``weights`` is the
    EMA if present and ``prefer_ema``, else the trained weights."""
    path = Path(path)
    verify_checkpoint(path)
    spec, dev = _read_json(path / "spec.resolved.json"), _safetensors_device(map_location)
    if prefer_ema and (path / "ema.safetensors").is_file():
        return spec, _tensors(path / "ema.safetensors", dev), True
    return spec, _tensors(path / "model.safetensors", dev), False
