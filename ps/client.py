"""``PSClient``: batched, sharded, retrying access to the parameter servers.

One call covers many tables. Per table the client deduplicates ids (unique + inverse),
routes the unique ids by hash slot, sends **one RPC per shard** for all tables at once,
fans the RPCs out concurrently (gRPC futures, no Python threads), and reassembles rows
in the caller's order.

Failures: UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried with
exponential backoff; a stale shard map (FAILED_PRECONDITION with an epoch) refreshes the
map and re-routes only the refused part. A write to a slot frozen for its handover
(``SlotFrozenError``) is retried after a short pause for up to ``_FROZEN_WAIT_S``
without using up ``max_retries``: the freeze ends with the handover. Anything else
raises the matching :class:`RecpsError` subclass at once.

Pushes are idempotent: each per-shard payload carries (client_id, seq); a retry of the
same payload reuses its seq, so the shard applies it exactly once.

Example:
    >>> client = PSClient(["127.0.0.1:7001", "127.0.0.1:7002"])  # doctest: +SKIP
    >>> client.create_table(TableConfig("user", dim=16))  # doctest: +SKIP
    >>> rows = client.lookup({"user": np.array([3, 1, 3])})["user"]  # doctest: +SKIP
    >>> client.push({"user": (np.array([3]), np.ones((1, 16), np.float32))})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from recps.embedding import errors as E
from recps.embedding.base import _group, unique_sum
from recps.embedding.config import TableConfig
from recps.proto import ps_pb2, ps_pb2_grpc
from recps.ps import wire
from recps.ps.config import ClientConfig, TlsConfig
from recps.ps.errors import SlotFrozenError, from_rpc_error
from recps.ps.rebalance_plan import SlotStats
from recps.ps.routing import ShardMap

_RETRY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_STALE = grpc.StatusCode.FAILED_PRECONDITION
# Control-plane calls: not DEADLINE_EXCEEDED, which may still be running on the shard.
_CONTROL_RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
# A push that failed so may have been applied: it is resent as it was (see _scatter).
_UNKNOWN_OUTCOME = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# How long a call keeps retrying writes to frozen slots (a handover takes milliseconds to
# a second; a stalled `rebalance apply` may take until it is re-run), and the pause
# between tries (short: the freeze is short).
_FROZEN_WAIT_S = 120.0
_FROZEN_PAUSE_S = 0.01


def as_ids(ids: Any) -> np.ndarray:
    """Ids as a contiguous 1-D int64 array (numpy, lists, torch tensors on any device);
    DtypeError for non-integer ids."""
    if hasattr(ids, "detach"):  # torch.Tensor, without importing torch
        ids = ids.detach().cpu().numpy()
    a = np.asarray(ids)
    if a.dtype.kind not in "iu":
        raise E.DtypeError("ids", a.dtype, "int64")
    return np.ascontiguousarray(a.reshape(-1), dtype=np.int64)


def _as_grads(g: Any) -> np.ndarray:
    if hasattr(g, "detach"):
        g = g.detach().cpu().numpy()
    a = np.asarray(g)
    if a.dtype.kind != "f":
        raise E.DtypeError("grads", a.dtype, "float32")
    return np.ascontiguousarray(a, dtype=np.float32)


def open_channel(
    address: str,
    max_message_bytes: int,
    tls: TlsConfig | None = None,
    server_name_override: str | None = None,
) -> grpc.Channel:
    """A channel to a recps server (shard or serving replica), as every recps client opens
    it: message limits, no gRPC-level retries, a capped reconnect backoff, TLS if given."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),  # retries are ours: they must reuse push seqs
        # After a failed connect a channel fails calls at once until its reconnect
        # backoff (1 s growing to 120 s by default) ends: a restarted server would
        # stay unreachable for minutes after it is back. Servers restart; cap it.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if server_name_override:
        opts.append(("grpc.ssl_target_name_override", server_name_override))
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.read("ca_file"),
        private_key=tls.read("key_file"),
        certificate_chain=tls.read("cert_file"),
    )
    return grpc.secure_channel(address, creds, options=opts)


def _unique_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``np.unique(a, return_inverse=True)``, ~1.5x faster; inverse None if already unique.

    Strictly increasing ids (a worker's collection sends them) come back as they are;
    others are grouped by :func:`recps.embedding.base._group`, the sort ``unique_sum`` uses.
    """
    n = len(a)
    if n < 2 or bool((a[1:] > a[:-1]).all()):
        return a, None
    order, s, first = _group(a)  # the store's packed-key stable sort
    inverse = np.empty(n, dtype=np.intp)
    rank = np.cumsum(first)
    rank -= 1
    inverse[order] = rank
    return s[first], inverse


def _one_request_per_address(
    routed: dict[int, list[_Part]], addresses: Mapping[int, str]
) -> dict[int, list[_Part]]:
    """Merge the parts of shards served at one address (a serving replica holding several
    shards of a model) into one request, under the first of those shards: one RPC, so
    the replica answers all of it from one model version, never straddling a swap. A
    table split over those shards becomes one part. Shards at distinct addresses (every
    training cluster) come back as they were."""
    if len(routed) < 2 or len({addresses.get(sh) for sh in routed}) == len(routed):
        return routed
    by_addr: dict[str, int] = {}
    merged: dict[int, list[_Part]] = {}
    for sh in sorted(routed):
        lead = by_addr.setdefault(addresses.get(sh, f"shard {sh}"), sh)
        merged.setdefault(lead, []).extend(routed[sh])
    out: dict[int, list[_Part]] = {}
    for lead, parts in merged.items():
        by_table: dict[str, list[_Part]] = {}
        for p in parts:
            by_table.setdefault(p.table, []).append(p)
        out[lead] = [
            ps[0] if len(ps) == 1 else _Part(t, np.concatenate([q.idx for q in ps]))  # type: ignore[misc]
            for t, ps in by_table.items()
        ]
    return out


@dataclass
class _Part:
    """What one shard gets for one table: positions into the table's unique ids, or
    ``idx=None`` for all of them (one shard owns the whole table's batch: no copies)."""

    table: str
    idx: np.ndarray | None

    def pick(self, a: np.ndarray) -> np.ndarray:
        return a if self.idx is None else a[self.idx]

    def size(self, uniq: Mapping[str, np.ndarray]) -> int:
        return len(uniq[self.table]) if self.idx is None else len(self.idx)


class PSClient:
    """Client of a sharded recps parameter-server cluster. Thread-safe.

    ``cluster``: a :class:`ShardMap`, a list of shard addresses (the map is fetched from
    them), or the path of a cluster file written by ``recps cluster up``.
    """

    def __init__(
        self, cluster: ShardMap | list[str] | str | Path, config: ClientConfig | None = None
    ) -> None:
        self.config = config or ClientConfig()
        self.client_id = self.config.client_id or uuid.uuid4().hex
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, ps_pb2_grpc.ParameterServerStub]] = {}
        self._dims: dict[str, int] = {}
        self._seeds: list[str] = []
        self._cluster_file: Path | None = None
        if isinstance(cluster, ShardMap):
            self._map = cluster
            self._seeds = list(cluster.shards.values())
        elif isinstance(cluster, (str, Path)):
            self._cluster_file = Path(cluster)
            self._map = self._read_cluster_file()
            self._seeds = list(self._map.shards.values())
        else:
            self._seeds = list(cluster)
            self._map = self._fetch_map(self._seeds)

    # ---- channels and maps ---------------------------------------------------------------

    @property
    def shard_map(self) -> ShardMap:
        return self._map

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self.config.auth_token:
            return (("authorization", f"Bearer {self.config.auth_token}"),)
        return None

    def _stub(self, address: str) -> ps_pb2_grpc.ParameterServerStub:
        entry = self._channels.get(address)
        if entry is None:
            with self._lock:
                entry = self._channels.get(address)
                if entry is None:
                    entry = self._open(address)
                    self._channels[address] = entry
        return entry[1]

    def _open(self, address: str) -> tuple[grpc.Channel, ps_pb2_grpc.ParameterServerStub]:
        c = self.config
        ch = open_channel(address, c.max_message_bytes, c.tls, c.server_name_override)
        return ch, ps_pb2_grpc.ParameterServerStub(ch)

    def _read_cluster_file(self) -> ShardMap:
        assert self._cluster_file is not None
        try:
            return ShardMap.from_dict(json.loads(self._cluster_file.read_text())["shard_map"])
        except (OSError, ValueError, KeyError) as e:
            raise E.ConfigError(f"cannot read cluster file {self._cluster_file}: {e}") from e

    def _fetch_map(self, addresses: Iterable[str]) -> ShardMap:
        """The newest map any reachable shard knows (shards learn maps from ops tooling)."""
        best: ShardMap | None = None
        errors = []
        for addr in addresses:
            try:
                msg = self._stub(addr).GetShardMap(
                    ps_pb2.GetShardMapRequest(),
                    timeout=min(self.config.timeout_s, 5.0),
                    metadata=self._metadata(),
                )
            except grpc.RpcError as e:
                errors.append(from_rpc_error(e, addr))
                continue
            m = ShardMap.from_proto(msg)
            if best is None or m.epoch > best.epoch:
                best = m
        if best is None:
            denied = (E.UnauthenticatedError, E.PermissionDeniedError)
            if errors and all(isinstance(e, denied) for e in errors):
                raise errors[0]  # every shard refused our credentials: say so, not "down"
            raise E.ShardUnavailableError(f"no shard answered GetShardMap: {errors}")
        if best.epoch == 0 and len(self._seeds) == 1:
            # A lone shard that was never given a map: it owns everything at its address.
            best = best.replace(epoch=0, shards={k: self._seeds[0] for k in best.shards})
        return best

    def refresh_shard_map(self) -> ShardMap:
        """Re-read the map (cluster file, then the shards); keeps the newest one seen."""
        candidates = [self._map]
        if self._cluster_file is not None:
            with contextlib.suppress(E.ConfigError):
                candidates.append(self._read_cluster_file())
        seeds = {*self._seeds, *(a for m in candidates for a in m.shards.values())}
        with contextlib.suppress(E.ShardUnavailableError):
            candidates.append(self._fetch_map(sorted(seeds)))
        newest = max(candidates, key=lambda m: m.epoch)
        with self._lock:
            if newest.epoch > self._map.epoch:
                self._map = newest
        return self._map

    def close(self) -> None:
        with self._lock:
            for ch, _ in self._channels.values():
                ch.close()
            self._channels.clear()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the scatter/gather engine ----------------------------------------------------------

    def _route(
        self, tables: Mapping[str, np.ndarray], pending: Mapping[str, np.ndarray | None]
    ) -> dict[int, list[_Part]]:
        """Group the pending positions of each table's unique ids by owning shard."""
        m = self._map
        out: dict[int, list[_Part]] = {}
        only = next(iter(m.shards)) if len(m.shards) == 1 else None
        for name, idx in pending.items():
            ids = tables[name] if idx is None else tables[name][idx]
            if not len(ids):
                continue
            if only is not None:  # one shard owns every slot: no hashing at all
                out.setdefault(only, []).append(_Part(name, idx))
                continue
            owners = m.owners(name, ids)
            first = owners[0]
            if not (owners != first).any():
                out.setdefault(int(first), []).append(_Part(name, idx))
                continue
            pos = np.arange(len(ids)) if idx is None else idx
            order = np.argsort(owners, kind="stable")
            cuts = np.flatnonzero(np.diff(owners[order])) + 1
            for chunk in np.split(order, cuts):
                out.setdefault(int(owners[chunk[0]]), []).append(_Part(name, pos[chunk]))
        return out

    def _scatter(
        self,
        uniq: Mapping[str, np.ndarray],
        call: str,
        build: Callable[[list[_Part], int], Any],
        on_result: Callable[[list[_Part], Any], None],
    ) -> None:
        """Send every table's unique ids to their owners until all are answered.

        A request that goes to one shard is one blocking call: a gRPC future costs a
        channel spin thread per call (~0.4 ms of CPU at 4096 ids); several shards are
        called at once through futures.

        A push whose outcome is unknown (DEADLINE_EXCEEDED, UNAVAILABLE) is retried as it
        was sent: to the same shard, routed by the same epoch, so with the same seq, even
        if the map changed meanwhile. That shard then answers "duplicate" if it applied
        it, or "stale" if it did not and no longer owns the slots; only then is it
        re-routed (with a new seq). Re-routing at once could apply it twice: once on the
        old owner, whose rows then moved, and once on the new one.
        """
        pending: dict[str, np.ndarray | None] = dict.fromkeys(uniq)  # None: all ids
        # (shard, parts, epoch, address) of pushes to resend as they were (see above); the
        # address is the current map's for that shard (it may have restarted elsewhere),
        # else the one it was sent to (a drained shard no longer in the map).
        sticky: list[tuple[int, list[_Part], int, str]] = []
        c = self.config
        md = self._metadata()
        delay = c.backoff_initial_s
        last: E.RecpsError | None = None
        attempt = 0
        frozen_until: float | None = None
        frozen_pause = _FROZEN_PAUSE_S
        while True:
            routed = self._route(uniq, pending) if pending else {}
            m = self._map
            routed = _one_request_per_address(routed, m.shards)
            sends = [(sh, parts, m.epoch, "") for sh, parts in routed.items()] + sticky
            sticky = []
            if not sends:
                return
            answers: list[tuple[int, str, list[_Part], int, Any]] = []
            if len(sends) == 1:
                ((shard, parts, epoch, sent_to),) = sends
                addr = m.shards.get(shard, sent_to)
                method = getattr(self._stub(addr), call)
                try:
                    resp: Any = method(build(parts, epoch), timeout=c.timeout_s, metadata=md)
                except grpc.RpcError as e:
                    resp = e
                answers.append((shard, addr, parts, epoch, resp))
            else:
                calls = []
                for shard, parts, epoch, sent_to in sends:
                    addr = m.shards.get(shard, sent_to)
                    req = build(parts, epoch)
                    fut = getattr(self._stub(addr), call).future(
                        req, timeout=c.timeout_s, metadata=md
                    )
                    calls.append((shard, addr, parts, epoch, fut))
                for shard, addr, parts, epoch, fut in calls:
                    try:
                        answers.append((shard, addr, parts, epoch, fut.result()))
                    except grpc.RpcError as e:
                        answers.append((shard, addr, parts, epoch, e))
            stale = False
            only_frozen = True
            failed: dict[str, list[np.ndarray | None]] = {}
            for shard, addr, parts, epoch, resp in answers:
                if isinstance(resp, grpc.RpcError):
                    code = resp.code()
                    err = from_rpc_error(resp, f"{call} to shard {shard} at {addr}")
                    frozen = isinstance(err, SlotFrozenError)
                    only_frozen = only_frozen and frozen
                    if code == _STALE and isinstance(err, E.StaleShardMapError):
                        stale = True
                    elif code not in _RETRY or isinstance(err, E.CapacityError):
                        raise err from None  # too big stays too big: no retry
                    last = err
                    if call == "Push" and code in _UNKNOWN_OUTCOME and not frozen:
                        sticky.append((shard, parts, epoch, addr))
                        continue
                    for p in parts:
                        failed.setdefault(p.table, []).append(p.idx)
                    continue
                on_result(parts, resp)
            if not failed and not sticky:
                return
            # A None part is a whole table and then the only part of that table.
            pending = {t: v[0] if v[0] is None else np.concatenate(v) for t, v in failed.items()}
            if only_frozen and not sticky:
                # A handover in progress: wait it out without spending retries. The
                # source answers "stale" once it has the new map; then we refresh.
                now = time.monotonic()
                if frozen_until is None:
                    frozen_until = now + _FROZEN_WAIT_S
                if now < frozen_until:
                    time.sleep(frozen_pause * (0.5 + random.random()))
                    # Short pauses: a freeze lasts ~0.1-0.2 s, and oversleeping it is pure stall.
                    frozen_pause = min(frozen_pause * 1.5, 0.05)
                    continue
            if attempt == c.max_retries:
                break
            attempt += 1
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, c.backoff_max_s)
            if stale or attempt >= 2:
                self.refresh_shard_map()
        assert last is not None
        raise last

    # ---- data plane ------------------------------------------------------------------------

    def lookup(
        self,
        batch: Mapping[str, Any],
        create_missing: bool = True,
        dtype: str = "float32",
        assume_unique: bool = False,
    ) -> dict[str, np.ndarray]:
        """Rows for ids of several tables: ``{table: ids}`` -> ``{table: float32 [n, dim]}``.

        ``create_missing=False`` (serving) returns initial vectors for unknown ids without
        storing them. ``dtype="float16"`` halves the bytes on the wire (but numpy's
        float32 <-> float16 conversions cost more CPU than the bytes save on loopback).
        ``assume_unique=True`` skips the client's dedup: the ids go on the wire as given
        (the caller promises they are unique, e.g. a worker's embedding collection, which
        already sends sorted unique ids). Duplicates are still answered correctly, only
        sent more than once. Strictly increasing ids skip the dedup either way.
        """
        want = wire.STORAGE_TO_WIRE[dtype]
        uniq: dict[str, np.ndarray] = {}
        inverse: dict[str, np.ndarray | None] = {}
        for t, v in batch.items():
            a = as_ids(v)
            uniq[t], inverse[t] = (a, None) if assume_unique else _unique_inverse(a)
        rows: dict[str, np.ndarray | None] = dict.fromkeys(uniq)

        def build(parts: list[_Part], epoch: int) -> ps_pb2.LookupRequest:
            req = ps_pb2.LookupRequest(
                shard_map_epoch=epoch, create_missing=create_missing, want_dtype=want
            )
            add = req.tables.add
            for p in parts:
                add(table=p.table, ids=wire.encode_ids(p.pick(uniq[p.table])))
            return req

        def on_result(parts: list[_Part], resp: ps_pb2.LookupResponse) -> None:
            for p, tr in zip(parts, resp.tables):
                t = p.table
                got = wire.decode_rows(tr.rows, p.size(uniq), tr.dim, tr.dtype, f"{t} rows")
                self._dims[t] = tr.dim
                if p.idx is None:  # this shard answered the whole table: no scatter
                    rows[t] = got
                    continue
                out = rows[t]
                if out is None:
                    out = rows[t] = np.empty((len(uniq[t]), tr.dim), np.float32)
                out[p.idx] = got

        self._for_chunks(uniq, lambda u: self._scatter(u, "Lookup", build, on_result))
        result = {}
        for t in uniq:
            r, inv = rows[t], inverse[t]
            if r is None:  # no ids for this table
                r = np.empty((0, self._dim_of(t)), np.float32)
            if inv is not None:
                r = r.take(inv, axis=0)
            elif not r.flags.writeable:  # a view of the response bytes: hand out a copy
                r = r.copy()
            result[t] = r
        return result

    def _dim_of(self, table: str) -> int:
        """The table's dim (an empty lookup still returns ``(0, dim)``): cached, else asked
        of a shard through ListTables; UnknownTableError if no shard holds the table."""
        dim = self._dims.get(table)
        if dim is None:
            for cfg in self.list_tables():
                self._dims[cfg.name] = cfg.dim
            dim = self._dims.get(table)
            if dim is None:
                raise E.UnknownTableError(table)
        return dim

    def push(
        self,
        grads: Mapping[str, tuple[Any, Any]],
        wait_durable: bool = False,
        assume_unique: bool = False,
    ) -> int:
        """Apply gradients ``{table: (ids, grads [n, dim])}``; duplicate ids are summed here.

        Returns the rows updated across shards. ``wait_durable`` returns only once the
        update is in each shard's write-ahead log. ``assume_unique=True`` skips the
        client's ``unique_sum`` (the caller promises unique ids, e.g. a worker's embedding
        collection, which sums duplicates itself); duplicates would still be summed by the
        shard. Strictly increasing ids skip the sum either way.
        """
        uniq: dict[str, np.ndarray] = {}
        sums: dict[str, np.ndarray] = {}
        for t, (i, g) in grads.items():
            a, ga = as_ids(i), _as_grads(g)
            if ga.ndim != 2 or len(ga) != len(a):
                raise E.LengthMismatchError(len(a), len(ga) if ga.ndim else 0)
            uniq[t], sums[t] = (a, ga) if assume_unique else unique_sum(a, ga)
        applied = [0]
        seqs: dict[tuple[int, tuple[tuple[str, int, int], ...]], int] = {}

        def build(parts: list[_Part], epoch: int) -> ps_pb2.PushRequest:
            # The same payload retried gets the same seq; a re-routed payload a new one.
            key = tuple(
                (p.table, 0 if p.idx is None else int(p.idx[0]), p.size(uniq)) for p in parts
            )
            seq = seqs.get((epoch, key))
            if seq is None:
                seq = seqs[(epoch, key)] = next(self._seq)
            req = ps_pb2.PushRequest(
                client_id=self.client_id,
                seq=seq,
                shard_map_epoch=epoch,
                wait_durable=wait_durable,
            )
            add = req.tables.add
            for p in parts:
                g = sums[p.table]
                add(
                    table=p.table,
                    ids=wire.encode_ids(p.pick(uniq[p.table])),
                    grads=wire.encode_rows(p.pick(g), ps_pb2.FLOAT32),
                    dim=g.shape[1],
                    dtype=ps_pb2.FLOAT32,
                )
            return req

        def on_result(parts: list[_Part], resp: ps_pb2.PushResponse) -> None:
            applied[0] += resp.applied_rows

        self._for_chunks(uniq, lambda u: self._scatter(u, "Push", build, on_result))
        return applied[0]

    def _for_chunks(
        self,
        uniq: dict[str, np.ndarray],
        fn: Callable[[dict[str, np.ndarray]], None],
    ) -> None:
        """Split huge batches so no single message exceeds the size limits."""
        limit = self.config.max_ids_per_request
        if sum(len(v) for v in uniq.values()) <= limit:
            fn(uniq)
            return
        raise E.InvalidArgumentError(
            f"batch of {sum(len(v) for v in uniq.values())} unique ids exceeds "
            f"max_ids_per_request={limit}; split it"
        )

    # ---- control plane ---------------------------------------------------------------------

    def _future(self, addr: str, call: str, request: Any, timeout: float, md: Any) -> Any:
        return getattr(self._stub(addr), call).future(request, timeout=timeout, metadata=md)

    def _each_shard(
        self,
        call: str,
        request: Any,
        timeout: float | None = None,
        retry_request: Any = None,
    ) -> dict[int, Any]:
        """The same request to every shard, concurrently; raises the first error.

        UNAVAILABLE and RESOURCE_EXHAUSTED are retried like the data plane's calls
        (jittered exponential backoff, at most ``max_retries`` times), asking again only
        the shards that failed, all within ``timeout`` for the whole call. Not
        DEADLINE_EXCEEDED: the call may still be running there (a long checkpoint).
        ``retry_request`` replaces ``request`` on retries where a blind repeat would not
        be idempotent.
        """
        m = self._map
        c = self.config
        deadline = time.monotonic() + (timeout or c.timeout_s)
        md = self._metadata()
        todo = sorted(m.shards.items())
        out: dict[int, Any] = {}
        delay = c.backoff_initial_s
        for attempt in range(c.max_retries + 1):
            left = max(deadline - time.monotonic(), 1e-3)
            futs = [(sid, addr, self._future(addr, call, request, left, md)) for sid, addr in todo]
            failed: list[tuple[int, str]] = []
            last: E.RecpsError | None = None
            for sid, addr, f in futs:
                try:
                    out[sid] = f.result()
                except grpc.RpcError as e:
                    err = from_rpc_error(e, f"{call} on shard {sid} at {addr}")
                    if e.code() not in _CONTROL_RETRY:
                        raise err from None
                    failed.append((sid, addr))
                    last = err
            if not failed:
                return out
            assert last is not None
            pause = delay * (0.5 + random.random())
            if attempt == c.max_retries or time.monotonic() + pause >= deadline:
                raise last
            time.sleep(pause)
            delay = min(delay * 2, c.backoff_max_s)
            todo = failed
            if retry_request is not None:
                request = retry_request
        raise AssertionError("unreachable")

    def create_table(self, config: TableConfig, if_not_exists: bool = True) -> None:
        """Create the table on every shard (each holds its own slots' rows)."""
        spec = wire.spec_from_config(config)
        req = ps_pb2.CreateTableRequest(spec=spec, if_not_exists=if_not_exists)
        # A retry may follow a first try that did create the table: an equal spec there
        # is then ours, not a conflict (a different spec still raises TableExistsError).
        again = ps_pb2.CreateTableRequest(spec=spec, if_not_exists=True)
        self._each_shard("CreateTable", req, retry_request=again)
        self._dims[config.name] = config.dim

    def list_tables(self) -> list[TableConfig]:
        resp = self._each_shard("ListTables", ps_pb2.ListTablesRequest())
        first = resp[min(resp)]
        return [wire.config_from_spec(s) for s in first.tables]

    def stats(self, fresh_slot_rows: bool = False) -> dict[int, ps_pb2.StatsResponse]:
        """Every shard's ``StatsResponse``; ``fresh_slot_rows`` makes each shard count its
        rows per slot now (a scan) instead of reusing its last periodic count."""
        req = ps_pb2.StatsRequest(fresh_slot_rows=fresh_slot_rows)
        # A fresh count scans every table of the shard: give it time.
        timeout = max(self.config.timeout_s, 600.0) if fresh_slot_rows else None
        return self._each_shard("Stats", req, timeout=timeout)

    def slot_stats(self, fresh: bool = True) -> SlotStats:
        """Per-slot rows, bytes, requests and request rates of the whole cluster (each
        shard reports the slots it owns), the input of
        :func:`recps.ps.rebalance_plan.plan_rebalance`. ``qps`` is None unless every
        shard reports rates.

        Example:
            >>> s = client.slot_stats()  # doctest: +SKIP
            >>> int(s.rows.sum()), s.rows.shape  # doctest: +SKIP
            (1000000, (16384,))
        """
        n = self._map.num_slots
        rows, nbytes, reqs = (np.zeros(n, np.int64) for _ in range(3))
        qps: np.ndarray | None = np.zeros(n, np.float64)
        for r in self.stats(fresh_slot_rows=fresh).values():
            ids = np.asarray(r.slot_ids, dtype=np.int64)
            rows[ids] = r.slot_rows
            nbytes[ids] = r.slot_bytes
            reqs[ids] = r.slot_requests
            if qps is not None and len(r.slot_qps) == len(ids):
                qps[ids] = r.slot_qps
            else:  # a shard from before rates: balance every slot by counts
                qps = None
        return SlotStats(rows, nbytes, reqs, qps)

    def checkpoint(self, directory: str, tag: str = "") -> dict[int, ps_pb2.CheckpointResponse]:
        """A checkpoint of every shard under ``directory/tag/shard-N``.

        Retried on UNAVAILABLE / RESOURCE_EXHAUSTED like every control-plane call. A
        checkpoint's tag may be written once, so the request carries a fresh
        ``request_id``: a retry whose first try did complete finds that shard's complete
        checkpoint under the same id and answers as the first try would have; any other
        existing checkpoint of that tag is still refused.
        """
        tag = tag or time.strftime("ckpt-%Y%m%d-%H%M%S")
        req = ps_pb2.CheckpointRequest(dir=directory, tag=tag, request_id=uuid.uuid4().hex)
        # Every shard of the newest map: a rebalance's last change (a drained shard leaving
        # the map) is answered "stale" by no shard, so this client may still list it.
        self.refresh_shard_map()
        return self._each_shard("Checkpoint", req, timeout=3600)

    def restore(self, directory: str, tag: str) -> dict[int, ps_pb2.RestoreResponse]:
        """Roll every shard back to ``directory/tag/shard-N`` written by :meth:`checkpoint`.

        Every shard first checks its part (a dry run), so a checkpoint missing a shard's
        part or taken under another slot layout changes no shard. Both steps are retried
        on UNAVAILABLE / RESOURCE_EXHAUSTED: restoring the same checkpoint twice leaves
        the same state (run it with training stopped: a repeat after a lost answer would
        also roll back pushes made in between).
        """
        dry = ps_pb2.RestoreRequest(dir=directory, tag=tag, dry_run=True)
        self.refresh_shard_map()  # see checkpoint()
        self._each_shard("Restore", dry, timeout=self.config.timeout_s)
        return self._each_shard(
            "Restore", ps_pb2.RestoreRequest(dir=directory, tag=tag), timeout=3600
        )

    def install_shard_map(self, new: ShardMap, addresses: Iterable[str] | None = None) -> None:
        """Install ``new`` on the given shards (default: every shard it names) through
        ``UpdateShardMap``; a shard that already holds a newer or equal epoch raises
        :class:`StaleShardMapError`. The client then routes with ``new``."""
        targets = list(addresses) if addresses is not None else list(new.shards.values())
        futs = [
            (
                a,
                self._stub(a).UpdateShardMap.future(
                    new.to_proto(), timeout=self.config.timeout_s, metadata=self._metadata()
                ),
            )
            for a in targets
        ]
        for a, f in futs:
            try:
                f.result()
            except grpc.RpcError as e:
                raise from_rpc_error(e, f"UpdateShardMap on {a}") from None
        with self._lock:
            if new.epoch > self._map.epoch:
                self._map = new

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until every shard answers (after a restart, say)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._each_shard("GetShardMap", ps_pb2.GetShardMapRequest(), timeout=1.0)
                return
            except E.RecpsError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
