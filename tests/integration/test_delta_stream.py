"""The online delta stream end to end, all real processes: 2 training shards
(``python -m recps.ps.main --delta-dir``), pushes through ``PSClient``, a checkpoint
exported with the exporter's own streaming code (``export_table``, the seqs of
``delta_seqs``), and a serving replica (``python -m recps.serving.main --delta-dir``):

* after more pushes and one interval the replica serves exactly the training shards'
  rows (float32), rows not pushed since the export keep their exported values, and a
  version starts from the delta seqs its manifest records;
* a replica killed mid-stream and restarted applies every later delta once: none twice,
  none skipped, and ends equal to the shards;
* every delta a reader can see is complete and matches its checksums while shards publish;
* lag in the admin Status and as a Prometheus gauge;
* rows the training shards' TTL sweep deletes are deleted on the replica too (it serves
  the table's default again), and only those: a row pushed again stays.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ps_harness import Cluster, ShardGroup
from serving_harness import ServiceProcess

from recps.embedding import TableConfig
from recps.embedding.config import ExpiryConfig
from recps.ps import delta as D
from recps.ps.client import PSClient
from recps.ps.routing import ShardMap
from recps.serving import model_format as mf
from recps.serving.export import delta_seqs, export_table, source_shards
from recps.serving.replica_server import ServingAdminClient

pytestmark = pytest.mark.timeout(180)

# "fresh" rows expire 3 s after their last update (swept every 0.25 s); the other tests
# leave it alone.
TABLES = (
    TableConfig("user", dim=8),
    TableConfig("item", dim=4),
    TableConfig("fresh", dim=4, expiry=ExpiryConfig(ttl_s=3.0, sweep_interval_s=0.25)),
)
INTERVAL_S = 0.3  # shards publish this often; replicas poll every 0.2 s
WAIT_S = 30.0


def export_version(step_dir: Path, root: Path, version: int) -> mf.ModelManifest:
    """What ``recps export`` does for the embedding tables (no dense tower: the stream
    carries rows only): stream every shard's checkpoint into serving SSTs, record the
    delta seqs of the shard manifests, publish atomically."""
    shards = source_shards(step_dir)
    smap = ShardMap.even(
        [f"serving-{i}" for i in range(len(shards))], num_slots=shards[0].shard_map.num_slots
    )
    tmp = root / f"{mf.TMP_PREFIX}{version}"
    files, specs = {}, {}
    for table in TABLES:
        parts = [(s.shard_id, s.path / "tables" / table.name / "rocksdb") for s in shards]
        res = export_table(table, parts, tmp, smap, "float32", 1024, skip_untrained=True)
        for rel, n in res.files.items():
            p = tmp / rel
            files[rel] = mf.FileEntry(p.stat().st_size, mf.file_sha256(p), n)
        specs[table.name] = mf.TableSpec(table.dim, "float32", "float32", res.rows)
    manifest = mf.ModelManifest(
        version=version,
        created_at=time.time(),
        source_checkpoint=str(step_dir),
        step=version,
        model={},
        dense_features=(),
        features=(),
        hashing={},
        tables=specs,
        shard_map=smap,
        files=files,
        delta_seqs=delta_seqs(shards),
    )
    (tmp / mf.MANIFEST_FILE).write_text(manifest.to_json())
    (tmp / mf.COMPLETE_FILE).write_text("")
    tmp.rename(mf.version_dir(root, version))
    return manifest


def push(client: PSClient, ids: dict[str, np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed)
    dims = {t.name: t.dim for t in TABLES}
    client.push(
        {t: (i, rng.normal(size=(len(i), dims[t])).astype(np.float32)) for t, i in ids.items()}
    )


def rows_of(client: PSClient, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return client.lookup(ids, create_missing=False)


def replica_equals(
    replica: PSClient, shards: PSClient, ids: dict[str, np.ndarray]
) -> tuple[bool, dict[str, np.ndarray]]:
    got, want = rows_of(replica, ids), rows_of(shards, ids)
    return all(np.array_equal(got[t], want[t]) for t in ids), got


def wait_equal(replica: PSClient, shards: PSClient, ids: dict[str, np.ndarray]) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        ok, got = replica_equals(replica, shards, ids)
        if ok:
            return
        if time.monotonic() > deadline:
            want = rows_of(shards, ids)
            bad = {t: int((got[t] != want[t]).any(axis=1).sum()) for t in ids}
            raise AssertionError(
                f"replica rows still differ from the shards' after {WAIT_S}s: {bad}"
            )
        time.sleep(0.1)


def wait_published(delta_root: Path, cluster_client: PSClient) -> dict[int, int]:
    """Wait until each shard has no pending change (its state file's seq stops moving
    after a quiet interval); returns the newest seq per shard."""
    time.sleep(3 * INTERVAL_S)
    return {p: (D.list_deltas(delta_root, p) or [0])[-1] for p in (0, 1)}


class Stream:
    def __init__(self, base: Path, cluster: Cluster, client: PSClient) -> None:
        self.base, self.cluster, self.client = base, cluster, client
        self.delta_root = base / "deltas"
        self.model_root = base / "models"
        self.replicas: list[ServiceProcess] = []

    def replica(self, name: str, *args: str) -> ServiceProcess:
        r = ServiceProcess(
            "recps.serving.main",
            [
                "--model",
                str(self.model_root),
                "--data-dir",
                str(self.base / name),
                "--delta-dir",
                str(self.delta_root),
                "--delta-interval-s",
                "0.2",
                *args,
            ],
            self.base / f"{name}.log",
        )
        self.replicas.append(r)
        return r.start()


@pytest.fixture(scope="module")
def stream(
    ps_module_group: ShardGroup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stream]:
    base = tmp_path_factory.mktemp("delta")
    cluster = ps_module_group.start(
        2,
        "--delta-dir",
        str(base / "deltas"),
        "--delta-interval-s",
        str(INTERVAL_S),
        "--metrics-port",
        "0",
    )
    client = cluster.client()
    for t in TABLES:
        client.create_table(t)
    s = Stream(base, cluster, client)
    try:
        yield s
    finally:
        for r in s.replicas:
            r.kill()


def test_replica_follows_the_training_shards_and_restarts_without_gaps(stream: Stream) -> None:
    rng = np.random.default_rng(0)
    a = {"user": rng.choice(1 << 40, 400, replace=False), "item": np.arange(-100, 200)}
    shards = stream.client
    push(shards, a, seed=1)
    time.sleep(2 * INTERVAL_S)  # some deltas before the checkpoint: the version skips them
    push(shards, {"user": a["user"][:50]}, seed=2)
    shards.checkpoint(str(stream.base / "ckpt"), tag="c1")
    step = stream.base / "ckpt" / "c1"
    manifests = [json.loads((step / f"shard-{p}" / "manifest.json").read_text()) for p in (0, 1)]
    recorded = {p: manifests[p]["delta_seq"] for p in (0, 1)}
    assert any(seq > 0 for seq in recorded.values()), "no delta before the checkpoint"
    m = export_version(step, stream.model_root, 1)
    assert m.delta_seqs == recorded
    exported = rows_of(shards, a)

    replica = stream.replica("r0", "--metrics-port", "0")
    rclient = PSClient([replica.address])
    # The version's rows are the checkpoint's; nothing newer exists yet.
    wait_equal(rclient, shards, a)
    with ServingAdminClient(replica.address) as admin:
        st = admin.status()
    latest = {p: (D.list_deltas(stream.delta_root, p) or [0])[-1] for p in (0, 1)}
    assert {d["training_shard"]: d["applied_seq"] for d in st["deltas"]} == {
        p: max(recorded[p], latest[p]) for p in (0, 1)
    }
    # Only the deltas after the recorded seqs: the checkpoint holds the earlier ones.
    assert st["deltas_applied"] == sum(max(0, latest[p] - recorded[p]) for p in (0, 1))

    # More pushes: a subset of a, and new ids.
    b = {"user": a["user"][100:180], "item": np.arange(1000, 1100)}
    push(shards, b, seed=3)
    both = {t: np.concatenate([a[t], b.get(t, [])]).astype(np.int64) for t in a}
    wait_equal(rclient, shards, both)
    got = rows_of(rclient, a)
    untouched = np.ones(len(a["user"]), bool)
    untouched[100:180] = False
    np.testing.assert_array_equal(got["user"][untouched], exported["user"][untouched])
    assert not np.array_equal(got["user"][~untouched], exported["user"][~untouched])
    np.testing.assert_array_equal(got["item"], exported["item"])  # item: no new a-pushes

    with ServingAdminClient(replica.address) as admin:
        st = admin.status()
    assert st["delta_dir"] == str(stream.delta_root) and st["deltas_applied"] >= 1
    latest = {p: (D.list_deltas(stream.delta_root, p) or [0])[-1] for p in (0, 1)}
    for d in st["deltas"]:
        assert (
            d["error"] == "" and d["applied_seq"] == d["latest_seq"] == latest[d["training_shard"]]
        )
        if d["applied_seq"] > recorded[d["training_shard"]]:
            assert 0 <= d["lag_s"] < WAIT_S
    port = replica.ready["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "recps_serving_delta_lag_seconds{" in text and "recps_serving_delta_seq{" in text

    # Kill the replica mid-stream; deltas keep coming; a restart catches up exactly.
    replica.kill()
    state = json.loads((stream.base / "r0" / "state.json").read_text())
    before = {int(k): v for k, v in state["delta_applied"].items()}
    c = {"user": rng.choice(1 << 40, 200, replace=False), "item": np.arange(-100, 0)}
    push(shards, c, seed=4)
    time.sleep(2 * INTERVAL_S)
    push(shards, {"user": c["user"][:20]}, seed=5)
    published = wait_published(stream.delta_root, shards)
    assert any(published[p] > before.get(p, 0) for p in (0, 1))

    replica = stream.replica("r0")
    rclient = PSClient([replica.address])
    everything = {t: np.concatenate([both[t], c[t]]).astype(np.int64) for t in a}
    wait_equal(rclient, shards, everything)
    with ServingAdminClient(replica.address) as admin:
        st = admin.status()
    applied = {d["training_shard"]: d["applied_seq"] for d in st["deltas"]}
    latest = {p: (D.list_deltas(stream.delta_root, p) or [0])[-1] for p in (0, 1)}
    assert applied == latest
    # Exactly the deltas after the persisted seq were applied: none twice, none skipped.
    assert st["deltas_applied"] == sum(latest[p] - before.get(p, 0) for p in (0, 1))
    assert all(d["error"] == "" for d in st["deltas"])


def test_rows_expired_in_training_are_deleted_on_the_replica(stream: Stream) -> None:
    shards = stream.client
    if not any(mf.version_dir(stream.model_root, 1).glob("*")):
        pytest.skip("needs the version the first test exports")
    replica = stream.replica("r-ttl")
    rclient = PSClient([replica.address])
    x = {"fresh": np.arange(5000, 5200, dtype=np.int64)}
    push(shards, x, seed=7)
    wait_equal(rclient, shards, x)  # the replica has them, from a delta
    assert (rows_of(rclient, x)["fresh"] != 0).any(axis=1).all()
    # Keep the first 20 alive with pushes while the rest expire (ttl 3 s).
    keep = {"fresh": x["fresh"][:20]}
    deadline = time.monotonic() + WAIT_S
    while True:
        push(shards, keep, seed=8)
        got = rows_of(rclient, x)["fresh"]
        if not got[20:].any():
            break
        assert time.monotonic() < deadline, "expired rows are still served by the replica"
        time.sleep(0.5)
    # The kept rows are served with their training values; the others as the default.
    wait_equal(rclient, shards, keep)
    assert (rows_of(rclient, keep)["fresh"] != 0).any(axis=1).all()
    deleted = 0
    for p in (0, 1):
        for seq in D.list_deltas(stream.delta_root, p):
            m = D.DeltaManifest.load(D.delta_dir(stream.delta_root, p, seq))
            t = m.tables.get("fresh")
            deleted += t.deleted if t is not None else 0
    assert deleted >= 180, f"the deltas list {deleted} deletions of the 180 expired rows"
    replica.kill()
    # The training side's stream metrics.
    for shard in stream.cluster.shards:
        url = f"http://127.0.0.1:{shard.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        got = {
            s.name: s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name.startswith("recps_delta")
        }
        published = D.list_deltas(stream.delta_root, shard.shard_id)[-1]
        assert 1 <= got["recps_delta_seq"] <= published + 1  # it may publish meanwhile
        assert got["recps_deltas_published_total"] >= 1
        assert got["recps_delta_publish_failures_total"] == 0
        assert got["recps_delta_publish_seconds"] > 0
        assert got["recps_delta_last_published_timestamp_seconds"] > time.time() - WAIT_S * 4


def test_every_visible_delta_is_complete_while_shards_publish(stream: Stream) -> None:
    stop = threading.Event()
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            for p in D.list_training_shards(stream.delta_root):
                for seq in D.list_deltas(stream.delta_root, p)[-3:]:
                    try:
                        m = D.DeltaManifest.load(D.delta_dir(stream.delta_root, p, seq), True)
                        seen.append((p, m.seq))
                    except D.DeltaError as e:
                        # A delta deleted by retention meanwhile is fine; a partial one is not.
                        if D.delta_dir(stream.delta_root, p, seq).exists():
                            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    rng = np.random.default_rng(9)
    t_end = time.monotonic() + 6 * INTERVAL_S
    k = 0
    while time.monotonic() < t_end:
        push(stream.client, {"user": rng.integers(0, 1 << 30, 300)}, seed=100 + k)
        k += 1
    stop.set()
    t.join()
    assert not errors, errors[:3]
    assert len({s for _, s in seen}) >= 2


def ensure_version(stream: Stream) -> None:
    if mf.latest_version(stream.model_root) is None:
        stream.client.checkpoint(str(stream.base / "ckpt"), tag="c0")
        export_version(stream.base / "ckpt" / "c0", stream.model_root, 1)


def test_a_training_shard_killed_before_publishing_loses_no_change(stream: Stream) -> None:
    ensure_version(stream)
    replica = stream.replica("r-kill")
    rclient = PSClient([replica.address])
    ids = {"user": np.arange(5_000_000, 5_000_300, dtype=np.int64)}
    # Durable in the shard's WAL, then kill -9 before the next interval publishes it: the
    # pending id set dies with the process; the restarted shard must find the rows again.
    stream.client.push(
        {"user": (ids["user"], np.full((300, 8), 0.5, np.float32))}, wait_durable=True
    )
    for shard in stream.cluster.shards:
        shard.kill()
    for shard in stream.cluster.shards:
        shard.restart()
    wait_equal(rclient, stream.client, ids)
    got = rows_of(rclient, ids)["user"]
    assert not np.array_equal(got, np.zeros_like(got))  # not the zeros default


# ---- in-process: other splits and row formats, gaps --------------------------------------------


def write_version(root: Path, ids: np.ndarray, rows: np.ndarray, fmt: str, seqs: dict) -> None:
    """A one-table ("t") version, 2 serving shards, rows in ``fmt``."""
    smap = ShardMap.even(["", ""], num_slots=64)
    tmp = root / f"{mf.TMP_PREFIX}1"
    files = {}
    owners = smap.owners("t", ids)
    for k in (0, 1):
        sel = np.flatnonzero(owners == k)
        rel = mf.sst_relpath("t", k, 0)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        n = mf.write_sst(tmp / rel, ids[sel], rows[sel], fmt)
        files[rel] = mf.FileEntry((tmp / rel).stat().st_size, mf.file_sha256(tmp / rel), n)
    m = mf.ModelManifest(
        version=1,
        created_at=0.0,
        source_checkpoint="test",
        step=1,
        model={},
        dense_features=(),
        features=(),
        hashing={},
        tables={"t": mf.TableSpec(rows.shape[1], "float32", fmt, len(ids))},
        shard_map=smap,
        files=files,
        delta_seqs=seqs,
    )
    (tmp / mf.MANIFEST_FILE).write_text(m.to_json())
    (tmp / mf.COMPLETE_FILE).write_text("")
    tmp.rename(mf.version_dir(root, 1))


def test_other_split_and_int8_model_and_a_gap_stops_the_stream(tmp_path: Path) -> None:
    from recps.serving.replica import ReplicaConfig, ServingReplica

    ids = np.arange(0, 600, 2, dtype=np.int64)
    rng = np.random.default_rng(3)
    base = rng.normal(size=(len(ids), 4)).astype(np.float32)
    write_version(tmp_path / "m", ids, base, "int8", {0: 1})
    droot = tmp_path / "deltas"
    new1 = rng.normal(size=(50, 4)).astype(np.float32)
    new2 = rng.normal(size=(50, 4)).astype(np.float32)
    # seq 1 is in the checkpoint (recorded 1): if applied it would win over nothing, but
    # its ids are not pushed again, so a wrong replica would serve its rows.
    D.write_delta(droot, 0, 1, {"t": (ids[:50], np.full((50, 4), 9, np.float32))}, 64, 3, 0.0)
    # split into 3 serving shards: the model's 2-shard split differs -> every file
    D.write_delta(droot, 0, 2, {"t": (ids[50:100], new1)}, 64, 3, 0.0)
    D.write_delta(droot, 0, 3, {"t": (ids[60:110], new2)}, 64, 3, 0.0)
    cfg = ReplicaConfig(
        model=str(tmp_path / "m"),
        data_dir=str(tmp_path / "r"),
        shards=(1,),
        delta_dir=str(droot),
        delta_interval_s=3600,  # the poller's first pass runs at start; then by hand
    )
    r = ServingReplica(cfg)
    try:
        deadline = time.monotonic() + WAIT_S
        while r.status().delta.applied_total < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        want = base.copy()
        want[50:100] = new1
        want[60:110] = new2
        held = ShardMap.even(["", ""], num_slots=64).owners("t", ids) == 1
        got = r.lookup({"t": ids[held]})["t"]
        bound = np.abs(want[held]).max(axis=1, keepdims=True) / 127 / 2 + 1e-6
        assert (np.abs(got - want[held]) <= bound).all()  # int8, re-encoded from float32
        st = r.status().delta
        assert st.applied_total == 2 and st.shards[0].applied_seq == 3

        # seq 4 vanishes (retention) before this replica saw it; 5 exists: stop, report.
        D.write_delta(droot, 0, 4, {"t": (ids[:5], new1[:5])}, 64, 3, 0.0)
        D.write_delta(droot, 0, 5, {"t": (ids[:5], new2[:5])}, 64, 3, 0.0)
        D.prune_deltas(droot, 0, keep=1)
        assert r.apply_deltas() == 0
        assert "export a new version" in r.status().delta.shards[0].error
    finally:
        r.close()


def test_a_long_stream_is_compacted_not_piled_up(tmp_path: Path) -> None:
    """Each delta's files overlap the version's; without compaction they would stack up
    in L0 (every lookup probing them all) for as long as the replica follows training."""
    from recps.serving.replica import ReplicaConfig, ServingReplica

    ids = np.arange(0, 2000, dtype=np.int64)
    rng = np.random.default_rng(5)
    want = rng.normal(size=(len(ids), 4)).astype(np.float32)
    write_version(tmp_path / "m", ids, want, "float32", {})
    droot = tmp_path / "deltas"
    for seq in range(1, 41):
        pick = np.sort(rng.choice(len(ids), 300, replace=False))
        want[pick] = rng.normal(size=(len(pick), 4)).astype(np.float32)
        D.write_delta(droot, 0, seq, {"t": (ids[pick], want[pick])}, 64, 2, 0.0)
    cfg = ReplicaConfig(
        model=str(tmp_path / "m"),
        data_dir=str(tmp_path / "r"),
        delta_dir=str(droot),
        delta_interval_s=3600,  # the poller's first pass runs at start
    )
    r = ServingReplica(cfg)
    try:
        deadline = time.monotonic() + WAIT_S
        while r.status().delta.applied_total < 40:
            assert time.monotonic() < deadline, "the 40 deltas were not applied"
            time.sleep(0.05)
        np.testing.assert_array_equal(r.lookup({"t": ids})["t"], want)
        with r.use() as v:
            dbs = [t.db for t in v.tables.values()]
            while True:
                l0 = max(db.property_int_value("rocksdb.num-files-at-level0") for db in dbs)
                if l0 <= 8:
                    break
                assert time.monotonic() < deadline, f"{l0} files stay in L0 after 40 deltas"
                time.sleep(0.1)
        np.testing.assert_array_equal(r.lookup({"t": ids})["t"], want)
    finally:
        r.close()
