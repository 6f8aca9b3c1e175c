"""The serving replica's in-memory cache of hot decoded rows.

A thin, thread-safe front over the training store's :class:`HotTier`: its vectorized
open-addressing index and generalized-CLOCK eviction (a hit bumps a saturating counter,
the hand evicts rows whose counter has run down), so a Zipf head survives a stream of
one-off ids. Rows are kept decoded (float32): a hit costs a gather, never an int8/float16
decode. A serving version is immutable, so a cached row never goes stale; the cache dies
with its version.

**Several tables, one cache.** A ranking request touches ~26 tables with ~100 ids each;
per-table caches would cost 26 index probes and 26 admissions per request, and numpy's
per-call overhead, not the work, would dominate. So tables of one dim share one cache:
an entry's index key is a 64-bit mix of (table, id), and the real table and id are
stored beside the row and compared on every hit, so a (vanishingly rare) key collision
is a miss, never a wrong row. Capacity is shared: hot tables take the room they need.

**Freshness.** ``ttl_s`` bounds how long a row is served after it was admitted: an older
entry is a miss (and is refreshed by the caller's next ``admit``). The ranking service's
near cache uses it, since the replica it caches may apply deltas underneath; the
replica's own cache needs none (it drops rows a delta changes, see ``invalidate``).
With ``refresh_s`` (< ``ttl_s``) as well, :meth:`lookup_due` still answers a row older
than ``refresh_s`` but names it *due*, once, so that the caller can fetch it again in
the background before it expires (refresh-ahead: rows in steady use never expire on a
request's path, and none is ever served older than ``ttl_s``).

Example:
    >>> import numpy as np
    >>> cache = RowCache(dim=2, capacity_rows=100, tables=2)
    >>> cache.admit(np.array([7, 7]), np.array([[1, 2], [3, 4]], np.float32), np.array([0, 1]))
    >>> hit, rows = cache.lookup(np.array([7, 5]), np.array([1, 1]))
    >>> hit.tolist(), rows.tolist()
    ([True, False], [[3.0, 4.0]])
    >>> cache.stats(table=1).hits, cache.stats(table=1).misses, cache.stats(table=0).rows
    (1, 1, 1)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from recps.embedding.errors import ConfigError
from recps.embedding.hashing import GOLDEN, as_u64, mix64
from recps.embedding.hot_tier import HotTier, put_rows, take_rows

_INDEX_CELL_BYTES = 16  # HotTier's index cell, one (key, slot) pair


@dataclass(frozen=True)
class CacheStats:
    rows: int  # rows held now (of the table asked about, or all)
    capacity: int  # rows the cache can hold (shared by its tables)
    hits: int  # ids answered from the cache
    misses: int  # ids the caller had to fetch
    evictions: int  # of the whole cache
    memory_bytes: int  # of the whole cache

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _tier_bytes(dim: int, rows: int) -> int:
    """The HotTier budget that holds exactly ``rows`` rows of ``dim`` (see RowCache)."""
    row_bytes = 4 * dim + 37  # HotTier.row_bytes with no optimizer state
    index_cells = 1 << max(4, (2 * rows - 1).bit_length())
    return rows * row_bytes + index_cells * _INDEX_CELL_BYTES


def _full_bytes(dim: int, rows: int, tables: int, refresh: bool) -> int:
    if not rows:
        return 0
    rows = max(16, rows)
    # the real (table, id) of each slot when tables share it, the refresh flag
    extra = (12 if tables > 1 else 0) + (1 if refresh else 0)
    return _tier_bytes(dim, rows) + rows * extra


class RowCache:
    """Bounded cache ``(table, id) -> float32 row`` for ``tables`` tables of one dim.

    Every method takes ids unique per table; ``table`` is the table index (0 ..
    tables-1) of each id, or None for table 0. ``capacity_rows=0`` disables the cache
    (every lookup misses, nothing is kept).
    """

    def __init__(
        self,
        dim: int,
        capacity_rows: int,
        tables: int = 1,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        refresh_s: float | None = None,
    ) -> None:
        if dim < 1 or capacity_rows < 0 or tables < 1:
            raise ConfigError(
                f"cache needs dim >= 1, capacity_rows >= 0 and tables >= 1, got {dim}, "
                f"{capacity_rows}, {tables}"
            )
        if ttl_s is not None and not ttl_s > 0:
            raise ConfigError(f"cache ttl_s must be > 0 (or None: no expiry), got {ttl_s}")
        if refresh_s is not None and not (ttl_s is not None and 0 < refresh_s < ttl_s):
            raise ConfigError(f"cache refresh_s must be in (0, ttl_s), got {refresh_s}")
        self.dim, self.tables = dim, tables
        self.ttl_s, self._clock = ttl_s, clock
        self.refresh_s = refresh_s
        self._tier: HotTier | None = None
        if capacity_rows:
            # HotTier sizes itself from a byte budget (rows + a power-of-two index at load
            # <= 1/2); this budget makes its capacity exactly capacity_rows (>= 16).
            self._tier = HotTier(dim, "float32", 0, _tier_bytes(dim, capacity_rows))
        self.capacity = self._tier.capacity if self._tier is not None else 0
        # With one table the key is the id itself: exact, nothing to verify.
        self._shared = tables > 1
        with np.errstate(over="ignore"):
            self._salts = (np.arange(1, tables + 1, dtype=np.uint64) * GOLDEN) | np.uint64(1)
        cap = self.capacity if self._shared else 0
        self._ids = np.zeros(cap, dtype=np.int64)  # per slot: the real (table, id)
        self._tbl = np.zeros(cap, dtype=np.int32)
        # Per slot: already named due by lookup_due (cleared when the row is admitted again).
        self._queued = np.zeros(self.capacity if refresh_s is not None else 0, dtype=bool)
        # One lock: HotTier is not thread-safe, and a lookup's gather must not see a slot
        # that another thread's admit is evicting and refilling.
        self._lock = threading.Lock()
        self._hits = np.zeros(tables, dtype=np.int64)
        self._misses = np.zeros(tables, dtype=np.int64)
        self._rows = np.zeros(tables, dtype=np.int64)  # rows held, per table
        self._evictions = 0

    @staticmethod
    def capacity_for_bytes(dim: int, nbytes: int, tables: int = 1, refresh: bool = False) -> int:
        """The most rows a cache of ``dim`` can hold in ``nbytes`` when full: rows, index
        and per-row bookkeeping (0 if not even 16 rows fit). For sizing in bytes.

        Example:
            >>> n = RowCache.capacity_for_bytes(16, 64 << 20, tables=26)
            >>> RowCache(16, n, 26).full_bytes <= 64 << 20 < RowCache(16, n + 1, 26).full_bytes
            True
        """
        lo, hi = 0, max(0, nbytes) // (4 * dim) + 1  # hi: fits nothing (rows alone exceed)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _full_bytes(dim, mid, tables, refresh) <= nbytes:
                lo = mid
            else:
                hi = mid
        return lo if lo >= 16 else 0

    @property
    def full_bytes(self) -> int:
        """What this cache takes once every row is in use."""
        return _full_bytes(self.dim, self.capacity, self.tables, self.refresh_s is not None)

    def keys(self, ids: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
        """The index keys of (table, id) pairs: the ids themselves for a one-table cache,
        else a 64-bit mix of both. Callers may use them to deduplicate (then check the
        rare collision, see :func:`recps.serving.replica._lookup_group`) and pass them
        back to :meth:`lookup` and :meth:`admit`."""
        if not self._shared:
            return ids
        t = np.zeros(len(ids), dtype=np.intp) if table is None else table
        return mix64(as_u64(ids) ^ self._salts[t]).view(np.int64)

    _keys = keys  # what lookup/admit call: tests may override it to force collisions

    def _holds(self, slots: np.ndarray, ids: np.ndarray, table: np.ndarray | None) -> np.ndarray:
        """Whether each slot holds exactly (table, id): in a shared cache a key may be
        another pair's (a 64-bit collision); a one-table cache's key is the id itself."""
        if not self._shared:
            return np.ones(len(slots), dtype=bool)
        return (self._ids[slots] == ids) & (self._tbl[slots] == (0 if table is None else table))

    def _count(self, counter: np.ndarray, table: np.ndarray | None, mask: np.ndarray) -> None:
        if self.tables == 1 or table is None:
            counter[0] += int(np.count_nonzero(mask))
        else:
            counter += np.bincount(table[mask], minlength=self.tables)

    def lookup(
        self,
        ids: np.ndarray,
        table: np.ndarray | None = None,
        keys: np.ndarray | None = None,
        stale_ok: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(hit mask [n], rows of the hits [n_hit, dim])``; ``keys``: from :meth:`keys`.

        ``stale_ok`` also answers rows older than ``ttl_s`` (a fallback while the source is
        down); such a call counts neither hits nor misses and marks nothing as used.
        """
        hit, rows, _ = self._lookup(ids, table, keys, stale_ok, False)
        return hit, rows

    def lookup_due(
        self, ids: np.ndarray, table: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`lookup`, plus a mask [n] of the hits older than ``refresh_s`` that no
        earlier call named: the caller should fetch and :meth:`admit` them again soon. A row
        is named once per admission; one whose refresh fails simply expires."""
        hit, rows, due = self._lookup(ids, table, None, False, self.refresh_s is not None)
        return hit, rows, np.zeros(len(ids), dtype=bool) if due is None else due

    def _lookup(
        self,
        ids: np.ndarray,
        table: np.ndarray | None,
        keys: np.ndarray | None,
        stale_ok: bool,
        want_due: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(hit, rows, due); due is None when not asked for (or none can be due)."""
        tier = self._tier
        if tier is None or not len(ids):
            if not stale_ok:
                with self._lock:
                    self._count(self._misses, table, np.ones(len(ids), dtype=bool))
            return np.zeros(len(ids), dtype=bool), np.empty((0, self.dim), np.float32), None
        if keys is None:
            keys = self._keys(ids, table)
        with self._lock:
            slots = tier.find(keys)
            hit = slots >= 0
            due = None
            if self._shared or self.ttl_s is not None:
                s = np.where(hit, slots, 0)
                hit &= self._holds(s, ids, table)
                if self.ttl_s is not None and not stale_ok:  # admitted too long ago: a miss
                    age = self._clock() - tier.updated_at[s]
                    hit &= age <= self.ttl_s
                    if want_due:
                        assert self.refresh_s is not None
                        due = hit & (age >= self.refresh_s)
                        due &= ~self._queued[s]
                        self._queued[s[due]] = True
            found = slots[hit]
            rows = take_rows(tier.emb, found)
            if not stale_ok:
                tier.touch(found)
                self._count(self._hits, table, hit)
                self._count(self._misses, table, ~hit)
        return hit, rows, due

    def admit(
        self,
        ids: np.ndarray,
        rows: np.ndarray,
        table: np.ndarray | None = None,
        keys: np.ndarray | None = None,
    ) -> None:
        """Keep ``rows`` (evicting cold rows). Entries already held are skipped (another
        request may have admitted them meanwhile), except with a ``ttl_s``, where they are
        overwritten and their clock restarts (they were fetched again because they had
        expired); beyond capacity, only the first ``capacity`` are kept. ``keys`` (from
        :meth:`keys`) must be unique if given."""
        tier = self._tier
        if tier is None or not len(ids):
            return
        if len(ids) > self.capacity:
            ids, rows = ids[: self.capacity], rows[: self.capacity]
            table = None if table is None else table[: self.capacity]
            keys = None if keys is None else keys[: self.capacity]
        given = keys is not None
        if keys is None:
            keys = self._keys(ids, table)
        if self._shared and len(keys) > 1 and not given:
            # Two (table, id) pairs of this batch with one key (a 64-bit collision): keep one.
            _, first = np.unique(keys, return_index=True)
            if len(first) < len(keys):
                ids, rows, keys = ids[first], rows[first], keys[first]
                table = None if table is None else table[first]
        with self._lock:
            held = tier.find(keys)
            new = held < 0
            if not new.all():
                if self.ttl_s is not None:
                    old = np.flatnonzero(~new)
                    s = held[old]
                    # The slot may hold another pair with the same key.
                    same = self._holds(s, ids[old], None if table is None else table[old])
                    old, s = old[same], s[same]
                    put_rows(tier.emb, s, rows[old])
                    tier.updated_at[s] = self._clock()
                    if len(self._queued):
                        self._queued[s] = False
                ids, rows, keys = ids[new], rows[new], keys[new]
                table = None if table is None else table[new]
            k = len(keys)
            if not k:
                return
            short = k - tier.n_free
            if short > 0:
                victims = tier.select_victims(short)
                if self._shared:
                    self._rows -= np.bincount(self._tbl[victims], minlength=self.tables)
                else:
                    self._rows[0] -= len(victims)
                tier.remove(victims)
                self._evictions += len(victims)
            slots = tier.insert(keys)
            put_rows(tier.emb, slots, rows)
            if self.ttl_s is not None:
                tier.updated_at[slots] = self._clock()
            if len(self._queued):
                self._queued[slots] = False
            if self._shared:
                self._ids[slots] = ids
                self._tbl[slots] = 0 if table is None else table
                if table is None:
                    self._rows[0] += k
                else:
                    self._rows += np.bincount(table, minlength=self.tables)
            else:
                self._rows[0] += k

    def invalidate(self, ids: np.ndarray, table: int = 0) -> int:
        """Drop the cached rows of ``ids`` (unique) of table index ``table`` (their stored
        rows changed: an applied delta). Returns the rows dropped.

        Example:
            >>> c = RowCache(dim=2, capacity_rows=16)
            >>> c.admit(np.array([1, 2]), np.ones((2, 2), np.float32))
            >>> c.invalidate(np.array([2, 5])), c.lookup(np.array([1, 2]))[0].tolist()
            (1, [True, False])
        """
        tier = self._tier
        ids = np.asarray(ids, dtype=np.int64)
        if tier is None or not len(ids):
            return 0
        tbl = np.full(len(ids), table, dtype=np.intp)
        keys = self._keys(ids, tbl if self._shared else None)
        with self._lock:
            slots = tier.find(keys)
            hit = slots >= 0
            hit &= self._holds(np.where(hit, slots, 0), ids, tbl)
            found = slots[hit]
            if len(found):
                tier.remove(found)
                self._rows[table if self._shared else 0] -= len(found)
        return len(found)

    def stats(self, table: int | None = None) -> CacheStats:
        """Counters of one table (``rows`` counts its rows; evictions and memory are the
        whole cache's), or of all tables together."""
        with self._lock:
            tier = self._tier
            sel = slice(None) if table is None else table
            return CacheStats(
                rows=int(np.sum(self._rows[sel])),
                capacity=self.capacity,
                hits=int(np.sum(self._hits[sel])),
                misses=int(np.sum(self._misses[sel])),
                evictions=self._evictions,
                memory_bytes=(
                    tier.memory_bytes + self._ids.nbytes + self._tbl.nbytes + self._queued.nbytes
                    if tier is not None
                    else 0
                ),
            )
