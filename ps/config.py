"""Frozen configs of the parameter-server process and its client.

Example:
    >>> cfg = ServerConfig(data_dir="/tmp/shard0")
    >>> cfg.host, cfg.port
    ('127.0.0.1', 0)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from recps.embedding.config import TieredStoreConfig
from recps.embedding.errors import ConfigError
from recps.ps.routing import DEFAULT_NUM_SLOTS

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20


def cpu_rpc_workers() -> int:
    """gRPC handler threads for a server whose handlers are mostly GIL-bound Python: one per
    core this process may run on, at least 2 (one can wait on I/O) and at most 8.

    More threads than cores do not run more Python at once; they contend for the GIL and
    the scheduler. benchmarks/serving.py on 2 cores, Predict at concurrency 8 with the near
    cache warm: 8 handler threads cost 2.7 ms of ranking-service CPU a request, 2 threads
    1.9 ms (604 instead of 442 requests/s, p99 22 instead of 35 ms).
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(2, min(8, n or 2))


@dataclass(frozen=True)
class TlsConfig:
    """Server side: ``cert_file`` + ``key_file``; set ``client_ca_file`` to require mTLS.
    Client side: ``ca_file`` to trust the server; ``cert_file`` + ``key_file`` for mTLS."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None  # client: roots that sign the server certificate
    client_ca_file: str | None = None  # server: roots that sign client certificates (mTLS)

    def read(self, name: str) -> bytes | None:
        path = getattr(self, name)
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read TLS {name} {path}: {e}") from e


@dataclass(frozen=True)
class ServerConfig:
    """One shard process. ``port=0`` binds an ephemeral port (tests)."""

    data_dir: str
    shard_id: int = 0
    host: str = "127.0.0.1"  # loopback unless an operator opens it up on purpose
    port: int = 0
    num_slots: int = DEFAULT_NUM_SLOTS
    store: TieredStoreConfig = field(default_factory=TieredStoreConfig)  # per table
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Requests beyond this many in flight get RESOURCE_EXHAUSTED at once (back-pressure)
    # instead of queueing without bound.
    max_concurrent_rpcs: int = 64
    # gRPC's thread pool. Handlers hold the GIL for most of their numpy work, so threads
    # beyond the cores mostly add switching: benchmarks/ps.py --quick --max-workers N on
    # the 2-core box, lookups at concurrency 8, p99 14.8 ms with 8 threads, 13.0 with 4,
    # 9.6 with 2 (throughput +16%). The shard still defaults to 8, unlike the serving
    # processes (cpu_rpc_workers): its slow calls (checkpoints, restores, slot copies
    # while rebalancing) would otherwise hold the few threads training's calls need.
    max_workers: int = 8
    tls: TlsConfig | None = None
    auth_token: str | None = None  # bearer token required in call metadata when set
    metrics_port: int | None = None  # None: no Prometheus endpoint; 0: ephemeral
    dedup_window: int = 8192  # recent push sequence numbers remembered per client
    slot_scan_interval_s: float = 60.0  # how stale per-slot row counts may get
    # Per-slot request rates (Stats.slot_qps, what `rebalance --by qps` balances) follow
    # about this many seconds of traffic: long enough to smooth a training step's bursts,
    # short enough that a load shift shows within a few minutes.
    slot_rate_window_s: float = 60.0
    shutdown_grace_s: float = 10.0
    # Process start-up (ps/main.py): pin glibc's mmap/trim thresholds (Linux/glibc only;
    # skipped elsewhere). Otherwise glibc mmaps and unmaps every ~400 KB message buffer
    # until its dynamic threshold happens to rise: page faults on every request, which
    # doubled the CPU of a fresh shard's Lookup in benchmarks/ps.py.
    pin_malloc_thresholds: bool = True
    # Online delta stream (recps.ps.delta): every delta_interval_s the rows pushed since
    # the last delta go to <delta_dir>/shard-<id>/<seq>/ for serving replicas. None: off.
    delta_dir: str | None = None
    delta_interval_s: float = 10.0  # serving lags training by about this much plus polling
    delta_keep: int = 1000  # complete deltas kept per shard; 0 = keep every delta
    # Serving shards a delta is split into; None = the shards of this shard's map (the
    # export's default). A replica whose model has another split ingests every file.
    delta_serving_shards: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.shard_id < 0xFFFF:
            raise ConfigError(f"shard_id must be in [0, 65535), got {self.shard_id}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.max_message_bytes < 1 << 20:
            raise ConfigError("max_message_bytes must be >= 1 MiB")
        if self.max_concurrent_rpcs < 1 or self.max_workers < 1:
            raise ConfigError("max_concurrent_rpcs and max_workers must be >= 1")
        if self.tls is not None and not (self.tls.cert_file and self.tls.key_file):
            raise ConfigError("server TLS needs cert_file and key_file")
        if self.delta_interval_s <= 0 or self.delta_keep < 0:
            raise ConfigError("delta_interval_s must be > 0 and delta_keep >= 0")
        if self.delta_serving_shards is not None and self.delta_serving_shards < 1:
            raise ConfigError("delta_serving_shards must be >= 1 (or None)")
        if not self.slot_rate_window_s > 0:
            raise ConfigError(f"slot_rate_window_s must be > 0, got {self.slot_rate_window_s}")


@dataclass(frozen=True)
class ClientConfig:
    """How a :class:`PSClient` talks to the shards."""

    timeout_s: float = 30.0  # deadline of every RPC
    max_retries: int = 10  # on UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, stale map
    backoff_initial_s: float = 0.02
    backoff_max_s: float = 1.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_ids_per_request: int = 1 << 20  # larger batches are split into several RPCs
    tls: TlsConfig | None = None
    auth_token: str | None = None
    client_id: str | None = None  # None: a random id per client (idempotent pushes)
    server_name_override: str | None = None  # TLS: expected name in the server certificate

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_retries < 0:
            raise ConfigError("timeout_s must be > 0 and max_retries >= 0")
