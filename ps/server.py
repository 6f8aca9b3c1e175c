"""The parameter-server shard: a gRPC service over one ``TieredStore`` per table.

One process serves one shard. Its data directory holds everything needed to restart it::

    data_dir/tables.json       table configs (created through CreateTable)
    data_dir/shard_map.json    the routing map this shard believes in
    data_dir/dedup.json        push sequence high-water marks (saved on clean shutdown)
    data_dir/server.json       address, port and pid of the running process
    data_dir/migration.json    slots frozen for a handover (survives a restart)
    data_dir/tables/<name>/    the table's TieredStore (RocksDB)
    data_dir/delta_state.json  last published delta seq (with ``delta_dir`` set)

Concurrency: gRPC's thread pool runs requests in parallel; each table has its own store
lock, so there is no global lock. A shard-wide reader/writer gate lets pushes run
together but gives checkpoints a quiet instant across all tables.

Example:
    >>> import tempfile
    >>> server, port = create_server(ServerConfig(data_dir=tempfile.mkdtemp()))
    >>> port > 0
    True
    >>> server.stop()
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recps.embedding import errors as E
from recps.embedding.base import DurableMark, RowBatch
from recps.embedding.config import TableConfig
from recps.embedding.tiered_store import TieredStore
from recps.proto import ps_pb2, ps_pb2_grpc
from recps.ps import wire
from recps.ps.config import ServerConfig, TlsConfig
from recps.ps.delta import STATE_FILE as DELTA_STATE_FILE
from recps.ps.delta import DeltaPublisher
from recps.ps.errors import MigrationError, SlotFrozenError, abort
from recps.ps.metrics import ServerMetrics, rss_bytes
from recps.ps.migration import decode_slot_rows, encode_slot_rows
from recps.ps.routing import ShardMap, slot_of, slots_of_tables
from recps.ps.sent_rows import SentRows
from recps.ps.slot_rates import SlotRates

log = logging.getLogger("recps.ps.server")
SERVICE = "recps.ps.v1.ParameterServer"
_HEALTH_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class _Gate:
    """Shared/exclusive gate: pushes enter shared, a checkpoint enters exclusive."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True  # new pushes wait from here on
            while self._shared:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


_PUSH_MARK = b"push/"  # DurableMark keys: prefix, len(client) u16, client, seq u64 (BE)


def _mark_prefix(client: str) -> bytes:
    c = client.encode()
    return _PUSH_MARK + len(c).to_bytes(2, "big") + c


# Marks kept per client and table: the last 1-2 spans of seqs. A retry after a crash is
# of a push that was in flight then (a handful); older pushes are in the dedup log.
_MARK_SPAN = 256


def mark_floor(seq: int, span: int | None = None) -> int:
    """Marks of a client below this seq may go: a multiple of the span, 1-2 spans back.
    It moves once per span of seqs, so a range deletion is written that rarely."""
    span = span or _MARK_SPAN
    return max(0, (seq // span - 1) * span)


def push_mark(client: str, seq: int, drop_below: int = 0) -> DurableMark:
    """The mark a sync table writes with the rows of push (client, seq); the same batch
    deletes that client's marks of seqs below ``drop_below`` (0: none)."""
    p = _mark_prefix(client)
    drop = (p + bytes(8), p + drop_below.to_bytes(8, "big")) if drop_below > 0 else None
    return DurableMark(p + seq.to_bytes(8, "big"), drop=drop)


def parse_push_mark(key: bytes) -> tuple[str, int]:
    """(client, seq) of a :func:`push_mark` key."""
    n = int.from_bytes(key[len(_PUSH_MARK) : len(_PUSH_MARK) + 2], "big")
    at = len(_PUSH_MARK) + 2
    return key[at : at + n].decode(), int.from_bytes(key[at + n : at + n + 8], "big")


class _Dedup:
    """Exactly-once pushes per (client_id, seq), with a bounded window per client.

    A retry that arrives while the original is still being applied waits for it, then
    answers "duplicate". A push that failed part-way remembers which of its tables were
    applied (``partial``), so its retry applies only the others.

    Durability (``log_path``, for shards with sync durability): every mark is also
    appended to a log before the push is answered, so a push whose rows reached the WAL
    is still known after a kill -9. Records: ``["t", client, seq, table]`` once a table's
    rows are applied (all tables but the last; the done record covers that one) and
    ``["d", client, seq]`` when the push is complete. Each record is a ``write(2)``,
    which a process crash cannot lose (``fsync`` adds an fsync for power loss, as the
    store's ``fsync`` does for its WAL). ``snapshot`` (clean shutdown, checkpoints and
    whenever the log outgrows ``_LOG_COMPACT_BYTES``) writes the whole state to
    ``dedup.json`` and empties the log; replaying a record twice is harmless.

    The log alone cannot close one gap: a kill -9 between a table's RocksDB write and
    its record would forget that table, and the retry would apply it again (a test hit
    it about once in eight kills). So with sync durability each table also records the
    push in the *same* atomic WriteBatch as its rows (a :class:`DurableMark` in the
    table's metadata; each client's last 256-512 seqs are kept), and a restart folds
    those marks back in (``recover``). A table that applies a big push in several
    batches marks each with the last id it covers (``DurableMark.upto``): a crash between
    them leaves ``upto`` (seq -> {table: id}), and the retry applies the ids above it.
    """

    def __init__(
        self,
        window: int,
        snapshot_path: Path | None = None,
        log_path: Path | None = None,
        fsync: bool = False,
    ) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._clients: dict[str, dict[str, Any]] = {}
        self._snapshot_path = snapshot_path
        self._log_path = log_path
        self._fsync = fsync
        self._log: Any = None

    def _client(self, client: str) -> dict[str, Any]:
        c = self._clients.get(client)
        if c is None:
            c = self._clients[client] = {
                "high": 0,
                "done": set(),
                "inflight": {},
                "partial": {},  # seq -> tables applied
                "upto": {},  # seq -> {table: last id applied} (part-applied before a crash)
            }
        return c

    def begin(self, client: str, seq: int) -> tuple[bool, threading.Event | None]:
        """(is_new, event to wait on when a copy is in flight)."""
        with self._lock:
            c = self._client(client)
            if seq in c["done"] or seq <= c["high"] - self.window:
                return False, None
            if seq in c["inflight"]:
                return False, c["inflight"][seq]
            c["inflight"][seq] = threading.Event()
            return True, None

    def applied_tables(self, client: str, seq: int) -> frozenset[str]:
        """Tables of an unfinished push already applied (by a try that failed or crashed)."""
        with self._lock:
            c = self._clients.get(client)
            return frozenset(c["partial"].get(seq, ())) if c else frozenset()

    def applied_upto(self, client: str, seq: int) -> dict[str, int]:
        """Tables of an unfinished push applied only in part before a crash (a push larger
        than the table's hot tier takes at once): table -> the last id applied (ids in
        sorted order; the retry applies the ids above it)."""
        with self._lock:
            c = self._clients.get(client)
            return dict(c["upto"].get(seq, {})) if c else {}

    def recover(self, marks: Iterable[tuple[str, int, str, int | None]]) -> int:
        """Fold in (client, seq, table, upto) marks read back from the tables after a
        restart: that table's rows of the push are durable, all of them (``upto`` None)
        or those of ids <= ``upto``. Returns how many were new."""
        n = 0
        with self._lock:
            for client, seq, table, upto in marks:
                c = self._client(client)
                if seq in c["done"] or seq <= c["high"] - self.window:
                    continue
                got = c["partial"].setdefault(seq, set())
                if table in got:
                    continue
                if upto is None:
                    got.add(table)
                    c["upto"].get(seq, {}).pop(table, None)
                else:
                    c["upto"].setdefault(seq, {})[table] = upto
                n += 1
        return n

    def mark_table(self, client: str, seq: int, table: str, log: bool = True) -> None:
        """``table``'s part of push (client, seq) is applied (and in the WAL if sync)."""
        with self._lock:
            self._client(client)["partial"].setdefault(seq, set()).add(table)
            if log:
                self._append(["t", client, seq, table])

    def finish(self, client: str, seq: int, applied: bool) -> None:
        with self._lock:
            c = self._clients[client]
            ev = c["inflight"].pop(seq)
            if applied:
                self._mark_done(c, seq)
                self._append(["d", client, seq])
        ev.set()

    def _mark_done(self, c: dict[str, Any], seq: int) -> None:
        c["done"].add(seq)
        c["partial"].pop(seq, None)
        c["upto"].pop(seq, None)
        if seq > c["high"]:
            c["high"] = seq
            floor = seq - self.window
            if len(c["done"]) > 2 * self.window:
                c["done"] = {s for s in c["done"] if s > floor}
                c["partial"] = {s: t for s, t in c["partial"].items() if s > floor}
                c["upto"] = {s: t for s, t in c["upto"].items() if s > floor}

    def was_applied(self, client: str, seq: int) -> bool:
        with self._lock:
            c = self._clients.get(client)
            return bool(c) and (seq in c["done"] or seq <= c["high"] - self.window)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return self._to_dict()

    def _to_dict(self) -> dict[str, Any]:
        return {
            k: {
                "high": v["high"],
                "done": sorted(v["done"]),
                "partial": {str(s): sorted(t) for s, t in v["partial"].items()},
                "upto": {str(s): dict(t) for s, t in v["upto"].items()},
            }
            for k, v in self._clients.items()
        }

    def replace(self, d: dict[str, Any]) -> None:
        """Forget everything, then load ``d`` (a restore rolls the marks back too)."""
        with self._lock:
            self._clients.clear()
        self.load(d)

    def load(self, d: dict[str, Any]) -> None:
        with self._lock:
            for k, v in d.items():
                self._clients[k] = {
                    "high": int(v["high"]),
                    "done": set(v["done"]),
                    "inflight": {},
                    "partial": {int(s): set(t) for s, t in v.get("partial", {}).items()},
                    "upto": {
                        int(s): {str(k): int(i) for k, i in t.items()}
                        for s, t in v.get("upto", {}).items()
                    },
                }

    # ---- the durable log ---------------------------------------------------------------

    def replay_log(self) -> int:
        """Apply the log's records (after ``load`` of the last snapshot); returns how many.
        A torn last record (power loss mid-write) is skipped."""
        if self._log_path is None or not self._log_path.exists():
            return 0
        n = 0
        with self._lock, open(self._log_path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    kind, client, seq = rec[0], str(rec[1]), int(rec[2])
                except (ValueError, IndexError, TypeError):
                    continue
                c = self._client(client)
                if kind == "d":
                    self._mark_done(c, seq)
                elif kind == "t" and seq not in c["done"]:
                    c["partial"].setdefault(seq, set()).add(str(rec[3]))
                n += 1
        return n

    def _append(self, record: list[Any]) -> None:
        """Append one record (caller holds the lock, so the log's order is memory's)."""
        if self._log_path is None:
            return
        if self._log is None:
            self._log = open(self._log_path, "ab", buffering=0)  # noqa: SIM115 (closed in close)
        self._log.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        if self._fsync:
            os.fsync(self._log.fileno())
        if self._log.tell() > _LOG_COMPACT_BYTES:
            self._snapshot_locked()

    def snapshot(self) -> None:
        """Write the whole state to the snapshot file (atomically), then empty the log."""
        with self._lock:
            self._snapshot_locked()

    def _snapshot_locked(self) -> None:
        path = self._snapshot_path
        if path is None:
            return
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self._to_dict(), f)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)  # the snapshot holds every logged record: the log may go
        if self._log_path is not None:
            if self._log is not None:
                self._log.truncate(0)
                self._log.seek(0)
            elif self._log_path.exists():
                self._log_path.write_bytes(b"")

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None


_LOG_COMPACT_BYTES = 4 << 20  # dedup log size that triggers a snapshot + truncation


def rpc_handler(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Times the RPC, and turns errors into precise statuses (the server keeps serving)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def handler(self: PSServicer, request: Any, context: grpc.ServicerContext) -> Any:
            t0 = time.perf_counter()
            code = "OK"
            rpc = self.metrics.rpc(name)
            rpc.running.inc()
            try:
                return fn(self, request, context)
            except E.RecpsError as e:
                code = e.status
                abort(context, e)
            except MemoryError:
                code = "RESOURCE_EXHAUSTED"
                abort(context, E.CapacityError(f"{name}: out of memory for this request"))
            except Exception as e:
                code = "INTERNAL"
                log.exception("%s failed", name)
                abort(context, E.RecpsError(f"{name}: internal error: {type(e).__name__}: {e}"))
            finally:
                rpc.observe(code, time.perf_counter() - t0)
                rpc.running.dec()

        return handler

    return wrap


class PSServicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(self, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self._tables: dict[str, TieredStore] = {}
        self._tables_lock = threading.Lock()
        self._gate = _Gate()
        sync = config.store.durability == "sync"
        self._mark_floors: dict[tuple[str, str], int] = {}  # see _push_mark
        self._dedup = _Dedup(
            config.dedup_window,
            snapshot_path=self.data_dir / "dedup.json",
            log_path=self.data_dir / "dedup.log" if sync else None,
            fsync=sync and config.store.fsync,
        )
        self._map_lock = threading.Lock()
        self.shard_map = self._load_map()
        self._slot_requests = np.zeros(self.shard_map.num_slots, dtype=np.int64)
        self._slot_rates = SlotRates(self._slot_requests, config.slot_rate_window_s)
        # Per table: the rows this process sent as a move's source (FINISH deletes those
        # instead of scanning the table; see recps.ps.sent_rows).
        self._sent: dict[str, SentRows] = {}
        self._slot_rows = np.zeros(self.shard_map.num_slots, dtype=np.int64)
        self._slot_bytes = np.zeros(self.shard_map.num_slots, dtype=np.int64)
        self._slot_rows_at = 0.0
        # Slot moves (see Migrate). The move gate is entered shared by every lookup and
        # push and exclusively by a freeze, so no write that passed the frozen check is
        # still running once FREEZE answers. It is not the checkpoint gate: a long
        # checkpoint must not stall lookups.
        n = self.shard_map.num_slots
        self._move_gate = _Gate()
        self._move_lock = threading.Lock()
        self._tracking = np.zeros(n, dtype=bool)  # source: record touched ids (the delta)
        self._frozen = np.zeros(n, dtype=bool)  # source: writes refused until handover
        self._incoming = np.zeros(n, dtype=bool)  # target: WriteSlotRows accepted
        self._moving = False  # any of the three set: the hot path checks only this
        # Ids looked up or pushed in tracked slots, recorded after the store has them (so
        # a delta round that takes an id reads a row that already holds its update), and
        # the sets delta rounds took: (move_id, table, round) -> sorted unique ids.
        self._delta: dict[str, list[np.ndarray]] = {}
        self._delta_rounds: dict[tuple[str, str, int], np.ndarray] = {}
        self._load_migration()
        self._slot_scan_lock = threading.Lock()
        self._owns_all: tuple[ShardMap, bool] | None = None  # (map, owns every slot)
        # Labelled metric children per table: .labels() costs a lock and a dict per call.
        self._rows_read: dict[str, Callable[[float], None]] = {}
        self._rows_written: dict[str, Callable[[float], None]] = {}
        self._open_tables()
        # The online delta stream (recps.ps.delta): ids pushed since the last delta.
        self.delta: DeltaPublisher | None = None
        self._delta_stop = threading.Event()
        self._delta_thread: threading.Thread | None = None
        if config.delta_dir:
            self.delta = DeltaPublisher(
                config.delta_dir,
                config.shard_id,
                self.data_dir / DELTA_STATE_FILE,
                self.shard_map.num_slots,
                self._delta_rows,
                lambda: config.delta_serving_shards or len(self.shard_map.shards),
                config.delta_keep,
            )
            marked = self.delta.recover(dict(self._tables))
            if marked:
                log.info("delta stream: %d rows changed since delta %d", marked, self.delta.seq)
        dedup = self.data_dir / "dedup.json"
        if dedup.exists():
            self._dedup.load(json.loads(dedup.read_text()))
        # Marks logged since the last snapshot (sync durability): a kill -9 loses none.
        replayed = self._dedup.replay_log()
        if sync:  # and the marks each table wrote with its rows (see _Dedup)
            found = [
                (*parse_push_mark(key), name, DurableMark.applied_upto(value))
                for name, store in self._tables.items()
                for key, value in store.marks(_PUSH_MARK)
            ]
            new = self._dedup.recover(found)
            if new:
                log.info("recovered %d push marks from the tables", new)
                replayed = True
        if replayed or (self.data_dir / "dedup.log").exists():
            self.save_dedup()

    # ---- state on disk ---------------------------------------------------------------------

    def _load_map(self) -> ShardMap:
        path = self.data_dir / "shard_map.json"
        if path.exists():
            m = ShardMap.load(path)
            if m.num_slots != self.config.num_slots:
                raise E.ConfigError(
                    f"{path} has {m.num_slots} slots, config says {self.config.num_slots}"
                )
            return m
        # A shard started alone owns every slot until ops tooling installs a real map.
        sid = self.config.shard_id
        owner = np.full(self.config.num_slots, sid, dtype=np.uint16)
        return ShardMap(0, self.config.num_slots, {sid: ""}, owner)

    def _open_tables(self) -> None:
        path = self.data_dir / "tables.json"
        if not path.exists():
            return
        for d in json.loads(path.read_text()):
            cfg = TableConfig.from_dict(d)
            self._tables[cfg.name] = self._new_store(cfg)

    def _new_store(self, cfg: TableConfig) -> TieredStore:
        store = TieredStore(self.data_dir / "tables" / cfg.name, cfg, self.config.store)
        store.set_expiry_listener(functools.partial(self._on_expired, cfg.name))
        return store

    def _on_expired(self, table: str, ids: np.ndarray) -> None:
        """A TTL sweep deleted these rows: serving replicas delete them too."""
        if self.delta is not None:
            self.delta.note_expired(table, ids)

    def _save_tables(self) -> None:
        path = self.data_dir / "tables.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([s.config.to_dict() for s in self._tables.values()], indent=1))
        tmp.replace(path)

    def save_dedup(self) -> None:
        """Snapshot the dedup marks to dedup.json (and empty the dedup log)."""
        self._dedup.snapshot()

    # ---- the delta stream ---------------------------------------------------------------

    def _delta_rows(self, table: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        store = self._tables.get(table)
        if store is None:  # dropped by a Restore since: nothing to publish
            return np.empty(0, np.int64), np.empty((0, 1), np.float32)
        batch = store.export_rows(ids)
        return batch.ids, batch.weights

    def start_delta(self) -> None:
        """Start publishing a delta every ``delta_interval_s`` (no-op without delta_dir)."""
        if self.delta is None or self._delta_thread is not None:
            return
        self._delta_thread = threading.Thread(
            target=self._delta_loop, name="recps-ps-delta", daemon=True
        )
        self._delta_thread.start()

    def _delta_loop(self) -> None:
        assert self.delta is not None
        while not self._delta_stop.wait(self.config.delta_interval_s):
            try:
                self.delta.publish()
            except Exception:
                log.exception(
                    "publishing delta %d failed; retrying next interval", self.delta.seq + 1
                )

    def close(self) -> None:
        self._delta_stop.set()
        if self._delta_thread is not None:
            self._delta_thread.join(timeout=60)
        if self.delta is not None:
            try:  # the last changes, so a clean stop loses nothing
                self.delta.publish()
            except Exception:
                log.exception("publishing the final delta failed")
        with self._tables_lock:
            for store in self._tables.values():
                store.close()
        self.save_dedup()
        self._dedup.close()

    # ---- helpers --------------------------------------------------------------------------

    def _store(self, name: str) -> TieredStore:
        store = self._tables.get(name)
        if store is None:
            raise E.UnknownTableError(name)
        return store

    def _check_owned(
        self, tables: list[str], ids: list[np.ndarray], epoch: int, write: bool = True
    ) -> tuple[dict[str, np.ndarray], list[tuple[str, np.ndarray]]]:
        """Refuse the request if any id of any table is in a slot this shard does not own
        (or, for a ``write``, one frozen for a handover); count the ids per slot; record
        the ids of slots being moved out. One hash pass over all tables' ids together.

        Returns, per table with ids in frozen slots, the mask of those ids (a lookup must
        not create rows there), and the ids of slots being moved out, which the caller
        passes to ``_record`` once the store has applied the request. Call inside
        ``self._move_gate.shared()``."""
        m = self.shard_map
        slots = slots_of_tables(tables, ids, m.num_slots)
        owns = self._owns_all
        if owns is None or owns[0] is not m:
            owns = self._owns_all = (m, bool((m.slot_owner == self.config.shard_id).all()))
        if not owns[1]:
            owner = m.slot_owner[slots]
            bad = owner != self.config.shard_id
            if bad.any():
                i = int(np.argmax(bad))
                ends = np.cumsum([len(x) for x in ids])
                k = int(np.searchsorted(ends, i, side="right"))  # the table of id i
                lo = int(ends[k]) - len(ids[k])
                n_bad = int(bad[lo : ends[k]].sum())
                raise E.StaleShardMapError(
                    f"shard {self.config.shard_id} does not own {n_bad} of {len(ids[k])} "
                    f"ids of table {tables[k]!r} (e.g. id {int(ids[k][i - lo])}: slot "
                    f"{int(slots[i])} belongs to shard {int(owner[i])}); client routed "
                    f"with epoch {epoch}",
                    m.epoch,
                )
        if len(slots) < 256:
            np.add.at(self._slot_requests, slots, 1)
        else:
            self._slot_requests += np.bincount(slots, minlength=len(self._slot_requests))
        self._slot_rates.maybe_fold()
        if not self._moving:
            return _NOT_MOVING
        return self._note_moving(tables, ids, slots, write)

    def _note_moving(
        self, tables: list[str], ids: list[np.ndarray], slots: np.ndarray, write: bool
    ) -> tuple[dict[str, np.ndarray], list[tuple[str, np.ndarray]]]:
        frozen = self._frozen[slots]
        hit: dict[str, np.ndarray] = {}
        if frozen.any():
            if write:
                raise SlotFrozenError(
                    f"shard {self.config.shard_id}: {int(frozen.sum())} ids are in slots "
                    f"frozen for a handover (e.g. slot {int(slots[np.argmax(frozen)])}); "
                    "retry shortly",
                    int(np.unique(slots[frozen]).size),
                )
            lo = 0
            for name, i in zip(tables, ids):
                f = frozen[lo : lo + len(i)]
                lo += len(i)
                if f.any():
                    hit[name] = f
        tracked = self._tracking[slots]
        records = []
        if tracked.any():
            lo = 0
            for name, i in zip(tables, ids):
                m = tracked[lo : lo + len(i)]
                lo += len(i)
                if m.any():
                    records.append((name, i[m].copy()))
        return hit, records

    def _record(self, records: list[tuple[str, np.ndarray]]) -> None:
        """Remember ids of slots being moved out (the delta), after they were applied."""
        if records:
            with self._move_lock:
                for name, ids in records:
                    self._delta.setdefault(name, []).append(ids)

    def _count(self, counters: dict[str, Callable[[float], None]], metric: Any, table: str) -> Any:
        inc = counters.get(table)
        if inc is None:
            inc = counters[table] = metric.labels(table).inc
        return inc

    @staticmethod
    def _unique_tables(names: list[str]) -> None:
        if len(set(names)) != len(names):
            raise E.InvalidArgumentError(f"a table may appear once per request, got {names}")

    # ---- RPCs -----------------------------------------------------------------------------

    @rpc_handler("Lookup")
    def Lookup(self, request: ps_pb2.LookupRequest, context: Any) -> bytes:
        """The serialized ``LookupResponse`` (``LookupResponse.FromString`` reads it)."""
        tables = request.tables
        names = [t.table for t in tables]
        self._unique_tables(names)
        want = request.want_dtype
        wire.wire_dtype(want, "want_dtype")
        stores = [self._store(n) for n in names]
        ids = [wire.decode_ids(t.ids, "ids", t.table) for t in tables]
        dtype = want or ps_pb2.FLOAT32
        create = request.create_missing
        out = []
        with self._move_gate.shared():
            frozen, records = self._check_owned(names, ids, request.shard_map_epoch, write=False)
            for name, store, i in zip(names, stores, ids):
                f = frozen.get(name)
                if f is None or not create:
                    rows = store.lookup(i, create_missing=create)
                else:  # frozen slots are read, not written: no row is created there
                    rows = np.empty((len(i), store.dim), np.float32)
                    rows[f] = store.lookup(i[f], create_missing=False)
                    rows[~f] = store.lookup(i[~f], create_missing=True)
                out.append((name, rows, store.dim, dtype))
                self._count(self._rows_read, self.metrics.rows_read, name)(len(i))
            self._record(records)  # lookups create rows: they move too
        # Serialized here (see add_servicer): the rows are copied once, into the response.
        return wire.encode_lookup_response(out)

    def _push_mark(self, table: str, client: str, seq: int) -> DurableMark:
        """The push's durable mark for ``table``, with a range deletion of the client's
        old marks when its floor has moved since this process last wrote one there (a
        race between two pushes only writes one more, or one fewer until the next)."""
        floor = mark_floor(seq)
        key = (table, client)
        if floor <= self._mark_floors.get(key, 0):
            return push_mark(client, seq)
        self._mark_floors[key] = floor
        return push_mark(client, seq, drop_below=floor)

    @rpc_handler("Push")
    def Push(self, request: ps_pb2.PushRequest, context: Any) -> ps_pb2.PushResponse:
        tables = request.tables
        names = [t.table for t in tables]
        self._unique_tables(names)
        # Validate every table before applying any, so a bad entry changes nothing.
        parsed = []
        for t in tables:
            store = self._store(t.table)
            ids = wire.decode_ids(t.ids, "ids", t.table)
            wire.check_dim(t.dim, store.config)
            grads = wire.decode_rows(t.grads, len(ids), store.dim, t.dtype, "grads", t.table)
            # One table: the store's own check (same error, before it changes anything)
            # suffices. Several: all are checked here, before the first is applied.
            reject = len(tables) > 1 and store.config.nonfinite == "reject" and len(grads)
            if reject and not (np.isfinite(grads.max()) and np.isfinite(grads.min())):
                bad = int(len(grads) - np.count_nonzero(np.isfinite(grads).all(axis=1)))
                raise E.NonFiniteGradientError(t.table, bad)
            parsed.append((t.table, store, ids, grads))
        client, seq = request.client_id, request.seq
        if client:
            is_new, inflight = self._dedup.begin(client, seq)
            while not is_new:
                if inflight is None:  # applied before: answer without applying again
                    self.metrics.duplicate_pushes.inc()
                    return ps_pb2.PushResponse(applied_rows=0, duplicate=True)
                inflight.wait()  # the original is running; its outcome decides
                is_new, inflight = self._dedup.begin(client, seq)
            # Tables a failed or crashed earlier try of this push already applied, and
            # tables it applied in part (the ids up to a point) before a crash.
            done = self._dedup.applied_tables(client, seq)
            upto = self._dedup.applied_upto(client, seq)
        else:
            done, upto = frozenset(), {}
        applied = 0
        ok = False
        last = len(parsed) - 1
        marks = bool(client) and self.config.store.durability == "sync"
        try:
            with self._move_gate.shared(), self._gate.shared():
                # Inside the move gate: a freeze waits for this push, or refuses it.
                epoch = request.shard_map_epoch
                _, records = self._check_owned(names, [p[2] for p in parsed], epoch)
                try:
                    for k, (name, store, ids, grads) in enumerate(parsed):
                        if name in done:
                            continue
                        if name in upto:  # resume after the last id the crash left durable
                            rest = ids > upto[name]
                            ids, grads = ids[rest], grads[rest]
                        mark = self._push_mark(name, client, seq) if marks else None
                        applied += store.apply_gradients(ids, grads, mark=mark)
                        if self.delta is not None:
                            self.delta.changed.add(name, ids)
                        if client:  # the last table's durable record is finish()'s
                            self._dedup.mark_table(client, seq, name, log=k < last)
                        inc = self._count(self._rows_written, self.metrics.rows_written, name)
                        inc(len(ids))
                finally:
                    self._record(records)  # even a partly applied push changed rows
                if request.wait_durable and self.config.store.durability != "sync":
                    for _, store, _, _ in parsed:
                        store.flush()
            ok = True
        finally:
            if client:
                self._dedup.finish(client, seq, ok)
        if done and all(n in done for n in names):  # all of it had landed before
            self.metrics.duplicate_pushes.inc()
            return ps_pb2.PushResponse(applied_rows=0, duplicate=True)
        return ps_pb2.PushResponse(applied_rows=applied, duplicate=False)

    @rpc_handler("CreateTable")
    def CreateTable(self, request: ps_pb2.CreateTableRequest, context: Any) -> Any:
        cfg = wire.config_from_spec(request.spec)
        with self._tables_lock:
            existing = self._tables.get(cfg.name)
            if existing is not None:
                if request.if_not_exists and existing.config == cfg:
                    return ps_pb2.CreateTableResponse(
                        spec=wire.spec_from_config(cfg), created=False
                    )
                raise E.TableExistsError(cfg.name)
            self._tables[cfg.name] = self._new_store(cfg)
            self._save_tables()
        return ps_pb2.CreateTableResponse(spec=wire.spec_from_config(cfg), created=True)

    @rpc_handler("ListTables")
    def ListTables(self, request: Any, context: Any) -> ps_pb2.ListTablesResponse:
        specs = [wire.spec_from_config(self._tables[n].config) for n in sorted(self._tables)]
        return ps_pb2.ListTablesResponse(tables=specs)

    @rpc_handler("Stats")
    def Stats(self, request: ps_pb2.StatsRequest, context: Any) -> ps_pb2.StatsResponse:
        names = list(request.tables) or sorted(self._tables)
        tables = [self._table_stats(n) for n in names]
        if request.fresh_slot_rows:
            self._refresh_slot_rows(force=True)
        snap = self.state_snapshot(tables)
        return ps_pb2.StatsResponse(
            shard_id=self.config.shard_id,
            epoch=self.shard_map.epoch,
            uptime_s=time.time() - self.started,
            rss_bytes=rss_bytes(),
            tables=tables,
            slot_ids=snap["slot_ids"],
            slot_rows=snap["slot_rows"],
            slot_requests=snap["slot_requests"],
            slot_qps=snap["slot_qps"],
            slot_bytes=snap["slot_bytes"],
            slot_rows_age_s=snap["slot_rows_age_s"],
        )

    def _table_stats(self, name: str) -> ps_pb2.TableStats:
        s = self._store(name).stats()
        return ps_pb2.TableStats(
            table=name,
            rows_in_memory=s.rows_in_memory,
            rows_on_disk=s.rows_on_disk,
            hit_rate=s.hit_rate,
            memory_bytes=s.memory_bytes,
            disk_bytes=s.disk_bytes,
            evictions=s.evictions,
            admission_rejected=s.admission_rejected,
            expired_rows=s.expired_rows,
            nonfinite_skipped=s.nonfinite_skipped,
            lookups=s.rows_looked_up,
            pushes=s.rows_updated,
        )

    def state_snapshot(self, tables: list[Any] | None = None) -> dict[str, Any]:
        """Gauges for Stats and the Prometheus collector."""
        if tables is None:
            tables = [self._table_stats(n) for n in sorted(self._tables)]
        self._refresh_slot_rows()
        owned = self.shard_map.slots_of(self.config.shard_id)
        return {
            "tables": tables,
            "epoch": self.shard_map.epoch,
            "slot_ids": owned.tolist(),
            "slot_rows": self._slot_rows[owned].tolist(),
            "slot_requests": self._slot_requests[owned].tolist(),
            "slot_qps": self._slot_rates.rates()[owned].tolist(),
            "slot_bytes": self._slot_bytes[owned].tolist(),
            "slot_rows_age_s": time.time() - self._slot_rows_at if self._slot_rows_at else -1.0,
            "delta": self.delta.metrics() if self.delta is not None else None,
        }

    def _refresh_slot_rows(self, force: bool = False) -> None:
        """Per-slot row counts from a scan of every table, at most every interval."""
        if not force and time.time() - self._slot_rows_at < self.config.slot_scan_interval_s:
            return
        if not self._slot_scan_lock.acquire(blocking=force):
            return  # another scan is running; its result is fresh enough
        try:
            n = self.shard_map.num_slots
            counts = np.zeros(n, dtype=np.int64)
            nbytes = np.zeros(n, dtype=np.int64)
            for name, store in list(self._tables.items()):
                per_table = np.zeros(n, dtype=np.int64)
                for batch in store.items(batch_size=1 << 16):
                    per_table += np.bincount(slot_of(name, batch.ids, n), minlength=n)
                counts += per_table
                nbytes += per_table * _row_bytes(store)
            self._slot_rows = counts
            self._slot_bytes = nbytes
            self._slot_rows_at = time.time()
        finally:
            self._slot_scan_lock.release()

    @rpc_handler("Checkpoint")
    def Checkpoint(self, request: ps_pb2.CheckpointRequest, context: Any) -> Any:
        if not request.dir:
            raise E.InvalidArgumentError("Checkpoint needs dir")
        tag = request.tag or time.strftime("ckpt-%Y%m%d-%H%M%S")
        if "/" in tag or tag in (".", ".."):
            raise E.InvalidArgumentError(f"checkpoint tag {tag!r} must be a plain name")
        root = Path(request.dir) / tag / f"shard-{self.config.shard_id}"
        if root.exists():
            done = self._replayed_checkpoint(root, request.request_id)
            if done is not None:
                return done
            raise E.CheckpointError(f"checkpoint {root} already exists")
        t0 = time.perf_counter()
        rows = 0
        # The delta lock first: no publish is half done, so every push before this
        # instant is in a delta <= delta_seq or in the pending set (published later).
        with self._delta_lock(), self._gate.exclusive():  # one instant for every table
            for name, store in sorted(self._tables.items()):
                store.checkpoint(root / "tables" / name)
                rows += store.stats().rows_on_disk
            self.save_dedup()
            delta_seq = self.delta.seq if self.delta is not None else None
        manifest = {
            "shard_id": self.config.shard_id,
            "shard_map": self.shard_map.to_dict(),
            "tables": [self._tables[n].config.to_dict() for n in sorted(self._tables)],
            "dedup": self._dedup.to_dict(),
            "rows": rows,
            "created_at": time.time(),
            "request_id": request.request_id,
        }
        if delta_seq is not None:
            # Serving: a model exported from this checkpoint applies deltas > delta_seq.
            manifest["delta_seq"] = delta_seq
            manifest["delta_dir"] = str(Path(self.config.delta_dir or "").resolve())
        # Written last, atomically: a manifest means every table of the shard is there.
        tmp = root / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(root / "manifest.json")
        return ps_pb2.CheckpointResponse(
            path=str(root),
            rows=rows,
            tables=sorted(self._tables),
            seconds=time.perf_counter() - t0,
        )

    def _delta_lock(self) -> Any:
        return self.delta.lock if self.delta is not None else contextlib.nullcontext()

    @staticmethod
    def _replayed_checkpoint(root: Path, request_id: str) -> ps_pb2.CheckpointResponse | None:
        """The answer to a retried Checkpoint (same request_id) that already completed."""
        if not request_id:
            return None
        try:
            manifest = json.loads((root / "manifest.json").read_text())
        except (OSError, ValueError):
            return None  # absent (incomplete) or unreadable: not ours to vouch for
        if manifest.get("request_id") != request_id:
            return None
        return ps_pb2.CheckpointResponse(
            path=str(root),
            rows=int(manifest.get("rows", 0)),
            tables=[t["name"] for t in manifest.get("tables", [])],
            seconds=0.0,
        )

    @rpc_handler("Restore")
    def Restore(self, request: ps_pb2.RestoreRequest, context: Any) -> ps_pb2.RestoreResponse:
        if not request.dir or not request.tag:
            raise E.InvalidArgumentError("Restore needs dir and tag")
        if "/" in request.tag or request.tag in (".", ".."):
            raise E.InvalidArgumentError(f"checkpoint tag {request.tag!r} must be a plain name")
        root = Path(request.dir) / request.tag / f"shard-{self.config.shard_id}"
        try:
            manifest = json.loads((root / "manifest.json").read_text())
        except FileNotFoundError:
            raise E.CheckpointNotFoundError(f"no checkpoint of this shard at {root}") from None
        except (OSError, ValueError) as e:
            raise E.CheckpointError(f"unreadable checkpoint manifest in {root}: {e}") from e
        if manifest.get("shard_id") != self.config.shard_id:
            raise E.CheckpointMismatchError(
                f"{root} is shard {manifest.get('shard_id')}'s, this is {self.config.shard_id}"
            )
        saved = ShardMap.from_dict(manifest["shard_map"])
        sid = self.config.shard_id
        if not np.array_equal(saved.slots_of(sid), self.shard_map.slots_of(sid)):
            raise E.CheckpointMismatchError(
                f"{root} covers other slots than shard {sid} owns now "
                f"(map epoch {saved.epoch} then, {self.shard_map.epoch} now); restore the "
                "shard map of the checkpoint first"
            )
        configs = [TableConfig.from_dict(d) for d in manifest["tables"]]
        t0 = time.perf_counter()
        rows = 0
        # Exclusive: no push lands half-before, half-after the rollback.
        with self._delta_lock(), self._gate.exclusive(), self._tables_lock:
            for cfg in configs:  # every table first checked, so a bad one changes nothing
                if not (root / "tables" / cfg.name / "manifest.json").exists():
                    raise E.CheckpointError(f"{root} lacks table {cfg.name!r}")
                cur = self._tables.get(cfg.name)
                if cur is not None and cur.config.dim != cfg.dim:
                    raise E.CheckpointMismatchError(
                        f"table {cfg.name!r} has dim {cur.dim} here, {cfg.dim} in {root}"
                    )
            if request.dry_run:
                return ps_pb2.RestoreResponse(
                    path=str(root),
                    rows=int(manifest.get("rows", 0)),
                    tables=[c.name for c in configs],
                )
            self._sent.clear()  # rows sent before describe the tables no more: scan
            for name in sorted(set(self._tables) - {c.name for c in configs}):
                # Created after the checkpoint: a rollback removes it.
                self._tables.pop(name).close()
                shutil.rmtree(self.data_dir / "tables" / name, ignore_errors=True)
            for cfg in configs:
                store = self._tables.get(cfg.name)
                if store is None:
                    store = self._tables[cfg.name] = self._new_store(cfg)
                store.restore(root / "tables" / cfg.name)
                rows += store.stats().rows_on_disk
            self._save_tables()
            self._dedup.replace(manifest.get("dedup", {}))
            self.save_dedup()
            if self.delta is not None and not request.dry_run:
                # Every restored row may differ from what replicas hold: publish them all.
                for cfg in configs:
                    for batch in self._tables[cfg.name].items(batch_size=1 << 16):
                        self.delta.changed.add(cfg.name, batch.ids)
        return ps_pb2.RestoreResponse(
            path=str(root),
            rows=rows,
            tables=[c.name for c in configs],
            seconds=time.perf_counter() - t0,
        )

    @rpc_handler("GetShardMap")
    def GetShardMap(self, request: Any, context: Any) -> ps_pb2.ShardMap:
        return self.shard_map.to_proto()

    @rpc_handler("UpdateShardMap")
    def UpdateShardMap(self, request: ps_pb2.ShardMap, context: Any) -> ps_pb2.ShardMap:
        try:
            new = ShardMap.from_proto(request)
        except ValueError as e:
            raise E.InvalidArgumentError(f"malformed shard map: {e}") from e
        with self._map_lock:
            cur = self.shard_map
            if new.epoch <= cur.epoch:
                raise E.StaleShardMapError(
                    f"shard map epoch {new.epoch} is not newer than the current one", cur.epoch
                )
            if new.num_slots != cur.num_slots:
                raise E.InvalidArgumentError(
                    f"num_slots {new.num_slots} differs from this shard's {cur.num_slots}"
                )
            new.save(self.data_dir / "shard_map.json")
            self.shard_map = new
        return new.to_proto()

    # ---- slot moves ------------------------------------------------------------------------

    def _load_migration(self) -> None:
        path = self.data_dir / "migration.json"
        if path.exists():
            frozen = json.loads(path.read_text()).get("frozen", [])
            self._frozen[np.asarray(frozen, dtype=np.int64)] = True
            self._moving = bool(self._frozen.any())

    def _save_migration(self) -> None:
        """Frozen slots, atomically and durably: a source restarted between the handover
        decision and its own map update must still refuse writes to them."""
        path = self.data_dir / "migration.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"frozen": np.flatnonzero(self._frozen).tolist()}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def _slots_arg(self, slots: Any) -> np.ndarray:
        a = np.asarray(slots, dtype=np.int64)
        if not len(a):
            raise E.InvalidArgumentError("a slot move needs at least one slot")
        if a.min() < 0 or a.max() >= self.shard_map.num_slots:
            raise E.InvalidArgumentError(
                f"slots must be in [0, {self.shard_map.num_slots}), got {int(a.min())}.."
                f"{int(a.max())}"
            )
        return np.unique(a)

    def _slot_mask(self, slots: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.shard_map.num_slots, dtype=bool)
        mask[slots] = True
        return mask

    def _sent_rows(self, table: str) -> SentRows:
        sent = self._sent.get(table)
        if sent is None:
            n = self.shard_map.num_slots
            sent = self._sent.setdefault(table, SentRows(lambda ids: slot_of(table, ids, n), n))
        return sent

    def _forget_sent(self, mask: np.ndarray) -> None:
        for sent in list(self._sent.values()):
            sent.forget(mask)

    def _delete_slot_rows(self, mask: np.ndarray) -> int:
        """Delete every row of every table in the slots of ``mask``: the rows this process
        sent for them when it saw their whole move (no scan), else a scan of the table."""
        n = 0
        for name, store in list(self._tables.items()):
            if not store.stats().rows:  # a new shard's tables: nothing to scan
                continue
            sent = self._sent.get(name)
            if sent is not None and sent.covers(mask):
                ids = sent.ids_in(mask)
                self.metrics.slot_deletes.labels("sent").inc()
            else:
                doomed = [
                    b.ids[mask[slot_of(name, b.ids, len(mask))]]
                    for b in store.items(batch_size=1 << 16)
                ]
                ids = np.concatenate(doomed) if doomed else np.empty(0, np.int64)
                self.metrics.slot_deletes.labels("scan").inc()
            if len(ids):
                n += store.delete(ids)
        self._forget_sent(mask)
        return n

    def _forget_rounds(self, move_id: str) -> None:
        with self._move_lock:
            if not self._tracking.any():  # nothing is moving out: no delta to keep
                self._delta = {}
                self._delta_rounds = {}
            else:
                for key in [k for k in self._delta_rounds if k[0] == move_id]:
                    del self._delta_rounds[key]

    def _update_moving(self) -> None:
        self._moving = bool(self._tracking.any() or self._frozen.any() or self._incoming.any())

    @rpc_handler("Migrate")
    def Migrate(self, request: ps_pb2.MigrateRequest, context: Any) -> ps_pb2.MigrateResponse:
        slots = self._slots_arg(request.slots)
        sid = self.config.shard_id
        act = request.action
        rows = 0
        owned = self.shard_map.slot_owner[slots] == sid
        if act == ps_pb2.BEGIN_SOURCE:
            if not owned.all():
                raise MigrationError(
                    f"move {request.move_id}: shard {sid} is not the owner of "
                    f"{int((~owned).sum())} of its slots (epoch {self.shard_map.epoch})"
                )
            with self._move_gate.exclusive():
                self._tracking[slots] = True
                was_frozen = self._frozen[slots].any()
                self._frozen[slots] = False  # a retried move starts over: copy, then freeze
                # Ids an earlier try recorded stay: re-sending a row is harmless.
                self._update_moving()
                self._forget_rounds(request.move_id)
            if was_frozen:
                self._save_migration()
        elif act == ps_pb2.BEGIN_TARGET:
            if owned.any():
                raise MigrationError(
                    f"move {request.move_id}: shard {sid} already owns {int(owned.sum())} "
                    "of the slots; refusing to wipe them"
                )
            self._incoming[slots] = False
            rows = self._delete_slot_rows(self._slot_mask(slots))  # an earlier try's rows
            self._incoming[slots] = True
            self._update_moving()
        elif act == ps_pb2.FREEZE:
            if not owned.all():
                raise MigrationError(f"move {request.move_id}: shard {sid} does not own them")
            with self._move_gate.exclusive():  # every write that passed the check is done
                self._frozen[slots] = True
                self._update_moving()
                self._save_migration()
        elif act == ps_pb2.PREPARE_TARGET:
            for store in list(self._tables.values()):
                store.flush()
        elif act == ps_pb2.FINISH:
            # Request counts restart with the slot's arrival (or departure), so a planner
            # balancing qps sees each slot's traffic at its current owner.
            self._slot_requests[slots] = 0
            self._slot_rates.restart(slots)
            # Handed over by this shard (it froze them as the source): the old copy goes.
            # Never a target's copy, even one whose new map has not arrived yet.
            gone = slots[~owned & self._frozen[slots]]
            if len(gone):
                rows = self._delete_slot_rows(self._slot_mask(gone))
            with self._move_gate.exclusive():
                self._tracking[slots] = False
                self._incoming[slots] = False
                was_frozen = self._frozen[gone].any()
                self._frozen[gone] = False
                self._update_moving()
                self._forget_rounds(request.move_id)
            if was_frozen:
                self._save_migration()
        elif act == ps_pb2.ABORT_SOURCE:
            if not owned.all():
                raise MigrationError(
                    f"move {request.move_id}: shard {sid} no longer owns the slots; it was "
                    "handed over, so it cannot be aborted: re-run apply to finish it"
                )
            self._forget_sent(self._slot_mask(slots))  # a re-run copies them afresh
            with self._move_gate.exclusive():
                self._tracking[slots] = False
                was_frozen = self._frozen[slots].any()
                self._frozen[slots] = False
                self._update_moving()
                self._forget_rounds(request.move_id)
            if was_frozen:
                self._save_migration()
        else:
            raise E.InvalidArgumentError(f"unknown migrate action {act}")
        log.info(
            "move %s: %s on %d slots (%d rows)",
            request.move_id,
            ps_pb2.MigrateAction.Name(act),
            len(slots),
            rows,
        )
        return ps_pb2.MigrateResponse(rows=rows, epoch=self.shard_map.epoch)

    @rpc_handler("ReadSlotRows")
    def ReadSlotRows(self, request: ps_pb2.ReadSlotRowsRequest, context: Any) -> Any:
        store = self._store(request.table)
        mask = self._slot_mask(self._slots_arg(request.slots))
        n = self.shard_map.num_slots
        limit = request.max_rows or 65536
        after = request.after_id if request.has_after_id else None
        name = request.table
        if request.delta:
            key = (request.move_id, name, int(request.delta_round))
            with self._move_lock:
                ids = self._delta_rounds.get(key)
                if ids is None:  # the round's first page: take what was recorded so far
                    parts = self._delta.pop(name, [])
                    rec = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
                    mine = mask[slot_of(name, rec, n)]
                    if not mine.all():  # ids of other moves' slots stay recorded
                        self._delta[name] = [rec[~mine]]
                    ids = self._delta_rounds[key] = rec[mine]
            if after is not None:
                ids = ids[ids > after]
            done = len(ids) <= limit
            batch = store.export_rows(ids[:limit])
            self._sent_rows(name).add(batch.ids)
        else:
            if after is None:
                self._sent_rows(name).begin(mask)
            start = None if after is None else after + 1
            got = []
            have = 0
            done = True
            for b in store.scan(start, batch_size=min(limit, 1 << 16)):
                keep = mask[slot_of(name, b.ids, n)]
                if keep.any():
                    got.append(
                        tuple(a[keep] for a in (b.ids, b.weights, b.state, b.updated_at, b.count))
                    )
                    have += int(keep.sum())
                if have >= limit:
                    done = False
                    break
            if got:
                cols = [np.concatenate(c) for c in zip(*got)]
                cols = [c[:limit] for c in cols]
            else:
                cols = [
                    np.empty(0, np.int64),
                    np.empty((0, store.dim), np.float32),
                    np.empty((0, store.state_width), np.float32),
                    np.empty(0, np.float64),
                    np.empty(0, np.int64),
                ]
            batch = RowBatch(*cols)
            sent = self._sent_rows(name)
            sent.add(batch.ids)
            if done:
                sent.complete(mask)
        return ps_pb2.ReadSlotRowsResponse(rows=encode_slot_rows(name, batch), done=done)

    @rpc_handler("WriteSlotRows")
    def WriteSlotRows(self, request: ps_pb2.WriteSlotRowsRequest, context: Any) -> Any:
        table = request.rows.table
        store = self._store(table)
        batch = decode_slot_rows(request.rows, store.dim, store.state_width)
        if len(batch):
            slots = slot_of(table, batch.ids, self.shard_map.num_slots)
            # Never over live data: a late write (a stale apply) after the handover is refused.
            bad = ~self._incoming[slots] | (
                self.shard_map.slot_owner[slots] == self.config.shard_id
            )
            if bad.any():
                raise MigrationError(
                    f"move {request.move_id}: shard {self.config.shard_id} expects no rows "
                    f"for slot {int(slots[np.argmax(bad)])}; run BEGIN_TARGET first"
                )
            store.ingest(batch)
            if self.delta is not None:
                # Moved-in rows may carry pushes the source never published (between its
                # last delta and the freeze): publish them from here.
                self.delta.changed.add(table, batch.ids)
        return ps_pb2.WriteSlotRowsResponse(rows=len(batch))


_NOT_MOVING: tuple[dict[str, np.ndarray], list[tuple[str, np.ndarray]]] = ({}, [])


def _row_bytes(store: Any) -> int:
    """Stored bytes of one row: the 8-byte key plus the fixed-size value."""
    codec = getattr(store, "codec", None)
    if codec is not None:
        return 8 + int(codec.record_bytes)
    return 8 + store.dim * np.dtype(store.config.dtype).itemsize + 4 * store.state_width + 16


def _serialize(message: Any) -> bytes:
    """Response serializer that passes responses a handler already serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_servicer(servicer: PSServicer, server: grpc.Server) -> None:
    """``add_ParameterServerServicer_to_server``, except that every response may also be
    returned already serialized (``Lookup`` hand-encodes its rows)."""
    service = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=getattr(ps_pb2, m.input_type.name).FromString,
            response_serializer=_serialize,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def add_port(server: grpc.Server, bind: str, tls: TlsConfig | None) -> int:
    """Bind ``server`` to ``bind`` (TLS when ``tls`` is set; with its ``client_ca_file``,
    mutual TLS); returns the port, 0 if the bind failed."""
    if tls is None:
        return server.add_insecure_port(bind)
    creds = grpc.ssl_server_credentials(
        [(tls.read("key_file"), tls.read("cert_file"))],
        root_certificates=tls.read("client_ca_file"),
        require_client_auth=tls.client_ca_file is not None,
    )
    return server.add_secure_port(bind, creds)


class AuthInterceptor(grpc.ServerInterceptor):
    """Bearer-token check on every call except health checks and reflection."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.startswith(_HEALTH_EXEMPT):
            return continuation(details)
        md = dict(details.invocation_metadata or ())
        got = md.get("authorization")
        if isinstance(got, str):
            got = got.encode()
        # Constant time: a plain == leaks how long a prefix of the token matched.
        if not isinstance(got, bytes) or not hmac.compare_digest(got, self._expected):
            return self._deny
        return continuation(details)


class GrpcServerProcess:
    """What every recps gRPC server process shares (a PS shard, a serving replica): the
    server with its limits, auth, health and reflection; ``server.json`` for operators and
    harnesses; a graceful stop. Subclasses add their services, then call :meth:`_bind`,
    and implement :meth:`_close` (what to close once in-flight calls are done).
    """

    config: Any  # ServerConfig or ReplicaConfig: the fields read here are common to both
    metrics: ServerMetrics

    def _grpc_server(self, thread_name_prefix: str) -> grpc.Server:
        c = self.config
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(c.max_workers, thread_name_prefix=thread_name_prefix),
            options=[
                ("grpc.max_receive_message_length", c.max_message_bytes),
                ("grpc.max_send_message_length", c.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=c.max_concurrent_rpcs,
            interceptors=[AuthInterceptor(c.auth_token)] if c.auth_token else [],
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self._stopped = threading.Event()
        return self.grpc_server

    def _bind(self, services: tuple[str, ...]) -> None:
        """Reflection for ``services`` (health's and its own added), then the port."""
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        bind = f"{self.config.host}:{self.config.port}"
        self.port = add_port(self.grpc_server, bind, self.config.tls)
        if not self.port:
            raise E.ConfigError(f"cannot bind {bind}")
        self.address = f"{self.config.host}:{self.port}"

    def _write_info(self, **info: Any) -> None:
        """``<data_dir>/server.json`` (where, which pid, ``info``), replaced atomically."""
        common = {"address": self.address, "port": self.port, "pid": os.getpid()}
        path = Path(self.config.data_dir) / "server.json"
        tmp = path.with_name("server.json.tmp")
        tmp.write_text(json.dumps({**common, **info, "metrics_port": self.metrics.port}))
        tmp.replace(path)

    def _close(self) -> None:
        raise NotImplementedError

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful: health NOT_SERVING, refuse new calls, let in-flight ones finish,
        close (a shard flushes its tables), stop the metrics endpoint. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        self.grpc_server.stop(grace).wait()
        self._close()
        self.metrics.close()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


class PSServer(GrpcServerProcess):
    """A running shard: the gRPC server, its servicer, health and metrics."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics(config.shard_id)
        self.servicer = PSServicer(config, self.metrics)
        self.metrics.attach_state(self.servicer.state_snapshot)
        add_servicer(self.servicer, self._grpc_server("recps-ps"))
        self._bind((SERVICE,))

    def start(self) -> PSServer:
        self.grpc_server.start()
        self.servicer.start_delta()
        if self.config.metrics_port is not None:
            self.metrics.serve(self.config.host, self.config.metrics_port)
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._write_info(shard_id=self.config.shard_id)
        return self

    def _close(self) -> None:
        self.servicer.close()


def create_server(config: ServerConfig) -> tuple[PSServer, int]:
    """Start a shard; returns the running server and its port."""
    server = PSServer(config).start()
    return server, server.port
