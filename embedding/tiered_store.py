"""``TieredStore``: a bounded in-memory hot tier over a RocksDB table on local disk.

Layout of ``path``::

    path/ACTIVE         name of the live RocksDB generation (switched atomically)
    path/gen-000001/    RocksDB: column family <table> (rows) + __recps_meta__

``restore`` copies a checkpoint into a fresh generation directory and flips ACTIVE,
so a crash mid-restore leaves the previous generation intact.

Durability:
    * ``async``: dirty rows reach the WAL on ``flush()``, on eviction, and every
      ``flush_interval_ms`` from a background thread.
    * ``sync``: each ``apply_gradients`` writes its updated rows to the WAL before it
      returns.
Either way a row's embedding, optimizer state, timestamp and count travel in one
value of one WriteBatch, so they can never be torn apart (the DeepRec #1023 class of
bug, where weights and slots were saved at different instants, cannot occur).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from recps.embedding.base import Clock, DurableMark, EmbeddingStore, RowBatch, StoreStats
from recps.embedding.config import TableConfig, TieredStoreConfig
from recps.embedding.errors import CheckpointError, ConfigError, RecpsError
from recps.embedding.hot_tier import HotTier, put_rows, take_rows
from recps.embedding.rocks import RocksTable
from recps.embedding.rowcodec import RowCodec, decode_keys, encode_keys

_ACTIVE = "ACTIVE"
_MANIFEST = "manifest.json"
_FORMAT = 1
_WRITE_CHUNK = 65536
# Background write-back packs this many rows under the store lock, then writes them
# with the lock released, so training keeps running while RocksDB works.
_BACKGROUND_CHUNK = 8192
_PRE_SCAN_CHUNKS = 64  # at most this many chunks written back before a scan's final flush
# Fields that fix the stored row layout; changing them needs a migration, not a reopen.
_LAYOUT_FIELDS = ("dim", "dtype")


def _i64(n: int) -> bytes:
    return int(n).to_bytes(8, "little", signed=True)


class TieredStore(EmbeddingStore):
    """A table far larger than RAM: hot rows in numpy arrays, the rest in RocksDB.

    Example:
        >>> import numpy as np, tempfile
        >>> from recps.embedding import TableConfig, TieredStore, TieredStoreConfig
        >>> d = tempfile.mkdtemp()
        >>> cfg = TieredStoreConfig(memory_budget_bytes=1 << 20)
        >>> s = TieredStore(d, TableConfig("ads", dim=8), cfg)
        >>> s.lookup(np.arange(10_000)).shape
        (10000, 8)
        >>> s.close()
    """

    def __init__(
        self,
        path: str | Path,
        config: TableConfig,
        store_config: TieredStoreConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(config, clock)
        self._write_lock = threading.Lock()
        # Admission decided for a whole chunked lookup (see _admit_absent), else None.
        self._pre_admitted: np.ndarray | None = None
        self.path = Path(path)
        self.store_config = store_config or TieredStoreConfig()
        self.codec = RowCodec(config.dim, config.dtype, self.state_width)
        self._open_generation(self._active_generation())
        interval = self.store_config.flush_interval_ms / 1000.0
        self._start_maintenance(interval)

    # ---- lifecycle ------------------------------------------------------------------------

    def _active_generation(self) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        active = self.path / _ACTIVE
        if active.exists():
            return active.read_text().strip()
        self._set_active("gen-000000")
        return "gen-000000"

    def _set_active(self, gen: str) -> None:
        tmp = self.path / (_ACTIVE + ".tmp")
        with open(tmp, "w") as f:
            f.write(gen)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / _ACTIVE)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _open_generation(self, gen: str) -> None:
        rocks = RocksTable(self.path / gen, self.config.name, self.store_config)
        try:
            self._check_layout(rocks.get_meta(b"config"), ConfigError)
        except BaseException:
            rocks.close()  # a held LOCK would block the next, correct, open
            raise
        self._gen = gen
        self._rocks = rocks
        raw = self._rocks.get_meta(b"rows")
        self._disk_rows = int.from_bytes(raw, "little", signed=True) if raw else 0
        self.admission.load_bytes(self._rocks.get_meta(b"sketch") or b"")
        self._hot = HotTier(
            self.config.dim,
            self.config.dtype,
            self.state_width,
            self.store_config.memory_budget_bytes,
        )
        self._chunk = max(1, self._hot.capacity // 2)
        self._rocks_write(meta=self._meta_config())

    def _check_layout(
        self, raw: bytes | None, error: type[RecpsError], where: Path | None = None
    ) -> None:
        """Refuse stored rows whose layout (dim, dtype, optimizer state) differs from ours."""
        if not raw:
            return
        where = where or self.path
        stored = json.loads(raw)
        want = self.config.to_dict()
        for f in _LAYOUT_FIELDS:
            if stored.get(f) != want[f]:
                raise error(
                    f"table {self.config.name!r} at {where} was created with "
                    f"{f}={stored.get(f)!r}, not {want[f]!r}; use a new path or migrate"
                )
        kind = stored.get("optimizer", {}).get("kind")
        if kind != want["optimizer"]["kind"]:
            raise error(
                f"table {self.config.name!r} at {where} stores {kind} optimizer "
                f"state; opening it with {want['optimizer']['kind']} would misread it"
            )

    def _meta_config(self) -> dict[bytes, bytes]:
        return {
            b"config": json.dumps(self.config.to_dict()).encode(),
            b"format": _i64(_FORMAT),
        }

    def _config_changed(self) -> None:
        self._rocks_write(meta=self._meta_config())

    def _rocks_write(self, *args: object, **kwargs: object) -> None:
        """Every RocksDB write goes through the write lock, which orders it after any
        background write-back in flight. Lock order: store lock, then write lock."""
        with self._write_lock:
            self._rocks.write(*args, **kwargs)  # type: ignore[arg-type]

    def _close(self) -> None:
        self._flush()
        self._rocks_write(meta={b"sketch": self.admission.to_bytes(), **self._meta_config()})
        self._rocks.close()

    def _maintenance_tick(self) -> None:
        """Write back dirty rows in chunks without holding the store lock during I/O.

        A chunk is packed and marked clean under the store lock, with the write lock
        taken before the store lock is released: any later write of the same rows
        (eviction, flush, sync push) waits for this one, so RocksDB never sees an older
        value land after a newer one.
        """
        while not self._stop.is_set():
            if not self._write_back_chunk(0):
                return

    def _write_back_chunk(self, leave: int) -> bool:
        """Write back one chunk of dirty rows as the maintenance thread does (packed
        under the store lock, written with it released); False, writing nothing, when at
        most ``leave`` rows are dirty."""
        with self._lock:
            self._check_open()
            dirty = np.flatnonzero(self._hot.dirty)
            if len(dirty) <= leave:
                return False
            dirty = dirty[:_BACKGROUND_CHUNK]
            self._write_lock.acquire()
            try:
                batch = self._pack_rows(dirty)
            except BaseException:
                self._write_lock.release()
                raise
        try:
            self._rocks.write(*batch[:3], meta=batch[3])
        except BaseException:
            with self._lock:  # nothing reached disk: the rows are dirty again
                self._hot.dirty[dirty] = True
            raise
        finally:
            self._write_lock.release()
        return True

    def _write_back_before_scan(self) -> None:
        """Most of the flush a scan needs, done the background way, so the flush under
        the store lock that takes the scan's snapshot is short and lookups and pushes
        wait for one chunk at a time, not the whole write-back. Bounded: under a steady
        push load new rows keep turning dirty, and the final flush takes the rest."""
        for _ in range(_PRE_SCAN_CHUNKS):
            if not self._write_back_chunk(_BACKGROUND_CHUNK):
                return

    # ---- moving rows between tiers -------------------------------------------------------

    def _pack_rows(
        self,
        slots: np.ndarray,
        deletes: list[bytes] = (),  # type: ignore[assignment]
    ) -> tuple[list[bytes], list[bytes], list[bytes], dict[bytes, bytes]]:
        """Encode hot rows for one WriteBatch and mark them clean (caller writes it)."""
        hot = self._hot
        new = int(np.count_nonzero(~hot.on_disk[slots]))
        keys = encode_keys(hot.row_id[slots])
        vals = self.codec.pack(
            hot.emb[slots], hot.state[slots], hot.updated_at[slots], hot.count[slots]
        )
        self._disk_rows += new - len(deletes)
        hot.dirty[slots] = False
        hot.on_disk[slots] = True
        self._stats.writebacks += len(slots)
        return keys, vals, list(deletes), {b"rows": _i64(self._disk_rows)}

    def _write_rows(
        self,
        slots: np.ndarray,
        deletes: list[bytes] = (),  # type: ignore[assignment]
        mark: DurableMark | None = None,
    ) -> None:
        """Write hot rows (and optional deletions, and a push's durable mark) in one WAL
        batch; marks them clean."""
        with self._write_lock:
            keys, vals, dels, meta = self._pack_rows(slots, deletes)
            drop = None
            if mark is not None:
                meta[mark.key] = mark.value
                drop = mark.drop
            self._rocks.write(keys, vals, dels, meta=meta, meta_drop=drop)

    def _evict(self, victims: np.ndarray) -> None:
        dirty = victims[self._hot.dirty[victims]]
        for i in range(0, len(dirty), _WRITE_CHUNK):
            self._write_rows(dirty[i : i + _WRITE_CHUNK])
        self._hot.remove(victims)
        self._stats.evictions += len(victims)

    def _make_room(self, k: int, pinned: np.ndarray) -> None:
        """Evict until ``k`` slots are free, never a row of the batch being served."""
        hot = self._hot
        if hot.n_free >= k:
            return
        hot.pinned[pinned] = True
        try:
            self._evict(hot.select_victims(k - hot.n_free))
        finally:
            hot.pinned[pinned] = False

    def _admit_absent(self, uids: np.ndarray) -> np.ndarray:
        """Count one sighting of every id of ``uids`` stored in neither tier; return those
        now admitted.

        A lookup larger than a chunk must count all its missing ids before any estimate,
        as MemoryStore does: counting chunk by chunk would let sketch collisions with the
        ids of earlier chunks admit different ids.
        """
        absent = uids[self._hot.find(uids) < 0]
        if len(absent) and self._disk_rows > 0:
            self._await_write_back()
            vals = np.array(self._rocks.multi_get(encode_keys(absent)), dtype=object)
            absent = absent[np.equal(vals, None)]
        return absent[self._admit_for_lookup(absent)]

    def _bring_in(self, uids: np.ndarray, pinned: np.ndarray, mode: str) -> np.ndarray:
        """Load or create rows for unique ids absent from the hot tier.

        ``mode``: "create" (lookup that may admit), "peek" (lookup, never create),
        "push" (gradient; creates only admitted ids). Returns slots, -1 where no row.
        """
        n = len(uids)
        hot = self._hot
        found = np.zeros(n, dtype=bool)
        recs = None
        if self._disk_rows > 0:
            self._await_write_back()  # an evicted row may be in it, not yet in RocksDB
            vals = self._rocks.multi_get(encode_keys(uids))
            if None in vals:  # C-level scans, no per-key Python loop
                found = np.not_equal(np.array(vals, dtype=object), None)
                vals = list(itertools.compress(vals, found))
            else:
                found = np.ones(n, dtype=bool)
            if vals:
                recs = self.codec.unpack(vals)
        create = np.zeros(n, dtype=bool)
        absent = np.flatnonzero(~found)
        if len(absent) and mode != "peek":
            if mode == "create" and self._pre_admitted is not None:
                create[absent] = np.isin(uids[absent], self._pre_admitted, assume_unique=True)
            else:
                admit = self._admit_for_lookup if mode == "create" else self._admit_for_push
                create[absent] = admit(uids[absent])
        bring = found | create
        k = int(np.count_nonzero(bring))
        out = np.full(n, -1, dtype=np.int64)
        if k == 0:
            return out
        self._make_room(k, pinned)
        slots = hot.insert(uids[bring])
        out[bring] = slots
        if recs is not None:
            fs = out[found]
            hot.emb[fs] = recs["emb"]
            hot.state[fs] = recs["state"]
            hot.updated_at[fs] = recs["updated_at"]
            hot.count[fs] = recs["count"]
            hot.on_disk[fs] = True
        if create.any():
            cs = out[create]
            hot.emb[cs] = self.initializer(uids[create])
            hot.state[cs] = self.optimizer.init_state(len(cs), self.dim)
            hot.updated_at[cs] = self._clock()
            hot.count[cs] = 0
            hot.dirty[cs] = True
        return out

    def _chunked(self, fn: Callable[..., np.ndarray], ids: np.ndarray, *rest: np.ndarray) -> list:
        c = self._chunk
        return [fn(ids[i : i + c], *(r[i : i + c] for r in rest)) for i in range(0, len(ids), c)]

    # ---- storage hooks ---------------------------------------------------------------------

    def _lookup(self, ids: np.ndarray, create_missing: bool) -> np.ndarray:
        if len(ids) > self._chunk:
            # Deduplicate before chunking: an id in two chunks would count twice for admission.
            uids, inv = np.unique(ids, return_inverse=True)
            if len(uids) > self._chunk:
                if create_missing and self.config.admission.enabled:
                    self._pre_admitted = self._admit_absent(uids)
                try:
                    parts = self._chunked(lambda x: self._lookup(x, create_missing), uids)
                finally:
                    self._pre_admitted = None
                return np.concatenate(parts).take(inv, axis=0)
            return self._lookup(uids, create_missing).take(inv, axis=0)
        hot = self._hot
        slots = hot.find(ids)
        miss = slots < 0
        nmiss = int(np.count_nonzero(miss))
        if nmiss:
            muids, inv = np.unique(ids[miss], return_inverse=True)
            got = self._bring_in(muids, slots[~miss], "create" if create_missing else "peek")
            slots[miss] = got[inv]
        self._stats.hits += len(ids) - nmiss
        self._stats.misses += nmiss
        if nmiss and (slots < 0).any():
            none = slots < 0
            out = np.empty((len(ids), self.dim), dtype=np.float32)
            out[none] = self.initializer(ids[none])
            live = ~none
            hot.touch(slots[live])
            out[live] = hot.emb[slots[live]]
            return out
        hot.touch(slots)
        out = take_rows(hot.emb, slots)
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def _apply(self, uids: np.ndarray, gsum: np.ndarray) -> int:
        if len(uids) > self._chunk:
            # One WriteBatch per chunk, in id order. Each but the last carries the push's
            # mark "applied up to its last id", so a retry after a kill -9 between two
            # chunks knows where to resume; the last carries the complete mark.
            mark = self._mark
            c = self._chunk
            head = len(uids) - c
            n = 0
            try:
                for lo in range(0, head, c):
                    hi = min(lo + c, head)
                    self._mark = None if mark is None else mark.upto(int(uids[hi - 1]))
                    n += self._apply(uids[lo:hi], gsum[lo:hi])
            finally:
                self._mark = mark
            return n + self._apply(uids[head:], gsum[head:])
        hot = self._hot
        slots = hot.find(uids)
        miss = slots < 0
        if miss.any():
            slots[miss] = self._bring_in(uids[miss], slots[~miss], "push")
            live = slots >= 0
            slots, gsum = slots[live], gsum[live]
        w = take_rows(hot.emb, slots)
        if w.dtype != np.float32:
            w = w.astype(np.float32)
        st = take_rows(hot.state, slots)
        steps = hot.count[slots] + 1
        self.optimizer.update(w, st, gsum, steps)
        put_rows(hot.emb, slots, w)
        put_rows(hot.state, slots, st)
        hot.count[slots] = steps
        hot.updated_at[slots] = self._clock()
        hot.dirty[slots] = True
        if self.store_config.durability == "sync":
            self._write_rows(slots, mark=self._mark)
        return len(slots)

    def _await_write_back(self) -> None:
        """Wait for a background write-back in flight: its rows are already marked clean
        (and may be evicted) but are not in RocksDB until it lands. Call with the store lock
        held, so no new one can start."""
        with self._write_lock:
            pass

    def _flush(self) -> None:
        self._await_write_back()  # flush() promises durability for rows it already took
        dirty = np.flatnonzero(self._hot.dirty)
        for i in range(0, len(dirty), _WRITE_CHUNK):
            self._write_rows(dirty[i : i + _WRITE_CHUNK])

    def _checkpoint(self, directory: Path) -> Path:
        if directory.exists() and any(directory.iterdir()):
            raise CheckpointError(f"checkpoint directory {directory} is not empty")
        self._flush()
        self._rocks_write(meta={b"sketch": self.admission.to_bytes(), **self._meta_config()})
        with self._write_lock:
            self._rocks.checkpoint(directory / "rocksdb")
        manifest = {
            "format": _FORMAT,
            "kind": "tiered",
            "table": self.config.to_dict(),
            "rows": self._disk_rows,
            "created_at": time.time(),
        }
        (directory / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        return directory

    def _restore(self, directory: Path) -> None:
        manifest_path = directory / _MANIFEST
        data = directory / "rocksdb"
        if not manifest_path.exists() or not (data / "CURRENT").is_file():
            raise CheckpointError(f"{directory} is not a TieredStore checkpoint")
        try:
            manifest = json.loads(manifest_path.read_text())
            stored = manifest["table"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"unreadable checkpoint manifest in {directory}: {e}") from e
        self._check_layout(json.dumps(stored).encode(), CheckpointError, directory)
        n = int(self._gen.split("-")[1]) + 1
        new_gen = f"gen-{n:06d}"
        target = self.path / new_gen
        if target.exists():
            shutil.rmtree(target)
        RocksTable.copy_dir(data, target)
        # Open the copy before giving up the live generation: a checkpoint whose files or
        # stored config do not match must leave the store exactly as it was.
        try:
            probe = RocksTable(target, self.config.name, self.store_config)
            try:
                self._check_layout(probe.get_meta(b"config"), CheckpointError, directory)
                if probe.get_meta(b"config") is None:
                    raise CheckpointError(f"checkpoint {directory} holds no table data")
            finally:
                probe.close()
        except RecpsError as e:
            shutil.rmtree(target, ignore_errors=True)
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"cannot open checkpoint {directory}: {e}") from e
        old = self._gen
        with self._write_lock:  # let a background write-back in flight finish first
            self._rocks.close()
        self._set_active(new_gen)
        self._open_generation(new_gen)
        shutil.rmtree(self.path / old, ignore_errors=True)

    def _items(self, batch_size: int) -> Iterator[RowBatch]:
        return self._scan(None, batch_size)

    def _scan(self, start_id: int | None, batch_size: int) -> Iterator[RowBatch]:
        start = None if start_id is None else encode_keys(np.array([start_id], np.int64))[0]
        self._write_back_before_scan()
        with self._lock:
            self._check_open()
            self._flush()
            batches = self._rocks.iter_rows(batch_size, start)
            first = next(batches, None)  # the snapshot is taken here, under the lock
        if first is None:
            return
        for keys, vals in _chain(first, batches):
            rec = self.codec.unpack(vals)
            yield RowBatch(
                ids=decode_keys(keys),
                weights=rec["emb"].astype(np.float32),
                state=rec["state"].copy(),
                updated_at=rec["updated_at"].copy(),
                count=rec["count"].copy(),
            )

    def _export(self, uids: np.ndarray) -> RowBatch:
        hot = self._hot
        slots = hot.find(uids)
        inmem = slots >= 0
        s = slots[inmem]
        parts = [
            (
                uids[inmem],
                hot.emb[s].astype(np.float32),
                hot.state[s].copy(),
                hot.updated_at[s].copy(),
                hot.count[s].copy(),
            )
        ]
        rest = uids[~inmem]
        if len(rest) and self._disk_rows > 0:
            self._await_write_back()  # an evicted row may be in it, not yet in RocksDB
            vals = np.array(self._rocks.multi_get(encode_keys(rest)), dtype=object)
            found = np.not_equal(vals, None)
            if found.any():
                rec = self.codec.unpack(vals[found].tolist())
                parts.append(
                    (
                        rest[found],
                        rec["emb"].astype(np.float32),
                        rec["state"].copy(),
                        rec["updated_at"].copy(),
                        rec["count"].copy(),
                    )
                )
        ids, w, st, up, cnt = (np.concatenate(cols) for cols in zip(*parts))
        order = np.argsort(ids, kind="stable")
        return RowBatch(ids[order], w[order], st[order], up[order], cnt[order])

    def _ingest(self, batch: RowBatch) -> int:
        # Written straight to RocksDB (one WAL batch, durable like a sync push) and taken
        # out of the hot tier, so no older hot copy can be written back over them later.
        hot = self._hot
        slots = hot.find(batch.ids)
        if (slots >= 0).any():
            hot.remove(slots[slots >= 0])
        keys = encode_keys(batch.ids)
        with self._write_lock:
            new = 0
            if self._disk_rows > 0:
                new = sum(v is None for v in self._rocks.multi_get(keys))
            else:
                new = len(keys)
            vals = self.codec.pack(batch.weights, batch.state, batch.updated_at, batch.count)
            rows = self._disk_rows + new
            self._rocks.write(keys, vals, meta={b"rows": _i64(rows)})
            self._disk_rows = rows
        return len(keys)

    def _delete_ids(self, uids: np.ndarray) -> int:
        hot = self._hot
        slots = hot.find(uids)
        inmem = slots >= 0
        n = 0
        on_disk = np.zeros(len(uids), dtype=bool)
        if inmem.any():
            s = slots[inmem]
            on_disk[inmem] = hot.on_disk[s]
            n += int(np.count_nonzero(~hot.on_disk[s]))  # rows only in memory
            hot.remove(s)
        rest = ~inmem
        if rest.any() and self._disk_rows > 0:
            self._await_write_back()
            vals = np.array(self._rocks.multi_get(encode_keys(uids[rest])), dtype=object)
            on_disk[rest] = np.not_equal(vals, None)
        if on_disk.any():
            self._delete_keys(encode_keys(uids[on_disk]))
            n += int(np.count_nonzero(on_disk))
        return n

    def _expire(self, cutoff: float) -> np.ndarray:
        self._await_write_back()  # its rows must be in the snapshot scanned below
        hot = self._hot
        expired = np.flatnonzero(hot.occupied & (hot.updated_at < cutoff))
        gone = [hot.row_id[expired].copy()]
        if len(expired):
            on_disk = expired[hot.on_disk[expired]]
            if len(on_disk):
                self._delete_keys(encode_keys(hot.row_id[on_disk]))
            hot.remove(expired)
        # Rows only on disk. The caller holds the store lock, so the snapshot agrees with
        # the hot tier: a row that is in memory now is newer there and is skipped.
        for keys, vals in self._rocks.iter_rows(_WRITE_CHUNK):
            rec = self.codec.unpack(vals)
            old = np.flatnonzero(rec["updated_at"] < cutoff)
            if not len(old):
                continue
            ids = decode_keys([keys[i] for i in old])
            ids = ids[hot.find(ids) < 0]
            if len(ids):
                self._delete_keys(encode_keys(ids))
                gone.append(ids)
        return np.concatenate(gone)

    def _delete_keys(self, keys: list[bytes]) -> None:
        rows = self._disk_rows - len(keys)
        self._rocks_write(deletes=keys, meta={b"rows": _i64(rows)})
        self._disk_rows = rows

    def marks(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        with self._lock:
            self._check_open()
            return self._rocks.meta_items(prefix)

    def _fill_stats(self, stats: StoreStats) -> StoreStats:
        hot = self._hot
        stats.rows_in_memory = hot.size
        stats.rows_on_disk = self._disk_rows
        stats.rows = self._disk_rows + int(np.count_nonzero(hot.occupied & ~hot.on_disk))
        stats.memory_bytes = hot.memory_bytes + self.admission.memory_bytes
        stats.memory_budget_bytes = self.store_config.memory_budget_bytes
        stats.disk_bytes = 0 if self._closed else self._rocks.disk_bytes()
        stats.extra = {
            "hot_capacity_rows": hot.capacity,
            "dirty_rows": int(np.count_nonzero(hot.dirty)),
        }
        return stats


def _chain(first: tuple, rest: Iterator[tuple]) -> Iterator[tuple]:
    yield first
    yield from rest
