"""``python -m runtime.study SPEC [SPEC ...] [--eval-every K] [--probe-blocks 2,4] [--out DIR] [--docs FILE]``

Trains every spec with the same seed and budget (the specs should differ only in their objective), with
class accuracy, Fréchet distance and linear probes evaluated every K steps, then writes one PNG curve per
metric (all methods in one chart) and a markdown table of the final values to ``--docs`` with the command
that made them. Each run is an ordinary run directory under ``--out`` (resumable with ``--resume auto``).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import date
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--probe-blocks", default="2,4", help="blocks to linear-probe (comma-separated)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="for every spec")
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--docs", type=Path, default=Path("docs/results.md"))
    args = ap.parse_args(argv)

    import zoo  # noqa: F401
    from registry.errors import SpecError
    from registry.spec import load_spec
    from runtime import run as run_cli
    from runtime.plots import line_chart
    from runtime.tracking import read_jsonl

    probes = [{"type": "linear_probe", "block": int(b), "num_train": 1000, "num_test": 500}
              for b in args.probe_blocks.split(",") if b]
    try:
        specs = [load_spec(p, args.sets) for p in args.specs]
    except SpecError as e:
        for line in e.lines():
            sys.stderr.write(f"error: {line}\n")
        return 2
    budget = {(s.train.steps, s.train.batch_size, s.train.seed, s.data.model_dump_json(), s.backbone.model_dump_json())
              for s in specs}
    if len(budget) != 1:
        sys.stderr.write("error: the specs differ in steps, batch size, seed, data or backbone; a study compares "
                         "objectives under one budget\n")
        return 2
    if len({s.name for s in specs}) != len(specs):
        sys.stderr.write("error: the specs need distinct names (each run gets runs/<study>/<name>)\n")
        return 2
    results, durations = {}, {}
    for path, spec in zip(args.specs, specs):
        metrics = [m.model_dump(mode="json") for m in spec.eval.metrics] + probes
        sets = [*args.sets, f"eval.every={args.eval_every}", f"eval.metrics={json.dumps(metrics)}",
                "sample.every=null", "log.progress=false"]
        out = args.out / spec.name
        timing = out / "study_wall_time_s"  # kept so a re-run that finds the run complete still reports it
        t0 = time.perf_counter()
        resume = ["--resume", "auto"] if (out / "checkpoints").is_dir() else []
        rc = run_cli.main([path, "--out", str(out), *resume, *[a for s in sets for a in ("--set", s)]])
        if rc != 0:
            return rc
        if not timing.is_file():
            timing.write_text(f"{time.perf_counter() - t0:.1f}\n")
        durations[spec.name] = float(timing.read_text())
        results[spec.name] = read_jsonl(out / "metrics.jsonl")

    names = sorted({k for rows in results.values() for r in rows for k in r if k.startswith("eval/")})
    figs = args.docs.parent / "figures"
    charts = []
    for key in names:
        series = {n: [(r["step"], r[key]) for r in rows if key in r] for n, rows in results.items()}
        charts.append(line_chart(series, figs / f"study_{key.split('/', 1)[1]}.png", title=key, xlabel="step",
                                 ylabel=key.split("/", 1)[1]))
    cmd = "python -m runtime.study " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [f"# Study: {', '.join(results)}", "",
             f"Command: `{cmd}`  ", f"Machine: {platform.machine()} CPU, {platform.python_version()}; date {date.today()}",
             f"Budget: {specs[0].train.steps} steps x batch {specs[0].train.batch_size}, seed {specs[0].train.seed}, "
             f"evaluated every {args.eval_every} steps (EMA weights; {specs[0].eval.num_samples} samples per sample "
             f"metric; linear probes fit on 1000 real train images, scored on 500 held-out).", "",
             "| run | " + " | ".join(k.split("/", 1)[1] for k in names) + " | wall time |",
             "|---|" + "---|" * (len(names) + 1)]
    for n, rows in results.items():
        last = {k: next((r[k] for r in reversed(rows) if k in r), float("nan")) for k in names}
        lines.append(f"| {n} | " + " | ".join(f"{last[k]:.4f}" for k in names) + f" | {durations[n] / 60:.1f} min |")
    real = {k: next((r[k] for rows in results.values() for r in rows if k in r), None)
            for k in sorted({k for rows in results.values() for r in rows for k in r if k.startswith("real/")})}
    if real:
        lines += ["", "Real held-out data (the ceiling): " + ", ".join(f"{k.split('/', 1)[1]} {v:.4f}"
                                                                     for k, v in real.items() if v is not None)]
    lines += [""] + [f"![{c.stem}](figures/{c.name})" for c in charts] + [""]
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.docs} and {len(charts)} charts in {figs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
