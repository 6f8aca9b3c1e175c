"""Run one shard as a process: ``python -m recps.ps.main --data-dir D`` (also ``recps ps
start``). Prints one JSON line ``{"event": "ready", "address": ..., "port": ...}`` on
stdout once it serves, and shuts down gracefully on SIGTERM or SIGINT.

Example:
    $ recps ps start --data-dir /data/shard0 --shard-id 0 --port 7001
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import platform
import signal
import sys
import threading

from recps.embedding.config import TieredStoreConfig
from recps.ps.config import ServerConfig, TlsConfig
from recps.ps.routing import DEFAULT_NUM_SLOTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", required=True, help="this shard's data directory")
    p.add_argument("--shard-id", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--num-slots", type=int, default=DEFAULT_NUM_SLOTS)
    p.add_argument("--memory-mb", type=int, default=256, help="hot-tier budget per table")
    p.add_argument("--durability", choices=("async", "sync"), default="async")
    p.add_argument("--flush-interval-ms", type=int, default=5000)
    p.add_argument("--max-concurrent-rpcs", type=int, default=64)
    p.add_argument("--max-workers", type=int, default=8)
    p.add_argument("--max-message-mb", type=int, default=256)
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port; 0 = any")
    add_security_arguments(p)
    p.add_argument(
        "--delta-dir", default=None, help="publish changed rows here for serving replicas"
    )
    p.add_argument("--delta-interval-s", type=float, default=10.0, help="seconds per delta")
    p.add_argument("--delta-keep", type=int, default=1000, help="deltas kept; 0 = all")
    p.add_argument(
        "--delta-serving-shards",
        type=int,
        default=None,
        help="serving shards a delta is split into (default: the training shards)",
    )
    p.add_argument(
        "--slot-rate-window-s",
        type=float,
        default=60.0,
        help="seconds of traffic the per-slot request rates (Stats, rebalance --by qps) follow",
    )
    p.add_argument(
        "--mmap-reads",
        action="store_true",
        help="read RocksDB files through mmap: faster cold reads, mapped pages count as RSS",
    )
    p.add_argument(
        "--glibc-malloc-defaults",
        action="store_true",
        help="do not pin glibc's malloc mmap/trim thresholds at start-up",
    )


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    """Bearer token and TLS flags, the same on every recps gRPC server process."""
    p.add_argument("--auth-token", default=None, help="require this bearer token")
    p.add_argument("--auth-token-file", default=None, help="read the bearer token from a file")
    p.add_argument("--tls-cert", default=None, help="server certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", default=None, help="require client certs (mTLS)")


def security_from_args(a: argparse.Namespace) -> tuple[TlsConfig | None, str | None]:
    """(server TLS or None, bearer token or None) from :func:`add_security_arguments`."""
    token = a.auth_token
    if a.auth_token_file:
        with open(a.auth_token_file) as f:
            token = f.read().strip()
    tls = None
    if a.tls_cert or a.tls_key:
        tls = TlsConfig(cert_file=a.tls_cert, key_file=a.tls_key, client_ca_file=a.tls_client_ca)
    return tls, token


def config_from_args(a: argparse.Namespace) -> ServerConfig:
    tls, token = security_from_args(a)
    return ServerConfig(
        data_dir=a.data_dir,
        shard_id=a.shard_id,
        host=a.host,
        port=a.port,
        num_slots=a.num_slots,
        store=TieredStoreConfig(
            memory_budget_bytes=a.memory_mb << 20,
            durability=a.durability,
            flush_interval_ms=a.flush_interval_ms,
            mmap_reads=a.mmap_reads,
        ),
        max_message_bytes=a.max_message_mb << 20,
        max_concurrent_rpcs=a.max_concurrent_rpcs,
        max_workers=a.max_workers,
        tls=tls,
        auth_token=token,
        metrics_port=a.metrics_port,
        pin_malloc_thresholds=not a.glibc_malloc_defaults,
        delta_dir=a.delta_dir,
        delta_interval_s=a.delta_interval_s,
        delta_keep=a.delta_keep,
        delta_serving_shards=a.delta_serving_shards,
        slot_rate_window_s=a.slot_rate_window_s,
    )


# Above every message buffer a shard allocates, below its RSS: buffers come from the heap
# and freed memory is kept for the next request instead of being returned at once.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 128 << 20


def pin_malloc_thresholds() -> bool:
    """mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD) for this process; False where that is
    not glibc (musl, macOS, Windows), which is left alone."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(
        mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)
        and mallopt(m_trim_threshold, TRIM_THRESHOLD_BYTES)
    )


def run(config: ServerConfig) -> int:
    from recps.ps.server import create_server

    if config.pin_malloc_thresholds:
        pin_malloc_thresholds()  # before the first large buffer: it decides the rest
    server, port = create_server(config)
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ready = {
        "event": "ready",
        "address": server.address,
        "port": port,
        "shard_id": config.shard_id,
        "metrics_port": server.metrics.port,
    }
    print(json.dumps(ready), flush=True)
    done.wait()
    server.stop()
    print(json.dumps({"event": "stopped", "shard_id": config.shard_id}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="recps ps start", description=__doc__.splitlines()[0])
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(config_from_args(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
