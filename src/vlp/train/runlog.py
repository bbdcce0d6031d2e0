"""The run log (``log.jsonl``) and the stream of batches over epochs that feeds the trainer."""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlp.errors import DataError
from vlp.store.files import atomic_write_text
from vlp.train.distributed import DistEnv, gather_objects

MAX_LISTED_SKIPS = 100  # unreadable items named per epoch in the log (all are counted)
DATA_WINDOW = 10  # steps over which the share of time spent waiting for data is judged
DATA_WARN_SHARE = 0.3  # a larger share of the step waiting for data earns a warning


def _plain(value: Any) -> Any:
    """JSON form of metric values an eval_fn may return: tensors and numpy numbers."""
    if isinstance(value, Tensor | np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in a log record is not JSON serialisable")


class RunLog:
    """``log.jsonl``, one JSON record per line, written by rank 0.

    Step records are buffered as device tensors and turned into numbers in one transfer (and,
    distributed, one all-reduce averaging them over ranks) per flush, so logging every step
    costs no per-step GPU sync. Every rank calls every method at the same steps.
    """

    def __init__(self, path: Path, resume_step: int | None, env: DistEnv,
                 sink: Any = None) -> None:
        """``sink``: called with each record as it is written (rank 0's dashboards), and its
        ``close`` with the log's."""
        self.path = path
        self.env = env
        self.sink = sink
        self.last: dict[str, Any] = {}  # the newest step record
        # (data_s, compute_s) of the newest DATA_WINDOW step records
        self.recent: deque[tuple[float, float]] = deque(maxlen=DATA_WINDOW)
        self._data_warned = False
        self._file = None
        if env.is_main:
            if resume_step is None:
                path.write_text("")
            else:  # drop records from after the checkpoint: they are about to be redone
                kept = []
                if path.is_file():
                    for line in path.read_text().splitlines():
                        with contextlib.suppress(json.JSONDecodeError):
                            record = json.loads(line)
                            if record.get("step", 0) <= resume_step:
                                kept.append(line + "\n")
                                if "loss" in record:
                                    self.last = record
                atomic_write_text(path, "".join(kept))
            self._file = path.open("a")
        self._pending: list[tuple[dict[str, Any], list[str], Tensor]] = []
        self._summed: set[str] = set()

    def add_step(self, record: dict[str, Any], values: dict[str, Tensor],
                 summed: tuple[str, ...] = ()) -> None:
        """Queue a step record; `values` are averaged over ranks, those named in `summed`
        added up (whole numbers among them are logged as ints)."""
        names = list(values)
        self._summed.update(summed)
        self._pending.append((record, names,
                              torch.stack([values[n].double() for n in names])))

    def write(self, record: dict[str, Any]) -> None:
        self.flush()
        if self._file is not None:
            line = json.dumps(record, default=_plain)
            self._file.write(line + "\n")
            self._file.flush()
            if self.sink is not None:
                self.sink(json.loads(line))  # what log.jsonl holds: tensors as numbers

    def flush(self) -> None:
        if not self._pending:
            return
        stacked = torch.stack([values for _, _, values in self._pending])
        if self.env.distributed:  # one all-reduce for every queued step
            torch.distributed.all_reduce(stacked)
        numbers = stacked.tolist()
        for (record, names, _), row in zip(self._pending, numbers, strict=True):
            for name, value in zip(names, row, strict=True):
                if name not in self._summed:
                    value /= self.env.world_size
                record[name] = int(value) if name in self._summed and value.is_integer() \
                    else value
            if self._file is not None:
                self._file.write(json.dumps(record) + "\n")
                if self.sink is not None:
                    self.sink(record)
            self.last = record
            if "data_s" in record and "compute_s" in record:
                self.recent.append((record["data_s"], record["compute_s"]))
        self._pending.clear()
        if self._file is not None:
            self._file.flush()

    def data_share(self) -> float:
        """The share of the newest steps' time spent waiting for data (0 before any)."""
        return data_share(self.recent) or 0.0

    def data_wait_warning(self, step: int, num_workers: int) -> str | None:
        """`data_wait_warning` of the newest steps, the first time it has one only."""
        warning = None if self._data_warned else data_wait_warning(self.recent, step,
                                                                    num_workers)
        self._data_warned = self._data_warned or warning is not None
        return warning

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._file is not None:
                self._file.close()
            if self.sink is not None:
                self.sink.close()
                self.sink = None


def merge_skips(reports: list[dict[str, int]], items: list[list[str]]) -> dict[str, Any]:
    """One epoch-end summary of every rank's skipped-sample counts and named items."""
    counts: Counter[str] = Counter()
    for report in reports:
        counts.update(report)
    listed = [item for rank_items in items for item in rank_items][:MAX_LISTED_SKIPS]
    return {"skipped": dict(sorted(counts.items())), "skipped_total": sum(counts.values()),
            "skipped_items": listed}


class EpochStream:
    """An endless stream of ``(epoch, batch)`` over successive epochs of `loader`.

    An epoch ends eagerly, with its last batch, so a checkpoint taken right after it resumes
    at the next epoch; `ended` collects a summary for each finished epoch (skipped samples
    over all ranks, the samples trained on this rank).
    """

    def __init__(self, loader: Any, epoch: int, env: DistEnv) -> None:
        self.loader = loader
        self.epoch = epoch
        self.env = env
        self.ended: list[dict[str, Any]] = []
        self._iterator: Iterator | None = None
        self._whole_epoch_empty = False

    def next(self) -> tuple[int, dict[str, Any]]:
        while True:
            if self._iterator is None:
                self.loader.set_epoch(self.epoch)  # kept as loaded right after a resume
                self._whole_epoch_empty = self.loader.batches_done == 0
                self._iterator = iter(self.loader)
            epoch = self.epoch
            batch = next(self._iterator, None)
            if batch is None:  # the last batches held only skipped samples
                if self._whole_epoch_empty:
                    raise DataError(f"epoch {epoch} gave no batch: every sample was skipped "
                                    f"({self.loader.skipped_report()})")
                self._finish_epoch()
                continue
            self._whole_epoch_empty = False
            if self.loader.batches_done >= len(self.loader):
                self._finish_epoch()
            return epoch, batch

    def _finish_epoch(self) -> None:
        items = self.loader.skipped_items() if hasattr(self.loader, "skipped_items") else []
        per_rank = gather_objects((self.loader.skipped_report(), items), self.env)
        summary = merge_skips([report for report, _ in per_rank],
                              [listed for _, listed in per_rank])
        self.ended.append({"epoch": self.epoch, **summary})
        self.epoch += 1
        self.close()

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()  # stops DataLoader workers now, not at garbage collection
        self._iterator = None


def data_share(recent: Any) -> float | None:
    """The share of the step time spent waiting for data over `recent` (data_s, compute_s)
    pairs; None before there are any."""
    waited = sum(data for data, _ in recent)
    total = waited + sum(compute for _, compute in recent)
    return waited / total if recent and total > 0 else None


def data_wait_warning(recent: Any, step: int, num_workers: int) -> str | None:
    """One warning line when the last `DATA_WINDOW` steps spent more than `DATA_WARN_SHARE`
    of their time waiting for the loader, naming the levers; None otherwise."""
    share = data_share(recent)
    if len(recent) < DATA_WINDOW or share is None or share <= DATA_WARN_SHARE:
        return None
    workers = (f"more --num-workers (now {num_workers}; one per free CPU core)"
               if num_workers else "--num-workers N (now 0: batches are made between steps)")
    return (f"warning: steps {step - len(recent) + 1}-{step} spent {share:.0%} of their time "
            f"waiting for data; try {workers}, faster storage (local disk instead of a network "
            "file system, shards read as streams), or smaller images (shards of pre-resized "
            "images)")


def nonfinite_message(count: int, first: int, last: int, last_loss: float | None) -> str:
    finite = f"; the last finite loss was {last_loss:.4g}" if last_loss is not None else ""
    return (f"training stopped: {count} consecutive steps ({first}-{last}) had a non-finite "
            f"loss or gradient{finite}. Lower lr or warm up longer, use precision 'fp32' or "
            "'bf16' instead of 'fp16', or check the data; --max-nonfinite sets the limit")


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def eval_line(step: int, metrics: dict[str, Any]) -> str:
    """An evaluation's progress line: every number it gave but the counts (``num_*``)."""
    shown = [f"{key} {value:.4g}" for key, value in metrics.items()
             if isinstance(value, int | float) and not isinstance(value, bool)
             and not key.rpartition("/")[2].startswith("num_")]
    return f"eval step {step}: " + (", ".join(shown) or "no metrics")
