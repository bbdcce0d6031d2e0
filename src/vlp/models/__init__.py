"""Model families, each composed from ``vlp.nn`` blocks, built from their config by family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from vlp.errors import ConfigError
from vlp.models.blip import BLIP, build_blip
from vlp.models.blip2 import BLIP2, build_blip2
from vlp.models.clip import CLIP, build_clip
from vlp.models.coca import CoCa, build_coca
from vlp.models.simvlm import SimVLM, build_simvlm

MODEL_BUILDERS: dict[str, Callable[[Any], nn.Module]] = {
    "clip": build_clip,
    "coca": build_coca,
    "blip": build_blip,
    "blip2": build_blip2,
    "simvlm": build_simvlm,
}


def build_model(config: Any) -> nn.Module:
    """Random-init model for a config; the config's ``family`` picks the builder."""
    family = getattr(config, "family", None)
    if family not in MODEL_BUILDERS:
        raise ConfigError(
            f"unknown model family {family!r}; expected one of {sorted(MODEL_BUILDERS)}"
        )
    return MODEL_BUILDERS[family](config)


__all__ = ["BLIP", "BLIP2", "CLIP", "MODEL_BUILDERS", "CoCa", "SimVLM", "build_blip",
           "build_blip2", "build_clip", "build_coca", "build_model", "build_simvlm"]
