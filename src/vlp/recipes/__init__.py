"""The demo recipes (`vlp demo --family ...`): each model family's recipe end to end on the
synthetic world, one module per family, and the registry that picks one by name.

`common` holds what they share (`DemoConfig`, the data they write, the held-out evaluation);
the family modules import it and never each other; this module imports the family modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlp.errors import ConfigError
from vlp.recipes import blip, blip2, capfilt, clip, simvlm
from vlp.recipes.common import DemoConfig, evaluate_demo_model

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
    """Run the recipe of ``cfg.family`` and return its summary."""
    recipe = RECIPES.get(cfg.family)
    if recipe is None:
        raise ConfigError(f"family: unknown {cfg.family!r}; expected one of {FAMILIES}")
    return recipe(cfg)


__all__ = ["FAMILIES", "RECIPES", "DemoConfig", "Recipe", "demo", "evaluate_demo_model"]
