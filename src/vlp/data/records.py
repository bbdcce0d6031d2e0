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


MAX_LINE_BYTES = 64 << 20  # one JSONL row
MAX_JSON_BYTES = 2 << 30  # one JSON document (COCO annotations)
BOM = b"\xef\xbb\xbf"


def decoding_error(path: Any, data: bytes, error: UnicodeDecodeError, first_line: int = 1
                   ) -> DataError:
    """A DataError naming the file, line and byte where `data` stops being UTF-8."""
    line = first_line + data.count(b"\n", 0, error.start)
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return DataError(f"{path}:{line}: not UTF-8 text: byte 0x{data[error.start]:02x} at column "
                     f"{column}{hint}; save the file as UTF-8")


def decode_utf8(path: Any, data: bytes, first_line: int = 1) -> str:
    """`data` (a file's bytes, a byte-order mark allowed at its start) as text."""
    if first_line == 1 and data.startswith(BOM):
        data = data[len(BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise decoding_error(path, data, error, first_line) from None


def read_utf8(path: str | os.PathLike[str], limit: int = MAX_JSON_BYTES) -> str:
    """A whole text file as UTF-8 (a BOM allowed); DataError naming the file, line and byte
    where it is not, or when it is larger than `limit` bytes."""
    size = os.stat(path).st_size
    if size > limit:
        raise DataError(f"{path}: {size} bytes, more than the {limit} this file may hold")
    with open(path, "rb") as f:
        return decode_utf8(path, f.read())


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped (class names, templates, texts)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    lines = [line.strip() for line in read_utf8(path).splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: no non-empty lines")
    return lines


def parse_json(text: str, where: str) -> Any:
    """JSON `text`; DataError naming `where` when it is not JSON or nests too deeply."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from e
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None


def check_text(value: str, where: str) -> str:
    """`value` unless it holds a lone surrogate (a JSON escape such as \\ud800 that is no
    character): DataError naming `where`."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: text holds {value[e.start]!r}, half of a surrogate pair, "
                        "which is no character") from None
    return value


def jsonl_rows(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each non-blank line of a JSONL file, ``where`` being
    ``"<path>:<line>"`` for error messages; a line that is not UTF-8 or not a JSON object
    (or is longer than MAX_LINE_BYTES) is a DataError."""
    with open(path, "rb") as f:
        line_number = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            line_number += 1
            where = f"{path}:{line_number}"
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{where}: a line longer than {MAX_LINE_BYTES} bytes")
            line = decode_utf8(path, raw, first_line=line_number)
            if not line.strip():
                continue
            row = parse_json(line, where)
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row

