"""Three real shard processes (RocksDB underneath) against one ``MemoryStore`` per table.

Every check compares with an independent oracle: the reference store fed the same
sequence, slot ownership recomputed from the even-split formula, or a checkpoint reopened
by a fresh ``TieredStore``. Weights are compared bit for bit: the client sums duplicate
ids with the same ``unique_sum`` the reference uses, and every optimizer is elementwise
per row, so splitting a batch across shards must not change a single bit.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ps_harness import Cluster, Reference, ShardGroup, assert_rows_equal

from recps.embedding import (
    InitializerConfig,
    OptimizerConfig,
    TableConfig,
    TieredStore,
    TieredStoreConfig,
)
from recps.embedding import errors as E
from recps.embedding.base import unique_sum
from recps.proto import ps_pb2
from recps.ps import wire
from recps.ps.client import PSClient
from recps.ps.errors import EPOCH_KEY, ERROR_TYPE_KEY
from recps.ps.routing import DEFAULT_NUM_SLOTS, ShardMap, slot_of

I64 = np.iinfo(np.int64)
EXTREME_IDS = np.array(
    [I64.min, I64.min + 1, -(2**62), -1, 0, 1, 2**31, 2**53 + 1, 2**62, I64.max - 1, I64.max],
    dtype=np.int64,
)
SHARD_ARGS = ("--memory-mb", "16", "--metrics-port", "0")

EQ_TABLES = [
    TableConfig(
        "eq_adagrad",
        dim=8,
        optimizer=OptimizerConfig("adagrad", lr=0.05, initial_accumulator=0.1),
    ),
    TableConfig(
        "eq_adam",
        dim=5,
        initializer=InitializerConfig("normal", scale=0.1, seed=7),
        optimizer=OptimizerConfig("adam", lr=0.01, weight_decay=0.01),
    ),
    TableConfig(
        "eq_sgd",
        dim=3,
        initializer=InitializerConfig("zeros"),
        optimizer=OptimizerConfig("sgd", lr=0.5),
    ),
    TableConfig(
        "eq_ftrl",
        dim=4,
        optimizer=OptimizerConfig("ftrl", lr=0.1, l1=0.001, l2=0.01, ftrl_beta=0.5),
    ),
]


@pytest.fixture(scope="module")
def cluster(ps_module_group: ShardGroup) -> Cluster:
    """Three shards shared by the tests that neither kill nor re-map them."""
    return ps_module_group.start(3, *SHARD_ARGS)


def id_pool(rng: np.random.Generator, n: int) -> np.ndarray:
    rand = rng.integers(I64.min, I64.max, size=n, dtype=np.int64, endpoint=True)
    return np.unique(np.concatenate([EXTREME_IDS, np.arange(-40, 40), rand]))


def grads_for(rng: np.random.Generator, ids: np.ndarray, dim: int) -> np.ndarray:
    return rng.normal(size=(len(ids), dim)).astype(np.float32)


def even_owner(slot: np.ndarray, n_shards: int) -> np.ndarray:
    """Owner of each slot under ShardMap.even, recomputed from its definition."""
    return slot * n_shards // DEFAULT_NUM_SLOTS


def owner_of(table: str, ids: np.ndarray, shard_map: ShardMap) -> np.ndarray:
    return shard_map.slot_owner[slot_of(table, ids, shard_map.num_slots)].astype(np.int64)


def stored_rows(client: PSClient, table: str) -> int:
    """Rows of ``table`` across shards (everything fits in the hot tier in these tests)."""
    total = 0
    for resp in client.stats().values():
        (ts,) = [t for t in resp.tables if t.table == table]
        total += ts.rows_in_memory
    return total


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    kw.setdefault("timeout", 30)  # a hang fails the test instead of stalling it
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, **kw)
    return ei.value


def trailing(e: grpc.RpcError) -> dict[str, str]:
    return dict(e.trailing_metadata() or ())


# ---- equivalence with the reference -------------------------------------------------------


def test_sharded_equals_memory_store(cluster: Cluster) -> None:
    rng = np.random.default_rng(1)
    ref = Reference(EQ_TABLES)
    with cluster.client() as client:
        for cfg in EQ_TABLES:
            client.create_table(cfg)
        # The specs survive the wire and every shard holds the same ones.
        # (Other tests of this module add their own tables to the shared cluster.)
        want_specs = sorted(EQ_TABLES, key=lambda c: c.name)
        assert [c for c in client.list_tables() if c.name.startswith("eq_")] == want_specs
        for i in range(3):
            resp = cluster.stub(i).ListTables(ps_pb2.ListTablesRequest(), timeout=30)
            specs = [wire.config_from_spec(s) for s in resp.tables]
            assert [c for c in specs if c.name.startswith("eq_")] == want_specs, i
        pools = {c.name: id_pool(rng, 300) for c in EQ_TABLES}
        dims = {c.name: c.dim for c in EQ_TABLES}
        for step in range(10):
            names = [c.name for c in EQ_TABLES if rng.random() < 0.8] or ["eq_sgd"]
            # Lookups: duplicates within the batch, sometimes an empty batch for a table.
            batch = {t: rng.choice(pools[t], size=int(rng.integers(0, 150))) for t in names}
            create = step % 3 != 0
            got = client.lookup(batch, create_missing=create)
            assert_rows_equal(got, ref.lookup(batch, create), f"lookup {step}")
            # Pushes: several tables in one call, duplicate ids (summed), ids never looked up.
            push = {}
            for t in names:
                ids = rng.choice(pools[t], size=int(rng.integers(1, 120)))
                ids[: min(5, len(ids))] = ids[0]  # a hot id, repeated
                push[t] = (ids, grads_for(rng, ids, dims[t]))
            assert client.push(push) == ref.push(push)
        # Every id of every pool, without creating anything.
        everything = {t: p for t, p in pools.items()}
        assert_rows_equal(
            client.lookup(everything, create_missing=False),
            ref.lookup(everything, create_missing=False),
            "final rows",
        )
        half = client.lookup(everything, create_missing=False, dtype="float16")
        for t, ids in everything.items():
            want = ref.stores[t].lookup(ids, create_missing=False).astype(np.float16)
            np.testing.assert_array_equal(half[t], want.astype(np.float32), err_msg=t)
        # create_missing=False stored nothing, create_missing=True and pushes stored rows.
        for cfg in EQ_TABLES:
            assert stored_rows(client, cfg.name) == ref.stores[cfg.name].stats().rows, cfg.name


def test_concurrent_clients_disjoint_ids(cluster: Cluster) -> None:
    """Four clients push at once; each owns the ids congruent to its index mod 4, so every
    row sees one client's updates in that client's order and the result is exact."""
    tables = [
        TableConfig("mc_adam", dim=6, optimizer=OptimizerConfig("adam", lr=0.02)),
        TableConfig("mc_adagrad", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1)),
    ]
    n_clients, rounds = 4, 12
    with cluster.client() as admin:
        for cfg in tables:
            admin.create_table(cfg)
    logs: list[list[tuple[dict, dict, dict]]] = [[] for _ in range(n_clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(n_clients)

    def worker(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        base = np.concatenate([np.arange(-400, 400), EXTREME_IDS])
        mine = base[base % n_clients == k]
        try:
            with cluster.client() as client:
                start.wait(timeout=30)
                for _ in range(rounds):
                    batch = {c.name: rng.choice(mine, size=60) for c in tables}
                    rows = client.lookup(batch)
                    push = {}
                    for c in tables:
                        ids = rng.choice(mine, size=80)
                        push[c.name] = (ids, grads_for(rng, ids, c.dim))
                    client.push(push)
                    logs[k].append((batch, rows, push))
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    ref = Reference(tables)
    for k in range(n_clients):
        for i, (batch, rows, push) in enumerate(logs[k]):
            assert_rows_equal(rows, ref.lookup(batch), f"client {k} round {i}")
            ref.push(push)
    all_ids = {c.name: np.concatenate([np.arange(-400, 400), EXTREME_IDS]) for c in tables}
    with cluster.client() as client:
        got = client.lookup(all_ids, create_missing=False)
        for c in tables:
            assert stored_rows(client, c.name) == ref.stores[c.name].stats().rows
    assert_rows_equal(got, ref.lookup(all_ids, create_missing=False), "final rows")


def test_push_applied_once_per_client_seq(cluster: Cluster) -> None:
    cfg = TableConfig("idem", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.3))
    ref = Reference([cfg])
    rng = np.random.default_rng(3)
    m = cluster.shard_map
    with cluster.client() as client:
        client.create_table(cfg)
        ids = np.arange(-300, 300, dtype=np.int64)
        ids = ids[owner_of("idem", ids, m) == 0][:50]
        g = grads_for(rng, ids, 4)
        stub = cluster.stub(0)

        def request(seq: int, grads: np.ndarray) -> ps_pb2.PushRequest:
            return ps_pb2.PushRequest(
                client_id="idem-client",
                seq=seq,
                shard_map_epoch=m.epoch,
                tables=[ps_pb2.TableGrads(table="idem", ids=ids.tobytes(), grads=grads.tobytes())],
            )

        first = stub.Push(request(1, g), timeout=30)
        assert (first.applied_rows, first.duplicate) == (len(ids), False)
        again = stub.Push(request(1, g), timeout=30)
        assert (again.applied_rows, again.duplicate) == (0, True)
        # The seq decides, not the payload: a different body under a used seq is dropped.
        other = stub.Push(request(1, 2 * g), timeout=30)
        assert other.duplicate
        ref.push({"idem": (ids, g)})
        assert_rows_equal(client.lookup({"idem": ids}), ref.lookup({"idem": ids}), "after seq 1")
        # Eight copies of a new seq at once: exactly one applies, the rest wait and say so.
        g2 = grads_for(rng, ids, 4)
        futures = [stub.Push.future(request(2, g2), timeout=30) for _ in range(8)]
        results = [f.result() for f in futures]
        assert sorted(r.duplicate for r in results) == [False] + [True] * 7
        ref.push({"idem": (ids, g2)})
        assert_rows_equal(client.lookup({"idem": ids}), ref.lookup({"idem": ids}), "after seq 2")


# ---- crashes and restarts -------------------------------------------------------------------


def _run_pusher(client: PSClient, table: str, dim: int, pool: np.ndarray, stop: threading.Event):
    """Push deterministic batches until ``stop`` or the first error; records what returned."""
    state: dict = {"acked": [], "spans": [], "error": None}

    def loop() -> None:
        i = 0
        while not stop.is_set():
            rng = np.random.default_rng(1000 + i)
            ids = rng.choice(pool, size=64)
            g = grads_for(rng, ids, dim)
            t0 = time.monotonic()
            try:
                client.push({table: (ids, g)})
            except BaseException as e:
                state["error"] = e
                return
            state["spans"].append((t0, time.monotonic()))
            state["acked"].append((ids, g))
            i += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread, state


def _wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_kill9_sync_shard_recovers_every_acked_push(ps_group: ShardGroup) -> None:
    cluster = ps_group.start(3, "--durability", "sync", "--memory-mb", "16")
    cfg = TableConfig("crash", dim=8, optimizer=OptimizerConfig("adagrad", lr=0.1))
    pool = np.arange(-2000, 2000, dtype=np.int64)
    config = cluster.client_config(
        timeout_s=10.0, max_retries=200, backoff_initial_s=0.02, backoff_max_s=0.2
    )
    victim = cluster.shards[1]
    with PSClient(cluster.addresses, config) as client:
        client.create_table(cfg)
        stop = threading.Event()
        thread, state = _run_pusher(client, "crash", cfg.dim, pool, stop)
        _wait_for(lambda: len(state["acked"]) >= 10 or state["error"], 60, "10 pushes")
        killed_at = time.monotonic()
        assert victim.kill(signal.SIGKILL) == -signal.SIGKILL
        acked_before_kill = len(state["acked"])
        time.sleep(0.3)  # the client keeps retrying against a dead shard meanwhile
        victim.restart()
        back_at = time.monotonic()
        _wait_for(
            lambda: len(state["acked"]) >= acked_before_kill + 10 or state["error"],
            60,
            "10 pushes after the restart",
        )
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert state["error"] is None, f"a push failed despite retries: {state['error']!r}"
        # Some push was in flight across the whole outage and still returned.
        assert any(t0 <= killed_at + 0.3 and t1 >= back_at for t0, t1 in state["spans"])
        acked = state["acked"]
        ref = Reference([cfg])
        for ids, g in acked:
            ref.push({"crash": (ids, g)})
        got = client.lookup({"crash": pool}, create_missing=False)
        want = ref.lookup({"crash": pool}, create_missing=False)
        if not np.array_equal(got["crash"], want["crash"]):
            _explain_double_apply(acked, acked_before_kill, cfg, cluster, got, pool)
        assert_rows_equal(got, want, "rows after kill -9 and restart")
        assert stored_rows(client, "crash") == ref.stores["crash"].stats().rows


def _explain_double_apply(acked, in_flight, cfg, cluster, got, pool) -> None:
    """Fail with a precise diagnosis when the rows match "in-flight push applied twice"."""
    ref2 = Reference([cfg])
    for i, (ids, g) in enumerate(acked):
        ref2.push({cfg.name: (ids, g)})
        if i == in_flight:
            u, s = unique_sum(ids, g)
            mine = owner_of(cfg.name, u, cluster.shard_map) == 1
            ref2.push({cfg.name: (u[mine], s[mine])})
    want2 = ref2.lookup({cfg.name: pool}, create_missing=False)
    if np.array_equal(got[cfg.name], want2[cfg.name]):
        # Everything else was exact. Sync shards log dedup marks (dedup.log) before they
        # answer, so this would be a regression of test_push_dedup_across_kill9.
        pytest.fail(
            "the push in flight at kill -9 was applied twice on the killed shard: it was "
            "durable before the crash but its (client_id, seq) mark was not, so the "
            "client's retry after the restart applied it again"
        )


def test_push_dedup_across_kill9(ps_group: ShardGroup) -> None:
    """Exactly-once survives a clean restart; after kill -9 a durable push must still not be
    applied twice when the client retries it (it cannot know the first copy landed)."""
    cluster = ps_group.start(1, "--durability", "sync", "--memory-mb", "16")
    cfg = TableConfig("dd", dim=4, optimizer=OptimizerConfig("sgd", lr=1.0))
    ids = np.arange(10, dtype=np.int64)
    g = np.ones((10, 4), np.float32)
    req = ps_pb2.PushRequest(
        client_id="dd-client",
        seq=7,
        shard_map_epoch=1,
        tables=[ps_pb2.TableGrads(table="dd", ids=ids.tobytes(), grads=g.tobytes(), dim=4)],
    )
    ref = Reference([cfg])
    ref.push({"dd": (ids, g)})
    with cluster.client() as client:
        client.create_table(cfg)
        assert not cluster.stub(0).Push(req, timeout=30).duplicate
        shard = cluster.shards[0]
        assert shard.stop() == 0
        shard.restart()
        client.wait_ready()
        assert cluster.stub(0).Push(req, timeout=30).duplicate, "clean restart forgot the seq"
        req.seq = 8
        assert not cluster.stub(0).Push(req, timeout=30).duplicate
        ref.push({"dd": (ids, g)})
        shard.kill(signal.SIGKILL)  # seq 8 is in the WAL (sync), its dedup entry is not
        shard.restart()
        client.wait_ready()
        retry = cluster.stub(0).Push(req, timeout=30)
        got = client.lookup({"dd": ids}, create_missing=False)
        assert_rows_equal(got, ref.lookup({"dd": ids}, create_missing=False), "rows")
        assert retry.duplicate


def test_graceful_shutdown_finishes_inflight_and_flushes(ps_group: ShardGroup) -> None:
    # async durability with a timer that never fires: only the shutdown flush persists rows.
    cluster = ps_group.start(
        2, "--flush-interval-ms", "3600000", "--memory-mb", "64", "--metrics-port", "0"
    )
    cfg = TableConfig("gs", dim=16, optimizer=OptimizerConfig("adam", lr=0.01))
    ref = Reference([cfg])
    rng = np.random.default_rng(5)
    pool = id_pool(rng, 2000)
    m = cluster.shard_map
    target = cluster.shards[0]
    with cluster.client() as client:
        client.create_table(cfg)
        looked = {"gs": rng.choice(pool, size=500)}
        assert_rows_equal(client.lookup(looked), ref.lookup(looked), "lookup")
        for _ in range(10):
            ids = rng.choice(pool, size=200)
            push = {"gs": (ids, grads_for(rng, ids, 16))}
            client.push(push)
            ref.push(push)
        raw_ids = pool[owner_of("gs", pool, m) == 0][:20]
        raw = ps_pb2.PushRequest(
            client_id="gs-raw",
            seq=1,
            shard_map_epoch=m.epoch,
            tables=[
                ps_pb2.TableGrads(
                    table="gs", ids=raw_ids.tobytes(), grads=np.ones((20, 16), "<f4").tobytes()
                )
            ],
        )
        assert not cluster.stub(0).Push(raw, timeout=30).duplicate
        ref.push({"gs": (raw_ids, np.ones((20, 16), np.float32))})
        (before,) = [t for t in client.stats()[0].tables if t.table == "gs"]
        assert before.rows_on_disk == 0, "rows reached disk early; the test would prove nothing"
        assert before.rows_in_memory > 0

        # Heavy lookups owned by shard 0 (about a second of work), then SIGTERM mid-way.
        big = rng.integers(I64.min, I64.max, size=2_200_000, dtype=np.int64)
        big = big[owner_of("gs", big, m) == 0][: 4 * 250_000].reshape(4, -1)
        stub = cluster.stub(0)
        stub.GetShardMap(ps_pb2.GetShardMapRequest(), timeout=30)  # connection is up
        heavy_requests = [
            ps_pb2.LookupRequest(
                shard_map_epoch=m.epoch, tables=[ps_pb2.TableIds(table="gs", ids=part.tobytes())]
            )
            for part in big
        ]

        # SIGTERM only once the shard has taken all four: a request still on the wire when
        # shutdown begins is refused (correctly), which is not what this test is about.
        def taken(m: dict[str, dict]) -> float:
            running = m.get("recps_rpc_in_progress", {}).get((("rpc", "Lookup"),), 0)
            ended = m.get("recps_rpc_latency_seconds_count", {})
            return running + ended.get((("code", "OK"), ("rpc", "Lookup")), 0)

        base = taken(_scrape(target.metrics_port))
        heavy = [stub.Lookup.future(r, timeout=60) for r in heavy_requests]
        deadline = time.monotonic() + 30
        while taken(_scrape(target.metrics_port)) < base + len(heavy):
            assert time.monotonic() < deadline, "the heavy lookups never all reached the shard"
            time.sleep(0.005)
        sigterm_at = time.monotonic()
        target.kill(signal.SIGTERM, wait=False)
        done_at = {}
        for k, f in enumerate(heavy):
            resp = f.result(timeout=60)  # in-flight requests finish, they are not cut off
            done_at[k] = time.monotonic()
            rows = np.frombuffer(resp.tables[0].rows, "<f4").reshape(-1, 16)
            probe = np.arange(0, big.shape[1], 9973)
            want = ref.stores["gs"].lookup(big[k][probe], create_missing=False)
            np.testing.assert_array_equal(rows[probe], want)
        assert max(done_at.values()) > sigterm_at, "all lookups ended before SIGTERM"
        assert target.wait_exit() == 0
        assert target.stopped_line == {"event": "stopped", "shard_id": 0}
        # The other shard kept serving.
        other = pool[owner_of("gs", pool, m) == 1][:10]
        cluster.stub(1).Lookup(
            ps_pb2.LookupRequest(tables=[ps_pb2.TableIds(table="gs", ids=other.tobytes())]),
            timeout=30,
        )
        target.restart()
        client.wait_ready()
        got = client.lookup({"gs": pool}, create_missing=False)
        assert_rows_equal(got, ref.lookup({"gs": pool}, create_missing=False), "after restart")
        assert stored_rows(client, "gs") == ref.stores["gs"].stats().rows
        # The dedup window was saved on shutdown too.
        assert cluster.stub(0).Push(raw, timeout=30).duplicate


# ---- routing ------------------------------------------------------------------------------


def test_stale_shard_map_reroutes(ps_group: ShardGroup) -> None:
    cluster = ps_group.start(3, "--memory-mb", "16")
    cfg = TableConfig("stale", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.2))
    ref = Reference([cfg])
    rng = np.random.default_rng(9)
    old = cluster.shard_map
    with cluster.client() as old_client, PSClient(old, cluster.client_config()) as map_client:
        old_client.create_table(cfg)  # empty: moving its slots moves no data
        assert old_client.shard_map == old
        # Epoch 2: the first half of each shard's slots goes to the next shard.
        owner = old.slot_owner.astype(np.int64)
        moved = np.zeros(old.num_slots, dtype=bool)
        for sid in range(3):
            mine = np.flatnonzero(owner == sid)
            moved[mine[: len(mine) // 2]] = True
        new_owner = np.where(moved, (owner + 1) % 3, owner)
        new = old.replace(slot_owner=new_owner)
        assert new.epoch == old.epoch + 1
        cluster.install_map(new)
        for i in range(3):
            assert (
                ShardMap.from_proto(cluster.stub(i).GetShardMap(ps_pb2.GetShardMapRequest())) == new
            )
        # A map that is not newer is refused.
        e = rpc_error(cluster.stub(0).UpdateShardMap, old.to_proto(), timeout=30)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION

        pool = id_pool(rng, 600)
        assert moved[slot_of("stale", pool, old.num_slots)].sum() > 100
        batch = {"stale": rng.choice(pool, size=400)}
        assert_rows_equal(old_client.lookup(batch), ref.lookup(batch), "old client lookup")
        assert old_client.shard_map == new, "the old client did not refresh its map"
        ids = rng.choice(pool, size=300)
        push = {"stale": (ids, grads_for(rng, ids, 4))}
        assert map_client.shard_map.epoch == old.epoch
        assert map_client.push(push) == ref.push(push)
        assert map_client.shard_map == new

        # Rows live on their new owners only.
        stored = ref.rows("stale").ids
        new_owners = owner_of("stale", stored, new)
        for sid, resp in old_client.stats().items():
            assert resp.epoch == new.epoch
            (ts,) = resp.tables
            assert ts.rows_in_memory == int((new_owners == sid).sum()), sid

        # A raw request routed with the old map is refused with the current epoch.
        slots = slot_of("stale", pool, old.num_slots)
        victim = pool[(old.slot_owner[slots] == 0) & (new.slot_owner[slots] == 1)][:5]
        assert len(victim)
        e = rpc_error(
            cluster.stub(0).Lookup,
            ps_pb2.LookupRequest(
                shard_map_epoch=old.epoch,
                tables=[ps_pb2.TableIds(table="stale", ids=victim.tobytes())],
            ),
            timeout=30,
        )
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        md = trailing(e)
        assert md[EPOCH_KEY] == str(new.epoch)
        assert md[ERROR_TYPE_KEY] == "StaleShardMapError"
        # A push routed with the old map is refused, applies nothing, and its seq stays
        # usable: the same (client_id, seq) sent to the right shard is applied.
        g = np.full((len(victim), 4), 0.5, np.float32)
        req = ps_pb2.PushRequest(
            client_id="stale-raw",
            seq=1,
            shard_map_epoch=old.epoch,
            tables=[ps_pb2.TableGrads(table="stale", ids=victim.tobytes(), grads=g.tobytes())],
        )
        e = rpc_error(cluster.stub(0).Push, req, timeout=30)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert trailing(e)[EPOCH_KEY] == str(new.epoch)
        want = ref.lookup({"stale": pool}, create_missing=False)
        assert_rows_equal(old_client.lookup({"stale": pool}, create_missing=False), want, "x")
        req.shard_map_epoch = new.epoch
        ok = cluster.stub(1).Push(req, timeout=30)
        assert (ok.duplicate, ok.applied_rows) == (False, len(victim))
        ref.push({"stale": (victim, g)})
        got = old_client.lookup({"stale": pool}, create_missing=False)
        assert_rows_equal(got, ref.lookup({"stale": pool}, create_missing=False), "final")


# ---- observability ------------------------------------------------------------------------


def test_stats_slots_and_checkpoint(ps_group: ShardGroup, tmp_path: Path) -> None:
    cluster = ps_group.start(3, "--memory-mb", "16")
    tables = [
        TableConfig("st_a", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1)),
        TableConfig("st_b", dim=2, optimizer=OptimizerConfig("ftrl", lr=0.1, l1=0.01)),
    ]
    ref = Reference(tables)
    rng = np.random.default_rng(11)
    requests = np.zeros(DEFAULT_NUM_SLOTS, dtype=np.int64)  # unique ids sent, per slot
    looked = {t.name: 0 for t in tables}
    pushed = {t.name: 0 for t in tables}

    def count(table: str, ids: np.ndarray) -> int:
        u = np.unique(ids)
        requests[:] += np.bincount(slot_of(table, u, DEFAULT_NUM_SLOTS), minlength=len(requests))
        return len(u)

    with cluster.client() as client:
        for cfg in tables:
            client.create_table(cfg)
        for step in range(4):
            batch = {"st_a": rng.choice(id_pool(rng, 300), 300), "st_b": rng.integers(0, 90, 50)}
            create = step != 1
            client.lookup(batch, create_missing=create)
            ref.lookup(batch, create)
            for t, ids in batch.items():
                looked[t] += count(t, ids)
            ids = rng.integers(-500, 500, 200)
            push = {"st_b": (ids, grads_for(rng, ids, 2))}
            client.push(push)
            ref.push(push)
            pushed["st_b"] += count("st_b", ids)

        stats = client.stats()
        assert sorted(stats) == [0, 1, 2]
        stored_slots = np.zeros(DEFAULT_NUM_SLOTS, dtype=np.int64)
        for t in tables:
            ids = ref.rows(t.name).ids
            stored_slots += np.bincount(slot_of(t.name, ids, DEFAULT_NUM_SLOTS), minlength=16384)
        totals = {t.name: [0, 0, 0] for t in tables}
        all_slots = np.arange(DEFAULT_NUM_SLOTS)
        for sid, s in stats.items():
            assert s.shard_id == sid and s.epoch == 1
            assert s.uptime_s > 0 and s.rss_bytes > 10 << 20
            owned = all_slots[even_owner(all_slots, 3) == sid]
            assert list(s.slot_ids) == owned.tolist()
            assert list(s.slot_rows) == stored_slots[owned].tolist()
            assert list(s.slot_requests) == requests[owned].tolist()
            qps = np.asarray(s.slot_qps)
            np.testing.assert_array_equal(qps > 0, requests[owned] > 0)
            # Seconds into a 60 s window, a rate is about the mean since start.
            assert qps.sum() * s.uptime_s == pytest.approx(requests[owned].sum(), rel=0.25)
            assert [t.table for t in s.tables] == ["st_a", "st_b"]
            for ts in s.tables:
                totals[ts.table][0] += ts.rows_in_memory
                totals[ts.table][1] += ts.lookups
                totals[ts.table][2] += ts.pushes
        for t in tables:
            rows = ref.stores[t.name].stats().rows
            assert totals[t.name] == [rows, looked[t.name], pushed[t.name]], t.name
        e = rpc_error(cluster.stub(0).Stats, ps_pb2.StatsRequest(tables=["nope"]), timeout=30)
        assert e.code() == grpc.StatusCode.NOT_FOUND

        ckpt = tmp_path / "ckpt"
        out = client.checkpoint(str(ckpt), tag="c1")
        assert sorted(out) == [0, 1, 2]
        for sid, resp in out.items():
            root = ckpt / "c1" / f"shard-{sid}"
            assert Path(resp.path) == root and root.is_dir()
            assert list(resp.tables) == ["st_a", "st_b"]
            manifest = json.loads((root / "manifest.json").read_text())
            assert manifest["shard_id"] == sid
            assert ShardMap.from_dict(manifest["shard_map"]) == cluster.shard_map
            assert [TableConfig.from_dict(d) for d in manifest["tables"]] == tables
            n_rows = 0
            for cfg in tables:
                # Reopen the checkpoint with a fresh store: this shard's rows, bit for bit.
                with TieredStore(
                    tmp_path / f"restore-{sid}-{cfg.name}",
                    cfg,
                    TieredStoreConfig(memory_budget_bytes=1 << 20, write_buffer_bytes=1 << 20),
                ) as store:
                    store.restore(root / "tables" / cfg.name)
                    got = [b for b in store.items()]
                want = ref.rows(cfg.name)
                mine = owner_of(cfg.name, want.ids, cluster.shard_map) == sid
                got_ids = np.concatenate([b.ids for b in got]) if got else np.empty(0, np.int64)
                np.testing.assert_array_equal(got_ids, want.ids[mine])
                if got:
                    got_w = np.concatenate([b.weights for b in got])
                    np.testing.assert_array_equal(got_w, want.weights[mine])
                    got_s = np.concatenate([b.state for b in got])
                    np.testing.assert_array_equal(got_s, want.state[mine])
                n_rows += int(mine.sum())
            assert resp.rows == n_rows
        # The same tag again is refused; a tag that is a path is refused.
        e = rpc_error(cluster.stub(0).Checkpoint, ps_pb2.CheckpointRequest(dir=str(ckpt), tag="c1"))
        assert trailing(e)[ERROR_TYPE_KEY] == "CheckpointError"
        with pytest.raises(E.CheckpointError):
            client.checkpoint(str(ckpt), tag="c1")
        e = rpc_error(
            cluster.stub(0).Checkpoint, ps_pb2.CheckpointRequest(dir=str(ckpt), tag="../x")
        )
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


def _scrape(port: int) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_prometheus_endpoint(cluster: Cluster) -> None:
    cfg = TableConfig("prom", dim=4)
    rng = np.random.default_rng(13)
    sent = 0
    written = 0
    with cluster.client() as client:
        client.create_table(cfg)
        for _ in range(3):
            ids = rng.integers(-1000, 1000, 300)
            client.lookup({"prom": ids})
            sent += len(np.unique(ids))
            client.push({"prom": (ids[:50], grads_for(rng, ids[:50], 4))})
            written += len(np.unique(ids[:50]))
    read_total = written_total = 0.0
    for shard in cluster.shards:
        info = json.loads((shard.data_dir / "server.json").read_text())
        assert info["metrics_port"] == shard.metrics_port and info["port"] == shard.port
        m = _scrape(shard.metrics_port)
        for name in (
            "recps_rpc_latency_seconds_bucket",
            "recps_rpc_latency_seconds_count",
            "recps_rows_read_total",
            "recps_hot_tier_hit_rate",
            "recps_process_rss_bytes",
            "recps_slot_rows",
            "recps_slot_qps",
        ):
            assert name in m, f"shard {shard.shard_id}: {name} missing"
        read_total += m["recps_rows_read_total"][(("table", "prom"),)]
        written_total += m["recps_rows_written_total"][(("table", "prom"),)]
        lookups_ok = m["recps_rpc_latency_seconds_count"][(("code", "OK"), ("rpc", "Lookup"))]
        assert lookups_ok >= 3
        assert 0.0 <= m["recps_hot_tier_hit_rate"][(("table", "prom"),)] <= 1.0
        assert m["recps_process_rss_bytes"][()] > 10 << 20
        slots = {int(dict(k)["slot"]) for k in m["recps_slot_rows"]}
        all_slots = np.arange(DEFAULT_NUM_SLOTS)
        assert slots == set(all_slots[even_owner(all_slots, 3) == shard.shard_id].tolist())
        assert {int(dict(k)["slot"]) for k in m["recps_slot_qps"]} == slots
        assert sum(m["recps_slot_qps"].values()) > 0
    assert read_total == sent
    assert written_total == written


def test_explicit_zero_optimizer_settings_survive_create_table(cluster: Cluster) -> None:
    """Explicit zeros are valid settings (adam beta1=0 is RMSProp-like); the shards must
    train with them, not with the defaults a zero on the wire is mistaken for."""
    cfg = TableConfig("zero_betas", dim=4, optimizer=OptimizerConfig("adam", beta1=0.0))
    ref = Reference([cfg])
    ids = np.arange(-20, 20, dtype=np.int64)
    rng = np.random.default_rng(17)
    with cluster.client() as client:
        client.create_table(cfg)
        for _ in range(3):
            g = grads_for(rng, ids, 4)  # changing gradients: beta1 matters
            client.push({cfg.name: (ids, g)})
            ref.push({cfg.name: (ids, g)})
        got = client.lookup({cfg.name: ids}, create_missing=False)
        assert_rows_equal(got, ref.lookup({cfg.name: ids}, create_missing=False), "rows")
        (spec,) = [c for c in client.list_tables() if c.name == cfg.name]
        assert spec == cfg
