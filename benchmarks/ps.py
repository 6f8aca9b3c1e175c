"""Benchmark one parameter-server shard against a bare gRPC echo measured in the same run.

    .venv/bin/python benchmarks/ps.py            # full run
    .venv/bin/python benchmarks/ps.py --quick    # under 30 s, process start-ups included

Prints progress on stderr, then one JSON object on the last stdout line. Ratios matter;
absolute numbers on a shared 2-core machine (client and server on the same cores) do not.

Workload: one shard process (``python -m recps.ps.main``), one table of dim 64 with
Adagrad, every id of ``--rows`` already in the hot tier. Each request asks for 4096 ids
drawn Zipf(1.1) (rank -> id through a fixed random permutation), as in
``benchmarks/store.py``. ``PSClient`` deduplicates ids before sending, so the wire carries
only the ~1,500-1,800 unique ids of a batch; a row is counted per *requested* id (4096 a
call), which is what the caller gets back.

The ceiling: a second process serves a bare ``recps.ps.v1.Echo`` servicer
(``benchmarks/_echo_server.py``) built like a shard: the same thread pool, the same
``maximum_concurrent_rpcs`` and server options; the client channel has the same options
as ``PSClient``'s and calls it the same way. ``PSClient`` sends a request that goes to one
shard as one blocking call (``stub.Method(req, timeout=...)``; several shards go out at
once as futures), so with this one-shard workload the ceilings are measured with blocking
calls too, and so are the raw-stub figures. The future-style echo stays as a reference
(``grpc_ceiling_future_*``): a future starts a channel spin thread whenever the channel had
no call in flight, which costs ~0.3 ms of CPU a call here; ratios must never credit the PS
with a change of call style. For every Zipf batch, the echo call sends exactly as many bytes as that
batch's real request and gets back exactly as many as its real response (measured from
serialized PS messages, response sizes from real calls). A Lookup is small-request /
big-response and a Push the reverse, so there is one ceiling per shape, and each ratio is
taken against its own shape, with the same 4096 rows counted per round trip:

* grpc_ceiling_rows_per_s       echo round trips of the Lookup shape x 4096 (blocking)
* grpc_ceiling_push_rows_per_s  echo round trips of the Push shape x 4096
* lookup_rows_per_s             PSClient.lookup, create_missing=True, float32 rows
* push_rows_per_s               PSClient.push (client-side unique_sum, server Adagrad)
* lookup_ratio, push_ratio      each over the ceiling of its shape (targets 0.8, 0.6)
* lookup_raw_rows_per_s, push_raw_rows_per_s
                                the same requests prebuilt and sent on a raw stub: the
                                server's share without PSClient's numpy work
* grpc_ceiling_future_*         the echo called as ``.future(req).result()`` (reference;
                                not measured with --quick)
* lookup_26_tables_rows_per_s, grpc_ceiling_26_tables_rows_per_s, lookup_26_tables_ratio
                                a training-job shape: 26 tables of dim 16 in one request,
                                4096 Zipf ids split over them (~158 a table), against an
                                echo of the same sizes; tracks per-table overhead (no target)
* lookup_p99_ms, lookup_p50_ms, lookup_concurrent_rows_per_s
                                ``--concurrency`` (8) threads sharing one PSClient,
                                each doing lookups back to back for ``--p99-seconds``

Before measuring, the loaded rows are written back (a push with ``wait_durable``), so
the shard's background write-back of the load stays out of the figures; the write-back
of pushed rows is steady-state work and stays in. glibc's malloc thresholds are pinned in
all three processes (see ``MALLOC_ENV``). ``--lookup-dtype float16`` measures float16 rows
on the wire against a ceiling with the float16 sizes.

Every throughput is the median of ``--rounds`` short rounds; within a round the ceiling
and the PS are measured back to back, so that load from other processes hits both alike.
``*_ratio_per_round`` shows how much that load moved the run. ``per_call`` gives CPU
milliseconds and minor page faults per call of the client (this process) and of the
server, and ``lookup_cpu_ratio`` / ``push_cpu_ratio`` the ratios of CPU per call (client +
server, ceiling over PS): with one request in flight client and server run in turn, so
this tracks the throughput ratio, and it barely moves when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 4096
DIM = 64
TABLE = "bench"
MULTI_TABLES, MULTI_DIM = 26, 16  # the training job's shape: many narrow tables
HERE = Path(__file__).resolve().parent


# glibc raises its mmap threshold the first time it frees a large mmapped block, so how
# often a process page-faults on its ~400 KB message buffers depends on its history: the
# PS shard, which sent 16 MB responses while being populated, ends up at ~0 faults a call
# and a fresh echo server at ~300 (a slower ceiling). Pinning the thresholds in every
# process of the run (servers through the environment, this one through mallopt) makes
# both sides alike; --glibc-malloc-defaults measures without it (and tells the shard, which
# since then pins them itself at start-up, not to).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}


def pin_malloc_thresholds() -> bool:
    """What MALLOC_ENV does, for this already running process; False if not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(
        mallopt(m_mmap_threshold, int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]))
        and mallopt(m_trim_threshold, int(MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]))
    )


def log(msg: str) -> None:
    print(f"[ps bench] {msg}", file=sys.stderr, flush=True)


def zipf_batches(n_rows: int, n_batches: int, seed: int, a: float = 1.1) -> list[np.ndarray]:
    """Same generator as benchmarks/store.py."""
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(12345).permutation(n_rows).astype(np.int64)
    out = []
    for _ in range(n_batches):
        ranks = np.empty(0, dtype=np.int64)
        while len(ranks) < BATCH:
            z = rng.zipf(a, BATCH * 2)
            ranks = np.concatenate([ranks, z[z <= n_rows]])
        out.append(perm[ranks[:BATCH] - 1])
    return out


def table_config(name: str = TABLE, dim: int = DIM) -> Any:
    from recps.embedding import InitializerConfig, OptimizerConfig, TableConfig

    return TableConfig(
        name,
        dim,
        initializer=InitializerConfig("uniform", 0.01),
        optimizer=OptimizerConfig("adagrad", lr=0.05),
    )


# ---- processes ---------------------------------------------------------------------------


class Proc:
    """A child process that prints a JSON ready line on stdout; stderr goes to a file."""

    def __init__(
        self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} did not become ready; its stderr:\n{tail}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "ready":
                return msg

    def stop(self) -> None:
        p = self.popen
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._log.close()


# ---- measurement -------------------------------------------------------------------------


def process_usage(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of a process, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


class Workload:
    """One thing to measure: ``fn(item)`` over ``items``, served by process ``server_pid``.

    Besides each round's rate it sums CPU seconds and minor page faults of this process
    (client) and of the server: unlike wall time, these barely move when other jobs
    share the cores (CPU time has 10 ms resolution; the sums span every round).
    """

    def __init__(
        self, key: str, fn: Callable[[Any], Any], items: Sequence[Any], server_pid: int
    ) -> None:
        self.key, self.fn, self.items, self.server_pid = key, fn, items, server_pid
        self.rates: list[float] = []
        self.calls = 0
        self.cpu_s = np.zeros(2)  # client, server
        self.faults = np.zeros(2)

    def run(self, min_s: float) -> float:
        """Rows/s cycling over the items for at least ``min_s`` (BATCH rows a call)."""
        items, fn = self.items, self.fn
        calls = 0
        u0 = self._usage()
        t0 = time.perf_counter()
        while True:
            fn(items[calls % len(items)])
            calls += 1
            dt = time.perf_counter() - t0
            if dt >= min_s and calls >= 3:
                break
        u1 = self._usage()
        self.cpu_s += u1[0] - u0[0]
        self.faults += u1[1] - u0[1]
        self.calls += calls
        rate = calls * BATCH / dt
        self.rates.append(rate)
        return rate

    def _usage(self) -> tuple[np.ndarray, np.ndarray]:
        me, server = process_usage(os.getpid()), process_usage(self.server_pid)
        return np.array([me[0], server[0]]), np.array([me[1], server[1]])

    def per_call(self) -> dict[str, float]:
        c, f = self.cpu_s / self.calls, self.faults / self.calls
        return {
            "client_cpu_ms": 1e3 * c[0],
            "server_cpu_ms": 1e3 * c[1],
            "client_page_faults": f[0],
            "server_page_faults": f[1],
        }


def concurrent_lookups(
    client: Any, batches: list[np.ndarray], threads: int, seconds: float
) -> dict[str, float]:
    lat: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(k: int) -> None:
        mine = batches[k::threads] or batches
        start.wait()
        i = 0
        while True:
            t = time.perf_counter()
            if t >= stop_at[0]:
                return
            client.lookup({TABLE: mine[i % len(mine)]})
            lat[k].append(time.perf_counter() - t)
            i += 1

    ts = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    all_ms = np.array([x for v in lat for x in v]) * 1e3
    return {
        "lookup_p50_ms": float(np.percentile(all_ms, 50)),
        "lookup_p99_ms": float(np.percentile(all_ms, 99)),
        "lookup_concurrent_rows_per_s": len(all_ms) * BATCH / dt,
        "lookup_concurrent_calls": len(all_ms),
        "concurrency": threads,
    }


def echo_request(request_bytes: int, reply_bytes: int) -> Any:
    """An EchoRequest whose serialized size is ``request_bytes`` and that asks for an
    EchoResponse whose serialized size is ``reply_bytes``."""
    from recps.proto import ps_pb2

    def payload_len(total: int) -> int:
        # A bytes field costs 1 tag byte + a varint length + the payload.
        for n in range(max(0, total - 11), total):
            if 1 + len(_varint(n)) + n == total:
                return n
        raise ValueError(f"no payload serializes to {total} bytes")

    want = payload_len(reply_bytes) if reply_bytes else 0
    n = payload_len(request_bytes)
    assert n >= 8, "request too small to carry the reply size"
    req = ps_pb2.EchoRequest(payload=want.to_bytes(8, "little") + bytes(n - 8))
    assert req.ByteSize() == request_bytes
    return req


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """What PSClient._open uses for an insecure channel."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


# ---- the run -----------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import grpc

    from recps.embedding.base import unique_sum
    from recps.proto import ps_pb2, ps_pb2_grpc
    from recps.ps.client import PSClient
    from recps.ps.config import ClientConfig
    from recps.ps.wire import STORAGE_TO_WIRE, encode_ids

    t_start = time.perf_counter()
    # Hot tier sized like benchmarks/store.py: ~700 B a row of dim 64 + Adagrad state.
    memory_mb = (args.rows * 700 >> 20) + 64
    server_args = ["--max-workers", str(args.max_workers), "--max-message-mb", "256"]
    malloc_env = {} if args.glibc_malloc_defaults else MALLOC_ENV
    procs: list[Proc] = []
    channels: list[Any] = []  # closed before the servers stop: an open one blocks exit
    try:
        ps = Proc(
            "ps shard",
            [
                sys.executable,
                "-m",
                "recps.ps.main",
                "--data-dir",
                str(workdir / "shard"),
                "--port",
                "0",
                "--memory-mb",
                str(memory_mb),
                *server_args,
                # The shard pins its thresholds itself (ServerConfig.pin_malloc_thresholds).
                *(["--glibc-malloc-defaults"] if args.glibc_malloc_defaults else []),
            ],
            workdir / "ps.log",
            malloc_env,
        )
        procs.append(ps)
        echo = Proc(
            "echo server",
            [sys.executable, str(HERE / "_echo_server.py"), "--port", "0", *server_args],
            workdir / "echo.log",
            malloc_env,
        )
        procs.append(echo)
        # Generate the workload while the servers start.
        batches = zipf_batches(args.rows, args.batches, seed=1)
        push_batches = zipf_batches(args.rows, args.batches, seed=2)
        grads = (np.random.default_rng(3).standard_normal((BATCH, DIM)) * 0.01).astype(np.float32)
        ps_addr = ps.ready(60)["address"]
        echo_addr = echo.ready(60)["address"]
        log(f"servers up in {time.perf_counter() - t_start:.1f}s: ps {ps_addr}, echo {echo_addr}")

        cfg = ClientConfig()
        client = PSClient([ps_addr], cfg)
        channels.append(client)
        client.create_table(table_config())
        t = time.perf_counter()
        chunk = 1 << 16
        for i in range(0, args.rows, chunk):
            client.lookup({TABLE: np.arange(i, min(i + chunk, args.rows), dtype=np.int64)})
        # Write the new rows back now (a zero gradient changes nothing), so that the
        # shard's background write-back of the load does not run during the measurements.
        client.push({TABLE: (np.zeros(1, np.int64), np.zeros((1, DIM), np.float32))}, True)
        st = client.stats()[0].tables[0]
        assert st.rows_in_memory == args.rows, f"warm table must fit in memory: {st}"
        log(f"populated {args.rows} rows in {time.perf_counter() - t:.1f}s")

        # Raw requests: what PSClient puts on the wire for each batch (unique ids, sorted).
        want = STORAGE_TO_WIRE[args.lookup_dtype]
        epoch = client.shard_map.epoch
        uniq = [np.unique(b) for b in batches]
        lookup_reqs = [
            ps_pb2.LookupRequest(
                shard_map_epoch=epoch,
                tables=[ps_pb2.TableIds(table=TABLE, ids=encode_ids(u))],
                create_missing=True,
                want_dtype=want,
            )
            for u in uniq
        ]
        push_tables = []
        for b in push_batches:
            u, g = unique_sum(b, grads)
            push_tables.append(
                ps_pb2.TableGrads(
                    table=TABLE,
                    ids=encode_ids(u),
                    grads=g.tobytes(),
                    dim=DIM,
                    dtype=ps_pb2.FLOAT32,
                )
            )
        seq = [1 << 40]  # far above PSClient's own seqs; the raw pushes use their own id

        def push_req(tg: Any) -> Any:
            seq[0] += 1
            return ps_pb2.PushRequest(
                client_id="bench-raw", seq=seq[0], shard_map_epoch=epoch, tables=[tg]
            )

        ps_channel = grpc.insecure_channel(ps_addr, options=channel_options(cfg.max_message_bytes))
        channels.append(ps_channel)
        stub = ps_pb2_grpc.ParameterServerStub(ps_channel)
        timeout = cfg.timeout_s

        def raw_lookup(req: Any) -> Any:
            return stub.Lookup(req, timeout=timeout)

        def raw_push(tg: Any) -> Any:
            return stub.Push(push_req(tg), timeout=timeout)

        # Real wire sizes, responses from real calls (this also warms the server).
        lookup_sizes = [(r.ByteSize(), raw_lookup(r).ByteSize()) for r in lookup_reqs]
        push_sizes = [(push_req(tg).ByteSize(), raw_push(tg).ByteSize()) for tg in push_tables]
        echo_lookup = [echo_request(q, r) for q, r in lookup_sizes]
        echo_push = [echo_request(q, r) for q, r in push_sizes]
        echo_channel = grpc.insecure_channel(
            echo_addr, options=channel_options(cfg.max_message_bytes)
        )
        channels.append(echo_channel)
        estub = ps_pb2_grpc.EchoStub(echo_channel)

        def echo_future(req: Any) -> Any:
            return estub.Echo.future(req, timeout=timeout).result()

        def echo_blocking(req: Any) -> Any:
            return estub.Echo(req, timeout=timeout)

        # The training-job shape: 26 tables of dim 16, the 4096 ids of a batch split
        # over them; real sizes from prebuilt requests, as above.
        multi = [f"{TABLE}{k:02d}" for k in range(MULTI_TABLES)]
        for name in multi:
            client.create_table(table_config(name, MULTI_DIM))
        multi_rows = max(args.rows // 10, 10_000)
        t = time.perf_counter()
        for i in range(0, multi_rows, chunk):
            ids = np.arange(i, min(i + chunk, multi_rows), dtype=np.int64)
            client.lookup(dict.fromkeys(multi, ids), assume_unique=True)
        dt = time.perf_counter() - t
        log(f"populated {MULTI_TABLES} tables x {multi_rows} rows in {dt:.1f}s")
        multi_batches = [
            dict(zip(multi, np.array_split(b, MULTI_TABLES)))
            for b in zipf_batches(multi_rows, args.batches, seed=4)
        ]
        multi_sizes = []
        for mb in multi_batches:
            r = ps_pb2.LookupRequest(
                shard_map_epoch=epoch,
                tables=[
                    ps_pb2.TableIds(table=t, ids=encode_ids(np.unique(v))) for t, v in mb.items()
                ],
                create_missing=True,
                want_dtype=want,
            )
            multi_sizes.append((r.ByteSize(), raw_lookup(r).ByteSize()))
        echo_multi = [echo_request(q, r) for q, r in multi_sizes]

        for reqs, sizes in (
            (echo_lookup, lookup_sizes),
            (echo_push, push_sizes),
            (echo_multi, multi_sizes),
        ):
            for r, (_, reply) in zip(reqs[:3], sizes[:3]):
                assert echo_blocking(r).ByteSize() == reply, "echo reply size mismatch"

        def ps_lookup(b: np.ndarray) -> Any:
            return client.lookup({TABLE: b}, dtype=args.lookup_dtype)

        def ps_push(b: np.ndarray) -> Any:
            return client.push({TABLE: (b, grads)})

        def ps_lookup_multi(mb: dict[str, np.ndarray]) -> Any:
            return client.lookup(mb, dtype=args.lookup_dtype)

        for b in batches[:3]:  # warm PSClient's paths too
            ps_lookup(b)
        for b in push_batches[:3]:
            ps_push(b)
        for mb in multi_batches[:3]:
            ps_lookup_multi(mb)

        ps_pid, echo_pid = ps.popen.pid, echo.popen.pid
        plan = [
            Workload("grpc_ceiling_rows_per_s", echo_blocking, echo_lookup, echo_pid),
            Workload("lookup_rows_per_s", ps_lookup, batches, ps_pid),
            Workload("lookup_raw_rows_per_s", raw_lookup, lookup_reqs, ps_pid),
            Workload("grpc_ceiling_push_rows_per_s", echo_blocking, echo_push, echo_pid),
            Workload("push_rows_per_s", ps_push, push_batches, ps_pid),
            Workload("push_raw_rows_per_s", raw_push, push_tables, ps_pid),
            Workload("grpc_ceiling_26_tables_rows_per_s", echo_blocking, echo_multi, echo_pid),
            Workload("lookup_26_tables_rows_per_s", ps_lookup_multi, multi_batches, ps_pid),
        ]
        if not args.quick:  # references only; --quick keeps to its 30 s
            plan += [
                Workload("grpc_ceiling_future_rows_per_s", echo_future, echo_lookup, echo_pid),
                Workload("grpc_ceiling_future_push_rows_per_s", echo_future, echo_push, echo_pid),
            ]
        res: dict[str, Any] = {}
        ratios: dict[str, list[float]] = {"lookup": [], "push": [], "lookup_26_tables": []}
        t = time.perf_counter()
        for r in range(args.rounds):
            got = {w.key: w.run(args.seconds) for w in plan}
            ratios["lookup"].append(got["lookup_rows_per_s"] / got["grpc_ceiling_rows_per_s"])
            ratios["push"].append(got["push_rows_per_s"] / got["grpc_ceiling_push_rows_per_s"])
            ratios["lookup_26_tables"].append(
                got["lookup_26_tables_rows_per_s"] / got["grpc_ceiling_26_tables_rows_per_s"]
            )
            figures = (f"{k.removesuffix('_rows_per_s')}={v / 1e6:.2f}M" for k, v in got.items())
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(figures))
        log(f"{args.rounds} rounds in {time.perf_counter() - t:.1f}s")
        for w in plan:
            res[w.key] = float(np.median(w.rates))
        # Ratio of each round's figures, measured back to back: shows how noisy the run was.
        res["lookup_ratio_per_round"] = ratios["lookup"]
        res["push_ratio_per_round"] = ratios["push"]
        res["lookup_26_tables_ratio_per_round"] = ratios["lookup_26_tables"]
        res["per_call"] = {w.key.removesuffix("_rows_per_s"): w.per_call() for w in plan}

        st0 = client.stats()[0].tables[0]
        res.update(concurrent_lookups(client, batches, args.concurrency, args.p99_seconds))
        log(
            f"concurrency {args.concurrency}: p50 {res['lookup_p50_ms']:.1f} ms, "
            f"p99 {res['lookup_p99_ms']:.1f} ms, {res['lookup_concurrent_rows_per_s']:,.0f} rows/s"
        )
        st = client.stats()[0].tables[0]
        hits = st.hit_rate * st.lookups - st0.hit_rate * st0.lookups
        res["hit_rate_concurrent"] = hits / max(1, st.lookups - st0.lookups)
        res["table_rows"] = args.rows
        res["unique_ids_per_request"] = float(np.mean([len(u) for u in uniq]))
        res["lookup_request_bytes"] = float(np.mean([q for q, _ in lookup_sizes]))
        res["lookup_response_bytes"] = float(np.mean([s for _, s in lookup_sizes]))
        res["push_request_bytes"] = float(np.mean([q for q, _ in push_sizes]))
        res["push_response_bytes"] = float(np.mean([s for _, s in push_sizes]))
        res["lookup_26_tables_request_bytes"] = float(np.mean([q for q, _ in multi_sizes]))
        res["lookup_26_tables_response_bytes"] = float(np.mean([s for _, s in multi_sizes]))
        res["lookup_dtype"] = args.lookup_dtype
        res["max_workers"] = args.max_workers
    finally:
        for ch in channels:
            ch.close()
        for p in reversed(procs):
            p.stop()
    res["lookup_ratio"] = res["lookup_rows_per_s"] / res["grpc_ceiling_rows_per_s"]
    res["push_ratio"] = res["push_rows_per_s"] / res["grpc_ceiling_push_rows_per_s"]
    res["lookup_raw_ratio"] = res["lookup_raw_rows_per_s"] / res["grpc_ceiling_rows_per_s"]
    res["push_raw_ratio"] = res["push_raw_rows_per_s"] / res["grpc_ceiling_push_rows_per_s"]
    res["lookup_26_tables_ratio"] = (
        res["lookup_26_tables_rows_per_s"] / res["grpc_ceiling_26_tables_rows_per_s"]
    )
    # The same ratios from CPU time (client + server) per call: a steadier proxy when other
    # jobs share the cores, since a lone request stream runs its client and server in turn.
    cpu = {k: v["client_cpu_ms"] + v["server_cpu_ms"] for k, v in res["per_call"].items()}
    res["lookup_cpu_ratio"] = cpu["grpc_ceiling"] / cpu["lookup"]
    res["push_cpu_ratio"] = cpu["grpc_ceiling_push"] / cpu["push"]
    res["targets_met"] = {
        "lookup_ratio>=0.8": res["lookup_ratio"] >= 0.8,
        "push_ratio>=0.6": res["push_ratio"] >= 0.6,
    }
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under 30 s")
    p.add_argument("--rows", type=int, default=1_000_000, help="ids in the table, all warm")
    p.add_argument("--batches", type=int, default=64, help="distinct Zipf batches per workload")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seconds", type=float, default=1.0, help="per measurement per round")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--p99-seconds", type=float, default=10.0)
    p.add_argument("--max-workers", type=int, default=8, help="server thread pool (both)")
    p.add_argument("--lookup-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument(
        "--glibc-malloc-defaults",
        action="store_true",
        help="do not pin glibc's mmap/trim thresholds (see MALLOC_ENV)",
    )
    args = p.parse_args()
    if args.quick:
        args.rows, args.batches, args.rounds = 100_000, 16, 8
        args.seconds, args.p99_seconds = 0.15, 2.0
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the server processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    pinned = not args.glibc_malloc_defaults and pin_malloc_thresholds()
    with tempfile.TemporaryDirectory(prefix="recps-bench-ps-") as d:
        res = run(args, Path(d))
    res["malloc_thresholds_pinned"] = pinned
    res["quick"] = args.quick
    res["seconds"] = time.perf_counter() - t0
    print(json.dumps(res))


if __name__ == "__main__":
    main()
