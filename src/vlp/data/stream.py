"""WebDataset streams: which samples each loader stream reads, in which order, and their batches.

Each epoch, shards are shuffled and dealt to rank x stream slots (one stream per DataLoader
worker); a stream reads its shards in a loop through a seeded shuffle buffer of tar headers, so
resuming skips consumed samples without reading their data. Image bytes are read only for the
samples of a batch being made. Resampled sources instead draw each stream's shards with
replacement (seeded by seed, epoch and slot; weighted by `WebDatasetSource.shard_weights`).

Shard URLs (`vlp.data.shardio`) are not seekable: their samples go through the shuffle buffer
with their bytes, and resuming reads the stream again up to the position reached (the same
samples in the same order, so a resumed run continues exactly).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from vlp.data.pipeline import Batch, Item, _Lost, _SamplePipeline, derive_seed
from vlp.data.shardio import is_stream_url
from vlp.data.webdataset import (
    TarSample,
    WebDatasetSource,
    decode_tar_sample,
    scan_shard,
    stream_shard,
)
from vlp.errors import DataError

DEFAULT_SHUFFLE_BUFFER = 2000  # tar headers held per stream (no image data)

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
        for position, sample in enumerate(_shard_headers(shards[shard_index])):
            if position % parts == part:
                yield shard_index, position, pass_number, sample


def _shard_headers(shard: str) -> Iterator[TarSample]:
    """A local shard's samples from its headers; a shard URL's with their bytes."""
    if is_stream_url(shard):
        return stream_shard(shard, strict=False)
    return scan_shard(shard, strict=False)


def resampled_shards(weights: list[float] | None, num_shards: int, *, seed: int, epoch: int,
                     slot: int) -> Iterator[int]:
    """An endless seeded draw of shard indices with replacement (uniform, or by `weights`),
    the same for the same (seed, epoch, slot)."""
    rng = random.Random(derive_seed(seed, epoch, -2, slot))
    cumulative = list(itertools.accumulate(weights)) if weights is not None else None
    population = range(num_shards)
    while True:
        yield rng.choices(population, cum_weights=cumulative)[0]


def _drawn_samples(shards: list[str], draws: Iterator[int]
                   ) -> Iterator[tuple[int, int, int, TarSample]]:
    """(shard index, position, draw number, sample) of the drawn shards, one after another;
    the draw number seeds augmentation, so a shard drawn twice is augmented afresh."""
    empty = 0
    for draw, shard_index in enumerate(draws):
        produced = 0
        for position, sample in enumerate(_shard_headers(shards[shard_index])):
            produced += 1
            yield shard_index, position, draw, sample
        empty = 0 if produced else empty + 1
        if empty > 2 * len(shards) + 100:
            raise DataError(f"WebDataset shards drawn {empty} times in a row held no samples "
                            f"(last: {shards[shard_index]}); check the shards and weights")


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
        if self.train and self.source.resampled:
            draws = resampled_shards(self.source.shard_weights, len(self.source.shards),
                                     seed=self.seed, epoch=self.epoch,
                                     slot=self.rank * self.num_streams + stream)
            samples = _shuffle_buffer(_drawn_samples(self.source.shards, draws),
                                      self.shuffle_buffer, rng)
        else:
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
                yield index, _Lost(sample.reason, sample.note), seed, None
                continue
            if sample.data is not None:  # streamed with its bytes
                read = sample.reader()
            else:
                read = lambda offset, size, shard=shard_index: reader.read(shard, offset, size)
            thunk = lambda sample=sample, read=read: decode_tar_sample(sample, read, label_key)
            yield index, thunk, seed, f"{shards[shard_index]}#{sample.key}"
