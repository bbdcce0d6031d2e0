"""What `vlp embed` cuts a collection into: one part per WebDataset shard, or per run of
``part_size`` unique images of a CSV/TSV/JSONL/COCO file or an image directory, or of texts of
a text file. The plan depends only on the data and the part size, never on the backend or the
number of processes, so every backend writes the same parts.

Sources are read through `vlp.data` (`build_source`, `group_images`, `shard_fields`); images
stay encoded (paths or shard bytes) until `vlp.eval.embed_images` reads them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlp.data import build_source, group_images, infer_source_kind
from vlp.data.images import images_in_directory
from vlp.data.shardio import expand_urls
from vlp.data.webdataset import shard_fields
from vlp.errors import ConfigError, DataError

IMAGE_KINDS = ("csv", "tsv", "jsonl", "coco", "imagefolder", "wds")
METADATA_COLUMNS = ("id", "path", "key", "caption", "offset", "size")


@dataclass(frozen=True)
class Part:
    index: int
    shard: str | None = None  # a WebDataset shard; None for a slice of a table or a text file
    start: int = 0
    stop: int = 0

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"

    def describe(self) -> dict[str, Any]:
        if self.shard is not None:
            return {"name": self.name, "shard": os.path.basename(self.shard)}
        return {"name": self.name, "rows": [self.start, self.stop]}


@dataclass(frozen=True)
class SourceSpec:
    """Where a collection comes from: ``modality`` "image" (``data`` of ``kind``) or "text"
    (``data``: a text file, one text per line)."""

    data: str
    modality: str = "image"
    kind: str = "auto"
    options: tuple[tuple[str, str], ...] = ()  # source options (image_key, image_root, ...)

    def resolved_kind(self) -> str:
        if self.modality == "text":
            return "lines"
        kind = infer_source_kind(self.data) if self.kind == "auto" else self.kind
        if kind not in IMAGE_KINDS:
            raise ConfigError(f"{self.data}: vlp embed reads images from {list(IMAGE_KINDS)}; "
                              f"got kind {kind!r} (texts: --texts FILE)")
        return kind


@dataclass
class Items:
    """The inputs of one part: what to embed (paths, encoded bytes or texts), one metadata row
    each (`METADATA_COLUMNS`), and the inputs lost before reading (id, reason)."""

    inputs: list[Any] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)


def plan_parts(spec: SourceSpec, part_size: int) -> list[Part]:
    """The parts of ``spec`` in a fixed order."""
    if part_size < 1:
        raise ConfigError(f"part_size must be >= 1, got {part_size}")
    kind = spec.resolved_kind()
    if kind == "wds":
        return [Part(i, shard) for i, shard in enumerate(expand_urls(spec.data))]
    count = len(_all_items(spec.data, kind, spec.options).inputs)
    if count == 0:
        raise DataError(f"{spec.data}: nothing to embed")
    return [Part(i, None, start, min(start + part_size, count))
            for i, start in enumerate(range(0, count, part_size))]


def load_items(spec: SourceSpec, part: Part) -> Items:
    if part.shard is not None:
        return _shard_items(part.shard)
    every = _all_items(spec.data, spec.resolved_kind(), spec.options)
    return Items(every.inputs[part.start:part.stop], every.rows[part.start:part.stop])


def _row(id_: str, path: str, caption: str | None = None, key: str | None = None,
         offset: int | None = None, size: int | None = None) -> dict[str, Any]:
    return {"id": id_, "path": path, "key": key, "caption": caption, "offset": offset,
            "size": size}


def _shard_items(shard: str) -> Items:
    items = Items()
    name, path = os.path.basename(shard), str(Path(shard).resolve())
    for sample, fields in shard_fields(shard):
        if fields is None:
            items.lost.append((f"{name}#{sample.key}" if sample.key else name, sample.reason))
            continue
        offset, size = sample.members.get(fields.image_ext or "", (None, None))
        items.inputs.append(fields.image)
        items.rows.append(_row(f"{name}#{sample.key}", path, fields.text or None,
                               sample.key, offset, size))
    return items


@functools.lru_cache(maxsize=4)
def _all_items(data: str, kind: str, options: tuple) -> Items:
    """Every input of a table source (its unique images, `group_images`' rule, each with its
    first caption), an image directory (its image files, sorted) or a text file (its non-empty
    lines); cached per process, as every part of a run reads the same list."""
    items = Items()
    if kind == "lines":
        file = Path(data)
        if not file.is_file():
            raise DataError(f"{data}: text file not found")
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                items.inputs.append(line.strip())
                items.rows.append(_row(f"{file.name}:{number}", str(file.resolve()),
                                       line.strip()))
        return items
    if kind == "imagefolder":
        for image in images_in_directory(data):
            items.inputs.append(str(image))
            items.rows.append(_row(str(image), str(image.resolve())))
        return items
    groups = group_images(build_source(kind, data, **dict(options)))
    captions = groups.references()
    for image, id_, texts in zip(groups.images, groups.ids, captions):
        items.inputs.append(image)
        items.rows.append(_row(id_, str(Path(str(image)).resolve()) if image else "",
                               texts[0] if texts else None))
    return items
