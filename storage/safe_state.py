"""Non-weight state without pickle: nested Python values as JSON, every tensor in a safetensors file.

``split(obj)`` walks dicts, lists and tuples and returns ``(doc, tensors)``: ``doc`` is plain JSON in which each
tensor is replaced by ``{"__tensor__": key}`` (``key`` = its path, e.g. ``"state/3/exp_avg"``) and ``tensors``
maps those keys to detached, contiguous CPU copies. Tuples become ``{"__tuple__": [...]}`` and dicts whose keys
are not all strings (an optimizer's ``state`` is keyed by parameter index) ``{"__dict__": [[key, value], ...]}``,
so ``join(doc, tensors)`` gives back the same types. Allowed leaves: None, bool, int, float (NaN and
Infinity are written as JSON's ``NaN``/``Infinity``), str, numpy scalars (stored as Python numbers) and
tensors; anything else is a ``TypeError`` naming its path. Reading is ``json.loads`` plus
``safetensors.torch.load_file``: nothing a file holds is ever executed.

``sha256_file`` hashes a file, remembering the digest of a file it has already read as long as the file's
identity (device, inode) and its size, mtime and ctime are unchanged: any write to the file changes its ctime,
which no user tool can set back. ``safetensors_header`` checks a safetensors header against its file.
``rng_state``/``set_rng_state`` capture and restore the global RNGs in a form ``split`` stores: Python's and
numpy's states as integer lists, torch's as a byte tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["split", "join", "tensor_refs", "dumps", "sha256_file", "safetensors_header", "rng_state", "set_rng_state"]

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def split(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``obj`` -> ``(JSON document, {key: CPU tensor})``; see the module docstring."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(v: Any, path: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (np.bool_, np.integer, np.floating)):
            return v.item()
        if isinstance(v, torch.Tensor):
            key = path or "."
            tensors[key] = v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
            return {_TENSOR: key}
        if isinstance(v, tuple):
            return {_TUPLE: [walk(x, f"{path}/{i}") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [walk(x, f"{path}/{i}") for i, x in enumerate(v)]
        if isinstance(v, dict):
            plain = all(isinstance(k, str) and not (k.startswith("__") and k.endswith("__")) for k in v)
            if plain:
                return {k: walk(x, f"{path}/{k}") for k, x in v.items()}
            for k in v:
                if not isinstance(k, (str, int, bool)) and k is not None:
                    raise TypeError(f"{path or '.'}: dict key {k!r} ({type(k).__name__}) cannot be stored")
            return {_DICT: [[k, walk(x, f"{path}/{k}")] for k, x in v.items()]}
        raise TypeError(f"{path or '.'}: {type(v).__name__} cannot be stored without pickle "
                        "(use numbers, strings, lists, dicts or tensors)")

    return walk(obj, prefix), tensors


def tensor_refs(doc: Any) -> list[str]:
    """Every tensor key a JSON document made by :func:`split` refers to."""
    out: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if set(v) == {_TENSOR}:
                out.append(str(v[_TENSOR]))
                return
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(doc)
    return out


def join(doc: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split`; ``KeyError`` naming the key if a referenced tensor is missing."""

    def walk(v: Any) -> Any:
        if isinstance(v, list):
            return [walk(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            (k, x), = v.items()
            if k == _TENSOR:
                if x not in tensors:
                    raise KeyError(f"tensor {x!r} is missing")
                return tensors[x]
            if k == _TUPLE and isinstance(x, list):
                return tuple(walk(e) for e in x)
            if k == _DICT and isinstance(x, list):
                return {_key(p): walk(p[1]) for p in x}
        return {k: walk(x) for k, x in v.items()}

    return walk(doc)


def _key(pair: Any) -> Any:
    if not isinstance(pair, list) or len(pair) != 2 or isinstance(pair[0], (list, dict)):
        raise ValueError(f"malformed {_DICT} entry {str(pair)[:80]}")
    return pair[0]


def dumps(doc: Any) -> str:
    """Compact JSON (NaN/Infinity allowed: a run's state may hold them)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=True)


_MEMO: dict[tuple[int, int, int, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of ``path`` (memoised per file identity, size, mtime and ctime)."""
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if ident in _MEMO:
        return _MEMO[ident]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    st2 = os.stat(path)
    digest = h.hexdigest()
    if (st2.st_dev, st2.st_ino, st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns) == ident:
        _MEMO[ident] = digest  # unchanged while it was read
    return digest


def load_state_strict(net: torch.nn.Module, weights: str | Path, what: str, hint: str) -> torch.nn.Module:
    """Load the safetensors state dict ``weights`` into ``net`` (every key, no other); FileNotFoundError naming
    the file and ``hint`` (where such a file comes from), ValueError when the keys are not ``what``'s."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(weights))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} weights not found: {weights} ({hint})") from None
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: not a{'n' if what[0] in 'AEIOU' else ''} {what} state dict (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    return net


def safetensors_header(f: Path) -> dict[str, Any]:
    """Parse the header (u64 little-endian length + JSON) and check that every tensor's byte range fits its
    dtype and shape and that the ranges fill the data section exactly. Returns the header; ValueError."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError("too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):  # safetensors' own limit is 100 MB
            raise ValueError(f"header length {n} exceeds the file or 100 MB")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"header is not JSON ({str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in v["data_offsets"])
            numel = 1
            for d in v["shape"]:
                if type(d) is not int or d < 0:
                    raise ValueError(f"bad dimension {d!r}")
                numel *= d
            if not 0 <= a <= b or b - a != numel * _DTYPE_BYTES[v["dtype"]]:
                raise ValueError(f"{b - a} bytes for shape {v['shape']} of {v['dtype']}")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tensor {k!r}: malformed header entry ({e})") from None
        end = max(end, b)
    if 8 + n + end != size:
        raise ValueError(f"header describes {8 + n + end} bytes, the file has {size}")
    return header


def rng_state() -> dict[str, Any]:
    """Global RNG states: ``{"python": [version, [625 ints], gauss], "numpy": ["MT19937", [624 ints], pos,
    has_gauss, gauss], "torch": ByteTensor, "cuda": list[ByteTensor] (only if CUDA is available)}``."""
    py = random.getstate()
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    d: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [str(kind), [int(k) for k in key], int(pos), int(has_gauss), float(gauss)],
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
        random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    if "numpy" in d:
        kind, key, pos, has_gauss, gauss = d["numpy"]
        np.random.set_state((kind, np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
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
