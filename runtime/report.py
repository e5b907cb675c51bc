"""``report.html`` of a run directory: the newest samples (playable MP4 with sound, WAV, GIF, contact sheet or
image grid), loss curves, the metrics beside their real-data ceiling, and the resolved spec.

Built from the files of the run alone (``samples/``, ``eval/``, ``metrics.jsonl``, ``spec.resolved.json``), so
it can be rebuilt at any time: ``python -m runtime.report RUN_DIR``. Paths in the page are relative: the run
directory can be moved or copied as a whole.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

from runtime.plots import line_chart

_CURVES = ("loss", "loss_flow", "loss_rep")


def _latest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.name) if paths else None


def _curves(run_dir: Path) -> list[Path]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = [k for k in _CURVES if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r if k.startswith("loss_flow_")})
    out = []
    if keys:
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
        out.append(line_chart({k: v for k, v in series.items() if v}, run_dir / "report" / "losses.png",
                              title="training losses", xlabel="step", ylabel="loss"))
    evals = sorted({k for r in rows for k in r if k.startswith("eval/")})
    if evals and len([r for r in rows if evals[0] in r]) > 1:
        series = {k[5:]: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in evals}
        out.append(line_chart(series, run_dir / "report" / "eval.png", title="evaluation", xlabel="step", ylabel="value"))
    return out


def _metrics_table(run_dir: Path) -> str:
    ev = _latest(sorted((run_dir / "eval").glob("step_*.json")))
    if ev is None:
        return "<p>No evaluation was run (spec <code>eval.metrics</code> is empty).</p>"
    vals = json.loads(ev.read_text())
    names = sorted({k.split("/", 1)[1] for k in vals if "/" in k})
    rows = []
    for n in names:
        s, r = vals.get(f"eval/{n}"), vals.get(f"real/{n}")
        rows.append(f"<tr><td>{html.escape(n)}</td><td>{'' if s is None else f'{s:.4f}'}</td>"
                    f"<td>{'' if r is None else f'{r:.4f}'}</td></tr>")
    step = int(re.sub(r"\D", "", ev.stem) or 0)
    return (f"<p>Step {step}; samples from the EMA model. The ceiling is the same metric on real held-out clips of "
            f"the dataset.</p><table><tr><th>metric</th><th>samples</th><th>real data (ceiling)</th></tr>"
            + "".join(rows) + "</table>")


def _samples(run_dir: Path) -> str:
    root = run_dir / "samples"
    sheets = sorted(root.glob("step_*.png"))
    sheet = _latest(sheets)
    if sheet is None:
        return "<p>No samples yet.</p>"
    stem = sheet.stem
    parts = [f"<p>Samples at {html.escape(stem.replace('_', ' '))}.</p>"]
    clips = sorted((root / stem).glob("*.mp4")) or sorted((root / stem).glob("*.wav"))
    if clips:
        cells = []
        for c in clips:
            rel = c.relative_to(run_dir).as_posix()
            label = re.search(r"label(\d+)", c.stem)
            cap = f"label {label.group(1)}" if label else c.stem
            tag = (f'<video controls loop preload="metadata" src="{rel}"></video>' if c.suffix == ".mp4"
                   else f'<audio controls preload="metadata" src="{rel}"></audio>')
            wav = c.with_suffix(".wav")
            extra = f' · <a href="{wav.relative_to(run_dir).as_posix()}">wav</a>' if c.suffix == ".mp4" and wav.is_file() else ""
            cells.append(f"<figure>{tag}<figcaption>{html.escape(cap)}{extra}</figcaption></figure>")
        parts.append('<div class="clips">' + "".join(cells) + "</div>")
    gif = root / f"{stem}.gif"
    if gif.is_file():
        parts.append(f'<h3>Animated preview</h3><img class="pix" src="{gif.relative_to(run_dir).as_posix()}">')
    parts.append(f'<h3>Contact sheet</h3><img class="pix" src="{sheet.relative_to(run_dir).as_posix()}">')
    return "".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (and its charts under ``run_dir/report/``); returns its path."""
    run_dir = Path(run_dir)
    spec_path = run_dir / "spec.resolved.json"
    spec_text = spec_path.read_text() if spec_path.is_file() else "{}"
    name = json.loads(spec_text).get("name", run_dir.name)
    charts = "".join(f'<img src="{p.relative_to(run_dir).as_posix()}">' for p in _curves(run_dir))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(name)} — report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child {{ text-align: left; }}
.clips {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; }} video {{ width: 192px; image-rendering: pixelated; }}
img.pix {{ image-rendering: pixelated; max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>{html.escape(name)}</h1>
<h2>Samples</h2>{_samples(run_dir)}
<h2>Metrics</h2>{_metrics_table(run_dir)}
<h2>Training curves</h2>{charts or "<p>No logged steps yet.</p>"}
<h2>Resolved spec</h2><pre>{html.escape(spec_text)}</pre>
</body></html>
"""
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.report", description=__doc__)
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args(argv)
    if not (args.run_dir / "spec.resolved.json").is_file():
        sys.stderr.write(f"error: {args.run_dir} is not a run directory (no spec.resolved.json)\n")
        return 2
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
