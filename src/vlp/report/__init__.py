"""`vlp report RUN_DIR`: one self-contained HTML page of a training run (plots inlined as SVG,
thumbnails as data URIs, no script): loss and each of its terms, learning rate, gradient norm,
samples/s and the time each step waited for data, every evaluation metric over steps, skipped
samples, checkpoints and, for a model that captions or answers questions, examples from its
latest checkpoint beside their references.

`read_run` reads what the trainer writes (`log.jsonl`, `train_config.json`, checkpoints);
`run_examples` captions or answers through `vlp.eval`; `render` draws the page with
`vlp.htmlpage`."""

from __future__ import annotations

import os
from pathlib import Path

from vlp.errors import VlpError
from vlp.report.examples import Examples, run_examples
from vlp.report.render import render
from vlp.report.run import read_run
from vlp.store.files import atomic_write_text

REPORT_FILE = "report.html"
DEFAULT_EXAMPLES = 8


def write_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                 examples: int = DEFAULT_EXAMPLES, device: str = "cpu") -> Path:
    """Write the report of the run directory ``run_dir`` to ``out`` (default
    ``run_dir/report.html``), atomically; ``examples`` images captioned (or questions
    answered) by the latest checkpoint, 0 for none; when they cannot be made (the run's
    data is gone, say), the page says why. Returns the file's path."""
    run = read_run(run_dir)
    shown: Examples | str | None = None
    if run.checkpoints:
        try:
            shown = run_examples(run.run_dir, run.config, examples, device)
        except VlpError as error:  # the data moved since training, say: the page says so
            shown = str(error)
    path = Path(out) if out is not None else run.run_dir / REPORT_FILE
    atomic_write_text(path, render(run, shown))
    return path


__all__ = ["DEFAULT_EXAMPLES", "REPORT_FILE", "read_run", "render", "run_examples",
           "write_report"]
