"""Merge concurrent calls into batched ones, without waiting for a batch to fill.

A ranking service calls its embedding client from several request threads at once. Each
lookup RPC has a fixed cost on both ends (gRPC, protobuf, one Python handler call, one
dedup) that is most of a 26-table lookup's CPU, and concurrent requests share their hot
ids. :class:`Coalescer` lets up to ``max_inflight`` callers at a time be *leaders*: a
leader takes every call queued so far (up to ``max_size``) and runs them as one batch.
Calls that arrive while all leaders are busy queue up and ride the next batch. A lone
call never waits: it finds a free leader slot and runs at once, so at low load nothing
changes; under load, batches grow exactly as fast as calls pile up.

Example:
    >>> co = Coalescer(lambda items: [x * 2 for x in items], max_inflight=1)
    >>> co(21)
    42
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# ``run(items)`` returns one result per item, in order: a value, or the exception that
# item's caller should see (so one bad item need not fail its batch-mates).
RunBatch = Callable[[list[T]], list["R | BaseException"]]


class _Call(Generic[T]):
    __slots__ = ("done", "error", "item", "lead", "size", "value", "wake")

    def __init__(self, item: T, size: int, lock: threading.Lock) -> None:
        self.item = item
        self.size = size
        self.wake = threading.Condition(lock)
        self.lead = False
        self.done = False
        self.value: object = None
        self.error: BaseException | None = None


class Coalescer(Generic[T, R]):
    """Callable: ``coalescer(item)`` returns what ``run([..., item, ...])`` gave for it.

    ``size(item)`` weighs an item against ``max_size`` (default: 1 each); a batch always
    holds at least one item, however large. Thread-safe; calls are taken in arrival order.
    """

    def __init__(
        self,
        run: RunBatch,
        max_inflight: int,
        max_size: int = 1 << 62,
        size: Callable[[T], int] | None = None,
    ) -> None:
        if max_inflight < 1 or max_size < 1:
            raise ValueError("max_inflight and max_size must be >= 1")
        self._run = run
        self.max_inflight = max_inflight
        self.max_size = max_size
        self._size = size
        self._lock = threading.Lock()
        self._queue: deque[_Call[T]] = deque()
        self._leaders = 0
        self.batches = 0  # how many batches ran, and how many calls they carried
        self.calls = 0

    def __call__(self, item: T) -> R:
        me = _Call(item, self._size(item) if self._size else 1, self._lock)
        with self._lock:
            self._queue.append(me)
            if self._leaders < self.max_inflight:
                self._leaders += 1
                me.lead = True
            else:
                try:
                    while not (me.done or me.lead):
                        me.wake.wait()
                except BaseException:  # interrupted while queued: leave, and lead no one
                    self._abandon(me)
                    raise
        if me.lead:
            self._lead(me)
        if me.error is not None:
            raise me.error
        return me.value  # type: ignore[return-value]

    def _lead(self, me: _Call[T]) -> None:
        """Run batches from the queue's head until ``me`` is done, then pass the lead on."""
        while True:
            with self._lock:
                if me.done:
                    self._pass_lead()
                    return
                batch = self._take()
                if not batch:  # another leader has ``me`` in flight: wait for it
                    self._leaders -= 1
                    me.lead = False
                    while not me.done:
                        me.wake.wait()
                    return
            try:
                results = self._run([c.item for c in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} got {len(results)} results")
            except BaseException as e:  # every caller of the batch sees it
                results = [e] * len(batch)
            with self._lock:
                self.batches += 1
                self.calls += len(batch)
                for c, r in zip(batch, results):
                    if isinstance(r, BaseException):
                        c.error = r
                    else:
                        c.value = r
                    c.done = True
                    c.wake.notify()

    def _abandon(self, me: _Call[T]) -> None:
        """(Lock held.) A waiting call gives up: out of the queue, and a leader slot it
        was handed goes on to the next waiting call, or nobody would lead the queue."""
        if me in self._queue:
            self._queue.remove(me)
        if me.lead:
            me.lead = False
            self._pass_lead()

    def _take(self) -> list[_Call[T]]:
        batch: list[_Call[T]] = []
        total = 0
        q = self._queue
        while q and (not batch or total + q[0].size <= self.max_size):
            c = q.popleft()
            total += c.size
            batch.append(c)
        return batch

    def _pass_lead(self) -> None:
        """Hand this leader's slot to the first queued call that is not leading (its
        thread wakes and runs batches), or give the slot up when none is waiting."""
        for c in self._queue:
            if not c.lead:
                c.lead = True
                c.wake.notify()
                return
        self._leaders -= 1
