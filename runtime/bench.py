"""``python -m runtime.bench SPEC [SPEC ...] [--steps N] [--warmup W] [--set k=v]...``

Times training steps of one or more specs in one process, interleaved (spec 1 step, spec 2 step, ...) so
that drifting clocks and thermal state hit every spec alike. The batches are drawn from each spec's data
once and reused, so the loader is not timed. Prints median step time, samples/s, tokens/s, achieved
TFLOP/s (analytic FLOPs, see ``--dry-run``), peak memory, and each spec's step-time ratio to the first next to
the ratio its analytic FLOPs predict (a teacher pass to block k costs about k/depth of a forward).

``--suite gpu [--out DIR] [--smoke]`` runs the GPU acceptance suite instead (:mod:`runtime.suite`).

``--compiled`` also times every spec with ``train.compile`` on (the whole loss as one graph), interleaved
with its eager twin; its rows end in ``+compile``. ``--synthetic`` gives objectives that read the data
(REPA's encoders) random images and encoders with random weights, so no data or weight file is needed.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from runtime.bench_setup import prepare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="*")
    ap.add_argument("--suite", choices=["gpu"], help="run the GPU acceptance suite (runtime/suite.py) instead of specs")
    ap.add_argument("--out", default="runs/bench_gpu", help="--suite: folder for suite.json and suite.md")
    ap.add_argument("--smoke", action="store_true", help="--suite: the same code at tiny sizes on CPU (< 1 min)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per spec")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per spec first")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to every spec")
    ap.add_argument("--synthetic", action="store_true",
                    help="random latent tokens of the spec's shape instead of its data; the frozen autoencoder is not "
                         "loaded (the step then times what a run on cached latents does); encoders get random "
                         "weights and random images")
    ap.add_argument("--compiled", action="store_true", help="also time each spec with train.compile on")
    args = ap.parse_args(argv)
    if args.suite:
        from runtime.suite import run_suite

        return run_suite(Path(args.out), smoke=args.smoke)
    if not args.specs:
        ap.error("give at least one SPEC (or --suite gpu)")

    import zoo  # noqa: F401
    from registry.errors import SpecError
    from registry.plugins import load_plugins
    from registry.spec import load_spec

    try:
        load_plugins()
        specs = [load_spec(p, args.sets) for p in args.specs]
    except SpecError as e:
        for line in e.lines():
            sys.stderr.write(f"error: {line}\n")
        return 2
    runs = []
    for path, spec in zip(args.specs, specs):
        for compiled in ((False, True) if args.compiled else (spec.train.compile,)):
            spec_c = spec.model_copy(update={"train": spec.train.model_copy(update={"compile": compiled})})
            name = path + ("+compile" if compiled and args.compiled else "")
            runs.append(prepare(name, spec_c, args.synthetic))

    def sync(dev: torch.device) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for i in range(args.warmup + args.steps):
        for r in runs:
            dev = r["graph"].device
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            t0 = time.perf_counter()
            r["stepper"].step(i, r["batches"])
            sync(dev)
            if i >= args.warmup:
                r["times"].append(time.perf_counter() - t0)
            if dev.type == "cuda":
                r["peak"] = max(r["peak"], torch.cuda.max_memory_allocated(dev))

    dev0 = runs[0]["graph"].device
    name = torch.cuda.get_device_name(dev0) if dev0.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    data = "synthetic latent tokens" if args.synthetic else "the specs' data"
    kernels = sorted({str(r["graph"].attention_kernel) for r in runs})
    print(f"device: {name}; torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up, "
          f"interleaved; {data}; attention kernel: {', '.join(kernels)}")
    head = (f"{'spec':<42}{'step ms':>10}{'samples/s':>11}{'tokens/s':>12}{'TFLOP/s':>9}{'peak MiB':>10}{'ratio':>7}"
            f"{'FLOP ratio':>11}")
    print(head)
    base = base_flops = None
    for r in runs:
        g, tr = r["graph"], r["spec"].train
        t = statistics.median(r["times"])
        base = base or t
        flops = g.train_flops_per_sample() * tr.batch_size
        base_flops = base_flops or flops
        if g.device.type == "cuda":
            peak = r["peak"] / 2**20
        else:  # process-wide high-water mark (Linux reports KiB): covers every spec loaded so far
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{r['path'][-42:]:<42}{t * 1e3:>10.1f}{tr.batch_size / t:>11.1f}{tr.batch_size * g.num_tokens / t:>12.0f}"
              f"{flops / t / 1e12:>9.3f}{peak:>10.0f}{t / base:>7.2f}{flops / base_flops:>11.2f}")
    if dev0.type != "cuda":
        print("(CPU peak memory is the process's resident high-water mark, shared by all specs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
