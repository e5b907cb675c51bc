"""``python -m runtime.study SPEC [SPEC ...] [--seeds N] [--eval-every K] [--probe-blocks 2,4] [--set KEY=VALUE]...
[--out DIR] [--docs FILE] [--section NAME] [--baseline NAME] [--interval t|bootstrap] [--jobs J] [--launcher CMD]``

Trains every spec with seeds ``0..N-1`` (``train.seed`` drives the initialisation, the data order and the
per-step noise) under one budget (the specs should differ only in their objective), evaluates class accuracy,
Fréchet distance and whatever else the specs' ``eval.metrics`` name, plus linear probes, every K steps on the
EMA weights, and writes per spec and step the seed mean with a 95 % interval, the step at which each method's
mean first reaches the baseline's final mean (with a bootstrap interval over seeds), whether the final
intervals overlap the baseline's, and one chart per metric (mean line, shaded interval).

Every (spec, seed) is an ordinary run directory ``DIR/<spec name>/seed<s>``. A rerun skips the finished ones
(``run_facts.json`` at ``train.steps`` and an unchanged resolved spec) and continues unfinished ones with
``--resume auto``. The results go into ``--docs`` as a block between ``<!-- study:NAME -->`` and
``<!-- /study:NAME -->`` (replaced on a rerun; the rest of the file is kept), charts into ``figures/`` beside it.

Devices: each run picks its device as ``runtime.run`` does (``train.device``, default auto: CUDA when there
is one). The study itself is not launched under ``torchrun``; for data-parallel runs give ``--launcher``,
e.g. ``--launcher "torchrun --standalone --nproc_per_node=4"``: each run then is
``<launcher> -m runtime.run ...`` in a subprocess (its output in ``<run dir>/study.log``). ``--jobs J`` runs J
runs at once, each in its own subprocess (on a CPU box, set ``OMP_NUM_THREADS`` so J x threads fit the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
BUDGET = ("train.steps", "train.batch_size", "train.grad_accum", "data", "backbone", "modality", "autoencoder")
"""Spec paths that must agree across the specs of one study (what the methods are compared under)."""


class StudyError(Exception):
    """The study cannot go ahead; the message says why (printed as ``error: ...``, exit 2)."""


@dataclass
class Job:
    """One (spec, seed) run."""

    path: str            # the spec file
    spec: Any            # the validated spec with the study's edits
    seed: int
    sets: list[str]      # the --set edits runtime.run gets
    out: Path            # its run directory


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m runtime.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--seeds", type=int, default=1, help="runs per spec, train.seed = 0..N-1")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--probe-blocks", default="2,4", help="blocks to linear-probe (comma-separated; '' for none)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="for every spec")
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--docs", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--section", default=None, help="name of the block in --docs (default: the --out folder's name)")
    ap.add_argument("--baseline", default=None, help="spec name to compare against (default: the flow_matching one)")
    ap.add_argument("--interval", choices=("t", "bootstrap"), default="t",
                    help="per-step 95 %% interval over seeds: Student t (default) or percentile bootstrap")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each in a subprocess when > 1)")
    ap.add_argument("--launcher", default=None, metavar="CMD",
                    help="run each training as `CMD -m runtime.run ...` in a subprocess (e.g. torchrun ...)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    if args.eval_every < 1:
        ap.error("--eval-every must be >= 1")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if args.section is None:
        args.section = args.out.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.section):
        ap.error(f"--section {args.section!r}: use letters, digits, '_', '.', '-'")
    return args


def probe_entries(blocks: str) -> list[dict]:
    """``"2,4"`` -> linear-probe metric entries (1000 real train images, 500 held-out)."""
    try:
        return [{"type": "linear_probe", "block": int(b), "num_train": 1000, "num_test": 500}
                for b in blocks.split(",") if b.strip()]
    except ValueError:
        raise StudyError(f"--probe-blocks {blocks!r}: give block numbers separated by commas, e.g. 2,4") from None


def run_sets(user_sets: list[str], metrics: list[dict], eval_every: int, seed: int) -> list[str]:
    """The ``--set`` edits of one run: the user's, then the seed, the eval cadence and metrics, no previews."""
    return [*user_sets, f"train.seed={seed}", f"eval.every={eval_every}", f"eval.metrics={json.dumps(metrics)}",
            "sample.every=null", "log.progress=false"]


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """Validate the specs (with the study's edits) and check they share one budget; one Job per (spec, seed).
    Raises StudyError."""
    from registry.errors import SpecError
    from registry.spec import load_spec, resolved_dict

    probes = probe_entries(args.probe_blocks)
    jobs: list[Job] = []
    for path in args.specs:
        try:
            spec = load_spec(path, args.sets)
            metrics = [m.model_dump(mode="json") for m in spec.eval.metrics] + probes
            for seed in range(args.seeds):
                sets = run_sets(args.sets, metrics, args.eval_every, seed)
                jobs.append(Job(path, load_spec(path, sets), seed, sets, args.out / spec.name / f"seed{seed}"))
        except SpecError as e:
            raise StudyError("\n".join(f"{path}: {line}" for line in e.lines())) from None
    first = {j.spec.name: resolved_dict(j.spec) for j in jobs if j.seed == 0}
    if len(first) != len(args.specs):
        raise StudyError("the specs need distinct names (each gets <out>/<name>/seed<s>)")
    ref_name, ref = next(iter(first.items()))
    for name, d in first.items():
        differ = [p for p in BUDGET if _at(d, p) != _at(ref, p)]
        if differ:
            raise StudyError(f"{name} differs from {ref_name} in {', '.join(differ)}; a study compares objectives "
                             f"under one budget (align them with --set)")
    return jobs


def _at(d: dict, dotted: str) -> Any:
    """``d["a"]["b"]`` for ``"a.b"`` (None where a key is missing)."""
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def baseline_name(jobs: list[Job], wanted: str | None) -> str:
    names = list(dict.fromkeys(j.spec.name for j in jobs))
    if wanted is not None:
        if wanted not in names:
            raise StudyError(f"--baseline {wanted!r} is not one of the specs ({', '.join(names)})")
        return wanted
    fm = list(dict.fromkeys(j.spec.name for j in jobs if j.spec.objective.type == "flow_matching"))
    if len(fm) != 1:
        raise StudyError(f"{len(fm)} specs have objective flow_matching ({', '.join(fm) or 'none'}); "
                         f"name the baseline with --baseline")
    return fm[0]


def state(job: Job) -> str:
    """``"finished"`` (``run_facts.json`` says ``train.steps`` and ``spec.resolved.json`` is this spec),
    ``"resume"`` (checkpoints to continue) or ``"fresh"``. Raises StudyError for a run finished under
    another spec whose checkpoints ``--resume auto`` would accept as complete without re-evaluating."""
    from registry.spec import resolved_dict
    from runtime.resume import diff_paths

    facts, saved = job.out / "run_facts.json", job.out / "spec.resolved.json"
    steps = None
    if facts.is_file():
        try:
            steps = int(json.loads(facts.read_text())["steps"])
        except (ValueError, KeyError, TypeError):
            steps = None
    if steps is not None and steps >= job.spec.train.steps and saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except ValueError:
            old = None
        mine = resolved_dict(job.spec)
        if old == mine and steps == job.spec.train.steps:
            return "finished"
        where = ", ".join(diff_paths(old, mine)[:6]) if isinstance(old, dict) else "spec.resolved.json unreadable"
        raise StudyError(f"{job.out} finished {steps} steps under a different spec ({where}); move it away or "
                         f"pass another --out")
    return "resume" if (job.out / "checkpoints").is_dir() else "fresh"


def run_argv(job: Job) -> list[str]:
    """``runtime.run``'s arguments for ``job`` (``--resume auto`` when it has checkpoints)."""
    resume = ["--resume", "auto"] if (job.out / "checkpoints").is_dir() else []
    return [job.path, "--out", str(job.out), *resume, *[a for s in job.sets for a in ("--set", s)]]


def execute(job: Job, launcher: list[str] | None) -> int:
    """Train ``job``: in this process, or ``launcher -m runtime.run ...`` with output to ``study.log``."""
    argv = run_argv(job)
    if launcher is None:
        from runtime import run as run_cli

        return run_cli.main(argv)
    job.out.mkdir(parents=True, exist_ok=True)
    with open(job.out / "study.log", "ab") as log:
        return subprocess.run([*launcher, "-m", "runtime.run", *argv], stdout=log, stderr=subprocess.STDOUT).returncode


def run_all(jobs: list[Job], n_jobs: int, launcher: list[str] | None) -> list[Job]:
    """Train the jobs that are not finished; returns the ones that failed."""
    todo = []
    for job in jobs:
        st = state(job)
        if st == "finished":
            print(f"skip   {job.spec.name} seed {job.seed}: finished ({job.out / 'run_facts.json'})", flush=True)
        else:
            print(f"{'resume' if st == 'resume' else 'train '} {job.spec.name} seed {job.seed} -> {job.out}", flush=True)
            todo.append(job)
    if n_jobs == 1:
        return [j for j in todo if execute(j, launcher) != 0]
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        rcs = list(pool.map(lambda j: execute(j, launcher or [sys.executable]), todo))
    return [j for j, rc in zip(todo, rcs) if rc != 0]


def _fail(lines: list[str]) -> int:
    for line in lines:
        sys.stderr.write(f"error: {line}\n")
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stderr.write("error: runtime.study runs under one process; launch it without torchrun and give "
                         "--launcher \"torchrun --standalone --nproc_per_node=N\" to run each training "
                         "data-parallel\n")
        return EXIT_USAGE
    import zoo  # noqa: F401
    from registry.errors import SpecError
    from registry.plugins import load_plugins

    try:
        load_plugins()
        jobs = plan_jobs(args)
        base = baseline_name(jobs, args.baseline)
        failed = run_all(jobs, args.jobs, shlex.split(args.launcher) if args.launcher else None)
    except SpecError as e:
        return _fail(e.lines())
    except StudyError as e:
        return _fail(str(e).splitlines())
    if failed:
        for j in failed:
            where = f"; its output is in {j.out / 'study.log'}" if (j.out / "study.log").is_file() else ""
            sys.stderr.write(f"error: {j.spec.name} seed {j.seed} failed{where}\n")
        sys.stderr.write("error: no results written; fix the cause and rerun (finished runs are skipped)\n")
        return 1
    from runtime.study_report import write_study

    doc, charts = write_study(jobs, base, args, "python -m runtime.study " + shlex.join(argv),
                              wall_s=time.perf_counter() - t0)
    print(f"wrote the block '{args.section}' of {doc} and {len(charts)} charts in {doc.parent / 'figures'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
