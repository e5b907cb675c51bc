"""``python -m runtime.run SPEC [--set a.b=VALUE]... [--out DIR] [--resume auto|PATH] [--dry-run]``

Validates the spec (every problem printed as ``json.path: message``, exit code 2), compiles it, trains,
samples and evaluates, and prints where everything went. Under ``torchrun --nproc_per_node=N`` the same
command runs data-parallel with the spec's global batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_SPEC = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m runtime.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="spec JSON file")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="edit the raw spec before validation, e.g. --set train.steps=100 (VALUE parsed as JSON, else a string)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    ap.add_argument("--resume", default=None, metavar="auto|PATH",
                    help="continue from the newest checkpoint of the run directory that verifies (auto), or from "
                         "PATH (a checkpoint directory, or a run directory: its newest one that verifies)")
    ap.add_argument("--dry-run", action="store_true", help="validate, resolve, print sizes and FLOPs, then exit")
    ap.add_argument("--no-plugins", action="store_true", help="do not load third-party plugins")
    return ap.parse_args(argv)


def rank_tag() -> str:
    """``"[rank 3] "`` under a multi-process torchrun (so each rank's failure names its rank in the log), else ``""``."""
    return f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def fail(lines: list[str]) -> int:
    for line in lines:
        sys.stderr.write(f"error: {rank_tag()}{line}\n")
    return EXIT_SPEC


def flop_str(flops: float) -> str:
    """``2.37e11`` -> ``"237.2 GFLOP"`` (units from MFLOP to EFLOP)."""
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:,.1f} {unit}"
    return f"{flops / 1e6:,.2f} MFLOP"


def dry_run(spec) -> int:
    import torch

    from registry.spec import resolved_dict
    from runtime.compiler import compile_spec, count_params

    g = compile_spec(spec, torch.device("meta"))
    tr = spec.train
    per_sample = g.train_flops_per_sample()
    print(json.dumps(resolved_dict(spec), indent=2))
    print(f"\ninput {g.input_shape} -> latent {g.latent_shape} -> {g.num_tokens} tokens x {g.modality.token_dim}")
    print(f"backbone parameters     {count_params(g.backbone):,}")
    print(f"objective parameters    {count_params(g.train_module.objective):,}")
    print(f"trainable parameters    {count_params(g.train_module, trainable_only=True):,}")
    print(f"EMA parameters          {count_params(g.ema.module) if g.ema else 0:,}")
    print(f"frozen autoencoder      {spec.autoencoder.type} (not loaded by --dry-run)")
    print(f"forward FLOPs / sample  {flop_str(g.backbone.flops(g.num_tokens))}")
    print(f"train FLOPs / step      {flop_str(per_sample * tr.batch_size)} "
          f"(global batch {tr.batch_size}; 3x forward + objective extras)")
    print(f"train FLOPs / run       {flop_str(per_sample * tr.batch_size * tr.steps)} ({tr.steps:,} steps)")
    print(f"sampler                 {spec.solver.type}, {g.solver.nfe} NFE/sample, "
          f"{flop_str(g.solver.nfe * g.backbone.flops(g.num_tokens))}/sample")
    return 0


def write_run_facts(run_dir: Path, graph, info, started: float, finished: float, result: dict,
                    resumed_from: int | None) -> Path:
    """``run_dir/run_facts.json``: start/end (ISO, local time with offset), wall seconds of this invocation and
    of all invocations together (``wall_s_total`` adds a resumed run's earlier ones), device, parameter counts,
    steps. Read by the report."""
    from datetime import datetime

    import torch

    from runtime.compiler import count_params
    from storage.files import write_json_atomic

    path = run_dir / "run_facts.json"
    earlier = 0.0
    if resumed_from is not None and path.is_file():
        try:
            earlier = float(json.loads(path.read_text()).get("wall_s_total", 0.0))
        except (ValueError, AttributeError):
            earlier = 0.0
    dev = info.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    facts = {
        "started": datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "finished": datetime.fromtimestamp(finished).astimezone().isoformat(timespec="seconds"),
        "wall_s": round(finished - started, 1), "wall_s_total": round(earlier + finished - started, 1),
        "device": str(dev), "device_name": name, "world_size": info.world_size,
        "parameters": count_params(graph.backbone),
        "trainable_parameters": count_params(graph.train_module, trainable_only=True),
        "steps": result["steps"], "skipped_steps": result["skipped_steps"], "resumed_from": resumed_from,
    }
    write_json_atomic(path, facts)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from runtime.rundir import out_problem

    if out_problem(args.out):
        return fail([out_problem(args.out)])
    import zoo  # noqa: F401  (registers the built-ins)
    from registry.errors import SpecError
    from registry.plugins import load_plugins
    from registry.spec import load_spec

    try:
        if not args.no_plugins:
            load_plugins()
        spec = load_spec(args.spec, args.sets)
    except SpecError as e:
        return fail(e.lines())
    for section in ("objective", "backbone", "data"):  # advice that does not stop the run
        for msg in getattr(spec, section).warnings(spec):
            sys.stderr.write(f"warning: {section}: {msg}\n")
    if args.dry_run:
        return dry_run(spec)

    from runtime.rundir import RunDirInUse, RunLock

    run_dir = Path(args.out) if args.out is not None else Path("runs") / spec.name
    lock = RunLock(run_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # one lock per run: rank 0 holds it for all ranks
        try:
            note = lock.acquire()
        except RunDirInUse as e:
            return fail([str(e)])
        except OSError as e:
            return fail([f"{run_dir}: cannot use it as the run directory ({e.strerror or e})"])
        if note:
            sys.stderr.write(f"note: {note}\n")
    from runtime.iofault import WRITE_ERRORS, write_fault

    with lock:
        try:
            return run(args, spec, run_dir)
        except WRITE_ERRORS as e:  # disk full, EFBIG, a directory made read-only mid-run: one line, the path
            sys.stderr.write(f"error: {rank_tag()}IO fault: {write_fault(e, run_dir)}\n")
            return 1


def run(args: argparse.Namespace, spec, run_dir: Path) -> int:
    """Everything after the spec is valid and the run directory is locked."""
    from registry.spec import resolved_dict
    from runtime import distributed
    from storage.checkpoint import CheckpointError
    from runtime.compiler import compile_spec
    from storage.latent_cache import CacheMismatch
    from runtime.resume import Refused, plan
    from runtime.train import TrainingStopped, train
    from zoo.data.errors import DataError

    ckpt_root = run_dir / "checkpoints"
    try:
        chosen = plan(args.resume, run_dir, spec)
    except Refused as e:
        return fail(e.lines)
    resume = chosen.path if chosen is not None else None
    done = chosen.step if chosen is not None else None
    if chosen is not None:
        for note in chosen.notes:
            sys.stderr.write(f"note: {note}\n")
        if done >= spec.train.steps:
            print(f"{run_dir}: already complete at step {done} (train.steps = {spec.train.steps}); "
                  f"raise it with --set train.steps=N to continue")
            return 0
    from registry.kinds import PARALLEL

    info = distributed.init(spec.train.device, group=PARALLEL.get(spec.train.parallel.type).sharded)
    per_micro = spec.train.batch_size // spec.train.grad_accum
    if per_micro % info.world_size:
        distributed.shutdown(info)
        return fail([f"train.batch_size: the global batch {spec.train.batch_size} / grad_accum "
                     f"{spec.train.grad_accum} = {per_micro} does not split over {info.world_size} processes"])
    if info.is_main:
        from runtime.tracking import show_zoo_log

        show_zoo_log()  # classifiers trained into / loaded from the cache say so
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.resolved.json").write_text(json.dumps(resolved_dict(spec), indent=2) + "\n")
        where = f"resuming from {resume}" if resume else "starting"
        print(f"{spec.name}: {where} on {info.device} x{info.world_size}; run directory {run_dir}", flush=True)
    started = time.time()
    try:
        graph = compile_spec(spec, info.device)
        result = train(graph, run_dir, info, resume=resume)
    except DataError as e:
        return fail([f"data: {e}"])
    except FileNotFoundError as e:  # a weights file or directory named by the spec
        return fail([str(e)])
    except CacheMismatch as e:  # a latent cache made with another autoencoder
        return fail([str(e)])
    except CheckpointError as e:  # the resumed checkpoint does not load into this run
        return fail([f"--resume: {e}"])
    except TrainingStopped as e:
        sys.stderr.write(f"error: {rank_tag()}{e}\n")
        return 1
    finally:
        distributed.shutdown(info)
    if info.is_main:
        print(f"\ndone: {result['steps']} steps ({result['skipped_steps']} skipped)")
        for k, v in sorted(result.get("metrics", {}).items()):
            print(f"  {k:<28} {v:.4f}")
        written = result["samples"]
        write_run_facts(run_dir, graph, info, started, time.time(), result, done)
        from runtime.report import write_report

        report = write_report(run_dir)
        print(f"report       {report}   (open it in a browser)")
        print(f"samples      {written.sheet}")
        if written.mp4:
            print(f"videos       {len(written.mp4)} MP4 with sound in {written.mp4[0].parent}")
        elif written.wav:
            print(f"audio        {len(written.wav)} WAV in {written.wav[0].parent}")
        if written.gif is not None:
            print(f"preview      {written.gif}")
        print(f"checkpoints  {ckpt_root}")
        print(f"metrics      {run_dir / 'metrics.jsonl'}   (tensorboard --logdir {run_dir / 'tb'})")
        print(f"sample again python -m runtime.sample {run_dir} --n 40")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
