"""Dashboards a run feeds (``--report-to tensorboard,wandb``): every scalar `RunLog` writes to
``log.jsonl``, as it writes it, on rank 0 only.

Tags: a step record's numbers under ``train/`` (``train/loss``, ``train/loss_contrastive``,
``train/lr``, ``train/data_s``, ...), an evaluation's metrics under ``eval/`` (nested ones as
``eval/outer.inner``), an epoch's skipped samples under ``epoch/``; the x axis is the
optimizer step. TensorBoard and W&B are imported only when asked for (the ``tensorboard``
and ``wandb`` extras).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlp.errors import ConfigError

DASHBOARDS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # under the run directory
WANDB_ID_FILE = "wandb-run-id"  # the W&B run a resumed run continues
NOT_SCALARS = ("step", "end_of_epoch")


def parse_report_to(value: str | None) -> list[str]:
    """The dashboards a ``report_to`` value names (comma-separated; "" or None: none)."""
    names = [name.strip() for name in (value or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in DASHBOARDS]
    if unknown:
        raise ConfigError(f"train config report_to={value!r}: unknown {unknown}; expected a "
                          f"comma-separated subset of {list(DASHBOARDS)}")
    return list(dict.fromkeys(names))


def _number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _leaves(values: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        elif _number(value) and key not in NOT_SCALARS:
            out[f"{prefix}{key}"] = float(value)
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The dashboard tags and values of one ``log.jsonl`` record (non-finite values left out:
    a skipped step's loss is in ``log.jsonl`` as written, not plotted)."""
    if isinstance(record.get("eval"), dict):
        return {f"eval/{k}": v for k, v in _leaves(record["eval"], "").items()}
    if record.get("end_of_epoch"):
        kept = {k: record[k] for k in ("epoch", "skipped_total", "skipped") if k in record}
        return {f"epoch/{k}": v for k, v in _leaves(kept, "").items()}
    return {f"train/{k}": v for k, v in _leaves(record, "").items()}


class Dashboards:
    """Callable on each record `RunLog` writes; `close` at the end of the run."""

    def __init__(self, names: list[str], output_dir: Path, config: dict[str, Any],
                 resume_step: int | None) -> None:
        self.writers: list[tuple[Callable[[int, dict[str, float]], None], Callable[[], None]]]
        self.writers = []
        try:
            for name in names:
                self.writers.append(_OPENERS[name](output_dir, config, resume_step))
        except BaseException:
            self.close()
            raise

    def __call__(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            for log, _ in self.writers:
                log(int(record["step"]), values)

    def close(self) -> None:
        for _, close in self.writers:
            close()
        self.writers = []


def _missing(name: str) -> ConfigError:
    return ConfigError(f"train config report_to: {name} is not installed; pip install "
                       f"'vlp[{name}]'")


def _tensorboard(output_dir: Path, config: dict[str, Any], resume_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise _missing("tensorboard") from None
    # a resumed run drops the events of the steps it redoes, as log.jsonl drops their records
    writer = SummaryWriter(str(output_dir / TENSORBOARD_DIR),
                           purge_step=None if resume_step is None else resume_step + 1)
    if resume_step is None:
        writer.add_text("train_config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step)

    def close() -> None:
        writer.flush()
        writer.close()

    return log, close


def _wandb(output_dir: Path, config: dict[str, Any], resume_step: int | None) -> Any:
    try:
        import wandb
    except ImportError:
        raise _missing("wandb") from None
    id_file = output_dir / WANDB_ID_FILE
    run_id = None
    if resume_step is not None and id_file.is_file():
        run_id = id_file.read_text().strip() or None
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vlp"), name=output_dir.name,
                     dir=str(output_dir), config=config, id=run_id, resume="allow")
    id_file.write_text(run.id + "\n")

    def log(step: int, values: dict[str, float]) -> None:
        run.log(values, step=step)

    return log, run.finish


_OPENERS = {"tensorboard": _tensorboard, "wandb": _wandb}


def open_dashboards(report_to: str | None, output_dir: Path, config: dict[str, Any],
                    resume_step: int | None) -> Dashboards | None:
    """The dashboards ``report_to`` names, opened (call on rank 0 only), or None."""
    names = parse_report_to(report_to)
    return Dashboards(names, output_dir, config, resume_step) if names else None
