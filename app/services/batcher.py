"""Micro-batching: concurrent requests for the same backbone share one forward pass.

A :class:`MicroBatcher` owns one worker thread. ``submit(key, item)`` queues an item and
returns a :class:`concurrent.futures.Future`; the worker takes the oldest queued item,
waits at most ``window_s`` (counted from that item's arrival) for more items with the same
key (not at all when no other item arrived within a window before it and none is queued:
at low load a window only adds latency), then runs ``run_batch(key, items)`` on up to ``max_batch`` of them and resolves each
future with its own result. Requests that arrive while a batch runs are queued and go
together into the next one, so under load nobody waits for the window at all; at low load
a request pays at most the window.

The queue is bounded: when ``max_pending`` items are waiting, ``submit`` raises
:class:`~app.errors.Unavailable` (503) at once, with a ``Retry-After`` estimated from the
recent batch times, instead of letting clients pile up until they time out. The backbone
thus runs on the worker thread, never on the event loop, and one batch at a time.

The worker thread starts with the first item and exits after ``idle_exit_s`` without work,
so a service that never predicts holds no thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from app.errors import Unavailable

log = logging.getLogger(__name__)

RunBatch = Callable[[Hashable, list[Any]], Sequence[Any]]


@dataclass
class _Pending:
    key: Hashable
    item: Any
    future: Future
    arrived: float = field(default_factory=time.monotonic)
    gap: float = float("inf")  # seconds since the item submitted before this one


@dataclass
class BatcherStats:
    """Counters for tests and benchmarks (read without the lock: approximate)."""

    batches: int = 0
    items: int = 0
    rejected: int = 0
    largest_batch: int = 0
    last_batch_s: float = 0.0


class MicroBatcher:
    """Collects items into batches and runs them on one dedicated worker thread.

    Parameters
    ----------
    run_batch : callable(key, items) -> results
        Runs on the worker thread; returns one result per item, in order. A result that is
        an exception fails that item's future alone; a raised exception fails them all.
    window_s : float
        How long the oldest queued item waits for company (0: run what is queued at once).
    max_batch : int
        Items per ``run_batch`` call at most (1 turns batching off; requests still run one
        at a time on the worker).
    max_pending : int
        Queued items at most; further ``submit`` calls raise :class:`Unavailable`.
    """

    def __init__(self, run_batch: RunBatch, *, window_s: float = 0.005, max_batch: int = 32,
                 max_pending: int = 256, name: str = "batcher", idle_exit_s: float = 30.0):
        if max_batch < 1 or max_pending < 1 or window_s < 0:
            raise ValueError("max_batch and max_pending must be at least 1 and window_s not negative")
        self.run_batch = run_batch
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self.max_pending = int(max_pending)
        self.name = name
        self.idle_exit_s = float(idle_exit_s)
        self.stats = BatcherStats()
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_arrival = float("-inf")

    # -- callers ---------------------------------------------------------------------------
    def submit(self, key: Hashable, item: Any) -> Future:
        """Queue ``item`` for a batch of ``key``; 503 (:class:`Unavailable`) when the queue is full."""
        pending = _Pending(key, item, Future())
        with self._cond:
            if self._closed:
                raise Unavailable(f"the {self.name} is shutting down", headers={"Retry-After": "1"})
            if len(self._queue) >= self.max_pending:
                self.stats.rejected += 1
                raise Unavailable(f"the server is busy with {len(self._queue)} queued inference requests; "
                                  "retry shortly", headers={"Retry-After": str(self._retry_after())})
            pending.gap = pending.arrived - self._last_arrival
            self._last_arrival = pending.arrived
            self._queue.append(pending)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name=f"pcbm-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return pending.future

    def __call__(self, key: Hashable, item: Any, timeout: float | None = None) -> Any:
        """Submit and wait for the result (from a worker thread, never on the event loop)."""
        return self.submit(key, item).result(timeout)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def close(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then stop the worker; later submits get 503."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _retry_after(self) -> int:
        batches_ahead = math.ceil(len(self._queue) / self.max_batch)
        return max(1, math.ceil(batches_ahead * self.stats.last_batch_s))

    # -- the worker ------------------------------------------------------------------------
    def _take(self) -> tuple[Hashable, list[_Pending]] | None:
        """The next batch: the oldest item's key, up to ``max_batch`` of its items (FIFO)."""
        with self._cond:
            idle_since = time.monotonic()
            while not self._queue:
                if self._closed:
                    self._thread = None
                    return None
                left = self.idle_exit_s - (time.monotonic() - idle_since)
                if left <= 0:
                    self._thread = None  # a later submit starts a new worker
                    return None
                self._cond.wait(left)
            key = self._queue[0].key
            # A lone request (none other arrived within a window before it, none queued) runs at
            # once: at low load the window would only add latency.
            lone = self._queue[0].gap > self.window_s and sum(1 for p in self._queue if p.key == key) <= 1
            deadline = self._queue[0].arrived + (0.0 if lone else self.window_s)
            while not self._closed:
                same = sum(1 for p in self._queue if p.key == key)
                left = deadline - time.monotonic()
                if same >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Pending] = []
            rest: deque[_Pending] = deque()
            for p in self._queue:
                (batch if p.key == key and len(batch) < self.max_batch else rest).append(p)
            self._queue = rest
        return key, batch

    def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            key, batch = taken
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]  # drop cancelled requests
            if not live:
                continue
            start = time.perf_counter()
            try:
                results = list(self.run_batch(key, [p.item for p in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
            except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
                for p in live:
                    p.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                for p, result in zip(live, results, strict=True):
                    if isinstance(result, BaseException):
                        p.future.set_exception(result)
                    else:
                        p.future.set_result(result)
            finally:
                stats = self.stats
                stats.last_batch_s = time.perf_counter() - start
                stats.batches += 1
                stats.items += len(live)
                stats.largest_batch = max(stats.largest_batch, len(live))


__all__ = ["BatcherStats", "MicroBatcher"]
