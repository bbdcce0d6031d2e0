"""vlp: vision-language pretraining — CLIP, CoCa, BLIP, BLIP-2 and SimVLM in one library.

The public API is the same for every family (imports are deferred so ``import vlp`` stays
light; `vlp.factory` does the work)::

    model = vlp.create_model("clip-tiny")          # a named preset, random init
    model = vlp.load("runs/demo/checkpoint-latest")
    model = vlp.load("hf-hub:openai/clip-vit-base-patch32")   # converted once, then cached
    vlp.save(model, "out/dir", tokenizer=tok)
    tok = vlp.load_tokenizer("out/dir")
    x = vlp.image_transform(model, train=False)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlp.config import list_presets
from vlp.errors import CheckpointError, ConfigError, DataError, VlpError

__version__ = "0.1.0"


def list_models() -> list[str]:
    """Every registered preset name."""
    return list_presets()


def list_pretrained() -> list[Any]:
    """The hub names vlp knows (`vlp.hub.Pretrained`: name, family, preset, source); any other
    ``hf-hub:`` repo in a format vlp reads loads too."""
    from vlp.hub import list_pretrained as _list_pretrained

    return _list_pretrained()


def create_model(name: str, **overrides: Any):
    """A random-init model from a named preset (or a model directory's config); ``overrides``
    are merged into the config, nested dicts key by key (``text={"layers": 2}``)."""
    from vlp.factory import create_model as _create_model

    return _create_model(name, **overrides)


def load(path: str | os.PathLike[str], map_location: str = "cpu"):
    """A model from a vlp model directory (``config.json`` + ``model.safetensors``); a run
    directory resolves to its latest checkpoint; a name ``hf-hub:ORG/REPO[@REVISION]`` or
    ``open_clip:ARCH/TAG`` to its hub snapshot, converted once into vlp's cache (`vlp.hub`)."""
    from vlp.factory import load as _load
    from vlp.hub import resolve

    return _load(resolve(path), map_location=map_location)


def save(model, directory: str | os.PathLike[str], tokenizer: Any | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files atomically."""
    from vlp.factory import save as _save

    return _save(model, directory, tokenizer=tokenizer)


def load_tokenizer(path: str | os.PathLike[str], context_length: int | None = None):
    """The tokenizer saved with a model (any directory in the HF ``tokenizer.json`` layout, or
    a hub name as `load` takes)."""
    from vlp.factory import load_tokenizer as _load_tokenizer
    from vlp.hub import resolve

    return _load_tokenizer(resolve(path), context_length=context_length)


def image_transform(model_or_config: Any, train: bool = False, fast_decode: bool = False):
    """PIL image -> normalised tensor, from a model's (or config's) vision settings;
    ``fast_decode`` (evaluation only, off by default): large JPEGs decode at a reduced scale
    and only the kept centre square is resampled (faster, pixels differ slightly)."""
    from vlp.factory import transform

    return transform(model_or_config, train=train, fast_decode=fast_decode)


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
    "image_transform", "list_models", "list_pretrained", "load", "load_tokenizer", "save",
]
