"""The bootstrapped dataset's summary: counts, keep rates and, when the source records its
noise, how well the filter found it; written as summary.json and a one-page report.html with
inline thumbnails."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from vlp.data.pipeline import open_image


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics over every filtered item (``filtered/`` rows). Noise metrics need ground truth
    on every original caption: precision and recall of "dropped" as a detector of noise, and
    the noise rate of the originals before and after filtering."""
    originals = [c for row in rows for c in row["captions"] if c["source"] == "original"]
    synthetic = [c for row in rows for c in row["captions"] if c["source"] == "synthetic"]
    kept_originals = [c for c in originals if c["kept"]]
    kept_synthetic = [c for c in synthetic if c["kept"]]
    summary: dict[str, Any] = {
        "images": len(rows),
        "unreadable_images": sum("skipped" in row for row in rows),
        "original_captions": len(originals),
        "synthetic_captions": len(synthetic),
        "kept_original": len(kept_originals),
        "kept_synthetic": len(kept_synthetic),
        "kept_total": len(kept_originals) + len(kept_synthetic),
        "share_original_kept": _share(len(kept_originals), len(originals)),
        "share_synthetic_kept": _share(len(kept_synthetic), len(synthetic)),
        "noise_known": bool(originals) and all(c["noisy"] is not None for c in originals),
    }
    if summary["noise_known"]:
        noisy = [c for c in originals if c["noisy"]]
        dropped = [c for c in originals if not c["kept"]]
        caught = sum(1 for c in dropped if c["noisy"])
        kept_noisy = sum(1 for c in kept_originals if c["noisy"])
        summary.update({
            "noisy_original": len(noisy),
            "noise_rate_before": _share(len(noisy), len(originals)),
            "noise_rate_after": _share(kept_noisy, len(kept_originals)),
            # synthetic captions have no ground truth: counted clean, a lower bound
            "noisy_share_of_kept": _share(kept_noisy, summary["kept_total"]),
            "filter_precision": _share(caught, len(dropped)),
            "filter_recall": _share(caught, len(noisy)),
        })
    return summary


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def _thumbnail(image: str | bytes, size: int = 96) -> str | None:
    """A base64 JPEG data URI of the image, or None when it cannot be read."""
    opened = open_image(image)
    if isinstance(opened, str):
        return None
    opened.thumbnail((size, size))
    encoded = io.BytesIO()
    opened.save(encoded, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(encoded.getvalue()).decode("ascii")


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:70em}
table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}.kept{color:#186a1d}.dropped{color:#a11;
text-decoration:line-through}.noisy{background:#fde9c8}small{color:#666}"""


def render_html(summary: dict[str, Any], settings: dict[str, Any],
                examples: list[tuple[dict[str, Any], str | bytes]]) -> str:
    """report.html: the summary table, the settings and example images with every caption,
    its source, ITM score and decision (known noise highlighted)."""
    e = html.escape
    lines = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<title>vlp CapFilt report</title>", f"<style>{_STYLE}</style></head><body>",
             "<h1>CapFilt: bootstrapped dataset</h1>", "<h2>Summary</h2>",
             "<table class='summary'><tr><th>metric</th><th>value</th></tr>"]
    lines += [f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>" for k, v in summary.items()]
    lines += ["</table>", "<h2>Settings</h2>",
              "<table class='settings'><tr><th>setting</th><th>value</th></tr>"]
    lines += [f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>" for k, v in settings.items()]
    lines += ["</table>", "<h2>Examples</h2>",
              "<table class='examples'><tr><th>image</th><th>captions</th></tr>"]
    for row, image in examples:
        thumb = _thumbnail(image)
        cell = (f"<img src='{thumb}' alt='{e(row['image'])}'>" if thumb
                else f"<small>{e(row.get('skipped', 'unreadable'))}</small>")
        captions = []
        for c in row["captions"]:
            decision = "kept" if c["kept"] else "dropped"
            score = "n/a" if c["itm"] is None else f"{c['itm']:.3f}"
            marks = " class='noisy'" if c.get("noisy") else ""
            captions.append(f"<li{marks}><small>{c['source']}, ITM {score}, {decision}"
                            f"{', known noise' if c.get('noisy') else ''}:</small> "
                            f"<span class='{decision}'>{e(c['text'])}</span></li>")
        lines.append(f"<tr><td>{cell}<br><small>{e(row['image'])}</small></td>"
                     f"<td><ul>{''.join(captions)}</ul></td></tr>")
    lines += ["</table>", "</body></html>", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
