"""Prometheus metrics of one shard, in a registry of its own (several shards can share a
process in tests without clashing).

Example:
    >>> m = ServerMetrics(shard_id=0)
    >>> m.rows_read.labels(table="ads").inc(5)
    >>> b"recps_rows_read_total" in m.exposition()
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _StateCollector:
    """Gauges read at scrape time from the live server (no bookkeeping on the hot path)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._snapshot()
        hit = GaugeMetricFamily("recps_hot_tier_hit_rate", "Hot-tier hit rate", labels=["table"])
        mem = GaugeMetricFamily("recps_table_memory_bytes", "Hot-tier bytes", labels=["table"])
        rows = GaugeMetricFamily("recps_table_rows", "Rows stored", labels=["table", "tier"])
        for t in s["tables"]:
            hit.add_metric([t.table], t.hit_rate)
            mem.add_metric([t.table], t.memory_bytes)
            rows.add_metric([t.table, "memory"], t.rows_in_memory)
            rows.add_metric([t.table, "disk"], t.rows_on_disk)
        yield hit
        yield mem
        yield rows
        yield GaugeMetricFamily("recps_process_rss_bytes", "Resident memory", value=rss_bytes())
        yield GaugeMetricFamily("recps_shard_map_epoch", "Shard map epoch", value=s["epoch"])
        srows = GaugeMetricFamily("recps_slot_rows", "Rows per owned slot", labels=["slot"])
        sreq = GaugeMetricFamily(
            "recps_slot_requests", "Ids requested per owned slot since start", labels=["slot"]
        )
        sbytes = GaugeMetricFamily("recps_slot_bytes", "Bytes per owned slot", labels=["slot"])
        sqps = GaugeMetricFamily(
            "recps_slot_qps",
            "Ids requested per second per owned slot (~1 min EWMA)",
            labels=["slot"],
        )
        for slot, r, q, b, qps in zip(
            s["slot_ids"], s["slot_rows"], s["slot_requests"], s["slot_bytes"], s["slot_qps"]
        ):
            label = [str(slot)]
            srows.add_metric(label, r)
            sreq.add_metric(label, q)
            sbytes.add_metric(label, b)
            sqps.add_metric(label, qps)
        yield srows
        yield sreq
        yield sbytes
        yield sqps
        d = s.get("delta")
        if d is not None:  # the online delta stream to serving (--delta-dir)
            yield GaugeMetricFamily("recps_delta_seq", "Last delta published", value=d["seq"])
            pend = GaugeMetricFamily(
                "recps_delta_pending_ids", "Ids waiting for the next delta", labels=["kind"]
            )
            pend.add_metric(["changed"], d["pending_ids"])
            pend.add_metric(["expired"], d["expired_pending_ids"])
            yield pend
            yield CounterMetricFamily(
                "recps_deltas_published", "Deltas published by this process", d["published"]
            )
            yield CounterMetricFamily(
                "recps_delta_publish_failures", "Delta publishes that failed", d["failures"]
            )
            yield GaugeMetricFamily(
                "recps_delta_publish_seconds", "Duration of the last publish", d["last_publish_s"]
            )
            yield GaugeMetricFamily(
                "recps_delta_last_published_timestamp_seconds",
                "When the last delta was published (0: none by this process)",
                d["last_published_at"],
            )


class _RpcMetrics:
    """One RPC's labelled metric children, made once: ``.labels()`` takes a lock and
    builds a key, too dear for every call."""

    def __init__(self, metrics: ServerMetrics, rpc: str) -> None:
        self._latency = metrics.latency
        self._rpc = rpc
        self._observers: dict[str, Callable[[float], None]] = {}
        self.running = metrics.in_progress.labels(rpc)

    def observe(self, code: str, seconds: float) -> None:
        fn = self._observers.get(code)
        if fn is None:
            fn = self._observers[code] = self._latency.labels(self._rpc, code).observe
        fn(seconds)


class ServerMetrics:
    def __init__(self, shard_id: int) -> None:
        self.shard_id = shard_id
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "recps_rpc_latency_seconds",
            "Server-side RPC latency",
            ["rpc", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Calls a handler is running now: shows a stuck or saturated shard, and lets a
        # graceful-shutdown check know its requests really are in flight.
        self.in_progress = Gauge(
            "recps_rpc_in_progress", "RPCs being handled now", ["rpc"], registry=r
        )
        self.rows_read = Counter(
            "recps_rows_read", "Rows returned by Lookup", ["table"], registry=r
        )
        self.rows_written = Counter(
            "recps_rows_written", "Gradient rows applied by Push", ["table"], registry=r
        )
        self.duplicate_pushes = Counter(
            "recps_duplicate_pushes", "Retried pushes answered without re-applying", registry=r
        )
        self.slot_deletes = Counter(
            "recps_slot_row_deletes",
            "Tables whose rows of moved slots were dropped, by how they were found: the ids "
            "this process sent (sent) or a scan of the table (scan)",
            ["how"],
            registry=r,
        )
        self._rpcs: dict[str, _RpcMetrics] = {}
        self._http: Any = None
        self.port: int | None = None

    def rpc(self, name: str) -> _RpcMetrics:
        """The metric children of RPC ``name`` (latency by status code, calls running)."""
        m = self._rpcs.get(name)
        if m is None:
            m = self._rpcs.setdefault(name, _RpcMetrics(self, name))
        return m

    def attach_state(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_StateCollector(snapshot))  # type: ignore[arg-type]

    def serve(self, host: str, port: int) -> int:
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_port)
        return self.port

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
