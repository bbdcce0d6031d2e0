"""WebDataset tar shards (img2dataset layout: ``{key}.jpg`` + ``{key}.txt`` and/or ``{key}.json``).

Shard lists come from brace patterns, directories or lists (`expand_urls`); a shard is a local
path or a URL read as a stream (`vlp.data.shardio`: ``pipe:COMMAND``, http(s), fsspec). For a
local shard `scan_shard` reads the tar headers only, so counting and shuffling never touch image
data; `stream_shard` reads a URL's samples with their data in one pass, grouped the same way.
Both turn damage (a truncated or garbled shard) into `lost` placeholders rather than errors.
`WebDatasetSource` is the stream the loader splits across ranks and workers (see
`vlp.data.stream`).
"""

from __future__ import annotations

import json
import math
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlp.data.records import Record
from vlp.data.shardio import (
    check_openable,
    expand_url_groups,
    is_stream_url,
    open_stream,
    read_sidecar,
)
from vlp.errors import ConfigError, DataError

# WebDataset member extensions that hold the image, in order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")

@dataclass(slots=True)
class TarSample:
    """One sample's members in a shard: extension -> (data offset, size), read lazily.

    A placeholder with `lost` set stands for a sample that is skipped for `reason`:
    "truncated_shard" (lost to damage: no members; its `note`, on the first placeholder of a
    shard only, says what was lost) or "duplicate_key" (a second sample right after one with
    the same key, which webdataset would merge into it; its `note` names shard and key).
    """

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    lost: bool = False
    note: str = ""
    reason: str = "truncated_shard"
    data: dict[int, bytes] | None = None  # a streamed sample's member bytes by data offset

    def reader(self) -> Callable[[int, int], bytes]:
        """`read(offset, size)` over a streamed sample's own bytes."""
        data = self.data or {}
        return lambda offset, size: data[offset][:size]


def _split_member_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def _new_sample(current: TarSample | None, key: str, ext: str, shard: str) -> TarSample | None:
    """The sample that a member (`key`, `ext`) starts, or None when it joins `current`.

    A member joins the current sample when it has the same key and an extension that sample
    does not have yet; any other member starts a new sample. A repeated extension under the
    same key starts a "duplicate_key" placeholder (never merged) whose note names `shard`.
    """
    if current is None or key != current.key:
        return TarSample(key)
    if ext not in current.members:
        return None
    return TarSample(key, lost=True, note=f"{shard}#{key}: duplicate_key", reason="duplicate_key")


def _is_tar_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _ends_cleanly(f: Any, offset: int) -> bool:
    """True when an end-of-archive (zero) block follows the last member at `offset`."""
    f.seek(offset)
    return f.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)


def scan_shard(path: str, *, strict: bool = True) -> Iterator[TarSample]:
    """Samples of one uncompressed tar in file order, from headers only (no data is read).

    Consecutive members with the same key (path up to the first dot of the file name) form
    one sample, as webdataset does; a member whose extension the sample already has starts a
    second sample with that key, which is skipped as "duplicate_key" (never merged).

    A damaged shard (cut inside a header or a member's data, no end-of-archive block, a
    garbled header) yields the samples before the damage, then `lost` placeholders: as many
    as img2dataset's ``*_stats.json`` says are missing, else one (the sample whose data was
    cut, or the unknown rest of the shard, counted once). A sample with a member's data cut is
    lost whole; one whose next member's header was cut keeps the members before it, as the
    cut may as well fall between two samples. A file that does not start with a tar header
    raises DataError when `strict`, else reads as a shard damaged from byte 0.
    """
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            f.seek(0)
            first = f.read(tarfile.BLOCKSIZE)
            if strict and len(first) == tarfile.BLOCKSIZE and not _is_tar_header(first):
                raise DataError(f"{path}: not a readable uncompressed tar shard ({e})") from e
            yield from _lost_samples(path, 0, 0, None)  # cut inside its first header
            return
        size = os.fstat(f.fileno()).st_size
        complete = 0
        current: TarSample | None = None
        current_start = 0  # header offset of the current sample's first member
        damage_at: int | None = None
        cut_key: str | None = None  # key of a sample whose member data runs past the end
        with tar:
            while True:
                try:
                    info = tar.next()
                except tarfile.ReadError:  # padding or an extended header cut off
                    damage_at = tar.offset
                    break
                if info is None:
                    if not _ends_cleanly(f, tar.offset):
                        damage_at = tar.offset
                    break
                tar.members.clear()  # headers are not needed again; keep memory flat
                if not info.isfile():
                    continue
                key, ext = _split_member_name(info.name)
                base = key.rpartition("/")[2]
                wanted = bool(ext) and not base.startswith((".", "__"))
                if info.offset_data + info.size > size:
                    if wanted and current is not None and key == current.key:
                        damage_at, cut_key, current = current_start, key, None
                    else:
                        damage_at, cut_key = info.offset, key if wanted else None
                    break
                if not wanted:
                    continue
                started = _new_sample(current, key, ext, path)
                if started is not None:
                    if current is not None:
                        complete += 1
                        yield current
                    current, current_start = started, info.offset
                current.members[ext] = (info.offset_data, info.size)
        if current is not None:
            complete += 1
            yield current
        if damage_at is not None:
            yield from _lost_samples(path, min(damage_at, size), complete, cut_key)


def stream_shard(url: str, *, strict: bool = True) -> Iterator[TarSample]:
    """The samples of a shard URL in one pass, each with its members' bytes (`TarSample.data`),
    grouped as `scan_shard` groups them. A stream that cannot be opened, is not a tar, or
    breaks off yields the samples before the break, then `lost` placeholders (as `scan_shard`);
    with `strict`, one that cannot be read from its start is a DataError instead."""
    complete = 0
    current: TarSample | None = None
    damage: str | None = None  # what broke off the stream
    cut_key: str | None = None
    offset = 0  # header offset of the current sample's first member, else of the break
    try:
        with open_stream(url) as f:
            try:
                tar = tarfile.open(fileobj=f, mode="r|")
            except (tarfile.ReadError, EOFError, OSError) as e:
                if strict:
                    raise DataError(f"{url}: not a readable uncompressed tar shard ({e})"
                                    ) from None
                damage = str(e)
                tar = None
            while tar is not None:
                try:
                    info = tar.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    damage, offset = str(e), tar.offset
                    break
                if info is None:
                    break
                tar.members.clear()
                if not info.isfile():
                    continue
                key, ext = _split_member_name(info.name)
                base = key.rpartition("/")[2]
                if not ext or base.startswith((".", "__")):
                    continue
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    damage = str(e)
                    if current is not None and key == current.key:
                        cut_key, current = key, None
                    else:
                        cut_key, offset = key, info.offset
                    break
                started = _new_sample(current, key, ext, url)
                if started is not None:
                    if current is not None:
                        complete += 1
                        yield current
                    current, offset = started, info.offset
                    current.data = {}
                current.members[ext] = (info.offset_data, info.size)
                current.data[info.offset_data] = data
    except OSError as e:  # could not be opened: a failing command, an HTTP error
        if strict:
            raise DataError(f"{url}: cannot read the shard ({e})") from None
        damage = str(e)
    if current is not None:
        complete += 1
        yield current
    if damage is not None:
        yield from _lost_samples(url, offset, complete, cut_key)


def _lost_samples(path: str, offset: int, complete: int, cut_key: str | None
                  ) -> Iterator[TarSample]:
    """Placeholders for the samples of a shard lost from byte `offset` on."""
    expected = _stats_count(path)
    if expected is not None:
        count = max(expected - complete, 1 if cut_key is not None else 0)
        what = f"{count} sample{'s' if count != 1 else ''}"
    else:
        count = 1
        what = "unknown number of samples"
    note = f"{path}: truncated_shard ({what} after byte {offset}"
    note += ")" if expected is not None else ", counted as 1)"
    for i in range(count):
        yield TarSample((cut_key or "") if i == 0 else "", lost=True,
                        note=note if i == 0 else "")


def _checked_count(shard: str) -> int:
    """Samples of a shard (lost ones included) from its tar headers. An img2dataset
    ``_stats.json`` only says how many samples a damaged shard lost; one that disagrees with
    what the shard holds is a DataError naming it, never an epoch of the wrong size."""
    expected = _stats_count(shard)
    samples = list(scan_shard(shard, strict=expected is None))
    damaged = any(s.lost and s.reason == "truncated_shard" for s in samples)
    intact = sum(1 for s in samples if not (s.lost and s.reason == "truncated_shard"))
    if expected is not None and (expected < intact or (expected != intact and not damaged)):
        stats = Path(shard).with_name(Path(shard).stem + "_stats.json")
        raise DataError(f"{stats}: says {expected} samples (successes) but {shard} holds "
                        f"{intact}{' before its damage' if damaged else ''}; fix or delete the "
                        f"stats file")
    return len(samples)


def _stats_url(shard: str) -> str | None:
    """Where img2dataset puts a shard's ``_stats.json``: beside it, ``NAME_stats.json``."""
    if shard.startswith("pipe:"):
        return None
    if is_stream_url(shard):
        base, dot, _ = shard.rpartition(".")
        return f"{base if dot else shard}_stats.json"
    return str(Path(shard).with_name(Path(shard).stem + "_stats.json"))


def _stats_count(shard: str) -> int | None:
    """img2dataset's ``<shard>_stats.json`` sample count, when present."""
    stats = _stats_url(shard)
    if stats is None:
        return None
    if is_stream_url(stats):
        raw = read_sidecar(stats)
    else:
        raw = Path(stats).read_bytes() if Path(stats).is_file() else None
    if raw is None:
        return None
    try:
        count = json.loads(raw).get("successes")
    except (ValueError, OSError, AttributeError, RecursionError):  # not JSON, not UTF-8
        return None
    return count if isinstance(count, int) and count >= 0 else None


def shard_samples(shard: str, *, strict: bool = True
                  ) -> Iterator[tuple[TarSample, Callable[[int, int], bytes]]]:
    """Every sample of a local shard (`scan_shard`) or shard URL (`stream_shard`) in order,
    with a `read(offset, size)` for its member bytes."""
    if is_stream_url(shard):
        for sample in stream_shard(shard, strict=strict):
            yield sample, sample.reader()
        return
    with open(shard, "rb") as f:
        read = _file_reader(f)
        for sample in scan_shard(shard, strict=strict):
            yield sample, read


@dataclass(frozen=True)
class TarFields:
    """What a scanned sample holds: image bytes (b"" when absent) and extension, its ``.json``
    metadata ({} when absent or unreadable), its caption (``.txt``, else the meta's)."""

    image: bytes
    image_ext: str | None
    meta: dict[str, Any]
    text: str | None


def tar_sample_fields(sample: TarSample, read: Callable[[int, int], bytes]) -> TarFields:
    """The fields of a scanned sample; `read(offset, size)` reads bytes from its shard."""
    members = sample.members
    image_ext = next((ext for ext in WDS_IMAGE_EXTS if ext in members), None)
    image = read(*members[image_ext]) if image_ext is not None else b""
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            loaded = json.loads(read(*members["json"]))
            meta = loaded if isinstance(loaded, dict) else {}
        except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep
            meta = {}
    text: str | None = None
    if "txt" in members:
        text = read(*members["txt"]).decode("utf-8", errors="replace")
    elif isinstance(meta.get("caption"), str):
        text = meta["caption"]
    return TarFields(image, image_ext, meta, text)


def decode_tar_sample(sample: TarSample, read: Callable[[int, int], bytes],
                      label_key: str | None) -> Record:
    """Record of a scanned sample; `read(offset, size)` reads bytes from its shard."""
    members = sample.members
    fields = tar_sample_fields(sample, read)
    meta = fields.meta
    label: int | None = None
    if label_key is not None:
        raw = (read(*members["cls"]).decode(errors="replace").strip() if "cls" in members
               else meta.get(label_key))
        try:
            label = int(raw) if raw is not None else None
        except (TypeError, ValueError):
            label = None
    return Record(image=fields.image, text=fields.text, label=label, key=sample.key)


class WebDatasetSource:
    """A stream of tar shards (img2dataset layout); the loader splits shards across workers.

    `num_samples` sets the epoch size; without it, local shards are counted once from their
    tar headers (img2dataset ``*_stats.json`` files are checked against them) and shard URLs
    from their ``*_stats.json`` alone (a URL's count would need a whole read: without its stats
    file, counting is a DataError asking for `num_samples`). With `label_key`, labels come from
    a ``.cls`` member or that field of the ``.json`` member.

    `resampled` (training): each loader stream draws shards with replacement, seeded, instead
    of reading each once per epoch; `weights`, one per ``::``-joined pattern, sets the share
    of draws that go to each pattern's shards (uniform among them).

    Samples lost to a truncated shard stay in the counts (see `scan_shard`), so the epoch size
    does not depend on which shards are damaged; the loader skips them as "truncated_shard".
    Counting raises DataError for a file that is not a tar shard at all.
    """

    has_labels: bool
    has_answers = False
    has_images = True
    templates = None  # no zero-shot prompts of its own

    def __init__(self, urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 num_samples: int | None = None, label_key: str | None = None,
                 has_text: bool = True, resampled: bool = False,
                 weights: Sequence[float] | None = None) -> None:
        groups = expand_url_groups(urls)
        self.shards = [shard for group in groups for shard in group]
        check_openable(self.shards)
        if num_samples is not None and num_samples <= 0:
            raise ConfigError(f"num_samples must be positive, got {num_samples}")
        self._num_samples = num_samples
        self._shard_sizes: list[int] | None = None
        self.label_key = label_key
        self.has_labels = label_key is not None
        self.has_text = has_text
        self.resampled = resampled
        self.shard_weights = _shard_weights(groups, weights, resampled)
        self.lost_samples: list[tuple[str, str]] = []  # of the last pass (see __iter__)

    @property
    def shard_sizes(self) -> list[int]:
        """Samples per shard (lost ones included), counted once and cached: a local shard's
        from its headers, a URL's from its ``_stats.json``."""
        if self._shard_sizes is None:
            unknown = [shard for shard in self.shards if is_stream_url(shard)
                       and _stats_count(shard) is None]
            if unknown:
                raise DataError(
                    f"{unknown[0]}: cannot count the samples of {len(unknown)} shard URL(s) "
                    "without reading them whole; give the epoch size (vlp train "
                    "--train-num-samples / --val-num-samples N, num_samples=N) or put "
                    "img2dataset's NAME_stats.json beside each shard")
            sizes = []
            shards = tqdm(self.shards, desc="counting WebDataset samples", unit="shard",
                          disable=len(self.shards) < 16, leave=False)
            for shard in shards:
                sizes.append(_stats_count(shard) if is_stream_url(shard)
                             else _checked_count(shard))
            self._shard_sizes = sizes
        return self._shard_sizes

    @property
    def num_samples_given(self) -> bool:
        """True when the epoch size was given rather than counted from the shards."""
        return self._num_samples is not None

    @property
    def num_samples(self) -> int:
        if self._num_samples is not None:
            return self._num_samples
        return sum(self.shard_sizes)

    def __iter__(self) -> Iterator[Record]:
        """Records of the readable samples; the skipped ones (a truncated shard's, repeated
        keys) are left out and listed in `lost_samples` as (name, reason) while reading."""
        self.lost_samples = []
        for shard in self.shards:
            for sample, read in shard_samples(shard):
                if sample.lost:
                    name = f"{shard}#{sample.key}" if sample.key else shard
                    self.lost_samples.append((name, sample.reason))
                else:
                    yield decode_tar_sample(sample, read, self.label_key)

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, first {self.shards[0]!r})"


def _shard_weights(groups: list[list[str]], weights: Sequence[float] | None,
                   resampled: bool) -> list[float] | None:
    """Each shard's draw weight: its pattern's weight shared among the pattern's shards."""
    if weights is None:
        return None
    if not resampled:
        raise ConfigError("data weights need resampled shards (vlp train --dataset-resampled): "
                          "without it every shard is read once per epoch")
    values = list(weights)
    if len(values) != len(groups) or not all(
            isinstance(w, int | float) and math.isfinite(w) and w >= 0 for w in values
    ) or not any(values):
        raise ConfigError(f"data weights {values}: expected {len(groups)} non-negative "
                          "number(s), one per '::'-joined shard pattern, not all 0")
    return [weight / len(group) for weight, group in zip(values, groups) for _ in group]


def _file_reader(f: Any) -> Callable[[int, int], bytes]:
    def read(offset: int, size: int) -> bytes:
        f.seek(offset)
        return f.read(size)

    return read


def shard_fields(shard: str) -> Iterator[tuple[TarSample, TarFields | None]]:
    """Every sample of one shard in file order with its fields; None for a skipped one (a
    truncated shard's, a repeated key: see `scan_shard`), whose ``reason`` says why."""
    for sample, read in shard_samples(shard):
        yield sample, None if sample.lost else tar_sample_fields(sample, read)
