"""The serving replica's gRPC face: the parameter server's ``Lookup`` (and the other
read RPCs) plus ``ServingAdmin`` (load, rollback, status) on one port, with the PS's
bearer-token auth, TLS, health checking, reflection and Prometheus metrics, over one
:class:`recps.serving.replica.ServingReplica`; and :class:`ServingAdminClient`, the admin
side for scripts and ``recps serve-admin``.

Example:
    >>> cfg = ReplicaConfig(model="/models/ctr", data_dir="/srv/r0")
    >>> server, port = create_server(cfg)  # doctest: +SKIP
    >>> ServingAdminClient(f"127.0.0.1:{port}").status()["current"]["version"]  # doctest: +SKIP
    3
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from recps.embedding import errors as E
from recps.ps.config import TlsConfig
from recps.ps.errors import from_rpc_error, register_error_classes
from recps.ps.server import GrpcServerProcess
from recps.serving.errors import wire_error_classes
from recps.serving.replica import (
    ReplicaConfig,
    ServingReplica,
    VersionStatus,
)

register_error_classes(*wire_error_classes())  # ServingAdminClient rebuilds them typed

# ---- the gRPC service ---------------------------------------------------------------------
# The replica answers the parameter server's own service (so a PSClient can point at it)
# plus ServingAdmin, on one port, with the PS's auth, health, reflection and metrics.

SERVICE = "recps.ps.v1.ParameterServer"
ADMIN_SERVICE = "recps.serving.v1.ServingAdmin"
# The ParameterServer RPCs a replica answers; the rest get PERMISSION_DENIED.
SERVED_RPCS = frozenset({"Lookup", "ListTables", "Stats", "GetShardMap"})


class _ServingCollector:
    """Gauges read at scrape time from the live replica (no bookkeeping on the hot path)."""

    def __init__(self, replica: ServingReplica) -> None:
        self._replica = replica

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from recps.ps.metrics import rss_bytes

        r = self._replica
        s = r.status()
        cur = s.current

        def version_gauge(name: str, doc: str, v: VersionStatus | None) -> Any:
            return GaugeMetricFamily(name, doc, value=-1 if v is None else v.version)

        yield version_gauge("recps_serving_model_version", "Version served (-1: none)", cur)
        yield version_gauge(
            "recps_serving_previous_model_version", "Version kept for rollback", s.previous
        )
        yield GaugeMetricFamily(
            "recps_serving_model_pinned",
            "1 if a version is pinned",
            value=int(s.pinned_version is not None),
        )
        yield GaugeMetricFamily(
            "recps_serving_model_load_seconds",
            "Wall time of the served version's load",
            value=cur.load_seconds if cur else 0.0,
        )
        hit = GaugeMetricFamily(
            "recps_serving_cache_hit_rate",
            "Share of ids served from the row cache",
            labels=["table"],
        )
        cached = GaugeMetricFamily(
            "recps_serving_cache_rows", "Rows in the row cache", labels=["table"]
        )
        rows = GaugeMetricFamily(
            "recps_serving_table_rows", "Rows of the held shards", labels=["table"]
        )
        looked = CounterMetricFamily(
            "recps_serving_cache_lookups",
            "Ids looked up in the served version, by cache result",
            labels=["table", "result"],
        )
        for t in cur.tables if cur else ():
            hit.add_metric([t.table], t.cache.hit_rate)
            cached.add_metric([t.table], t.cache.rows)
            rows.add_metric([t.table], t.rows)
            looked.add_metric([t.table, "hit"], t.cache.hits)
            looked.add_metric([t.table, "miss"], t.cache.misses)
        yield hit
        yield cached
        yield rows
        yield looked
        yield CounterMetricFamily("recps_serving_swaps", "Version swaps", value=r.swaps)
        if s.delta is not None:
            lag = GaugeMetricFamily(
                "recps_serving_delta_lag_seconds",
                "Seconds from a delta's publish to its application (the last one applied)",
                labels=["training_shard"],
            )
            seq = GaugeMetricFamily(
                "recps_serving_delta_seq",
                "Last delta seq applied to the served version",
                labels=["training_shard"],
            )
            for d in s.delta.shards:
                if d.lag_s >= 0:
                    lag.add_metric([str(d.training_shard)], d.lag_s)
                seq.add_metric([str(d.training_shard)], d.applied_seq)
            yield lag
            yield seq
            yield CounterMetricFamily(
                "recps_serving_deltas_applied", "Deltas applied", value=s.delta.applied_total
            )
        yield CounterMetricFamily(
            "recps_serving_load_failures", "Version loads that failed", value=r.load_failures
        )
        yield GaugeMetricFamily("recps_process_rss_bytes", "Resident memory", value=rss_bytes())


def _version_pb(v: VersionStatus | None) -> Any:
    from recps.proto import serving_pb2

    if v is None:
        return None
    return serving_pb2.VersionInfo(
        version=v.version,
        path=v.path,
        loaded_at=v.loaded_at,
        load_seconds=v.load_seconds,
        tables=[
            serving_pb2.TableStatus(
                table=t.table,
                dim=t.dim,
                row_format=t.row_format,
                default_kind=t.default_kind,
                rows=t.rows,
                disk_bytes=t.disk_bytes,
                cache_rows=t.cache.rows,
                cache_capacity=t.cache.capacity,
                cache_hits=t.cache.hits,
                cache_misses=t.cache.misses,
                cache_hit_rate=t.cache.hit_rate,
                lookups=t.cache.hits + t.cache.misses,
            )
            for t in v.tables
        ],
    )


def _make_servicers(server: ReplicaServer) -> tuple[Any, Any]:
    """The ParameterServer and ServingAdmin servicers of ``server`` (built here so that
    only this function's classes touch the generated stubs)."""
    from recps.proto import ps_pb2, ps_pb2_grpc, serving_pb2, serving_pb2_grpc
    from recps.ps import wire
    from recps.ps.server import rpc_handler
    from recps.serving.errors import ReadOnlyReplicaError

    replica, metrics = server.replica, server.metrics

    class ReplicaServicer(ps_pb2_grpc.ParameterServerServicer):
        def __init__(self) -> None:
            self.metrics = metrics  # rpc_handler times every call into metrics.latency
            self._rows_read: dict[str, Callable[[float], None]] = {}

        @rpc_handler("Lookup")
        def Lookup(self, request: Any, context: Any) -> bytes:
            """The serialized ``LookupResponse``; ``create_missing`` is ignored (read-only:
            a missing id always gets its table's default vector)."""
            tables = request.tables
            want = request.want_dtype
            wire.wire_dtype(want, "want_dtype")
            names = [t.table for t in tables]
            ids = [wire.decode_ids(t.ids, "ids", t.table) for t in tables]
            _, out = replica.lookup_tables(names, ids, request.model_version or None)
            code = want or ps_pb2.FLOAT32
            for name, rows, _ in out:
                inc = self._rows_read.get(name)
                if inc is None:
                    inc = self._rows_read[name] = metrics.rows_read.labels(name).inc
                inc(len(rows))
            return wire.encode_lookup_response([(n, r, d, code) for n, r, d in out])

        @rpc_handler("ListTables")
        def ListTables(self, request: Any, context: Any) -> Any:
            specs = [
                ps_pb2.TableSpec(
                    name=name,
                    dim=dim,
                    # What the rows were trained as is not the point here: float16 rows
                    # decode exactly to float32, int8 rows approximately.
                    dtype=ps_pb2.FLOAT16 if fmt == "float16" else ps_pb2.FLOAT32,
                    initializer=ps_pb2.InitializerSpec(
                        kind=init.kind, scale=init.scale, seed=init.seed
                    ),
                )
                for name, dim, fmt, init in replica.tables()
            ]
            return ps_pb2.ListTablesResponse(tables=specs)

        @rpc_handler("Stats")
        def Stats(self, request: Any, context: Any) -> Any:
            from recps.ps.metrics import rss_bytes

            with replica.use() as v:
                names = list(request.tables) or sorted(v.tables)
                stats = [v.table(n).status() for n in names]
                epoch = v.shard_map.epoch
            return ps_pb2.StatsResponse(
                shard_id=replica.held_shards()[0] if replica.held_shards() else 0,
                epoch=epoch,
                uptime_s=time.time() - replica.started,
                rss_bytes=rss_bytes(),
                tables=[
                    ps_pb2.TableStats(
                        table=t.table,
                        rows_in_memory=t.cache.rows,
                        rows_on_disk=t.rows,
                        hit_rate=t.cache.hit_rate,
                        memory_bytes=t.cache.memory_bytes,
                        disk_bytes=t.disk_bytes,
                        evictions=t.cache.evictions,
                        lookups=t.cache.hits + t.cache.misses,
                    )
                    for t in stats
                ],
            )

        @rpc_handler("GetShardMap")
        def GetShardMap(self, request: Any, context: Any) -> Any:
            return replica.shard_map(server.address).to_proto()

    # Every other ParameterServer RPC (Push, CreateTable, Checkpoint, Restore,
    # UpdateShardMap, slot moves, and any added later) writes or needs training state:
    # refused with PERMISSION_DENIED, never UNIMPLEMENTED or a silent success.
    def _refuse(name: str) -> Callable[..., Any]:
        @rpc_handler(name)
        def refuse(self: Any, request: Any, context: Any) -> Any:
            raise ReadOnlyReplicaError(name)

        return refuse

    for m in ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].methods:
        if m.name not in SERVED_RPCS:
            setattr(ReplicaServicer, m.name, _refuse(m.name))

    class AdminServicer(serving_pb2_grpc.ServingAdminServicer):
        def __init__(self) -> None:
            self.metrics = metrics

        @rpc_handler("LoadVersion")
        def LoadVersion(self, request: Any, context: Any) -> Any:
            version = request.version if request.HasField("version") else None
            res = replica.load_version(version)
            return serving_pb2.LoadVersionResponse(
                current=_version_pb(res.current),
                previous=_version_pb(res.previous),
                changed=res.changed,
                seconds=res.seconds,
            )

        @rpc_handler("Rollback")
        def Rollback(self, request: Any, context: Any) -> Any:
            res = replica.rollback()
            return serving_pb2.RollbackResponse(
                current=_version_pb(res.current), previous=_version_pb(res.previous)
            )

        @rpc_handler("Status")
        def Status(self, request: Any, context: Any) -> Any:
            s = replica.status()
            return serving_pb2.StatusResponse(
                current=_version_pb(s.current),
                previous=_version_pb(s.previous),
                model_root=s.model_root,
                shards=list(s.shards),
                pinned_version=s.pinned_version,
                watch_interval_s=s.watch_interval_s,
                latest_available=s.latest_available,
                uptime_s=s.uptime_s,
                address=server.address,
                delta_dir=s.delta.delta_dir if s.delta else "",
                deltas_applied=s.delta.applied_total if s.delta else 0,
                deltas=[
                    serving_pb2.DeltaShardStatus(
                        training_shard=d.training_shard,
                        applied_seq=d.applied_seq,
                        latest_seq=d.latest_seq,
                        lag_s=d.lag_s,
                        applied_at=d.applied_at,
                        error=d.error,
                    )
                    for d in (s.delta.shards if s.delta else ())
                ],
            )

    return ReplicaServicer(), AdminServicer()


class ReplicaServer(GrpcServerProcess):
    """A running replica: the gRPC server (ParameterServer + ServingAdmin), health,
    reflection and metrics over one :class:`ServingReplica`.

    Example:
        >>> server, port = create_server(cfg)  # doctest: +SKIP
        >>> PSClient([f"127.0.0.1:{port}"]).lookup({"user": [1, 2]})  # doctest: +SKIP
    """

    def __init__(self, config: ReplicaConfig, replica: ServingReplica | None = None) -> None:
        from recps.proto import serving_pb2_grpc
        from recps.ps.metrics import ServerMetrics
        from recps.ps.server import add_servicer

        self.config = config
        self.replica = replica if replica is not None else ServingReplica(config)
        held = self.replica.held_shards()
        self.metrics = ServerMetrics(held[0] if held else 0)
        self.metrics.registry.register(_ServingCollector(self.replica))  # type: ignore[arg-type]
        server = self._grpc_server("recps-serve")
        self.address = ""  # set once bound (GetShardMap names it)
        ps_servicer, admin_servicer = _make_servicers(self)
        add_servicer(ps_servicer, server)  # Lookup returns pre-serialized bytes
        serving_pb2_grpc.add_ServingAdminServicer_to_server(admin_servicer, server)
        try:
            self._bind((SERVICE, ADMIN_SERVICE))
        except E.ConfigError:
            self.replica.close()
            raise
        self.replica.on_change.append(self._update_health)

    def _update_health(self) -> None:
        from grpc_health.v1 import health_pb2

        if self._stopped.is_set():
            return
        ok = self.replica.current_version is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        # Not serving until a version is loaded (watch mode may start with none).
        for name in ("", SERVICE):
            self.health.set(name, status)
        self.health.set(ADMIN_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> ReplicaServer:
        self.grpc_server.start()
        if self.config.metrics_port is not None:
            self.metrics.serve(self.config.host, self.config.metrics_port)
        self._update_health()
        self._write_info(
            shards=list(self.replica.held_shards()), version=self.replica.current_version
        )
        return self

    def _close(self) -> None:
        self.replica.close()


def create_server(config: ReplicaConfig) -> tuple[ReplicaServer, int]:
    """Load the model, start serving; returns the running server and its port."""
    server = ReplicaServer(config).start()
    return server, server.port


def _plain(msg: Any) -> dict[str, Any]:
    """A message as a plain dict: every field by its serving.proto name, ints as ints
    (protobuf's JSON form writes uint64 as strings), None for an unset optional."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        if f.has_presence and not msg.HasField(f.name):
            out[f.name] = None
            continue
        v = getattr(msg, f.name)
        if f.is_repeated:
            out[f.name] = [_plain(x) for x in v] if f.message_type else list(v)
        else:
            out[f.name] = _plain(v) if f.message_type else v
    return out


class ServingAdminClient:
    """Client of a replica's ServingAdmin service; answers are plain dicts with the
    field names of serving.proto.

    Example:
        >>> admin = ServingAdminClient("127.0.0.1:7100")  # doctest: +SKIP
        >>> admin.load_version()["current"]["version"]  # doctest: +SKIP
        120
    """

    def __init__(
        self,
        address: str,
        auth_token: str | None = None,
        tls: TlsConfig | None = None,
        timeout_s: float = 600.0,  # a load ingests (and checksums) every file first
    ) -> None:
        import grpc

        from recps.proto import serving_pb2_grpc

        self.address = address
        self.timeout_s = timeout_s
        self._md = (("authorization", f"Bearer {auth_token}"),) if auth_token else None
        if tls is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=tls.read("ca_file"),
                private_key=tls.read("key_file"),
                certificate_chain=tls.read("cert_file"),
            )
            self._channel = grpc.secure_channel(address, creds)
        else:
            self._channel = grpc.insecure_channel(address)
        self._stub = serving_pb2_grpc.ServingAdminStub(self._channel)

    def _call(self, method: str, request: Any) -> dict[str, Any]:
        import grpc

        try:
            resp = getattr(self._stub, method)(request, timeout=self.timeout_s, metadata=self._md)
        except grpc.RpcError as e:
            raise from_rpc_error(e, f"{method} on {self.address}") from None
        return _plain(resp)

    def load_version(self, version: int | None = None) -> dict[str, Any]:
        """Load ``version`` (None: the newest complete one) and swap to it."""
        from recps.proto import serving_pb2

        req = serving_pb2.LoadVersionRequest()
        if version is not None:
            req.version = version
        return self._call("LoadVersion", req)

    def rollback(self) -> dict[str, Any]:
        from recps.proto import serving_pb2

        return self._call("Rollback", serving_pb2.RollbackRequest())

    def status(self) -> dict[str, Any]:
        from recps.proto import serving_pb2

        return self._call("Status", serving_pb2.StatusRequest())

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ServingAdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
