"""The delta stream's parts without processes: changed-id tracking (against a plain
Python set), the on-disk delta format, the publisher over a real TieredStore, the
manifest's recorded seqs and the replica cache's invalidation."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recps.embedding import TableConfig, TieredStore
from recps.embedding.sstfile import read_sst
from recps.ps import delta as D
from recps.ps.routing import ShardMap
from recps.serving import model_format as mf
from recps.serving.cache import RowCache

chunks = st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40), min_size=0, max_size=12)


@settings(max_examples=60, deadline=None)
@given(first=chunks, second=chunks)
def test_changed_ids_are_exactly_the_ids_added_since_the_last_take(
    first: list[list[int]], second: list[list[int]]
) -> None:
    ch = D.ChangedIds()
    for c in first:
        ch.add("t", np.array(c, dtype=np.int64))
    got = ch.take()
    want = sorted(set().union(*first)) if first else []
    assert got.get("t", np.empty(0)).tolist() == want
    for c in second:
        ch.add("t", np.array(c, dtype=np.int64))
    want2 = sorted(set().union(*second)) if second else []
    assert ch.pending("t") == len(want2)
    assert ch.take().get("t", np.empty(0)).tolist() == want2
    assert ch.take() == {}


def test_compaction_keeps_the_set_exact_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "_COMPACT_MIN_IDS", 100)
    ch = D.ChangedIds()
    rng = np.random.default_rng(0)
    seen: set[int] = set()
    for _ in range(200):
        ids = rng.integers(0, 500, 37)
        seen.update(ids.tolist())
        ch.add("a", ids)
        # Chunks never hold much more than the merged set: memory stays ~2x distinct ids.
        assert ch._chunk_ids.get("a", 0) <= max(100, len(ch._merged.get("a", ()))) + 37
    ch.add("b", np.array([7]))
    got = ch.take()
    assert got["a"].tolist() == sorted(seen)
    assert got["b"].tolist() == [7]


def test_concurrent_adds_and_takes_lose_nothing() -> None:
    ch = D.ChangedIds()
    taken: list[np.ndarray] = []
    stop = threading.Event()

    def taker() -> None:
        while not stop.is_set():
            taken.extend(ch.take().values())

    t = threading.Thread(target=taker)
    t.start()
    for i in range(2000):
        ch.add("t", np.array([i, i + 1]))
    stop.set()
    t.join()
    taken.extend(ch.take().values())
    assert np.unique(np.concatenate(taken)).tolist() == list(range(2001))


def test_restore_merges_a_failed_publish_back() -> None:
    ch = D.ChangedIds()
    ch.add("t", np.array([3, 1]))
    taken = ch.take()
    ch.add("t", np.array([2]))
    ch.restore(taken)
    assert ch.take()["t"].tolist() == [1, 2, 3]


# ---- the format ------------------------------------------------------------------------------


def test_a_delta_routes_rows_to_serving_shards_and_appears_atomically(tmp_path: Path) -> None:
    ids = np.arange(-50, 250, 3, dtype=np.int64)
    rows = np.random.default_rng(1).normal(size=(len(ids), 4)).astype(np.float32)
    (tmp_path / "shard-1" / ".tmp-2-99").mkdir(parents=True)  # a crashed publish
    (tmp_path / "shard-1" / f"{5:012d}").mkdir()  # no COMPLETE: not a delta
    m = D.write_delta(tmp_path, 1, 1, {"t": (ids, rows)}, 64, 3, changes_before=1.0)
    assert D.list_deltas(tmp_path, 1) == [1] and D.list_training_shards(tmp_path) == [1]
    back = D.DeltaManifest.load(D.delta_dir(tmp_path, 1, 1), verify=True)
    assert back.to_dict() == m.to_dict()
    owners = ShardMap.even([""] * 3, num_slots=64).owners("t", ids)
    got_ids = []
    for k in back.files_of("t"):
        sst_ids, sst_rows = read_sst(back.path / D.sst_relpath("t", k), 4, "float32")
        assert (owners[np.searchsorted(ids, sst_ids)] == k).all()
        np.testing.assert_array_equal(sst_rows, rows[np.searchsorted(ids, sst_ids)])
        np.testing.assert_array_equal(back.read_ids("t", k), sst_ids)
        got_ids.extend(sst_ids.tolist())
    assert sorted(got_ids) == ids.tolist()
    with pytest.raises(D.DeltaError, match="already exists"):
        D.write_delta(tmp_path, 1, 1, {}, 64, 3, changes_before=1.0)
    # corruption is detected
    f = back.path / D.sst_relpath("t", back.files_of("t")[0])
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    with pytest.raises(D.DeltaError, match="corrupt"):
        D.DeltaManifest.load(back.path, verify=True)


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for s in range(1, 6):
        D.write_delta(tmp_path, 0, s, {}, 16, 1, changes_before=0.0)
    assert D.prune_deltas(tmp_path, 0, keep=2) == [1, 2, 3]
    assert D.list_deltas(tmp_path, 0) == [4, 5]


# ---- the publisher over a real store ---------------------------------------------------------


def _publisher(store: TieredStore, root: Path, state: Path) -> D.DeltaPublisher:
    def read(table: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = store.export_rows(ids)
        return b.ids, b.weights

    return D.DeltaPublisher(root, 0, state, 64, read, lambda: 2, keep=0)


def test_publisher_writes_the_current_rows_of_pushed_ids(make_tiered, tmp_path: Path) -> None:
    store = make_tiered(TableConfig("t", dim=4))
    root, state = tmp_path / "deltas", tmp_path / "delta_state.json"
    pub = _publisher(store, root, state)
    assert pub.publish() is None and pub.seq == 0  # nothing changed: no delta
    ids = np.array([5, 9, 2], dtype=np.int64)
    store.apply_gradients(ids, np.ones((3, 4), np.float32))
    pub.changed.add("t", ids)
    store.apply_gradients(ids[:1], np.ones((1, 4), np.float32))  # newer value of id 5
    pub.changed.add("t", ids[:1])
    m = pub.publish()
    assert m is not None and m.seq == pub.seq == 1 and m.tables["t"].rows == 3
    want = store.export_rows(ids)
    got = [read_sst(m.path / D.sst_relpath("t", k), 4, "float32") for k in m.files_of("t")]
    got_ids = np.concatenate([g[0] for g in got])
    order = np.argsort(got_ids)
    np.testing.assert_array_equal(got_ids[order], want.ids)
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got])[order], want.weights)

    # A failed publish keeps its ids and its seq.
    store.apply_gradients(ids[1:2], np.ones((1, 4), np.float32))
    pub.changed.add("t", ids[1:2])
    real = pub._read_rows
    pub._read_rows = lambda t, i: (_ for _ in ()).throw(OSError("disk full"))
    with pytest.raises(OSError):
        pub.publish()
    assert pub.seq == 1 and pub.changed.pending("t") == 1
    pub._read_rows = real
    assert pub.publish().seq == 2

    # A restart (a new publisher, the same state) continues the seq, and recover() marks
    # rows updated after the last delta's id set was taken.
    store.apply_gradients(np.array([77]), np.ones((1, 4), np.float32))
    again = _publisher(store, root, state)
    assert again.seq == 2
    again.recover({"t": store})
    assert 77 in again.changed.take()["t"].tolist()


def test_expired_rows_are_published_as_deletes_unless_pushed_again(
    make_tiered, tmp_path: Path
) -> None:
    store = make_tiered(TableConfig("t", dim=4))
    root, state = tmp_path / "deltas", tmp_path / "delta_state.json"
    pub = _publisher(store, root, state)
    ids = np.arange(100, 164, dtype=np.int64)
    store.apply_gradients(ids, np.ones((len(ids), 4), np.float32))
    store.delete(ids)  # stands in for the TTL sweep (its listener calls note_expired)
    pub.note_expired("t", ids[:40])
    pub.note_expired("t", ids[40:])
    # A crash now (no publish yet): a restarted shard still knows what expired.
    restarted = _publisher(store, root, state)
    np.testing.assert_array_equal(restarted.expired.take()["t"], ids)
    back = ids[::8]  # pushed again after they expired: they exist, and are not deleted
    store.apply_gradients(back, np.ones((len(back), 4), np.float32))
    pub.changed.add("t", back)
    m = pub.publish()
    assert m is not None and m.tables["t"].rows == len(back)
    gone = np.setdiff1d(ids, back)
    assert m.tables["t"].deleted == len(gone)
    told = np.concatenate([m.read_deleted("t", k) for k in m.deletes_of("t")])
    np.testing.assert_array_equal(np.sort(told), gone)
    # Each serving shard's file holds only its ids, and the files are in the checksums.
    for k in m.deletes_of("t"):
        assert (m.serving_map().owners("t", m.read_deleted("t", k)) == k).all()
    assert D.DeltaManifest.load(m.path, verify=True).tables["t"].deleted == len(gone)
    assert pub.expired.pending() == 0
    # Published: a restart has nothing left to delete; a torn last record is ignored.
    assert _publisher(store, root, state).expired.pending() == 0
    pub.note_expired("t", ids[:3])
    log_file = state.with_name(D.EXPIRED_LOG_FILE)
    with open(log_file, "ab") as f:
        f.write(b"\x01\x00\x09")  # a crash mid-append
    np.testing.assert_array_equal(_publisher(store, root, state).expired.take()["t"], ids[:3])


def test_manifest_records_delta_seqs_and_old_manifests_have_none() -> None:
    m = mf.ModelManifest(
        version=1,
        created_at=0.0,
        source_checkpoint="c",
        step=1,
        model={},
        dense_features=(),
        features=(),
        hashing={},
        tables={},
        shard_map=ShardMap.even(["a"], num_slots=16),
        files={},
        delta_seqs={0: 4, 1: 0},
    )
    d = m.to_dict()
    assert d["delta_seqs"] == {"0": 4, "1": 0}
    assert mf.ModelManifest.from_dict(d).delta_seqs == {0: 4, 1: 0}
    del d["delta_seqs"]
    assert mf.ModelManifest.from_dict(d).delta_seqs == {}


@pytest.mark.parametrize("tables", [1, 3])
def test_cache_invalidate_drops_exactly_the_given_rows(tables: int) -> None:
    c = RowCache(dim=2, capacity_rows=64, tables=tables)
    ids = np.arange(10, dtype=np.int64)
    t = np.full(10, tables - 1, dtype=np.intp)
    c.admit(ids, np.ones((10, 2), np.float32), t if tables > 1 else None)
    if tables > 1:  # the same ids of another table stay
        c.admit(ids, np.zeros((10, 2), np.float32), np.zeros(10, np.intp))
    assert c.invalidate(np.array([3, 4, 99]), table=tables - 1) == 2
    hit, _ = c.lookup(ids, t if tables > 1 else None)
    assert np.flatnonzero(~hit).tolist() == [3, 4]
    if tables > 1:
        assert c.lookup(ids, np.zeros(10, np.intp))[0].all()
