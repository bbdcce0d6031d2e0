"""`Record`: the one sample type every source yields and the loader consumes, and the row-level
reading every source shares (JSONL rows, image paths relative to a root).

It lives on its own so that the map-style sources (`vlp.data.sources`), the VQA files
(`vlp.data.qa`), the WebDataset reader (`vlp.data.webdataset`) and the loader all depend on it
without depending on each other.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp.errors import ConfigError, DataError


@dataclass(frozen=True, slots=True)
class Record:
    """One sample: image path or encoded bytes, caption (None when absent), class index, key;
    a VQA sample's text is its question, ``answer`` its most common answer and ``answers``
    every annotator's answer; a text-only document (source kind "text", no image) has its
    segments in ``segments`` and the first in ``text``."""

    image: str | bytes
    text: str | None
    label: int | None
    key: str
    answer: str | None = None
    answers: tuple[str, ...] = ()
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


def parse_label(value: Any, where: str, key: str) -> int:
    try:
        label = int(value)
    except (TypeError, ValueError):
        label = None
    if label is None or (isinstance(value, float) and value != label):
        raise DataError(f"{where}: label {value!r} in {key!r} is not an integer class index")
    return label


def require_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def csv_rows(path: Path, separator: str) -> Iterator[tuple[int, list[str]]]:
    """``(line, row)`` of a UTF-8 CSV read strictly: an unclosed quote, stray text after a
    closing quote or a field over the csv module's limit is a DataError naming the line."""
    if not isinstance(separator, str) or len(separator) != 1 or separator in '"\r\n':
        raise ConfigError(f"{path}: separator {separator!r}: expected one character other "
                          "than a quote or a line break (e.g. ',' or a tab)")
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""), delimiter=separator,
                        strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            reason = str(error)
            if "end of data" in reason:
                reason = "a quote opened here is never closed"
            elif "field limit" in reason:
                reason = (f"a field longer than {csv.field_size_limit()} characters (an "
                          "unclosed quote?)")
            raise DataError(f"{path}:{start}: not a well-formed CSV row ({reason})") from None
        yield start, row


def as_text(value: Any, where: str, key: str) -> str | None:
    if value is None:
        return value
    if isinstance(value, str):
        return check_text(value, f"{where}: {key!r}")
    raise DataError(f"{where}: {key!r} should be a string, got {type(value).__name__}")


def cell(row: list[str], column: int) -> str | None:
    return row[column] if column < len(row) else None


def header_columns(header: list[str], path: Any) -> dict[str, int]:
    """A CSV header's column positions by name; a name given twice is a DataError."""
    columns = {name.strip(): i for i, name in enumerate(header)}
    if len(columns) < len(header):
        doubled = sorted({name.strip() for name in header
                          if sum(other.strip() == name.strip() for other in header) > 1})
        raise DataError(f"{path}:1: the header names column(s) {doubled} more than once")
    return columns
