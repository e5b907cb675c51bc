"""Latent caches: the autoencoder's identity, the shard plan, the manifest and its statistics.

A cache directory holds ``shard_{rank:02d}_{index:05d}.safetensors`` files (tensors ``mean`` ``(n, *latent)``,
optionally ``logvar`` of the same shape, ``label`` int64 ``(n,)``; for multi-stream data one ``mean.<stream>``
/ ``logvar.<stream>`` per stream) and ``manifest.json``. Stored latents are RAW (the autoencoder's native
units, :func:`zoo.autoencoders.base.moments`); the manifest's per-channel ``stats`` normalise them,
``z = (mean - stats.mean) / stats.std``, for training AND for decoding, ``decode_raw(z * std + mean)``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn


FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCATION_FIELDS = ("path", "run", "config")  # where an autoencoder lives is not what it is
KEY_FIELDS = ("identity", "data", "split", "shard_size", "num_samples", "latent_shape", "stored")


class CacheMismatch(ValueError):
    """A cache made with a different autoencoder or data than the spec names (the message shows both)."""


# ------------------------------------------------------------------------------------------- identity
def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over the state dict (sorted keys; each key, dtype, shape and raw bytes); ``"none"`` if empty."""
    sd = module.state_dict()
    if not sd:
        return "none"
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def strip_location(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: strip_location(v) for k, v in d.items() if k not in LOCATION_FIELDS}
    return d


def autoencoder_identity(params: Any, module: nn.Module) -> dict[str, Any]:
    """What the autoencoder IS: type, params (minus location-only fields), class name, weights hash."""
    return {"type": params.type, "params": strip_location(params.model_dump(mode="json")),
            "class": type(module).__name__, "weights_sha256": weights_sha256(module)}


def describe_identity(ident: dict[str, Any]) -> str:
    return (f"type={ident.get('type')!r} class={ident.get('class')!r} params={json.dumps(ident.get('params'), sort_keys=True)} "
            f"weights_sha256={ident.get('weights_sha256')}")


# ------------------------------------------------------------------------------------------ shard plan
@dataclass(frozen=True)
class Shard:
    rank: int
    index: int   # the rank's shard counter
    start: int   # first sample (inclusive)
    stop: int    # last sample (exclusive)

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def file(self) -> str:
        return f"shard_{self.rank:02d}_{self.index:05d}.safetensors"


def shard_plan(num_samples: int, shard_size: int, world_size: int) -> list[Shard]:
    """Contiguous shards of at most ``shard_size`` samples, dealt round-robin over ``world_size`` ranks."""
    if num_samples < 0 or shard_size < 1 or world_size < 1:
        raise ValueError(f"shard_plan: need num_samples >= 0, shard_size >= 1, world_size >= 1; "
                         f"got {num_samples}, {shard_size}, {world_size}")
    out = []
    for j, start in enumerate(range(0, num_samples, shard_size)):
        out.append(Shard(j % world_size, j // world_size, start, min(start + shard_size, num_samples)))
    return out


# -------------------------------------------------------------------------------------------- manifest
def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of ``cache_dir``; FileNotFoundError naming the command that makes it."""
    p = Path(cache_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"no latent cache at {Path(cache_dir)} (missing {MANIFEST}); make it with "
                                f"`python -m runtime.cache SPEC`")
    return json.loads(p.read_text())


def mismatch_message(old: dict[str, Any], new: dict[str, Any], where: Path) -> str | None:
    """None when ``old`` and ``new`` describe the same cache (KEY_FIELDS), else a message naming both."""
    diff = [k for k in KEY_FIELDS if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)]
    if not diff:
        return None
    lines = [f"{where} holds a cache made differently ({', '.join(diff)} differ); refusing to mix them:"]
    for k in diff:
        o, n = old.get(k), new.get(k)
        if k == "identity":
            o, n = describe_identity(o or {}), describe_identity(n or {})
        lines += [f"  cache {k}: {o if isinstance(o, str) else json.dumps(o, sort_keys=True)}",
                  f"  now   {k}: {n if isinstance(n, str) else json.dumps(n, sort_keys=True)}"]
    lines.append("use another --out, or delete the directory to re-cache")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ statistics
def leaves(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {"": x}


class ChannelStats:
    """Streaming per-channel mean / std (population) in float64 over batches ``(B, C, ...)`` (Chan's merge)."""

    def __init__(self) -> None:
        self.n: Tensor | None = None
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        c = x.shape[1]
        v = x.detach().double().transpose(0, 1).reshape(c, -1)
        n_b = torch.full((c,), float(v.shape[1]), dtype=torch.float64)
        mean_b = v.mean(1)
        m2_b = ((v - mean_b[:, None]) ** 2).sum(1)
        if self.n is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta ** 2 * self.n * n_b / n
        self.n = n

    def result(self) -> tuple[list[float], list[float]]:
        if self.n is None:
            raise ValueError("no samples to measure statistics on")
        return self.mean.tolist(), (self.m2 / self.n).sqrt().tolist()


def measure_stats(batches: Iterable[Any]) -> dict[str, Any]:
    """Per-channel ``{"mean": [...], "std": [...]}`` of raw latent batches (a dict of those per stream)."""
    acc: dict[str, ChannelStats] = {}
    for b in batches:
        for k, v in leaves(b).items():
            acc.setdefault(k, ChannelStats()).update(v)
    out = {k: dict(zip(("mean", "std"), s.result())) for k, s in acc.items()}
    return out[""] if set(out) == {""} else out


def stats_tensors(stats: dict[str, Any], latent_shape: Any) -> Any:
    """Manifest stats -> ``(mean, std)`` tensors broadcastable to ``(B, *latent_shape)``: ``(C, 1, ..., 1)``
    (a dict of such pairs per stream for dict latents)."""
    if isinstance(latent_shape, dict):
        return {k: stats_tensors(stats[k], v) for k, v in latent_shape.items()}
    view = (-1,) + (1,) * (len(latent_shape) - 1)
    return (torch.tensor(stats["mean"], dtype=torch.float32).view(view),
            torch.tensor(stats["std"], dtype=torch.float32).view(view))
