"""``MemoryStore``: the plain in-memory reference store.

Deliberately simple (a dict from id to row index over growable arrays) so that the
tiered store can be checked against it. It shares all semantics with the base class.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from recps.embedding.base import Clock, EmbeddingStore, RowBatch, StoreStats
from recps.embedding.config import TableConfig
from recps.embedding.errors import CheckpointError

_CKPT_FILE = "memory_store.npz"


class MemoryStore(EmbeddingStore):
    """Every row in RAM. Checkpoints are ``.npz`` files.

    Example:
        >>> import numpy as np
        >>> s = MemoryStore(TableConfig("t", dim=2))
        >>> s.apply_gradients(np.array([1, 1]), np.ones((2, 2), np.float32))
        1
        >>> s.stats().rows
        1
    """

    def __init__(self, config: TableConfig, clock: Clock | None = None) -> None:
        super().__init__(config, clock)
        self._index: dict[int, int] = {}
        cap = 1024
        self._ids = np.zeros(cap, dtype=np.int64)
        self._emb = np.zeros((cap, self.dim), dtype=np.dtype(config.dtype))
        self._state = np.zeros((cap, self.state_width), dtype=np.float32)
        self._updated = np.zeros(cap, dtype=np.float64)
        self._count = np.zeros(cap, dtype=np.int64)
        self._n = 0
        if config.expiry.ttl_s:
            self._start_maintenance(None)

    # ---- row bookkeeping ---------------------------------------------------------------

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        get = self._index.get
        return np.fromiter((get(i, -1) for i in ids.tolist()), dtype=np.int64, count=len(ids))

    def _grow(self, need: int) -> None:
        cap = len(self._ids)
        if need <= cap:
            return
        new = max(need, cap * 2)
        for name in ("_ids", "_emb", "_state", "_updated", "_count"):
            old = getattr(self, name)
            arr = np.zeros((new, *old.shape[1:]), dtype=old.dtype)
            arr[: self._n] = old[: self._n]
            setattr(self, name, arr)

    def _create(self, uids: np.ndarray) -> np.ndarray:
        n0, k = self._n, len(uids)
        self._grow(n0 + k)
        slots = np.arange(n0, n0 + k)
        self._ids[slots] = uids
        self._emb[slots] = self.initializer(uids)
        self._state[slots] = self.optimizer.init_state(k, self.dim)
        self._updated[slots] = self._clock()
        self._count[slots] = 0
        for i, s in zip(uids.tolist(), slots.tolist()):
            self._index[i] = s
        self._n = n0 + k
        return slots

    def _delete(self, slots: np.ndarray) -> None:
        keep = np.ones(self._n, dtype=bool)
        keep[slots] = False
        for name in ("_ids", "_emb", "_state", "_updated", "_count"):
            arr = getattr(self, name)
            kept = arr[: self._n][keep]
            arr[: len(kept)] = kept
        self._n = int(keep.sum())
        self._index = {i: s for s, i in enumerate(self._ids[: self._n].tolist())}

    # ---- storage hooks -------------------------------------------------------------------

    def _lookup(self, ids: np.ndarray, create_missing: bool) -> np.ndarray:
        slots = self._slots(ids)
        miss = slots < 0
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if miss.any():
            muids, inv = np.unique(ids[miss], return_inverse=True)
            mslots = np.full(len(muids), -1, dtype=np.int64)
            if create_missing:
                ok = self._admit_for_lookup(muids)
                mslots[ok] = self._create(muids[ok])
            slots[miss] = mslots[inv]
            missing = slots < 0
            out[missing] = self.initializer(ids[missing])
        found = slots >= 0
        self._stats.hits += int(np.count_nonzero(~miss))
        self._stats.misses += int(np.count_nonzero(miss))
        out[found] = self._emb[slots[found]]
        return out

    def _apply(self, uids: np.ndarray, gsum: np.ndarray) -> int:
        slots = self._slots(uids)
        miss = slots < 0
        if miss.any():
            ok = self._admit_for_push(uids[miss])
            created = np.full(int(miss.sum()), -1, dtype=np.int64)
            created[ok] = self._create(uids[miss][ok])
            slots[miss] = created
        live = slots >= 0
        s, g = slots[live], gsum[live]
        w = self._emb[s].astype(np.float32)
        st = self._state[s]
        steps = self._count[s] + 1
        self.optimizer.update(w, st, g, steps)
        self._emb[s] = w
        self._state[s] = st
        self._count[s] = steps
        self._updated[s] = self._clock()
        return len(s)

    def _flush(self) -> None:
        pass  # nothing is durable in memory

    def _checkpoint(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        n = self._n
        np.savez(
            directory / _CKPT_FILE,
            ids=self._ids[:n],
            emb=self._emb[:n],
            state=self._state[:n],
            updated_at=self._updated[:n],
            count=self._count[:n],
            sketch=np.frombuffer(self.admission.to_bytes(), dtype=np.uint8),
            config=np.frombuffer(json.dumps(self.config.to_dict()).encode(), dtype=np.uint8),
        )
        return directory

    def _restore(self, directory: Path) -> None:
        path = directory / _CKPT_FILE
        if not path.exists():
            raise CheckpointError(f"no MemoryStore checkpoint at {path}")
        # Read and validate everything before touching live state, so a bad checkpoint
        # leaves the store as it was.
        try:
            with np.load(path) as z:
                data = {k: z[k] for k in z.files}
            stored = json.loads(data["config"].tobytes())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"unreadable MemoryStore checkpoint at {path}: {e}") from e
        want = self.config.to_dict()
        for f in ("dim", "dtype"):
            if stored.get(f) != want[f]:
                raise CheckpointError(
                    f"checkpoint at {directory} has {f}={stored.get(f)!r}, table has {want[f]!r}"
                )
        if stored.get("optimizer", {}).get("kind") != want["optimizer"]["kind"]:
            raise CheckpointError(
                f"checkpoint at {directory} holds {stored.get('optimizer', {}).get('kind')} "
                f"optimizer state; table uses {want['optimizer']['kind']}"
            )
        n = len(data["ids"])
        if data["state"].shape != (n, self.state_width) or data["emb"].shape != (n, self.dim):
            raise CheckpointError(f"checkpoint at {directory} has inconsistent array shapes")
        self._n = 0
        self._grow(n)
        self._ids[:n], self._emb[:n], self._state[:n] = data["ids"], data["emb"], data["state"]
        self._updated[:n], self._count[:n] = data["updated_at"], data["count"]
        self.admission.load_bytes(data["sketch"].tobytes())
        self._n = n
        self._index = {i: s for s, i in enumerate(self._ids[:n].tolist())}

    def _items(self, batch_size: int) -> Iterator[RowBatch]:
        with self._lock:
            self._check_open()
            n = self._n
            order = np.argsort(self._ids[:n], kind="stable")
            snap = (
                self._ids[:n][order],
                self._emb[:n][order].astype(np.float32),
                self._state[:n][order],
                self._updated[:n][order],
                self._count[:n][order],
            )
        for i in range(0, n, batch_size):
            yield RowBatch(*(a[i : i + batch_size] for a in snap))

    def _export(self, uids: np.ndarray) -> RowBatch:
        slots = self._slots(uids)
        found = slots >= 0
        s = slots[found]
        return RowBatch(
            uids[found],
            self._emb[s].astype(np.float32),
            self._state[s].copy(),
            self._updated[s].copy(),
            self._count[s].copy(),
        )

    def _ingest(self, batch: RowBatch) -> int:
        slots = self._slots(batch.ids)
        miss = slots < 0
        if miss.any():
            slots[miss] = self._create(batch.ids[miss])
        self._emb[slots] = batch.weights
        self._state[slots] = batch.state
        self._updated[slots] = batch.updated_at
        self._count[slots] = batch.count
        return len(slots)

    def _delete_ids(self, uids: np.ndarray) -> int:
        slots = self._slots(uids)
        slots = slots[slots >= 0]
        if len(slots):
            self._delete(slots)
        return len(slots)

    def _expire(self, cutoff: float) -> np.ndarray:
        dead = np.flatnonzero(self._updated[: self._n] < cutoff)
        ids = self._ids[dead].copy()
        if len(dead):
            self._delete(dead)
        return ids

    def _fill_stats(self, stats: StoreStats) -> StoreStats:
        stats.rows = stats.rows_in_memory = self._n
        stats.memory_bytes = self._n * (self._emb.itemsize * self.dim + 4 * self.state_width + 16)
        stats.memory_bytes += self.admission.memory_bytes
        return stats

    def _close(self) -> None:
        pass
