"""The in-memory hot tier: rows in flat numpy arrays behind a vectorized hash index.

* Index: open addressing with linear probing in one ``int64 [cap, 2]`` array (key,
  slot), so a probe touches one cache line; slot ``-1`` marks empty. Every operation
  probes the whole batch at once, the home cell first and then windows of ``_PROBE``
  cells, so the Python loop runs once per probe *round*, not per id. Removal leaves no
  tombstones (displaced neighbours are re-inserted), so chains never silt up.
* Rows: ``emb``, ``state``, ``updated_at``, ``count`` arrays indexed by slot, plus flag
  arrays (dirty, on_disk, pinned) and a GCLOCK reference counter for eviction.
* Eviction: generalized CLOCK. A hit bumps the row's counter (saturating at
  ``MAX_REF``); the hand sweeps a window of slots at once, decrementing counters and
  taking the zeros as victims, so frequently used rows survive scans of the Zipf tail.

The tier never touches RocksDB; :class:`TieredStore` moves rows in and out.
"""

from __future__ import annotations

import contextlib
import mmap

import numpy as np

from recps.embedding.hashing import as_u64, fast_hash

EMPTY = -1
MAX_REF = 7
_INDEX_BYTES = 16  # one (key, slot) pair
_PROBE = 8  # cells probed per id per round after the home cell (two cache lines)
_LANES = np.arange(_PROBE)
_HUGE_MIN_BYTES = 4 << 20
_HUGE_OK = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def take_rows(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``arr[idx]`` along axis 0; np.take's contiguous path is ~1.6x faster than fancy indexing."""
    return np.take(arr, idx, axis=0)


def put_rows(arr: np.ndarray, idx: np.ndarray, values: np.ndarray) -> None:
    """``arr[idx] = values`` for 2-D rows, copying each row as one opaque item."""
    if arr.ndim == 1 or arr.shape[1] == 0:
        arr[idx] = values
        return
    row = np.dtype((np.void, arr.shape[1] * arr.itemsize))
    vals = np.ascontiguousarray(values, dtype=arr.dtype)
    np.put(arr.view(row).reshape(-1), idx, vals.view(row).reshape(-1))


def zeros(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """``np.zeros`` for the large row and index arrays, backed by transparent huge pages.

    Gathers and probes hit random rows of arrays of tens or hundreds of MB: with 4 KiB
    pages nearly every row costs a TLB miss as well as a cache miss. The mapping is
    anonymous and lazy like ``np.zeros``: untouched capacity still costs no RSS (at 2 MiB
    granularity). Where huge pages are unavailable this is plain ``np.zeros``.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes < _HUGE_MIN_BYTES or not _HUGE_OK:
        return np.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP off: a plain lazy mapping, as np.zeros gives
        buf.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _next_pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


class HotTier:
    def __init__(self, dim: int, emb_dtype: str, state_width: int, budget_bytes: int) -> None:
        self.dim, self.state_width = dim, state_width
        emb_itemsize = np.dtype(emb_dtype).itemsize
        # emb + state + updated_at + count + row_id + the free-slot stack (int64 each) +
        # ref/dirty/on_disk/pinned/occupied flags: every per-row array below
        self.row_bytes = dim * emb_itemsize + 4 * state_width + 8 + 8 + 8 + 8 + 5
        cap = max(16, budget_bytes // (self.row_bytes + 2 * _INDEX_BYTES))
        icap = _next_pow2(2 * cap)  # load factor <= 0.5 keeps probe chains short
        while cap * self.row_bytes + icap * _INDEX_BYTES > budget_bytes and cap > 16:
            cap = (budget_bytes - icap * _INDEX_BYTES) // self.row_bytes
            icap = _next_pow2(2 * cap)
        self.capacity = int(cap)
        self._icap = icap
        self._shift = np.uint64(64 - (icap.bit_length() - 1))
        # Lazy mappings: pages count toward RSS only once rows are written.
        self.emb = zeros((cap, dim), emb_dtype)
        self.state = zeros((cap, state_width), np.float32)
        self.updated_at = np.zeros(cap, dtype=np.float64)
        self.count = np.zeros(cap, dtype=np.int64)
        self.row_id = np.zeros(cap, dtype=np.int64)
        self.ref = np.zeros(cap, dtype=np.uint8)
        self.dirty = np.zeros(cap, dtype=bool)
        self.on_disk = np.zeros(cap, dtype=bool)
        self.pinned = np.zeros(cap, dtype=bool)
        self.occupied = np.zeros(cap, dtype=bool)
        self._index = zeros((icap, 2), np.int64)
        self._index[:, 1] = EMPTY
        # The same memory seen as one 16-byte item per cell: a 1-D gather of (key, slot)
        # pairs is ~10x faster than fancy-indexing the 2-D array.
        self._cells = self._index.view(np.complex128).reshape(-1)
        self._free = np.arange(cap - 1, -1, -1, dtype=np.int64)  # a stack; pops from the end
        self._n_free = cap
        self._hand = 0
        self.size = 0

    # ---- index --------------------------------------------------------------------------

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return (fast_hash(as_u64(ids)) >> self._shift).astype(np.int64)

    def _window(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells ``pos .. pos+_PROBE-1`` of each position: (cell numbers, keys, slots), [m, W].

        Probing a window per round instead of one cell bounds the Python-level rounds by
        chain length / W: misses and tombstone-lengthened chains cost a few rounds, not dozens.
        """
        win = pos[:, None] + _LANES
        win &= self._icap - 1
        e = self._cells.take(win).view(np.int64).reshape(len(pos), _PROBE, 2)
        return win, e[:, :, 0], e[:, :, 1]

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell and slot of each id, or (-1, -1) where absent. Duplicates are fine."""
        pos = self._home(ids)
        # First round, one cell each: most ids sit in their home cell.
        entries = self._cells.take(pos).view(np.int64).reshape(-1, 2)
        slots = entries[:, 1].copy()
        hit = slots >= 0
        hit &= entries[:, 0] == ids
        cells = np.where(hit, pos, -1)
        pending = np.flatnonzero(~hit & (slots != EMPTY))
        slots[~hit] = EMPTY
        pos += 1
        while len(pending):
            win, keys, sl = self._window(pos[pending])
            match = (sl >= 0) & (keys == ids[pending, None])
            stop = match | (sl == EMPTY)  # a key never lies beyond an empty cell
            ended = stop.any(axis=1)
            j = stop.argmax(axis=1)
            rows = np.arange(len(pending))
            found = match[rows, j] & ended
            done = pending[found]
            slots[done] = sl[rows, j][found]
            cells[done] = win[rows, j][found]
            left = ~ended
            pending = pending[left]
            pos[pending] += _PROBE
        return cells, slots

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each id, or -1. Duplicates are fine."""
        return self._locate(ids)[1]

    def _index_insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Insert ids known to be absent and unique."""
        pos = self._home(ids)
        pending = np.arange(len(ids))
        keycol, slotcol = self._index[:, 0], self._index[:, 1]
        while len(pending):
            win, _, sl = self._window(pos[pending])
            free = sl < 0
            has = free.any(axis=1)
            j = free.argmax(axis=1)
            rows = np.flatnonzero(has)
            cand = pending[rows]
            target = win[rows, j[rows]]
            # Two ids may want the same free cell: write every key, read back, and the id
            # whose key stuck has won it (ids are unique, so exactly one per cell).
            keycol[target] = ids[cand]
            won = keycol[target] == ids[cand]
            slotcol[target[won]] = slots[cand[won]]
            # Losers go on from just past the cell they lost; windows with no free cell
            # move on by a whole window.
            pos[cand] = target + 1
            pos[pending[~has]] += _PROBE
            keep = ~has
            keep[rows[won]] = False
            keep[rows[~won]] = True
            pending = pending[keep]
            pos[pending] &= self._icap - 1

    def _index_remove(self, ids: np.ndarray) -> None:
        """Delete ids the index holds, leaving no tombstones behind.

        Tombstones would lengthen every later probe chain (a miss must walk past them) and
        need periodic rebuilds. Instead the freed cells are emptied, and the entries of the
        run of occupied cells after each one that sit away from their home cell, the only
        ones whose probe path can have crossed it, are taken out and inserted again. At
        load <= 1/2 that is well under one entry per removal.
        """
        if not len(ids):
            return
        cells, _ = self._locate(ids)
        assert (cells >= 0).all(), "removing an id the index does not hold"
        slotcol = self._index[:, 1]
        slotcol[cells] = EMPTY
        # Emptying every freed cell first makes the runs after them disjoint.
        moved: list[np.ndarray] = []
        pos = cells + 1
        while len(pos):
            win, _, sl = self._window(pos)
            empty = sl == EMPTY
            ended = empty.any(axis=1)
            run = np.where(ended, empty.argmax(axis=1), _PROBE)
            moved.append(win[run[:, None] > _LANES])
            pos = pos[~ended] + _PROBE
        cells_moved = np.concatenate(moved)
        if len(cells_moved):
            entries = self._cells.take(cells_moved).view(np.int64).reshape(-1, 2)
            keys = entries[:, 0].copy()
            # An entry in its home cell never crossed a freed cell: it stays.
            away = self._home(keys) != cells_moved
            cells_moved = cells_moved[away]
            slotcol[cells_moved] = EMPTY
            self._index_insert(keys[away], entries[away, 1])

    # ---- rows ---------------------------------------------------------------------------

    @property
    def n_free(self) -> int:
        return self._n_free

    def insert(self, ids: np.ndarray) -> np.ndarray:
        """Allocate slots for absent unique ids; the caller fills the row arrays."""
        k = len(ids)
        assert k <= self._n_free, "caller must evict before inserting"
        slots = self._free[self._n_free - k : self._n_free][::-1].copy()
        self._n_free -= k
        self.row_id[slots] = ids
        self.occupied[slots] = True
        self.ref[slots] = 1
        self.dirty[slots] = False
        self.on_disk[slots] = False
        self._index_insert(ids, slots)
        self.size += k
        return slots

    def remove(self, slots: np.ndarray) -> None:
        if not len(slots):
            return
        self._index_remove(self.row_id[slots])
        self.occupied[slots] = False
        self.dirty[slots] = False
        self.ref[slots] = 0
        k = len(slots)
        self._free[self._n_free : self._n_free + k] = slots
        self._n_free += k
        self.size -= k

    def touch(self, slots: np.ndarray) -> None:
        r = self.ref[slots]
        np.minimum(r + 1, MAX_REF, out=r)
        self.ref[slots] = r

    def select_victims(self, k: int) -> np.ndarray:
        """Choose ``k`` occupied, unpinned slots by GCLOCK; decrements counters it passes."""
        cap = self.capacity
        victims: list[np.ndarray] = []
        need = k
        window = max(4 * k, 4096)
        passes = 0
        while need > 0:
            start = self._hand
            idx = (np.arange(start, start + window) % cap) if window < cap else np.arange(cap)
            if window >= cap:
                idx = np.roll(idx, -start)
            r = self.ref[idx]
            eligible = self.occupied[idx] & ~self.pinned[idx]
            cand = np.flatnonzero(eligible & (r == 0))
            if len(cand) >= need:
                stop = cand[need - 1] + 1  # the hand stops just past the last victim
                chosen = idx[cand[:need]]
                passed = idx[:stop]
                need = 0
            else:
                stop = len(idx)
                chosen = idx[cand]
                passed = idx
                need -= len(cand)
            dec = passed[self.ref[passed] > 0]
            self.ref[dec] -= 1
            self.pinned[chosen] = True  # a later pass of this call must not pick it again
            victims.append(chosen)
            self._hand = int((start + stop) % cap)
            passes += 1
            if passes > 4 * (MAX_REF + 2) * max(1, cap // window):
                raise AssertionError("GCLOCK found too few unpinned rows; batch exceeds capacity")
        out = np.concatenate(victims) if victims else np.empty(0, dtype=np.int64)
        self.pinned[out] = False
        return out

    @property
    def memory_bytes(self) -> int:
        return self.size * self.row_bytes + self._icap * _INDEX_BYTES
