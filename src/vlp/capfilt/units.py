"""Work units: the web data cut into pieces each stage processes, writes and skips alone.

A WebDataset shard is one unit. A CSV/TSV/JSONL/COCO source is grouped by image (an image
with several captions is one item) and cut into units of ``unit_size`` images in first-seen
order. Each item carries its original captions and, when the source records it (the synthetic
world's noisy mode), whether each is known noise.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vlp.capfilt.config import CapfiltConfig
from vlp.data import build_source, infer_source_kind
from vlp.data.records import jsonl_rows
from vlp.data.shardio import expand_urls
from vlp.data.webdataset import shard_fields
from vlp.errors import ConfigError, DataError


@dataclass(frozen=True)
class WorkUnit:
    index: int
    shard: str | None  # the WebDataset shard; None for a table source's slice
    start: int = 0  # table sources: items [start, stop) of the grouped images
    stop: int = 0

    @property
    def name(self) -> str:
        """File stem of this unit's output in every stage directory."""
        return f"unit-{self.index:06d}"


@dataclass
class Item:
    """One web image with its captions; ``noisy[j]`` is the ground truth for caption j (None:
    unknown)."""

    key: str
    image: str | bytes  # a path, or encoded bytes from a shard
    image_ref: str  # what the outputs name it by: the path, or "shard.tar#key"
    image_ext: str  # file extension to write the image under
    captions: list[str]
    noisy: list[bool | None]


def source_kind(cfg: CapfiltConfig) -> str:
    if not cfg.data:
        raise ConfigError("capfilt data is empty; expected the web data to bootstrap (a "
                          "CSV/TSV/JSONL/COCO file or WebDataset shards)")
    kind = infer_source_kind(cfg.data) if cfg.kind == "auto" else cfg.kind
    if kind == "imagefolder":
        raise ConfigError(f"capfilt data {cfg.data}: an image folder has no captions; expected "
                          "captioned data (csv, tsv, jsonl, coco, wds)")
    return kind


def plan_units(cfg: CapfiltConfig) -> list[WorkUnit]:
    """The units of ``cfg.data``, in a fixed order that does not depend on the backend."""
    kind = source_kind(cfg)
    if kind == "wds":
        return [WorkUnit(i, shard) for i, shard in enumerate(expand_urls(cfg.data))]
    count = len(_table_items(*_table_key(cfg, kind)))
    if count == 0:
        raise DataError(f"{cfg.data}: no captioned images")
    return [WorkUnit(i, None, start, min(start + cfg.unit_size, count))
            for i, start in enumerate(range(0, count, cfg.unit_size))]


def load_items(cfg: CapfiltConfig, unit: WorkUnit) -> list[Item]:
    """The items of one unit, read from the source (images stay encoded until scored)."""
    if unit.shard is not None:
        return list(_shard_items(unit.shard))
    return _table_items(*_table_key(cfg, source_kind(cfg)))[unit.start:unit.stop]


# -- WebDataset shards -------------------------------------------------------------------------

def _shard_items(shard: str) -> Iterator[Item]:
    for sample, fields in shard_fields(shard):
        if fields is None:
            continue
        caption = fields.text or None
        # the synthetic world records the kind of noise, or null for a clean caption
        noisy = bool(fields.meta["noisy"]) if "noisy" in fields.meta else None
        yield Item(key=sample.key, image=fields.image,
                   image_ref=f"{os.path.basename(shard)}#{sample.key}",
                   image_ext=fields.image_ext or "jpg",
                   captions=[caption] if caption else [],
                   noisy=[noisy] if caption else [])


# -- table sources (CSV/TSV/JSONL/COCO) --------------------------------------------------------

def _table_key(cfg: CapfiltConfig, kind: str) -> tuple:
    options = (("image_key", cfg.image_key), ("caption_key", cfg.caption_key),
               ("separator", cfg.separator), ("image_root", cfg.image_root))
    return (kind, str(Path(cfg.data).resolve()),
            tuple((k, v) for k, v in options if v is not None))


@functools.lru_cache(maxsize=4)
def _table_items(kind: str, path: str, options: tuple) -> list[Item]:
    """Images of a table source in first-seen order, each with all its captions (cached per
    process: every unit of a stage reads the same grouping)."""
    source = build_source(kind, path, **dict(options))
    noise = _known_noise(path, kind)
    items: dict[str, Item] = {}
    for record in source:
        image = str(record.image)
        if image not in items:
            items[image] = Item(key=str(len(items)), image=image, image_ref=image,
                                image_ext=Path(image).suffix.lstrip(".").lower() or "jpg",
                                captions=[], noisy=[])
        if record.text is None or not record.text.strip():
            continue
        item = items[image]
        item.captions.append(record.text)
        item.noisy.append(None if noise is None else (image, record.text) in noise)
    return [item for item in items.values() if item.captions]


def _known_noise(path: str, kind: str) -> set[tuple[str, str]] | None:
    """(image path, caption) pairs known to be noise: the synthetic world's
    ``<split>_noisy.jsonl`` beside ``<split>.csv/.jsonl``; an empty set for a synthetic split
    without one (no noise), None when nothing is known."""
    file = Path(path)
    if kind not in ("csv", "tsv", "jsonl"):
        return None
    noisy_file = file.with_name(f"{file.stem}_noisy.jsonl")
    if not noisy_file.is_file():
        meta = file.with_name("meta.json")
        try:
            generator = json.loads(meta.read_text()).get("generator") if meta.is_file() else None
        except (OSError, json.JSONDecodeError, AttributeError):
            generator = None
        return set() if generator == "vlp.data.synthetic" else None
    pairs = set()
    for _, row in jsonl_rows(noisy_file):
        pairs.add((os.path.join(str(file.parent), row["image"]), row["caption"]))
    return pairs
