"""The bootstrapped dataset's summary: counts, keep rates and, when the source records its
noise, how well the filter found it; written as summary.json and a one-page report.html with
inline thumbnails."""

from __future__ import annotations

from typing import Any

from vlp.data.pipeline import open_image
from vlp.htmlpage import escape, mapping_table, page, table, thumbnail_uri


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
    return None if isinstance(opened, str) else thumbnail_uri(opened, size)


def render_html(summary: dict[str, Any], settings: dict[str, Any],
                examples: list[tuple[dict[str, Any], str | bytes]]) -> str:
    """report.html: the summary table, the settings and example images with every caption,
    its source, ITM score and decision (known noise highlighted)."""
    e = escape
    body = ["<h1>CapFilt: bootstrapped dataset</h1>", "<h2>Summary</h2>",
            mapping_table(summary, "summary"), "<h2>Settings</h2>",
            mapping_table(settings, "settings", "setting"), "<h2>Examples</h2>"]
    rows = []
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
        rows.append((f"{cell}<br><small>{e(row['image'])}</small>",
                     f"<ul>{''.join(captions)}</ul>"))
    body.append(table(("image", "captions"), rows, "examples", raw=True))
    return page("vlp CapFilt report", body)
