"""Real parameter-server shard processes for integration tests.

Each shard is ``python -m recps.ps.main`` on 127.0.0.1 port 0 with its own data directory;
the harness reads the JSON ready line, then installs ``ShardMap.even(addresses)`` on every
shard through ``UpdateShardMap``::

    with ShardGroup(tmp_path) as group:
        cluster = group.start(3, "--durability", "sync")
        client = cluster.client()
        cluster.shards[1].kill()       # SIGKILL
        cluster.shards[1].restart()    # same port, same data directory

``tests/integration/conftest.py`` wraps :class:`ShardGroup` in fixtures that kill every
process the test started, whatever happened. Children also get ``PR_SET_PDEATHSIG``
(Linux; see ``serving_harness.spawn_module``), so a pytest that is itself killed leaves
no shard behind.
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from serving_harness import spawn_module

from recps.embedding import MemoryStore, RowBatch, TableConfig
from recps.proto import ps_pb2_grpc
from recps.ps.client import PSClient
from recps.ps.config import ClientConfig, TlsConfig
from recps.ps.routing import ShardMap

READY_TIMEOUT_S = 60.0  # liveness only; a shard is normally ready in about a second
STOP_TIMEOUT_S = 30.0


# Runs in the child before exec: die with the parent (pytest), then become the shard.
@dataclass(frozen=True)
class Security:
    """How the harness itself talks to secured shards (to install the shard map)."""

    auth_token: str | None = None
    ca_file: str | None = None  # trust roots for the server certificate (TLS)
    cert_file: str | None = None  # client certificate (mTLS)
    key_file: str | None = None

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.auth_token}"),) if self.auth_token else None

    def tls(self) -> TlsConfig | None:
        if self.ca_file is None:
            return None
        return TlsConfig(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)

    def channel(self, address: str) -> grpc.Channel:
        opts = [("grpc.max_receive_message_length", 256 << 20), ("grpc.enable_retries", 0)]
        if self.ca_file is None:
            return grpc.insecure_channel(address, options=opts)
        tls = self.tls()
        assert tls is not None
        creds = grpc.ssl_channel_credentials(
            tls.read("ca_file"), tls.read("key_file"), tls.read("cert_file")
        )
        return grpc.secure_channel(address, creds, options=opts)


class Shard:
    """One shard process. ``restart`` reuses its port and data directory."""

    def __init__(self, shard_id: int, data_dir: Path, log_path: Path, args: list[str]) -> None:
        self.shard_id = shard_id
        self.data_dir = data_dir
        self.log_path = log_path
        self.args = list(args)
        self.port = 0  # 0 until the first start; then fixed for every restart
        self.metrics_port: int | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.stopped_line: dict[str, Any] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._launched: list[subprocess.Popen[str]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        """Spawn the process (does not wait for it; see ``wait_ready``)."""
        assert not self.alive(), f"shard {self.shard_id} is already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            "--data-dir",
            str(self.data_dir),
            "--shard-id",
            str(self.shard_id),
            "--port",
            str(self.port),
            *self.args,
        ]
        with open(self.log_path, "a") as log:
            log.write(f"\n==== launch shard {self.shard_id}: {' '.join(argv)}\n")
        self.proc = spawn_module("recps.ps.main", argv, self.log_path)
        self._launched.append(self.proc)
        self._lines = queue.Queue()
        self.stopped_line = None
        threading.Thread(
            target=self._read_stdout, args=(self.proc, self._lines), daemon=True
        ).start()

    @staticmethod
    def _read_stdout(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def _next_event(self, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"shard {self.shard_id}: no event in {timeout_s} s")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                return None  # stdout closed: the process is gone
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not ours
            if isinstance(event, dict) and "event" in event:
                return event

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        try:
            event = self._next_event(timeout_s)
        except TimeoutError:
            event = None
        if event is None or event.get("event") != "ready":
            rc = self.proc.poll() if self.proc else None
            raise RuntimeError(
                f"shard {self.shard_id} did not become ready (exit code {rc}, "
                f"event {event}); log tail:\n{self.log_tail()}"
            )
        self.ready = event
        if self.port == 0:
            self.port = int(event["port"])
        assert int(event["port"]) == self.port, "restart must keep the port"
        self.metrics_port = event.get("metrics_port")
        return event

    def start(self) -> Shard:
        self.launch()
        self.wait_ready()
        return self

    def kill(self, sig: int = signal.SIGKILL, wait: bool = True) -> int | None:
        """Send ``sig``; with ``wait``, reap the process and return its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit() if wait else None

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout_s)
        # A graceful stop prints {"event": "stopped"} before exiting.
        while True:
            try:
                line = self._lines.get(timeout=5.0)
            except queue.Empty:
                break
            if line is None:
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "stopped":
                self.stopped_line = event
        return rc

    def stop(self) -> int:
        """Graceful stop (SIGTERM); returns the exit code."""
        rc = self.kill(signal.SIGTERM)
        assert rc is not None
        return rc

    def restart(self) -> Shard:
        """Start again on the same port and data directory (after ``kill`` or ``stop``)."""
        assert self.port, "restart needs a shard that was started once"
        if self.alive():
            self.kill()
        return self.start()

    def reap(self) -> None:
        """Kill -9 every process this shard ever launched (teardown)."""
        for p in self._launched:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
                p.wait(timeout=STOP_TIMEOUT_S)
            if p.stdout is not None:
                p.stdout.close()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"


class Cluster:
    """Shards started together, with the map the harness installed on them."""

    def __init__(self, shards: list[Shard], security: Security) -> None:
        self.shards = shards
        self.security = security
        self._channels: dict[str, grpc.Channel] = {}
        self.shard_map = ShardMap.even(self.addresses)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.shards]

    def channel(self, i: int) -> grpc.Channel:
        addr = self.shards[i].address
        ch = self._channels.get(addr)
        if ch is None:
            ch = self._channels[addr] = self.security.channel(addr)
        return ch

    def stub(self, i: int) -> ps_pb2_grpc.ParameterServerStub:
        return ps_pb2_grpc.ParameterServerStub(self.channel(i))

    def install_map(self, shard_map: ShardMap) -> None:
        """``UpdateShardMap`` on every shard; the map must be newer than theirs."""
        msg = shard_map.to_proto()
        for i in range(len(self.shards)):
            got = self.stub(i).UpdateShardMap(msg, timeout=30, metadata=self.security.metadata())
            assert got.epoch == shard_map.epoch
        self.shard_map = shard_map

    def client_config(self, **kw: Any) -> ClientConfig:
        kw.setdefault("auth_token", self.security.auth_token)
        kw.setdefault("tls", self.security.tls())
        return ClientConfig(**kw)

    def client(self, config: ClientConfig | None = None, **kw: Any) -> PSClient:
        """A PSClient that fetches the map from the shards (as a real worker would)."""
        return PSClient(self.addresses, config or self.client_config(**kw))

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()


class ShardGroup:
    """Owns every shard process started through it; ``close`` kills whatever still runs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.shards: list[Shard] = []
        self.clusters: list[Cluster] = []
        self._n = 0

    def start(
        self, n: int, *args: str, security: Security | None = None, install_map: bool = True
    ) -> Cluster:
        """Start ``n`` shards (ids 0..n-1) with extra ``recps.ps.main`` ``args``, in parallel."""
        base = self.root / f"cluster-{self._n}"
        self._n += 1
        shards = [
            Shard(i, base / f"shard-{i}", base / f"shard-{i}.log", list(args)) for i in range(n)
        ]
        self.shards.extend(shards)
        for s in shards:
            s.launch()
        for s in shards:
            s.wait_ready()
        cluster = Cluster(shards, security or Security())
        self.clusters.append(cluster)
        if install_map:
            cluster.install_map(ShardMap.even(cluster.addresses))
        return cluster

    def close(self) -> None:
        for c in self.clusters:
            c.close()
        for s in self.shards:
            s.reap()

    def __enter__(self) -> ShardGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reference:
    """One :class:`MemoryStore` per table, fed what the cluster was fed (the oracle)."""

    def __init__(self, tables: list[TableConfig]) -> None:
        self.stores = {t.name: MemoryStore(t) for t in tables}

    def lookup(self, batch: dict[str, np.ndarray], create_missing: bool = True) -> dict:
        return {t: self.stores[t].lookup(ids, create_missing) for t, ids in batch.items()}

    def push(self, grads: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
        return sum(self.stores[t].apply_gradients(i, g) for t, (i, g) in grads.items())

    def rows(self, table: str) -> RowBatch:
        """Every stored row of ``table``, sorted by id."""
        batches = list(self.stores[table].items())
        assert len(batches) <= 1
        if batches:
            return batches[0]
        dim = self.stores[table].dim
        return RowBatch(
            np.empty(0, np.int64),
            np.empty((0, dim), np.float32),
            np.empty((0, 0), np.float32),
            np.empty(0, np.float64),
            np.empty(0, np.int64),
        )


def assert_rows_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    """Bit-for-bit equality of per-table row arrays (same shapes, same float32 values)."""
    assert sorted(got) == sorted(want), what
    for t in want:
        assert got[t].dtype == np.float32, f"{what}: table {t} dtype {got[t].dtype}"
        np.testing.assert_array_equal(got[t], want[t], err_msg=f"{what}: table {t}")
