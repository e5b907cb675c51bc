"""Evaluation at scale: deterministic samples, sharded over ranks, streamed into metric features, resumable.

**Which rank makes which sample.** The ``num`` samples are cut into chunks of ``batch_size`` consecutive
indices (chunk ``c`` = samples ``c * batch_size .. (c + 1) * batch_size - 1``, the last one shorter), and rank
``r`` of ``W`` takes chunks ``r, r + W, r + 2W, ...`` (strided over chunks, contiguous within one). A chunk is
always one batch of the same samples, whatever ``W`` is, and sample ``i``'s noise, every stochastic solver draw
and its label come from ``(seed, i)`` alone (:func:`runtime.sample.generate_indexed`): 1 process and 8 make the
same bytes, and a shard written by one layout serves another.

**Shards.** Each chunk becomes one ``chunk_NNNNNNN.safetensors`` in the shard folder (written to a temporary
name, then renamed, so a file that exists is complete): ``index`` ``(B,)`` int64, ``label`` ``(B,)`` int64 (if
conditional), ``m<j>.<name>`` = metric ``j``'s :meth:`zoo.core.protocols.Metric.sample_features` rows, and
``image`` ``(B, H, W, 3)`` uint8 when an ADM-style npz is asked for. ``manifest.json`` records what the shards
are of (checkpoint weights digest, sampling settings, metrics); a rerun with the same manifest skips the chunks
already written (an interrupted evaluation resumes), a different one is refused. No pickle anywhere.

**Reduction.** After every rank is done, rank 0 reads the shards in chunk order and hands each metric all
of its feature rows (:meth:`~zoo.core.protocols.Metric.from_features`); the in-loop evaluation
(``eval.every``, :class:`runtime.train.Evaluator`) runs this same function, so online and offline numbers
agree exactly at equal ``num``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from runtime.distributed import DistInfo, all_true, barrier
from runtime.sample import generate_indexed, indexed_labels


@dataclass(frozen=True)
class SamplePlan:
    """What is sampled: ``num`` samples in chunks of ``batch_size``, noise seed ``seed``, labels ``label_mode``
    (``cycle`` over ``labels`` or all classes, or ``uniform``), guidance ``cfg_scale`` on ``[guidance_low,
    guidance_high]``, from the EMA weights when ``use_ema``."""

    num: int
    batch_size: int
    seed: int
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    labels: tuple[int, ...] | None = None
    label_mode: str = "cycle"
    use_ema: bool = True

    @property
    def num_chunks(self) -> int:
        return -(-self.num // self.batch_size)

    def chunk_indices(self, c: int) -> list[int]:
        """The global sample indices of chunk ``c``."""
        return list(range(c * self.batch_size, min(self.num, (c + 1) * self.batch_size)))

    def chunks_of(self, rank: int, world_size: int) -> list[int]:
        """The chunks rank ``rank`` of ``world_size`` makes: ``rank, rank + world_size, ...``."""
        return list(range(rank, self.num_chunks, world_size))

    def label_of(self, num_classes: int) -> Callable[[list[int]], torch.Tensor | None]:
        return lambda idx: indexed_labels(idx, num_classes, list(self.labels) if self.labels else None, self.seed,
                                          self.label_mode)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of the names, dtypes, shapes and bytes of ``module``'s state dict (what the shards were made with)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def manifest_for(graph: Any, plan: SamplePlan, metrics_json: list[dict], images: bool) -> dict[str, Any]:
    """The identity of an evaluation: sampling settings, solver, metrics, image keeping, the weights' digest."""
    net = graph.ema.module if (plan.use_ema and graph.ema is not None) else graph.backbone
    return {"plan": {**asdict(plan), "labels": list(plan.labels) if plan.labels else None},
            "solver": graph.spec.solver.model_dump(mode="json"), "metrics": metrics_json, "images": images,
            "weights_sha256": weights_digest(net)}


def _shard_path(folder: Path, c: int) -> Path:
    return folder / f"chunk_{c:07d}.safetensors"


def _prepare(folder: Path, manifest: dict[str, Any], info: DistInfo) -> None:
    """Rank 0 writes ``manifest.json`` or checks an existing one; every rank raises when it does not match."""
    ok, why = True, ""
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "manifest.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                old, why = None, f"unreadable ({e})"
            if old is not None and old != manifest:
                diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                why = f"it differs in {diff}"
            ok = not why
        else:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(tmp, path)
    if not all_true(ok, info):
        raise ValueError(f"{folder}: its shards were written for another evaluation ({why or 'see rank 0'}); "
                         f"remove the folder or name another one")


def quantized_nhwc(samples: torch.Tensor) -> torch.Tensor:
    """Images ``(B, C, H, W)`` in [-1, 1] -> uint8 ``(B, H, W, 3)``, the rounding the image metrics use."""
    from zoo.metrics.standard import quantize

    return quantize(samples).permute(0, 2, 3, 1).contiguous()


def _write_chunk(folder: Path, c: int, tensors: dict[str, torch.Tensor]) -> None:
    """One shard. A tensor that is another key's very tensor (metrics that keep the samples themselves) is stored
    once; the other keys name it in the ``aliases`` metadata; other overlapping views are copied."""
    path = _shard_path(folder, c)
    tmp = path.with_name(path.name + ".tmp")
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, v in tensors.items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if ident in first:
            aliases[k] = first[ident]
            continue
        first[ident] = k
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.contiguous() if ptr not in storages else v.clone()
        storages.add(ptr)
    save_file(out, str(tmp), metadata={"aliases": json.dumps(aliases, sort_keys=True)})
    os.replace(tmp, path)


def load_chunk(path: Path) -> dict[str, torch.Tensor]:
    """A shard's tensors by key, aliases resolved (:func:`_write_chunk`)."""
    with safe_open(str(path), framework="pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    out.update({k: out[v] for k, v in aliases.items()})
    return out


def _make_chunk(graph: Any, metrics: list[Any], plan: SamplePlan, c: int, images: bool,
                png_dir: Path | None) -> dict[str, torch.Tensor]:
    """Sample chunk ``c`` and take every metric's features of it (and the uint8 images / PNGs if asked)."""
    idx = plan.chunk_indices(c)
    label_of = plan.label_of(graph.num_classes)
    samples = generate_indexed(graph, idx, label_of, seed=plan.seed, cfg_scale=plan.cfg_scale,
                               guidance_low=plan.guidance_low, guidance_high=plan.guidance_high, use_ema=plan.use_ema)
    labels = label_of(idx)
    out: dict[str, torch.Tensor] = {"index": torch.tensor(idx, dtype=torch.long)}
    if labels is not None:
        out["label"] = labels
    for j, m in enumerate(metrics):
        for k, v in m.sample_features(samples, labels).items():
            if len(v) != len(idx):
                raise ValueError(f"metric {type(m).__name__}: sample_features gave {len(v)} rows of {k!r} for "
                                 f"{len(idx)} samples")
            out[f"m{j}.{k}"] = v.detach().cpu()
    if images or png_dir is not None:
        if isinstance(samples, dict) or samples.dim() != 4:
            raise ValueError("--save-npz / --save-png need image samples (N, C, H, W); this run's samples are "
                             f"{'a dict of streams' if isinstance(samples, dict) else tuple(samples.shape)}")
        u8 = quantized_nhwc(samples)
        if images:
            out["image"] = u8
        if png_dir is not None:
            from zoo.media import write_png

            for i, im in zip(idx, u8.numpy()):
                write_png(png_dir / f"{i:06d}.png", im)
    return out


def read_shards(folder: Path, plan: SamplePlan, keys: Callable[[str], bool] = lambda k: True) -> dict[str, torch.Tensor]:
    """All chunks' tensors whose key passes ``keys``, concatenated in chunk (= sample index) order."""
    parts: dict[str, list[torch.Tensor]] = {}
    for c in range(plan.num_chunks):
        path = _shard_path(folder, c)
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing shard (a rank did not finish)")
        for k, v in load_chunk(path).items():
            if keys(k):
                parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def write_npz_streamed(path: Path, folder: Path, plan: SamplePlan) -> Path:
    """``arr_0`` uint8 ``(num, H, W, 3)`` (+ ``arr_1`` int64 labels) from the shards' images, the ADM evaluator's
    sample batch layout, written chunk by chunk into the zip (never all images in memory)."""
    first = load_chunk(_shard_path(folder, 0))
    h, w, ch = first["image"].shape[1:]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    labels = []
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                    "shape": (plan.num, int(h), int(w), int(ch))})
            for c in range(plan.num_chunks):
                t = load_chunk(_shard_path(folder, c))
                f.write(t["image"].numpy().tobytes())
                if "label" in t:
                    labels.append(t["label"].numpy())
        if labels:
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64))
    os.replace(tmp, path)
    return path


def evaluate_sharded(graph: Any, metrics: list[Any], metrics_json: list[dict], plan: SamplePlan, folder: Path,
                     info: DistInfo = DistInfo(), *, save_npz: Path | None = None, save_png: Path | None = None,
                     progress: bool = True, keep: bool = False) -> dict[str, float] | None:
    """Sample ``plan`` over the ranks of ``info`` into shards under ``folder`` (skipping chunks already there),
    then, on rank 0, every metric's values from all shards (``{name: value}``; None on the other ranks).
    ``save_npz`` / ``save_png``: the samples also as an ADM-style npz / ``{index:06d}.png`` files. ``keep``: leave
    the shards (else rank 0 removes the folder after a complete evaluation)."""
    _prepare(folder, manifest_for(graph, plan, metrics_json, save_npz is not None), info)
    if save_png is not None:
        save_png.mkdir(parents=True, exist_ok=True)
    mine = plan.chunks_of(info.rank, info.world_size)
    todo = [c for c in mine if not _shard_path(folder, c).exists()]
    size = lambda cs: sum(len(plan.chunk_indices(c)) for c in cs)  # noqa: E731
    bar = tqdm(total=size(mine), initial=size(mine) - size(todo), disable=not (info.is_main and progress),
               desc=f"sampling (rank 0 of {info.world_size})", unit="sample", dynamic_ncols=True, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    for c in todo:
        _write_chunk(folder, c, _make_chunk(graph, metrics, plan, c, save_npz is not None, save_png))
        bar.update(len(plan.chunk_indices(c)))
    bar.close()
    barrier(info)
    vals: dict[str, float] | None = None
    if info.is_main:
        data = read_shards(folder, plan, lambda k: k != "image")
        if not torch.equal(data["index"], torch.arange(plan.num)):
            raise ValueError(f"{folder}: the shards do not hold samples 0 .. {plan.num - 1} in order")
        labels = data.get("label")
        vals = {}
        for j, m in enumerate(metrics):
            feats = {k[len(f"m{j}."):]: v for k, v in data.items() if k.startswith(f"m{j}.")}
            vals.update(m.from_features(feats, labels))
        if save_npz is not None:
            write_npz_streamed(save_npz, folder, plan)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    barrier(info)
    return vals
