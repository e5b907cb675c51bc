"""Line charts drawn with matplotlib (Agg canvas, no display needed): metric curves for studies and reports.

Figures are built as ``matplotlib.figure.Figure`` objects on their own Agg canvas, never through
``pyplot``'s global state, so charting works in threads and never opens a window. Ticks come from matplotlib's
default locator (round values).
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
Series = dict[str, list[tuple[float, float]]]


def _finite(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return sorted((float(x), float(y)) for x, y in points if math.isfinite(float(x)) and math.isfinite(float(y)))


def _draw(ax, series: Series, xlabel: str, ylabel: str) -> int:
    """Plot every series on ``ax`` (markers when a series has few points); returns the number of points drawn."""
    drawn = 0
    for name, pts in series.items():
        pts = _finite(pts)
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=name, linewidth=1.6, marker="o" if len(pts) <= 30 else None, markersize=3.5)
        drawn += len(pts)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return drawn


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    FigureCanvasAgg(fig).print_png(str(tmp))
    tmp.replace(path)
    return path


def line_chart(series: Series, path: Path, *, title: str, xlabel: str, ylabel: str,
               size: tuple[int, int] = (640, 400)) -> Path:
    """One line per series (points ``(x, y)``; non-finite points dropped) on one axis, with a legend; saved as a
    ``size`` (pixels) PNG. Raises ValueError when no series has a finite point."""
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    if not _draw(ax, series, xlabel, ylabel):
        raise ValueError(f"{title}: nothing to plot")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(frameon=False, fontsize=9)
    return _save(fig, path)


def panel_chart(panels: dict[str, Series], path: Path, *, title: str, xlabel: str,
                ceilings: dict[str, float] | None = None, cols: int = 3, panel_size: tuple[int, int] = (340, 240)) -> Path:
    """Small multiples: one axis per panel (its own y scale), each with its series and, when ``ceilings`` names the
    panel, a dashed horizontal line labelled "real data". Saved as a PNG of ``panel_size`` pixels per panel."""
    names = [n for n, s in panels.items() if any(_finite(p) for p in s.values())]
    if not names:
        raise ValueError(f"{title}: nothing to plot")
    cols = max(1, min(cols, len(names)))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(cols * panel_size[0] / DPI, rows * panel_size[1] / DPI + 0.3), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        _draw(ax, panels[name], xlabel, "")
        ceiling = (ceilings or {}).get(name)
        if ceiling is not None and math.isfinite(ceiling):
            ax.axhline(ceiling, color="#555555", linestyle="--", linewidth=1.2, label="real data")
        ax.set_title(name, fontsize=10)
        if len(panels[name]) > 1 or ceiling is not None:
            ax.legend(frameon=False, fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


Band = tuple[list[float], list[float], list[float], list[float]]
"""``(steps, mean, lo, hi)`` of one method; NaN bounds (one seed) draw the mean line alone."""


def band_chart(bands: dict[str, Band], path: Path, *, title: str, xlabel: str, ylabel: str,
               size: tuple[int, int] = (640, 400)) -> Path:
    """One mean line per method with its interval shaded in the line's colour (points with non-finite means
    dropped; the band only where both bounds are finite); saved as a ``size`` (pixels) PNG. Raises ValueError
    when no method has a finite mean."""
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    drawn = 0
    for name, (xs, mean, lo, hi) in bands.items():
        pts = [(x, m, a, b) for x, m, a, b in zip(xs, mean, lo, hi) if math.isfinite(x) and math.isfinite(m)]
        if not pts:
            continue
        x, m, a, b = (list(c) for c in zip(*pts))
        line, = ax.plot(x, m, label=name, linewidth=1.6, marker="o" if len(x) <= 30 else None, markersize=3.5)
        ok = [math.isfinite(u) and math.isfinite(v) for u, v in zip(a, b)]
        if len(x) == 1 and ok[0]:  # one evaluated step: an error bar, a band would have no width
            ax.errorbar(x, m, yerr=[[m[0] - a[0]], [b[0] - m[0]]], color=line.get_color(), capsize=4, linewidth=1.2)
        elif any(ok):
            ax.fill_between(x, [u if k else math.nan for u, k in zip(a, ok)], [v if k else math.nan for v, k in zip(b, ok)],
                            color=line.get_color(), alpha=0.18, linewidth=0)
        drawn += len(x)
    if not drawn:
        raise ValueError(f"{title}: nothing to plot")
    _draw(ax, {}, xlabel, ylabel)  # axis labels, grid and spines as the other charts
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: whole, round numbers
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=9)
    return _save(fig, path)
