"""Dynamic batching: concurrent requests become one model call, off the event loop.

Handlers `submit` a job (a key saying which batch function runs it and with which options, and
the item) and await its result. One worker thread owns the model: it takes the first queued job,
then gathers further jobs with the same key until it holds ``max_batch`` of them or
``max_wait_s`` has passed since the first (waiting only while more requests are on their way),
runs them as one batch, and hands each result back to
the event loop. Jobs with another key wait, in order, for the next batch. A batch function
returns one result per item; an item's result may be an exception (an unreadable image), which
is raised in that request alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlp.errors import ConfigError, VlpError

logger = logging.getLogger(__name__)

RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(Exception):
    """More jobs are waiting than the server queues."""


@dataclass
class _Job:
    key: Hashable
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0
    sizes: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "largest_batch": self.largest,
                "mean_batch": round(self.items / self.batches, 3) if self.batches else 0.0}


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the request timed out or its client went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Batcher:
    """One worker thread running ``run_batch(key, items)`` on batches of queued jobs."""

    def __init__(self, run_batch: RunBatch, *, max_batch: int = 8, max_wait_s: float = 0.005,
                 max_queue: int = 1024, arriving: Callable[[], int] | None = None) -> None:
        if max_batch < 1 or max_wait_s < 0 or max_queue < 1:
            raise ConfigError(f"vlp serve: --max-batch ({max_batch}) and --max-queue "
                              f"({max_queue}) must be >= 1, --max-wait-ms >= 0")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_s
        self.max_queue = max_queue
        # how many requests the server holds now, queued or still being read (None: unknown);
        # a batch waits for more only while some are on their way, so a lone client never
        # pays max_wait_s
        self.arriving = arriving
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending: deque[_Job] = deque()
        self._thread = threading.Thread(target=self._work, name="vlp-serve-model", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._pending)

    async def submit(self, key: Hashable, item: Any) -> Any:
        if self.waiting >= self.max_queue:
            raise QueueFull(f"{self.waiting} requests are already waiting")
        loop = asyncio.get_running_loop()
        job = _Job(key, item, loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the worker thread --------------------------------------------------------------------

    def _next(self, timeout: float | None) -> _Job | None:
        """The next job (a deferred one first); raises queue.Empty when none comes in time."""
        if timeout is not None and timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """``first`` and the jobs that join its batch; True when the worker must stop."""
        batch = [first]
        # deferred jobs with this key join first, in order
        for job in list(self._pending):
            if len(batch) == self.max_batch:
                break
            if job.key == first.key:
                self._pending.remove(job)
                batch.append(job)
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            coming = self.arriving is None or self.arriving() > len(batch) + len(self._pending)
            try:
                job = self._next(deadline - time.monotonic() if coming else 0)
            except queue.Empty:
                break
            if job is None:
                return batch, True
            if job.key == first.key:
                batch.append(job)
            else:
                self._pending.append(job)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop or self._pending:
            if self._pending:
                first = self._pending.popleft()
            else:
                first = self._queue.get()
                if first is None:
                    break
            batch, stopping = self._gather(first)
            stop = stop or stopping
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            try:
                results = list(self.run_batch(first.key, [job.item for job in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function gave {len(results)} results for "
                                       f"{len(batch)} items")
            except VlpError as error:  # the library refused the input: the requests' fault
                logger.warning("batch %r of %d refused: %s", first.key, len(batch), error)
                results = [error] * len(batch)
            except Exception as error:  # one failing batch fails its requests, not the server
                logger.exception("batch %r of %d failed", first.key, len(batch))
                results = [error] * len(batch)
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            self.stats.sizes[len(batch)] += 1
            for job, result in zip(batch, results):
                try:
                    job.loop.call_soon_threadsafe(_settle, job.future, result)
                except RuntimeError:  # the event loop is closed: the server is stopping
                    pass
