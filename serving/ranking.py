"""Online ranking: raw features of one user context and N candidates in, N scores out.

A :class:`Ranker` holds one exported model version (``recps export``): the TorchScript
dense tower and the manifest. For a request it

1. builds N rows, each the context's features overlaid with one candidate's (a candidate's
   value wins over the context's for the same feature);
2. hashes categorical values exactly as training did (:mod:`recps.embedding.feature_ids`,
   the same scheme the manifest names) and applies training's dense transform;
3. looks the ids up, deduplicated per table over all N rows, through a ``lookup`` callable
   (a :class:`~recps.serving.client.ServingClient` over serving replicas, or anything with
   the same signature);
4. pools each feature (sum/mean; single-id or list features) with numpy and runs the tower.

The context's ids are the same in every row, so deduplication sends them once.

Example:
    >>> ranker = Ranker(RankerConfig("/models"), client.lookup)  # doctest: +SKIP
    >>> ranker.score({"user": "u1", "I1": 3}, [{"item": "a"}, {"item": "b"}])  # doctest: +SKIP
    array([0.31, 0.12], dtype=float32)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recps.embedding.base import table_major_order
from recps.embedding.errors import ConfigError, InvalidArgumentError, ShardUnavailableError
from recps.embedding.feature_ids import (
    HASH_SCHEME,
    dense_transform,
    hash_column,
    hash_int_columns,
    hash_int_ids,
)
from recps.serving.cache import CacheStats, RowCache
from recps.serving.model_format import (
    TOWER_FILE,
    ModelManifest,
    ModelNotFoundError,
    latest_version,
    version_dir,
)

LookupFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class RankerConfig:
    """What a :class:`Ranker` serves.

    ``model`` is a version directory, or a model root (its newest complete version).
    ``device`` "auto" runs the tower on CUDA when present, else CPU. ``threads`` caps torch's
    intra-op threads (0 = torch's default); small towers on many concurrent requests do
    better with 1.

    ``near_cache_rows`` > 0 keeps that many embedding rows (per embedding dim) in this
    process, in front of ``lookup``: a request whose rows are all cached makes no lookup
    call at all. A cached row is served for at most ``near_cache_ttl_s`` after it was
    fetched, so rows the replicas change (online deltas) reach the scores within that
    bound; a new model version gets a new, empty cache. With ``serve_stale``, a request
    whose refetch finds no replica answering is scored with the expired rows if the cache
    still holds every one of them (``stale_rows_served`` counts them), instead of failing.
    A row used after ``near_cache_refresh_ahead`` of its TTL (0.5: after 2.5 of 5 s) is
    served and fetched again in the background (one refresh in flight, rows that come
    due meanwhile ride the next), so rows in steady use never expire on a request's path;
    0 turns that off. No row is ever served older than the TTL.

    ``near_cache_bytes`` > 0 sizes the near cache by memory instead of rows: the bytes
    are shared among the dims in proportion to their tables, and each dim's cache holds
    as many rows as fit in its share (rows, index and bookkeeping, when full).
    """

    model: str
    device: str = "auto"
    max_candidates: int = 10_000
    threads: int = 1
    verify_checksums: bool = True
    near_cache_rows: int = 0
    near_cache_ttl_s: float = 5.0
    serve_stale: bool = True
    near_cache_refresh_ahead: float = 0.5
    near_cache_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_candidates < 1:
            raise ConfigError("max_candidates must be >= 1")
        if self.threads < 0:
            raise ConfigError("threads must be >= 0")
        check_near_cache(
            self.near_cache_rows,
            self.near_cache_ttl_s,
            self.near_cache_refresh_ahead,
            self.near_cache_bytes,
        )


# Background refresh (see Ranker._refresh): rows per lookup call, and the share of time a
# burst of calls may take (it sleeps 3x as long as each call took before the next).
_REFRESH_ROWS = 4096
_REFRESH_DUTY = 0.25


def check_near_cache(rows: int, ttl_s: float, refresh_ahead: float = 0.0, nbytes: int = 0) -> None:
    """The near cache's settings, checked the same in every config that carries them."""
    if rows < 0 or not ttl_s > 0:
        raise ConfigError("near_cache_rows must be >= 0 and near_cache_ttl_s > 0")
    if nbytes < 0:
        raise ConfigError("near_cache_bytes must be >= 0 (0: size by near_cache_rows)")
    if not 0 <= refresh_ahead < 1:
        raise ConfigError("near_cache_refresh_ahead must be in [0, 1) (0: off)")


def resolve_version_dir(model: str | Path) -> Path:
    """A version directory as given, or a model root's newest complete version."""
    p = Path(model)
    if (p / "manifest.json").is_file():
        return p
    v = latest_version(p)
    if v is None:
        raise ModelNotFoundError(p)
    return version_dir(p, v)


class Ranker:
    """Scores candidates with one model version; thread-safe (the tower runs concurrently)."""

    def __init__(
        self, config: RankerConfig, lookup: LookupFn, refresh_lookup: LookupFn | None = None
    ) -> None:
        import torch  # serving processes that only hold embeddings never load torch

        self.config = config
        self._lookup = lookup
        # The near cache's background refreshes: ``lookup`` unless the caller has a lane
        # that keeps them out of the way of requests (ServingClient: no coalescing, so a
        # request's lookup never queues behind a refresh).
        self._refresh_lookup = refresh_lookup or lookup
        vdir = resolve_version_dir(config.model)
        self.manifest = ModelManifest.load(vdir, verify=config.verify_checksums)
        scheme = self.manifest.hashing.get("scheme", HASH_SCHEME)
        if scheme != HASH_SCHEME:
            raise ConfigError(
                f"model {vdir} hashes features with {scheme!r}; this recps hashes with "
                f"{HASH_SCHEME!r}"
            )
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
        self._torch = torch
        self.tower = torch.jit.load(str(vdir / TOWER_FILE), map_location=self.device)
        self.tower.eval()
        # TorchScript profiles its first runs and optimizes after: pay that at load time,
        # not on the first requests.
        with torch.inference_mode():
            d = torch.zeros(64, len(self.manifest.dense_features), device=self.device)
            p = [
                torch.zeros(64, self.manifest.tables[f.table].dim, device=self.device)
                for f in self.manifest.features
            ]
            for _ in range(3):
                self.tower(d, p)
        self.version = self.manifest.version
        self._dims = {name: t.dim for name, t in self.manifest.tables.items()}
        # Features grouped by table, for the one-sort dedup of pooled().
        self._tables = list(dict.fromkeys(f.table for f in self.manifest.features))
        self._by_table = sorted(self.manifest.features, key=lambda f: self._tables.index(f.table))
        self._by_table_names = [f.name for f in self._by_table]
        self._feature_table_ix = np.array(
            [self._tables.index(f.table) for f in self._by_table], dtype=np.int64
        )
        self._inputs = list(
            dict.fromkeys(
                [*self.manifest.dense_features, *(f.input for f in self.manifest.features)]
            )
        )
        # The near cache: one RowCache per embedding dim, keyed by (table index, id).
        self._near: list[tuple[RowCache, list[int]]] = []
        if config.near_cache_rows or config.near_cache_bytes:
            by_dim: dict[int, list[int]] = {}
            for k, t in enumerate(self._tables):
                by_dim.setdefault(self._dims[t], []).append(k)
            ahead = config.near_cache_refresh_ahead
            refresh_s = ahead * config.near_cache_ttl_s if ahead else None
            n_tables = len(self._tables)
            for dim, ks in by_dim.items():
                rows = config.near_cache_rows
                if config.near_cache_bytes:  # this dim's share of the bytes, by tables
                    share = config.near_cache_bytes * len(ks) // n_tables
                    rows = RowCache.capacity_for_bytes(dim, share, n_tables, refresh_s is not None)
                if not rows:
                    continue  # a share too small for a cache: those tables always ask
                cache = RowCache(dim, rows, n_tables, config.near_cache_ttl_s, refresh_s=refresh_s)
                self._near.append((cache, ks))
        self.stale_rows_served = 0  # rows answered past their TTL while no replica answered
        self._stale_lock = threading.Lock()
        # Refresh-ahead: rows come due in requests, one background thread fetches them.
        # The executor's thread exits once this Ranker (a swapped-out version) is dropped.
        self._due: list[tuple[RowCache, np.ndarray, np.ndarray]] = []
        self._due_lock = threading.Lock()
        self._refreshing = False
        self.rows_refreshed = 0  # rows fetched again ahead of their expiry
        self.refresh_failures = 0
        self._closed = False
        self._refresher = (
            ThreadPoolExecutor(1, thread_name_prefix="recps-near-refresh")
            if self._near and config.near_cache_refresh_ahead
            else None
        )

    # ---- features ------------------------------------------------------------------------

    def featurize(
        self, context: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray | None]]]:
        """``(dense float32 [N, n_dense], {feature: (ids, offsets or None)})`` of row-form
        candidates (a candidate's value overrides the context's)."""
        n = self._check_n(len(candidates))
        present: set[str] = set()
        for c in candidates:
            present.update(c)
        columns = {}
        for name in self._inputs:
            if name in present:
                base = context.get(name)
                columns[name] = [c.get(name, base) for c in candidates]
        return self.featurize_columns(context, columns, n)

    def featurize_columns(
        self,
        context: Mapping[str, Any],
        columns: Mapping[str, Any],
        n: int,
    ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray | None]]]:
        """The same from column-form candidates: ``columns[name]`` has one value per
        candidate (a list of values per candidate for multi-id features); a feature without
        a column takes the context's value for every candidate, hashed once."""
        n = self._check_n(n)
        for name, col in columns.items():
            if len(col) != n:
                raise InvalidArgumentError(f"column {name!r} has {len(col)} values, {n} candidates")
        m = self.manifest
        dense = np.zeros((n, len(m.dense_features)), dtype=np.float32)
        for j, name in enumerate(m.dense_features):
            col = columns.get(name)
            vals = [context.get(name)] if col is None else col
            try:
                x = np.asarray(vals, dtype=np.float64)
            except TypeError:  # None among numbers: missing
                try:
                    x = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
                except (TypeError, ValueError) as e:
                    raise InvalidArgumentError(f"dense feature {name!r}: {e}") from None
            except ValueError as e:
                raise InvalidArgumentError(f"dense feature {name!r}: {e}") from None
            if x.ndim != 1:
                raise InvalidArgumentError(f"dense feature {name!r} takes one number")
            dense[:, j] = dense_transform(x)  # a context value broadcasts
        ids: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        hashed: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray | None]] = {}
        # Integer columns of single-id features (the usual request) hash in one pass.
        int_cols: dict[str, np.ndarray] = {}
        for f in m.features:
            col = columns.get(f.input)
            if not f.multi and col is not None and f.input not in int_cols:
                arr = _int_array(col)
                if arr is not None:
                    int_cols[f.input] = arr
        if int_cols:
            names = list(int_cols)
            out = hash_int_columns(np.stack([int_cols[k] for k in names]), names)
            for k, name in enumerate(names):
                hashed[(name, False)] = (out[k], None)
        for f in m.features:
            key = (f.input, f.multi)
            if key not in hashed:  # features that share an input share its ids
                col = columns.get(f.input)
                if f.multi:
                    hashed[key] = self._multi_ids(f.input, col, context.get(f.input), n)
                elif col is None:
                    one = self._single_ids([context.get(f.input)], f.input)
                    hashed[key] = (np.full(n, one[0], dtype=np.int64), None)
                else:
                    hashed[key] = (self._single_ids(col, f.input), None)
            ids[f.name] = hashed[key]
        return dense, ids

    def _check_n(self, n: int) -> int:
        if n == 0:
            raise InvalidArgumentError("a request needs at least one candidate")
        if n > self.config.max_candidates:
            raise InvalidArgumentError(
                f"{n} candidates; this ranker takes at most {self.config.max_candidates}"
            )
        return n

    def _single_ids(self, values: Any, feature: str) -> np.ndarray:
        arr = _int_array(values)
        if arr is not None:
            return hash_int_ids(arr, feature)
        if any(_is_list(v) for v in values):
            raise InvalidArgumentError(f"feature {feature!r} takes one value, got a list")
        return self._hash(list(values), feature)

    def _multi_ids(
        self, feature: str, col: Any, base: Any, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if col is None:
            col = [base] * n
        lists = [[] if v is None else list(v) if _is_list(v) else [v] for v in col]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=offsets[1:])
        flat = [v for x in lists for v in x]
        return self._hash(flat, feature), offsets

    @staticmethod
    def _hash(values: list[Any], feature: str) -> np.ndarray:
        if not values:
            return np.zeros(0, dtype=np.int64)
        if all(type(v) is int for v in values):  # 5x cheaper than Arrow
            try:
                return hash_int_ids(np.array(values, dtype=np.int64), feature)
            except OverflowError:
                pass  # beyond int64: Arrow's path below gives the precise error
        try:
            arr = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed ints and strings: an int becomes the hex string of its 64 bits, which
            # hashes exactly as the int would; anything else hashes by its text.
            arr = pa.array([_as_text(v) for v in values])
        if pa.types.is_floating(arr.type):
            arr = arr.cast(pa.int64())  # 3.0 from JSON is the integer 3
        return hash_column(arr, feature)

    # ---- embeddings + tower --------------------------------------------------------------

    def pooled(
        self, ids: Mapping[str, tuple[np.ndarray, np.ndarray | None]], n: int
    ) -> list[np.ndarray]:
        """One float32 ``[N, dim]`` per manifest feature, from one deduplicated lookup."""
        m = self.manifest
        # One sort dedups every table at once: (table, id) pairs, table-major.
        tables = self._tables
        parts = [ids[f.name][0] for f in self._by_table]
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        all_ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        tix = np.repeat(self._feature_table_ix, lengths)
        order = table_major_order(all_ids, tix)
        s_ids, s_tix = all_ids[order], tix[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (s_ids[1:] != s_ids[:-1]) | (s_tix[1:] != s_tix[:-1])
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[order] = np.cumsum(first) - 1
        u_ids, u_tix = s_ids[first], s_tix[first]
        bounds = np.searchsorted(u_tix, np.arange(len(tables) + 1))
        rows, stacked = self._fetch(u_ids, u_tix, bounds)
        starts = dict(zip(self._by_table_names, np.concatenate(([0], np.cumsum(lengths)[:-1]))))
        gathered = None
        if stacked is None and len({self._dims[t] for t in tables}) == 1:
            stacked = np.concatenate([np.asarray(rows[t], dtype=np.float32) for t in tables])
        if stacked is not None:
            # One gather for every feature (rows of all tables stacked in table order, as
            # ``inverse`` numbers them), instead of one fancy index per feature.
            gathered = stacked.take(inverse, axis=0)
        out = []
        for f in m.features:
            vals, offsets = ids[f.name]
            start = int(starts[f.name])
            if gathered is not None:
                r = gathered[start : start + len(vals)]
            else:
                k = tables.index(f.table)
                table_rows = np.asarray(rows[f.table], dtype=np.float32)
                r = table_rows[inverse[start : start + len(vals)] - bounds[k]]
            if offsets is None:
                out.append(r)
                continue
            pooled = np.zeros((n, self._dims[f.table]), dtype=np.float32)
            counts = np.diff(offsets)
            nonempty = counts > 0
            if len(vals):
                sums = np.add.reduceat(r, offsets[:-1][nonempty], axis=0)
                pooled[nonempty] = sums
            if f.pooling == "mean":
                pooled[nonempty] /= counts[nonempty, None]
            out.append(pooled)
        return out

    def _fetch(
        self, u_ids: np.ndarray, u_tix: np.ndarray, bounds: np.ndarray
    ) -> tuple[Mapping[str, np.ndarray], np.ndarray | None]:
        """Rows of the unique (table, id) pairs, table-major (``bounds`` cuts the tables):
        from the near cache where it holds them fresh, the rest in one lookup call. Per
        table, and as one array in ``u_ids``' order when one cache holds every table."""
        tables = self._tables
        if not self._near:
            uniq = {t: u_ids[bounds[k] : bounds[k + 1]] for k, t in enumerate(tables)}
            return self._lookup(uniq), None
        want: dict[str, np.ndarray] = {}  # every cache's misses: one lookup call for all
        groups = []
        dues: list[tuple[RowCache, np.ndarray, np.ndarray]] = []
        for cache, ks in self._near:
            if len(ks) == len(tables):
                ids, tix = u_ids, u_tix
            else:
                pick = np.concatenate([np.arange(bounds[k], bounds[k + 1]) for k in ks])
                ids, tix = u_ids[pick], u_tix[pick]
            hit, hit_rows, due = cache.lookup_due(ids, tix)
            if due.any():
                dues.append((cache, ids[due], tix[due]))
            if hit.all():
                groups.append((cache, ks, tix, hit_rows, None))
                continue
            rows = np.empty((len(ids), cache.dim), np.float32)
            rows[hit] = hit_rows
            miss = np.flatnonzero(~hit)
            m_ids, m_tix = ids[miss], tix[miss]
            mb = np.searchsorted(m_tix, np.arange(len(tables) + 1))
            present = [k for k in ks if mb[k + 1] > mb[k]]
            asked = [tables[k] for k in present]
            want.update((tables[k], m_ids[mb[k] : mb[k + 1]]) for k in present)
            groups.append((cache, ks, tix, rows, (miss, m_ids, m_tix, asked)))
        if dues:
            self._refresh_later(dues)
        try:
            got = self._lookup(want) if want else {}
        except ShardUnavailableError:
            if not self.config.serve_stale or not self._fill_stale(groups):
                raise
            got = None
        out: dict[str, np.ndarray] = {}
        for cache, ks, tix, rows, missed in groups:
            if missed is not None and got is not None:
                miss, m_ids, m_tix, asked = missed
                # ``asked`` is table-major like m_ids, so the tables' rows line up with them.
                fetched = np.concatenate([np.asarray(got[t], dtype=np.float32) for t in asked])
                rows[miss] = fetched
                cache.admit(m_ids, fetched, m_tix)
            gb = np.searchsorted(tix, np.arange(len(tables) + 1))
            for k in ks:
                out[tables[k]] = rows[gb[k] : gb[k + 1]]
        # One dim, one cache: its rows are already every table's, in u_ids' order.
        return out, groups[0][3] if len(groups) == 1 else None

    def close(self) -> None:
        """Stop refreshing the near cache (a swapped-out version, or a stopping service):
        a refresh in progress ends after its current call. Scoring still works."""
        with self._due_lock:
            self._closed = True
            self._due = []
        if self._refresher is not None:
            self._refresher.shutdown(wait=False, cancel_futures=True)

    def _refresh_later(self, dues: list[tuple[RowCache, np.ndarray, np.ndarray]]) -> None:
        assert self._refresher is not None
        with self._due_lock:
            if self._closed:
                return
            self._due.extend(dues)
            if self._refreshing:
                return  # the running refresh takes these too
            self._refreshing = True
        self._refresher.submit(self._refresh)

    def _refresh(self) -> None:
        """Fetch the due rows again and admit them, ``_REFRESH_ROWS`` a lookup call, until
        none is due. Bounded, paced calls: rows fetched together come due together (a
        cold start fetches them all at once), and one huge call, or a train of them back
        to back, would hold the replica and the cache's lock long enough to show in
        request latency. The half TTL between due and expiry leaves time to pace."""
        busy = 0.0  # seconds the last refresh call took
        while True:
            with self._due_lock:
                jobs, self._due = self._due, []
                if not jobs:
                    self._refreshing = False
                    return
            for cache, _ in self._near:
                mine = [(i, t) for c, i, t in jobs if c is cache]
                if not mine:
                    continue
                ids = np.concatenate([i for i, _ in mine])
                tix = np.concatenate([t for _, t in mine])
                order = table_major_order(ids, tix)  # table-major, like every lookup here
                ids, tix = ids[order], tix[order]
                keep = np.ones(len(ids), dtype=bool)
                keep[1:] = (ids[1:] != ids[:-1]) | (tix[1:] != tix[:-1])
                ids, tix = ids[keep], tix[keep]
                for lo in range(0, len(ids), _REFRESH_ROWS):
                    if self._closed:
                        with self._due_lock:
                            self._refreshing = False
                        return
                    if busy:  # pace a burst: requests get the rest of the CPU and the replica
                        time.sleep(busy * (1 / _REFRESH_DUTY - 1))
                    t0 = time.perf_counter()
                    hi = lo + _REFRESH_ROWS
                    self._refresh_rows(cache, ids[lo:hi], tix[lo:hi])
                    busy = time.perf_counter() - t0

    def _refresh_rows(self, cache: RowCache, ids: np.ndarray, tix: np.ndarray) -> None:
        tables = self._tables
        bounds = np.searchsorted(tix, np.arange(len(tables) + 1))
        asked = [k for k in range(len(tables)) if bounds[k + 1] > bounds[k]]
        try:
            got = self._refresh_lookup({tables[k]: ids[bounds[k] : bounds[k + 1]] for k in asked})
        except Exception:
            # Left marked due: they expire at their TTL and are fetched on a request's path
            # (or served stale), so a down replica costs no retry storm here.
            with self._due_lock:
                self.refresh_failures += 1
            return
        fetched = np.concatenate([np.asarray(got[tables[k]], dtype=np.float32) for k in asked])
        cache.admit(ids, fetched, tix)
        with self._due_lock:
            self.rows_refreshed += len(ids)

    def _fill_stale(self, groups: list[Any]) -> bool:
        """No replica answered: fill every miss from expired cache rows, if all are held."""
        filled = []
        for cache, _, _, rows, missed in groups:
            if missed is None:
                continue
            miss, m_ids, m_tix, _ = missed
            hit, stale = cache.lookup(m_ids, m_tix, stale_ok=True)
            if not hit.all():
                return False  # a row never fetched: nothing to fall back on
            filled.append((rows, miss, stale))
        for rows, miss, stale in filled:
            rows[miss] = stale
            with self._stale_lock:
                self.stale_rows_served += len(miss)
        return True

    def near_cache_stats(self) -> CacheStats | None:
        """Hits, misses and rows of the near cache (all dims together), or None if off."""
        if not self._near:
            return None
        parts = [c.stats() for c, _ in self._near]
        return CacheStats(
            rows=sum(p.rows for p in parts),
            capacity=sum(p.capacity for p in parts),
            hits=sum(p.hits for p in parts),
            misses=sum(p.misses for p in parts),
            evictions=sum(p.evictions for p in parts),
            memory_bytes=sum(p.memory_bytes for p in parts),
        )

    def score(
        self, context: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> np.ndarray:
        """Click probabilities, float32 ``[N]``, in the candidates' order."""
        dense, ids = self.featurize(context, candidates)
        pooled = self.pooled(ids, len(candidates))
        return self.score_arrays(dense, pooled)

    def score_arrays(self, dense: np.ndarray, pooled: Sequence[np.ndarray]) -> np.ndarray:
        """The tower on prepared inputs: sigmoid(tower(dense, pooled))."""
        torch = self._torch
        with torch.inference_mode():
            d = torch.from_numpy(np.ascontiguousarray(dense)).to(self.device)
            p = [torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for x in pooled]
            logits = self.tower(d, p)
            return torch.sigmoid(logits).float().cpu().numpy().reshape(-1)


def _int_array(values: Any) -> np.ndarray | None:
    """``values`` as int64 if they are all integers (no per-value Python check), else None.

    Only real integers: numpy would parse the string "12" as twelve, training reads it as
    hex. uint64 beyond int64 goes the Arrow way too.
    """
    if isinstance(values, np.ndarray):
        arr = values
    else:
        try:
            arr = np.asarray(values)
        except (TypeError, ValueError, OverflowError):  # ragged lists, huge ints
            return None
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.dtype == np.uint64:
        return None
    return arr.astype(np.int64, copy=False)


def _as_text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return format(v & 0xFFFF_FFFF_FFFF_FFFF, "x")
    return str(v)


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple, np.ndarray))
