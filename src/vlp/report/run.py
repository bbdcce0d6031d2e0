"""A training run directory read back: its config, every record of ``log.jsonl`` sorted into
step, evaluation and end-of-epoch records, and its checkpoints."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlp.errors import DataError
from vlp.store import LATEST_LINK
from vlp.store.layout import list_checkpoints
from vlp.train.trainer import CONFIG_SNAPSHOT as CONFIG_FILE
from vlp.train.trainer import LOG_FILE

# final results a run's driver wrote beside it (vlp demo: its summary), shown as a table
RESULTS_FILE = "results.json"
# step record keys that are not series of their own
NOT_SERIES = ("step", "epoch", "skipped", "index_sum", "samples")


@dataclass
class Checkpoint:
    step: int
    name: str
    size_bytes: int
    latest: bool


@dataclass
class RunRecords:
    """What a report shows of a run directory."""

    run_dir: Path
    config: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)  # one per step, by step
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "epoch", "eval"}
    epochs: list[dict[str, Any]] = field(default_factory=list)  # end-of-epoch records
    checkpoints: list[Checkpoint] = field(default_factory=list)
    unreadable_lines: list[int] = field(default_factory=list)  # log.jsonl line numbers
    results: dict[str, Any] = field(default_factory=dict)  # RESULTS_FILE: final results

    def series(self, name: str) -> list[tuple[float, float]]:
        """``(step, value)`` of a step record key, for the steps that logged it."""
        return [(r["step"], r[name]) for r in self.steps if _number(r.get(name))]

    def step_keys(self) -> list[str]:
        """Every numeric key of the step records, in first-seen order."""
        keys: dict[str, None] = {}
        for record in self.steps:
            for key, value in record.items():
                if key not in NOT_SERIES and _number(value):
                    keys.setdefault(key, None)
        return list(keys)

    def eval_series(self) -> dict[str, list[tuple[float, float]]]:
        """Every numeric evaluation metric over steps (nested dicts as ``outer.inner``)."""
        series: dict[str, list[tuple[float, float]]] = {}
        for record in self.evals:
            for name, value in flatten(record["eval"]).items():
                series.setdefault(name, []).append((record["step"], value))
        return series

    def nonfinite_steps(self) -> list[int]:
        return [r["step"] for r in self.steps if r.get("skipped") == "nonfinite"]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a metrics dict; lists and strings are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif _number(value) and math.isfinite(value):
            out[name] = float(value)
    return out


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_run(run_dir: str | Path) -> RunRecords:
    """The records of the run directory ``run_dir`` (DataError when it is not one). Lines of
    ``log.jsonl`` that are not JSON objects (the last one of a run being written, say) are
    skipped and their numbers kept; a step logged twice keeps its last record."""
    run_dir = Path(run_dir)
    log = run_dir / LOG_FILE
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: not a directory; expected a run directory written by "
                        "vlp train (log.jsonl, train_config.json, checkpoint-*)")
    if not log.is_file():
        raise DataError(f"{run_dir}: no {LOG_FILE}; expected a run directory written by "
                        "vlp train")
    config = _json_object(run_dir / CONFIG_FILE)
    run = RunRecords(run_dir, config, results=_json_object(run_dir / RESULTS_FILE))
    steps: dict[int, dict[str, Any]] = {}
    with log.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                run.unreadable_lines.append(number)
            elif isinstance(record.get("eval"), dict):
                run.evals.append(record)
            elif record.get("end_of_epoch"):
                run.epochs.append(record)
            elif "loss" in record:
                steps[record["step"]] = record
    run.steps = [steps[step] for step in sorted(steps)]
    latest = run_dir / LATEST_LINK
    latest_name = latest.resolve().name if latest.is_symlink() else None
    for step, path in list_checkpoints(run_dir):
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        run.checkpoints.append(Checkpoint(step, path.name, size, path.name == latest_name))
    if run.checkpoints and latest_name is None:  # no link: the highest complete step
        run.checkpoints[-1].latest = True
    return run
