"""`Record`: the one sample type every source yields and the loader consumes, and the row-level
reading every source shares (JSONL rows, image paths relative to a root).

It lives on its own so that the map-style sources (`vlp.data.sources`), the VQA files
(`vlp.data.qa`), the WebDataset reader (`vlp.data.webdataset`) and the loader all depend on it
without depending on each other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlp.errors import DataError


@dataclass(frozen=True, slots=True)
class Record:
    """One sample: image path or encoded bytes, caption (None when absent), class index, key;
    a VQA sample's text is its question and ``answer`` its answer; a text-only document (source
    kind "text", no image) has its segments in ``segments`` and the first in ``text``."""

    image: str | bytes
    text: str | None
    label: int | None
    key: str
    answer: str | None = None
    segments: tuple[str, ...] = ()


def resolve_image_path(root: str, value: str | None) -> str:
    """`value` joined to `root` unless absolute; "" for a missing value."""
    if not value:
        return ""
    return value if os.path.isabs(value) else os.path.join(root, value)


def jsonl_rows(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each non-blank line of a JSONL file, ``where`` being
    ``"<path>:<line>"`` for error messages; a line that is not a JSON object is a DataError."""
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row
