"""Family name -> builder, filled by each family module as it is imported (`register`), and the
one way a model directory becomes a model (`load_model_dir`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp.errors import ConfigError
from vlp.store import WEIGHTS_FILE, load_weights, read_model_config

MODEL_BUILDERS: dict[str, Callable[[Any], nn.Module]] = {}


def register(family: str) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Decorator: `builder(config)` builds the models of configs whose ``family`` is `family`."""
    def add(builder: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        MODEL_BUILDERS[family] = builder
        return builder
    return add


def build_model(config: Any) -> nn.Module:
    """Random-init model for a config; the config's ``family`` picks the builder."""
    family = getattr(config, "family", None)
    if family not in MODEL_BUILDERS:
        raise ConfigError(
            f"unknown model family {family!r}; expected one of {sorted(MODEL_BUILDERS)}"
        )
    return MODEL_BUILDERS[family](config)


def load_model_dir(directory: str | os.PathLike[str],
                   map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a model directory's ``config.json`` and load its
    ``model.safetensors`` strictly."""
    config = read_model_config(directory)
    model = build_model(config)
    load_weights(model, Path(directory) / WEIGHTS_FILE)
    return model.to(map_location)
