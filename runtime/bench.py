"""``python -m runtime.bench SPEC [SPEC ...] [--steps N] [--warmup W] [--set k=v]...``

Times training steps of one or more specs in one process, interleaved (spec 1 step, spec 2 step, ...) so
that drifting clocks and thermal state hit every spec alike. The batches are drawn from each spec's data
once and reused, so the loader is not timed. Prints median step time, samples/s, tokens/s, achieved
TFLOP/s (analytic FLOPs, see ``--dry-run``), peak memory, and each spec's step-time ratio to the first next to
the ratio its analytic FLOPs predict (a teacher pass to block k costs about k/depth of a forward).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per spec")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per spec first")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to every spec")
    ap.add_argument("--synthetic", action="store_true",
                    help="random latent tokens of the spec's shape instead of its data; the frozen autoencoder is not "
                         "loaded (the step then times what a run on cached latents does)")
    args = ap.parse_args(argv)

    import zoo  # noqa: F401
    from registry.errors import SpecError
    from registry.kinds import DATASETS
    from registry.plugins import load_plugins
    from registry.spec import load_spec
    from runtime.compiler import compile_spec
    from runtime.data import build_loader
    from runtime.distributed import DistInfo, pick_device
    from runtime.train import Stepper
    from zoo.core.types import TokenBatch

    try:
        load_plugins()
        specs = [load_spec(p, args.sets) for p in args.specs]
    except SpecError as e:
        for line in e.lines():
            sys.stderr.write(f"error: {line}\n")
        return 2
    runs = []
    for path, spec in zip(args.specs, specs):
        device = pick_device(spec.train.device)
        graph = compile_spec(spec, device, load_frozen=not args.synthetic)
        stepper = Stepper(graph, DistInfo(device=device))
        tr = spec.train
        if args.synthetic:
            gen, micro = torch.Generator().manual_seed(tr.seed), tr.batch_size // tr.grad_accum
            batches = [TokenBatch(torch.randn(micro, graph.num_tokens, graph.modality.token_dim, generator=gen).to(device),
                                  torch.randint(0, max(graph.num_classes, 1), (micro,), generator=gen).to(device)
                                  if graph.num_classes else None) for _ in range(tr.grad_accum)]
        else:
            loader = build_loader(DATASETS.build(spec.data, split="train"), global_batch=tr.batch_size,
                                  grad_accum=tr.grad_accum, rank=0, world_size=1, seed=tr.seed, num_workers=0)
            it = iter(loader)
            batches = [next(it) for _ in range(tr.grad_accum)]
        runs.append({"path": path, "spec": spec, "graph": graph, "stepper": stepper, "batches": batches,
                     "times": [], "peak": 0})

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
    print(f"device: {name}; torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up, "
          f"interleaved; {data}")
    head = (f"{'spec':<34}{'step ms':>10}{'samples/s':>11}{'tokens/s':>12}{'TFLOP/s':>9}{'peak MiB':>10}{'ratio':>7}"
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
        print(f"{r['path'][-34:]:<34}{t * 1e3:>10.1f}{tr.batch_size / t:>11.1f}{tr.batch_size * g.num_tokens / t:>12.0f}"
              f"{flops / t / 1e12:>9.3f}{peak:>10.0f}{t / base:>7.2f}{flops / base_flops:>11.2f}")
    if dev0.type != "cuda":
        print("(CPU peak memory is the process's resident high-water mark, shared by all specs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
