"""Small line charts drawn with Pillow (no plotting dependency): metric curves for studies and reports."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_chart(series: dict[str, list[tuple[float, float]]], path: Path, *, title: str, xlabel: str, ylabel: str,
               size: tuple[int, int] = (640, 400)) -> Path:
    """One line per series (points ``(x, y)``), axes with 5 ticks each, a legend; saved as PNG."""
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    pts = [p for s in series.values() for p in s]
    if not pts:
        raise ValueError(f"{title}: nothing to plot")
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        fx, fy = x0 + i / 4 * (x1 - x0), y0 + i / 4 * (y1 - y0)
        gx, gy = px(fx, fy)
        d.line([gx, h - bottom, gx, h - bottom + 4], fill="black")
        d.text((gx, h - bottom + 6), f"{fx:g}", fill="black", font=font, anchor="ma")
        d.line([left - 4, gy, left, gy], fill="black")
        d.line([left, gy, w - right, gy], fill=(230, 230, 230))
        d.text((left - 6, gy), f"{fy:.3g}", fill="black", font=font, anchor="rm")
    d.text((w / 2, 12), title, fill="black", font=font, anchor="ma")
    d.text((w / 2, h - 18), xlabel, fill="black", font=font, anchor="ma")
    d.text((8, top - 18), ylabel, fill="black", font=font)
    for i, (name, s) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = [px(x, y) for x, y in sorted(s)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        for cx, cy in line:
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        ly = top + 8 + 16 * i
        d.line([w - right - 150, ly, w - right - 130, ly], fill=colour, width=3)
        d.text((w - right - 125, ly), name, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
