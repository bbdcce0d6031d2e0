"""Name or path -> model, tokenizer and image transform: the one place a model is made.

A *name* is a registered preset (`vlp.config.list_presets`); a *path* is a model directory
(``config.json`` + ``model.safetensors`` + tokenizer files) or a training run directory, which
stands for its latest checkpoint. Overrides are one mechanism everywhere: a dict merged into the
config's nested dict (``{"text": {"layers": 2}}`` changes one field of the text tower and keeps
the rest), then checked field by field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp.config import config_from_dict, config_to_dict, get_preset, list_presets, load_config
from vlp.contract import unwrap_model
from vlp.data.transforms import ImageTransform, image_transform
from vlp.errors import CheckpointError, ConfigError
from vlp.models import build_model, load_model_dir
from vlp.store import CONFIG_FILE, TOKENIZER_FILE, model_dir, save_model_dir
from vlp.tokenizers import Tokenizer
from vlp.tokenizers import load_tokenizer as _load_tokenizer


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in: nested dicts key by key, other values replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def with_overrides(config: Any, overrides: dict[str, Any] | None,
                   where: str = "model overrides") -> Any:
    """A new config: `config` with `overrides` merged in (ConfigError naming an unknown field)."""
    if not overrides:
        return config
    return config_from_dict(merge(config_to_dict(config), overrides), where=where)


def is_model_path(name_or_path: str | os.PathLike[str]) -> bool:
    """A directory on disk (a model or run directory) rather than a preset name."""
    return Path(name_or_path).is_dir()


def model_config(name_or_path: str | os.PathLike[str],
                 overrides: dict[str, Any] | None = None) -> Any:
    """The config a preset name or a model/run directory describes, with `overrides` merged."""
    name = str(name_or_path)
    if is_model_path(name_or_path):
        config = load_config(model_dir(name_or_path) / CONFIG_FILE)
    elif ("/" in name or os.sep in name) and ":" not in name and name not in list_presets():
        raise ConfigError(f"{name}: no such model or run directory (a fine-tune's starting "
                          f"run must exist first); nor a preset: {list_presets()}")
    else:
        config = get_preset(name)
    return with_overrides(config, overrides)


def create_model(name_or_path: str | os.PathLike[str], **overrides: Any) -> nn.Module:
    """A random-init model from a preset name or a model directory's config; keyword
    `overrides` are merged into the config (nested dicts key by key)."""
    return build_model(model_config(name_or_path, overrides))


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """A model with its weights from a model directory; a run directory resolves to its latest
    checkpoint."""
    return load_model_dir(model_dir(path), map_location=map_location)


def save(model: nn.Module, directory: str | os.PathLike[str],
         tokenizer: Tokenizer | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files atomically."""
    model = unwrap_model(model)
    if not hasattr(model, "config"):
        raise CheckpointError(f"{type(model).__name__} has no .config; cannot save it")
    return save_model_dir(directory, model.config, model.state_dict(), tokenizer)


def load_tokenizer(path: str | os.PathLike[str], context_length: int | None = None
                   ) -> Tokenizer:
    """The tokenizer saved with a model (any directory in the HF ``tokenizer.json`` layout); a
    run directory resolves to its latest checkpoint."""
    return _load_tokenizer(model_dir(path), context_length=context_length)


def transform(model_or_config: Any, train: bool = False, fast_decode: bool = False
              ) -> ImageTransform:
    """PIL image -> normalised tensor, from a model's (or config's) vision settings;
    ``fast_decode`` (evaluation only): large JPEGs decode at a reduced scale, slightly
    different pixels (`vlp.data.transforms.ImageTransform.draft_size`)."""
    return image_transform(model_or_config, train=train, fast_decode=fast_decode)


def load_model_and_transforms(path: str | os.PathLike[str],
                              map_location: str | torch.device = "cpu", *,
                              fast_decode: bool = False
                              ) -> tuple[nn.Module, Tokenizer | None, ImageTransform]:
    """``(model in eval mode, its tokenizer or None, its eval image transform)`` from a model or
    run directory: everything inference needs (``fast_decode``: see `transform`)."""
    directory = model_dir(path)
    model = load_model_dir(directory, map_location=map_location).eval()
    tokenizer = (_load_tokenizer(directory, context_length=text_context_length(model.config))
                 if (directory / TOKENIZER_FILE).is_file() else None)
    return model, tokenizer, image_transform(model.config, train=False,
                                             fast_decode=fast_decode)


def text_context_length(config: Any) -> int:
    """Context length of the text a model's batches carry (BLIP-2 stage 2: its LLM's)."""
    feed = config.batch_text()
    return feed[1] if feed is not None else config.text.context_length
