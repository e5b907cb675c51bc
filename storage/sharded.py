"""Sharded checkpoints (format 3): ``torch.distributed.checkpoint`` (DCP) shards beside the format-2 files.

A format-3 step directory holds everything format 2 holds (:mod:`storage.checkpoint`: the consolidated
``model.safetensors`` / ``ema.safetensors`` that sampling, evaluation and conversion read on one process,
``optimizer.json`` with the AdamW param groups, the run state, spec, meta, the SHA-256 manifest) plus DCP's
files: ``__<rank>_0.distcp`` (each rank's shards of the weights, EMA and AdamW moments) and ``.metadata`` (which
tensor chunks live where). DCP reshards on load, so a run saved by N ranks resumes on M (any ``train.parallel``).

Nothing is unpickled: DCP writes ``.metadata`` with :mod:`pickle`, so :class:`SafeReader` reads it with
:class:`MetadataUnpickler`, a :class:`pickle.Unpickler` whose ``find_class`` resolves only the classes of DCP's
metadata (:data:`ALLOWED_GLOBALS`: its dataclasses, ``torch.Size``, dtypes, torch's layout lookup by name, a
``pathlib`` path) and refuses every other global
with :class:`UnsafeCheckpoint` -- so a ``__reduce__`` naming ``os.system`` or any other callable never runs.
The tensors inside the ``.distcp`` files are read by DCP's own reader with ``torch.load(weights_only=True)``
(torch's restricted unpickler). Only tensors are saved through DCP (no byte entries, which DCP's default
planner would ``torch.load`` without that restriction); :class:`SafeReader` refuses metadata that lists any.

Saving is collective (every rank calls :func:`save_shards` and :func:`full_weights`); rank 0 then finishes the
directory with :func:`storage.checkpoint.save_checkpoint` (``staged=``), which hashes every file, writes the
manifest last and renames the directory into place: a save killed on any rank leaves no ``step_*`` directory.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ALLOWED_GLOBALS", "MetadataUnpickler", "SafeReader", "UnsafeCheckpoint", "full_weights", "load_shards",
           "read_metadata", "save_shards", "shard_shapes"]

METADATA = ".metadata"

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
        "MetadataIndex", "StorageMeta", "BytesStorageMetadata")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("collections", "OrderedDict"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")} | {("torch", str(d).removeprefix("torch.")) for d in (
         torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
         torch.uint8, torch.bool, torch.complex64)})
"""``(module, name)`` pairs :class:`MetadataUnpickler` resolves: what ``torch.distributed.checkpoint``'s metadata
pickle names; each builds a value from plain data and runs nothing else."""


class UnsafeCheckpoint(ValueError):
    """A checkpoint file asks the unpickler for something outside :data:`ALLOWED_GLOBALS`."""


class MetadataUnpickler(pickle.Unpickler):
    """:class:`pickle.Unpickler` restricted to :data:`ALLOWED_GLOBALS` (Python's documented way to restrict
    globals: ``find_class``); ``persistent_load`` is refused too."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafeCheckpoint(f"refers to {module}.{name}, which a checkpoint's metadata may not hold")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpoint("holds a persistent reference, which a checkpoint's metadata may not hold")


def read_metadata(path: Path) -> Any:
    """DCP's ``.metadata`` file -> its ``Metadata``, read with :class:`MetadataUnpickler`; ValueError (an
    :class:`UnsafeCheckpoint` for forbidden content) naming the file for anything that is not DCP metadata."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    try:
        md = MetadataUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"{path}: {e}; it was not unpickled") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: not readable DCP metadata ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(md, Metadata):
        raise ValueError(f"{path}: holds a {type(md).__name__}, not DCP metadata")
    byte_items = [k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if byte_items:
        raise UnsafeCheckpoint(f"{path}: lists non-tensor entries ({byte_items[0]}, ...), which are never loaded")
    return md


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeReader(FileSystemReader):
        """DCP's file-system reader with :func:`read_metadata` in place of its plain ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = read_metadata(Path(self.path) / METADATA)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return _SafeReader


def SafeReader(path: Path) -> Any:  # noqa: N802 (a class factory: torch.distributed is imported lazily)
    """A ``torch.distributed.checkpoint`` storage reader of ``path`` that unpickles nothing outside the allow-list."""
    return _reader_class()(str(path))


def _state(model: nn.Module, ema: nn.Module | None, opt: torch.optim.Optimizer) -> tuple[dict, list]:
    """The tensors DCP saves / loads into: ``{"model": ..., "ema": ..., "optim": {fqn: {exp_avg, exp_avg_sq,
    step}}}`` (sharded DTensors where the modules are sharded; the optimizer state initialised if still empty),
    and the optimizer's param groups (parameter names instead of indices)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt)
    out: dict[str, Any] = {"model": get_model_state_dict(model), "optim": osd["state"]}
    if ema is not None:
        out["ema"] = get_model_state_dict(ema)
    return out, osd["param_groups"]


def save_shards(path: Path, model: nn.Module, ema: nn.Module | None, opt: torch.optim.Optimizer) -> list[dict]:
    """Collective: every rank writes its shards into the directory ``path`` (which exists); returns the param
    groups (plain JSON values) for ``optimizer.json``."""
    import torch.distributed.checkpoint as dcp

    state, groups = _state(model, ema, opt)
    dcp.save(state, checkpoint_id=str(path))
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups]


def load_shards(path: Path, model: nn.Module, ema: nn.Module | None, opt: torch.optim.Optimizer,
                param_groups: list[dict]) -> None:
    """Collective: load a format-3 checkpoint's shards into ``model``, ``ema`` and ``opt`` as they are sharded
    now (any world size); ``param_groups`` (from ``optimizer.json``, hyper-parameters already updated) replace
    the optimizer's. ValueError for a file that is not what it should be (its name in the message)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state, _ = _state(model, ema, opt)
    try:
        dcp.load(state, storage_reader=SafeReader(path))
    except UnsafeCheckpoint:
        raise
    except CheckpointException as e:  # every rank's fault, by rank (a BaseException: caught by name)
        first = next(iter(e.failures.values()), e)
        first = getattr(first, "exc", first)  # a wrapped remote traceback
        text = str(first).strip().splitlines()
        why = f"{type(first).__name__}: {text[0][:200]}" if text else type(first).__name__
        raise ValueError(f"{path}: a shard file does not load with torch.load(weights_only=True) or does not fit "
                         f"({why}); nothing in it was unpickled") from None
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: the sharded state does not fit this model ({str(e).splitlines()[0][:200]})") from None
    set_model_state_dict(model, state["model"])
    if ema is not None:
        set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, opt, {"state": state["optim"], "param_groups": param_groups})


def full_weights(module: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Collective: ``module``'s whole state dict as plain CPU tensors (gathered from the shards) on rank 0
    (on every rank with ``rank0_only=False``); ``{}`` on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))


def shard_shapes(ck: Path) -> dict[str, tuple[int, ...]]:
    """Global shapes of the tensors in a format-3 checkpoint's DCP metadata (``model.<name>``, ``optim.<fqn>.exp_avg``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_metadata(Path(ck) / METADATA)
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
