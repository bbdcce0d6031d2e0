"""The demo recipes (`vlp demo --family ...`): each model family's recipe end to end on the
synthetic world, one module per family, and the registry that picks one by name.

`common` holds what they share (`DemoConfig`, the data they write, the held-out evaluation);
the family modules import it and never each other; this module imports the family modules."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlp.errors import ConfigError
from vlp.recipes import blip, blip2, capfilt, clip, simvlm
from vlp.recipes.common import DemoConfig, evaluate_demo_model, write_run_reports
from vlp.report.run import RESULTS_FILE
from vlp.store.files import atomic_write_text

Recipe = Callable[[DemoConfig], dict[str, Any]]

# family name -> its recipe, which resolves its settings from the config, starts its runs
# afresh and returns its summary (metrics as fractions, the checkpoints it wrote)
RECIPES: dict[str, Recipe] = {
    "clip": clip.clip_recipe,
    "coca": clip.coca_recipe,
    "blip": blip.blip_recipe,
    "simvlm": simvlm.simvlm_recipe,
    "blip2": blip2.blip2_recipe,
    "capfilt": capfilt.capfilt_recipe,
}
FAMILIES = tuple(RECIPES)


def demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the recipe of ``cfg.family`` and return its summary (also written to
    ``cfg.out/results.json``), with ``reports``: the run report (`vlp report`) written into
    each of its training runs' directories."""
    recipe = RECIPES.get(cfg.family)
    if recipe is None:
        raise ConfigError(f"family: unknown {cfg.family!r}; expected one of {FAMILIES}")
    summary = recipe(cfg)
    out = Path(cfg.out)
    atomic_write_text(out / RESULTS_FILE, json.dumps(summary, indent=2, default=str) + "\n")
    summary["reports"] = write_run_reports(out)
    return summary


__all__ = ["FAMILIES", "RECIPES", "DemoConfig", "Recipe", "demo", "evaluate_demo_model"]
