"""Training pipeline over a :class:`ShardedEmbeddingBagCollection`: prefetch and async pushes.

``TrainPipeline`` wraps a batch iterator. A background thread reads batch ``t+1``, dedups its
ids and copies its dense part to the device while step ``t`` computes, then looks its rows
up; pushes go out asynchronously; the training loop stays plain::

    config = PipelineConfig(max_inflight_pushes=2)
    with TrainPipeline(model.embeddings, reader.epoch(0), config) as pipe:
        for step in pipe:
            logits = model(step.dense, step.sparse)
            loss = F.binary_cross_entropy_with_logits(logits, step.labels)
            opt.zero_grad()
            loss.backward()        # hands this step's row gradients to the pusher
            opt.step()
    # leaving the loop (or the block) waits until every push is applied

**Staleness contract** (``k = max_inflight_pushes``): *the lookup of step s starts only after
the pushes of every step <= s-1-k are acknowledged by the servers*, and at most ``k`` pushes
are in flight (a backward that would exceed that waits). Hence:

* ``k = 0`` - fully synchronous. Backward waits for its push ack, and the lookup of step
  ``t+1`` waits for it too, so training is bit-for-bit the same as calling the module without
  the pipeline (and as the in-process ``MemoryStore`` reference). The prefetch still hides
  reading, id dedup and host-to-device copies of step ``t+1``, plus its lookup behind
  whatever follows backward (the dense optimizer step); the lookup RPC itself is not hidden
  behind step ``t``'s forward/backward - it cannot be, since it must see step ``t``'s update.
* ``k >= 1`` - the rows of step ``s`` may miss the updates of at most the ``k`` steps before
  it (the classic bounded-staleness / SSP contract); the lookup of ``t+1`` and the push of
  ``t`` both overlap the compute of step ``t``.

A step counts as acknowledged once the trainer has moved on from it (asked for the next step)
and all pushes it made are applied; a step without backward (evaluation) needs no push.
Calling backward for a step *after* asking for the next one still pushes, but the gate no
longer waits for it.

**Errors** of the background threads (a failed lookup, a failed push, the batch iterator
raising) are re-raised in the training thread, as the original exception: a push error from
the next backward or ``next()``, a lookup error from the ``next()`` that wanted those rows.
After an error the pipeline is broken: every later call re-raises it. **Shutdown** never
hangs: every wait polls a stop flag, and ``close`` joins threads with a timeout.

**Stats** (:class:`PipelineStats`) split the trainer's wall time into waiting for rows
versus computing, and record the background time per phase, for benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from recps.embedding.errors import ConfigError, RecpsError
from recps.worker.data import Batch
from recps.worker.embedding import (
    GradPayload,
    KeyedIds,
    PulledBatch,
    ShardedEmbeddingBagCollection,
    keyed_ids,
)

__all__ = [
    "PipelineClosedError",
    "PipelineConfig",
    "PipelineStats",
    "PipelineTimeoutError",
    "Step",
    "TrainPipeline",
]

_POLL_S = 0.05  # how often blocked waits look at the stop flag and at errors


class PipelineTimeoutError(RecpsError):
    """A pipeline wait took longer than ``PipelineConfig.timeout_s``."""

    status = "DEADLINE_EXCEEDED"

    def __init__(self, what: str, waited_s: float) -> None:
        self.what, self.waited_s = what, waited_s
        super().__init__(
            f"waited {waited_s:.1f} s for {what}; are the shards up? "
            "(raise PipelineConfig.timeout_s for very slow steps)"
        )


class PipelineClosedError(RecpsError):
    """The pipeline was used after ``close``."""

    status = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class PipelineConfig:
    """How far the pipeline runs ahead of the trainer.

    Example:
        >>> PipelineConfig(max_inflight_pushes=2).prefetch_batches
        2
    """

    # Steps prepared ahead of the one being trained (read, deduped, dense on the device,
    # rows looked up as soon as the staleness bound allows). 0: everything inline.
    prefetch_batches: int = 2
    # Staleness bound k: pushes in flight, and steps whose updates a lookup may miss.
    # 0 = synchronous, bit-exact with in-process training.
    max_inflight_pushes: int = 0
    # Liveness bound of any single wait; a stuck shard becomes an error, not a hang.
    timeout_s: float = 300.0
    # How long ``close`` waits for each background thread to finish.
    join_timeout_s: float = 30.0
    # Niceness added to the prefetch and push threads (Linux, per thread; elsewhere
    # ignored). With fewer cores than runnable threads, the training thread then runs
    # first and the lookups and pushes fill the gaps: the staleness bound and the
    # prefetch queue give them the slack. 0 leaves the scheduler alone.
    background_nice: int = 0

    def __post_init__(self) -> None:
        if self.prefetch_batches < 0:
            raise ConfigError("prefetch_batches must be >= 0 (0 fetches inline)")
        if self.max_inflight_pushes < 0:
            raise ConfigError("max_inflight_pushes must be >= 0 (0 is synchronous)")
        if self.timeout_s <= 0 or self.join_timeout_s <= 0:
            raise ConfigError("timeout_s and join_timeout_s must be > 0")
        if not 0 <= self.background_nice <= 19:
            raise ConfigError("background_nice must be in [0, 19]")


@dataclass
class PipelineStats:
    """Seconds spent per phase. Trainer side: ``wait_rows_s + compute_s`` is its wall time."""

    steps: int = 0
    samples: int = 0
    wait_rows_s: float = 0.0  # trainer blocked in next(): rows (or data) not ready yet
    compute_s: float = 0.0  # trainer between steps: forward, backward, optimizer step
    push_wait_s: float = 0.0  # part of compute_s blocked on pushes (k=0: the whole push)
    data_s: float = 0.0  # background: batch iterator, dedup, dense copies
    gate_wait_s: float = 0.0  # background: lookups held back by the staleness bound
    lookup_s: float = 0.0  # background: lookup RPCs and row copies
    push_s: float = 0.0  # push RPCs (background for k >= 1, in backward for k = 0)
    elapsed_s: float = 0.0  # first step handed out -> last step finished

    def to_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["samples_per_s"] = self.samples / self.elapsed_s if self.elapsed_s else 0.0
        return d


@dataclass
class Step:
    """One training step: the raw batch, its dense part and labels on the device, its rows."""

    index: int
    batch: Batch
    dense: torch.Tensor  # float32 [B, num_dense]
    labels: torch.Tensor  # float32 [B]
    sparse: PulledBatch  # what the embedding collection (or a model) takes as its ids

    def __len__(self) -> int:
        return len(self.batch)


class _End:
    """The batch iterator is exhausted."""


@dataclass
class _Failure:
    error: BaseException


class _Stopped(Exception):
    """Internal: the pipeline is closing; a background thread should just return."""


class _Ledger:
    """Which steps are finished (moved past by the trainer, every push applied), and how
    many pushes are in flight. One condition variable guards it all."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pending: dict[int, int] = {}
        self.inflight = 0
        self.released_through = -1
        self.done_through = -1
        self.error: BaseException | None = None
        self.stopped = False

    def _advance(self) -> None:
        while (
            self.done_through < self.released_through
            and self.pending.get(self.done_through + 1, 0) == 0
        ):
            self.done_through += 1
        self.cond.notify_all()

    def submitted(self, step: int) -> None:
        with self.cond:
            self.pending[step] = self.pending.get(step, 0) + 1
            self.inflight += 1

    def acked(self, step: int) -> None:
        with self.cond:
            left = self.pending[step] - 1
            if left:
                self.pending[step] = left
            else:
                del self.pending[step]
            self.inflight -= 1
            self._advance()

    def release_through(self, step: int) -> None:
        with self.cond:
            if step > self.released_through:
                self.released_through = step
                self._advance()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def wait(self, ready: Callable[[], bool], what: str, timeout_s: float) -> float:
        """Block until ``ready()``; raises the pipeline's error, ``_Stopped`` or a timeout."""
        t0 = time.perf_counter()
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if ready():
                    return time.perf_counter() - t0
                if self.stopped:
                    raise _Stopped()
                waited = time.perf_counter() - t0
                if waited > timeout_s:
                    raise PipelineTimeoutError(what, waited)
                self.cond.wait(_POLL_S)


def _host_tensor(a: np.ndarray, device: torch.device, keep: list[Any]) -> torch.Tensor:
    t = torch.from_numpy(np.require(a, np.float32, ["C", "W"]))
    if device.type == "cuda":
        t = t.pin_memory()
        keep.append(t)
        return t.to(device, non_blocking=True)
    return t.to(device)


class TrainPipeline:
    """Prefetching, asynchronously pushing iterator of :class:`Step`; see the module docstring.

    ``ids_of`` maps a batch to the collection's :data:`KeyedIds` (default: single-id and
    jagged features of a :class:`~recps.worker.data.Batch`).

    Example:
        >>> from recps.worker.embedding import EmbeddingCollectionConfig
        >>> from recps.worker.reference import LocalRowClient
        >>> cfg = EmbeddingCollectionConfig.one_table_per_feature(["C1"], dim=2)
        >>> ebc = ShardedEmbeddingBagCollection(cfg, LocalRowClient(cfg.tables))
        >>> batches = [Batch(np.zeros(2, np.float32), np.zeros((2, 1), np.float32),
        ...                  {"C1": np.array([i, i + 1])}) for i in range(3)]
        >>> with TrainPipeline(ebc, batches, PipelineConfig(max_inflight_pushes=1)) as pipe:
        ...     for step in pipe:
        ...         ebc(step.sparse)["C1"].sum().backward()
        >>> pipe.stats.steps, ebc.stats.pushes
        (3, 3)
    """

    def __init__(
        self,
        embeddings: ShardedEmbeddingBagCollection,
        batches: Iterable[Batch],
        config: PipelineConfig | None = None,
        *,
        ids_of: Callable[[Batch], KeyedIds] = keyed_ids,
    ) -> None:
        self.embeddings = embeddings
        self.config = config or PipelineConfig()
        self.stats = PipelineStats()
        self._ids_of = ids_of
        self._batches: Iterator[Batch] = iter(batches)
        self._device = embeddings.device
        self._k = self.config.max_inflight_pushes
        self._ledger = _Ledger()
        self._stop = threading.Event()
        self._closed = False
        self._finished = False
        self._reported: BaseException | None = None  # last error raised to the trainer
        self._broken: BaseException | None = None  # a failed lookup or batch iterator
        self._next_step = 0  # index of the next step the trainer gets
        self._produced = 0  # index of the next step the producer makes
        self._handed_at: float | None = None
        self._started_at: float | None = None
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        self._queue: queue.Queue[Step | _End | _Failure] = queue.Queue(
            maxsize=max(1, self.config.prefetch_batches)
        )
        self._pushes: queue.Queue[tuple[int, dict[str, Any], Any] | None] = queue.Queue()
        self._producer: threading.Thread | None = None
        self._pusher: threading.Thread | None = None
        if self._k > 0:
            self._pusher = threading.Thread(
                target=self._push_loop, name="recps-pipeline-push", daemon=True
            )
            self._pusher.start()
        if self.config.prefetch_batches > 0:
            self._producer = threading.Thread(
                target=self._produce_loop, name="recps-pipeline-prefetch", daemon=True
            )
            self._producer.start()

    # ---- producing steps (background thread, or inline) ------------------------------

    def _make_step(self) -> Step | _End:
        t0 = time.perf_counter()
        try:
            batch = next(self._batches)
        except StopIteration:
            return _End()
        s = self._produced
        self._produced += 1
        prepared = self.embeddings.prepare(self._ids_of(batch))
        keep: list[Any] = []
        ctx = (
            torch.cuda.stream(self._stream)
            if self._stream is not None
            else contextlib.nullcontext()
        )
        with ctx:
            dense = _host_tensor(batch.dense, self._device, keep)
            labels = _host_tensor(batch.labels, self._device, keep)
        t1 = time.perf_counter()
        self.stats.data_s += t1 - t0
        # The staleness contract: step s sees every push of the steps <= s-1-k.
        need = s - 1 - self._k
        self.stats.gate_wait_s += self._ledger.wait(
            lambda: self._ledger.done_through >= need,
            f"the push of step {need} (staleness bound {self._k})",
            self.config.timeout_s,
        )
        t2 = time.perf_counter()
        pulled = self.embeddings.pull(
            prepared, step=s, on_grads=self._on_grads, stream=self._stream
        )
        pulled.keep.extend(keep)
        self.stats.lookup_s += time.perf_counter() - t2
        return Step(s, batch, dense, labels, pulled)

    def _lower_priority(self) -> None:
        """Renice the calling (background) thread by ``background_nice``."""
        nice = self.config.background_nice
        if nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            with contextlib.suppress(OSError):  # Linux renices one thread by its tid
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)

    def _produce_loop(self) -> None:
        self._lower_priority()
        try:
            while not self._stop.is_set():
                item = self._make_step()
                self._put(item)
                if isinstance(item, _End):
                    return
        except _Stopped:
            return
        except BaseException as e:  # re-raised in the training thread, in step order
            with contextlib.suppress(_Stopped):
                self._put(_Failure(e))

    def _put(self, item: Step | _End | _Failure) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped()
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    # ---- the trainer's side ----------------------------------------------------------

    def __iter__(self) -> TrainPipeline:
        return self

    def __next__(self) -> Step:
        try:
            return self._next()
        except BaseException as e:
            self._reported = e  # the trainer has seen it: close() need not raise it again
            raise

    def _next(self) -> Step:
        if self._closed:
            raise PipelineClosedError("the pipeline is closed")
        if self._finished:
            raise StopIteration
        now = time.perf_counter()
        if self._handed_at is not None:
            self.stats.compute_s += now - self._handed_at
        self._raise_if_failed()
        # The trainer is done with every step handed out so far.
        self._ledger.release_through(self._next_step - 1)
        t0 = time.perf_counter()
        item = self._get()
        if isinstance(item, _End):
            self._finish()
            raise StopIteration
        if isinstance(item, _Failure):
            self._broken = item.error
            raise item.error
        t1 = time.perf_counter()
        self.stats.wait_rows_s += t1 - t0
        if self._started_at is None:
            self._started_at = t0
        if item.sparse.ready is not None:  # dense and labels came on the same copy stream
            current = torch.cuda.current_stream(self._device)
            current.wait_event(item.sparse.ready)
            item.dense.record_stream(current)
            item.labels.record_stream(current)
        self._next_step = item.index + 1
        self.stats.steps += 1
        self.stats.samples += len(item.batch)
        self._handed_at = time.perf_counter()
        return item

    def _get(self) -> Step | _End | _Failure:
        if self._producer is None:  # inline
            try:
                return self._make_step()
            except _Stopped:
                raise PipelineClosedError("the pipeline is closed") from None
            except BaseException as e:
                self._broken = e
                raise
        t0 = time.perf_counter()
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                self._raise_if_failed()
                if not self._producer.is_alive() and self._queue.empty():
                    raise PipelineClosedError("the prefetch thread is gone") from None
                waited = time.perf_counter() - t0
                if waited > self.config.timeout_s:
                    raise PipelineTimeoutError("the next prefetched step", waited) from None

    def _raise_if_failed(self) -> None:
        if self._ledger.error is not None:
            raise self._ledger.error
        if self._broken is not None:
            raise self._broken

    def _finish(self) -> None:
        """End of data: release the last step and wait for every push to be applied."""
        self._ledger.release_through(self._next_step - 1)
        self.flush()
        self._finished = True
        if self._started_at is not None:
            self.stats.elapsed_s = time.perf_counter() - self._started_at

    def flush(self) -> None:
        """Wait until every push made so far is applied (raises a push error)."""
        try:
            self._wait_pushes()
        except BaseException as e:
            self._reported = e
            raise

    def _wait_pushes(self) -> None:
        self._ledger.wait(
            lambda: self._ledger.inflight == 0, "outstanding pushes", self.config.timeout_s
        )

    # ---- pushing -----------------------------------------------------------------------

    def _on_grads(self, step: int, grads: GradPayload) -> None:
        """Called by backward (the training thread) with this step's row gradients."""
        try:
            self._submit(step, grads)
        except BaseException as e:
            self._reported = e
            raise

    def _submit(self, step: int, grads: GradPayload) -> None:
        if self._closed:
            raise PipelineClosedError("backward after the pipeline was closed")
        self._raise_if_failed()
        t0 = time.perf_counter()
        if self._k == 0:
            self._ledger.submitted(step)
            try:
                payload = {t: (i, g.detach().cpu().numpy()) for t, (i, g) in grads.items()}
                self.embeddings.push(payload)
            except BaseException as e:
                self._ledger.fail(e)
                raise
            self._ledger.acked(step)
            dt = time.perf_counter() - t0
            self.stats.push_s += dt
            self.stats.push_wait_s += dt
            return
        # Back-pressure: at most k pushes in flight, this one included.
        self._ledger.wait(
            lambda: self._ledger.inflight < self._k,
            f"a push slot (max_inflight_pushes={self._k})",
            self.config.timeout_s,
        )
        event = None
        host: dict[str, Any] = {}
        for t, (ids, g) in grads.items():
            g = g.detach()
            if g.device.type == "cuda":
                buf = torch.empty(g.shape, dtype=g.dtype, pin_memory=True)
                buf.copy_(g, non_blocking=True)
                g = buf
            host[t] = (ids, g)
        if any(g.device.type == "cuda" for _, g in grads.values()):
            event = torch.cuda.Event()
            event.record()
        self._ledger.submitted(step)
        self._pushes.put((step, host, event))
        self.stats.push_wait_s += time.perf_counter() - t0

    def _push_loop(self) -> None:
        self._lower_priority()
        while True:
            item = self._pushes.get()
            if item is None:
                return
            step, host, event = item
            if self._ledger.error is not None:
                continue  # broken: drop the rest, the trainer sees the first error
            t0 = time.perf_counter()
            try:
                if event is not None:
                    event.synchronize()
                self.embeddings.push({t: (i, g.numpy()) for t, (i, g) in host.items()})
            except BaseException as e:
                self._ledger.fail(e)
                continue
            self.stats.push_s += time.perf_counter() - t0
            self._ledger.acked(step)

    # ---- shutdown ----------------------------------------------------------------------

    def close(self, flush: bool = True) -> None:
        """Stop the threads. ``flush`` first waits for outstanding pushes and raises the
        pipeline's error if the trainer has not seen it yet; ``flush=False`` drops queued
        pushes and raises nothing."""
        if self._closed:
            return
        error: BaseException | None = None
        if flush:
            try:
                self._wait_pushes()
            except BaseException as e:  # raised below, after the threads are stopped
                if e is not self._reported:
                    error = e
        self._closed = True
        self._stop.set()
        self._ledger.stop()
        if not flush:
            with contextlib.suppress(queue.Empty):
                while True:
                    self._pushes.get_nowait()
        self._pushes.put(None)
        with contextlib.suppress(queue.Empty):  # unblock a producer waiting on a full queue
            while True:
                self._queue.get_nowait()
        for th in (self._producer, self._pusher):
            if th is not None:
                th.join(self.config.join_timeout_s)
        if self.stats.elapsed_s == 0.0 and self._started_at is not None:
            self.stats.elapsed_s = time.perf_counter() - self._started_at
        if error is not None:
            raise error

    def __enter__(self) -> TrainPipeline:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # An exception is in flight: still apply the pushes already made (unless the user
        # interrupted), but raise nothing that would replace it.
        with contextlib.suppress(BaseException):
            self.close(flush=not issubclass(exc_type, KeyboardInterrupt))
