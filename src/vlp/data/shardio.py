"""Shard lists (brace patterns, ``::``-joined, directories) and where shards are read from:
local files, ``pipe:COMMAND``, http(s) and fsspec URLs.

A local path is opened as a file (seekable: the loader reads tar headers first and member data
only for the samples it keeps). Everything else is a stream read once from start to end:

- ``pipe:COMMAND``: the standard output of a shell command (``pipe:curl -s URL``,
  ``pipe:aws s3 cp s3://bucket/shard.tar -``);
- ``http://`` and ``https://``: a GET through the standard library;
- any other ``scheme://`` URL (``s3://``, ``gs://``, ``file://``, ``memory://`` ...): through
  fsspec (the ``vlp[fsspec]`` extra, plus the file system's own package such as s3fs).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from vlp.errors import ConfigError, DataError

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_BRACES = re.compile(r"\{([^{}]*)\}")
MAX_SHARD_NAMES = 1_000_000  # names one shard pattern may expand to


def _brace_choices(body: str) -> int:
    numeric = _RANGE.match(body)
    if numeric:
        return abs(int(numeric.group(2)) - int(numeric.group(1))) + 1
    return body.count(",") + 1


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> three names (zero padded as written); ``{x,y}`` -> alternatives.

    A pattern naming more than `MAX_SHARD_NAMES` shards is a DataError, raised before any
    name is made."""
    total = 1
    for body in _BRACES.findall(pattern):
        total *= _brace_choices(body)
        if total > MAX_SHARD_NAMES:
            raise DataError(f"{pattern}: the shard pattern expands to more than "
                            f"{MAX_SHARD_NAMES:,} names; expected a range of existing shards")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.group(1), numeric.group(2)
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0" for s in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    return [name for choice in choices for name in _expand(head + choice + tail)]


def expand_urls(urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Shard paths or URLs from a brace pattern (``::`` joins several), a directory, or a list.
    Local shards must exist; URLs are read when the loader reaches them."""
    return [shard for group in expand_url_groups(urls) for shard in group]


def expand_url_groups(urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
                      ) -> list[list[str]]:
    """`expand_urls`, one list per ``::``-joined pattern (or per list entry)."""
    if isinstance(urls, str | os.PathLike):
        patterns = str(urls).split("::")
    else:
        patterns = [str(u) for u in urls]
    groups: list[list[str]] = []
    for pattern in patterns:
        shards: list[str] = []
        groups.append(shards)
        if not is_stream_url(pattern) and os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).iterdir() if p.suffix == ".tar")
            if not found:
                raise DataError(f"{pattern}: directory has no .tar shards")
            shards.extend(found)
        else:
            shards.extend(expand_braces(pattern))
    every = [shard for group in groups for shard in group]
    if not every or not all(groups):
        raise DataError(f"{urls!r}: no WebDataset shards given")
    missing = [s for s in every if not is_stream_url(s) and not os.path.isfile(s)]
    if missing:
        raise DataError(f"{missing[0]}: shard not found ({len(missing)} of {len(every)} "
                        f"shards missing)")
    return groups


PIPE = "pipe:"
HTTP_TIMEOUT = 60.0  # seconds a shard's server may stay silent
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_stream_url(url: str) -> bool:
    """True for a shard read as a stream (``pipe:`` or a ``scheme://`` URL), False for a path."""
    return url.startswith(PIPE) or _SCHEME.match(url) is not None


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise ConfigError("shard URLs other than pipe: and http(s) are read through fsspec: "
                          "pip install 'vlp[fsspec]' (plus s3fs / gcsfs for s3:// / gs://)"
                          ) from None
    return fsspec


def check_openable(urls: Sequence[str]) -> None:
    """ConfigError, one line, when a URL's scheme cannot be read here: fsspec missing, or no
    fsspec file system (or its package, such as s3fs) for the scheme."""
    schemes = {match.group(1).lower() for url in urls if not url.startswith(PIPE)
               and (match := _SCHEME.match(url)) is not None} - {"http", "https"}
    for scheme in sorted(schemes):
        try:
            _fsspec().get_filesystem_class(scheme)
        except (ValueError, ImportError) as e:
            raise ConfigError(f"{scheme}:// shards: fsspec cannot read them ({e})") from None


class _PipeStream:
    """The standard output of a shell command; closing it early stops the command."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL)
        self.stdout = self.process.stdout

    def read(self, size: int = -1) -> bytes:
        data = self.stdout.read(size)
        if size and not data and self.process.wait() != 0:
            raise OSError(f"command exited with status {self.process.returncode}")
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.stdout.close()
        self.process.wait()


@contextlib.contextmanager
def open_stream(url: str) -> Iterator[IO[bytes]]:
    """A shard URL opened for reading from its start; OSError when it cannot be read (a
    command that fails, a server that answers 404), ConfigError without fsspec for URLs
    that need it."""
    if url.startswith(PIPE):
        command = url[len(PIPE):].strip()
        if not command or not shlex.split(command):
            raise ConfigError(f"{url!r}: expected pipe:COMMAND, a command that writes the "
                              "shard to its standard output")
        stream: Any = _PipeStream(command)
    elif url.startswith(("http://", "https://")):
        try:
            stream = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT)
        except urllib.error.HTTPError as e:
            raise OSError(f"HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise OSError(str(e.reason)) from e
    else:
        try:
            stream = _fsspec().open(url, "rb").open()
        except (ValueError, ImportError) as e:  # an unknown protocol, its package missing
            raise ConfigError(f"{url}: fsspec cannot open it ({e})") from None
    try:
        yield stream
    finally:
        stream.close()


def read_sidecar(url: str) -> bytes | None:
    """The whole of a small file beside the shards (an img2dataset ``_stats.json``), or None
    when it is missing or unreadable; never for ``pipe:`` shards."""
    if url.startswith(PIPE):
        return None
    try:
        with open_stream(url) as f:
            return f.read()
    except (OSError, ConfigError):
        return None
