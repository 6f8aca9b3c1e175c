"""The ``EmbeddingStore`` contract and the logic every store shares.

A store holds one table. Subclasses provide storage; this base provides input
validation, duplicate summing, NaN policy, admission, initialization, expiry timing
and the maintenance thread, so the reference and the tiered store cannot drift apart
on semantics.
"""

from __future__ import annotations

import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recps.embedding.admission import Admission
from recps.embedding.config import AdmissionConfig, ExpiryConfig, TableConfig
from recps.embedding.errors import (
    DimensionMismatchError,
    DtypeError,
    LengthMismatchError,
    NonFiniteGradientError,
    ShapeError,
    StoreClosedError,
)
from recps.embedding.initializers import RowInitializer
from recps.embedding.optimizers import SparseOptimizer, make_optimizer

Clock = Callable[[], float]
# Rows deleted per hold of the store lock (see EmbeddingStore.delete): ~10 ms of work.
DELETE_CHUNK_IDS = 4096


@dataclass(frozen=True)
class RowBatch:
    """A batch of stored rows, as ``items()`` yields them."""

    ids: np.ndarray  # int64 [n]
    weights: np.ndarray  # float32 [n, dim]
    state: np.ndarray  # float32 [n, state_width]
    updated_at: np.ndarray  # float64 [n], unix seconds
    count: np.ndarray  # int64 [n], updates applied

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class DurableMark:
    """Metadata that must be durable exactly when a push's rows are: written in the same
    atomic RocksDB WriteBatch as them (sync durability), with the key range ``drop``
    ([begin, end)) of older marks deleted in that batch. The PS marks each (client, seq)
    push a table applied, so a retry after a kill -9 is known as a duplicate even when
    the crash came between the rows' write and any other record of it.

    A store that applies one push in several WriteBatches (a batch larger than its hot
    tier takes at once) writes :meth:`upto` marks with all but the last: the same key,
    with the last id applied so far (ids go in sorted order). :meth:`applied_upto` reads
    a mark's value back: None for a complete push, else that id.

    Example:
        >>> m = DurableMark(b"push/a/1", drop=(b"push/a/0", b"push/a/1"))
        >>> m.key, DurableMark.applied_upto(m.value), DurableMark.applied_upto(m.upto(-7).value)
        (b'push/a/1', None, -7)
    """

    key: bytes
    value: bytes = b""
    drop: tuple[bytes, bytes] | None = None

    def upto(self, last_id: int) -> DurableMark:
        """This push's mark for a part of it: its rows of ids <= ``last_id`` are durable."""
        return DurableMark(
            self.key, _UPTO + int(last_id).to_bytes(8, "big", signed=True), self.drop
        )

    @staticmethod
    def applied_upto(value: bytes) -> int | None:
        """The last id a part-written push's mark covers; None for a complete mark."""
        if len(value) == len(_UPTO) + 8 and value.startswith(_UPTO):
            return int.from_bytes(value[len(_UPTO) :], "big", signed=True)
        return None


_UPTO = b"\x00upto:"  # a part-written push's mark value: this, then an int64 (big-endian)


@dataclass
class StoreStats:
    table: str
    rows: int = 0
    rows_in_memory: int = 0
    rows_on_disk: int = 0
    memory_bytes: int = 0
    memory_budget_bytes: int = 0
    disk_bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    writebacks: int = 0
    lookups: int = 0
    pushes: int = 0
    rows_looked_up: int = 0
    rows_updated: int = 0
    admission_rejected: int = 0  # lookups answered with an initial vector, nothing stored
    admission_dropped_grads: int = 0  # gradient rows for ids not admitted yet
    expired_rows: int = 0
    nonfinite_skipped: int = 0  # gradient rows dropped under nonfinite="skip"
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def to_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["hit_rate"] = self.hit_rate
        return d


def _group(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort order of ``ids``, the sorted ids, and a mask of each group's first row.

    When the ids span a range narrow enough to pack ``(id - min, position)`` into one
    int64, a plain ``np.sort`` of the packed keys is a stable argsort at ~3x the speed of
    ``np.argsort``. Otherwise the SIMD quicksort: not stable, but the order within a
    group (hence the float sums' rounding) is still a deterministic function of the input.
    """
    n = len(ids)
    lo, hi = int(ids.min()), int(ids.max())
    bits = (n - 1).bit_length()
    if hi - lo < 1 << (62 - bits):
        key = ids - lo
        key <<= bits
        key |= np.arange(n)
        key.sort()
        order = key & ((1 << bits) - 1)
        key >>= bits
        key += lo
        sids = key
    else:
        order = np.argsort(ids)
        sids = ids.take(order)
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(sids[1:], sids[:-1], out=first[1:])
    return order, sids, first


def unsorted_parts(flat: np.ndarray, lens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Which parts of ``flat`` (cut by ``lens``) are not strictly increasing, as a bool
    array: one comparison over the whole (not one numpy call per part), pairs that
    straddle two parts excepted.

    Example:
        >>> unsorted_parts(np.array([1, 5, 2, 3, 3]), [2, 1, 2]).tolist()
        [False, False, True]
    """
    ends = np.cumsum(lens)
    out = np.zeros(len(ends), dtype=bool)
    if len(flat) < 2:
        return out
    ok = flat[1:] > flat[:-1]  # pair (i, i+1) in order
    cross = ends[:-1] - 1  # the pair (last of a part, first of the next)
    ok[cross[(cross >= 0) & (cross < len(ok))]] = True
    out[np.searchsorted(ends, np.flatnonzero(~ok), side="right")] = True
    return out


def table_major_order(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """An order that sorts ``(table, id)`` pairs table-major, as ``np.lexsort((ids, table))``
    does, ~3x faster: a SIMD sort by id, then a stable radix sort of the table numbers as
    16-bit keys. Equal pairs may come out in any order.

    Example:
        >>> order = table_major_order(np.array([9, 4, 9, 1]), np.array([1, 1, 0, 0]))
        >>> order.tolist()
        [3, 2, 1, 0]
    """
    table = np.asarray(table)
    if len(table) and (int(table.min()) < 0 or int(table.max()) >= 1 << 15):
        return np.lexsort((ids, table))
    by_id = np.argsort(ids)
    return by_id.take(np.argsort(table.take(by_id).astype(np.int16), kind="stable"))


def unique_sum(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and the per-id sum of their gradient rows.

    Each group is summed by a pairwise tree over its rows (in sort order): the row at
    rank ``r > 0`` within its group is added, at level ``ctz(r)``, into the row at rank
    ``r - lowbit(r)``. Levels run in order, so one gather-add-scatter per level sums all
    groups at once: ``log2(largest group)`` vectorized steps, however skewed the ids (a
    Zipf batch has a few ids repeated hundreds of times), and pairwise rounding error.
    Already sorted unique ids (a client's pre-summed push) return at once, uncopied.

    Example:
        >>> u, g = unique_sum(np.array([5, 3, 5]), np.ones((3, 2), np.float32))
        >>> u.tolist(), g.tolist()
        ([3, 5], [[1.0, 1.0], [2.0, 2.0]])
    """
    n = len(ids)
    if n < 2 or bool((ids[1:] > ids[:-1]).all()):
        return ids, grads
    order, sids, first = _group(ids)
    rows = grads.take(order, axis=0)
    starts = np.flatnonzero(first)
    if len(starts) == n:
        return sids, rows
    # Rank of every row within its group: its position minus its group's start.
    at = np.arange(n)
    rank = at - np.maximum.accumulate(at * first)
    dup = np.flatnonzero(rank)
    rank = rank[dup]
    # Sort the non-first rows by level (the lowest set bit of the rank), packed with their
    # position; each is then added into the row ``lowbit`` before it. Within a level the
    # targets are distinct, so a plain gather-add-scatter is exact.
    bits = (n - 1).bit_length()
    key = rank & -rank
    key <<= bits
    key |= dup
    key.sort()
    src = key & ((1 << bits) - 1)
    key >>= bits
    dst = src - key
    bounds = np.searchsorted(key, 1 << np.arange(bits + 1)).tolist()
    # Whole rows as single opaque items: one memcpy per row for the gathers and scatter.
    items = rows.view(np.dtype((np.void, rows.shape[1] * rows.itemsize))).reshape(-1)
    for lo, hi in itertools.pairwise(bounds):
        if lo == hi:
            continue
        acc = items.take(dst[lo:hi])
        acc_rows = acc.view(rows.dtype).reshape(hi - lo, -1)
        acc_rows += items.take(src[lo:hi]).view(rows.dtype).reshape(hi - lo, -1)
        items.put(dst[lo:hi], acc)
    return sids.take(starts), rows.take(starts, axis=0)


class EmbeddingStore(ABC):
    """One table's rows: lookup, server-side optimizer updates, durability, lifecycle.

    Example:
        >>> import numpy as np
        >>> from recps.embedding import MemoryStore, TableConfig
        >>> store = MemoryStore(TableConfig("item", dim=4))
        >>> rows = store.lookup(np.array([7, 7, 9], dtype=np.int64))
        >>> rows.shape
        (3, 4)
        >>> store.apply_gradients(np.array([7], dtype=np.int64), np.ones((1, 4), np.float32))
        1
    """

    def __init__(self, config: TableConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.dim = config.dim
        self.optimizer: SparseOptimizer = make_optimizer(config.optimizer)
        self.state_width = self.optimizer.state_width(config.dim)
        self.initializer = RowInitializer(config.name, config.dim, config.initializer)
        self.admission = Admission(config.admission)
        self._clock: Clock = clock or time.time
        self._lock = threading.RLock()
        self._mark: DurableMark | None = None  # of the apply_gradients call in progress
        self._closed = False
        self._stats = StoreStats(table=config.name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sweep = self._clock()
        self._expiry_listener: Callable[[np.ndarray], None] | None = None

    # ---- public API -------------------------------------------------------------------

    def lookup(self, ids: np.ndarray, create_missing: bool = True) -> np.ndarray:
        """Rows for ``ids`` (any int64 values, duplicates allowed) as float32 [n, dim].

        Missing ids get their deterministic initial vector; with ``create_missing`` they
        are also counted for admission and stored once admitted.
        """
        ids = self._check_ids(ids)
        with self._lock:
            self._check_open()
            self._stats.lookups += 1
            self._stats.rows_looked_up += len(ids)
            return self._lookup(ids, create_missing)

    def apply_gradients(
        self, ids: np.ndarray, grads: np.ndarray, mark: DurableMark | None = None
    ) -> int:
        """Apply one gradient batch with the table's optimizer; returns rows updated.

        Duplicate ids are summed first. NaN/Inf rows raise ``NonFiniteGradientError``
        (store unchanged) unless the table says ``nonfinite="skip"``. ``mark`` is
        recorded in the same atomic write as the rows where that write is durable
        (``TieredStore`` with sync durability; see :class:`DurableMark`).
        """
        ids = self._check_ids(ids)
        grads = self._check_grads(ids, grads)
        # Summing is pure, so it runs before the lock. A NaN/Inf row makes its group's sum
        # non-finite, so one pass over the (fewer) summed rows screens the batch; only a
        # batch that fails it (or whose finite sums overflowed) gets the per-row check.
        with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf = NaN is expected
            uids, gsum = unique_sum(ids, grads)
            screened = not len(gsum) or bool(np.isfinite(gsum.sum()))
        n_bad = 0
        if not screened:
            finite = np.isfinite(grads).all(axis=1)
            n_bad = int(len(finite) - np.count_nonzero(finite))
            if n_bad and self.config.nonfinite == "reject":
                raise NonFiniteGradientError(self.config.name, n_bad)
            if n_bad:
                uids, gsum = unique_sum(ids[finite], grads[finite])
        with self._lock:
            self._check_open()
            self._stats.pushes += 1
            self._stats.nonfinite_skipped += n_bad
            self._mark = mark
            try:
                applied = self._apply(uids, gsum)
            finally:
                self._mark = None
            self._stats.rows_updated += applied
            return applied

    def marks(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """The durable marks (see :class:`DurableMark`) whose keys start with ``prefix``.
        A store that writes none (in memory, or without sync durability) has none."""
        return []

    def flush(self) -> None:
        """Make every applied update durable (in the RocksDB WAL for tiered stores)."""
        with self._lock:
            self._check_open()
            self._flush()

    def checkpoint(self, directory: str | Path) -> Path:
        """A consistent point-in-time copy of the table (weights + optimizer state)."""
        directory = Path(directory)
        with self._lock:
            self._check_open()
            return self._checkpoint(directory)

    def restore(self, directory: str | Path) -> None:
        """Replace the table's contents with a checkpoint made by ``checkpoint``."""
        with self._lock:
            self._check_open()
            self._restore(Path(directory))

    def items(self, batch_size: int = 65536) -> Iterator[RowBatch]:
        """Every stored row, in batches, sorted by id, from one consistent snapshot."""
        return self._items(batch_size)

    def scan(self, start_id: int | None = None, batch_size: int = 65536) -> Iterator[RowBatch]:
        """Like :meth:`items`, from the first id ``>= start_id`` on (resumable paging)."""
        return self._scan(start_id, batch_size)

    def export_rows(self, ids: np.ndarray) -> RowBatch:
        """Full stored rows (weights, optimizer state, ``updated_at``, ``count``) of the ids
        that have a row, sorted by id; absent ids are skipped, nothing is created.

        Example:
            >>> import numpy as np
            >>> from recps.embedding import MemoryStore, TableConfig
            >>> s = MemoryStore(TableConfig("t", dim=2))
            >>> _ = s.lookup(np.array([5]))
            >>> s.export_rows(np.array([9, 5])).ids.tolist()
            [5]
        """
        uids = np.unique(self._check_ids(ids))
        with self._lock:
            self._check_open()
            return self._export(uids)

    def ingest(self, batch: RowBatch) -> int:
        """Store full rows exactly as given, replacing any row with the same id (rows
        moving between shards keep their optimizer state and counters). Returns rows."""
        ids = self._check_ids(batch.ids)
        if len(np.unique(ids)) != len(ids):
            raise ShapeError("ingest needs unique ids")
        for name, a, width in (
            ("weights", batch.weights, self.dim),
            ("state", batch.state, self.state_width),
        ):
            if a.shape != (len(ids), width):
                raise ShapeError(f"ingest {name} must be [{len(ids)}, {width}], got {a.shape}")
        if batch.updated_at.shape != (len(ids),) or batch.count.shape != (len(ids),):
            raise ShapeError("ingest updated_at and count need one entry per id")
        with self._lock:
            self._check_open()
            return self._ingest(
                RowBatch(ids, batch.weights, batch.state, batch.updated_at, batch.count)
            )

    def delete(self, ids: np.ndarray) -> int:
        """Delete the rows of ``ids`` (absent ids are ignored); returns rows deleted.

        A large delete (a shard dropping the slots it handed over) goes in chunks of
        ``DELETE_CHUNK_IDS``, each under the store lock on its own, so lookups and pushes
        of other rows wait for one chunk, not the whole delete. Each chunk is atomic;
        the whole is not (a reader may see some of the rows gone and others not yet).

        Example:
            >>> import numpy as np
            >>> from recps.embedding import MemoryStore, TableConfig
            >>> s = MemoryStore(TableConfig("t", dim=2))
            >>> _ = s.lookup(np.array([1, 2, 3]))
            >>> s.delete(np.array([2, 9])), len(s)
            (1, 2)
        """
        uids = np.unique(self._check_ids(ids))
        n = 0
        for lo in range(0, max(len(uids), 1), DELETE_CHUNK_IDS):
            with self._lock:
                self._check_open()
                n += self._delete_ids(uids[lo : lo + DELETE_CHUNK_IDS])
        return n

    def stats(self) -> StoreStats:
        with self._lock:
            return self._fill_stats(StoreStats(**{**self._stats.__dict__, "extra": {}}))

    def expire(self, now: float | None = None) -> int:
        """Delete rows whose last update is older than the table's ``ttl_s``; returns count."""
        ttl = self.config.expiry.ttl_s
        if ttl is None:
            return 0
        with self._lock:
            self._check_open()
            now = self._clock() if now is None else now
            self._last_sweep = now
            ids = self._expire(now - ttl)
            self._stats.expired_rows += len(ids)
            listener = self._expiry_listener
            if listener is not None and len(ids):
                listener(ids)
            return len(ids)

    def set_expiry_listener(self, listener: Callable[[np.ndarray], None] | None) -> None:
        """Call ``listener(ids)`` with the ids of the rows each TTL sweep deletes (under
        the store lock: keep it quick). A training shard publishes them to serving as
        deletions."""
        self._expiry_listener = listener

    def set_admission(self, admission: AdmissionConfig) -> None:
        """Change the admission policy now. It lasts until the store is reopened: the
        config passed to the constructor is the source of truth (pass ``store.config``
        to keep a runtime change). The admission counts themselves are persisted."""
        with self._lock:
            self._check_open()
            self.config = self.config.replace(admission=admission)
            self.admission.reconfigure(admission)
            self._config_changed()

    def set_expiry(self, expiry: ExpiryConfig) -> None:
        """Change the TTL policy now; like ``set_admission``, until the next open."""
        with self._lock:
            self._check_open()
            self.config = self.config.replace(expiry=expiry)
            self._config_changed()
            if expiry.ttl_s and self._thread is None:  # built without a TTL: no sweeper yet
                self._start_maintenance(None)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if not self._closed:
                self._close()
                self._closed = True

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.stats().rows

    # ---- shared helpers -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(self.config.name)

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        if not isinstance(ids, np.ndarray):
            raise DtypeError("ids", type(ids).__name__, "a numpy int64 array")
        if ids.dtype != np.int64:
            if (ids.dtype.kind in "iu" and ids.dtype.itemsize <= 4) or ids.dtype == np.uint32:
                ids = ids.astype(np.int64)  # lossless widening
            else:
                raise DtypeError("ids", ids.dtype, "int64")
        if ids.ndim != 1:
            raise ShapeError(f"ids must be 1-D, got shape {ids.shape}")
        return np.ascontiguousarray(ids)

    def _check_grads(self, ids: np.ndarray, grads: np.ndarray) -> np.ndarray:
        if not isinstance(grads, np.ndarray):
            raise DtypeError("grads", type(grads).__name__, "a numpy float32 array")
        if grads.dtype.kind != "f":
            raise DtypeError("grads", grads.dtype, "float32 (float16/float64 are converted)")
        if grads.ndim != 2:
            raise ShapeError(f"grads must be 2-D [n, {self.dim}], got shape {grads.shape}")
        if grads.shape[1] != self.dim:
            raise DimensionMismatchError("grads", self.dim, grads.shape[1])
        if grads.shape[0] != len(ids):
            raise LengthMismatchError(len(ids), grads.shape[0])
        with np.errstate(over="ignore"):  # float64 beyond float32 range becomes inf: rejected
            return np.ascontiguousarray(grads, dtype=np.float32)

    def _admit_for_push(self, uids: np.ndarray) -> np.ndarray:
        """Gradients may create rows only for ids that lookups have already admitted."""
        ok = self.admission.admitted(uids)
        self._stats.admission_dropped_grads += int(len(ok) - np.count_nonzero(ok))
        return ok

    def _admit_for_lookup(self, uids: np.ndarray) -> np.ndarray:
        ok = self.admission.observe(uids)
        self._stats.admission_rejected += int(len(ok) - np.count_nonzero(ok))
        return ok

    def _start_maintenance(self, interval_s: float | None) -> None:
        """Background thread: periodic flush (subclass) and TTL sweeps."""
        self._maintenance_interval_s = interval_s
        self._thread = threading.Thread(
            target=self._maintenance_loop, name=f"recps-store-{self.config.name}", daemon=True
        )
        self._thread.start()

    def _maintenance_loop(self) -> None:
        while True:
            expiry = self.config.expiry
            waits = [expiry.sweep_interval_s if expiry.ttl_s else 3600.0]
            if self._maintenance_interval_s:
                waits.append(self._maintenance_interval_s)
            if self._stop.wait(min(waits)):
                return
            try:
                self._maintenance_tick()
                if expiry.ttl_s and self._clock() - self._last_sweep >= expiry.sweep_interval_s:
                    self.expire()
            except StoreClosedError:
                return

    def _maintenance_tick(self) -> None:  # noqa: B027 - optional hook
        """Periodic work of the subclass (e.g. write back dirty rows)."""

    def _config_changed(self) -> None:  # noqa: B027 - optional hook
        """Persist a runtime change of policy, where the subclass stores config."""

    # ---- storage hooks ------------------------------------------------------------------

    @abstractmethod
    def _lookup(self, ids: np.ndarray, create_missing: bool) -> np.ndarray: ...

    @abstractmethod
    def _apply(self, uids: np.ndarray, gsum: np.ndarray) -> int: ...

    @abstractmethod
    def _flush(self) -> None: ...

    @abstractmethod
    def _checkpoint(self, directory: Path) -> Path: ...

    @abstractmethod
    def _restore(self, directory: Path) -> None: ...

    @abstractmethod
    def _items(self, batch_size: int) -> Iterator[RowBatch]: ...

    @abstractmethod
    def _expire(self, cutoff: float) -> np.ndarray:
        """Delete rows last updated before ``cutoff``; their ids."""

    @abstractmethod
    def _fill_stats(self, stats: StoreStats) -> StoreStats: ...

    @abstractmethod
    def _close(self) -> None: ...

    # Row-level hooks for moving rows between shards. Not abstract, so stores that never
    # take part in a move (read-only replicas) need not implement them.

    def _scan(self, start_id: int | None, batch_size: int) -> Iterator[RowBatch]:
        for b in self._items(batch_size):
            if start_id is not None:
                keep = b.ids >= start_id
                if not keep.any():
                    continue
                b = RowBatch(
                    b.ids[keep], b.weights[keep], b.state[keep], b.updated_at[keep], b.count[keep]
                )
            yield b

    def _export(self, uids: np.ndarray) -> RowBatch:
        raise NotImplementedError(f"{type(self).__name__} cannot export rows")

    def _ingest(self, batch: RowBatch) -> int:
        raise NotImplementedError(f"{type(self).__name__} cannot ingest rows")

    def _delete_ids(self, uids: np.ndarray) -> int:
        raise NotImplementedError(f"{type(self).__name__} cannot delete rows")
