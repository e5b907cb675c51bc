"""``latent_shards``: a latent cache written by ``python -m runtime.cache SPEC`` (see :mod:`storage.latent_cache`).

Items are ``(z, label)`` with ``z = (m - stats.mean) / stats.std`` per channel (``(C, ...)`` float32, a dict by
stream for multi-stream data), ``m`` the stored posterior mean or, with ``sample_posterior``, the draw
``mean + exp(logvar / 2) * eps`` (REPA). With ``raw`` the item is ``({"latent": z, "raw": x}, label)``, ``x``
the source sample in data space (for frozen teachers such as REPA's DINOv2).

Shapes: ``sample_shape()`` is the DATA-space shape of the source samples (what the autoencoder encodes and
what decoding returns), so every ``spec.autoencoder.latent_shape(spec.data.sample_shape())`` stays right;
``latent_shape()`` is the stored latent shape of one item.

Posterior noise: ``eps`` comes from a generator seeded by ``(seed, index, epoch)``: a pure function of the
item, hence identical in every worker, on any number of ranks and after a resume. The dataset has
``len == num_samples``; an index ``i + e * num_samples`` means "draw ``e`` of sample ``i``", so a sampler that
passes ``epoch * len + i`` gets a fresh draw per epoch, and one that passes ``i`` gets draw 0 every time.
"""
from __future__ import annotations

import bisect
import contextlib
import contextvars
import functools
import json
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor
from torch.utils.data import Dataset

from registry.kinds import DATASETS
from storage.latent_cache import MANIFEST, read_manifest, stats_tensors, strip_location
from zoo.core.params import DataParams, Root
from zoo.data.errors import DataError, check_split

TAG = "latent_shards"
_CHECK_CACHE = contextvars.ContextVar("latent_shards_check_cache", default=True)


@contextlib.contextmanager
def without_cache_checks() -> Iterator[None]:
    """Validate specs without comparing them to the cache on disk (``runtime.cache`` makes or fixes that cache)."""
    token = _CHECK_CACHE.set(False)
    try:
        yield
    finally:
        _CHECK_CACHE.reset(token)


@functools.lru_cache(maxsize=16)
def _manifest_at(path: str, mtime_ns: int) -> dict[str, Any]:
    return read_manifest(path)


def load_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the cache at ``path`` (re-read when the file changes), or None when there is none."""
    p = Path(path) / MANIFEST
    return _manifest_at(str(Path(path)), p.stat().st_mtime_ns) if p.is_file() else None


def _shape(s: Any) -> Any:
    return {k: tuple(int(i) for i in v) for k, v in s.items()} if isinstance(s, dict) else tuple(int(i) for i in s)


def stats_body(stats: dict[str, Any]) -> dict[str, Any]:
    """``{"mean", "std"}`` (or ``{stream: {"mean", "std"}}``) of a manifest's ``stats`` block."""
    return stats["streams"] if "streams" in stats else {"mean": stats["mean"], "std": stats["std"]}


class LatentShardsParams(DataParams):
    """A latent cache; normalised with the manifest's per-channel statistics."""

    type: Literal["latent_shards"] = Field(..., description="Latents cached by `python -m runtime.cache SPEC`.")
    latent_cache: ClassVar[bool] = True
    source: "DataSpec | None" = Field(  # noqa: F821 (resolved by registry.spec.rebuild)
        None, description="The data the cache encodes (what `runtime.cache` reads); lets specs validate and "
                          "dry-run before the cache exists. Without it, shapes and classes come from the manifest.")
    path: str = Field(..., description="Cache directory of the train split (holds manifest.json).")
    eval_path: str | None = Field(None, description="Cache directory of the eval split (`--split eval`), if any.")
    stats: Literal["measured", "autoencoder"] = Field(
        "measured", description="Normalisation the cache must carry: per-channel statistics measured over the cache, "
                                "or the autoencoder's published shift/scale (SD-VAE: 0.18215). Checked against the manifest.")
    sample_posterior: bool = Field(
        False, description="Draw mean + exp(logvar/2)*eps per item (REPA) instead of the mean; eps seeded by "
                           "(seed, index, epoch). The mean when the cache stores no logvar.")
    raw: bool = Field(False, description="Also return the source sample (data space) for frozen teachers (REPA); "
                                         "needs `source`.")
    seed: int = Field(0, ge=0, description="Seed of the posterior noise.")

    @field_validator("path")
    @classmethod
    def _manifest_or_source(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("source") is None and _CHECK_CACHE.get() and not (Path(v) / MANIFEST).is_file():
            raise ValueError(f"no latent cache at {v!r} (missing {MANIFEST}) and no data.source to describe it: "
                             f"make the cache with `python -m runtime.cache SPEC`, or set data.source")
        return v

    def manifest(self, split: str = "train") -> dict[str, Any]:
        path = self.path if split == "train" else self.eval_path
        m = load_manifest(path) if path is not None else None
        if m is None:
            raise FileNotFoundError(f"no latent cache for split {split!r} at {path!r} (missing {MANIFEST}): make it "
                                    f"with `python -m runtime.cache SPEC{'' if split == 'train' else ' --split eval'}`")
        return m

    def data_space(self) -> Any:
        """The params of the encoded data: ``source``, or the data spec recorded in the manifest."""
        if self.source is not None:
            return self.source
        from registry.kinds import DATASETS

        data = self.manifest()["data"]
        return DATASETS.get(data["type"]).Params.model_validate(data)

    @property
    def num_classes(self) -> int:
        return int(self.source.num_classes) if self.source is not None else int(self.manifest()["num_classes"])

    def sample_shape(self) -> Any:
        """Data-space shape of one source sample, e.g. ``(3, 256, 256)`` (a dict by stream)."""
        return _shape(self.source.sample_shape() if self.source is not None else self.manifest()["input_shape"])

    def latent_shape(self) -> Any:
        """Stored latent shape of one item, e.g. ``(4, 32, 32)`` (from the manifest)."""
        return _shape(self.manifest()["latent_shape"])

    def stream_rates(self) -> Any:
        return self.source.stream_rates() if self.source is not None else None

    def problems(self, spec: Any) -> Iterator[tuple[str, str]]:
        if self.source is not None and self.source.type == TAG:
            yield "source", "the source of a latent cache cannot itself be a latent cache"
            return
        if self.raw and self.source is None:
            yield "raw", "raw samples come from data.source; set it"
        elif self.raw and isinstance(self.source.sample_shape(), dict):
            yield "raw", "raw samples are supported for single-stream data only"
        if spec.teachers and not self.raw:
            yield "raw", (f"teachers {sorted(spec.teachers)} see data-space samples, which a latent cache does "
                               f"not hold: set data.raw = true (reads data.source alongside the cache)")
        m = load_manifest(self.path) if _CHECK_CACHE.get() else None
        if m is None:
            return  # dry runs and validation work before the cache exists; training says how to make it
        if not m.get("complete"):
            yield "path", f"the cache at {self.path} is incomplete (interrupted?): rerun `python -m runtime.cache SPEC`"
            return
        if m.get("split") != "train":
            yield "path", f"{self.path} caches split {m.get('split')!r}; data.path is the train cache"
        if self.source is not None and m.get("data") != self.source.model_dump(mode="json"):
            yield "source", (f"the cache at {self.path} encodes {json.dumps(m.get('data'), sort_keys=True)}, "
                                  f"not {json.dumps(self.source.model_dump(mode='json'), sort_keys=True)}; re-cache")
        if m.get("stats", {}).get("source") != self.stats:
            yield "stats", (f"the cache at {self.path} holds {m.get('stats', {}).get('source')!r} statistics, the "
                                 f"spec asks for {self.stats!r}; re-run `python -m runtime.cache SPEC --stats {self.stats}`")
        try:
            want = _shape(spec.autoencoder.latent_shape(self.sample_shape()))
        except ValueError:
            return  # the autoencoder's own problems() says why
        if want != _shape(m["latent_shape"]):
            yield Root("autoencoder"), (f"the cache at {self.path} holds latents of shape {m['latent_shape']}, the spec's "
                                  f"autoencoder gives {want}; re-cache with this autoencoder")
        ident = m.get("identity", {})

        if ident.get("type") != spec.autoencoder.type or ident.get("params") != strip_location(
                spec.autoencoder.model_dump(mode="json")):
            yield Root("autoencoder"), (f"the cache at {self.path} was made with autoencoder {ident.get('type')!r} "
                                  f"{json.dumps(ident.get('params'), sort_keys=True)}; the spec names "
                                  f"{spec.autoencoder.type!r} {json.dumps(strip_location(spec.autoencoder.model_dump(mode='json')), sort_keys=True)}; "
                                  f"re-cache with `python -m runtime.cache SPEC`")


def noise_seed(seed: int, index: int, epoch: int) -> int:
    """The posterior-noise generator seed of draw ``epoch`` of sample ``index``."""
    return int(np.random.SeedSequence([int(seed), int(index), int(epoch)]).generate_state(1, np.uint64)[0] >> 1)


@DATASETS.register
class LatentShards(Dataset):
    """Map-style: ``ds[i] -> (z (C, ...) float32, label int)``; see the module docstring."""

    Params = LatentShardsParams
    tag = TAG

    def __init__(self, params: LatentShardsParams, split: str = "train"):
        check_split(TAG, split)
        try:
            m = params.manifest(split)
        except FileNotFoundError as e:
            raise DataError(f"{TAG}: {e}") from None
        self.params, self.split, self.dir = params, split, Path(params.path if split == "train" else params.eval_path)
        if not m.get("complete"):
            raise DataError(f"{TAG}: the cache at {self.dir} is incomplete; rerun `python -m runtime.cache SPEC`")
        if m.get("split") != split:
            raise DataError(f"{TAG}: {self.dir} caches split {m.get('split')!r}, not {split!r}")
        self.manifest, self.n = m, int(m["num_samples"])
        self.shards = sorted(m["shards"], key=lambda s: s["start"])
        self.starts = [s["start"] for s in self.shards]
        covered = [(s["start"], s["stop"]) for s in self.shards]
        if [a for a, _ in covered] != [0] + [b for _, b in covered[:-1]] or (covered and covered[-1][1] != self.n):
            raise DataError(f"{TAG}: the shards of {self.dir} do not cover samples 0..{self.n - 1} exactly once")
        self.latent = _shape(m["latent_shape"])
        self.streams = sorted(self.latent) if isinstance(self.latent, dict) else None
        self.stats = stats_tensors(stats_body(m["stats"]), self.latent)
        self.has_logvar = "logvar" in m["stored"]
        self.num_classes = int(m["num_classes"])
        self.source = DATASETS.build(params.source, split=split) if params.raw else None
        self._files: dict[str, Any] = {}

    epoch_indexed = True
    """The loader passes ``epoch * len + i`` (a fresh posterior draw of sample ``i`` per epoch)."""

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:  # open file handles stay in their process
        return {**self.__dict__, "_files": {}}

    def _open(self, name: str) -> Any:
        f = self._files.get(name)
        if f is None:
            from safetensors import safe_open

            f = self._files[name] = safe_open(str(self.dir / name), framework="pt")
        return f

    def raw_item(self, index: int) -> tuple[Any, Any, int]:
        """Stored ``(mean, logvar or None, label)`` of sample ``index`` (``0 <= index < len``), raw units."""
        k = bisect.bisect_right(self.starts, index) - 1
        shard = self.shards[k]
        f, j = self._open(shard["file"]), index - shard["start"]

        def get(name: str) -> Tensor:
            return f.get_slice(name)[j:j + 1][0].float()

        if self.streams is None:
            mean, logvar = get("mean"), (get("logvar") if self.has_logvar else None)
        else:
            mean = {s: get(f"mean.{s}") for s in self.streams}
            logvar = {s: get(f"logvar.{s}") for s in self.streams} if self.has_logvar else None
        return mean, logvar, int(f.get_slice("label")[j:j + 1][0])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        index = int(index)
        if index < 0:
            index += self.n
        if index < 0:
            raise IndexError(f"{TAG}: index {index} out of range for length {self.n}")
        epoch, i = divmod(index, self.n)
        mean, logvar, label = self.raw_item(i)
        gen = None
        if self.params.sample_posterior and logvar is not None:
            gen = torch.Generator().manual_seed(noise_seed(self.params.seed, i, epoch))

        def norm(m: Tensor, lv: Tensor | None, st: tuple[Tensor, Tensor]) -> Tensor:
            if gen is not None:
                m = m + torch.exp(0.5 * lv) * torch.randn(m.shape, generator=gen)
            return ((m - st[0]) / st[1]).float()

        if self.streams is None:
            z: Any = norm(mean, logvar, self.stats)
        else:
            z = {s: norm(mean[s], logvar[s] if logvar is not None else None, self.stats[s]) for s in self.streams}
        if self.source is not None:
            return {"latent": z, "raw": self.source[i][0]}, label
        return z, label

    def __repr__(self) -> str:
        return f"LatentShards(split={self.split!r}, dir={str(self.dir)!r}, n={self.n}, latent={self.latent})"
