"""`vlp caption`: write one generated caption per image of a directory or data file as JSONL."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from vlp import factory
from vlp.data import build_source, infer_source_kind
from vlp.data.images import ImageInput, group_images, image_inputs, images_in_directory
from vlp.errors import ConfigError, DataError
from vlp.eval.captioning import generate_captions
from vlp.hub import resolve
from vlp.store.files import atomic_write_text

logger = logging.getLogger(__name__)

CAPTIONLESS_KINDS = ("csv", "tsv", "jsonl")  # image lists need no caption column to be captioned
KINDS = ("csv", "tsv", "jsonl", "coco", "wds")  # kind= (vlp caption --kind) besides auto


def resolve_images(images: Any, *, kind: str = "auto", **source_options: Any
                   ) -> tuple[list[ImageInput], list[str], list[tuple[str, str]]]:
    """(images, ids, lost) to caption: a directory of image files (recursively; a directory of
    .tar shards is read as WebDataset), a CSV/TSV/JSONL/COCO file or a shard pattern (through
    `vlp.data.build_source`), a source, or a list of paths. Each distinct image once; ``lost``
    names the samples a source skipped before reading (name, reason: a truncated shard's)."""
    if isinstance(images, str | os.PathLike):
        path = str(images)
        if kind == "auto" and os.path.isdir(path) and infer_source_kind(path) != "wds":
            files = [str(p) for p in images_in_directory(path)]
            return files, list(files), []
        if kind == "auto":
            if not any(mark in path for mark in ("{", "::")) and not os.path.exists(path):
                raise DataError(f"{path}: no such image directory or data file")
            try:
                kind = infer_source_kind(path)
            except DataError:
                raise DataError(f"{path}: cannot tell the data format; pass --kind (kind=) one "
                                f"of {list(KINDS)}") from None
        if kind in CAPTIONLESS_KINDS:
            source_options.setdefault("caption_key", None)
        images = build_source(kind, path, **source_options)
    elif source_options:
        raise ConfigError(f"source options {sorted(source_options)} need images given as a path")
    if hasattr(images, "has_images"):  # a vlp.data source: its unique images and lost samples
        groups = group_images(images)
        return groups.images, groups.ids, groups.lost
    return (*image_inputs(images), [])


def caption(checkpoint_or_model: str | os.PathLike[str] | nn.Module, images: Any,
            out_path: str | os.PathLike[str], *, tokenizer: Any | None = None,
            batch_size: int = 32, max_new_tokens: int = 20, num_beams: int = 3,
            prompt: str | None = None, num_workers: int = 0, progress: bool = True,
            kind: str = "auto", fast_decode: bool = False, **source_options: Any) -> Path:
    """Caption every image and write ``{"image": id, "caption": text}`` lines to ``out_path``
    atomically. A checkpoint directory brings its own tokenizer; a model needs ``tokenizer``.
    Unreadable images are skipped, counted and logged. ``kind`` / ``source_options``
    (image_key, image_root, ...) go to `vlp.data.build_source` for data files;
    ``fast_decode``: large JPEGs decode at a reduced scale (`vlp.eval.generate_captions`)."""
    if isinstance(checkpoint_or_model, nn.Module):
        model = checkpoint_or_model
        if tokenizer is None:
            raise ConfigError("caption(model, ...): pass tokenizer= (a checkpoint directory "
                              "brings its own)")
    else:
        directory = resolve(checkpoint_or_model)  # a hub name: its converted directory
        model = factory.load(directory)
        tokenizer = tokenizer or factory.load_tokenizer(directory)
    image_list, ids, lost = resolve_images(images, kind=kind, **source_options)
    if not image_list:
        raise DataError(f"no images to caption in {images}")
    result = generate_captions(model, tokenizer, image_list, ids, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, num_beams=num_beams,
                               prompt=prompt, num_workers=num_workers, progress=progress,
                               fast_decode=fast_decode)
    skipped = [f"{name}: {reason}" for name, reason in lost] + [
        f"{name}: {reason}" for name, reason in zip(result.skipped, result.reasons)]
    if skipped:
        logger.warning("captioned %d images, skipped %d unreadable (first: %s)",
                       len(result.pairs), len(skipped), skipped[0])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"image": image, "caption": text}, ensure_ascii=False) + "\n"
                    for image, text in result.pairs)
    atomic_write_text(out_path, lines)
    return out_path
