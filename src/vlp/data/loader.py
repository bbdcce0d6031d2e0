"""Batches from a source: shuffle, shard across ranks and workers, decode, augment, tokenize.

Every random choice is a pure function of (seed, epoch, position), never of the worker that
happens to run it, so an epoch is reproducible and a run can resume mid-epoch with exactly the
batch an uninterrupted run would have produced next:

- map-style sources: the batches of an epoch are index lists fixed up front (a seeded
  permutation, split across ranks); a sample's augmentation generator is seeded by
  (seed, epoch, sample index), so it does not depend on which worker loads it.
- WebDataset: each epoch, shards are shuffled and dealt to rank x stream slots (one stream per
  DataLoader worker); a stream reads its shards in a loop through a seeded shuffle buffer of tar
  headers, so resuming skips consumed samples without reading their data. Every rank yields
  the same number of batches, derived from the sample count.

Unreadable images, missing captions and samples lost to truncated tar shards are skipped,
counted and listed (see `Loader.skipped_report`, `Loader.skipped_items`); a batch may come out
short.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from vlp.data.sources import Record, TarSample, WebDatasetSource, decode_tar_sample, scan_shard
from vlp.errors import ConfigError, DataError

Batch = dict[str, Any]
Tokenizer = Callable[[list[str]], torch.Tensor]
SKIP_REASONS = ("missing_image", "corrupt_image", "missing_caption", "missing_label",
                "truncated_shard")
MAX_SKIPPED_ITEMS = 100  # skipped samples listed per epoch (all are counted)
# carried from workers inside each batch, popped by Loader
_SKIPPED_KEY = "_skipped_by_reason"
_SKIPPED_ITEMS_KEY = "_skipped_items"
DEFAULT_SHUFFLE_BUFFER = 2000  # WebDataset: tar headers held per stream (no image data)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers; equal parts give equal seeds on every platform."""
    data = b"".join(int(part).to_bytes(8, "little", signed=True) for part in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def open_image(image: str | bytes) -> Image.Image | str:
    """The decoded RGB image, or the skip reason ("missing_image" / "corrupt_image")."""
    if not image:
        return "missing_image"
    stream = io.BytesIO(image) if isinstance(image, bytes) else image
    try:
        with Image.open(stream) as opened:
            if opened.mode == "P" and "transparency" in opened.info:
                return opened.convert("RGBA").convert("RGB")
            return opened.convert("RGB")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "missing_image"
    except Exception:  # PIL raises many types on corrupt data (OSError, SyntaxError, ...)
        return "corrupt_image"


@dataclass(frozen=True, slots=True)
class _Lost:
    """A sample known to be lost before reading it, e.g. cut off with its tar shard."""

    reason: str
    note: str  # the listing entry; empty for all but one sample of the same damage


# (sample index, record or a thunk reading it or _Lost, augmentation seed, name to list it by)
Item = tuple[int, Record | Callable[[], Record] | _Lost, int, str | None]


def _record_name(record: Record) -> str:
    """An image path, else the record's key: how a skipped map-style sample is listed."""
    return record.image if isinstance(record.image, str) and record.image else record.key


class _SamplePipeline:
    """Decode, augment and collate records into one batch; runs inside DataLoader workers."""

    def __init__(self, transform: Callable[..., torch.Tensor], tokenizer: Tokenizer | None,
                 has_text: bool, has_labels: bool) -> None:
        self.transform = transform
        self.tokenizer = tokenizer
        self.has_text = has_text
        self.has_labels = has_labels

    def _load(self, record: Record, augment_seed: int) -> torch.Tensor | str:
        if self.has_text and (record.text is None or not record.text.strip()):
            return "missing_caption"
        if self.has_labels and record.label is None:
            return "missing_label"
        image = open_image(record.image)
        if isinstance(image, str):
            return image
        return self.transform(image, torch.Generator().manual_seed(augment_seed))

    def batch(self, items: Iterable[Item]) -> Batch:
        """Batch of items; a skipped one is listed by its name (default: `_record_name`)."""
        pixels: list[torch.Tensor] = []
        texts: list[str] = []
        labels: list[int] = []
        indices: list[int] = []
        skipped: Counter[str] = Counter()
        listed: list[str] = []
        for index, record, augment_seed, name in items:
            if isinstance(record, _Lost):
                skipped[record.reason] += 1
                if record.note and len(listed) < MAX_SKIPPED_ITEMS:
                    listed.append(record.note)
                continue
            try:
                if callable(record):
                    record = record()
                loaded = self._load(record, augment_seed)
            except OSError:  # a shard that went unreadable after it was scanned
                loaded = "corrupt_image"
            if isinstance(loaded, str):
                skipped[loaded] += 1
                if len(listed) < MAX_SKIPPED_ITEMS:
                    where = name if name is not None else _record_name(record)
                    listed.append(f"{where}: {loaded}")
                continue
            pixels.append(loaded)
            indices.append(index)
            if self.has_text:
                texts.append(record.text)
            if self.has_labels:
                labels.append(record.label)
        return self._collate(pixels, texts, labels, indices, skipped, listed)

    def _collate(self, pixels: list[torch.Tensor], texts: list[str], labels: list[int],
                 indices: list[int], skipped: Counter[str], listed: list[str]) -> Batch:
        if pixels:
            pixel_batch = torch.stack(pixels)
        else:
            size = getattr(self.transform, "image_size", 0)
            pixel_batch = torch.empty(0, 3, size, size)
        batch: Batch = {"pixels": pixel_batch, "index": torch.tensor(indices, dtype=torch.long)}
        if self.has_text:
            if self.tokenizer is None:
                batch["texts"] = texts
            elif texts:
                batch["input_ids"] = self.tokenizer(texts)
            else:
                length = getattr(self.tokenizer, "context_length", 0)
                batch["input_ids"] = torch.empty(0, length, dtype=torch.long)
        if self.has_labels:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        batch["num_skipped"] = sum(skipped.values())
        batch[_SKIPPED_KEY] = dict(skipped)
        batch[_SKIPPED_ITEMS_KEY] = listed
        return batch


# ---------------------------------------------------------------------------------------
# map-style sources


class _MapBatches(Dataset):
    """``dataset[(epoch, indices)] -> batch``: a whole batch is one DataLoader task."""

    def __init__(self, source: Any, pipeline: _SamplePipeline, seed: int) -> None:
        self.source = source
        self.pipeline = pipeline
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, task: tuple[int, list[int]]) -> Batch:
        epoch, indices = task
        return self.pipeline.batch(
            (index, self.source[index], derive_seed(self.seed, epoch, index), None)
            for index in indices
        )


def rank_indices(num_samples: int, *, epoch: int, seed: int, shuffle: bool, rank: int,
                 world_size: int, drop_last: bool) -> torch.Tensor:
    """This rank's sample order for an epoch; every rank gets the same count.

    The (seeded) permutation is cut to a multiple of `world_size` (drop_last) or padded by
    repeating its start, then dealt round-robin to ranks.
    """
    if shuffle:
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
        order = torch.randperm(num_samples, generator=generator)
    else:
        order = torch.arange(num_samples)
    per_rank = num_samples // world_size if drop_last else math.ceil(num_samples / world_size)
    total = per_rank * world_size
    if total > num_samples:
        order = order.repeat(math.ceil(total / num_samples))
    return order[:total][rank::world_size]


# ---------------------------------------------------------------------------------------
# WebDataset streams

Unit = tuple[int, int, int]  # (shard index, part, parts): samples with position % parts == part


def stream_units(num_shards: int, *, epoch: int, seed: int, shuffle: bool, slot: int,
                 num_slots: int) -> list[Unit]:
    """The shard parts read by one (rank, stream) slot in an epoch.

    With fewer shards than slots, each shard is split into interleaved parts so every slot
    gets some data.
    """
    order = list(range(num_shards))
    if shuffle:
        random.Random(derive_seed(seed, epoch, -1)).shuffle(order)
    parts = max(1, math.ceil(num_slots / num_shards))
    units = [(shard, part, parts) for shard in order for part in range(parts)]
    return units[slot::num_slots]


def _unit_count(size: int, part: int, parts: int) -> int:
    return max(0, math.ceil((size - part) / parts))


def _pass_samples(shards: list[str], units: list[Unit], pass_number: int
                  ) -> Iterator[tuple[int, int, int, TarSample]]:
    """(shard index, position in shard, pass, sample) of one pass over the units.

    A shard found not to be a tar mid-run is read as damaged from its start, not an error.
    """
    for shard_index, part, parts in units:
        for position, sample in enumerate(scan_shard(shards[shard_index], strict=False)):
            if position % parts == part:
                yield shard_index, position, pass_number, sample


def _unit_samples(shards: list[str], units: list[Unit], repeat: bool,
                  shuffle: random.Random | None, buffer_size: int
                  ) -> Iterator[tuple[int, int, int, TarSample]]:
    """Samples of the units, pass after pass if `repeat`.

    With `shuffle`, each pass goes through its own shuffle buffer, drained at the end of the
    pass, so a pass holds each sample once.
    """
    for pass_number in itertools.count():
        samples = _pass_samples(shards, units, pass_number)
        if shuffle is not None:
            samples = _shuffle_buffer(samples, buffer_size, shuffle)
        produced = 0
        for item in samples:
            produced += 1
            yield item
        if not repeat:
            return
        if produced == 0:
            names = [shards[shard] for shard, _, _ in units]
            raise DataError(f"WebDataset shards {names} (one loader stream's share) hold no "
                            f"samples; use fewer workers/ranks or more shards")


def _shuffle_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle of a stream: emit a random element of a `size`-item buffer."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        pick = rng.randrange(size)
        yield buffer[pick]
        buffer[pick] = item
    rng.shuffle(buffer)
    yield from buffer


class _ShardReader:
    """Reads member bytes by offset, keeping a few shard files open."""

    def __init__(self, shards: list[str], max_open: int = 4) -> None:
        self.shards = shards
        self.max_open = max_open
        self._files: dict[int, Any] = {}

    def read(self, shard_index: int, offset: int, size: int) -> bytes:
        f = self._files.pop(shard_index, None)
        if f is None:
            if len(self._files) >= self.max_open:
                oldest = next(iter(self._files))
                self._files.pop(oldest).close()
            f = open(self.shards[shard_index], "rb", buffering=0)
        self._files[shard_index] = f  # most recently used last
        f.seek(offset)
        return f.read(size)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class _StreamBatches(IterableDataset):
    """One epoch of a WebDataset for one rank; each DataLoader worker plays one stream.

    Batch ``j`` of the epoch belongs to stream ``j % num_streams``. DataLoader hands batches
    out round-robin starting at worker 0, so when an epoch resumes at batch ``start``, worker
    ``w`` plays stream ``(w + start) % num_streams``, keeping the order exact.
    """

    def __init__(self, source: WebDatasetSource, pipeline: _SamplePipeline, *, seed: int,
                 epoch: int, start_batch: int, rank: int, world_size: int, num_streams: int,
                 batch_size: int, train: bool, drop_last: bool, num_batches: int,
                 rank_samples: int, shuffle_buffer: int) -> None:
        self.source = source
        self.pipeline = pipeline
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.rank, self.world_size, self.num_streams = rank, world_size, num_streams
        self.batch_size, self.train, self.drop_last = batch_size, train, drop_last
        self.num_batches, self.rank_samples = num_batches, rank_samples
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = (worker + self.start_batch) % self.num_streams
        units = stream_units(
            len(self.source.shards), epoch=self.epoch, seed=self.seed, shuffle=self.train,
            slot=self.rank * self.num_streams + stream,
            num_slots=self.world_size * self.num_streams,
        )
        rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, stream,
                                        self.num_streams))
        samples = _unit_samples(self.source.shards, units, repeat=self.train,
                                shuffle=rng if self.train else None,
                                buffer_size=self.shuffle_buffer)
        reader = _ShardReader(self.source.shards)
        try:
            for size in self._batch_sizes(stream, samples):
                chunk = list(itertools.islice(samples, size))
                if not chunk or (self.drop_last and len(chunk) < size):
                    return
                yield self.pipeline.batch(self._items(chunk, reader))
        finally:
            reader.close()

    def _batch_sizes(self, stream: int, samples: Iterator[Any]) -> Iterator[int]:
        """Sizes of this stream's batches from `start_batch` on, after skipping earlier ones."""
        mine = range(stream, self.num_batches if self.train else 2**62, self.num_streams)
        size_of = lambda j: min(self.batch_size, self.rank_samples - j * self.batch_size)
        if self.train:
            consumed = sum(size_of(j) for j in mine if j < self.start_batch)
        else:  # eval streams end with the data; every earlier batch of theirs was full
            consumed = sum(self.batch_size for _ in range(stream, self.start_batch,
                                                           self.num_streams))
        for _ in itertools.islice(samples, consumed):  # headers only: no image is read
            pass
        for j in mine:
            if j >= self.start_batch:
                yield size_of(j) if self.train else self.batch_size

    def _items(self, chunk: list[tuple[int, int, int, TarSample]], reader: _ShardReader
               ) -> Iterator[Item]:
        label_key = self.source.label_key
        shards = self.source.shards
        for shard_index, position, pass_number, sample in chunk:
            index = (shard_index << 32) | position
            seed = derive_seed(self.seed, self.epoch, shard_index, position, pass_number)
            if sample.lost:
                yield index, _Lost("truncated_shard", sample.note), seed, None
                continue
            read = lambda offset, size, shard=shard_index: reader.read(shard, offset, size)
            thunk = lambda sample=sample, read=read: decode_tar_sample(sample, read, label_key)
            yield index, thunk, seed, f"{shards[shard_index]}#{sample.key}"


# ---------------------------------------------------------------------------------------


def _keep(batch: Batch) -> Batch:
    return batch


class Loader:
    """Iterable of batches for one rank; see `make_loader`.

    Iterating runs the current epoch from `batches_done` on; the next iteration starts the
    following epoch, unless `set_epoch` or `load_state_dict` says otherwise.
    """

    def __init__(self, source: Any, *, transform: Callable[..., torch.Tensor],
                 tokenizer: Tokenizer | None, batch_size: int, train: bool, seed: int = 0,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 pin_memory: bool = False, keep_empty_batches: bool = False) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size={batch_size}; expected a positive integer")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank}, world_size={world_size}; expected 0 <= rank < "
                              f"world_size")
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers}; expected >= 0")
        self.source = source
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.num_workers = num_workers
        self.rank, self.world_size = rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.shuffle_buffer = shuffle_buffer
        self.pin_memory = pin_memory
        self.keep_empty_batches = keep_empty_batches
        self.streaming = isinstance(source, WebDatasetSource)
        self.num_streams = max(1, num_workers)
        self._pipeline = _SamplePipeline(transform, tokenizer,
                                         getattr(source, "has_text", True),
                                         getattr(source, "has_labels", False))
        self._num_batches, self._rank_samples = self._count_batches()
        if self._num_batches == 0:
            raise DataError(f"{source!r}: too few samples for one batch of {batch_size} per rank "
                            f"({world_size} rank(s), drop_last={self.drop_last})")
        self.epoch = 0
        self.batches_done = 0
        self._skipped: Counter[str] = Counter()
        self._skipped_items: list[str] = []
        self._fresh = True  # nothing of the current epoch has been iterated yet
        self._resume_pending = False

    def _count_batches(self) -> tuple[int, int]:
        """(batches per epoch for this rank, samples per rank) - equal on every rank."""
        if not self.streaming:
            num_samples = len(self.source)
            if num_samples == 0:
                raise DataError(f"{self.source!r} has no records")
            per_rank = (num_samples // self.world_size if self.drop_last
                        else math.ceil(num_samples / self.world_size))
            return self._batches_of(per_rank), per_rank
        if self.train:
            per_rank = self.source.num_samples // self.world_size
            return self._batches_of(per_rank), per_rank
        if self.source.num_samples_given:  # estimate: exact counts need a scan
            per_rank = math.ceil(self.source.num_samples / self.world_size)
            return self._batches_of(per_rank), per_rank
        # eval: each stream reads its shards once; count its batches from the shard sizes
        sizes = self.source.shard_sizes
        total_batches = total_samples = 0
        for stream in range(self.num_streams):
            units = stream_units(len(sizes), epoch=0, seed=self.seed, shuffle=False,
                                 slot=self.rank * self.num_streams + stream,
                                 num_slots=self.world_size * self.num_streams)
            count = sum(_unit_count(sizes[shard], part, parts) for shard, part, parts in units)
            total_batches += self._batches_of(count)
            total_samples += count
        return total_batches, total_samples

    def _batches_of(self, num_samples: int) -> int:
        if self.drop_last:
            return num_samples // self.batch_size
        return math.ceil(num_samples / self.batch_size)

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (kept as is right after `load_state_dict`)."""
        if self._resume_pending and epoch == self.epoch:
            return
        self.epoch = epoch
        self.batches_done = 0
        self._skipped = Counter()
        self._skipped_items = []
        self._fresh = True
        self._resume_pending = False

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: epoch and batches already yielded in it, plus checks."""
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "num_batches": self._num_batches,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "num_streams": self.num_streams if self.streaming else None,
            "skipped": dict(self._skipped),
            "skipped_items": list(self._skipped_items),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration continues with the batch after `batches_done`.

        Map-style sources may resume on another world size or batch size: batch ``b`` of every
        rank covers positions ``[b * B * W, (b + 1) * B * W)`` of the epoch's permutation, so
        the samples consumed so far are a prefix of it, and any layout whose global batch
        divides that prefix continues with exactly the next samples.
        """
        missing = [key for key in ("epoch", "batches_done") if key not in state]
        if missing:
            raise DataError(f"loader state lacks {missing}; expected Loader.state_dict() output")
        batches_done = int(state["batches_done"])
        checked = ["num_batches", "batch_size", "world_size", "seed", "num_streams"]
        relayout = (not self.streaming and "batch_size" in state and "world_size" in state
                    and (state["batch_size"], state["world_size"])
                    != (self.batch_size, self.world_size))
        if relayout:
            consumed = batches_done * int(state["batch_size"]) * int(state["world_size"])
            global_batch = self.batch_size * self.world_size
            if consumed % global_batch:
                raise DataError(
                    f"cannot resume the data loader exactly: {consumed} samples of epoch "
                    f"{state['epoch']} were consumed (batch_size {state['batch_size']} x "
                    f"{state['world_size']} rank(s)), not a multiple of batch_size "
                    f"{self.batch_size} x {self.world_size} rank(s); keep the global batch "
                    "or choose one that divides it")
            batches_done = consumed // global_batch
            checked = ["seed"]
        expected = {key: value for key, value in self.state_dict().items() if key in checked}
        differ = {key: (state[key], value) for key, value in expected.items()
                  if key in state and state[key] != value}
        if differ:
            detail = ", ".join(f"{key}: saved {old}, now {new}" for key, (old, new)
                               in differ.items())
            hint = " (WebDataset streams follow num_workers)" if "num_streams" in differ else ""
            if self.streaming and {"world_size", "batch_size"} & set(differ):
                hint += (" (a WebDataset position is per rank and stream; resume it on the "
                         "same world size, batch size and workers)")
            raise DataError(f"cannot resume the data loader exactly: {detail}{hint}")
        self.epoch = int(state["epoch"])
        self.batches_done = batches_done
        self._skipped = Counter({str(k): int(v) for k, v in state.get("skipped", {}).items()})
        self._skipped_items = [str(item) for item in state.get("skipped_items", [])]
        self._fresh = False
        self._resume_pending = True

    def skipped_report(self) -> dict[str, int]:
        """Samples skipped so far in the current epoch on this rank, by reason."""
        return dict(sorted(self._skipped.items()))

    def skipped_items(self) -> list[str]:
        """What was skipped so far in the current epoch on this rank, first seen first.

        Entries read ``"<image path or key>: <reason>"`` (map-style sources),
        ``"<shard>#<sample key>: <reason>"``, or ``"<shard>: truncated_shard (N samples after
        byte X)"`` (one per damaged shard); each appears once, and at most `MAX_SKIPPED_ITEMS`
        are kept (`skipped_report` counts them all).
        """
        return list(self._skipped_items)

    def _note_skipped(self, items: list[str]) -> None:
        for item in items:
            if len(self._skipped_items) >= MAX_SKIPPED_ITEMS:
                return
            if item not in self._skipped_items:
                self._skipped_items.append(item)

    def __iter__(self) -> Iterator[Batch]:
        if self._resume_pending:
            self._resume_pending = False
        else:
            if not self._fresh:
                self.epoch += 1
            self.batches_done = 0
            self._skipped = Counter()
            self._skipped_items = []
        self._fresh = False
        if self.batches_done >= self._num_batches:
            return
        for batch in self._dataloader(self.epoch, self.batches_done):
            self._skipped.update(batch.pop(_SKIPPED_KEY))
            self._note_skipped(batch.pop(_SKIPPED_ITEMS_KEY))
            self.batches_done += 1
            if batch["pixels"].shape[0] == 0 and not self.keep_empty_batches:
                continue
            yield batch

    def _dataloader(self, epoch: int, start: int) -> DataLoader:
        options: dict[str, Any] = {
            "batch_size": None,  # datasets below produce whole batches
            "num_workers": self.num_workers,
            "collate_fn": _keep,
            "pin_memory": self.pin_memory,
            # DataLoader draws its worker base seed from here, not from the global RNG, so
            # starting an epoch leaves the trainer's random state alone
            "generator": torch.Generator().manual_seed(self.seed),
        }
        if not self.streaming:
            order = rank_indices(len(self.source), epoch=epoch, seed=self.seed,
                                 shuffle=self.train, rank=self.rank,
                                 world_size=self.world_size, drop_last=self.drop_last)
            tasks = [(epoch, order[b * self.batch_size:(b + 1) * self.batch_size].tolist())
                     for b in range(start, self._num_batches)]
            return DataLoader(_MapBatches(self.source, self._pipeline, self.seed),
                              sampler=tasks, **options)
        stream = _StreamBatches(
            self.source, self._pipeline, seed=self.seed, epoch=epoch, start_batch=start,
            rank=self.rank, world_size=self.world_size, num_streams=self.num_streams,
            batch_size=self.batch_size, train=self.train, drop_last=self.drop_last,
            num_batches=self._num_batches, rank_samples=self._rank_samples,
            shuffle_buffer=self.shuffle_buffer,
        )
        return DataLoader(stream, **options)

    def __repr__(self) -> str:
        return (f"Loader({self.source!r}, batch_size={self.batch_size}, train={self.train}, "
                f"rank={self.rank}/{self.world_size}, {self._num_batches} batches/epoch)")


def make_loader(source: Any, *, transform: Callable[..., torch.Tensor],
                tokenizer: Tokenizer | None, batch_size: int, train: bool, seed: int = 0,
                num_workers: int = 0, rank: int = 0, world_size: int = 1,
                drop_last: bool | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                pin_memory: bool = False, keep_empty_batches: bool = False) -> Loader:
    """Batches ``{"pixels", "input_ids", "labels", "index", "num_skipped"}`` of a source.

    `train` shuffles (seeded by seed and epoch) and defaults `drop_last` to True. Keys
    "input_ids" (or "texts" when `tokenizer` is None) and "labels" appear when the source has
    captions / labels. Batches whose samples were all skipped are dropped unless
    `keep_empty_batches` (they still count towards ``len`` and the resume position).
    """
    return Loader(source, transform=transform, tokenizer=tokenizer, batch_size=batch_size,
                  train=train, seed=seed, num_workers=num_workers, rank=rank,
                  world_size=world_size, drop_last=drop_last, shuffle_buffer=shuffle_buffer,
                  pin_memory=pin_memory, keep_empty_batches=keep_empty_batches)
