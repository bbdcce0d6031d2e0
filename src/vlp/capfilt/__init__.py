"""CapFilt (BLIP §3.3, arXiv 2201.12086): bootstrap a noisy web dataset with a captioner and
a filter fine-tuned from a pretrained BLIP.

Stages, each runnable and resumable on its own (``vlp capfilt <stage>``), all under
``cfg.out``::

    finetune  models/captioner (LM), models/filter (ITC + ITM)   [models/shared with share]
    caption   captions/unit-*.jsonl   synthetic captions per web image (nucleus, top-p 0.9)
    filter    filtered/unit-*.jsonl   ITM score + decision for original and synthetic captions
    write     dataset/                kept pairs (CSV, JSONL, WebDataset), provenance, report
    pretrain  pretrain/               a new model trained on dataset/train.csv

Stages 2-3 work unit by unit (a WebDataset shard, or ``unit_size`` images of a table) in this
process or on Ray (``backend="ray"``) with identical output; finished units are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vlp.capfilt.backends import run_stage
from vlp.capfilt.config import STAGES, CapfiltConfig, check_config, guard_settings
from vlp.capfilt.output import write_bootstrapped
from vlp.capfilt.stages import (
    CAPTIONS_DIR,
    FILTERED_DIR,
    SETTINGS_FILE,
    caption_settings,
    filter_settings,
)
from vlp.capfilt.training import finetune, pretrain
from vlp.capfilt.units import WorkUnit, plan_units, source_kind
from vlp.errors import ConfigError

__all__ = ["STAGES", "CapfiltConfig", "capfilt", "caption", "filter_captions", "finetune",
           "plan", "pretrain", "write"]

PLAN_FILE = "plan.json"


def plan(cfg: CapfiltConfig) -> list[WorkUnit]:
    """The work units of ``cfg.data``, recorded in ``out/plan.json``; a later call with other
    data or unit size on the same ``out`` is refused, so resumed stages see the same units."""
    check_config(cfg)
    units = plan_units(cfg)
    guard_settings(cfg.out_dir / PLAN_FILE, {
        "data": cfg.data, "kind": source_kind(cfg), "unit_size": cfg.unit_size,
        "image_key": cfg.image_key, "caption_key": cfg.caption_key,
        "separator": cfg.separator, "image_root": cfg.image_root,
        "units": [[u.index, u.shard, u.start, u.stop] for u in units]})
    return units


def caption(cfg: CapfiltConfig) -> dict[str, int]:
    """Stage 2: write ``captions/<unit>.jsonl`` for every unit that lacks it."""
    units = plan(cfg)
    guard_settings(cfg.out_dir / CAPTIONS_DIR / SETTINGS_FILE, caption_settings(cfg))
    return run_stage(cfg, "caption", units)


def filter_captions(cfg: CapfiltConfig) -> dict[str, int]:
    """Stage 3: write ``filtered/<unit>.jsonl`` (scores and decisions) for every unit that
    lacks it; needs the unit's captions."""
    units = plan(cfg)
    guard_settings(cfg.out_dir / FILTERED_DIR / SETTINGS_FILE, filter_settings(cfg))
    return run_stage(cfg, "filter", units)


def write(cfg: CapfiltConfig) -> dict[str, Any]:
    """Stage 4: the bootstrapped dataset and its report under ``out/dataset``."""
    units = plan(cfg)
    settings = {}
    for stage_dir in (CAPTIONS_DIR, FILTERED_DIR):
        path = cfg.out_dir / stage_dir / SETTINGS_FILE
        if path.is_file():
            settings.update(json.loads(path.read_text(encoding="utf-8")))
    settings.update(data=cfg.data, units=len(units), backend=cfg.backend)
    return write_bootstrapped(cfg, units, settings)


_RUNNERS = {"finetune": finetune, "caption": caption, "filter": filter_captions,
            "write": write, "pretrain": pretrain}


def capfilt(cfg: CapfiltConfig, stages: Sequence[str] = ("caption", "filter", "write")
            ) -> dict[str, Any]:
    """Run ``stages`` in pipeline order (any of `STAGES`); returns each stage's result."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"capfilt stages {list(stages)}: expected some of {list(STAGES)}")
    check_config(cfg)
    return {stage: _RUNNERS[stage](cfg) for stage in STAGES if stage in stages}
