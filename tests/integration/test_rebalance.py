"""Live rebalancing on real shard processes, checked against a ``MemoryStore`` oracle.

Client threads push a deterministic gradient stream through ``PSClient`` (each thread
its own ids, so per-row update order is the thread's) while the cluster goes from 2 to
3 shards and back to 2. Afterwards every row of every table, optimizer state and update
count included, equals the reference's, lives on exactly one shard, and no client call
failed. The crash test SIGKILLs the target mid-move, restarts it and re-runs apply.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ps_harness import Cluster, Reference, Shard, ShardGroup

from recps.embedding import OptimizerConfig, RowBatch, TableConfig
from recps.embedding.errors import RecpsError
from recps.proto import ps_pb2
from recps.ps.client import PSClient
from recps.ps.config import ClientConfig
from recps.ps.coordinator import Coordinator
from recps.ps.migration import MigrationConfig, Progress, apply_plan
from recps.ps.rebalance_plan import plan_rebalance
from recps.ps.routing import ShardMap, slot_of

NUM_SLOTS = 256
TABLES = [
    TableConfig("user", dim=8, optimizer=OptimizerConfig("adagrad", lr=0.05)),
    TableConfig("item", dim=4, optimizer=OptimizerConfig("adam", lr=0.01)),
]
THREADS = 3
Batch = dict[str, tuple[np.ndarray, np.ndarray]]
IDS_PER_THREAD = 3000


def _start(group: ShardGroup, durability: str) -> tuple[Cluster, list[str]]:
    args = ["--num-slots", str(NUM_SLOTS), "--memory-mb", "8", "--durability", durability]
    cluster = group.start(2, *args, install_map=False)
    cluster.install_map(ShardMap.even(cluster.addresses, NUM_SLOTS))
    return cluster, args


def _write_cluster_file(root: Path, shard_map: ShardMap) -> Path:
    path = root / "cluster.json"
    info = {"shard_map": shard_map.to_dict(), "shards": [], "data_dir": str(root)}
    path.write_text(json.dumps(info))
    return path


def _add_shard(group: ShardGroup, cluster: Cluster, sid: int, args: list[str]) -> Shard:
    base = cluster.shards[0].data_dir.parent
    shard = Shard(sid, base / f"shard-{sid}", base / f"shard-{sid}.log", args)
    group.shards.append(shard)
    shard.start()
    return shard


class _Stream:
    """THREADS pushers; thread t owns ids [t * 10**6, t * 10**6 + IDS_PER_THREAD)."""

    def __init__(self, cluster_file: Path) -> None:
        self.cluster_file = cluster_file
        self.stop = threading.Event()
        self.batches: list[list[Batch]] = [[] for _ in range(THREADS)]
        self.errors: list[BaseException] = []
        self.calls = 0
        self.max_call_s = 0.0
        cfg = ClientConfig(timeout_s=30.0, max_retries=20)
        self.clients = [PSClient(cluster_file, cfg) for _ in range(THREADS)]
        self.threads = [
            threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(THREADS)
        ]

    def _run(self, t: int) -> None:
        rng = np.random.default_rng(100 + t)
        client = self.clients[t]
        try:
            while not self.stop.is_set():
                batch = {}
                for cfg in TABLES:
                    ids = t * 10**6 + rng.integers(0, IDS_PER_THREAD, 200)
                    grads = rng.normal(size=(200, cfg.dim)).astype(np.float32)
                    batch[cfg.name] = (ids, grads)
                t0 = time.monotonic()
                client.lookup({k: v[0] for k, v in batch.items()})
                client.push(batch)
                self.max_call_s = max(self.max_call_s, time.monotonic() - t0)
                self.batches[t].append(batch)
                self.calls += 1
                time.sleep(0.002)  # leave the 2 cores some room for the move
        except BaseException as e:
            self.errors.append(e)

    def __enter__(self) -> _Stream:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(60)
        for c in self.clients:
            c.close()

    def reference(self) -> Reference:
        ref = Reference(TABLES)
        for per_thread in self.batches:
            for batch in per_thread:
                ref.lookup({k: v[0] for k, v in batch.items()})
                ref.push(batch)
        return ref


def _shard_rows(client: PSClient, addr: str, table: str, slots: list[int]) -> dict[str, Any]:
    """Every row a shard holds in ``slots`` (ReadSlotRows pages), as column arrays."""
    out: dict[str, list[np.ndarray]] = {"ids": [], "w": [], "state": [], "count": []}
    if not slots:
        return {k: np.empty(0) for k in out}
    after = None
    while True:
        req = ps_pb2.ReadSlotRowsRequest(
            table=table, slots=slots, after_id=after or 0, has_after_id=after is not None,
            max_rows=50_000,
        )  # fmt: skip
        resp = client._stub(addr).ReadSlotRows(req, timeout=60)
        r = resp.rows
        n = len(r.ids) // 8
        if n:
            out["ids"].append(np.frombuffer(r.ids, "<i8"))
            out["w"].append(np.frombuffer(r.weights, "<f4").reshape(n, -1))
            out["state"].append(np.frombuffer(r.state, "<f4").reshape(n, -1))
            out["count"].append(np.frombuffer(r.count, "<i8"))
            after = int(out["ids"][-1][-1])
        if resp.done or not n:
            break
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in out.items()}


def _cols(b: RowBatch) -> tuple[np.ndarray, ...]:
    return (b.ids, b.weights, b.state, b.updated_at, b.count)


def _check_against_reference(cluster_file: Path, ref: Reference, extra: list[str]) -> None:
    with PSClient(cluster_file) as client:
        client.refresh_shard_map()
        m = client.shard_map
        addresses = sorted({*m.shards.values(), *extra})
        for cfg in TABLES:
            batches = list(ref.stores[cfg.name].items())
            want = RowBatch(*(np.concatenate(c) for c in zip(*(_cols(b) for b in batches))))
            owned, stray = [], 0
            for addr in addresses:
                sid = next((s for s, a in m.shards.items() if a == addr), None)
                mine = m.slots_of(sid).tolist() if sid is not None else []
                others = sorted(set(range(NUM_SLOTS)) - set(mine))
                owned.append(_shard_rows(client, addr, cfg.name, mine))
                stray += len(_shard_rows(client, addr, cfg.name, others)["ids"])
            assert stray == 0, f"{cfg.name}: {stray} rows left on shards that do not own them"
            ids = np.concatenate([o["ids"] for o in owned])
            order = np.argsort(ids)
            assert len(np.unique(ids)) == len(ids), "a row lives on two shards"
            np.testing.assert_array_equal(ids[order], want.ids, err_msg=cfg.name)
            for key, ref_col in (("w", want.weights), ("state", want.state), ("count", want.count)):
                got = np.concatenate([o[key] for o in owned if len(o["ids"])])[order]
                np.testing.assert_array_equal(got, ref_col, err_msg=f"{cfg.name} {key}")


def _plan(cluster_file: Path, targets: list[int], by: str = "rows") -> Any:
    with PSClient(cluster_file) as client:
        client.refresh_shard_map()
        return plan_rebalance(client.shard_map, client.slot_stats(), targets, by=by, tolerance=0.1)


def test_grow_and_shrink_while_pushing(ps_group: ShardGroup, tmp_path: Path) -> None:
    cluster, args = _start(ps_group, "async")
    cluster_file = _write_cluster_file(tmp_path, cluster.shard_map)
    with PSClient(cluster_file) as c:
        for t in TABLES:
            c.create_table(t)
    progress: list[Progress] = []
    late = TableConfig("late", dim=3)  # created while the first move copies
    late_ids = np.arange(2000, dtype=np.int64)
    late_ref = Reference([late])

    def on_progress(p: Progress) -> None:
        progress.append(p)
        if p.rows_copied and not late_ref.stores["late"].stats().rows:
            with PSClient(cluster_file) as c:
                c.create_table(late)
                g = np.full((len(late_ids), 3), 0.5, np.float32)
                c.push({"late": (late_ids, g)})
                late_ref.push({"late": (late_ids, g)})

    cfg = MigrationConfig(slots_per_move=48, page_rows=2000)
    with _Stream(cluster_file) as stream:
        while stream.calls < 30:
            time.sleep(0.05)
        third = _add_shard(ps_group, cluster, 2, args)
        grow = _plan(cluster_file, [0, 1, 2])
        assert grow.moved_slots > 0 and grow.balanced
        report = apply_plan(
            grow, cluster_file, addresses={2: third.address}, config=cfg,
            on_progress=on_progress,
        )  # fmt: skip
        assert report["moved_slots"] == grow.moved_slots and report["moves"] > 1
        assert report["moved_rows"] > 0
        print(f"grow: {report}, longest client call {stream.max_call_s:.3f} s")
        calls_after_grow = stream.calls
        while stream.calls < calls_after_grow + 30:
            time.sleep(0.05)
        shrink = _plan(cluster_file, [0, 1])
        report = apply_plan(shrink, cluster_file, config=cfg)
        assert report["shards"] == [0, 1]
        while stream.calls < calls_after_grow + 60:
            time.sleep(0.05)
    assert stream.errors == [], stream.errors
    state = Coordinator.read(tmp_path)
    assert state.active_moves() == [] and sorted(state.shard_map.shards) == [0, 1]
    assert not (state.shard_map.slot_owner == 2).any()
    _check_against_reference(cluster_file, stream.reference(), [third.address])
    with PSClient(cluster_file) as c:
        got = c.lookup({"late": late_ids}, create_missing=False)["late"]
        c.refresh_shard_map()
        m = c.shard_map
        held = [_shard_rows(c, a, "late", m.slots_of(s).tolist()) for s, a in m.shards.items()]
        assert sum(len(h["ids"]) for h in held) == len(late_ids)  # each row once
    np.testing.assert_array_equal(got, late_ref.lookup({"late": late_ids})["late"])


def test_target_killed_mid_move_then_apply_rerun(ps_group: ShardGroup, tmp_path: Path) -> None:
    cluster, args = _start(ps_group, "sync")
    cluster_file = _write_cluster_file(tmp_path, cluster.shard_map)
    with PSClient(cluster_file) as c:
        for t in TABLES:
            c.create_table(t)
    with _Stream(cluster_file) as stream:
        while stream.calls < 30:
            time.sleep(0.05)
        third = _add_shard(ps_group, cluster, 2, args)
        plan = _plan(cluster_file, [0, 1, 2])
        killed = []

        def kill_once(p: Progress) -> None:
            if p.rows_copied > 0 and not killed:
                third.kill()  # SIGKILL, mid-copy of the first move
                killed.append(p.rows_copied)

        cfg = MigrationConfig(slots_per_move=64, page_rows=300, retries=1)
        with pytest.raises(RecpsError):
            apply_plan(plan, cluster_file, {2: third.address}, cfg, on_progress=kill_once)
        assert killed
        third.restart()
        report = apply_plan(plan, cluster_file, {2: third.address}, cfg)
        assert report["moved_slots"] > 0
        with PSClient(cluster_file) as c:
            c.refresh_shard_map()
            want = plan.target_owner(cluster.shard_map.slot_owner)
            np.testing.assert_array_equal(c.shard_map.slot_owner, want)
        calls = stream.calls
        while stream.calls < calls + 20:
            time.sleep(0.05)
    assert stream.errors == [], stream.errors
    _check_against_reference(cluster_file, stream.reference(), [])


def test_coordinator_crash_after_the_handover_then_apply_rerun(
    ps_group: ShardGroup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The apply process dies right after deciding the second of four moves that share a
    copy: the first is handed over but its source has not dropped its rows yet (that
    happens once per copy), no shard knows the second, the last two were never frozen.
    The source keeps refusing writes to the second's frozen slots, and a re-run finishes
    both, then moves the rest."""
    from recps.ps import migration

    cluster, _ = _start(ps_group, "async")
    cluster_file = _write_cluster_file(tmp_path, cluster.shard_map)
    with PSClient(cluster_file) as c:
        for t in TABLES:
            c.create_table(t)
    real_hand_over = migration._hand_over

    handed: list[str] = []

    def crash(shards: Any, coord: Any, mv: dict[str, Any]) -> float:
        if handed:
            raise RecpsError("simulated crash of the coordinator after its decision")
        handed.append(mv["id"])
        return real_hand_over(shards, coord, mv)

    with _Stream(cluster_file) as stream:
        while stream.calls < 30:
            time.sleep(0.05)
        plan = _plan(cluster_file, [1])  # drain shard 0 into shard 1
        monkeypatch.setattr(migration, "_hand_over", crash)
        with pytest.raises(RecpsError, match="simulated"):
            apply_plan(plan, cluster_file, config=MigrationConfig(slots_per_move=NUM_SLOTS // 8))
        state = Coordinator.read(tmp_path)
        assert [mv["state"] for mv in state.active_moves()] == ["decided", "decided"]
        assert state.active_moves()[0]["id"] == handed[0]
        assert len(state.moves) == 2  # the two undecided ones were abandoned
        time.sleep(0.5)  # clients keep retrying the frozen slots meanwhile
        monkeypatch.setattr(migration, "_hand_over", real_hand_over)
        report = apply_plan(plan, cluster_file)
        assert report["shards"] == [1]
        calls = stream.calls
        while stream.calls < calls + 20:
            time.sleep(0.05)
    assert stream.errors == [], stream.errors
    assert Coordinator.read(tmp_path).active_moves() == []
    _check_against_reference(cluster_file, stream.reference(), [cluster.shards[0].address])


def test_cli_grow_then_shrink_a_local_cluster(tmp_path: Path, capsys: Any) -> None:
    """`recps rebalance plan|apply|status` on a `recps cluster up` cluster: apply starts the
    shard the plan adds, stops the one it drains, and every row reads the same after."""
    import argparse

    from recps.cli import rebalance_cmds
    from recps.ps.cluster import ClusterConfig, cluster_down, cluster_up, read_cluster_file

    parser = argparse.ArgumentParser(prog="recps")
    rebalance_cmds.add_parser(parser.add_subparsers())

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return int(args.func(args))

    info = cluster_up(ClusterConfig(str(tmp_path / "c"), num_shards=2, num_slots=NUM_SLOTS))
    cf = info["cluster_file"]
    try:
        ids = np.arange(5000, dtype=np.int64)
        with PSClient(cf) as c:
            c.create_table(TABLES[0])
            c.push({"user": (ids, np.ones((5000, 8), np.float32))})
            before = c.lookup({"user": ids}, create_missing=False)["user"]
        plan = str(tmp_path / "plan.json")
        assert run("rebalance", "plan", "--shards", "3", "--cluster-file", cf, "-o", plan) == 0
        assert "0 -> 2" in capsys.readouterr().out
        assert run("rebalance", "apply", plan, "--cluster-file", cf) == 2  # no --yes
        assert run("rebalance", "apply", plan, "--cluster-file", cf, "--yes", "--no-progress") == 0
        assert sorted(s["shard_id"] for s in read_cluster_file(cf)["shards"]) == [0, 1, 2]
        capsys.readouterr()
        assert run("rebalance", "status", "--cluster-file", cf, "--json") == 0
        status = json.loads(capsys.readouterr().out)
        assert status["in_flight"] == [] and sorted(status["slots_per_shard"]) == ["0", "1", "2"]
        assert run("rebalance", "plan", "--shards", "2", "--cluster-file", cf, "-o", plan) == 0
        capsys.readouterr()
        assert run("rebalance", "apply", plan, "--cluster-file", cf, "--yes", "--json") == 0
        report = json.loads(capsys.readouterr().out)
        assert report["shards"] == [0, 1] and report["stopped"] == {"2": "stopped"}
        with PSClient(cf) as c:
            after = c.lookup({"user": ids}, create_missing=False)["user"]
            assert sum(t.rows_on_disk for r in c.stats().values() for t in r.tables) == 5000
        np.testing.assert_array_equal(after, before)
    finally:
        cluster_down(cf)


def test_a_plan_by_qps_follows_the_current_hot_spot(ps_group: ShardGroup, tmp_path: Path) -> None:
    """Live shards report per-slot request rates; a plan by qps moves load off the shard
    whose slots are hot *now*, while the rows stay balanced (a plan by rows moves nothing)."""
    cluster, _ = _start(ps_group, "async")
    m = cluster.shard_map
    ids = np.arange(20_000, dtype=np.int64)
    slots = slot_of("user", ids, NUM_SLOTS)
    hot_slots = np.flatnonzero(m.slot_owner == 0)[:4]
    hot = ids[np.isin(slots, hot_slots)]  # every stored id of four of shard 0's slots
    with cluster.client() as c:
        c.create_table(TABLES[0])
        c.push({"user": (ids, np.ones((len(ids), 8), np.float32))})
        for _ in range(60):  # a hot spot on shard 0
            c.lookup({"user": hot})
        stats = c.slot_stats()
        assert stats.qps is not None
        cold = np.setdiff1d(np.arange(NUM_SLOTS), hot_slots)
        assert stats.qps[hot_slots].min() > 10 * stats.qps[cold].max() >= 0
        assert plan_rebalance(m, stats, [0, 1], by="rows", tolerance=0.1).moves == ()
        plan = plan_rebalance(m, stats, [0, 1], by="qps", tolerance=0.1)
        assert plan.moves and all(mv.src == 0 and mv.dst == 1 for mv in plan.moves)
        assert plan.load_after[0] < plan.load_before[0]
