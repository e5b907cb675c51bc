"""``python -m runtime.cache SPEC [--out DIR] [--split train|eval] [--shard-size N] [--batch-size B]
[--stats measured|autoencoder] [--set KEY=VALUE]...``

Encodes the spec's dataset once with the spec's (frozen) autoencoder into a latent cache (see
:mod:`storage.latent_cache`): raw posterior moments in ``shard_{rank:02d}_{index:05d}.safetensors`` plus
``manifest.json`` with the autoencoder's identity, the data, the shards and per-channel statistics.

What is encoded and where: when ``data`` is ``latent_shards``, its ``source`` is encoded into ``data.path``
(``data.eval_path`` for ``--split eval``), so the same spec then trains on the cache; otherwise ``data`` is
encoded into ``runs/<spec name>/cache_<split>``. ``--out`` overrides either.

Safe to interrupt: every shard is written under a temporary name and renamed; the same command skips the
shards already complete on disk and never duplicates a sample. A directory holding a cache made with another
autoencoder or other data is refused (the message shows both). Under ``torchrun`` every rank encodes its own
shards (:func:`storage.latent_cache.shard_plan`); rank 0 then measures the statistics and writes the manifest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from runtime.iofault import WRITE_ERRORS, UnusableDir, make_dir, named, write_fault
from runtime.latents import is_latent_data, published_channel_stats
from storage.files import write_json_atomic
from storage.latent_cache import (FORMAT_VERSION, MANIFEST, CacheMismatch, Shard, autoencoder_identity, measure_stats,
                                  mismatch_message, read_manifest, shard_plan)

EXIT_SPEC = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m runtime.cache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="spec JSON file")
    ap.add_argument("--out", default=None, help="cache directory (default: see above)")
    ap.add_argument("--split", choices=("train", "eval"), default="train")
    ap.add_argument("--shard-size", type=int, default=1024, help="samples per shard file")
    ap.add_argument("--batch-size", type=int, default=64, help="samples per encoder call")
    ap.add_argument("--stats", choices=("measured", "autoencoder"), default=None,
                    help="statistics of the manifest (default: data.stats of a latent_shards spec, else measured)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="edit the raw spec before validation (as in runtime.run)")
    ap.add_argument("--no-plugins", action="store_true", help="do not load third-party plugins")
    return ap.parse_args(argv)


def cache_target(spec: Any, split: str, out: Path | None) -> tuple[Any, Path]:
    """(data params to encode, cache directory) for ``spec``; ValueError when that cannot be known."""
    if is_latent_data(spec.data):
        if spec.data.source is None:
            raise ValueError("data.source: a latent_shards spec needs data.source to say what to encode")
        where = spec.data.path if split == "train" else spec.data.eval_path
        if out is None and where is None:
            raise ValueError("data.eval_path: set it (or pass --out) to cache the eval split")
        return spec.data.source, Path(out or where)
    return spec.data, Path(out or Path("runs") / spec.name / f"cache_{split}")


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` atomically (temporary name in the same directory, fsync, rename)."""
    import os

    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # like any other file the user writes
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except WRITE_ERRORS as e:  # disk full, EFBIG: no partial shard is left behind
        tmp.unlink(missing_ok=True)
        raise named(e, path) from None


def shard_complete(path: Path, count: int) -> bool:
    """True when ``path`` is a readable shard with ``count`` labels and latents."""
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return all(f.get_slice(k).get_shape()[0] == count for k in f.keys()) and "label" in f.keys()
    except Exception:  # a torn or foreign file: encode the shard again
        return False


def _flat(prefix: str, v: Any) -> dict[str, torch.Tensor]:
    if isinstance(v, dict):
        return {f"{prefix}.{k}": t for k, t in v.items()}
    return {prefix: v}


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _cpu(v: Any) -> Any:
    return {k: t.detach().float().cpu().contiguous() for k, t in v.items()} if isinstance(v, dict) \
        else v.detach().float().cpu().contiguous()


def _shape_of(v: Any) -> Any:
    return {k: list(t.shape[1:]) for k, t in v.items()} if isinstance(v, dict) else list(v.shape[1:])


def _to(x: Any, device: torch.device) -> Any:
    return {k: t.to(device) for k, t in x.items()} if isinstance(x, dict) else x.to(device)


def encode_shards(ae: Any, dataset: Any, shards: list[Shard], out: Path, batch_size: int, num_workers: int,
                  device: torch.device, progress: bool) -> int:
    """Encode ``shards`` (those not yet complete on disk) of ``dataset``; returns the samples encoded."""
    from torch.utils.data import DataLoader

    from runtime.data import collate_pairs

    todo = [s for s in shards if not shard_complete(out / s.file, s.count)]
    if not todo:
        return 0
    batches = [list(range(a, min(a + batch_size, s.stop))) for s in todo for a in range(s.start, s.stop, batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_pairs)
    bar = tqdm(total=sum(s.count for s in todo), disable=not progress, unit="sample", desc=f"caching {out}",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)  # logs: a line per 30 s
    it, done = iter(loader), 0
    for s in todo:
        means, logvars, labels = [], [], []
        while sum(len(y) for y in labels) < s.count:
            x, y = next(it)
            with torch.no_grad():
                m, lv = ae.moments(_to(x, device))
            means.append(_cpu(m))
            logvars.append(_cpu(lv) if lv is not None else None)
            labels.append(y.to(torch.int64))
            bar.update(len(y))
        tensors = {**_flat("mean", _cat(means)), "label": torch.cat(labels)}
        if logvars[0] is not None:
            tensors.update(_flat("logvar", _cat(logvars)))
        _write_shard(out / s.file, tensors)
        done += s.count
    bar.close()
    return done


def shard_means(out: Path, shards: list[dict[str, Any]]):
    """Yield the stored posterior means of every shard (``(n, C, ...)``, a dict by stream)."""
    from safetensors import safe_open

    for s in shards:
        with safe_open(str(out / s["file"]), framework="pt") as f:
            keys = [k for k in f.keys() if k == "mean" or k.startswith("mean.")]
            yield f.get_tensor("mean") if keys == ["mean"] else {k[5:]: f.get_tensor(k) for k in keys}


def build_cache(spec: Any, out: Path | None = None, split: str = "train", shard_size: int = 1024,
                batch_size: int = 64, stats: str | None = None, device: str = "auto", progress: bool = True) -> Path:
    """Encode the spec's data into a cache (see the module docstring); returns the cache directory.
    Raises CacheMismatch when the directory holds another cache, ValueError for a spec that cannot be cached."""
    from registry.kinds import AUTOENCODERS, DATASETS
    from registry.spec import resolved_dict  # noqa: F401  (spec already resolved)
    from runtime import distributed

    data, out = cache_target(spec, split, out)
    stats = stats or (spec.data.stats if is_latent_data(spec.data) else "measured")
    info = distributed.init(device)
    try:
        dev = info.device
        ae = AUTOENCODERS.build(spec.autoencoder).to(dev).eval().requires_grad_(False)
        dataset = DATASETS.build(data, split=split)
        n = len(dataset)
        from runtime.data import collate_pairs

        x0, _ = collate_pairs([dataset[0]])
        with torch.no_grad():
            m0, lv0 = ae.moments(_to(x0, dev))
        input_shape = data.sample_shape()
        header = {
            "format": FORMAT_VERSION, "complete": False,
            "identity": autoencoder_identity(spec.autoencoder, ae),
            "data": data.model_dump(mode="json"), "split": split,
            "input_shape": {k: list(v) for k, v in input_shape.items()} if isinstance(input_shape, dict) else list(input_shape),
            "num_classes": int(data.num_classes),
            "transform": {"data_type": data.type, "input_shape": _shape_of(x0), "value_range": [-1.0, 1.0],
                          "latent": "raw posterior moments (autoencoder units, before any shift/scale)"},
            "latent_shape": _shape_of(m0), "stored": "mean" if lv0 is None else "mean+logvar",
            "shard_size": int(shard_size), "num_samples": n,
        }
        plan = shard_plan(n, shard_size, info.world_size)
        ok, err = True, ""
        if info.is_main:
            make_dir(out, "cache directory")
            old = read_manifest(out) if (out / MANIFEST).is_file() else None
            msg = mismatch_message(old, header, out) if old is not None else None
            if msg is not None:
                ok, err = False, msg
            elif old is None:
                write_json_atomic(out / MANIFEST, {**header, "shards": [], "stats": None})
        if not distributed.all_true(ok, info):
            raise CacheMismatch(err or f"{out}: refused on rank 0 (another cache is there)")
        distributed.barrier(info)
        for stale in out.glob(f".shard_{info.rank:02d}_*.tmp*"):  # left by a killed run
            stale.unlink(missing_ok=True)
        mine = [s for s in plan if s.rank == info.rank]
        num_workers = int(data.num_workers)
        encode_shards(ae, dataset, mine, out, batch_size, num_workers, dev, progress and info.is_main)
        distributed.barrier(info)
        if info.is_main:
            missing = [s.file for s in plan if not shard_complete(out / s.file, s.count)]
            if missing:
                raise RuntimeError(f"{out}: shards missing after encoding: {missing[:5]}")
            shards = [{"file": s.file, "rank": s.rank, "start": s.start, "stop": s.stop, "count": s.count} for s in plan]
            if stats == "autoencoder":
                body = published_channel_stats(ae, {k: tuple(v) for k, v in header["latent_shape"].items()}
                                               if isinstance(header["latent_shape"], dict) else header["latent_shape"])
            else:
                body = measure_stats(shard_means(out, shards))
            block = {"source": stats, **({"streams": body} if isinstance(m0, dict) else body)}
            write_json_atomic(out / MANIFEST, {**header, "complete": True, "shards": shards, "stats": block})
        distributed.barrier(info)
    finally:
        distributed.shutdown(info)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import zoo  # noqa: F401
    from registry.errors import SpecError
    from registry.plugins import load_plugins
    from registry.spec import load_spec
    from zoo.data.errors import DataError
    from zoo.data.latent_shards import without_cache_checks

    def fail(msg: str) -> int:
        sys.stderr.write(f"error: {msg}\n")
        return EXIT_SPEC

    from runtime.rundir import out_problem

    if out_problem(args.out):
        return fail(out_problem(args.out))
    try:
        if not args.no_plugins:
            load_plugins()
        with without_cache_checks():  # this command makes (or completes) the cache those checks compare with
            spec = load_spec(args.spec, args.sets)
    except SpecError as e:
        for line in e.lines():
            sys.stderr.write(f"error: {line}\n")
        return EXIT_SPEC
    if args.shard_size < 1 or args.batch_size < 1:
        return fail("--shard-size and --batch-size must be >= 1")
    try:
        out = build_cache(spec, args.out, args.split, args.shard_size, args.batch_size, args.stats, args.device,
                          progress=spec.log.progress)
    except (CacheMismatch, ValueError, DataError, FileNotFoundError, UnusableDir) as e:
        return fail(str(e))
    except WRITE_ERRORS as e:  # disk full, EFBIG, ... while encoding: the complete shards stay, rerun to go on
        sys.stderr.write(f"error: IO fault: {write_fault(e, args.out or 'the cache directory')}\n")
        return 1
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        m = read_manifest(out)
        st = m["stats"]
        print(f"cache        {out}  ({m['num_samples']} samples, {len(m['shards'])} shards, latent {m['latent_shape']}, "
              f"stored {m['stored']})")
        body = st.get("streams", {"": {"mean": st.get("mean"), "std": st.get("std")}})
        for k, v in body.items():
            name = f" {k}" if k else ""
            print(f"stats{name} ({st['source']}) mean {[round(x, 4) for x in v['mean']]} "
                  f"std {[round(x, 4) for x in v['std']]}")
        if is_latent_data(spec.data):
            print(f"train        python -m runtime.run {args.spec}")
        else:
            print(f"train on it  data = {{\"type\": \"latent_shards\", \"path\": \"{out}\"}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
