"""The serving-PS replica: read-only embedding lookups from exported model versions.

A replica serves one version of a model root (see :mod:`recps.serving.model_format`) at a
time. Loading a version *ingests* its SST files for the serving shards the replica holds
into one RocksDB per table under ``data_dir`` (no rewrite of any row); lookups go through
an in-memory cache of hot decoded rows (:class:`~recps.serving.cache.RowCache`), then a
RocksDB multi-get. An id without a row gets its table's default vector (zeros, or the
training initializer's deterministic vector), never an error.

Layout of ``data_dir``::

    data_dir/versions/<version:012d>-<tag>/<table>/   one RocksDB per table of a version
    data_dir/versions/<version:012d>-<tag>/READY      written last: the ingest finished
    data_dir/versions/<version:012d>-<tag>/DELTAS.json  last delta applied per training shard
    data_dir/state.json     current, previous and pinned version (survives restarts)
    data_dir/server.json    address, port and pid of the running process

**Ingest without copying.** Each SST file is hard-linked into a staging folder beside the
DB and ingested with ``IngestExternalFileOptions.set_move_files(True)``: RocksDB links
the staged name into the DB and unlinks the staged name, so the DB's file *is* the
exported file (same inode, no bytes copied) and the model directory stays intact for
other replicas and for rollback. Ingesting the model's file itself with move semantics
would unlink it from the model directory; plain copy semantics would copy every byte.
Where a hard link is impossible (another filesystem) the file is copied once into
staging. Files are ingested one at a time, because parts of one (table, shard) may
overlap in key range. Auto-compaction is off: nothing writes, so files stay as exported.

**Hot swap.** A new version is loaded fully on the loading thread while the old one keeps
serving, then one reference is swapped under a lock. A request takes a reference (a
refcount) on the version it started on and finishes there; a retired version closes once
its last request is done. The previous version stays open for :meth:`rollback`.

**Online updates.** With ``delta_dir`` the replica polls the training shards' delta
stream (:mod:`recps.ps.delta`) and ingests each new complete delta into the current
version's DBs, in seq order per training shard (a later ingest wins on equal keys), then
drops the cached rows of the delta's ids. The last seq applied per training shard is
kept in the version's folder, so a restart continues from there; a freshly loaded
version starts from the seqs its manifest records (``delta_seqs``).

Example:
    >>> cfg = ReplicaConfig(model="/models/ctr", data_dir="/srv/r0")
    >>> replica = ServingReplica(cfg)  # doctest: +SKIP
    >>> rows = replica.lookup({"user": np.array([3, 1, 3])})["user"]  # doctest: +SKIP
    >>> replica.load_version(None).current.version  # newest complete version  # doctest: +SKIP
    120
    >>> replica.rollback().current.version  # doctest: +SKIP
    110
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rocksdict as rd

from recps.embedding import errors as E
from recps.embedding.base import unsorted_parts
from recps.embedding.config import InitializerConfig
from recps.embedding.initializers import RowInitializer
from recps.ps import delta as D
from recps.ps.config import DEFAULT_MAX_MESSAGE_BYTES, TlsConfig, cpu_rpc_workers
from recps.ps.routing import ShardMap, slots_of_tables
from recps.serving import model_format as mf
from recps.serving.cache import CacheStats, RowCache
from recps.serving.errors import (
    ModelLoadError,
    NoModelVersionError,
    NoPreviousVersionError,
    ShardNotHeldError,
    VersionNotHeldError,
)

log = logging.getLogger("recps.serving.replica")

READY_FILE = "READY"
DELTAS_FILE = "DELTAS.json"
STATE_FILE = "state.json"
_STAGING = ".staging"
# rocksdict releases the GIL inside get(): two halves of a large multi-get overlap.
_PARALLEL_GET_MIN_KEYS = 512
_get_pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="recps-serve-get")


@dataclass(frozen=True)
class ReplicaConfig:
    """One serving replica. ``model`` is a model root (the newest complete version is
    served) or one version directory (that version, pinned).

    Example:
        >>> ReplicaConfig(model="/models/ctr", data_dir="/srv/r0", shards=(0, 1)).shards
        (0, 1)
    """

    model: str
    data_dir: str
    shards: tuple[int, ...] | None = None  # serving shards held; None = every shard
    version: int | None = None  # pin this version; None = the newest (or the last pinned)
    host: str = "127.0.0.1"  # loopback unless an operator opens it up on purpose
    port: int = 0
    # Decoded rows kept in memory per table: (4 * dim + 60) bytes each, ~12 MB at dim 16.
    cache_rows: int = 100_000
    block_cache_bytes: int = 64 << 20  # RocksDB blocks, shared by every table and version
    watch_interval_s: float = 0.0  # poll the root for newer versions; 0 = never
    verify_checksums: bool = True  # sha256 of every ingested file against the manifest
    max_ids_per_request: int = 1 << 20  # beyond: RESOURCE_EXHAUSTED (split the batch)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Beyond this many calls in flight gRPC answers RESOURCE_EXHAUSTED at once.
    max_concurrent_rpcs: int = 64
    # gRPC threads; lookups hold the GIL for most of their work (see cpu_rpc_workers)
    max_workers: int = field(default_factory=cpu_rpc_workers)
    tls: TlsConfig | None = None
    auth_token: str | None = None  # bearer token required in call metadata when set
    metrics_port: int | None = None  # None: no Prometheus endpoint; 0: ephemeral
    shutdown_grace_s: float = 10.0
    # The training shards' delta stream (recps.ps.delta); None: follow exports only.
    delta_dir: str | None = None
    delta_interval_s: float = 1.0  # how often the delta root is polled

    def __post_init__(self) -> None:
        if self.delta_interval_s <= 0:
            raise E.ConfigError("delta_interval_s must be > 0")
        if not self.model or not self.data_dir:
            raise E.ConfigError("a replica needs model and data_dir")
        if self.shards is not None:
            shards = tuple(sorted({int(s) for s in self.shards}))
            if not shards or shards[0] < 0:
                raise E.ConfigError(f"shards must be non-negative ids, got {self.shards}")
            object.__setattr__(self, "shards", shards)
        if self.version is not None and self.version < 0:
            raise E.ConfigError(f"version must be >= 0, got {self.version}")
        if not 0 <= self.port < 65536:
            raise E.ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.cache_rows < 0 or self.block_cache_bytes < 0:
            raise E.ConfigError("cache_rows and block_cache_bytes must be >= 0")
        if self.watch_interval_s < 0:
            raise E.ConfigError("watch_interval_s must be >= 0 (0 = no watching)")
        if self.max_ids_per_request < 1 or self.max_message_bytes < 1 << 20:
            raise E.ConfigError("max_ids_per_request >= 1 and max_message_bytes >= 1 MiB")
        if self.max_concurrent_rpcs < 1 or self.max_workers < 1:
            raise E.ConfigError("max_concurrent_rpcs and max_workers must be >= 1")
        if self.tls is not None and not (self.tls.cert_file and self.tls.key_file):
            raise E.ConfigError("server TLS needs cert_file and key_file")


# ---- status values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TableStatus:
    table: str
    dim: int
    row_format: str
    default_kind: str
    rows: int  # rows of the held shards
    disk_bytes: int
    cache: CacheStats


@dataclass(frozen=True)
class VersionStatus:
    version: int
    path: str
    tables: tuple[TableStatus, ...]
    loaded_at: float
    load_seconds: float


@dataclass(frozen=True)
class DeltaShardStatus:
    """The delta stream of one training shard, as applied to the current version."""

    training_shard: int
    applied_seq: int  # last delta applied (the version's recorded seq before any)
    latest_seq: int  # newest complete delta in the delta root
    lag_s: float  # the last applied delta: application time - publish time (-1: none yet)
    applied_at: float  # unix seconds of that application (0: none yet)
    error: str  # why the stream stopped (a gap: a new export is needed); "" when fine


@dataclass(frozen=True)
class DeltaStatus:
    delta_dir: str
    shards: tuple[DeltaShardStatus, ...]
    applied_total: int  # deltas this process applied


@dataclass(frozen=True)
class ReplicaStatus:
    current: VersionStatus | None
    previous: VersionStatus | None
    model_root: str
    shards: tuple[int, ...]  # held by the current version (the config's, before a load)
    pinned_version: int | None
    watch_interval_s: float
    latest_available: int | None
    uptime_s: float
    delta: DeltaStatus | None = None  # None: no delta_dir


@dataclass(frozen=True)
class LoadResult:
    current: VersionStatus
    previous: VersionStatus | None
    changed: bool
    seconds: float


# ---- one table of one version ----------------------------------------------------------------


class _AdmitGuard:
    """Orders cache admissions against applied deltas for one version. A lookup notes
    ``epoch`` before it reads RocksDB and admits its rows only if no delta was applied
    since (under ``lock``); applying a delta bumps ``epoch`` and drops the delta's cached
    ids under the same lock. So a row read before a delta never lands in the cache after
    it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.epoch = 0


def _unique_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Unique ids and the inverse; None when already strictly increasing (a client's
    deduplicated batch): no sort at all."""
    if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
        return ids, None
    return np.unique(ids, return_inverse=True)


class _ServingTable:
    """One table of one version: its RocksDB, its default vectors, and its place in the
    version's row cache (shared by the tables of one dim, see :mod:`.cache`)."""

    def __init__(
        self, name: str, spec: mf.TableSpec, db: rd.Rdict, rows: int, disk_bytes: int
    ) -> None:
        self.name, self.dim, self.row_format = name, spec.dim, spec.row_format
        self.db = db
        self.rows, self.disk_bytes = rows, disk_bytes
        self.value_bytes = mf.row_bytes(spec.dim, spec.row_format)
        self.cache = RowCache(spec.dim, 0)  # replaced by the version's shared cache
        self.cache_index = 0  # this table's index in that cache
        self.guard = _AdmitGuard()  # replaced by the version's
        self.default = dict(spec.default)
        self.default_kind = str(self.default.get("kind", "zeros"))
        self._init: RowInitializer | None = None
        if self.default_kind == "initializer":
            cfg = InitializerConfig(**self.default.get("initializer", {}))
            if cfg.kind != "zeros" and cfg.scale:
                # The training store's generator: same (table, id, seed) -> same bits.
                self._init = RowInitializer(name, spec.dim, cfg)
        elif self.default_kind != "zeros":
            raise mf.ModelFormatError(
                f"table {name!r}: unknown default kind {self.default_kind!r} "
                "(expected 'zeros' or 'initializer')"
            )

    def initializer_config(self) -> InitializerConfig:
        if self.default_kind == "initializer":
            return InitializerConfig(**self.default.get("initializer", {}))
        return InitializerConfig(kind="zeros", scale=0.0)

    def defaults(self, ids: np.ndarray) -> np.ndarray:
        if self._init is None:
            return np.zeros((len(ids), self.dim), np.float32)
        return self._init(ids)

    def _multi_get(self, keys: list[bytes]) -> list[bytes]:
        # b"" marks a missing key (never a stored value: values have a fixed, nonzero size),
        # so lengths and the join below need no per-key Python branch.
        if len(keys) < _PARALLEL_GET_MIN_KEYS:
            return self.db.get(keys, b"")
        half = len(keys) // 2
        second = _get_pool.submit(self.db.get, keys[half:], b"")
        return self.db.get(keys[:half], b"") + second.result()

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float32 ``[len(ids), dim]`` rows, duplicates allowed (one table alone; a
        request goes through :func:`_lookup_group`)."""
        return _lookup_group([self], [ids])[0]

    def get(self, keys: list[bytes]) -> list[bytes]:
        """Values of ``keys`` (b"" where absent)."""
        try:
            return self._multi_get(keys)
        except Exception as e:  # rocksdict raises plain Exception
            raise E.StorageError(f"table {self.name!r}: RocksDB read failed: {e}") from e

    def decode(self, ids: np.ndarray, values: list[bytes], raw: bytes | None = None) -> np.ndarray:
        """float32 rows of ``ids`` from their ``values`` (``raw``: their concatenation, if
        the caller has it); the default vector where a value is absent."""
        if raw is None:
            raw = b"".join(values)
        width = self.value_bytes
        if len(raw) == width * len(ids):  # every id has a row (the common case): no scan
            return mf.decode_rows(raw, self.dim, self.row_format)
        lens = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        present = lens > 0
        n_present = int(np.count_nonzero(present))
        if len(raw) != width * n_present:
            bad = int(np.flatnonzero(present & (lens != width))[0])
            raise E.StorageError(
                f"table {self.name!r}: id {int(ids[bad])} has a {int(lens[bad])}-byte value, "
                f"expected {width} ({self.row_format}, dim {self.dim}); the ingested model "
                "is corrupt"
            )
        out = np.empty((len(ids), self.dim), np.float32)
        if n_present:
            out[present] = mf.decode_rows(raw, self.dim, self.row_format)
        absent = ~present
        out[absent] = self.defaults(ids[absent])
        return out

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` from RocksDB; the default vector where there is none."""
        return self.decode(ids, self.get(mf.encode_keys(ids)))

    def status(self) -> TableStatus:
        return TableStatus(
            self.name,
            self.dim,
            self.row_format,
            self.default_kind,
            self.rows,
            self.disk_bytes,
            self.cache.stats(self.cache_index),
        )

    def close(self) -> None:
        self.db.close()


def _fetch_tables(
    tables: Sequence[_ServingTable],
    uids: np.ndarray,
    which: np.ndarray,
    miss: np.ndarray,
    rows: np.ndarray,
) -> None:
    """``rows[miss] =`` the stored (or default) rows of ``uids[miss]``, whose tables
    (cache indexes ``which[miss]``) are sorted. One key encoding for all tables, one
    multi-get per table, then one join and one decode per row format."""
    mt = which[miss]
    index = np.array([t.cache_index for t in tables])
    bounds = np.searchsorted(mt, np.stack([index, index + 1]))
    keys = mf.encode_keys(uids[miss])
    by_format: dict[str, list[tuple[_ServingTable, int, int, list[bytes]]]] = {}
    for t, lo, hi in zip(tables, bounds[0].tolist(), bounds[1].tolist()):
        if hi > lo:
            by_format.setdefault(t.row_format, []).append((t, lo, hi, t.get(keys[lo:hi])))
    for fmt, parts in by_format.items():
        t0 = parts[0][0]
        width = t0.value_bytes
        pos = np.concatenate([miss[lo:hi] for _, lo, hi, _ in parts])
        raw = b"".join(itertools.chain.from_iterable(p[3] for p in parts))
        if len(raw) == len(pos) * width:  # every id has a row: one decode, no scan
            rows[pos] = mf.decode_rows(raw, t0.dim, fmt)
            continue
        lens = np.fromiter(
            map(len, itertools.chain.from_iterable(p[3] for p in parts)), np.int64, len(pos)
        )
        present = lens > 0
        if len(raw) != width * int(np.count_nonzero(present)):
            bad = int(np.flatnonzero(present & (lens != width))[0])
            raise E.StorageError(
                f"id {int(uids[pos[bad]])} has a {int(lens[bad])}-byte value, expected "
                f"{width} ({fmt}, dim {t0.dim}); the ingested model is corrupt"
            )
        rows[pos[present]] = mf.decode_rows(raw, t0.dim, fmt)
        start = 0
        for t, lo, hi, _ in parts:  # defaults: zeros, or the table's initializer
            absent = ~present[start : start + hi - lo]
            if absent.any():
                m = miss[lo:hi][absent]
                rows[m] = t.defaults(uids[m])
            start += hi - lo


def _lookup_group(tables: Sequence[_ServingTable], ids: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Rows for ``ids[i]`` of ``tables[i]``, tables of one dim sharing one cache.

    Vectorized across the tables, because a ranking request is ~26 tables of ~100 ids and
    numpy's per-call cost, not the work, dominates per-table code: one key hash, one
    ``np.unique``, one cache probe, one admission and one final gather for all of them;
    only the RocksDB reads of the misses go table by table.
    """
    cache = tables[0].cache
    guard = tables[0].guard
    seen = guard.epoch  # before any read: see _AdmitGuard
    lens = [len(i) for i in ids]
    flat = np.concatenate(ids) if len(ids) > 1 else np.asarray(ids[0])
    which = np.repeat(np.array([t.cache_index for t in tables], dtype=np.intp), lens)
    keys = cache.keys(flat, which)
    inverse: np.ndarray | None = None
    if not unsorted_parts(flat, lens).any():
        # Clients send each table's ids sorted and unique (ServingClient and PSClient
        # both do): the pairs are unique already, and the rows need no gather back.
        ukeys, uids, uwhich = keys, flat, which
    else:
        ukeys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        uids, uwhich = flat[first], which[first]
    if (
        inverse is not None
        and len(ukeys) < len(flat)
        and not (np.array_equal(uids[inverse], flat) and np.array_equal(uwhich[inverse], which))
    ):
        # Two different (table, id) pairs share a 64-bit key (odds ~n^2 / 2^64): one
        # table at a time instead, where the key is a bijection of the id, so exact.
        assert len(tables) > 1, "one table's keys cannot collide"
        return [_lookup_group([t], [i])[0] for t, i in zip(tables, ids)]
    hit, cached = cache.lookup(uids, uwhich, ukeys)
    if len(cached) == len(ukeys):
        rows = cached
    else:
        rows = np.empty((len(ukeys), tables[0].dim), np.float32)
        if len(cached):
            rows[hit] = cached
        miss = np.flatnonzero(~hit)
        if len(tables) == 1:
            rows[miss] = tables[0].fetch(uids[miss])
        else:
            miss = miss[np.argsort(uwhich[miss], kind="stable")]  # in table order
            _fetch_tables(tables, uids, uwhich, miss, rows)
        with guard.lock:
            if guard.epoch == seen:  # else a delta landed meanwhile: these may be older
                # Keys are unique only if np.unique made them so; else admit checks.
                keys_ok = None if inverse is None else ukeys[miss]
                cache.admit(uids[miss], rows[miss], uwhich[miss], keys_ok)
    full = rows if inverse is None else rows.take(inverse.reshape(-1), axis=0)
    out, start = [], 0
    for n in lens:
        out.append(full[start : start + n])
        start += n
    return out


# ---- one loaded version ----------------------------------------------------------------------


class _Version:
    """A loaded model version; closed once retired and no request holds it."""

    def __init__(
        self,
        manifest: mf.ModelManifest,
        directory: Path,
        tables: dict[str, _ServingTable],
        held: tuple[int, ...],
        load_seconds: float,
        cache_rows: int,
    ) -> None:
        self.manifest = manifest
        self.version = manifest.version
        self.path = str(manifest.path)
        self.dir = directory
        self.tables = tables
        self.held = held
        self.loaded_at = time.time()
        self.load_seconds = load_seconds
        self.refs = 0
        self.retired = False
        self.keep_files = False  # True: closing keeps the ingested DBs (replica shutdown)
        m = manifest.shard_map
        self.shard_map = m
        self.holds_all = set(held) >= set(np.unique(m.slot_owner).tolist())
        self._held_mask = np.zeros(max(m.shards) + 1, dtype=bool)
        self._held_mask[list(held)] = True
        self.guard = _AdmitGuard()
        # The delta stream applied to this version: training shard -> last seq applied.
        self.applied: dict[int, int] = dict(manifest.delta_seqs)
        self.delta_lag_s: dict[int, float] = {}
        self.delta_applied_at: dict[int, float] = {}
        self.delta_errors: dict[int, str] = {}
        by_dim: dict[int, list[_ServingTable]] = {}
        for _, t in sorted(tables.items()):
            t.guard = self.guard
            by_dim.setdefault(t.dim, []).append(t)
        for dim, group in by_dim.items():
            # cache_rows per table; the tables of a dim pool their room in one cache.
            cache = RowCache(dim, cache_rows * len(group), tables=len(group))
            for k, t in enumerate(group):
                t.cache, t.cache_index = cache, k

    def lookup(self, tables: list[_ServingTable], ids: list[np.ndarray]) -> list[np.ndarray]:
        """Rows of each (table, ids) pair; the tables of one dim in one cache pass."""
        if len(tables) == 1:
            return [tables[0].lookup(ids[0])]
        groups: dict[int, list[int]] = {}
        for k, t in enumerate(tables):
            if len(ids[k]):
                groups.setdefault(id(t.cache), []).append(k)
        out = [np.empty((0, t.dim), np.float32) for t in tables]
        for ks in groups.values():
            for k, rows in zip(ks, _lookup_group([tables[k] for k in ks], [ids[k] for k in ks])):
                out[k] = rows
        return out

    def table(self, name: str) -> _ServingTable:
        t = self.tables.get(name)
        if t is None:
            raise E.UnknownTableError(name)
        return t

    def check_held(self, names: list[str], ids: list[np.ndarray]) -> None:
        """Refuse ids whose serving shard this replica does not hold (one hash pass)."""
        if self.holds_all:
            return
        m = self.shard_map
        owner = m.slot_owner[slots_of_tables(names, ids, m.num_slots)]
        ok = self._held_mask[owner]
        if ok.all():
            return
        i = int(np.argmin(ok))
        ends = np.cumsum([len(x) for x in ids])
        k = int(np.searchsorted(ends, i, side="right"))  # the table of id i
        lo = int(ends[k]) - len(ids[k])
        bad = np.unique(owner[lo : ends[k]][~ok[lo : ends[k]]]).tolist()
        raise ShardNotHeldError(names[k], bad, self.held, m.epoch)

    def status(self) -> VersionStatus:
        return VersionStatus(
            self.version,
            self.path,
            tuple(t.status() for _, t in sorted(self.tables.items())),
            self.loaded_at,
            self.load_seconds,
        )

    def close(self) -> None:
        for t in self.tables.values():
            with contextlib.suppress(Exception):
                t.close()
        if not self.keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---- the replica -----------------------------------------------------------------------------


@dataclass
class _State:
    """What survives a restart (``state.json``)."""

    current: int | None = None
    previous: int | None = None
    pinned: int | None = None


class ServingReplica:
    """Loads, serves and swaps model versions; thread-safe. No gRPC here (see
    :class:`recps.serving.replica_server.ReplicaServer` for the network service).

    Raises :class:`~recps.serving.model_format.ModelNotFoundError` at start when the root
    holds no complete version and the replica does not watch it.
    """

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        self.started = time.time()
        model = Path(config.model)
        pinned = config.version
        if (model / mf.MANIFEST_FILE).is_file() or (model / mf.COMPLETE_FILE).is_file():
            # A version directory: serve exactly it; its parent is the root.
            try:
                pinned = int(model.name)
            except ValueError:
                raise E.ConfigError(
                    f"{model} looks like a model version but its name is not a version number"
                ) from None
            model = model.parent
        self.root = model.resolve()
        self.data_dir = Path(config.data_dir)
        self.versions_dir = self.data_dir / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._block_cache = rd.Cache(config.block_cache_bytes) if config.block_cache_bytes else None
        self._ref_lock = threading.Lock()  # guards current/previous and refcounts
        self._load_lock = threading.Lock()  # one load, rollback or swap at a time
        self._current: _Version | None = None
        self._previous: _Version | None = None
        self._tags = itertools.count()
        self._janitor = futures.ThreadPoolExecutor(1, thread_name_prefix="recps-serve-close")
        self._closed = threading.Event()
        self._failed: dict[int, float] = {}  # version -> monotonic time of its failed load
        self.swaps = 0
        self.load_failures = 0
        self.deltas_applied = 0
        # Called (no arguments, no locks held) after every change of the served version.
        self.on_change: list[Callable[[], None]] = []
        state = self._read_state()
        self._pinned = pinned if pinned is not None else state.pinned
        try:
            self._startup(state)
        except BaseException:
            self._janitor.shutdown(wait=False)
            raise
        self._watcher: threading.Thread | None = None
        if config.watch_interval_s > 0:
            self._watcher = threading.Thread(
                target=self._watch, name="recps-serve-watch", daemon=True
            )
            self._watcher.start()
        self._delta_poller: threading.Thread | None = None
        if config.delta_dir:
            self._delta_poller = threading.Thread(
                target=self._delta_watch, name="recps-serve-delta", daemon=True
            )
            self._delta_poller.start()

    # ---- state on disk -----------------------------------------------------------------------

    def _read_state(self) -> _State:
        path = self.data_dir / STATE_FILE
        if not path.exists():
            return _State()
        try:
            d = json.loads(path.read_text())
            return _State(d.get("current"), d.get("previous"), d.get("pinned"))
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", path, e)
            return _State()

    def _write_state(self) -> None:
        cur, prev = self._current, self._previous
        d = {
            "current": cur.version if cur else None,
            "previous": prev.version if prev else None,
            "pinned": self._pinned,
            "current_dir": cur.dir.name if cur else None,
            "previous_dir": prev.dir.name if prev else None,
            # For operators; the authority is the version folder's DELTAS.json.
            "delta_applied": {str(k): x for k, x in sorted(cur.applied.items())} if cur else {},
        }
        path = self.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(d))
        tmp.replace(path)

    def _startup(self, state: _State) -> None:
        target = self._pinned if self._pinned is not None else mf.latest_version(self.root)
        if target is None:
            if self.config.watch_interval_s > 0:
                log.info("no complete version under %s yet; watching for one", self.root)
                self._sweep_dirs()
                return
            raise mf.ModelNotFoundError(self.root)
        current = self._build(target)
        previous = None
        # The version to roll back to: the one served before this start, unless that is
        # the target again (then the one before it).
        before = state.current if state.current != target else state.previous
        if before is not None and before != target:
            # Reopened only when its ingested DBs are still here (cheap: no ingest);
            # otherwise rollback starts empty.
            with contextlib.suppress(E.RecpsError):
                if self._ready_dir(before, self._held_for_config(), None) is not None:
                    previous = self._build(before, reuse_only=True)
        with self._ref_lock:
            self._current, self._previous = current, previous
        self._sweep_dirs()
        self._write_state()
        log.info("serving version %d from %s", current.version, current.path)

    def _sweep_dirs(self) -> None:
        """Remove version folders no loaded version uses (left by an earlier process)."""
        keep = {v.dir for v in (self._current, self._previous) if v is not None}
        for d in self.versions_dir.iterdir():
            if d not in keep:
                shutil.rmtree(d, ignore_errors=True)

    # ---- loading -----------------------------------------------------------------------------

    def _held_for_config(self) -> tuple[int, ...] | None:
        return self.config.shards

    def _held_for(self, manifest: mf.ModelManifest) -> tuple[int, ...]:
        shards = tuple(sorted(manifest.shard_map.shards))
        if self.config.shards is None:
            return shards
        missing = sorted(set(self.config.shards) - set(shards))
        if missing:
            raise mf.ModelFormatError(
                f"model version {manifest.version} has serving shards {list(shards)}; this "
                f"replica is configured for {list(self.config.shards)} ({missing} do not exist)"
            )
        return self.config.shards

    def _db_options(self) -> rd.Options:
        opts = rd.Options(raw_mode=True)
        opts.create_if_missing(True)
        # Without a delta stream the data is read-only: ingested files stay as exported
        # (hard links), no background rewrites. With one, every delta ingests files that
        # overlap the base: they pile up in L0 and each lookup would probe them all, so
        # RocksDB compacts them in the background as for any written DB.
        opts.set_disable_auto_compactions(not self.config.delta_dir)
        opts.set_level_zero_file_num_compaction_trigger(4)
        opts.set_compression_type(rd.DBCompressionType.none())
        bbo = rd.BlockBasedOptions()
        # The reader must name a bloom policy, or the filters baked into the files go unused.
        bbo.set_bloom_filter(10, False)
        if self._block_cache is not None:
            bbo.set_block_cache(self._block_cache)
        else:
            bbo.disable_cache()
        bbo.set_cache_index_and_filter_blocks(True)
        bbo.set_pin_l0_filter_and_index_blocks_in_cache(True)
        opts.set_block_based_table_factory(bbo)
        return opts

    def _ready_dir(
        self, version: int, held: tuple[int, ...] | None, manifest_sha: str | None
    ) -> Path | None:
        """A folder of an earlier, finished ingest of this version for these shards."""
        in_use = {v.dir for v in (self._current, self._previous) if v is not None}
        for d in sorted(self.versions_dir.glob(f"{version:0{mf.VERSION_DIGITS}d}-*")):
            if d in in_use:
                continue
            try:
                ready = json.loads((d / READY_FILE).read_text())
            except (OSError, ValueError):
                continue
            if ready.get("version") != version:
                continue
            if held is not None and tuple(ready.get("shards", ())) != held:
                continue
            if manifest_sha is not None and ready.get("manifest_sha256") != manifest_sha:
                continue
            return d
        return None

    def _build(self, version: int, reuse_only: bool = False) -> _Version:
        """Open ``version``: reuse an earlier ingest of it, or ingest its SST files."""
        t0 = time.perf_counter()
        vdir = mf.version_dir(self.root, version)
        manifest = mf.ModelManifest.load(vdir, verify=False)  # the files: verified below
        if manifest.version != version:
            raise mf.ModelFormatError(
                f"{vdir}/manifest.json says version {manifest.version}, its folder {version}"
            )
        held = self._held_for(manifest)
        manifest_sha = mf.file_sha256(vdir / mf.MANIFEST_FILE)
        directory = self._ready_dir(version, held, manifest_sha)
        ingest = directory is None
        if ingest:
            if reuse_only:
                raise ModelLoadError(f"no finished ingest of version {version} to reuse")
            tag = f"{os.getpid()}-{next(self._tags)}"
            directory = self.versions_dir / f"{version:0{mf.VERSION_DIGITS}d}-{tag}"
            directory.mkdir(parents=True)
        assert directory is not None
        tables: dict[str, _ServingTable] = {}
        try:
            for name, spec in sorted(manifest.tables.items()):
                files = [rel for s in held for rel in manifest.sst_files(name, s)]
                entries = [manifest.files[rel] for rel in files]
                db = self._open_db(directory / name)
                table = _ServingTable(
                    name,
                    spec,
                    db,
                    rows=sum(e.rows or 0 for e in entries),
                    disk_bytes=sum(e.bytes for e in entries),
                )
                tables[name] = table
                if ingest:
                    self._ingest(db, vdir, files, manifest, directory / _STAGING / name)
            if ingest:
                shutil.rmtree(directory / _STAGING, ignore_errors=True)
                ready = {
                    "version": version,
                    "shards": list(held),
                    "manifest_sha256": manifest_sha,
                    "tables": sorted(tables),
                    "source": str(vdir),
                }
                (directory / READY_FILE).write_text(json.dumps(ready))
        except BaseException as e:
            for t in tables.values():
                with contextlib.suppress(Exception):
                    t.close()
            if ingest:
                shutil.rmtree(directory, ignore_errors=True)
            if isinstance(e, E.RecpsError) or not isinstance(e, Exception):
                raise
            raise ModelLoadError(f"loading model version {version} failed: {e}") from e
        seconds = time.perf_counter() - t0
        v = _Version(manifest, directory, tables, held, seconds, self.config.cache_rows)
        if not ingest:  # an earlier process may have applied deltas to these DBs
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
                d = json.loads((directory / DELTAS_FILE).read_text())
                v.applied = {int(k): int(x) for k, x in d["applied"].items()}
        return v

    def _open_db(self, path: Path) -> rd.Rdict:
        try:
            return rd.Rdict(str(path), self._db_options())
        except Exception as e:  # rocksdict raises plain Exception on open failures
            raise E.StorageError(f"cannot open RocksDB at {path}: {e}") from e

    def _ingest(
        self,
        db: rd.Rdict,
        vdir: Path,
        files: Sequence[str],
        manifest: mf.ModelManifest,
        staging: Path,
    ) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        iopts = rd.IngestExternalFileOptions()
        iopts.set_move_files(True)  # moves the staged link, never the model's own name
        for rel in files:
            src = vdir / rel
            entry = manifest.files[rel]
            if self.config.verify_checksums:
                self._verify(src, rel, entry)
            staged = staging / rel.replace("/", "__")
            try:
                os.link(src, staged)
            except OSError:  # another filesystem (or no links): one copy
                shutil.copyfile(src, staged)
            # One file per call: parts of one shard may overlap in key range.
            db.ingest_external_file([str(staged)], iopts)

    @staticmethod
    def _verify(path: Path, rel: str, entry: mf.FileEntry) -> None:
        try:
            size = path.stat().st_size
        except OSError:
            raise mf.ChecksumMismatchError(rel, f"{entry.bytes} bytes", "no such file") from None
        if size != entry.bytes:
            raise mf.ChecksumMismatchError(rel, f"{entry.bytes} bytes", f"{size} bytes")
        digest = mf.file_sha256(path)
        if digest != entry.sha256:
            raise mf.ChecksumMismatchError(rel, f"sha256 {entry.sha256}", f"sha256 {digest}")

    # ---- the delta stream --------------------------------------------------------------------

    def _delta_watch(self) -> None:
        interval = self.config.delta_interval_s
        while not self._closed.is_set():
            try:
                self.apply_deltas()
            except Exception:
                log.exception("applying deltas from %s failed", self.config.delta_dir)
            if self._closed.wait(interval):
                return

    def apply_deltas(self) -> int:
        """Apply every new complete delta to the current version, in seq order per
        training shard; returns how many were applied. (The delta poller calls this.)

        A missing seq (deleted by retention before this replica got to it) stops that
        shard's stream, with an error in :meth:`status`, until a newer version is loaded:
        skipping it could leave rows stale forever.
        """
        root = self.config.delta_dir
        if not root:
            return 0
        applied = 0
        with self._load_lock:
            v = self._current
            if v is None or self._closed.is_set():
                return 0
            for p in D.list_training_shards(root):
                if p in v.delta_errors:
                    continue
                for seq in D.list_deltas(root, p):
                    last = v.applied.get(p, 0)
                    if seq <= last:
                        continue
                    if seq != last + 1:
                        v.delta_errors[p] = (
                            f"training shard {p}: delta {last + 1} is gone (next is {seq}); "
                            "deltas after it cannot be applied safely: export a new version"
                        )
                        log.error("%s", v.delta_errors[p])
                        break
                    try:
                        self._apply_delta(v, p, seq)
                    except (E.RecpsError, OSError) as e:
                        log.error("cannot apply delta %d of training shard %d: %s", seq, p, e)
                        break  # retried at the next poll
                    applied += 1
            if applied:
                self.deltas_applied += applied
                self._write_state()
        return applied

    def _apply_delta(self, v: _Version, training_shard: int, seq: int) -> None:
        ddir = D.delta_dir(self.config.delta_dir or "", training_shard, seq)
        m = D.DeltaManifest.load(ddir, verify=self.config.verify_checksums)
        sm = v.shard_map
        # Split as the model is (the usual case): only the held shards' files. Otherwise
        # every file: rows of shards not held are stored but never served.
        same_split = m.num_slots == sm.num_slots and np.array_equal(
            m.serving_map().slot_owner, sm.slot_owner
        )
        shards = list(v.held) if same_split else None
        staging = v.dir / _STAGING / f"delta-{training_shard}-{seq}"
        staging.mkdir(parents=True, exist_ok=True)
        iopts = rd.IngestExternalFileOptions()
        iopts.set_move_files(True)  # moves the staged link, never the delta's own name
        touched: list[tuple[_ServingTable, np.ndarray]] = []
        try:
            for name, dt in sorted(m.tables.items()):
                t = v.tables.get(name)
                if t is None:
                    log.warning("delta %s has table %r the model lacks; skipped", ddir, name)
                    continue
                if dt.rows and dt.dim != t.dim:
                    raise D.DeltaError(
                        f"delta {ddir}: table {name!r} has dim {dt.dim}, the model {t.dim}"
                    )
                for k in m.files_of(name, shards):
                    rel = D.sst_relpath(name, k)
                    src, staged = ddir / rel, staging / rel.replace("/", "__")
                    if m.row_format == t.row_format:
                        try:
                            os.link(src, staged)
                        except OSError:
                            shutil.copyfile(src, staged)
                    else:  # re-encode for the model's row format (e.g. int8)
                        ids, rows = mf.read_sst(src, dt.dim, m.row_format)
                        mf.write_sst(staged, ids, rows, t.row_format)
                    try:
                        t.db.ingest_external_file([str(staged)], iopts)
                    except Exception as e:  # rocksdict raises plain Exception
                        raise E.StorageError(f"ingesting {src} failed: {e}") from e
                    touched.append((t, m.read_ids(name, k)))
                for k in m.deletes_of(name, shards):  # rows the training TTL sweep deleted
                    gone = m.read_deleted(name, k)
                    wb = rd.WriteBatch(raw_mode=True)
                    for key in mf.encode_keys(gone):
                        wb.delete(key)
                    try:
                        t.db.write(wb)
                    except Exception as e:  # rocksdict raises plain Exception
                        raise E.StorageError(f"deleting rows of {ddir} failed: {e}") from e
                    touched.append((t, gone))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with v.guard.lock:
            v.guard.epoch += 1
            for t, ids in touched:
                t.cache.invalidate(ids, t.cache_index)
        now = time.time()
        v.applied[training_shard] = seq
        v.delta_lag_s[training_shard] = max(0.0, now - m.created_at)
        v.delta_applied_at[training_shard] = now
        path = v.dir / DELTAS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"applied": {str(k): x for k, x in sorted(v.applied.items())}}))
        tmp.replace(path)

    def _delta_status(self, v: _Version | None) -> DeltaStatus | None:
        root = self.config.delta_dir
        if not root:
            return None
        shards = []
        if v is not None:
            for p in sorted(set(D.list_training_shards(root)) | set(v.applied)):
                seqs = D.list_deltas(root, p)
                shards.append(
                    DeltaShardStatus(
                        p,
                        v.applied.get(p, 0),
                        seqs[-1] if seqs else 0,
                        v.delta_lag_s.get(p, -1.0),
                        v.delta_applied_at.get(p, 0.0),
                        v.delta_errors.get(p, ""),
                    )
                )
        return DeltaStatus(str(root), tuple(shards), self.deltas_applied)

    # ---- swapping ----------------------------------------------------------------------------

    def _dispose(self, v: _Version) -> None:
        """Close a retired version and delete its folder, off the request's thread."""
        try:
            self._janitor.submit(v.close)
        except RuntimeError:  # the replica is closed: no janitor left, do it here
            v.close()

    def _retire(self, v: _Version | None) -> None:
        """Close ``v`` once no request holds it (caller holds ``_ref_lock``)."""
        if v is None or v.retired:
            return
        v.retired = True
        if v.refs == 0:
            self._dispose(v)

    def load_version(self, version: int | None = None) -> LoadResult:
        """Load ``version`` (None: the newest complete one) and swap to it.

        An explicit version stays pinned (the watcher leaves it alone, a restart loads it
        again) until a call with ``None``. Serving continues on the old version during
        the load; on any error nothing changes.
        """
        with self._load_lock:
            return self._load_locked(version, pin=version)

    def _load_locked(self, version: int | None, pin: int | None) -> LoadResult:
        t0 = time.perf_counter()
        target = version if version is not None else mf.latest_version(self.root)
        if target is None:
            raise mf.ModelNotFoundError(self.root)
        cur, prev = self._current, self._previous
        changed = True
        if cur is not None and cur.version == target:
            changed = False
        elif prev is not None and prev.version == target:
            with self._ref_lock:  # already loaded: a swap, no ingest
                self._current, self._previous = prev, cur
        else:
            try:
                new = self._build(target)
            except Exception:
                self.load_failures += 1
                raise
            with self._ref_lock:
                self._retire(prev)
                self._current, self._previous = new, cur
        self._pinned = pin
        if changed:
            self.swaps += 1
            log.info("now serving version %d", target)
        self._write_state()
        if changed:
            self._notify()
        return self._result(changed, time.perf_counter() - t0)

    def _notify(self) -> None:
        for fn in list(self.on_change):
            try:
                fn()
            except Exception:
                log.exception("on_change callback failed")

    def _result(self, changed: bool, seconds: float) -> LoadResult:
        cur, prev = self._current, self._previous
        assert cur is not None
        return LoadResult(
            cur.status(), prev.status() if prev is not None else None, changed, seconds
        )

    def rollback(self) -> LoadResult:
        """Swap back to the previous version, and pin it (the watcher will not move on
        and a restart serves it) until ``load_version(None)``."""
        with self._load_lock:
            t0 = time.perf_counter()
            with self._ref_lock:
                cur, prev = self._current, self._previous
                if prev is None:
                    raise NoPreviousVersionError(cur.version if cur else None)
                self._current, self._previous = prev, cur
            self._pinned = prev.version
            self.swaps += 1
            self._write_state()
            log.info("rolled back from version %s to %d", cur and cur.version, prev.version)
            self._notify()
            return self._result(True, time.perf_counter() - t0)

    # ---- watching ----------------------------------------------------------------------------

    def _watch(self) -> None:
        interval = self.config.watch_interval_s
        retry_s = max(30.0, 10 * interval)  # a version that failed to load waits this long
        while not self._closed.wait(interval):
            try:
                self.poll_once(retry_s)
            except Exception:
                log.exception("watching %s failed", self.root)

    def poll_once(self, retry_s: float = 30.0) -> bool:
        """Load the newest complete version if it is newer than the one served and
        nothing is pinned; True if it swapped. (The watcher calls this.)"""
        if self._pinned is not None:
            return False
        latest = mf.latest_version(self.root)
        cur = self._current
        if latest is None or (cur is not None and latest <= cur.version):
            return False
        failed_at = self._failed.get(latest)
        if failed_at is not None and time.monotonic() - failed_at < retry_s:
            return False
        with self._load_lock:
            if self._pinned is not None:  # an admin call won the lock meanwhile
                return False
            try:
                self._load_locked(latest, pin=None)
            except E.RecpsError as e:
                self._failed[latest] = time.monotonic()
                log.error("cannot load model version %d: %s", latest, e)
                return False
        return True

    # ---- serving -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, version: int | None = None) -> Iterator[_Version]:
        """The current version (or ``version``, if it is the current one or the one kept
        for rollback), held for the duration: a swap meanwhile does not close it."""
        with self._ref_lock:
            v = self._current
            if v is None:
                raise NoModelVersionError(str(self.root))
            if version and v.version != version:
                prev = self._previous
                if prev is None or prev.version != version:
                    held = [x.version for x in (v, prev) if x is not None]
                    raise VersionNotHeldError(version, held)
                v = prev
            v.refs += 1
        try:
            yield v
        finally:
            with self._ref_lock:
                v.refs -= 1
                done = v.retired and v.refs == 0
            if done:
                self._dispose(v)

    def lookup_tables(
        self, names: Sequence[str], ids: Sequence[np.ndarray], version: int | None = None
    ) -> tuple[int, list[tuple[str, np.ndarray, int]]]:
        """``(version, [(table, float32 rows, dim)])``, all tables from one version: the
        current one, or ``version`` (VersionNotHeldError unless current or previous)."""
        total = sum(len(i) for i in ids)
        if total > self.config.max_ids_per_request:
            raise E.CapacityError(
                f"{total} ids in one request exceed max_ids_per_request="
                f"{self.config.max_ids_per_request}; split the batch"
            )
        if len(set(names)) != len(names):
            raise E.InvalidArgumentError(f"a table may appear once per request, got {names}")
        with self.use(version) as v:
            tables = [v.table(n) for n in names]
            v.check_held(list(names), list(ids))
            rows = v.lookup(tables, list(ids))
            return v.version, [(t.name, r, t.dim) for t, r in zip(tables, rows)]

    def lookup(
        self, batch: Mapping[str, Any], dtype: str = "float32", version: int | None = None
    ) -> dict[str, np.ndarray]:
        """Rows ``{table: ids} -> {table: [n, dim]}`` (float32, or float16 on request)
        from the version current when the call starts, or from ``version``.

        Example:
            >>> replica.lookup({"user": np.array([3, 1, 3])})["user"].shape  # doctest: +SKIP
            (3, 16)
        """
        if dtype not in ("float32", "float16"):
            raise E.InvalidArgumentError(f"dtype must be float32 or float16, got {dtype!r}")
        names = list(batch)
        arrays = []
        for n in names:
            a = np.asarray(batch[n])
            if a.dtype.kind not in "iu":
                raise E.DtypeError(f"table {n!r} ids", a.dtype, "int64")
            arrays.append(np.ascontiguousarray(a.reshape(-1), dtype=np.int64))
        _, out = self.lookup_tables(names, arrays, version)
        return {n: r if dtype == "float32" else r.astype(np.float16) for n, r, _ in out}

    # ---- introspection -----------------------------------------------------------------------

    @property
    def current_version(self) -> int | None:
        v = self._current
        return v.version if v is not None else None

    @property
    def previous_version(self) -> int | None:
        v = self._previous
        return v.version if v is not None else None

    @property
    def pinned_version(self) -> int | None:
        return self._pinned

    def tables(self) -> list[tuple[str, int, str, InitializerConfig]]:
        """``(name, dim, row_format, default initializer)`` of the current version's
        tables, by name (zeros defaults show as a zeros initializer)."""
        with self.use() as v:
            return [
                (n, t.dim, t.row_format, t.initializer_config())
                for n, t in sorted(v.tables.items())
            ]

    def shard_map(self, address: str) -> ShardMap:
        """The current version's serving shard map (the model's slot owners and epoch)
        naming ``address`` for the shards this replica holds; other shards keep the
        model's entries. (Each RPC is answered by one version. ``PSClient`` sends the
        shards at one address one RPC, so a request to a replica holding them all never
        straddles a swap; one spread over several replicas may. ``ServingClient`` routes
        by this map plus each replica's Status.)"""
        with self.use() as v:
            m = v.shard_map
            shards = {k: (address if k in v.held else a) for k, a in m.shards.items()}
            return m.replace(epoch=m.epoch, shards=shards)

    def held_shards(self) -> tuple[int, ...]:
        v = self._current
        if v is not None:
            return v.held
        return self.config.shards or ()

    def status(self) -> ReplicaStatus:
        with self._ref_lock:
            cur, prev = self._current, self._previous
        cur_v = cur
        return ReplicaStatus(
            current=cur.status() if cur is not None else None,
            previous=prev.status() if prev is not None else None,
            model_root=str(self.root),
            shards=self.held_shards(),
            pinned_version=self._pinned,
            watch_interval_s=self.config.watch_interval_s,
            latest_available=mf.latest_version(self.root),
            uptime_s=time.time() - self.started,
            delta=self._delta_status(cur_v),
        )

    def close(self) -> None:
        """Stop watching and close every version (their ingested DBs stay on disk, so a
        restart on the same data_dir reopens them without ingesting again)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        if self._delta_poller is not None:
            self._delta_poller.join(timeout=30)
        with self._load_lock, self._ref_lock:
            versions = [v for v in (self._current, self._previous) if v is not None]
            self._current = self._previous = None
            for v in versions:
                v.keep_files = True  # a restart on this data_dir reopens them
                v.retired = True
            idle = [v for v in versions if v.refs == 0]  # the rest: their last request
        for v in idle:
            v.close()
        self._janitor.shutdown(wait=True)
