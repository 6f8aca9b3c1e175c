"""PS shards as Ray actors on a real local Ray (2 CPUs), checked against ``MemoryStore``.

Ray starts once for the module (about 10-15 s of the module's ~35 s on a 2-core box). The
tests run in file order over one 2-shard cluster: serve, compare with the reference, read
stats through Ray, write a cluster file, survive ``kill -9`` of a shard (same port; then a
taken port, which re-issues the map), shut down without leaving a process, and start again
on the same data directory with the same map and data.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from recps.embedding import InitializerConfig, MemoryStore, OptimizerConfig, TableConfig
from recps.embedding import errors as E
from recps.ps.client import PSClient
from recps.ps.cluster import cluster_status, read_cluster_file
from recps.ps.config import ClientConfig
from recps.ps.routing import ShardMap
from recps.worker.job_config import JobClusterConfig
from recps.worker.ray_cluster import (
    RAY_NAMESPACE,
    PlacementError,
    RayPSCluster,
    RayPSConfig,
    add_shard_actors,
    init_ray,
    shutdown_ray,
    start_ps_shards,
)

NUM_SLOTS = 1024
TABLES = [
    TableConfig("user", dim=8, optimizer=OptimizerConfig("adagrad", lr=0.05)),
    TableConfig(
        "item",
        dim=4,
        initializer=InitializerConfig("normal", scale=0.1, seed=3),
        optimizer=OptimizerConfig("adam", lr=0.01),
    ),
]
# Enough retries to ride out an actor restart (~1.5 s here) without the test waiting first.
PATIENT = ClientConfig(timeout_s=10.0, max_retries=40, backoff_max_s=0.25)


class Reference:
    """One MemoryStore per table, fed what the cluster is fed."""

    def __init__(self) -> None:
        self.stores = {t.name: MemoryStore(t) for t in TABLES}

    def lookup(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t: self.stores[t].lookup(ids) for t, ids in batch.items()}

    def push(self, grads: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        for t, (ids, g) in grads.items():
            self.stores[t].apply_gradients(ids, g)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for t in want:
        np.testing.assert_array_equal(got[t], want[t], err_msg=f"{what}: table {t}")


def alive(pid: int) -> bool:
    """Running and not a zombie; psutil when installed, else /proc."""
    try:
        import psutil
    except ImportError:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def holders_of(root: Path) -> list[int]:
    """Pids of processes with a file open under ``root`` (RocksDB keeps LOCK and WAL open)."""
    psutil = pytest.importorskip("psutil")
    prefix = str(root.resolve())
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if any(f.path.startswith(prefix) for f in p.open_files()):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    info = init_ray(num_cpus=2)
    assert info.started_here and info.num_nodes == 1 and info.num_cpus == 2.0
    print(f"\nRay start-up: {info.init_s:.1f} s")
    yield info
    shutdown_ray()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def state(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """What the ordered tests share: the cluster, the reference, every pid seen."""
    root = tmp_path_factory.mktemp("ray-ps")
    t0 = time.perf_counter()
    ps = start_ps_shards(
        2, root / "ps", cpus_per_shard=0.5, memory_mb=16, durability="sync", num_slots=NUM_SLOTS
    )
    print(f"2 shard actors up in {time.perf_counter() - t0:.1f} s")
    st: dict[str, Any] = {"ps": ps, "root": root, "ref": Reference(), "pids": set(ps.pids)}
    yield st
    ps.shutdown()  # a no-op when the shutdown test ran


def round_trip(client: PSClient, ref: Reference, rng: np.random.Generator, what: str) -> None:
    """Lookup (ids with duplicates), compare, push, compare again."""
    batch = {
        "user": rng.integers(-(2**40), 2**40, 300),
        "item": rng.integers(0, 50, 200),  # few distinct ids: many duplicates
    }
    assert_same(client.lookup(batch), ref.lookup(batch), f"{what}: lookup")
    grads = {
        t: (ids, rng.standard_normal((len(ids), 8 if t == "user" else 4)).astype(np.float32))
        for t, ids in batch.items()
    }
    client.push(grads)
    ref.push(grads)
    assert_same(client.lookup(batch), ref.lookup(batch), f"{what}: after push")


def test_shards_serve_an_even_map_on_loopback(state: dict[str, Any]) -> None:
    ps: RayPSCluster = state["ps"]
    m = ps.shard_map
    assert m == ShardMap.even(ps.addresses, NUM_SLOTS, epoch=1)
    assert all(a.startswith("127.0.0.1:") for a in ps.addresses)
    for i, info in enumerate(ps.infos):
        shard_dir = state["root"] / "ps" / f"shard-{i}"
        assert info["data_dir"] == str(shard_dir.resolve())
        assert (shard_dir / "server.json").exists() and (shard_dir / "shard_map.json").exists()
        assert ShardMap.load(shard_dir / "shard_map.json") == m  # installed on every shard
        assert info["pid"] != os.getpid() and alive(info["pid"])
    with PSClient(ps.addresses) as c:  # a client that only knows addresses finds the map
        assert c.shard_map == m


def test_push_and_lookup_match_the_memory_store(state: dict[str, Any]) -> None:
    ps: RayPSCluster = state["ps"]
    rng = np.random.default_rng(0)
    with ps.client(PATIENT) as client:
        for t in TABLES:
            client.create_table(t)
        assert sorted(t.name for t in client.list_tables()) == ["item", "user"]
        for step in range(5):
            round_trip(client, state["ref"], rng, f"step {step}")


def test_stats_through_the_actors(state: dict[str, Any]) -> None:
    stats = state["ps"].stats()
    assert sorted(stats) == [0, 1]
    assert sum(s["slots"] for s in stats.values()) == NUM_SLOTS
    for sid, s in stats.items():
        assert s["shard_id"] == sid and s["epoch"] == 1 and s["rss_bytes"] > 0
        assert sorted(s["tables"]) == ["item", "user"]
    for t, store in state["ref"].stores.items():
        rows = sum(s["tables"][t]["rows_on_disk"] for s in stats.values())
        assert rows == store.stats().rows, t  # sync durability: every row is on disk


def test_cluster_file_is_what_recps_status_reads(state: dict[str, Any]) -> None:
    ps: RayPSCluster = state["ps"]
    path = ps.write_cluster_file(state["root"] / "cluster.json")
    info = read_cluster_file(path)
    assert ShardMap.from_dict(info["shard_map"]) == ps.shard_map
    assert [s["pid"] for s in info["shards"]] == ps.pids
    rows = cluster_status(path, sample_s=0.05)
    assert [r["state"] for r in rows] == ["up", "up"]
    assert sorted(rows[0]["tables"]) == ["item", "user"]


def test_killed_shard_restarts_on_its_data_dir_and_port(state: dict[str, Any]) -> None:
    ps: RayPSCluster = state["ps"]
    ref: Reference = state["ref"]
    rng = np.random.default_rng(1)
    before = ps.infos[0]
    client = PSClient(ps.shard_map, PATIENT)
    t0 = time.perf_counter()
    os.kill(before["pid"], signal.SIGKILL)
    # No waiting: the client's retries ride out the restart.
    round_trip(client, ref, rng, "right after kill -9")
    after = ps.wait_ready()[0]
    print(f"shard 0 back after kill -9 in {time.perf_counter() - t0:.1f} s")
    state["pids"].add(after["pid"])
    assert after["pid"] != before["pid"] and not alive(before["pid"])
    assert after["restarted"] and not after["port_changed"]
    assert after["address"] == before["address"] and after["data_dir"] == before["data_dir"]
    assert ps.refresh().epoch == 1  # same address: nothing to re-issue
    # Everything pushed before the crash was acknowledged durably: nothing is lost.
    for t, store in ref.stores.items():
        ids = next(iter(store.items())).ids
        assert_same(client.lookup({t: ids}), {t: store.lookup(ids)}, f"{t} after restart")
    client.close()


def test_restart_on_a_taken_port_reissues_the_map(state: dict[str, Any]) -> None:
    ps: RayPSCluster = state["ps"]
    ref: Reference = state["ref"]
    before = ps.infos[1]
    old_client = PSClient(ps.shard_map, PATIENT)
    with socket.socket() as squatter:
        os.kill(before["pid"], signal.SIGKILL)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:  # the port frees as soon as the process is gone
            try:
                squatter.bind(("127.0.0.1", before["port"]))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed shard's port never freed"
                time.sleep(0.01)
        squatter.listen()
        new_map = ps.refresh()
        after = ps.infos[1]
    state["pids"].add(after["pid"])
    assert after["restarted"] and after["port_changed"] and "taken" in after["note"]
    assert new_map.epoch == 2 and new_map.shards[1] == after["address"] != before["address"]
    assert np.array_equal(new_map.slot_owner, ShardMap.even(["a", "b"], NUM_SLOTS).slot_owner)
    assert ShardMap.from_dict(read_cluster_file(state["root"] / "cluster.json")["shard_map"]) == (
        new_map
    )
    for c in (old_client, PSClient(state["root"] / "cluster.json", PATIENT)):
        round_trip(c, ref, np.random.default_rng(2), "after the map was re-issued")
        assert c.shard_map.epoch == 2
        c.close()


def _recps(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator's shell runs it. Not with this process's environment: Ray
    put RAY_AUTH_MODE=token there when it started, which a shell does not have."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run(
        [sys.executable, "-m", "recps.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def _all_rows(client: PSClient, ref: Reference, what: str) -> None:
    for t, store in ref.stores.items():
        ids = np.concatenate([b.ids for b in store.items()])
        assert_same(client.lookup({t: ids}), {t: store.lookup(ids)}, f"{what}: table {t}")


def test_shard_add_and_remove_through_the_cli(state: dict[str, Any]) -> None:
    """`recps shard add` on a Ray job's cluster file starts a new actor on that Ray (a
    second driver), rebalances onto it live; `recps shard remove` drains and stops it."""
    ps: RayPSCluster = state["ps"]
    ref: Reference = state["ref"]
    path = state["root"] / "cluster.json"  # written by the tests above
    r = _recps("shard", "add", "--cluster-file", str(path), "--rebalance", "--yes", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    added = json.loads(r.stdout)
    info = read_cluster_file(path)
    m = ShardMap.from_dict(info["shard_map"])
    assert added["shard_id"] == 2 and added["rebalance"]["moved_slots"] > 0
    assert sorted(m.shards) == [0, 1, 2] and int((m.slot_owner == 2).sum()) > 0
    (entry,) = [s for s in info["shards"] if s["shard_id"] == 2]
    assert entry["detached"] and entry["address"] == added["address"] == m.shards[2]
    state["pids"].add(entry["pid"])
    actor = ray.get_actor(entry["ray_actor"], namespace=RAY_NAMESPACE)
    assert ray.get(actor.ready.remote())["pid"] == entry["pid"] and alive(entry["pid"])
    assert ps.refresh() == m  # the job follows the map the ops command changed
    with PSClient(path, PATIENT) as client:
        _all_rows(client, ref, "on 3 shards")
        round_trip(client, ref, np.random.default_rng(3), "on 3 shards")
        st = client.stats(fresh_slot_rows=True)[2]
        assert st.shard_id == 2 and sum(st.slot_rows) > 0  # the moved rows live there

    r = _recps("shard", "remove", "--shard", "2", "--cluster-file", str(path), "--yes", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["stopped"] == "stopped"
    assert not alive(entry["pid"])
    with pytest.raises(ValueError):
        ray.get_actor(entry["ray_actor"], namespace=RAY_NAMESPACE)
    info = read_cluster_file(path)
    assert sorted(ShardMap.from_dict(info["shard_map"]).shards) == [0, 1]
    assert [s["shard_id"] for s in info["shards"]] == [0, 1]
    assert sorted(ps.refresh().shards) == [0, 1]
    with PSClient(path, PATIENT) as client:
        _all_rows(client, ref, "back on 2 shards")


def test_the_jobs_shutdown_stops_shards_added_to_it(state: dict[str, Any]) -> None:
    root = state["root"] / "other"
    other = start_ps_shards(1, root / "ps", cpus_per_shard=0.25, memory_mb=16, num_slots=16)
    path = other.write_cluster_file(root / "cluster.json")
    got = add_shard_actors(path, [1])
    (entry,) = [s for s in read_cluster_file(path)["shards"] if s["shard_id"] == 1]
    assert got == {1: entry["address"]} and alive(entry["pid"])
    # No room on this Ray for 8 more: refused at once, nothing started (not a 120 s wait).
    with pytest.raises(E.ShardUnavailableError, match="no room for 8 more shard"):
        add_shard_actors(path, list(range(2, 10)))
    assert [s["shard_id"] for s in read_cluster_file(path)["shards"]] == [0, 1]
    report = other.shutdown()
    assert report == {0: "stopped", 1: "stopped"}
    assert not alive(entry["pid"]) and holders_of(root) == []


def test_placement_error_names_the_shortfall(state: dict[str, Any]) -> None:
    with pytest.raises(PlacementError, match="cannot place 2 PS shards") as e:
        start_ps_shards(
            2, state["root"] / "too-big", cpus_per_shard=4, ready_timeout_s=2.0, num_slots=16
        )
    assert e.value.available_cpus <= 1.0  # the running cluster holds the other CPU
    assert not (state["root"] / "too-big").exists()  # no actor ever started


def test_shutdown_leaves_no_stray_processes(state: dict[str, Any]) -> None:
    ps: RayPSCluster = state["ps"]
    pids = state["pids"] | set(ps.pids)
    pg = ps.placement_group
    t0 = time.perf_counter()
    report = ps.shutdown()
    print(f"shutdown in {time.perf_counter() - t0:.1f} s")
    assert report == {0: "stopped", 1: "stopped"}
    assert ps.shutdown() is report  # idempotent
    assert [p for p in pids if alive(p)] == []
    assert holders_of(state["root"]) == []
    assert ray.util.placement_group_table(pg)["state"] == "REMOVED"


def test_a_new_start_on_the_same_data_dir_keeps_map_and_rows(state: dict[str, Any]) -> None:
    old_map = state["ps"].shard_map
    ref: Reference = state["ref"]
    with start_ps_shards(2, state["root"] / "ps", 0.5, 16, "sync", NUM_SLOTS) as ps:
        assert np.array_equal(ps.shard_map.slot_owner, old_map.slot_owner)
        assert ps.shard_map.epoch >= old_map.epoch
        with ps.client(PATIENT) as client:
            assert sorted(t.name for t in client.list_tables()) == ["item", "user"]
            for t, store in ref.stores.items():
                ids = next(iter(store.items())).ids
                assert_same(client.lookup({t: ids}), {t: store.lookup(ids)}, f"{t} reopened")
        pids = ps.pids
    assert [p for p in pids if alive(p)] == []
    with pytest.raises(E.ConfigError, match=r"holds a PS cluster of 2 shards \(ids \[0, 1\]"):
        start_ps_shards(3, state["root"] / "ps", 0.5, 16, "sync", NUM_SLOTS)


def test_a_restart_after_shard_add_and_remove_keeps_the_gapped_ids(state: dict[str, Any]) -> None:
    """Add shard 2, remove shard 1, stop: a new start on the data dir brings up shards 0
    and 2, those of its newest map, with every row (before, it started 0 and 1)."""
    ref: Reference = state["ref"]
    root = state["root"]
    with start_ps_shards(2, root / "ps", 0.5, 16, "sync", NUM_SLOTS) as ps:
        path = ps.write_cluster_file(root / "gapped.json")
        r = _recps("shard", "add", "--cluster-file", str(path), "--rebalance", "--yes", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        r = _recps("shard", "remove", "--shard", "1", "--cluster-file", str(path), "--yes")
        assert r.returncode == 0, r.stderr[-3000:]
        assert sorted(ps.refresh().shards) == [0, 2]
        pids = set(ps.pids) | {int(s["pid"]) for s in read_cluster_file(path)["shards"]}
    assert [p for p in pids if alive(p)] == []
    with pytest.raises(E.ConfigError, match=r"2 shards \(ids \[0, 2\]"):
        start_ps_shards(3, root / "ps", 0.5, 16, "sync", NUM_SLOTS)
    with start_ps_shards(2, root / "ps", 0.5, 16, "sync", NUM_SLOTS) as ps:
        assert sorted(ps.shard_map.shards) == [0, 2]
        assert sorted(int(i["shard_id"]) for i in ps.infos) == [0, 2]
        with ps.client(PATIENT) as client:
            _all_rows(client, ref, "restarted on shards 0 and 2")
            round_trip(client, ref, np.random.default_rng(9), "restarted on shards 0 and 2")
        assert sorted(ps.shutdown()) == [0, 2]


def test_config_from_a_job_section(tmp_path: Path) -> None:
    job = JobClusterConfig(num_shards=3, cpus_per_shard=0.5, durability="sync", data_dir="rel")
    cfg = RayPSConfig.from_job(job, max_restarts=1)
    assert cfg.num_shards == 3 and cfg.durability == "sync" and cfg.max_restarts == 1
    assert cfg.data_dir == str(Path("rel", "ps").resolve())
    assert cfg.shard_dir(2) == Path(cfg.data_dir) / "shard-2"
