"""Files and directories written atomically (a reader sees the old one or the new one, never a
half-written one) and the checked read of a JSON object."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlp.errors import CheckpointError, ConfigError


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


MAX_JSON_FILE_BYTES = 256 << 20  # training state, optimizer metadata, configs


def read_json_object(path: str | os.PathLike[str], error: type[Exception]) -> dict[str, Any]:
    """The JSON object in UTF-8 `path`; `error` (a VlpError subclass) naming the file when it is
    missing, unreadable or not an object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    if path.stat().st_size > MAX_JSON_FILE_BYTES:
        raise error(f"{path}: {path.stat().st_size} bytes; expected at most "
                    f"{MAX_JSON_FILE_BYTES} for this JSON file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not readable as JSON ({err})") from err
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """`data` as indented UTF-8 JSON (inside an atomic directory, or with `atomic_write_text`
    where the file stands alone)."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# atomic directories


def hidden_sibling(path: Path, kind: str) -> Path:
    """A hidden name beside `path` for a directory being written (``tmp``) or deleted
    (``old``); `STALE_PATTERN` in `vlp.store.layout` recognises what a crash leaves."""
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex}"


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the platform cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def remove_dir(path: Path) -> None:
    """Delete a directory by first renaming it to a hidden name, so a crash mid-delete never
    leaves a half-deleted directory under its real name."""
    doomed = hidden_sibling(path, "old")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty hidden sibling of `final` to fill; on success fsync it and move it to
    `final` (swapping out an existing directory atomically where the OS allows)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise CheckpointError(f"{final}: exists and is not a directory; refusing to replace it")
    staging = hidden_sibling(final, "tmp")
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if not final.exists():
            os.rename(staging, final)
        elif _exchange(staging, final):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous contents
        else:
            remove_dir(final)
            os.rename(staging, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# exclusive use of a directory

LOCK_FILE = "run.lock"
_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth) in this process


@contextmanager
def directory_lock(directory: str | os.PathLike[str], what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on `directory` (created if missing) while the block runs: a
    ``run.lock`` file inside it, locked with a POSIX record lock (``lockf``) and holding this
    process's pid. Another process asking for it gets a ConfigError naming the holder's pid;
    the operating system releases the lock when its holder ends, however it ends, so a killed
    run never blocks the next one. A record lock belongs to the process, not to the open file,
    so forked children (data loader workers) never hold it and cannot outlive a killed holder
    with the lock (``flock`` would be inherited by them); the holder must not open and close
    ``run.lock`` itself while it holds it. Re-entrant within one process."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: exists and is not a directory; expected a {what} "
                          "directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    key = str(path.resolve())
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
    else:
        fd = _acquire(path, directory, what)
        _held[key] = (fd, 1)
    try:
        yield directory
    finally:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
        else:
            del _held[key]
            os.close(fd)  # releases the lock


def _acquire(path: Path, directory: Path, what: str) -> int:
    try:
        import fcntl
    except ImportError:  # no POSIX locks on this platform: no lock
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"{directory}: in use by another {what} (pid {holder}, holding "
                          f"{LOCK_FILE}); wait for it to end or choose another "
                          "directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
