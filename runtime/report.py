"""``report.html`` of a run directory: run facts, the newest samples (playable MP4 with sound and a poster
frame, WAV, GIF, contact sheet or image grid) each beside a real held-out clip of the same label with what the
metrics read in both, the metrics beside their real-data ceiling with one line on what each measures, loss and
evaluation curves (matplotlib), and the resolved spec (folded).

Built from the files of the run alone (``run_facts.json``, ``samples/``, ``eval/``, ``metrics.jsonl``,
``spec.resolved.json``, ``checkpoints/*/meta.json``), so it can be rebuilt at any time:
``python -m runtime.report RUN_DIR``. Paths in the page are relative: the run directory can be moved or copied
as a whole.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from runtime.plots import line_chart, panel_chart
from runtime.tracking import read_jsonl

_CURVES = ("loss", "loss_flow", "loss_rep")
METRIC_HELP: dict[str, str] = {
    "av_agreement": "share of clips whose video digit (frame classifier, majority over frames) equals the digit "
                    "decoded from their DTMF tones; higher is better",
    "av_sync_ms": "median offset in ms between each bounce seen in the video and the nearest tone onset heard in "
                  "the audio; lower is better",
    "av_sync_detected": "share of clips where both a bounce and a tone onset after the start burst were found "
                        "(the clips av_sync_ms is measured on)",
    "video_class_accuracy": "share of clips whose video digit (frame classifier, majority over frames) is the "
                            "requested label",
    "audio_class_accuracy": "share of clips whose DTMF digit is the requested label",
    "video_consistency": "share of clips whose frame classifier reads the same digit in every frame (no glyph "
                         "morphing into another digit)",
    "class_accuracy": "share of generated images the digit classifier assigns to the requested label",
    "classifier_fd": "Fréchet distance between generated and real images in the digit classifier's feature "
                     "space; lower is better",
}
_PROBE = re.compile(r"linear_probe_b(\d+)(?:_t([\d.e-]+))?$")


def metric_help(name: str) -> str:
    """One line on what metric ``name`` measures (a generic line for names this page does not know)."""
    if name in METRIC_HELP:
        return METRIC_HELP[name]
    m = _PROBE.match(name)
    if m:
        at = f" at noise level t = {m.group(2)}" if m.group(2) else ""
        return (f"accuracy of a linear classifier on the EMA model's hidden states after block {m.group(1)}{at}: "
                f"how class-separable its features are")
    return "a registered metric; its class docstring in zoo/metrics says what it measures"


def _latest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.name) if paths else None


def _rel(run_dir: Path, p: Path) -> str:
    return html.escape(p.relative_to(run_dir).as_posix(), quote=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ facts
def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def run_facts(run_dir: Path, spec: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, str]:
    """Facts shown at the top of the page, as display strings (``"—"`` when the run recorded nothing)."""
    facts = _read_json(run_dir / "run_facts.json") or {}
    ck = _latest([p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()])
    meta = (_read_json(ck / "meta.json") if ck is not None else None) or {}
    tr = spec.get("train", {})
    when = facts.get("finished")
    if when is None and (run_dir / "metrics.jsonl").is_file():
        when = datetime.fromtimestamp((run_dir / "metrics.jsonl").stat().st_mtime).astimezone().isoformat(
            timespec="seconds")
    device, world = facts.get("device_name") or meta.get("device"), facts.get("world_size", meta.get("world_size", 1))
    if device and world > 1:
        device += f" x {world}"
    last = max((r["step"] for r in rows if "loss" in r), default=None)
    steps = facts.get("steps", last)
    wall = facts.get("wall_s_total", facts.get("wall_s"))
    obj = spec.get("objective", {}).get("type")
    backbone = spec.get("backbone", {}).get("type")
    return {
        "date": when.replace("T", " ") if when else "—",
        "device": device or "—",
        "wall time": _duration(wall) if wall is not None else "—",
        "steps": (f"{steps:,} of {tr.get('steps'):,}" if steps is not None and tr.get("steps") else "—")
        + (f" ({facts['skipped_steps']} skipped)" if facts.get("skipped_steps") else ""),
        "batch": f"{tr['batch_size']}" if "batch_size" in tr else "—",
        "parameters": f"{_count(facts['parameters'])} ({backbone})" if "parameters" in facts else "—",
        "objective": obj or "—",
        "seed": str(tr.get("seed", "—")),
        "data": spec.get("data", {}).get("type", "—"),
    }


def _facts_html(facts: dict[str, str]) -> str:
    cells = "".join(f"<div><dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd></div>" for k, v in facts.items())
    return f'<dl class="facts">{cells}</dl>'


# ------------------------------------------------------------------------------------------------ curves
def _curves(run_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    keys = [k for k in _CURVES if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r if k.startswith("loss_flow_")})
    out = []
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if series:
        out.append(line_chart(series, run_dir / "report" / "losses.png", title="training losses", xlabel="step",
                              ylabel="loss", size=(760, 420)))
    evals = sorted({k[5:] for r in rows for k in r if k.startswith("eval/")})
    if evals and sum(1 for r in rows if f"eval/{evals[0]}" in r) > 1:
        panels = {k: {"samples": [(r["step"], r[f"eval/{k}"]) for r in rows
                                  if isinstance(r.get(f"eval/{k}"), (int, float))]} for k in evals}
        ceilings = {k: next((r[f"real/{k}"] for r in reversed(rows) if isinstance(r.get(f"real/{k}"), (int, float))),
                            None) for k in evals}
        try:
            out.append(panel_chart(panels, run_dir / "report" / "eval.png", title="evaluation (EMA samples)",
                                   xlabel="step", ceilings=ceilings))
        except ValueError:  # every value NaN
            pass
    return out


# ------------------------------------------------------------------------------------------------ metrics
def _fmt(v: Any) -> str:
    return "" if not isinstance(v, (int, float)) else f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"


def _metrics_table(run_dir: Path) -> str:
    ev = _latest(sorted((run_dir / "eval").glob("step_*.json")))
    if ev is None:
        return "<p>No evaluation was run (spec <code>eval.metrics</code> is empty).</p>"
    vals = _read_json(ev) or {}
    names = sorted({k.split("/", 1)[1] for k in vals if "/" in k})
    rows = [f"<tr><td><code>{html.escape(n)}</code></td><td>{_fmt(vals.get(f'eval/{n}'))}</td>"
            f"<td>{_fmt(vals.get(f'real/{n}'))}</td><td class=help>{html.escape(metric_help(n))}</td></tr>"
            for n in names]
    step = int(re.sub(r"\D", "", ev.stem) or 0)
    return (f"<p>Step {step}; samples from the EMA model. The ceiling is the same metric on as many real held-out "
            f"samples of the dataset.</p><table class=metrics><tr><th>metric</th><th>samples</th>"
            f"<th>real data (ceiling)</th><th>what it measures</th></tr>" + "".join(rows) + "</table>")


# ------------------------------------------------------------------------------------------------ samples
def _readings(path: Path) -> dict[str, dict[str, Any]]:
    data = _read_json(path) or {}
    return {c["file"]: c for c in data.get("clips", []) if isinstance(c, dict) and "file" in c}


def _reading_html(r: dict[str, Any] | None, label: int | None, streams: tuple[str, ...],
                  half_frame_ms: float | None) -> str:
    """What the metrics read in one clip, each part marked ``bad`` when it fails (wrong digit, out of sync)."""
    if not r:
        return ""
    if r.get("finite") is False:
        return '<div class="read"><span class="bad">NaN/inf in the clip</span></div>'
    parts = []
    for stream, none in (("video", "?"), ("audio", "none")):
        if stream in streams:
            d = r.get(f"{stream}_digit")
            ok = d is not None and (label is None or d == label)
            parts.append(f'<span class="{"ok" if ok else "bad"}">{stream} {d if d is not None else none}</span>')
    if "video" in streams and "audio" in streams:
        s = r.get("sync_ms")
        bad = s is not None and half_frame_ms is not None and s > half_frame_ms
        parts.append('<span class="na">sync n/a</span>' if s is None
                     else f'<span class="{"bad" if bad else "ok"}">sync {s:.0f} ms</span>')
    if r.get("frame_digits"):
        parts.append('<span class="ok">frames agree</span>' if r.get("consistent")
                     else f'<span class="bad">frames {"".join(map(str, r["frame_digits"]))}</span>')
    return '<div class="read">' + " · ".join(parts) + "</div>"


def _clip_html(run_dir: Path, clip: Path, kind: str, reading: dict[str, Any] | None, streams: tuple[str, ...],
               half_frame_ms: float | None) -> str:
    label = re.search(r"label(\d+)", clip.stem)
    lab = int(label.group(1)) if label else None
    if clip.suffix == ".mp4":
        poster = clip.with_suffix(".png")
        attr = f' poster="{_rel(run_dir, poster)}"' if poster.is_file() else ""
        tag = (f'<video controls loop playsinline preload="metadata"{attr} src="{_rel(run_dir, clip)}"></video>')
    else:
        tag = f'<audio controls preload="metadata" src="{_rel(run_dir, clip)}"></audio>'
    wav = clip.with_suffix(".wav")
    extra = f' · <a href="{_rel(run_dir, wav)}">wav</a>' if clip.suffix == ".mp4" and wav.is_file() else ""
    cap = f"{kind}" + (f" · label {lab}" if lab is not None else f" · {html.escape(clip.stem)}")
    return (f'<figure class="{kind}">{tag}<figcaption>{cap}{extra}'
            f"{_reading_html(reading, lab, streams, half_frame_ms)}</figcaption></figure>")


def _clips(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.mp4")) or sorted(folder.glob("*.wav"))


def _legend(streams: tuple[str, ...], half_frame_ms: float | None, readings: bool) -> str:
    """The line above the clips: what is paired, and what each reading under a clip means."""
    text = "Each generated clip beside a real held-out clip of the same label."
    if not readings:
        return f"<p class=legend>{text}</p>"
    parts, bad = [], ["not the label"]
    if "video" in streams:
        parts.append("<b>video</b> = the digit the frame classifier sees (majority over the frames)")
    if "audio" in streams:
        parts.append("<b>audio</b> = the digit decoded from the DTMF tones")
        bad.append("no tone")
    if "video" in streams and "audio" in streams:
        parts.append("<b>sync</b> = how far the tone onsets are from the bounces (median)")
        if half_frame_ms is not None:
            bad.append(f"more than half a frame ({half_frame_ms:.0f} ms) out of sync")
    if "video" in streams:
        parts.append("<b>frames</b> = whether every frame reads the same digit")
        bad.append("frames that read different digits")
    return (f"<p class=legend>{text} Under each, what the metrics read in it: {', '.join(parts)}. "
            f"<span class=bad>Red</span>: {', '.join(bad)}.</p>")


def _samples(run_dir: Path, spec: dict[str, Any]) -> str:
    root = run_dir / "samples"
    sheet = _latest(sorted(root.glob("step_*.png")))
    if sheet is None:
        return "<p>No samples yet.</p>"
    stem = sheet.stem
    parts = [f"<p>Samples at {html.escape(stem.replace('_', ' '))} (EMA model).</p>"]
    gen = _clips(root / stem)
    if gen:
        fps = spec.get("data", {}).get("fps")
        streams = tuple(spec.get("data", {}).get("streams") or ("video", "audio"))
        half = 500.0 / fps if isinstance(fps, (int, float)) and fps > 0 else None
        reads, real_reads = _readings(root / stem / "clips.json"), _readings(root / "real" / "clips.json")
        real_by_label: dict[str, list[Path]] = {}
        for c in _clips(root / "real"):
            real_by_label.setdefault(re.sub(r"^\d+_?", "", c.stem), []).append(c)
        if reads or real_by_label:
            parts.append(_legend(streams, half, bool(reads)))
        cells = []
        for c in gen:
            pair = [_clip_html(run_dir, c, "generated", reads.get(c.stem), streams, half)]
            twins = real_by_label.get(re.sub(r"^\d+_?", "", c.stem), [])
            if twins:
                r = twins.pop(0)
                pair.append(_clip_html(run_dir, r, "real", real_reads.get(r.stem), streams, half))
            cells.append('<div class="pair">' + "".join(pair) + "</div>")
        parts.append('<div class="clips">' + "".join(cells) + "</div>")
    gif = root / f"{stem}.gif"
    if gif.is_file():
        parts.append(f'<h3>Animated preview</h3><img class="pix" alt="animated preview" src="{_rel(run_dir, gif)}">')
    parts.append(f'<h3>Contact sheet</h3><img class="pix" alt="contact sheet" src="{_rel(run_dir, sheet)}">')
    return "".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; }
dl.facts { display: flex; flex-wrap: wrap; gap: 0.4em 1.6em; margin: 0.5em 0 1.5em; padding: 0.8em 1em;
  background: #f4f6f8; border-radius: 6px; }
dl.facts div { display: flex; flex-direction: column; } dt { font-size: 12px; color: #667; } dd { margin: 0; font-weight: 600; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
td:first-child, td.help, th:last-child { text-align: left; } td.help { color: #555; font-size: 13px; max-width: 560px; }
.legend { color: #444; font-size: 14px; max-width: 900px; }
.clips { display: flex; flex-wrap: wrap; gap: 14px; }
.pair { display: flex; gap: 6px; padding: 6px; background: #fafafa; border: 1px solid #e3e3e3; border-radius: 6px; }
figure { margin: 0; width: 176px; } figcaption { font-size: 12px; margin-top: 2px; }
figure.real figcaption { color: #555; }
video { width: 176px; height: 176px; background: #000; image-rendering: pixelated; display: block; }
audio { width: 176px; }
.read { margin-top: 2px; line-height: 1.4; } .ok { color: #1a7f37; } .bad { color: #cf222e; font-weight: 600; }
.na { color: #888; }
img.pix { image-rendering: pixelated; max-width: 100%; }
img.chart { max-width: 100%; }
details { margin: 1em 0; } summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }
"""


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (and its charts under ``run_dir/report/``); returns its path."""
    run_dir = Path(run_dir)
    spec_path = run_dir / "spec.resolved.json"
    spec_text = spec_path.read_text() if spec_path.is_file() else "{}"
    spec = json.loads(spec_text)
    name = spec.get("name", run_dir.name)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    charts = "".join(f'<img class="chart" alt="{p.stem}" src="{_rel(run_dir, p)}">' for p in _curves(run_dir, rows))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>{html.escape(name)} — report</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(name)}</h1>
{_facts_html(run_facts(run_dir, spec, rows))}
<h2>Samples</h2>{_samples(run_dir, spec)}
<h2>Metrics</h2>{_metrics_table(run_dir)}
<h2>Training curves</h2>{charts or "<p>No logged steps yet.</p>"}
<details><summary>Resolved spec (JSON)</summary><pre>{html.escape(spec_text)}</pre></details>
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
