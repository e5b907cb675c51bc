"""What ``runtime.study`` writes once its runs are finished: per metric and spec the seed mean and 95 % interval
at every evaluated step, steps to the baseline's final quality, final-step comparisons, charts, a JSON summary
(``<out>/study_summary.json``) and a markdown block in the docs file (see :func:`replace_block`)."""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from runtime import stats

LEVEL, RESAMPLES = 0.95, 2000
SAME_PATHS = ("name", "objective", "teachers", "train.seed")
"""Spec paths where the methods of a study are expected to differ (the rest is listed in the block)."""


@dataclass
class Curves:
    """One metric of one spec: ``values (seeds, len(steps))`` at the steps every seed evaluated."""

    steps: list[int]
    values: np.ndarray


def eval_by_step(run_dir: Path, prefix: str = "eval/") -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` of the ``prefix`` keys in ``run_dir/metrics.jsonl`` (a later line of the
    same step wins: the end-of-run evaluation repeats the last cadence step on the same weights)."""
    from runtime.tracking import read_jsonl

    out: dict[int, dict[str, float]] = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        vals = {k[len(prefix):]: float(v) for k, v in row.items() if k.startswith(prefix)}
        if vals:
            out.setdefault(int(row["step"]), {}).update(vals)
    return out


def collect(jobs: list[Any]) -> dict[str, dict[str, Curves]]:
    """``{metric: {spec name: Curves}}`` over the seeds of each spec."""
    per_run: dict[str, list[dict[int, dict[str, float]]]] = {}
    for job in jobs:
        per_run.setdefault(job.spec.name, []).append(eval_by_step(job.out))
    keys = sorted({k for runs in per_run.values() for r in runs for vals in r.values() for k in vals})
    out: dict[str, dict[str, Curves]] = {}
    for key in keys:
        for name, runs in per_run.items():
            steps = sorted(set.intersection(*({s for s, v in r.items() if key in v} for r in runs)))
            if steps:
                vals = np.array([[r[s][key] for s in steps] for r in runs], dtype=np.float64)
                out.setdefault(key, {})[name] = Curves(steps, vals)
    return out


def directions(jobs: list[Any]) -> dict[str, bool]:
    """``{metric value name: higher is better}`` from the metrics' declarations (:meth:`Metric.directions`)."""
    from registry.kinds import METRICS

    out: dict[str, bool] = {}
    for job in jobs:
        for m in job.spec.eval.metrics:
            out.update(METRICS.get(m.type).directions(m))
    return out


def band(c: Curves, method: str) -> tuple[list[stats.Interval], list[float]]:
    ivs = [stats.mean_interval(c.values[:, i], LEVEL, method) for i in range(len(c.steps))]
    return ivs, [float(s) for s in c.steps]


def fmt(v: float) -> str:
    if not math.isfinite(v):
        return "n/a" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return f"{v:.4g}"


def fmt_interval(iv: stats.Interval) -> str:
    if iv.n < 2:
        return f"{fmt(iv.mean)} (n={iv.n})"
    return f"{fmt(iv.mean)} ± {fmt(iv.half_width)} [{fmt(iv.lo)}, {fmt(iv.hi)}] (n={iv.n})"


def fmt_step(s: float, total: int) -> str:
    return "not reached" if not math.isfinite(s) else f"{int(s)} ({100 * s / total:.0f} %)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(jobs: list[Any]) -> str:
    import torch

    devices = set()
    for job in jobs:
        try:
            facts = json.loads((job.out / "run_facts.json").read_text())
            devices.add(f"{facts['device_name']} x{facts['world_size']}")
        except (OSError, ValueError, KeyError):
            pass
    return (f"{cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, Python "
            f"{platform.python_version()}; runs on {', '.join(sorted(devices)) or 'unknown'}")


def train_seconds(jobs: list[Any]) -> float:
    total = 0.0
    for job in jobs:
        try:
            total += float(json.loads((job.out / "run_facts.json").read_text())["wall_s_total"])
        except (OSError, ValueError, KeyError):
            pass
    return total


def spec_differences(jobs: list[Any], base: str) -> list[str]:
    """``name: path (value vs baseline value)`` for resolved-spec paths outside :data:`SAME_PATHS` that differ
    from the baseline's."""
    from registry.spec import resolved_dict
    from runtime.resume import diff_paths

    first = {j.spec.name: resolved_dict(j.spec) for j in jobs if j.seed == 0}
    ref, lines = first[base], []
    for name, d in first.items():
        paths = [p for p in diff_paths(d, ref)
                 if not any(p == s or p.startswith((s + ".", s + "[")) for s in SAME_PATHS)]
        if paths:
            shown = []
            for p in paths[:8]:
                a, b = d, ref
                for part in p.replace("[", ".[").split("."):
                    key: Any = int(part[1:-1]) if part.startswith("[") else part
                    a = a[key] if isinstance(a, (dict, list)) and _has(a, key) else None
                    b = b[key] if isinstance(b, (dict, list)) and _has(b, key) else None
                shown.append(f"`{p}` {json.dumps(a)} (baseline {json.dumps(b)})")
            lines.append(f"{name}: " + ", ".join(shown) + (" ..." if len(paths) > 8 else ""))
    return lines


def _has(container: Any, key: Any) -> bool:
    return key in container if isinstance(container, dict) else isinstance(key, int) and key < len(container)


def _finite_or_null(x: Any) -> Any:
    """``x`` with every NaN / infinity replaced by None (strict JSON; a None step means "not reached")."""
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def replace_block(path: Path, section: str, body: str) -> None:
    """Put ``body`` between ``<!-- study:SECTION -->`` and ``<!-- /study:SECTION -->`` in ``path``: in place of
    an existing block of that name, else appended; everything else in the file is kept."""
    begin, end = f"<!-- study:{section} -->", f"<!-- /study:{section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    old = path.read_text() if path.is_file() else ""
    i = old.find(begin)
    j = old.find(end, i + len(begin)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        rest = old[j + len(end):].lstrip("\n")
        new = old[:i] + block + ("\n" + rest if rest else "")
    else:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    tmp.replace(path)


@dataclass
class Results:
    """Everything the block reports, per metric value name ``key`` and spec ``name``."""

    names: list[str]
    base: str
    curves: dict[str, dict[str, Curves]]
    dirs: dict[str, bool]
    final: dict[str, dict[str, stats.Interval]]      # the interval at the last evaluated step
    reach: dict[str, dict[str, stats.Crossing]]      # steps to the baseline's final mean (directed metrics)

    def head(self, key: str) -> str:
        return key + {True: " ↑", False: " ↓"}.get(self.dirs.get(key), "")


def analyse(jobs: list[Any], base: str, interval: str) -> tuple[Results, dict[str, Any], dict[str, Any]]:
    """(results, per-metric chart bands ``{key: {name: Band}}``, the JSON summary's ``metrics`` part)."""
    curves, dirs = collect(jobs), directions(jobs)
    res = Results(list(dict.fromkeys(j.spec.name for j in jobs)), base, curves, dirs, {}, {})
    bands: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for key, per in curves.items():
        summary[key] = {"higher_is_better": dirs.get(key), "specs": {}}
        for name, c in per.items():
            ivs, xs = band(c, interval)
            b = bands.setdefault(key, {})[name] = (xs, [iv.mean for iv in ivs], [iv.lo for iv in ivs],
                                                   [iv.hi for iv in ivs])
            res.final.setdefault(key, {})[name] = ivs[-1]
            summary[key]["specs"][name] = {"steps": c.steps, "values": c.values.tolist(), "mean": b[1], "lo": b[2],
                                           "hi": b[3]}
        if dirs.get(key) is None or base not in per or not math.isfinite(res.final[key][base].mean):
            continue  # no direction, or no baseline quality to reach (NaN in every baseline run)
        for name, c in per.items():
            cross = stats.steps_to_quality(c.steps, c.values, None if name == base else per[base].values[:, -1],
                                           dirs[key], LEVEL, RESAMPLES, seed=0)
            res.reach.setdefault(key, {})[name] = cross
            summary[key]["specs"][name]["steps_to_baseline"] = {"step": cross.step, "lo": cross.lo, "hi": cross.hi,
                                                                "reached": cross.reached}
            if name != base and name in res.final[key] and base in res.final[key]:
                d = stats.welch_interval(c.values[:, -1], per[base].values[:, -1], LEVEL)
                summary[key]["specs"][name]["vs_baseline"] = {
                    "diff": d.mean, "lo": d.lo, "hi": d.hi, "overlap": overlap(res.final[key][name], res.final[key][base])}
    return res, bands, summary


def overlap(a: stats.Interval, b: stats.Interval) -> bool | None:
    """Whether two intervals share a point; None when either is undefined (fewer than two finite seeds)."""
    if not all(math.isfinite(v) for v in (a.lo, a.hi, b.lo, b.hi)):
        return None
    return a.overlaps(b)


def final_table(res: Results, interval: str, total: int) -> list[str]:
    how = ("95 % Student-t interval over seeds (n − 1 degrees of freedom)" if interval == "t" else
           "95 % percentile-bootstrap interval of the seed mean (10 000 resamples)")
    keys = list(res.curves)
    lines = [f"### Final values (step {total}): seed mean ± half-width [95 % interval]", "",
             f"Interval: {how}. ↑ higher is better, ↓ lower is better.", "",
             "| run | " + " | ".join(res.head(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for n in res.names:
        lines.append(f"| {n} | " + " | ".join(fmt_interval(res.final[k][n]) if n in res.final.get(k, {}) else "—"
                                              for k in keys) + " |")
    return lines


def versus_table(res: Results, total: int) -> list[str]:
    keys, base = list(res.curves), res.base
    lines = [f"### Against `{base}` at step {total}", "",
             "Δ = mean − baseline mean with Welch's 95 % interval; **overlap** = the two final intervals above share "
             "a point (no difference shown at this number of seeds), **separate** = they do not (better/worse by "
             "the metric's direction), n/a = an interval is undefined (fewer than two finite seeds).", "",
             "| run | " + " | ".join(res.head(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for n in res.names:
        if n == base:
            continue
        cells = []
        for k in keys:
            mine, theirs = res.final.get(k, {}).get(n), res.final.get(k, {}).get(base)
            if mine is None or theirs is None:
                cells.append("—")
                continue
            d = stats.welch_interval(res.curves[k][n].values[:, -1], res.curves[k][base].values[:, -1], LEVEL)
            both = overlap(mine, theirs)
            mark = "n/a" if both is None else "overlap" if both else "separate"
            if mark == "separate" and res.dirs.get(k) is not None:
                mark += ", " + ("better" if (mine.mean > theirs.mean) == res.dirs[k] else "worse")
            cells.append(f"Δ {fmt(d.mean)} [{fmt(d.lo)}, {fmt(d.hi)}]; **{mark}**")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def reach_table(res: Results, total: int, n_seeds: int) -> list[str]:
    keys, base = [k for k in res.curves if k in res.reach], res.base
    lines = [f"### Steps to `{base}`'s final quality", "",
             f"The first evaluated step at which the run's seed-mean curve is at least as good as `{base}`'s "
             f"seed mean at step {total}, as a share of the {total} steps; [interval] = 2.5th/97.5th percentiles "
             f"over {RESAMPLES} bootstrap resamples of the seeds of the run and of the baseline (independently); "
             f"\"not reached\" = not within the evaluated steps. With {n_seeds} seeds a method has only "
             f"{math.comb(2 * n_seeds - 1, n_seeds)} distinct resamples: read the interval as coarse. `{base}`'s "
             "own row is the step at which its curve first reaches its final mean.", "",
             "| run | " + " | ".join(res.head(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for n in res.names:
        cells = []
        for k in keys:
            c = res.reach[k].get(n)
            if c is None:
                cells.append("—")
                continue
            main = fmt_step(math.inf if c.step is None else c.step, total)
            bound = lambda v: "not reached" if not math.isfinite(v) else str(int(v))  # noqa: E731
            cells.append(f"{main} [{bound(c.lo)}, {bound(c.hi)}]"
                         + (f"; reached in {100 * c.reached:.0f} % of resamples" if c.reached < 1 else ""))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def write_study(jobs: list[Any], base: str, args: Any, command: str, wall_s: float) -> tuple[Path, list[Path]]:
    """Statistics, charts, ``<out>/study_summary.json`` and the markdown block; returns (docs file, charts)."""
    from runtime.plots import band_chart

    res, bands, metrics = analyse(jobs, base, args.interval)
    spec0, n_seeds = jobs[0].spec, args.seeds
    total = spec0.train.steps
    figs = args.docs.parent / "figures"
    charts, empty = [], []
    for key, per in bands.items():
        if not any(math.isfinite(m) for b in per.values() for m in b[1]):
            empty.append(key)  # e.g. av_sync_ms when no clip has a detectable bounce: NaN in every run
            continue
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(res.dirs.get(key), "")
        charts.append(band_chart(per, figs / f"study_{args.section}_{key}.png", title=f"{key}{arrow}",
                                 xlabel="step", ylabel=key))
    real = eval_by_step(next(j.out for j in jobs if j.spec.name == base), "real/")
    real_vals = real[max(real)] if real else {}
    lines = [f"## Study `{args.section}`: {', '.join(res.names)} ({n_seeds} seed{'s' if n_seeds > 1 else ''} each)",
             "", f"Command: `{command}`  ",
             f"Machine: {machine_line(jobs)}  ",
             f"Date: {date.today().isoformat()}; wall time of this invocation {wall_s / 60:.1f} min "
             f"(runs skipped as finished take none); training + evaluation time summed over all runs "
             f"{train_seconds(jobs) / 60:.1f} min.  ",
             f"Budget: {total} steps × batch {spec0.train.batch_size} per run, train.seed = 0..{n_seeds - 1} "
             f"(initialisation, data order, noise); evaluated every {args.eval_every} steps on the EMA weights "
             f"({spec0.eval.num_samples} generated samples per sample metric; linear probes fit on up to 1000 real "
             f"train samples, scored on up to 500 held-out). Baseline: `{base}`.", ""]
    diffs = spec_differences(jobs, base)
    if diffs:
        lines += ["The specs also differ from the baseline outside the objective (not only the method changes):", ""]
        lines += [f"- {d}" for d in diffs] + [""]
    lines += final_table(res, args.interval, total)
    if real_vals:
        lines += ["", "Real held-out data (the ceiling): " + ", ".join(f"{k} {fmt(v)}" for k, v in real_vals.items())]
    lines += ["", *versus_table(res, total), "", *reach_table(res, total, n_seeds), "",
              "Charts: seed mean (line) and its 95 % interval (shaded) per evaluated step"
              + (f"; none for {', '.join(empty)} (no finite value in any run)." if empty else "."), ""]
    lines += [f"![{c.stem}]({Path(os.path.relpath(c, args.docs.parent)).as_posix()})" for c in charts]
    replace_block(args.docs, args.section, "\n".join(lines) + "\n")
    summary = {"command": command, "baseline": base, "seeds": n_seeds, "steps": total, "interval": args.interval,
               "level": LEVEL, "metrics": metrics}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study_summary.json").write_text(json.dumps(_finite_or_null(summary), indent=1) + "\n")
    return args.docs, charts
