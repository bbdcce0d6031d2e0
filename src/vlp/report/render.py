"""The run report's HTML: a summary, plots of every logged series (inline SVG), evaluation
metrics, skipped samples, checkpoints, examples and the run's config, on one page."""

from __future__ import annotations

import statistics
from typing import Any

from vlp.htmlpage import escape, figure, line_plot, mapping_table, page, table
from vlp.report.examples import Examples
from vlp.report.run import RESULTS_FILE, RunRecords, flatten

# step series drawn together on one plot: (plot name, caption, series)
GROUPED = (("step_time", "seconds per step: waiting for data and computing",
            ("data_s", "compute_s")),)
CAPTIONS = {"loss": "training loss (the sum of its terms)", "lr": "learning rate",
            "grad_norm": "gradient norm before clipping",
            "samples_per_s": "samples per second (all ranks)"}
LISTED_SKIPS = 20  # skipped items named per epoch on the page


def summary(run: RunRecords) -> dict[str, Any]:
    steps = run.steps
    out: dict[str, Any] = {"run directory": run.run_dir.name, "model": run.config.get("model"),
                           "steps logged": len(steps),
                           "last step": steps[-1]["step"] if steps else None}
    if steps:
        losses = [loss for _, loss in run.series("loss")]
        out["final loss"] = losses[-1] if losses else None
        out["lowest loss"] = min(losses) if losses else None
        out["epochs started"] = max(r.get("epoch", 0) for r in steps) + 1
        speeds = [s for _, s in run.series("samples_per_s")]
        if speeds:
            out["median samples/s"] = statistics.median(speeds)
        data, compute = run.series("data_s"), run.series("compute_s")
        if data and compute:
            waited = sum(v for _, v in data)
            total = waited + sum(v for _, v in compute)
            out["time in steps (s)"] = total
            out["share of it waiting for data"] = waited / total if total else None
    out["non-finite steps skipped"] = len(run.nonfinite_steps())
    out["samples skipped"] = sum(e.get("skipped_total", 0) for e in run.epochs)
    out["evaluations"] = len(run.evals)
    out["checkpoints"] = len(run.checkpoints)
    if run.unreadable_lines:
        out["unreadable log lines"] = ", ".join(map(str, run.unreadable_lines[:10]))
    return out


def _plots(run: RunRecords) -> list[str]:
    grouped = {name for _, _, names in GROUPED for name in names}
    keys = run.step_keys()
    first = ["loss", *(k for k in keys if k.startswith("loss_")), "lr", "grad_norm"]
    figures = []
    for key in sorted(keys, key=lambda k: first.index(k) if k in first else len(first)):
        if key in grouped:
            continue
        caption = CAPTIONS.get(key) or (f"loss term {key[5:]}" if key.startswith("loss_")
                                         else key)
        figures.append(figure(line_plot(key, {key: run.series(key)}), caption))
    for name, caption, names in GROUPED:
        present = {n: run.series(n) for n in names if n in keys}
        if present:
            figures.append(figure(line_plot(name, present), caption))
    return figures


def _eval_section(run: RunRecords) -> list[str]:
    series = run.eval_series()
    if not series:
        return ["<h2>Evaluation</h2>", "<p>No evaluation ran (vlp train --eval-every, "
                "--val-data or the evaluation flags add one).</p>"]
    body = ["<h2>Evaluation</h2>", "<div class='plots'>"]
    body += [figure(line_plot(f"eval.{name}", {name: points}), name)
             for name, points in series.items()]
    body.append("</div>")
    names = list(series)
    rows = []
    for record in run.evals:
        values = flatten(record["eval"])
        rows.append([record["step"], *(values.get(n) for n in names)])
    body.append(table(["step", *names], rows, "eval"))
    return body


def _skips_section(run: RunRecords) -> list[str]:
    body = ["<h2>Skipped samples and steps</h2>"]
    if run.epochs:
        rows = []
        for record in run.epochs:
            reasons = ", ".join(f"{k}: {v}" for k, v in record.get("skipped", {}).items())
            items = record.get("skipped_items", [])[:LISTED_SKIPS]
            rows.append([record.get("epoch"), record["step"], record.get("skipped_total", 0),
                         reasons, "; ".join(map(str, items))])
        body.append(table(("epoch", "ended at step", "samples skipped", "by reason",
                           "first items"), rows, "skipped"))
    else:
        body.append("<p>No epoch has ended yet.</p>")
    nonfinite = run.nonfinite_steps()
    body.append(f"<p>Steps skipped for a non-finite loss or gradient: {len(nonfinite)}"
                + (f" (steps {escape(', '.join(map(str, nonfinite[:50])))})" if nonfinite
                   else "") + "</p>")
    return body


def _checkpoints_section(run: RunRecords) -> list[str]:
    body = ["<h2>Checkpoints</h2>"]
    if not run.checkpoints:
        return [*body, "<p>No complete checkpoint.</p>"]
    rows = [[c.step, c.name + (" (latest)" if c.latest else ""),
             round(c.size_bytes / 2**20, 2)] for c in run.checkpoints]
    body.append(table(("step", "directory", "size (MiB)"), rows, "checkpoints"))
    return body


def _examples_section(examples: Examples | str | None) -> list[str]:
    if examples is None:
        return []
    if isinstance(examples, str):
        return ["<h2>Examples</h2>", f"<p class='no-examples'>No examples: {escape(examples)}"
                "</p>"]
    where = "held out" if examples.split == "val_data" else "seen in training"
    what = "answer" if examples.kind == "vqa" else "caption"
    body = [f"<h2>Examples</h2><p>Greedy {what}s of {escape(examples.checkpoint)} for the "
            f"first images of {escape(examples.split)} ({where}).</p>"]
    rows = []
    for row in examples.rows:
        image = (f"<img src='{row.thumbnail}' alt='{escape(row.image)}'>" if row.thumbnail
                 else "<small>unreadable</small>")
        generated = escape(row.generated) if row.generated is not None else \
            "<small>(image unreadable)</small>"
        references = "<ul>" + "".join(f"<li>{escape(r)}</li>" for r in row.references) + \
            "</ul>"
        cells = [f"{image}<br><small>{escape(row.image)}</small>"]
        if examples.kind == "vqa":
            cells.append(escape(row.question or ""))
        cells += [f"<span class='generated'>{generated}</span>", references]
        rows.append(cells)
    headers = ["image", *(["question"] if examples.kind == "vqa" else []), f"generated {what}",
               "references"]
    body.append(table(headers, rows, "examples", raw=True))
    return body


def render(run: RunRecords, examples: Examples | str | None) -> str:
    """The page; ``examples`` may be why there are none."""
    title = f"vlp run report: {run.run_dir.name}"
    body = [f"<h1>{escape(title)}</h1>", "<h2>Summary</h2>",
            mapping_table(summary(run), "summary", "", "")]
    if run.results:
        body += [f"<h2>Results</h2><p>Final results written beside the run "
                 f"({escape(RESULTS_FILE)}).</p>",
                 mapping_table({k: v if not isinstance(v, dict | list) else str(v)
                                for k, v in run.results.items()}, "results")]
    body.append("<h2>Training</h2>")
    if run.steps:
        body += ["<div class='plots'>", *_plots(run), "</div>"]
    else:
        body.append("<p>No step logged yet.</p>")
    body += _eval_section(run)
    body += _skips_section(run)
    body += _checkpoints_section(run)
    body += _examples_section(examples)
    body += ["<h2>Training config</h2>",
             mapping_table({k: v if not isinstance(v, dict | list) else str(v)
                            for k, v in run.config.items()}, "config", "setting")]
    return page(title, body)
