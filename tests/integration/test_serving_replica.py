"""The serving replica as a real process (``python -m recps.serving.main`` on 127.0.0.1
port 0) over model versions written with the exporter's own format code
(``model_format.write_sst`` + ``ModelManifest``), read through the training PS's
``PSClient``: exact rows per row format, defaults for missing ids, read-only refusals,
precise errors, hot swap under load with zero failed requests, rollback, restart, watch
mode, auth, health and metrics. A few checks of load failures run the replica in-process
(same code, no socket) because they need no network.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import spawn_module

from recps.embedding import errors as E
from recps.embedding.config import InitializerConfig
from recps.embedding.initializers import RowInitializer
from recps.proto import ps_pb2, ps_pb2_grpc
from recps.ps.client import PSClient
from recps.ps.config import ClientConfig
from recps.ps.routing import ShardMap
from recps.serving import model_format as mf
from recps.serving.client import ServingClient, ServingClientConfig
from recps.serving.errors import NoPreviousVersionError, ShardNotHeldError
from recps.serving.replica import ReplicaConfig, ServingReplica
from recps.serving.replica_server import SERVED_RPCS, ServingAdminClient

NUM_SLOTS = 1024
READY_TIMEOUT_S = 60.0

# ---- model versions --------------------------------------------------------------------------

INIT = {"kind": "uniform", "scale": 0.05, "seed": 7}
ZEROS = {"kind": "zeros"}


def _ids(n: int, seed: int) -> np.ndarray:
    """n distinct ids spread over the whole int64 range (negative ones too)."""
    rng = np.random.default_rng(seed)
    return rng.choice(np.int64(1) << 60, n, replace=False).astype(np.int64) - (1 << 59)


def _rows(ids: np.ndarray, dim: int, version: int) -> np.ndarray:
    """Rows that depend on (id, version): a result says which version answered."""
    rng = np.random.default_rng([len(ids), dim, version])
    return (rng.normal(size=(len(ids), dim)) + 10 * version).astype(np.float32)


def make_version(
    root: Path,
    version: int,
    tables: dict[str, tuple[np.ndarray, np.ndarray, str, dict[str, Any]]],
    num_shards: int = 2,
    parts: int = 2,
) -> Path:
    """Write ``root/<version>`` as the exporter does: SSTs per (table, serving shard),
    ``parts`` interleaved (overlapping key ranges) files each, manifest, COMPLETE, then
    one atomic rename."""
    tmp = Path(root) / f"{mf.TMP_PREFIX}{version}-{os.getpid()}"
    smap = ShardMap.even([""] * num_shards, num_slots=NUM_SLOTS)
    files: dict[str, mf.FileEntry] = {}
    specs: dict[str, mf.TableSpec] = {}
    for name, (ids, rows, fmt, default) in tables.items():
        owners = smap.owners(name, ids)
        for k in range(num_shards):
            mine = np.flatnonzero(owners == k)
            mine = mine[np.argsort(ids[mine])]
            for p in range(parts):
                sel = mine[p::parts]
                if not len(sel):
                    continue
                rel = mf.sst_relpath(name, k, p)
                path = tmp / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                n = mf.write_sst(path, ids[sel], rows[sel], fmt)
                files[rel] = mf.FileEntry(path.stat().st_size, mf.file_sha256(path), n)
        specs[name] = mf.TableSpec(rows.shape[1], "float32", fmt, len(ids), dict(default))
    manifest = mf.ModelManifest(
        version=version,
        created_at=time.time(),
        source_checkpoint="test",
        step=version,
        model={},
        dense_features=(),
        features=(),
        hashing={},
        tables=specs,
        shard_map=smap,
        files=files,
    )
    (tmp / mf.MANIFEST_FILE).write_text(manifest.to_json())
    (tmp / mf.COMPLETE_FILE).write_text("")
    final = mf.version_dir(root, version)
    tmp.rename(final)
    return final


@pytest.fixture(scope="module")
def ids() -> dict[str, np.ndarray]:
    return {"f32": _ids(1500, 1), "f16": _ids(800, 2), "i8": _ids(600, 3)}


def _tables(ids: dict[str, np.ndarray], version: int) -> dict[str, Any]:
    return {
        "f32": (ids["f32"], _rows(ids["f32"], 8, version), "float32", ZEROS),
        "f16": (
            ids["f16"],
            _rows(ids["f16"], 8, version),
            "float16",
            {
                "kind": "initializer",
                "initializer": INIT,
            },
        ),
        "i8": (ids["i8"], _rows(ids["i8"], 16, version), "int8", ZEROS),
    }


def _swap_tables(ids: dict[str, np.ndarray], version: int) -> dict[str, Any]:
    return {
        "a": (ids["f32"], _rows(ids["f32"], 4, version), "float32", ZEROS),
        "b": (ids["f16"], _rows(ids["f16"], 4, version), "float32", ZEROS),
    }


# ---- replica processes -----------------------------------------------------------------------


class Replica:
    """One ``recps.serving.main`` process; ``start`` again reuses port and data dir."""

    def __init__(self, model: Path, data_dir: Path, *args: str) -> None:
        self.model, self.data_dir, self.args = model, data_dir, list(args)
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self._channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> dict[str, Any]:
        argv = ["--model", str(self.model), "--data-dir", str(self.data_dir)]
        argv += ["--port", str(self.port), "--cache-rows", "2000", *self.args]
        self.proc = spawn_module("recps.serving.main", argv, self.log)
        self.events = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.events), daemon=True).start()
        event = self.next_event(READY_TIMEOUT_S)
        if event is None or event.get("event") != "ready":
            raise RuntimeError(f"replica not ready: {event}; log:\n{self.log.read_text()[-3000:]}")
        self.ready = event
        self.port = int(event["port"])
        return event

    @staticmethod
    def _read(proc: subprocess.Popen[str], events: queue.Queue[dict[str, Any] | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and "event" in event:
                    events.put(event)
        events.put(None)

    def next_event(self, timeout_s: float) -> dict[str, Any] | None:
        try:
            return self.events.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def stop(self) -> tuple[int, dict[str, Any] | None]:
        """SIGTERM; (exit code, the "stopped" event)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        return rc, self.next_event(10)

    def reap(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def client(self, **kw: Any) -> PSClient:
        kw.setdefault("timeout_s", 10.0)
        kw.setdefault("max_retries", 2)
        kw.setdefault("backoff_max_s", 0.05)
        return PSClient([self.address], ClientConfig(**kw))

    def admin(self, **kw: Any) -> ServingAdminClient:
        return ServingAdminClient(self.address, timeout_s=60, **kw)

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def stub(self) -> ps_pb2_grpc.ParameterServerStub:
        return ps_pb2_grpc.ParameterServerStub(self.channel())


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """``spawn(model, name, *args)`` starts a replica; all are killed when the test ends."""
    started: list[Replica] = []

    def factory(model: Path, name: str, *args: str) -> Replica:
        r = Replica(model, tmp_path / name, *args)
        started.append(r)
        r.start()
        return r

    yield factory
    for r in started:
        r.reap()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, ids: dict[str, np.ndarray]) -> Iterator[Any]:
    """One replica of a three-table v1 (float32/zeros, float16/initializer, int8/zeros),
    with metrics and a 1 MiB message limit, shared by the read-only tests."""
    base = tmp_path_factory.mktemp("served")
    root = base / "model"
    root.mkdir()
    tables = _tables(ids, 1)
    make_version(root, 1, tables)
    r = Replica(root, base / "replica", "--metrics-port", "0", "--max-message-mb", "1")
    try:
        r.start()
        yield r, tables, root
    finally:
        r.reap()


# ---- reading rows ----------------------------------------------------------------------------


def test_psclient_reads_the_exported_rows_of_every_format(served: Any) -> None:
    replica, tables, _ = served
    client = replica.client()
    rng = np.random.default_rng(5)
    batch = {name: rng.permutation(t[0])[:500].repeat(2) for name, t in tables.items()}
    got = client.lookup(batch, create_missing=False)
    for name, (ids, rows, fmt, _) in tables.items():
        order = np.argsort(ids)
        want = rows[order[np.searchsorted(ids, batch[name], sorter=order)]]
        want = want if fmt != "float16" else want.astype(np.float16).astype(np.float32)
        if fmt == "int8":
            bound = np.abs(want).max(axis=1, keepdims=True) / 127 / 2 * 1.001 + 1e-6
            assert (np.abs(got[name] - want) <= bound).all(), name
            assert not np.array_equal(got[name], want)  # it did go through int8
        else:
            np.testing.assert_array_equal(got[name], want, err_msg=name)
    # Asked for float16 on the wire, the float16 table comes back bit for bit.
    half = client.lookup({"f16": batch["f16"]}, dtype="float16")["f16"]
    np.testing.assert_array_equal(half, got["f16"])


def test_model_files_stay_intact_and_are_linked_not_copied(served: Any) -> None:
    _, _, root = served
    vdir = mf.version_dir(root, 1)
    manifest = mf.ModelManifest.load(vdir, verify=True)  # every sha256 still matches
    ssts = manifest.sst_files("f32")
    assert ssts and all((vdir / rel).stat().st_nlink == 2 for rel in ssts)


def test_missing_ids_get_the_table_default_never_an_error(served: Any) -> None:
    replica, tables, _ = served
    client = replica.client()
    known = set().union(*(set(t[0].tolist()) for t in tables.values()))
    missing = np.array([i for i in range(-50, 50) if i not in known], dtype=np.int64)
    got = client.lookup({"f32": missing, "f16": missing, "i8": missing})
    assert not got["f32"].any() and got["f32"].shape == (len(missing), 8)
    assert not got["i8"].any()
    want = RowInitializer("f16", 8, InitializerConfig(**INIT))(missing)
    assert want.any()
    np.testing.assert_array_equal(got["f16"], want)
    # Mixed with stored ids, in the caller's order.
    ids16 = tables["f16"][0]
    mixed = np.array([missing[0], ids16[3], missing[1], ids16[3]])
    row = tables["f16"][1][3].astype(np.float16).astype(np.float32)
    out = client.lookup({"f16": mixed})["f16"]
    np.testing.assert_array_equal(out[[1, 3]], [row, row])
    np.testing.assert_array_equal(out[[0, 2]], want[:2])


def test_list_tables_and_shard_map_name_the_replica(served: Any) -> None:
    replica, _, _ = served
    client = replica.client()
    specs = {c.name: c for c in client.list_tables()}
    assert sorted(specs) == ["f16", "f32", "i8"]
    assert (specs["f32"].dim, specs["i8"].dim) == (8, 16)
    assert specs["f16"].dtype == "float16"
    assert (specs["f16"].initializer.kind, specs["f16"].initializer.seed) == ("uniform", 7)
    assert specs["f32"].initializer.kind == "zeros"
    m = ShardMap.from_proto(replica.stub().GetShardMap(ps_pb2.GetShardMapRequest(), timeout=10))
    assert m.shards == {0: replica.address, 1: replica.address} and m.epoch == 1
    np.testing.assert_array_equal(m.slot_owner, ShardMap.even(["", ""], NUM_SLOTS).slot_owner)
    stats = client.stats()  # one call per shard entry, both to this replica
    assert sorted(stats) == [0, 1]
    s = stats[0]
    assert {t.table: t.rows_on_disk for t in s.tables} == {"f16": 800, "f32": 1500, "i8": 600}


# ---- refusals and bad input ------------------------------------------------------------------


def test_writes_are_permission_denied_and_the_replica_keeps_serving(served: Any) -> None:
    replica, tables, _ = served
    client = replica.client()
    ids = tables["f32"][0][:3]
    with pytest.raises(E.PermissionDeniedError, match="read-only serving replica"):
        client.push({"f32": (ids, np.ones((3, 8), np.float32))})
    stub = replica.stub()
    calls = {
        "CreateTable": ps_pb2.CreateTableRequest(spec=ps_pb2.TableSpec(name="x", dim=4)),
        "Checkpoint": ps_pb2.CheckpointRequest(dir="/tmp", tag="t"),
        "Restore": ps_pb2.RestoreRequest(dir="/tmp", tag="t"),
        "UpdateShardMap": ShardMap.even(["a"], num_slots=NUM_SLOTS, epoch=99).to_proto(),
    }
    for name, req in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, name)(req, timeout=10)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, name
        assert name in err.value.details()
    # Every RPC of the service is either served or refused, none UNIMPLEMENTED.
    service = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
    for m in service.methods:
        if m.name in SERVED_RPCS:
            continue
        empty = getattr(ps_pb2, m.input_type.name)()
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, m.name)(empty, timeout=10)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, m.name
    np.testing.assert_array_equal(client.lookup({"f32": ids})["f32"], tables["f32"][1][:3])


def _lookup_error(replica: Replica, *tables: tuple[str, bytes]) -> grpc.RpcError:
    req = ps_pb2.LookupRequest(tables=[ps_pb2.TableIds(table=t, ids=b) for t, b in tables])
    with pytest.raises(grpc.RpcError) as err:
        replica.stub().Lookup(req, timeout=10)
    return err.value


def test_bad_requests_get_precise_statuses(served: Any) -> None:
    replica, tables, _ = served
    ok = tables["f32"][0][:2].astype("<i8").tobytes()
    e = _lookup_error(replica, ("nope", ok))
    assert e.code() is grpc.StatusCode.NOT_FOUND and "nope" in e.details()
    e = _lookup_error(replica, ("f32", ok[:7]))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "multiple of 8" in e.details()
    e = _lookup_error(replica, ("f32", ok), ("f32", ok))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT
    e = _lookup_error(replica, ("f32", np.zeros(200_000, "<i8").tobytes()))  # 1.6 MB > 1 MiB
    assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(E.UnknownTableError):
        replica.client().lookup({"nope": [1]})
    got = replica.client().lookup({"f32": tables["f32"][0][:2]})["f32"]  # still serving
    np.testing.assert_array_equal(got, tables["f32"][1][:2])


def test_too_big_is_the_callers_error_and_merged_calls_split_again(served: Any) -> None:
    """This replica sends at most 1 MiB. A response past that is a CapacityError for the
    caller, the replica is not marked down, and a merged lookup that outgrows it is asked
    again one caller at a time."""
    replica, _, _ = served
    client = ServingClient([replica.address], ServingClientConfig(coalesce_max_ids=1 << 20))
    try:
        # "i8" has dim 16: 64 B a float32 row; 12,000 ids ~ 770 KB, two of them ~1.5 MB.
        a = {"i8": np.arange(12_000, dtype=np.int64)}
        b = {"i8": np.arange(50_000, 62_000, dtype=np.int64), "f32": np.arange(5)}
        want_a, want_b = client.lookup(a), client.lookup(b)
        out = client._lookup_many([a, b])
        np.testing.assert_array_equal(out[0]["i8"], want_a["i8"])
        np.testing.assert_array_equal(out[1]["i8"], want_b["i8"])
        np.testing.assert_array_equal(out[1]["f32"], want_b["f32"])
        with pytest.raises(E.CapacityError, match="larger than max"):
            client.lookup({"i8": np.arange(20_000, dtype=np.int64)})
        st = client.stats()[0]
        assert st["failures"] == 0 and not st["down"], st
        np.testing.assert_array_equal(client.lookup(a)["i8"], want_a["i8"])
    finally:
        client.close()


def test_health_and_prometheus_metrics(served: Any) -> None:
    replica, tables, _ = served
    replica.client().lookup({"f32": tables["f32"][0][:10]})
    replica.client().lookup({"f32": tables["f32"][0][:10]})  # now cache hits
    health = health_pb2_grpc.HealthStub(replica.channel())
    for service in ("", "recps.ps.v1.ParameterServer", "recps.serving.v1.ServingAdmin"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    port = replica.ready["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "recps_serving_model_version 1.0" in text
    assert 'recps_rpc_latency_seconds_bucket{code="OK",le="0.01",rpc="Lookup"}' in text
    hit = next(
        line
        for line in text.splitlines()
        if line.startswith('recps_serving_cache_hit_rate{table="f32"}')
    )
    assert float(hit.split()[-1]) > 0
    assert 'recps_serving_cache_lookups_total{result="hit",table="f32"}' in text


# ---- shards, auth --------------------------------------------------------------------------


def test_a_partial_replica_refuses_other_shards_ids_and_checks_tokens(
    tmp_path: Path, spawn: Any, ids: dict[str, np.ndarray]
) -> None:
    root = tmp_path / "model"
    tables = _tables(ids, 1)
    make_version(root, 1, tables)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    replica = spawn(root, "r0", "--shards", "0", "--auth-token-file", str(token))
    smap = ShardMap.even([""] * 2, num_slots=NUM_SLOTS)
    f32_ids, f32_rows = tables["f32"][0], tables["f32"][1]
    owner = smap.owners("f32", f32_ids)
    mine, theirs = np.flatnonzero(owner == 0)[:20], np.flatnonzero(owner == 1)[:20]

    md = (("authorization", "Bearer s3cret"),)
    req = ps_pb2.LookupRequest(
        tables=[ps_pb2.TableIds(table="f32", ids=f32_ids[theirs].astype("<i8").tobytes())]
    )
    with pytest.raises(grpc.RpcError) as err:
        replica.stub().Lookup(req, timeout=10, metadata=md)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (
        "serving shard(s) [1]" in err.value.details()
        and "holds shard(s) [0]" in err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:  # no token
        replica.stub().Lookup(req, timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(replica.channel())  # probes need no token
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1

    client = replica.client(auth_token="s3cret")
    got = client.lookup({"f32": f32_ids[mine]})["f32"]
    np.testing.assert_array_equal(got, f32_rows[mine])
    m = client.shard_map
    assert m.shards == {0: replica.address, 1: ""}
    np.testing.assert_array_equal(m.slot_owner, smap.slot_owner)


def _ps_security_module() -> Any:
    """tests/integration/test_ps_security.py, for its certificate maker (one CA, a server
    certificate for 127.0.0.1, a client certificate)."""
    import importlib.util

    name = "recps_test_ps_security"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("test_ps_security.py")
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_mutual_tls_like_the_ps(tmp_path: Path, spawn: Any, ids: dict[str, np.ndarray]) -> None:
    import shutil

    from recps.ps.config import TlsConfig

    sec = _ps_security_module()
    try:
        import cryptography  # noqa: F401

        certs = sec._make_with_cryptography(tmp_path)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("TLS tests need the `cryptography` package or the `openssl` CLI")
        certs = sec._make_with_openssl(tmp_path)
    root = tmp_path / "model"
    tables = _swap_tables(ids, 1)
    make_version(root, 1, tables)
    replica = spawn(
        root,
        "r",
        *("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)),
        *("--tls-client-ca", str(certs.ca)),
    )
    tls = TlsConfig(
        ca_file=str(certs.ca), cert_file=str(certs.client_cert), key_file=str(certs.client_key)
    )
    client = replica.client(tls=tls)
    got = client.lookup({"a": ids["f32"][:5]})["a"]
    np.testing.assert_array_equal(got, tables["a"][1][:5])
    with ServingAdminClient(replica.address, tls=tls, timeout_s=30) as admin:
        assert admin.status()["current"]["version"] == 1
    with pytest.raises(E.ShardUnavailableError):  # plaintext is not spoken
        replica.client(timeout_s=2.0).lookup({"a": ids["f32"][:5]})
    no_cert = TlsConfig(ca_file=str(certs.ca))
    with pytest.raises(E.RecpsError):  # no client certificate: the handshake fails
        replica.client(tls=no_cert, timeout_s=2.0).lookup({"a": ids["f32"][:5]})


# ---- hot swap, rollback, restart ---------------------------------------------------------------


def _version_of(got: dict[str, np.ndarray], want: dict[int, dict[str, np.ndarray]]) -> int:
    """Which version every table of one answer came from; a mix is an error."""
    per_table = {t: [v for v, rows in want.items() if np.array_equal(got[t], rows[t])] for t in got}
    hits = set.intersection(*(set(v) for v in per_table.values()))
    assert len(hits) == 1, f"no single version answered: per table {per_table}"
    return hits.pop()


def test_hot_swap_under_load_then_rollback(
    tmp_path: Path, spawn: Any, ids: dict[str, np.ndarray]
) -> None:
    root = tmp_path / "model"
    # PSClient sends one RPC per replica address, and one RPC is answered by one version,
    # so every answer must be wholly v1 or wholly v2 (across both tables), with one
    # serving shard here and two in the watch test below.
    make_version(root, 1, _swap_tables(ids, 1), num_shards=1)
    replica = spawn(root, "r")
    query = {"a": ids["f32"][:300], "b": ids["f16"][:200]}
    want = {v: {t: _swap_tables(ids, v)[t][1][: len(query[t])] for t in query} for v in (1, 2)}
    stop = threading.Event()
    seen: list[list[int]] = [[] for _ in range(4)]
    failures: list[BaseException] = []

    def hammer(k: int) -> None:
        client = replica.client(max_retries=0)  # a failed request must show, not retry
        try:
            while not stop.is_set():
                seen[k].append(_version_of(client.lookup(query), want))
        except BaseException as e:  # reported below
            failures.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        make_version(root, 2, _swap_tables(ids, 2), num_shards=1)
        admin = replica.admin()
        res = admin.load_version()
        assert res["changed"] and res["current"]["version"] == 2
        assert res["previous"]["version"] == 1
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(s and s[-1] == 2 for s in seen):
            if failures:
                break
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures[0]
    for s in seen:
        assert s[0] == 1 and s[-1] == 2, s[:3] + s[-3:]
        switch = s.index(2)
        assert set(s[switch:]) == {2}, "an answer from v1 after one from v2"

    res = admin.rollback()
    assert res["current"]["version"] == 1 and res["previous"]["version"] == 2
    assert _version_of(replica.client().lookup(query), want) == 1
    status = admin.status()
    assert status["pinned_version"] == 1 and status["latest_available"] == 2
    assert status["address"] == replica.address and status["shards"] == [0]
    admin.close()


def test_lookups_pinned_to_a_version_are_answered_from_it_or_refused(
    tmp_path: Path, spawn: Any, ids: dict[str, np.ndarray]
) -> None:
    """A lookup pinned to a model version (a ranking service's tower's) is answered from
    that version while the replica serves it or keeps it for rollback, and refused with
    VersionNotHeldError otherwise; the replica is not marked down for it."""
    from recps.serving.client import ServingClient
    from recps.serving.errors import VersionNotHeldError

    root = tmp_path / "model"
    for v in (1, 2):
        make_version(root, v, _swap_tables(ids, v))
    replica = spawn(root, "r", "--version", "1")
    query = {"a": ids["f32"][:40], "b": ids["f16"][:30]}
    want = {v: {t: _swap_tables(ids, v)[t][1][: len(query[t])] for t in query} for v in (1, 2, 3)}
    client = ServingClient([replica.address])
    assert _version_of(client.lookup(query, version=1), want) == 1
    with pytest.raises(VersionNotHeldError, match=r"version 2 is not held here \(held: \[1\]\)"):
        client.lookup(query, version=2)  # not loaded yet
    with replica.admin() as admin:
        assert admin.load_version(2)["current"]["version"] == 2
        for v in (1, 2):  # v1 is kept for rollback: both answer, each its own rows
            assert _version_of(client.lookup(query, version=v), want) == v
            assert _version_of(client.lookup(query, version=v, coalesce=False), want) == v
        assert _version_of(client.lookup(query), want) == 2  # unpinned: the served one
        make_version(root, 3, _swap_tables(ids, 3))
        assert admin.load_version(3)["previous"]["version"] == 2
    with pytest.raises(VersionNotHeldError, match=r"held: \[2, 3\]"):
        client.lookup(query, version=1)  # two versions on: retired
    assert _version_of(client.lookup(query, version=2), want) == 2
    assert client.stats()[0]["failures"] == 0  # never blamed on the replica
    client.close()


def test_restart_serves_the_pinned_version_then_the_latest(
    tmp_path: Path, spawn: Any, ids: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    from recps.cli import serve_cmds

    root = tmp_path / "model"
    make_version(root, 1, _swap_tables(ids, 1))
    query = {"a": ids["f32"][:50]}
    want = {v: {"a": _swap_tables(ids, v)["a"][1][:50]} for v in (1, 2, 3)}
    replica = spawn(root, "r")
    assert replica.ready["version"] == 1
    with replica.admin() as admin:
        with pytest.raises(NoPreviousVersionError, match="nothing to roll back to"):
            admin.rollback()
        make_version(root, 2, _swap_tables(ids, 2))
        assert admin.load_version()["current"]["version"] == 2
        with pytest.raises(mf.ModelNotFoundError):
            admin.load_version(8)
        admin.rollback()  # pins v1
    rc, stopped = replica.stop()
    assert rc == 0 and stopped == {"event": "stopped", "port": replica.port}
    make_version(root, 3, _swap_tables(ids, 3))

    replica.start()  # pinned v1 wins over the newer v3; v1's DBs are reused, not re-ingested
    assert replica.ready["version"] == 1 and replica.ready["port"] == replica.port
    assert _version_of(replica.client().lookup(query), want) == 1
    assert len(list((tmp_path / "r" / "versions").iterdir())) == 2  # v1 and v2 (rollback)
    with replica.admin() as admin:
        assert admin.status()["previous"]["version"] == 2  # rollback survived the restart
    args = ["load", "--address", replica.address, "--json"]
    parser = _cli_parser()
    assert serve_cmds.cmd_admin(parser.parse_args(["serve-admin", *args])) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["current"]["version"] == 3 and answer["changed"]
    replica.stop()

    ingested = sorted(p.name for p in (tmp_path / "r" / "versions").iterdir())
    replica.start()  # unpinned: the newest
    assert replica.ready["version"] == 3
    assert _version_of(replica.client().lookup(query), want) == 3
    with replica.admin() as admin:
        assert admin.status()["previous"]["version"] == 1  # what v3 replaced, kept
    assert sorted(p.name for p in (tmp_path / "r" / "versions").iterdir()) == ingested


def test_watch_mode_starts_empty_and_follows_new_versions(
    tmp_path: Path, spawn: Any, ids: dict[str, np.ndarray]
) -> None:
    root = tmp_path / "model"
    root.mkdir()
    replica = spawn(root, "r", "--watch-interval-s", "0.1")
    assert replica.ready["version"] is None
    health = health_pb2_grpc.HealthStub(replica.channel())
    check = health_pb2.HealthCheckRequest()
    assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
    e = _lookup_error(replica, ("a", b""))
    assert e.code() is grpc.StatusCode.UNAVAILABLE and "no model version" in e.details()

    query = {"a": ids["f32"][:40], "b": ids["f16"][:30]}
    want = {v: {t: _swap_tables(ids, v)[t][1][: len(query[t])] for t in query} for v in (1, 2)}
    client: PSClient | None = None
    for v in (1, 2):
        make_version(root, v, _swap_tables(ids, v))
        deadline = time.monotonic() + 20
        while True:
            try:
                # Built once a version is served: PSClient asks for the map at once.
                client = client or replica.client(max_retries=0)
                if _version_of(client.lookup(query), want) == v:
                    break
            except E.ShardUnavailableError:
                pass
            assert time.monotonic() < deadline, f"version {v} was not picked up"
            time.sleep(0.05)
    assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    (root / ".tmp-9-1").mkdir()  # an export in progress is ignored
    (root / f"{9:012d}").mkdir()  # so is a version without COMPLETE
    time.sleep(0.3)
    assert client is not None and _version_of(client.lookup(query), want) == 2


def test_main_without_a_model_exits_2_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    argv = ["--model", str(tmp_path / "empty"), "--data-dir", str(tmp_path / "d")]
    out = subprocess.run(
        [sys.executable, "-m", "recps.serving.main", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert json.loads(out.stdout.strip().splitlines()[-1])["error"] == "ModelNotFoundError"
    assert "recps export" in out.stderr


# ---- in-process: failed loads change nothing ---------------------------------------------------


def test_a_corrupt_version_fails_to_load_and_v1_keeps_serving(
    tmp_path: Path, ids: dict[str, np.ndarray]
) -> None:
    root = tmp_path / "model"
    make_version(root, 1, _swap_tables(ids, 1))
    replica = ServingReplica(ReplicaConfig(model=str(root), data_dir=str(tmp_path / "d")))
    try:
        with pytest.raises(NoPreviousVersionError):
            replica.rollback()
        v2 = make_version(root, 2, _swap_tables(ids, 2))
        sst = next((v2 / "tables" / "a").iterdir())
        raw = bytearray(sst.read_bytes())
        raw[100] ^= 0xFF
        sst.write_bytes(bytes(raw))
        with pytest.raises(mf.ChecksumMismatchError, match="sha256"):
            replica.load_version(2)
        with pytest.raises(mf.ModelNotFoundError):
            replica.load_version(7)
        assert replica.current_version == 1 and replica.previous_version is None
        got = replica.lookup({"a": ids["f32"][:5]})["a"]
        np.testing.assert_array_equal(got, _swap_tables(ids, 1)["a"][1][:5])
        assert len(list((tmp_path / "d" / "versions").iterdir())) == 1  # the failed one is gone
        assert replica.poll_once() is False  # the watcher's step does not retry it at once
    finally:
        replica.close()


def test_a_retired_version_stays_open_until_its_last_request_ends(
    tmp_path: Path, ids: dict[str, np.ndarray]
) -> None:
    root = tmp_path / "model"
    for v in (1, 2, 3):
        make_version(root, v, _swap_tables(ids, v))
    cfg = ReplicaConfig(model=str(root), data_dir=str(tmp_path / "d"), version=1, cache_rows=0)
    replica = ServingReplica(cfg)
    query = ids["f32"][:20]
    try:
        with replica.use() as v1:  # a request that started on v1
            replica.load_version(2)
            replica.load_version(3)  # v1 is now neither current nor previous: retired
            assert v1.retired and v1.dir.exists()
            got = v1.table("a").lookup(query)  # still answers, from v1
            np.testing.assert_array_equal(got, _swap_tables(ids, 1)["a"][1][:20])
        deadline = time.monotonic() + 10
        while v1.dir.exists():  # closed and removed once released
            assert time.monotonic() < deadline, "retired version never cleaned up"
            time.sleep(0.02)
        assert (replica.current_version, replica.previous_version) == (3, 2)
        assert replica.pinned_version == 3
        assert replica.poll_once() is False  # pinned: the watcher's step leaves it alone
    finally:
        replica.close()


def test_in_process_bad_input_is_typed_and_defaults_are_cached(
    tmp_path: Path, ids: dict[str, np.ndarray]
) -> None:
    root = tmp_path / "model"
    make_version(root, 1, _tables(ids, 1))
    cfg = ReplicaConfig(model=str(root), data_dir=str(tmp_path / "d"), max_ids_per_request=100)
    replica = ServingReplica(cfg)
    try:
        with pytest.raises(E.CapacityError, match="max_ids_per_request=100"):
            replica.lookup({"f32": np.arange(60), "i8": np.arange(41)})
        with pytest.raises(E.DtypeError):
            replica.lookup({"f32": np.array([1.5])})
        with pytest.raises(E.UnknownTableError):
            replica.lookup({"nope": np.array([1])})
        missing = np.arange(-40, 0, dtype=np.int64)  # no row in any table
        first = replica.lookup({"f16": missing, "f32": missing}, dtype="float16")
        again = replica.lookup({"f16": missing, "f32": missing})
        assert first["f16"].dtype == np.float16 and again["f16"].dtype == np.float32
        want = RowInitializer("f16", 8, InitializerConfig(**INIT))(missing)
        np.testing.assert_array_equal(again["f16"], want)
        np.testing.assert_array_equal(first["f16"], want.astype(np.float16))
        stats = {t.table: t.cache for t in replica.status().current.tables}
        assert (stats["f16"].hits, stats["f16"].misses) == (40, 40)  # defaults cached too
        assert stats["f16"].rows == stats["f32"].rows == 40
        assert stats["f16"].capacity == 2 * 100_000  # f16 and f32 (dim 8) share one cache
    finally:
        replica.close()


def test_a_key_collision_across_tables_never_serves_a_wrong_row(
    tmp_path: Path, ids: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from recps.serving.cache import RowCache

    root = tmp_path / "model"
    both = np.sort(ids["f32"][:100])
    tables = {  # the same ids in two tables of one dim (one shared cache)
        "a": (both, _rows(both, 4, 1), "float32", ZEROS),
        "b": (both, _rows(both, 4, 1) + 100, "float16", ZEROS),
    }
    make_version(root, 1, tables)
    # Keys that ignore the table: (a, id) and (b, id) always collide.
    for name in ("keys", "_keys"):  # what the replica calls, and what admit calls
        monkeypatch.setattr(RowCache, name, lambda self, ids, table=None: ids)
    replica = ServingReplica(ReplicaConfig(model=str(root), data_dir=str(tmp_path / "d")))
    assert (np.diff(both) > 0).all()
    want_b = tables["b"][1].astype(np.float16).astype(np.float32)
    try:
        for i in range(3):  # cold, then from the cache
            got = replica.lookup({"a": both, "b": both})  # sorted: taken as unique pairs
            np.testing.assert_array_equal(got["a"], tables["a"][1])
            np.testing.assert_array_equal(got["b"], want_b)
            if i == 0:  # one entry per key: the colliding pair was not admitted twice
                caches = {t.table: t.cache for t in replica.status().current.tables}
                assert caches["a"].rows + caches["b"].rows == len(both), caches
            got = replica.lookup({"a": both[::-1], "b": both})  # deduplicated by key
            np.testing.assert_array_equal(got["a"], tables["a"][1][::-1])
            np.testing.assert_array_equal(got["b"], want_b)
    finally:
        replica.close()


def test_in_process_partial_replica_names_the_shards(
    tmp_path: Path, ids: dict[str, np.ndarray]
) -> None:
    root = tmp_path / "model"
    make_version(root, 1, _swap_tables(ids, 1), num_shards=4)
    cfg = ReplicaConfig(
        model=str(mf.version_dir(root, 1)), data_dir=str(tmp_path / "d"), shards=(1, 3)
    )
    replica = ServingReplica(cfg)
    try:
        assert replica.pinned_version == 1  # a version dir pins it
        owner = ShardMap.even([""] * 4, num_slots=NUM_SLOTS).owners("a", ids["f32"])
        with pytest.raises(ShardNotHeldError) as err:
            replica.lookup({"a": ids["f32"][np.isin(owner, [0, 1, 2])][:30]})
        assert err.value.shards == [0, 2] and err.value.held == [1, 3]
        ok = np.isin(owner, [1, 3])
        got = replica.lookup({"a": ids["f32"][ok]})["a"]
        np.testing.assert_array_equal(got, _swap_tables(ids, 1)["a"][1][ok])
        (t,) = [t for t in replica.status().current.tables if t.table == "a"]
        assert t.rows == int(ok.sum())
    finally:
        replica.close()


# ---- CLI -------------------------------------------------------------------------------------


def _cli_parser() -> Any:
    import argparse

    from recps.cli import serve_cmds

    parser = argparse.ArgumentParser(prog="recps")
    serve_cmds.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("serve", "serve-admin"):
        with pytest.raises(SystemExit):
            _cli_parser().parse_args([cmd, "--help"])
        out = capsys.readouterr().out
        assert "Example:" in out and f"recps {cmd} " in out
