"""vlp: vision-language pretraining — CLIP, CoCa, BLIP, BLIP-2 and SimVLM in one library.

The public API is the same for every family::

    model = vlp.create_model("clip-tiny")          # a named preset, random init
    model = vlp.load("runs/demo/checkpoint-latest")
    vlp.save(model, "out/dir", tokenizer=tok)
    tok = vlp.load_tokenizer("out/dir")
    x = vlp.image_transform(model, train=False)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlp.config import get_preset, list_presets
from vlp.errors import CheckpointError, ConfigError, DataError, VlpError

__version__ = "0.1.0"


def list_models() -> list[str]:
    """Every registered preset name."""
    return list_presets()


def create_model(name: str, **overrides: Any):
    """A random-init model from a named preset; ``overrides`` set top-level config fields."""
    from vlp.models import build_model

    config = get_preset(name)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"preset {name!r} has no config field {key!r}")
        setattr(config, key, value)
    return build_model(config)


def load(path: str | os.PathLike[str], map_location: str = "cpu"):
    """A model from a vlp checkpoint directory (``config.json`` + ``model.safetensors``);
    a run directory resolves to its latest checkpoint."""
    from vlp.train.checkpoint import find_checkpoint, load_pretrained

    path = Path(path)
    if _is_run_dir(path):
        path = find_checkpoint(path, "latest")
    return load_pretrained(path, map_location=map_location)


def save(model, directory: str | os.PathLike[str], tokenizer: Any | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files atomically."""
    from vlp.train.checkpoint import save_pretrained

    return save_pretrained(model, directory, tokenizer=tokenizer)


def load_tokenizer(path: str | os.PathLike[str], context_length: int | None = None):
    """The tokenizer saved with a model (any directory in the HF ``tokenizer.json`` layout)."""
    from vlp.tokenizers import load_tokenizer as _load_tokenizer

    path = Path(path)
    if _is_run_dir(path):
        from vlp.train.checkpoint import find_checkpoint

        path = find_checkpoint(path, "latest")
    return _load_tokenizer(path, context_length=context_length)


def _is_run_dir(path: Path) -> bool:
    """A training run directory (checkpoints inside) rather than a model directory."""
    return (path.is_dir() and not (path / "config.json").is_file()
            and not (path / "tokenizer.json").is_file()
            and any(path.glob("checkpoint-*")))


def image_transform(model_or_config: Any, train: bool = False):
    """PIL image -> normalised tensor, from a model's (or config's) vision settings."""
    from vlp.data.transforms import image_transform as _image_transform

    return _image_transform(model_or_config, train=train)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, src_format: str,
            dst_format: str, tokenizer: Any | None = None, image_size: int | None = None,
            config: str | os.PathLike[str] | None = None,
            architecture: str | None = None) -> Path:
    """Convert a checkpoint between ``vlp``, ``hf`` (transformers), ``open_clip`` (CLIP) and
    ``lavis`` (original BLIP / LAVIS files) formats; ``tokenizer`` supplies one where the
    source has none, ``image_size`` resamples positions, ``config`` is the open_clip model
    config JSON for a bare weights file (or the BLIP preset for a lavis file), and
    ``architecture`` the HF BLIP class to write."""
    from vlp.interop import convert as _convert

    return _convert(src, dst, src_format=src_format, dst_format=dst_format,
                    tokenizer=tokenizer, image_size=image_size, config=config,
                    architecture=architecture)


__all__ = [
    "CheckpointError", "ConfigError", "DataError", "VlpError", "convert", "create_model",
    "image_transform", "list_models", "load", "load_tokenizer", "save",
]
