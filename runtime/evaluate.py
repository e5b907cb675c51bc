"""``python -m runtime.evaluate CHECKPOINT_OR_RUN_DIR [--metric JSON]... [--num N] [--seed S] [--solver T] [--steps K]
[--cfg W] [--labels cycle|uniform] [--save-npz FILE] [--save-png DIR] [--shards DIR] [--keep-shards]``
(under ``torchrun --nproc_per_node G`` the samples are split over the G ranks)
``python -m runtime.evaluate --reference DATA_SPEC --out ref.npz --inception W [--dinov2 W] [--num N] [--images]``

Scores a checkpoint with the spec's ``eval.metrics`` (or the ``--metric`` entries given, e.g.
``--metric '{"type": "linear_probe", "block": 4}'``), prints the results and writes them to
``<run>/eval/step_XXXXXXXX.json`` (next to the checkpoint when it is not inside a run directory).

Samples (:mod:`runtime.sharded_eval`): ``--num`` of them (default ``eval.num_samples``) in chunks of
``--batch-size`` (default ``eval.batch_size``); sample i's noise, SDE draws and label come from (seed, i) alone
(seed default ``sample.seed + 10000``, the in-loop evaluation's), so any number of ranks gives the same samples
and the same numbers as the in-loop ``eval.every`` at equal N. Chunk c goes to rank ``c mod world_size``; each
chunk's metric features land in a shard under ``--shards`` (default ``<run>/eval/shards_step_XXXXXXXX``), and a
rerun after an interruption resumes from them; they are removed when the evaluation completes unless
``--keep-shards``. ``--save-npz`` also writes the samples as an ADM-style batch (``arr_0`` uint8 NHWC, ``arr_1``
labels), ``--save-png`` as ``{index:06d}.png`` files, for external evaluators.

``--reference`` writes reference statistics of a data set in the ADM evaluator's npz layout (``mu``, ``sigma``,
``mu_s``, ``sigma_s``; ``arr_0`` with ``--images``) plus ``pool`` (and ``mu_dinov2``, ``sigma_dinov2``, ``dinov2``
with ``--dinov2``), for the ``reference`` field of the ``fid`` / ``sfid`` / ``precision_recall`` / ``fd_dinov2``
metrics (:mod:`zoo.metrics.standard`). DATA_SPEC is a spec file (its ``data``) or a JSON file of one data entry.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, nargs="?", help="a checkpoint directory or a run directory")
    ap.add_argument("--metric", action="append", default=[], metavar="JSON", help="metric entry; repeatable")
    ap.add_argument("--num", "--n", dest="num", type=int, default=None,
                    help="generated samples (default eval.num_samples); with --reference: data samples (default all)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="samples per batch (default eval.batch_size; --reference: 100); equal values give equal samples")
    ap.add_argument("--device", default="auto")
    gen = ap.add_argument_group("sampling (defaults: the spec's, as the in-loop evaluation)")
    gen.add_argument("--seed", type=int, default=None, help="noise/label seed (default sample.seed + 10000)")
    gen.add_argument("--solver", default=None, help="solver type, e.g. heun, euler_maruyama")
    gen.add_argument("--steps", type=int, default=None, help="solver steps")
    gen.add_argument("--cfg", type=float, default=None, help="guidance scale (default sample.cfg_scale)")
    gen.add_argument("--guidance-low", type=float, default=None, help="guidance interval start (sample.guidance_low)")
    gen.add_argument("--guidance-high", type=float, default=None, help="guidance interval end (sample.guidance_high)")
    gen.add_argument("--labels", choices=["cycle", "uniform"], default="cycle",
                     help="cycle: sample.labels or all classes by index (the in-loop rule); uniform: a uniform draw "
                          "per sample from (seed, i), as ADM / REPA sample_ddp.py")
    gen.add_argument("--save-npz", type=Path, default=None, help="also write the samples as an ADM-style .npz")
    gen.add_argument("--save-png", type=Path, default=None, help="also write the samples as PNGs into this folder")
    gen.add_argument("--shards", type=Path, default=None, help="shard folder (default <run>/eval/shards_step_N)")
    gen.add_argument("--keep-shards", action="store_true", help="keep the shards after a complete evaluation")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("--no-real", action="store_true",
                     help="skip the ceiling (the sample metrics on as many real eval-split samples)")
    ref = ap.add_argument_group("reference statistics (--reference)")
    ref.add_argument("--reference", type=Path, metavar="DATA_SPEC", help="write reference statistics of this data")
    ref.add_argument("--out", type=Path, help="the .npz to write")
    ref.add_argument("--inception", help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    ref.add_argument("--dinov2", help="local DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth) for fd_dinov2")
    ref.add_argument("--split", default="train", help="data split (ADM's ImageNet batches: train; default train)")
    ref.add_argument("--images", action="store_true", help="also store the uint8 images as arr_0 (ADM layout)")
    args = ap.parse_args(argv)
    if args.reference is not None:
        return write_reference(args)
    if args.path is None:
        ap.error("give a checkpoint or run directory, or --reference DATA_SPEC --out FILE")

    import zoo  # noqa: F401
    from registry.errors import SpecError
    from storage.checkpoint import CheckpointError
    from runtime import distributed
    from runtime.compiler import components_from_checkpoint
    from runtime.sample import solver_override
    from runtime.tracking import show_zoo_log
    from runtime.train import Evaluator

    info = distributed.init(args.device)
    if info.is_main:
        show_zoo_log()

    def edit(raw: dict) -> None:
        if args.metric:
            raw["eval"]["metrics"] = [json.loads(m) for m in args.metric]
        if args.num:
            raw["eval"]["num_samples"] = args.num
        if args.solver or args.steps:
            raw["solver"] = solver_override(raw["solver"], args.solver, args.steps)
        for key, val in (("cfg_scale", args.cfg), ("guidance_low", args.guidance_low),
                         ("guidance_high", args.guidance_high)):
            if val is not None:
                raw["sample"][key] = val

    try:
        try:
            graph, ck = components_from_checkpoint(args.path, info.device, edit)
        except json.JSONDecodeError as e:
            sys.stderr.write(f"error: --metric: invalid JSON: {e}\n")
            return 2
        except (FileNotFoundError, SpecError, CheckpointError) as e:
            sys.stderr.write(f"error: {e}\n")
            return 2
        if not graph.spec.eval.metrics:
            sys.stderr.write("error: eval.metrics is empty; name metrics with --metric\n")
            return 2
        run_dir = ck.path.parent.parent if ck.path.parent.name == "checkpoints" else ck.path
        ev = Evaluator(graph, run_dir, tracker=None)
        plan = ev.sample_plan(args.num, args.seed, args.batch_size, args.labels)
        try:
            vals = ev.evaluate(ck.step, with_real=not args.no_real, plan=plan, info=info, shards=args.shards,
                               save_npz=args.save_npz, save_png=args.save_png, keep_shards=args.keep_shards,
                               progress=not args.no_progress)
        except ValueError as e:
            sys.stderr.write(f"error: {e}\n")
            return 2
        if info.is_main:
            print(f"{ck.path} (step {ck.step}, {plan.num} samples, {graph.spec.solver.type} {graph.solver.nfe} NFE, "
                  f"cfg {plan.cfg_scale:g}, seed {plan.seed}):")
            for k, v in sorted(vals.items()):
                print(f"  {k:<28} {v:.4f}")
        return 0
    finally:
        distributed.shutdown(info)


def write_reference(args: argparse.Namespace) -> int:
    """``--reference``: features streamed batch by batch, statistics in float64, one ``np.savez``."""
    import numpy as np
    import torch

    import zoo  # noqa: F401
    from registry.errors import SpecError
    from registry.kinds import DATASETS
    from runtime.distributed import pick_device
    from zoo.metrics import standard as st
    from zoo.metrics.frechet import feature_stats

    if args.out is None or (args.inception is None and args.dinov2 is None):
        sys.stderr.write("error: --reference needs --out and --inception and/or --dinov2\n")
        return 2
    try:
        raw = json.loads(args.reference.read_text())
        if "data" in raw:
            from registry.spec import validate

            data = validate(raw).data.data_space()
        else:
            data = DATASETS.get(raw["type"]).Params.model_validate(raw).data_space()
        ds = DATASETS.build(data, split=args.split)
    except (OSError, json.JSONDecodeError, KeyError, SpecError, ValueError) as e:
        sys.stderr.write(f"error: --reference {args.reference}: {e}\n")
        return 2
    device = pick_device(args.device)
    n = len(ds) if args.num is None else min(args.num, len(ds))
    parts: dict[str, list] = {}
    bs = args.batch_size or 100
    for i in range(0, n, bs):
        x = torch.stack([ds[j][0] for j in range(i, min(n, i + bs))])
        if args.inception:
            f = st.inception_features(x, args.inception, device, bs)
            parts.setdefault("pool", []).append(f["pool"])
            parts.setdefault("spatial", []).append(f["spatial"])
        if args.dinov2:
            parts.setdefault("dinov2", []).append(st.dinov2_features(x, args.dinov2, "L/14", device, bs))
        if args.images:
            parts.setdefault("arr_0", []).append(st.quantize(x).permute(0, 2, 3, 1).numpy())
        print(f"\r{min(n, i + bs)}/{n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    out: dict[str, np.ndarray] = {}
    if args.inception:
        out["mu"], out["sigma"] = feature_stats(cat["pool"])
        out["mu_s"], out["sigma_s"] = feature_stats(cat["spatial"])
        out["pool"] = cat["pool"].astype(np.float32)
    if args.dinov2:
        out["mu_dinov2"], out["sigma_dinov2"] = feature_stats(cat["dinov2"])
        out["dinov2"] = cat["dinov2"].astype(np.float32)
    if args.images:
        out["arr_0"] = cat["arr_0"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **out)
    print(f"wrote {args.out}: {n} samples of {data.type} ({args.split}), keys {sorted(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
