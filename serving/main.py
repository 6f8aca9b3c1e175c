"""Run one serving replica as a process: ``python -m recps.serving.main --model ROOT
--data-dir D`` (also ``recps serve``). Prints one JSON line ``{"event": "ready",
"address": ..., "port": ..., "version": ...}`` on stdout once it serves (port 0 picks a
free port; the line says which), writes the same to ``D/server.json``, and shuts down
gracefully on SIGTERM or SIGINT (``{"event": "stopped"}``).

Example:
    $ python -m recps.serving.main --model /models/ctr --data-dir /srv/r0 --port 0 \\
          --shards 0,1 --watch-interval-s 10 --metrics-port 0
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from recps.ps.config import DEFAULT_MAX_MESSAGE_BYTES, cpu_rpc_workers
from recps.ps.main import add_security_arguments, security_from_args
from recps.serving.replica import ReplicaConfig


def _shards(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shards wants ids like 0,1 (got {text!r})") from None
    if not out:
        raise argparse.ArgumentTypeError("--shards needs at least one shard id")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model root (newest version) or one version dir")
    p.add_argument("--data-dir", required=True, help="this replica's working directory")
    p.add_argument("--shards", type=_shards, default=None, help="serving shards held, e.g. 0,1")
    p.add_argument("--version", type=int, default=None, help="pin this model version")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--cache-rows", type=int, default=100_000, help="cached rows per table")
    p.add_argument("--block-cache-mb", type=int, default=64, help="RocksDB block cache")
    p.add_argument(
        "--watch-interval-s",
        type=float,
        default=0.0,
        help="poll the model root for newer versions this often; 0 = never",
    )
    p.add_argument(
        "--delta-dir",
        default=None,
        help="apply the training shards' delta stream from here (recps ps start --delta-dir)",
    )
    p.add_argument(
        "--delta-interval-s", type=float, default=1.0, help="poll the delta dir this often"
    )
    p.add_argument(
        "--no-verify", action="store_true", help="skip sha256 checks of the ingested files"
    )
    p.add_argument("--max-concurrent-rpcs", type=int, default=64)
    p.add_argument(
        "--max-workers",
        type=int,
        default=cpu_rpc_workers(),
        help="gRPC handler threads (default: one per core, 2..8)",
    )
    p.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_BYTES >> 20)
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port; 0 = any")
    add_security_arguments(p)


def config_from_args(a: argparse.Namespace) -> ReplicaConfig:
    tls, token = security_from_args(a)
    return ReplicaConfig(
        model=a.model,
        data_dir=a.data_dir,
        shards=a.shards,
        version=a.version,
        host=a.host,
        port=a.port,
        cache_rows=a.cache_rows,
        block_cache_bytes=a.block_cache_mb << 20,
        watch_interval_s=a.watch_interval_s,
        verify_checksums=not a.no_verify,
        max_message_bytes=a.max_message_mb << 20,
        max_concurrent_rpcs=a.max_concurrent_rpcs,
        max_workers=a.max_workers,
        tls=tls,
        auth_token=token,
        metrics_port=a.metrics_port,
        delta_dir=a.delta_dir,
        delta_interval_s=a.delta_interval_s,
    )


def run(config: ReplicaConfig) -> int:
    """Serve until SIGTERM/SIGINT. Exit 0 after a graceful stop; 2 if the model cannot be
    loaded at start (the reason goes to stderr and to a ``{"event": "failed"}`` line)."""
    from recps.embedding.errors import RecpsError
    from recps.ps.main import pin_malloc_thresholds
    from recps.serving.replica_server import create_server

    pin_malloc_thresholds()  # before the first large buffer (see recps.ps.main)
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server, port = create_server(config)
    except RecpsError as e:
        print(f"recps serve: {type(e).__name__}: {e}", file=sys.stderr)
        print(
            json.dumps({"event": "failed", "error": type(e).__name__, "message": str(e)}),
            flush=True,
        )
        return 2
    ready = {
        "event": "ready",
        "address": server.address,
        "port": port,
        "version": server.replica.current_version,
        "shards": list(server.replica.held_shards()),
        "metrics_port": server.metrics.port,
    }
    print(json.dumps(ready), flush=True)
    done.wait()
    server.stop()
    print(json.dumps({"event": "stopped", "port": port}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m recps.serving.main",
        description=__doc__.splitlines()[0],
        epilog="Example: python -m recps.serving.main --model /models/ctr --data-dir /srv/r0",
    )
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(config_from_args(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
