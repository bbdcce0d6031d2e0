"""Where stages 2-3 run: ``local`` (this process, unit after unit) or ``ray`` (Ray Data over
the unit list, a pool of actors per stage each holding its model).

Both call the same per-unit workers (`vlp.capfilt.stages`), which skip units whose output is
present and seed each unit on its own, so they write the same files and a killed job of
either kind resumes with only the missing units.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlp.capfilt.config import CapfiltConfig
from vlp.capfilt.stages import WORKERS, resolve_device, unit_path
from vlp.capfilt.units import WorkUnit
from vlp.errors import require_extra


def pending_units(cfg: CapfiltConfig, stage: str, units: Sequence[WorkUnit]) -> list[WorkUnit]:
    stage_dir = WORKERS[stage].stage_dir
    return [unit for unit in units if not unit_path(cfg, stage_dir, unit).is_file()]


def run_stage(cfg: CapfiltConfig, stage: str, units: Sequence[WorkUnit]) -> dict[str, int]:
    """Process the units of ``stage`` ("caption" or "filter") that lack an output file;
    returns ``{"units", "done", "skipped"}``."""
    stage_dir = cfg.out_dir / WORKERS[stage].stage_dir
    for temp in stage_dir.glob(".unit-*.tmp-*"):  # left by a killed job's unfinished writes
        temp.unlink(missing_ok=True)
    todo = pending_units(cfg, stage, units)
    summary = {"units": len(units), "done": len(todo), "skipped": len(units) - len(todo)}
    if not todo:
        return summary
    if cfg.backend == "ray":
        _run_ray(cfg, stage, todo)
    else:
        worker = WORKERS[stage](cfg)
        for unit in tqdm(todo, desc=f"capfilt {stage}", unit="unit", disable=not cfg.progress):
            worker.run(unit)
    return summary


# -- Ray -------------------------------------------------------------------------------------------

def import_ray() -> Any:
    """The ``ray`` module (with Ray Data), or a ConfigError saying how to install it."""
    require_extra("ray.data", "ray", "capfilt backend='ray'")
    return sys.modules["ray"]


class RayStageActor:
    """A Ray Data callable class: built once per actor (loads the stage's model), then called
    on batches of unit indices; returns each unit with the item count it wrote (0: skipped)."""

    def __init__(self, config: dict[str, Any], stage: str, units: list[tuple],
                 threads: int) -> None:
        torch.set_num_threads(threads)
        cfg = CapfiltConfig.from_dict(config)
        self.units = {index: WorkUnit(index, *rest) for index, *rest in units}
        self.worker = WORKERS[stage](cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = [self.worker.run(self.units[int(index)]) for index in batch["unit"]]
        return {"unit": np.asarray(batch["unit"]), "items": np.asarray(written)}


def _run_ray(cfg: CapfiltConfig, stage: str, units: list[WorkUnit]) -> None:
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=cfg.progress)
        started = True
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = cfg.progress
        gpus = 1 if resolve_device(cfg.device).type == "cuda" else 0
        dataset = ray.data.from_items([{"unit": unit.index} for unit in units],
                                      override_num_blocks=len(units))
        dataset = dataset.map_batches(
            RayStageActor, batch_size=1,
            fn_constructor_kwargs={
                "config": cfg.to_dict(), "stage": stage,
                "units": [(u.index, u.shard, u.start, u.stop) for u in units],
                "threads": max(1, int(cfg.ray_cpus_per_actor))},
            compute=ray.data.ActorPoolStrategy(size=min(cfg.ray_actors, len(units))),
            num_cpus=cfg.ray_cpus_per_actor, num_gpus=gpus)
        for _ in dataset.iter_rows():  # each row: a unit whose file is now on disk
            pass
    finally:
        if started:
            ray.shutdown()
