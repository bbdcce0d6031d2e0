"""Batches from a source: shuffle, shard across ranks and workers, decode, augment, tokenize.

Every random choice is a pure function of (seed, epoch, position), never of the worker that
happens to run it, so an epoch is reproducible and a run can resume mid-epoch with exactly the
batch an uninterrupted run would have produced next:

- map-style sources (here): the batches of an epoch are index lists fixed up front (a seeded
  permutation, split across ranks); a sample's augmentation generator is seeded by
  (seed, epoch, sample index), so it does not depend on which worker loads it.
- WebDataset (`vlp.data.stream`): each epoch, shards are shuffled and dealt to rank x stream
  slots (one stream per DataLoader worker); a stream reads its shards in a loop through a
  seeded shuffle buffer of tar headers, so resuming skips consumed samples without reading
  their data. Every rank yields the same number of batches, derived from the sample count.

Both decode and collate through `vlp.data.pipeline`. Unreadable images, missing captions and
samples lost to truncated tar shards are skipped, counted and listed (see
`Loader.skipped_report`, `Loader.skipped_items`); a batch may come out short.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vlp.data.pipeline import (
    _SKIPPED_ITEMS_KEY,
    _SKIPPED_KEY,
    MAX_SKIPPED_ITEMS,
    Batch,
    Tokenizer,
    _SamplePipeline,
    derive_seed,
)
from vlp.data.stream import DEFAULT_SHUFFLE_BUFFER, _StreamBatches, _unit_count, stream_units
from vlp.data.webdataset import WebDatasetSource
from vlp.errors import ConfigError, DataError

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
# the loader


def _keep(batch: Batch) -> Batch:
    return batch


class Loader:
    """Iterable of batches for one rank; see `make_loader`.

    Iterating runs the current epoch from `batches_done` on; the next iteration starts the
    following epoch, unless `set_epoch` or `load_state_dict` says otherwise.
    """

    def __init__(self, source: Any, *, transform: Callable[..., torch.Tensor] | None,
                 tokenizer: Tokenizer | None, batch_size: int, train: bool, seed: int = 0,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 pin_memory: bool = False, keep_empty_batches: bool = False,
                 answer_tokenizer: Tokenizer | None = None,
                 caption_prompt: str | None = None) -> None:
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
                                         source.has_text,
                                         source.has_labels,
                                         source.has_answers, answer_tokenizer,
                                         has_images=source.has_images,
                                         caption_prompt=caption_prompt)
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
            if batch["index"].numel() == 0 and not self.keep_empty_batches:
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


def make_loader(source: Any, *, transform: Callable[..., torch.Tensor] | None,
                tokenizer: Tokenizer | None, batch_size: int, train: bool, seed: int = 0,
                num_workers: int = 0, rank: int = 0, world_size: int = 1,
                drop_last: bool | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                pin_memory: bool = False, keep_empty_batches: bool = False,
                answer_tokenizer: Tokenizer | None = None,
                caption_prompt: str | None = None) -> Loader:
    """Batches ``{"pixels", "input_ids", "labels", "index", "num_skipped"}`` of a source.

    `train` shuffles (seeded by seed and epoch) and defaults `drop_last` to True. Keys
    "input_ids" (or "texts" when `tokenizer` is None) and "labels" appear when the source has
    captions / labels, with captions "image_id" (rows of one image share it); a VQA source
    (``has_answers``) gives "question_ids", "answer_ids" (every distinct answer, through
    `answer_tokenizer`, default `tokenizer`), "answer_count" and "answer_weight" instead of
    "input_ids" (`vlp.data.qa`). Batches
    whose samples were all skipped are dropped unless `keep_empty_batches` (they still count
    towards ``len`` and the resume position). A text-only source (``has_images`` False, kind
    "text") gives ``{"input_ids", "index", "num_skipped"}`` and needs no `transform`.
    `caption_prompt` goes before every caption of an image-text source (not VQA questions).
    """
    return Loader(source, transform=transform, tokenizer=tokenizer, batch_size=batch_size,
                  train=train, seed=seed, num_workers=num_workers, rank=rank,
                  world_size=world_size, drop_last=drop_last, shuffle_buffer=shuffle_buffer,
                  pin_memory=pin_memory, keep_empty_batches=keep_empty_batches,
                  answer_tokenizer=answer_tokenizer, caption_prompt=caption_prompt)
