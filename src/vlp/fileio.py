"""File helpers: atomic writes (readers see the old file or the new one, never a half-written
one) and the checked read of a JSON object."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> None:
    """Call ``write(temp_name)`` to fill a hidden temporary file beside `path`, fsync it, then
    rename it over `path`; on any error the temporary file is removed and the error re-raised.

    The temporary name keeps `path`'s suffix, for writers that add one (``np.save``).
    """
    path = Path(path)
    temp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}{path.suffix}"
    try:
        write(str(temp))
        fsync_path(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``atomic_write`` of a UTF-8 text file."""
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def read_json_object(path: str | os.PathLike[str], error: type[Exception]) -> dict[str, Any]:
    """The JSON object in UTF-8 `path`; `error` (a VlpError subclass) naming the file when it is
    missing, unreadable or not an object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not readable as JSON ({err})") from err
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
