"""Embedding lookups over several serving replicas, balanced, with failover.

Replicas (:mod:`recps.serving.replica`) each hold some or all serving shards of a model
version. :class:`ServingClient` learns who holds what from every replica's admin
``Status`` and the slot map from ``GetShardMap``, then for every lookup

* routes each unique id to its serving shard (the PS's slot function);
* picks, per shard, the holder with the fewest requests in flight from this client
  (ties rotate), so load spreads across replicas and a slow replica gets less;
* sends one ``Lookup`` per chosen replica, all tables in it, replicas in parallel;
* on ``UNAVAILABLE`` / ``DEADLINE_EXCEEDED`` / ``RESOURCE_EXHAUSTED`` marks that replica
  down for ``down_s`` (doubling while it stays down) and re-sends its part to another
  holder of the same shards, so one dead replica never fails a request that another
  replica can answer. A request too big for the replica (too many ids, or a message
  past ``max_message_bytes``) is a :class:`CapacityError` for the caller instead: the
  replica is not to blame, and another would refuse it too.

Lookups are read-only, so re-sending is always safe.

Concurrent ``lookup`` calls from several threads are coalesced
(:mod:`recps.serving.coalesce`): while a merged lookup is in flight to each replica,
new calls queue and then share the next RPC, ids deduplicated across them. A lone call
never waits; ``coalesce_inflight=0`` turns this off.

Example:
    >>> client = ServingClient(["127.0.0.1:7101", "127.0.0.1:7102"])  # doctest: +SKIP
    >>> client.lookup({"C1": np.array([3, 5, 3])})["C1"].shape  # doctest: +SKIP
    (3, 16)
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from recps.embedding import errors as E
from recps.embedding.base import table_major_order, unsorted_parts
from recps.proto import ps_pb2, ps_pb2_grpc, serving_pb2, serving_pb2_grpc
from recps.ps import wire
from recps.ps.client import as_ids, open_channel
from recps.ps.config import DEFAULT_MAX_MESSAGE_BYTES, TlsConfig
from recps.ps.errors import from_rpc_error, register_error_classes
from recps.ps.routing import ShardMap, slot_of
from recps.serving.coalesce import Coalescer
from recps.serving.errors import VersionNotHeldError, wire_error_classes

register_error_classes(*wire_error_classes())  # a replica's errors come back typed

_FAILOVER_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


@dataclass(frozen=True)
class ServingClientConfig:
    """How a :class:`ServingClient` talks to replicas.

    ``timeout_s`` is the deadline of one Lookup RPC (online serving: short). A replica
    that fails is skipped for ``down_s``, doubling up to ``max_down_s`` while it keeps
    failing. ``max_attempts`` bounds how many replicas one part of a request may try.
    """

    timeout_s: float = 1.0
    down_s: float = 0.5
    max_down_s: float = 10.0
    max_attempts: int = 3
    dtype: str = "float32"  # rows on the wire: float32 or float16
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls: TlsConfig | None = None
    auth_token: str | None = None
    # Concurrent lookup() calls ride one RPC (``recps.serving.coalesce``): at most this
    # many merged lookups in flight at once (None: one per replica; 0: every call its
    # own RPC), each carrying up to ``coalesce_max_ids`` ids. A lone call never waits.
    # benchmarks/serving.py, 8 threads, one replica, 2 cores: one RPC per call p99 12.4
    # ms at 1,120 qps; 1 in flight p99 6.8 ms at 1,560 qps; 2: 8.8 ms; 4: 11.4 ms.
    coalesce_inflight: int | None = None
    coalesce_max_ids: int = 16384

    def __post_init__(self) -> None:
        if self.coalesce_inflight is not None and self.coalesce_inflight < 0:
            raise E.ConfigError("coalesce_inflight must be >= 0 (0 turns coalescing off)")
        if self.coalesce_max_ids < 1:
            raise E.ConfigError("coalesce_max_ids must be >= 1")
        if self.timeout_s <= 0 or self.down_s <= 0 or self.max_down_s < self.down_s:
            raise E.ConfigError("timeout_s, down_s must be > 0 and max_down_s >= down_s")
        if self.max_attempts < 1:
            raise E.ConfigError("max_attempts must be >= 1")
        if self.dtype not in wire.STORAGE_TO_WIRE:
            raise E.ConfigError(f"dtype must be one of {sorted(wire.STORAGE_TO_WIRE)}")


class _Replica:
    def __init__(self, address: str, channel: grpc.Channel) -> None:
        self.address = address
        self.channel = channel
        self.ps = ps_pb2_grpc.ParameterServerStub(channel)
        self.admin = serving_pb2_grpc.ServingAdminStub(channel)
        self.shards: frozenset[int] = frozenset()
        self.version = 0
        self.inflight = 0
        self.down_until = 0.0
        self.down_for = 0.0
        self.failures = 0


class ServingClient:
    """Balanced, failing-over lookups across serving replicas; thread-safe."""

    def __init__(self, replicas: Sequence[str], config: ServingClientConfig | None = None) -> None:
        if not replicas:
            raise E.ConfigError("a ServingClient needs at least one replica address")
        self.config = config or ServingClientConfig()
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._replicas = [_Replica(a, self._open(a)) for a in dict.fromkeys(replicas)]
        self._pool = ThreadPoolExecutor(
            max_workers=max(2, len(self._replicas)), thread_name_prefix="recps-serving"
        )
        self._map: ShardMap | None = None
        self._all_shards: frozenset[int] = frozenset()
        inflight = self.config.coalesce_inflight
        self._inflight = len(self._replicas) if inflight is None else inflight
        # One coalescer per model version asked for (0: whatever the replicas serve):
        # calls pinned to different versions never share an RPC.
        self._coalescers: dict[int, Coalescer[dict[str, np.ndarray], dict[str, np.ndarray]]]
        self._coalescers = {}
        self.refresh()

    # ---- discovery -----------------------------------------------------------------------

    def _open(self, address: str) -> grpc.Channel:
        c = self.config  # failover is ours too: to another replica, not the same one
        return open_channel(address, c.max_message_bytes, c.tls)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.config.auth_token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def refresh(self) -> None:
        """Ask every replica which shards it holds and which version it serves.

        Replicas that do not answer keep their last known shards (they are tried again
        after their down time). Raises :class:`ShardUnavailableError` when no replica
        answers at all on the first refresh.
        """
        errors = []
        for r in self._replicas:
            try:
                st = r.admin.Status(
                    serving_pb2.StatusRequest(), timeout=5.0, metadata=self._metadata()
                )
                if self._map is None:
                    msg = r.ps.GetShardMap(
                        ps_pb2.GetShardMapRequest(), timeout=5.0, metadata=self._metadata()
                    )
                    self._map = ShardMap.from_proto(msg)
                    self._all_shards = frozenset(int(x) for x in np.unique(self._map.slot_owner))
            except grpc.RpcError as e:
                errors.append(from_rpc_error(e, r.address))
                continue
            with self._lock:
                r.shards = frozenset(int(s) for s in st.shards)
                r.version = int(st.current.version)
        if self._map is None:
            raise E.ShardUnavailableError(
                "no serving replica answered: " + "; ".join(str(e) for e in errors)
            )

    @property
    def versions(self) -> dict[str, int]:
        """Model version each replica served at the last refresh."""
        return {r.address: r.version for r in self._replicas}

    # ---- lookups -------------------------------------------------------------------------

    def _pick_full(self, exclude: set[str]) -> _Replica | None:
        """The least busy up replica that holds every shard (None: none is up)."""
        now = time.monotonic()
        full = [
            r
            for r in self._replicas
            if r.shards >= self._all_shards and r.address not in exclude and r.down_until <= now
        ]
        if not full:
            return None
        k = next(self._rr)
        return min(full, key=lambda r: (r.inflight, (full.index(r) - k) % len(full)))

    def _pick(self, shard: int, exclude: set[str]) -> _Replica | None:
        now = time.monotonic()
        holders = [r for r in self._replicas if shard in r.shards and r.address not in exclude]
        if not holders:
            return None
        up = [r for r in holders if r.down_until <= now] or holders  # all down: try anyway
        k = next(self._rr)
        return min(
            up, key=lambda r: (r.inflight, (up.index(r) - k) % len(up))
        )  # least in flight, ties rotate

    def lookup(
        self, batch: Mapping[str, np.ndarray], coalesce: bool = True, version: int | None = None
    ) -> dict[str, np.ndarray]:
        """``{table: ids}`` -> ``{table: float32 [n, dim]}``; ids need not be unique.

        Missing ids come back as the table's default vector (the replica decides).
        Calls made at the same time from several threads may share one RPC, unless
        ``coalesce`` is False (background work that requests should not queue behind).
        ``version`` pins the model version (a ranking service's tower's): replicas answer
        from it if they serve it or keep it for rollback; when none does,
        :class:`~recps.serving.errors.VersionNotHeldError`.
        """
        ids = {t: as_ids(v) for t, v in batch.items()}
        if not self._inflight or not coalesce:
            return self._lookup_one(ids, version)
        key = int(version or 0)
        c = self._coalescers.get(key)
        if c is None:
            with self._lock:
                c = self._coalescers.get(key)
                if c is None:
                    c = self._coalescers[key] = Coalescer(
                        lambda batches: self._lookup_many(batches, key or None),
                        max_inflight=self._inflight,
                        max_size=self.config.coalesce_max_ids,
                        size=_id_count,
                    )
        return c(ids)

    def coalesce_stats(self) -> dict[str, int]:
        """How many merged lookups ran, and how many lookup() calls they carried."""
        cs = list(self._coalescers.values())
        return {"batches": sum(c.batches for c in cs), "calls": sum(c.calls for c in cs)}

    def _lookup_many(
        self, batches: list[dict[str, np.ndarray]], version: int | None = None
    ) -> list[Any]:
        """The lookups of several callers as one: ids concatenated per table, looked up
        once, rows split back. A request-content error (unknown table, bad ids, a merged
        request or response too big for the replica) is re-asked one caller at a time, so
        it reaches only the caller that causes it, if any."""
        if len(batches) == 1:
            return [self._lookup_one(batches[0], version)]
        merged: dict[str, list[np.ndarray]] = {}
        for b in batches:
            for t, v in b.items():
                merged.setdefault(t, []).append(v)
        try:
            rows = self._lookup_one({t: np.concatenate(vs) for t, vs in merged.items()}, version)
        except (E.InvalidArgumentError, E.UnknownTableError, E.CapacityError):
            out: list[Any] = []
            for b in batches:
                try:
                    out.append(self._lookup_one(b, version))
                except E.RecpsError as e:
                    out.append(e)
            return out
        at = dict.fromkeys(merged, 0)
        out = []
        for b in batches:
            mine = {}
            for t, v in b.items():
                mine[t] = rows[t][at[t] : at[t] + len(v)]
                at[t] += len(v)
            out.append(mine)
        return out

    def _lookup_one(
        self, batch: Mapping[str, np.ndarray], version: int | None = None
    ) -> dict[str, np.ndarray]:
        assert self._map is not None
        uniq, expand = dedup_tables(batch)
        tried_full: set[str] = set()
        last_error: Exception | None = None
        # The common deployment: replicas that hold every shard. One RPC to one of them,
        # no per-id routing at all; per-shard routing only when none of them can answer.
        for _ in range(self.config.max_attempts):
            with self._lock:
                r = self._pick_full(tried_full)
                if r is not None:
                    r.inflight += 1
            if r is None:
                break
            try:
                got = self._call(r, None, uniq, None, version)
            except _Failover as e:
                last_error = e.error
                tried_full.add(r.address)
                continue
            return expand({t: got[t][1] for t in uniq})
        shard_of = {}
        for t, u in uniq.items():
            shard_of[t] = self._map.slot_owner[slot_of(t, u, self._map.num_slots)].astype(np.int64)
        rows: dict[str, np.ndarray | None] = dict.fromkeys(uniq)
        pending = sorted({int(s) for s in itertools.chain(*shard_of.values())})
        tried: dict[int, set[str]] = {s: set(tried_full) for s in pending}
        for _ in range(self.config.max_attempts):
            if not pending:
                break
            plan: dict[str, tuple[_Replica, list[int]]] = {}
            with self._lock:
                for s in pending:
                    r = self._pick(s, tried[s])
                    if r is None:
                        continue
                    plan.setdefault(r.address, (r, []))[1].append(s)
                for r, _ in plan.values():
                    r.inflight += 1
            if not plan:
                break
            calls = list(plan.values())
            if len(calls) == 1:  # the common case: no hop through the pool
                r, shards = calls[0]
                futures = [(r, shards, _Done(self._call, r, shards, uniq, shard_of, version))]
            else:
                futures = [
                    (r, shards, self._pool.submit(self._call, r, shards, uniq, shard_of, version))
                    for r, shards in calls
                ]
            failed: list[int] = []
            for r, shards, fut in futures:
                try:
                    got = fut.result()
                except _Failover as e:
                    last_error = e.error
                    failed.extend(shards)
                    for s in shards:
                        tried[s].add(r.address)
                    continue
                for t, (idx, part) in got.items():
                    assert idx is not None
                    out = rows[t]
                    if out is None:
                        out = rows[t] = np.empty((len(uniq[t]), part.shape[1]), np.float32)
                    out[idx] = part
            pending = failed
        if pending:
            if isinstance(last_error, VersionNotHeldError):  # up, but none holds it
                raise last_error
            raise E.ShardUnavailableError(
                f"no replica could answer serving shards {pending}: {last_error}"
            )
        return expand(
            {t: np.zeros((0, 0), np.float32) if r is None else r for t, r in rows.items()}
        )

    def _call(
        self,
        r: _Replica,
        shards: list[int] | None,
        uniq: Mapping[str, np.ndarray],
        shard_of: Mapping[str, np.ndarray] | None,
        version: int | None = None,
    ) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
        """One Lookup to ``r``: the ids of ``shards`` (None: every id; ``r`` holds all)."""
        req = ps_pb2.LookupRequest(
            shard_map_epoch=0,  # replicas route by their model's map, not a training epoch
            create_missing=False,
            want_dtype=wire.STORAGE_TO_WIRE[self.config.dtype],
            model_version=version or 0,
        )
        picks: dict[str, np.ndarray | None] = {}
        if shards is None:
            for t, u in uniq.items():
                picks[t] = None
                req.tables.add(table=t, ids=wire.encode_ids(u))
        else:
            assert shard_of is not None
            mine = np.asarray(shards, dtype=np.int64)
            for t, u in uniq.items():
                idx = np.flatnonzero(np.isin(shard_of[t], mine))
                if len(idx):
                    picks[t] = idx
                    req.tables.add(table=t, ids=wire.encode_ids(u[idx]))
        try:
            resp = r.ps.Lookup(req, timeout=self.config.timeout_s, metadata=self._metadata())
        except grpc.RpcError as e:
            err = from_rpc_error(e, r.address)  # a message too big: CapacityError
            if e.code() in _FAILOVER_CODES and not isinstance(err, E.CapacityError):
                self._mark(r, down=True)
                raise _Failover(err) from None
            if isinstance(err, VersionNotHeldError):  # another replica may hold it
                self._mark(r, down=False)
                raise _Failover(err) from None
            self._mark(r, down=False)  # it answered: a request too big is not its failure
            raise err from None
        finally:
            with self._lock:
                r.inflight -= 1
        self._mark(r, down=False)
        got = {}
        for tr in resp.tables:
            idx = picks[tr.table]
            n = len(uniq[tr.table]) if idx is None else len(idx)
            got[tr.table] = (
                idx,
                wire.decode_rows(tr.rows, n, tr.dim, tr.dtype, f"{tr.table} rows"),
            )
        return got

    def _mark(self, r: _Replica, down: bool) -> None:
        with self._lock:
            if down:
                c = self.config
                r.failures += 1
                r.down_for = min(c.max_down_s, r.down_for * 2 if r.down_for else c.down_s)
                r.down_until = time.monotonic() + r.down_for
            else:
                r.down_for = 0.0
                r.down_until = 0.0

    def stats(self) -> list[dict[str, Any]]:
        """Per replica: address, shards, version, in flight, failures, down."""
        now = time.monotonic()
        with self._lock:
            return [
                {
                    "address": r.address,
                    "shards": sorted(r.shards),
                    "version": r.version,
                    "inflight": r.inflight,
                    "failures": r.failures,
                    "down": r.down_until > now,
                }
                for r in self._replicas
            ]

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for r in self._replicas:
            r.channel.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dedup_tables(
    batch: Mapping[str, Any],
) -> tuple[dict[str, np.ndarray], Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
    """Sorted unique ids per table, with one sort for all tables, and the function that
    turns the unique ids' rows back into rows in the caller's order.

    A ranking request has ~26 small tables: one ``np.unique`` each costs ~20 us, most of
    it per call; one sort over (table, id) of the concatenation does them all. Tables
    whose ids are already strictly increasing (the Ranker sends them so) are left alone.
    Expanded rows are copies, never views of a response buffer.

    Example:
        >>> u, expand = dedup_tables({"a": [5, 3, 5], "b": [7]})
        >>> {t: v.tolist() for t, v in u.items()}
        {'a': [3, 5], 'b': [7]}
        >>> expand({"a": np.array([[3.0], [5.0]]), "b": np.array([[7.0]])})["a"].ravel().tolist()
        [5.0, 3.0, 5.0]
    """
    names = list(batch)
    arrays = [np.ascontiguousarray(np.asarray(batch[t]), dtype=np.int64).reshape(-1) for t in names]
    uniq = dict(zip(names, arrays))
    if not arrays:
        return uniq, _copies
    all_lens = np.array([len(a) for a in arrays], dtype=np.int64)
    cat = np.concatenate(arrays)
    todo = np.flatnonzero(unsorted_parts(cat, all_lens)).tolist()
    if not todo:
        return uniq, _copies
    lens = all_lens[todo]
    if len(todo) < len(arrays):
        cat = np.concatenate([arrays[k] for k in todo])
    seg = np.repeat(np.arange(len(todo), dtype=np.int64), lens)
    order = table_major_order(cat, seg)
    ids, segs = cat.take(order), seg.take(order)
    first = np.empty(len(ids), dtype=bool)
    first[0] = True
    np.not_equal(ids[1:], ids[:-1], out=first[1:])
    first[1:] |= segs[1:] != segs[:-1]
    inverse = np.empty(len(ids), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    counts = np.bincount(segs[first], minlength=len(todo))
    ubounds = np.concatenate(([0], np.cumsum(counts)))
    bounds = np.concatenate(([0], np.cumsum(lens)))
    u = ids[first]
    for j, k in enumerate(todo):
        uniq[names[k]] = u[ubounds[j] : ubounds[j + 1]]
    deduped = [names[k] for k in todo]
    dedup_set = set(deduped)

    def expand(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = _copies({t: r for t, r in rows.items() if t not in dedup_set})
        dims = {rows[t].shape[1:] for t in deduped}
        if len(dims) == 1:  # the usual case: one gather for every deduplicated table
            allrows = np.concatenate([rows[t] for t in deduped]).take(inverse, axis=0)
            for j, t in enumerate(deduped):
                out[t] = allrows[bounds[j] : bounds[j + 1]]
        else:
            for j, t in enumerate(deduped):
                inv = inverse[bounds[j] : bounds[j + 1]] - ubounds[j]
                out[t] = rows[t].take(inv, axis=0)
        return out

    return uniq, expand


def _id_count(batch: Mapping[str, np.ndarray]) -> int:
    return sum(len(v) for v in batch.values())


def _copies(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows the caller may keep and write: response-buffer views are copied."""
    return {t: r if r.flags.writeable else r.copy() for t, r in rows.items()}


class _Done:
    """Runs ``fn(*args)`` now; ``result()`` returns its value or raises its error."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        try:
            self._value = fn(*args)
        except BaseException as e:  # re-raised by result(), as a future would
            self._error = e

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class _Failover(Exception):
    def __init__(self, error: E.RecpsError) -> None:
        super().__init__(str(error))
        self.error = error
