"""The ranking service: ``recps.serving.v1.Ranking/Predict`` over gRPC, plus HTTP/JSON.

It runs a :class:`~recps.serving.ranking.Ranker` over a
:class:`~recps.serving.client.ServingClient` (embeddings from serving replicas):

* gRPC ``Predict`` (proto/ranking.proto) with health checking and the PS's bearer-token
  check;
* HTTP on ``http_port``: ``POST /predict`` with ``{"context": {...}, "candidates":
  [{...}, ...]}`` answers ``{"scores": [...], "model_version": v, ...}``;
  ``GET /healthz``; ``GET /metrics`` (Prometheus text);
* hot swap: with ``watch_interval_s > 0`` and a model *root*, a newer complete version is
  loaded in the background and swapped in atomically; a request scores wholly with the
  tower it started with. The replicas swap their tables on their own schedule, so for up
  to one watch interval a tower may read the other version's rows (same tables, same
  dims; the manifest check refuses a version whose tables changed shape).

Example (in process; ``python -m recps.serving.ranking_server`` runs it as a service)::

    service = RankingService(RankingServerConfig(model="/models", replicas=("127.0.0.1:7101",)))
    server = RankingServer(service).start()
    print(server.port, server.http_port)
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from recps.embedding import errors as E
from recps.proto import ranking_pb2, ranking_pb2_grpc
from recps.ps.config import TlsConfig, cpu_rpc_workers
from recps.ps.errors import abort, code_of
from recps.ps.server import AuthInterceptor, add_port
from recps.serving.client import ServingClient, ServingClientConfig
from recps.serving.errors import VersionNotHeldError
from recps.serving.model_format import latest_version, version_dir
from recps.serving.ranking import Ranker, RankerConfig, check_near_cache, resolve_version_dir

log = logging.getLogger("recps.serving.ranking")

SERVICE = "recps.serving.v1.Ranking"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)


class _PinnedLookup:
    """``ServingClient.lookup`` pinned to the tower's model version, so the rows and the
    tower of a request come from one export. Replicas keep the version they swapped out,
    so during a rollout (replicas first) the pin holds; when no replica holds the
    version (a ranking service ahead of its replicas, or two versions behind) the rows
    they serve are used, as without a pin, and ``unpinned`` counts it."""

    def __init__(self, client: ServingClient, unpinned: Any, coalesce: bool = True) -> None:
        self.client, self.unpinned, self.coalesce = client, unpinned, coalesce
        self.version: int | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        try:
            return self.client.lookup(batch, coalesce=self.coalesce, version=self.version)
        except VersionNotHeldError:
            self.unpinned.inc()
            return self.client.lookup(batch, coalesce=self.coalesce)


@dataclass(frozen=True)
class RankingServerConfig:
    """One ranking service: the model, where its embeddings live, where it listens."""

    model: str  # a model root (hot swap by watching it) or one version directory
    replicas: tuple[str, ...]  # serving replica addresses
    host: str = "127.0.0.1"
    port: int = 0  # gRPC; 0 = any free port
    http_port: int | None = 0  # None = no HTTP endpoint
    max_workers: int = field(default_factory=cpu_rpc_workers)  # gRPC handler threads
    watch_interval_s: float = 0.0  # > 0: follow new versions under a model root
    threads: int = 1  # torch intra-op threads per request
    # Embedding rows kept in this process in front of the replicas (per embedding dim;
    # 0: off), each served for at most near_cache_ttl_s after it was fetched.
    near_cache_rows: int = 262_144
    # > 0: size the near cache by memory (all dims together) instead of near_cache_rows.
    near_cache_bytes: int = 0
    near_cache_ttl_s: float = 5.0
    # A row used after this fraction of its TTL is fetched again in the background.
    near_cache_refresh_ahead: float = 0.5
    # No replica answering: score with expired near-cache rows when it holds them all.
    serve_stale: bool = True
    lookup_timeout_s: float = 1.0
    # ServingClientConfig.coalesce_inflight: None, one merged lookup in flight per
    # replica; 0, every near-cache miss its own RPC.
    lookup_coalesce_inflight: int | None = None
    auth_token: str | None = None
    tls: TlsConfig | None = None  # server side (cert_file + key_file)
    client_tls: TlsConfig | None = None  # towards the replicas

    def __post_init__(self) -> None:
        if not self.replicas:
            raise E.ConfigError("a ranking service needs at least one replica address")
        if self.tls is not None and not (self.tls.cert_file and self.tls.key_file):
            raise E.ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.watch_interval_s < 0 or self.max_workers < 1:
            raise E.ConfigError("watch_interval_s must be >= 0 and max_workers >= 1")
        check_near_cache(
            self.near_cache_rows,
            self.near_cache_ttl_s,
            self.near_cache_refresh_ahead,
            self.near_cache_bytes,
        )


@dataclass(frozen=True)
class Prediction:
    scores: np.ndarray
    model_version: int
    lookup_ms: float
    tower_ms: float


class RankingService:
    """Scores requests with the current model version; swaps versions atomically."""

    def __init__(self, config: RankingServerConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "recps_predict_latency_seconds",
            "Predict latency, end to end in the service",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lookup_latency = Histogram(
            "recps_predict_lookup_seconds",
            "Embedding lookup time of a Predict",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.unpinned = Counter(
            "recps_ranking_unpinned_lookups",
            "Lookups no replica could answer from the tower's own model version (none serves "
            "it or keeps it for rollback), answered from the version they serve instead",
            registry=self.registry,
        )
        self.errors = Counter(
            "recps_predict_errors_total", "Failed Predicts", ["code"], registry=self.registry
        )
        self.version_gauge = Gauge(
            "recps_ranking_model_version", "Model version scoring requests", registry=self.registry
        )
        near = Gauge(
            "recps_ranking_near_cache",
            "Near cache of the current model version: hits and misses (ids), rows held, "
            "rows it can hold (capacity), bytes of the rows held and index (memory_bytes), "
            "expired rows served while no replica answered (stale), rows fetched again "
            "ahead of expiry (refreshed) and failed background refreshes (refresh_failures)",
            ["stat"],
            registry=self.registry,
        )
        stats = ("hits", "misses", "rows", "capacity", "memory_bytes", "stale", "refreshed")
        for stat in (*stats, "refresh_failures"):
            near.labels(stat).set_function(lambda stat=stat: self._near_stat(stat))
        self.client = ServingClient(
            config.replicas,
            ServingClientConfig(
                timeout_s=config.lookup_timeout_s,
                coalesce_inflight=config.lookup_coalesce_inflight,
                auth_token=config.auth_token,
                tls=config.client_tls,
            ),
        )
        coalesced = Gauge(
            "recps_ranking_lookups_coalesced",
            "Replica lookups: lookup() calls made (calls) and the merged RPCs that carried "
            "them (batches); calls / batches is how many requests shared an RPC",
            ["stat"],
            registry=self.registry,
        )
        for stat in ("calls", "batches"):
            coalesced.labels(stat).set_function(
                lambda stat=stat: float(self.client.coalesce_stats()[stat])
            )
        self._ranker = self._load(resolve_version_dir(config.model))
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if config.watch_interval_s > 0 and not (Path(config.model) / "manifest.json").exists():
            self._watcher = threading.Thread(
                target=self._watch, name="recps-ranking-watch", daemon=True
            )
            self._watcher.start()

    def _load(self, vdir: Path) -> Ranker:
        c = self.config
        # Requests and background refreshes alike ask for the tower's own version (set
        # below, once the manifest has named it, before the ranker serves a request).
        pinned = _PinnedLookup(self.client, self.unpinned)
        refresh = _PinnedLookup(self.client, self.unpinned, coalesce=False)
        ranker = Ranker(
            RankerConfig(
                model=str(vdir),
                threads=c.threads,
                near_cache_rows=c.near_cache_rows,
                near_cache_bytes=c.near_cache_bytes,
                near_cache_ttl_s=c.near_cache_ttl_s,
                serve_stale=c.serve_stale,
                near_cache_refresh_ahead=c.near_cache_refresh_ahead,
            ),
            pinned,
            refresh_lookup=refresh,
        )
        pinned.version = refresh.version = ranker.version
        self.version_gauge.set(ranker.version)
        log.info("ranking with model version %d from %s", ranker.version, vdir)
        return ranker

    @property
    def version(self) -> int:
        return self._ranker.version

    def _near_stat(self, stat: str) -> float:
        ranker = getattr(self, "_ranker", None)  # scraped before the first load finished
        if ranker is None:
            return 0.0
        if stat == "stale":
            return float(ranker.stale_rows_served)
        if stat == "refreshed":
            return float(ranker.rows_refreshed)
        if stat == "refresh_failures":
            return float(ranker.refresh_failures)
        st = ranker.near_cache_stats()
        return float(getattr(st, stat)) if st is not None else 0.0

    def load_version(self, version: int | None = None) -> int:
        """Swap to ``version`` (None: the newest under the root); returns the version."""
        root = Path(self.config.model)
        v = latest_version(root) if version is None else version
        if v is None:
            raise E.InvalidArgumentError(f"no complete model version under {root}")
        if v != self._ranker.version:
            new = self._load(version_dir(root, v))
            old = self._ranker
            if [t.dim for t in new.manifest.tables.values()] != [
                t.dim for t in old.manifest.tables.values()
            ]:
                new.close()
                raise E.ConfigError(f"version {v} changes table dims; start a new service for it")
            self._ranker = new  # one reference swap: requests keep the ranker they took
            old.close()  # its near cache is no longer refreshed; its requests still finish
        return v

    def _watch(self) -> None:
        while not self._stop.wait(self.config.watch_interval_s):
            try:
                latest = latest_version(self.config.model)
                if latest is not None and latest > self._ranker.version:
                    self.load_version(latest)
            except E.RecpsError as e:  # keep serving the current version
                log.warning("model watch: %s", e)

    def predict(
        self,
        context: Mapping[str, Any],
        candidates: list[Mapping[str, Any]] | None = None,
        columns: Mapping[str, Any] | None = None,
    ) -> Prediction:
        """Scores of row-form ``candidates`` or column-form ``columns`` (not both)."""
        ranker = self._ranker  # this request's version, whatever swaps meanwhile
        t0 = time.perf_counter()
        if candidates and columns:
            raise E.InvalidArgumentError("give candidates row-wise or column-wise, not both")
        if columns:
            sizes = {name: len(col) for name, col in columns.items()}
            if len(set(sizes.values())) > 1:
                raise E.InvalidArgumentError(
                    "columns disagree on the number of candidates: "
                    + ", ".join(f"{k} has {v}" for k, v in sorted(sizes.items()))
                )
            n = next(iter(sizes.values()))
            dense, ids = ranker.featurize_columns(context, columns, n)
        else:
            n = len(candidates or ())
            dense, ids = ranker.featurize(context, candidates or [])
        pooled = ranker.pooled(ids, n)
        t1 = time.perf_counter()
        scores = ranker.score_arrays(dense, pooled)
        t2 = time.perf_counter()
        self.lookup_latency.observe(t1 - t0)
        return Prediction(scores, ranker.version, (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._ranker.close()
        self.client.close()


# ---- gRPC --------------------------------------------------------------------------------


def _value(v: ranking_pb2.FeatureValue) -> Any:
    kind = v.WhichOneof("kind")
    if kind is None:
        return None
    if kind in ("int_list", "str_list"):
        return list(getattr(v, kind).values)
    return getattr(v, kind)


def _features(f: ranking_pb2.Features) -> dict[str, Any]:
    return {k: _value(v) for k, v in f.values.items()}


def _columns(cols: Mapping[str, ranking_pb2.Column]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, c in cols.items():
        used = [f for f in ("int_values", "float_values", "str_values") if len(getattr(c, f))]
        if len(used) > 1:
            raise E.InvalidArgumentError(f"column {name!r} sets {' and '.join(used)}")
        if c.int_values:
            vals: Any = np.array(c.int_values, dtype=np.int64)
        elif c.float_values:
            vals = np.array(c.float_values, dtype=np.float64)
        else:
            vals = list(c.str_values)
        if c.lengths:
            lengths = np.array(c.lengths, dtype=np.int64)
            if int(lengths.sum()) != len(vals):
                raise E.InvalidArgumentError(
                    f"column {name!r}: lengths sum to {int(lengths.sum())}, {len(vals)} values"
                )
            bounds = np.cumsum(lengths)[:-1]
            vals = [list(part) for part in np.split(np.asarray(vals, dtype=object), bounds)]
        out[name] = vals
    return out


class _RankingServicer(ranking_pb2_grpc.RankingServicer):
    def __init__(self, service: RankingService) -> None:
        self.service = service

    def Predict(
        self, request: ranking_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> ranking_pb2.PredictResponse:
        s = self.service
        t0 = time.perf_counter()
        try:
            p = s.predict(
                _features(request.context),
                [_features(c) for c in request.candidates],
                _columns(request.columns) if request.columns else None,
            )
        except E.RecpsError as e:
            s.errors.labels(code_of(e).name).inc()
            abort(context, e)
            raise  # unreachable: abort raises
        except Exception as e:  # a bug, not bad input: INTERNAL, logged, still serving
            log.exception("Predict failed")
            s.errors.labels("INTERNAL").inc()
            context.abort(grpc.StatusCode.INTERNAL, f"Predict failed: {type(e).__name__}: {e}")
        s.latency.labels("grpc").observe(time.perf_counter() - t0)
        return ranking_pb2.PredictResponse(
            scores=p.scores.tolist(),
            model_version=p.model_version,
            request_id=request.request_id,
            lookup_ms=p.lookup_ms,
            tower_ms=p.tower_ms,
        )


# ---- HTTP --------------------------------------------------------------------------------

_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
MAX_HTTP_BODY = 16 << 20


def _http_handler(service: RankingService) -> type[BaseHTTPRequestHandler]:
    expected = f"Bearer {service.config.auth_token}" if service.config.auth_token else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a ranking client sends many requests

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s", format % args)

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj).encode())

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._json(200, {"status": "SERVING", "model_version": service.version})
            elif self.path == "/metrics":
                self._send(200, generate_latest(service.registry), "text/plain; version=0.0.4")
            else:
                self._json(404, {"error": f"no such path {self.path}"})

        def do_POST(self) -> None:
            t0 = time.perf_counter()
            if self.path != "/predict":
                self._json(404, {"error": f"no such path {self.path}"})
                return
            if expected is not None and not hmac.compare_digest(
                self.headers.get("Authorization", "").encode(), expected.encode()
            ):
                self._json(401, {"error": "missing or wrong bearer token"})
                return
            try:
                n = int(self.headers.get("Content-Length", "0"))
                if n > MAX_HTTP_BODY:
                    raise E.CapacityError(f"body of {n} bytes exceeds {MAX_HTTP_BODY}")
                try:
                    req = json.loads(self.rfile.read(n) or b"null")
                except ValueError as e:
                    raise E.InvalidArgumentError(f"body is not JSON: {e}") from None
                cands = req.get("candidates") if isinstance(req, dict) else None
                cols = req.get("columns") if isinstance(req, dict) else None
                if not isinstance(cands, list) and not isinstance(cols, dict):
                    raise E.InvalidArgumentError(
                        'body must be {"context": {...}, "candidates": [{...}, ...]} or '
                        '{"context": {...}, "columns": {"name": [...], ...}}'
                    )
                ctx = req.get("context") or {}
                if not isinstance(ctx, dict) or not all(isinstance(c, dict) for c in cands or []):
                    raise E.InvalidArgumentError("context and each candidate must be objects")
                if cols is not None and not all(isinstance(v, list) for v in cols.values()):
                    raise E.InvalidArgumentError("each column must be a list")
                p = service.predict(ctx, cands, cols)
            except E.RecpsError as e:
                service.errors.labels(e.status).inc()
                self._json(_HTTP_STATUS.get(e.status, 500), {"error": str(e), "status": e.status})
                return
            except Exception as e:  # a bug, not bad input: 500, logged, still serving
                log.exception("HTTP predict failed")
                service.errors.labels("INTERNAL").inc()
                self._json(500, {"error": f"{type(e).__name__}: {e}", "status": "INTERNAL"})
                return
            service.latency.labels("http").observe(time.perf_counter() - t0)
            self._json(
                200,
                {
                    "scores": p.scores.tolist(),
                    "model_version": p.model_version,
                    "request_id": req.get("request_id", ""),
                    "lookup_ms": p.lookup_ms,
                    "tower_ms": p.tower_ms,
                },
            )

    return Handler


# ---- the server ----------------------------------------------------------------------------


class _PooledHTTPServer(ThreadingHTTPServer):
    """Connections served by a fixed pool of long-lived threads, not a thread each.

    A fresh thread pays torch's per-thread set-up (oneDNN primitive caches, allocator
    arenas) on its first tower call, ~15 ms here; pool threads pay it once.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, workers: int) -> None:
        super().__init__(address, handler)
        self._pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="recps-rank-http")

    def process_request(self, request: Any, client_address: Any) -> None:
        self._pool.submit(self.process_request_thread, request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class RankingServer:
    """gRPC + HTTP front of a :class:`RankingService`."""

    def __init__(self, service: RankingService) -> None:
        c = service.config
        self.service = service
        interceptors = [AuthInterceptor(c.auth_token)] if c.auth_token else []
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(c.max_workers, thread_name_prefix="recps-rank"),
            interceptors=interceptors,
        )
        ranking_pb2_grpc.add_RankingServicer_to_server(_RankingServicer(service), self.grpc_server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        bind = f"{c.host}:{c.port}"
        self.port = add_port(self.grpc_server, bind, c.tls)
        if not self.port:
            raise E.ConfigError(f"cannot bind {bind}")
        self.address = f"{c.host}:{self.port}"
        self.http: ThreadingHTTPServer | None = None
        self.http_port: int | None = None
        if c.http_port is not None:
            self.http = _PooledHTTPServer(
                (c.host, c.http_port), _http_handler(service), workers=2 * c.max_workers
            )
            self.http_port = self.http.server_address[1]

    def start(self) -> RankingServer:
        self.grpc_server.start()
        if self.http is not None:
            threading.Thread(
                target=self.http.serve_forever, name="recps-rank-http", daemon=True
            ).start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self.grpc_server.stop(grace_s).wait()
        self.service.close()


# ---- process entry point -----------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model root (or one version directory)")
    p.add_argument("--replicas", required=True, help="serving replica addresses, comma separated")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    p.add_argument("--http-port", type=int, default=0, help="HTTP/JSON port (0: any; -1: no HTTP)")
    p.add_argument("--watch-interval-s", type=float, default=5.0, help="0: no hot swap")
    p.add_argument("--threads", type=int, default=1, help="torch threads per request")
    p.add_argument(
        "--near-cache-rows",
        type=int,
        default=RankingServerConfig.near_cache_rows,
        help="embedding rows cached in this process, per dim (0: every lookup asks a replica)",
    )
    p.add_argument(
        "--near-cache-mb",
        type=float,
        default=0.0,
        help="size the near cache by memory instead (MiB, all dims together; 0: by rows)",
    )
    p.add_argument(
        "--near-cache-ttl-s",
        type=float,
        default=RankingServerConfig.near_cache_ttl_s,
        help="serve a cached row at most this long after it was fetched",
    )
    p.add_argument(
        "--near-cache-refresh-ahead",
        type=float,
        default=RankingServerConfig.near_cache_refresh_ahead,
        help="fetch a row again in the background once this fraction of its TTL has passed "
        "and a request uses it (0: off)",
    )
    p.add_argument(
        "--no-serve-stale",
        dest="serve_stale",
        action="store_false",
        help="fail a request when no replica answers, even if expired cached rows would do",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        default=cpu_rpc_workers(),
        help="gRPC handler threads (default: one per core, 2..8)",
    )
    p.add_argument("--lookup-timeout-s", type=float, default=1.0)
    p.add_argument(
        "--lookup-coalesce-inflight",
        type=int,
        default=None,
        help="merged replica lookups in flight at once (default: one per replica; 0: "
        "every lookup its own RPC)",
    )
    p.add_argument("--auth-token-file", help="file holding the bearer token (clients and replicas)")
    p.add_argument("--tls-cert", help="server certificate (PEM); with --tls-key serves TLS")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--replica-ca", help="CA (PEM) that signs the replicas' certificates")


def config_from_args(a: argparse.Namespace) -> RankingServerConfig:
    token = Path(a.auth_token_file).read_text().strip() if a.auth_token_file else None
    return RankingServerConfig(
        model=a.model,
        replicas=tuple(x.strip() for x in a.replicas.split(",") if x.strip()),
        host=a.host,
        port=a.port,
        http_port=None if a.http_port < 0 else a.http_port,
        watch_interval_s=a.watch_interval_s,
        threads=a.threads,
        near_cache_rows=a.near_cache_rows,
        near_cache_bytes=int(a.near_cache_mb * (1 << 20)),
        near_cache_ttl_s=a.near_cache_ttl_s,
        serve_stale=a.serve_stale,
        near_cache_refresh_ahead=a.near_cache_refresh_ahead,
        max_workers=a.max_workers,
        lookup_timeout_s=a.lookup_timeout_s,
        lookup_coalesce_inflight=a.lookup_coalesce_inflight,
        auth_token=token,
        tls=TlsConfig(cert_file=a.tls_cert, key_file=a.tls_key) if a.tls_cert else None,
        client_tls=TlsConfig(ca_file=a.replica_ca) if a.replica_ca else None,
    )


def run(config: RankingServerConfig) -> int:
    server = RankingServer(RankingService(config)).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    ready = {
        "event": "ready",
        "address": server.address,
        "port": server.port,
        "http_port": server.http_port,
        "model_version": server.service.version,
    }
    print(json.dumps(ready), flush=True)
    done.wait()
    server.stop()
    print(json.dumps({"event": "stopped"}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="recps rank",
        description="Run the ranking service (gRPC Predict + HTTP /predict).",
        epilog="Example: recps rank --model /models --replicas 127.0.0.1:7101 --http-port 8080",
    )
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """``recps rank``: exit 2 on a bad configuration, 1 if it cannot start serving, else
    serve until SIGTERM and exit 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = config_from_args(args)
    except (E.RecpsError, OSError) as e:
        print(f"recps rank: {e}", file=sys.stderr)
        return 2
    try:
        return run(config)
    except E.RecpsError as e:  # no replica answers, the model does not load, ...
        print(f"recps rank: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
