"""Self-contained HTML pages: escaping, tables, inline SVG line plots and base64 thumbnails.

What vlp's HTML reports share (CapFilt's dataset report, `vlp report`'s run report). A page
written with these helpers loads nothing: styles are inline, plots are SVG drawn here,
images are data URIs, and there is no script.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image

STYLE = """body{font-family:sans-serif;margin:2em;max-width:72em;color:#222}
table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}.kept{color:#186a1d}.dropped{color:#a11;
text-decoration:line-through}.noisy{background:#fde9c8}small{color:#666}
.plots{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-size:90%;color:#444}
svg.plot text{font-size:11px;fill:#444}"""

# series colours (colour-blind safe, Okabe-Ito)
COLOURS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000")


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A value as a table shows it: floats to 4 significant digits, None as empty."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def page(title: str, body: Iterable[str]) -> str:
    """A whole document: ``body`` is HTML already escaped by the caller."""
    return "\n".join(["<!doctype html><html><head><meta charset='utf-8'>",
                      f"<title>{escape(title)}</title>", f"<style>{STYLE}</style></head><body>",
                      *body, "</body></html>", ""])


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str,
          raw: bool = False) -> str:
    """A table of class ``cls``: cells are formatted (`fmt`) and escaped unless ``raw``, where
    they are HTML already."""
    lines = [f"<table class='{escape(cls)}'><tr>"
             + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>"]
    for row in rows:
        cells = row if raw else [escape(fmt(cell)) for cell in row]
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def mapping_table(values: Mapping[str, Any], cls: str, key: str = "metric",
                  value: str = "value") -> str:
    return table((key, value), values.items(), cls)


def thumbnail_uri(image: Image.Image, size: int = 96) -> str:
    """A base64 JPEG data URI of ``image`` shrunk to fit ``size`` x ``size`` (a copy)."""
    small = image.convert("RGB")
    small.thumbnail((size, size))
    encoded = io.BytesIO()
    small.save(encoded, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(encoded.getvalue()).decode("ascii")


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values spanning [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def line_plot(name: str, series: Mapping[str, Sequence[tuple[float, float]]], *,
              x_label: str = "step", width: int = 420, height: int = 240) -> str:
    """An inline SVG line plot (class ``plot``, ``data-name`` = ``name``) of each series of
    ``(x, y)`` points; non-finite points are left out (the line breaks there). Each series is
    a ``polyline`` with ``data-series`` (its name) and ``data-points`` (points drawn), and a
    single point is drawn as a dot, so a reader can check what was plotted."""
    finite = {label: [(float(x), float(y)) for x, y in points
                      if math.isfinite(float(x)) and math.isfinite(float(y))]
              for label, points in series.items()}
    every = [point for points in finite.values() for point in points]
    left, right, top, bottom = 58, 12, 24, 34
    inner_w, inner_h = width - left - right, height - top - bottom
    out = [f"<svg class='plot' data-name='{escape(name)}' xmlns='http://www.w3.org/2000/svg' "
           f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img'>",
           f"<title>{escape(name)}</title>",
           f"<rect x='{left}' y='{top}' width='{inner_w}' height='{inner_h}' fill='none' "
           "stroke='#bbb'/>"]
    if not every:
        out.append(f"<text x='{left + 8}' y='{top + inner_h / 2}'>no finite values</text>")
        out.append("</svg>")
        return "".join(out)
    x_low, x_high = min(p[0] for p in every), max(p[0] for p in every)
    y_low, y_high = min(p[1] for p in every), max(p[1] for p in every)
    if y_high == y_low:  # a flat line in the middle
        pad = abs(y_low) * 0.05 or 1.0
        y_low, y_high = y_low - pad, y_high + pad
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1

    def sx(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * inner_w

    def sy(y: float) -> float:
        return top + (1 - (y - y_low) / (y_high - y_low)) * inner_h

    for tick in _ticks(y_low, y_high):
        y = sy(tick)
        out.append(f"<line x1='{left}' x2='{left + inner_w}' y1='{y:.1f}' y2='{y:.1f}' "
                   "stroke='#eee'/>"
                   f"<text x='{left - 4}' y='{y + 4:.1f}' text-anchor='end'>{tick:.4g}</text>")
    for tick in _ticks(x_low, x_high):
        x = sx(tick)
        out.append(f"<text x='{x:.1f}' y='{top + inner_h + 14}' text-anchor='middle'>"
                   f"{tick:.6g}</text>")
    out.append(f"<text x='{left + inner_w / 2}' y='{height - 4}' text-anchor='middle'>"
               f"{escape(x_label)}</text>")
    for index, (label, points) in enumerate(finite.items()):
        colour = COLOURS[index % len(COLOURS)]
        drawn = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f"<polyline data-series='{escape(label)}' data-points='{len(points)}' "
                   f"fill='none' stroke='{colour}' stroke-width='1.5' points='{drawn}'/>")
        if len(points) == 1:
            x, y = points[0]
            out.append(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{colour}'/>")
        out.append(f"<text x='{left + 6 + 110 * index}' y='{top - 8}' fill='{colour}' "
                   f"style='fill:{colour}'>{escape(label)}</text>")
    out.append("</svg>")
    return "".join(out)


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"
