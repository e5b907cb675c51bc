"""``python -m runtime.evaluate CHECKPOINT_OR_RUN_DIR [--metric JSON]... [--n N]``

Scores a checkpoint with the spec's ``eval.metrics`` (or the ``--metric`` entries given, e.g.
``--metric '{"type": "linear_probe", "block": 4}'``), prints the results and writes them to
``<run>/eval/step_XXXXXXXX.json`` (next to the checkpoint when it is not inside a run directory).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="a checkpoint directory or a run directory")
    ap.add_argument("--metric", action="append", default=[], metavar="JSON", help="metric entry; repeatable")
    ap.add_argument("--n", type=int, default=None, help="generated samples for sample metrics")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import zoo  # noqa: F401
    from registry.errors import SpecError
    from storage.checkpoint import CheckpointError
    from runtime.compiler import graph_from_checkpoint
    from runtime.distributed import pick_device
    from runtime.tracking import show_zoo_log
    from runtime.train import Evaluator

    show_zoo_log()

    def edit(raw: dict) -> None:
        if args.metric:
            raw["eval"]["metrics"] = [json.loads(m) for m in args.metric]
        if args.n:
            raw["eval"]["num_samples"] = args.n

    try:
        graph, ck = graph_from_checkpoint(args.path, pick_device(args.device), edit)
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
    vals = Evaluator(graph, run_dir, tracker=None).evaluate(ck.step, with_real=True)
    print(f"{ck.path} (step {ck.step}):")
    for k, v in sorted(vals.items()):
        print(f"  {k:<28} {v:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
