"""Exactly-once pushes across a kill -9 that lands between a sync table's row write and
the shard's dedup log: the table records the push in the rows' own WriteBatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import recps.ps.server as server_module
from recps.embedding import DurableMark, OptimizerConfig, TableConfig, TieredStore
from recps.proto import ps_pb2
from recps.ps import wire
from recps.ps.config import ServerConfig
from recps.ps.metrics import ServerMetrics
from recps.ps.server import PSServicer, mark_floor, parse_push_mark, push_mark
from tests.conftest import tiered_config
from tests.unit.test_slot_stats import _call

TABLE = TableConfig("item", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1))


def _shard(path: Path) -> PSServicer:
    cfg = ServerConfig(data_dir=str(path), store=tiered_config(durability="sync"))
    s = PSServicer(cfg, ServerMetrics(0))
    spec = wire.spec_from_config(TABLE)
    _call(s, "CreateTable", ps_pb2.CreateTableRequest(spec=spec, if_not_exists=True))
    return s


def _push(ids: np.ndarray, grads: np.ndarray, client: str, seq: int) -> ps_pb2.PushRequest:
    req = ps_pb2.PushRequest(client_id=client, seq=seq)
    req.tables.add(
        table="item", ids=wire.encode_ids(ids), grads=wire.encode_rows(grads, 1), dim=4, dtype=1
    )
    return req


def _rows(s: PSServicer, ids: np.ndarray) -> np.ndarray:
    req = ps_pb2.LookupRequest(tables=[ps_pb2.TableIds(table="item", ids=wire.encode_ids(ids))])
    resp = ps_pb2.LookupResponse.FromString(_call(s, "Lookup", req))
    return wire.decode_rows(resp.tables[0].rows, len(ids), 4, resp.tables[0].dtype, "rows")


def test_a_push_durable_in_the_table_but_not_in_the_log_is_a_duplicate_after_restart(
    tmp_path: Path,
) -> None:
    ids = np.array([3, 7, 11], dtype=np.int64)
    g = np.ones((3, 4), np.float32)
    first = _shard(tmp_path)
    assert not _call(first, "Push", _push(ids, g, "w0", 1)).duplicate
    once = _rows(first, ids)
    # The crash window: push (w0, 2)'s rows reach the table's WAL, then the process dies
    # before the shard logs the push. Exactly what the Push handler writes up to there.
    store = first._tables["item"]
    store.apply_gradients(ids, g, mark=push_mark("w0", 2))
    twice = _rows(first, ids)
    assert not np.array_equal(twice, once)
    # Closing saves the shard's dedup state, which never heard of seq 2: what a kill -9
    # right after the rows' write leaves behind. Then a new servicer on the directory.
    assert not first._dedup.was_applied("w0", 2)
    first.close()
    again = _shard(tmp_path)
    resp = _call(again, "Push", _push(ids, g, "w0", 2))  # the client's retry
    assert resp.duplicate and resp.applied_rows == 0
    np.testing.assert_array_equal(_rows(again, ids), twice)  # applied once, not twice
    assert not _call(again, "Push", _push(ids, g, "w0", 3)).duplicate  # later seqs apply


def test_marks_ride_with_the_rows_and_old_ones_are_dropped(tmp_path: Path) -> None:
    store = TieredStore(tmp_path / "t", TABLE, tiered_config(durability="sync"))
    ids, g = np.arange(5, dtype=np.int64), np.ones((5, 4), np.float32)
    for seq in range(1, 30):
        store.apply_gradients(ids, g, mark=push_mark("w1", seq, mark_floor(seq, 4)))
    store.apply_gradients(ids, g, mark=push_mark("w1", 30))
    store.apply_gradients(ids, g, mark=DurableMark(b"other/x"))
    store.apply_gradients(ids, g)  # no mark: none written
    store.close()  # and reopened: the marks are on disk
    store = TieredStore(tmp_path / "t", TABLE, tiered_config(durability="sync"))
    got = [parse_push_mark(k) for k, _ in store.marks(b"push/")]
    # Seq 29 dropped those below mark_floor(29, 4) = 24; seq 30 dropped nothing.
    assert got == [("w1", s) for s in range(24, 31)]
    assert store.marks(b"other/") == [(b"other/x", b"")]
    store.close()


def test_a_shard_keeps_a_bounded_number_of_marks_per_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "_MARK_SPAN", 8)
    s = _shard(tmp_path)
    ids, g = np.arange(4, dtype=np.int64), np.ones((4, 4), np.float32)
    for seq in range(1, 101):
        _call(s, "Push", _push(ids, g, "w2", seq))
    seqs = [parse_push_mark(k)[1] for k, _ in s._tables["item"].marks(b"push/")]
    assert seqs == list(range(seqs[0], 101)) and 8 <= len(seqs) <= 2 * 8 + 1
    s.close()


def test_a_client_name_with_odd_bytes_round_trips() -> None:
    for client, seq in (("", 0), ("a/b\x00c", 1), ("ünï", 2**40 + 5)):
        assert parse_push_mark(push_mark(client, seq).key) == (client, seq)


def test_part_applied_pushes_are_recovered_and_forgotten_once_done(tmp_path: Path) -> None:
    d = server_module._Dedup(64, snapshot_path=tmp_path / "dedup.json")
    assert d.recover([("w", 5, "a", 99), ("w", 5, "b", None), ("w", 6, "a", -3)]) == 3
    assert d.applied_upto("w", 5) == {"a": 99} and d.applied_tables("w", 5) == {"b"}
    assert d.recover([("w", 6, "a", None)]) == 1  # a complete mark outranks a part
    assert d.applied_upto("w", 6) == {} and d.applied_tables("w", 6) == {"a"}
    back = server_module._Dedup(64)
    back.load(d.to_dict())  # the snapshot keeps the parts
    assert back.applied_upto("w", 5) == {"a": 99}
    assert back.begin("w", 5) == (True, None)
    back.finish("w", 5, applied=True)
    assert back.applied_upto("w", 5) == {} and back.was_applied("w", 5)
    assert back.recover([("w", 5, "a", 7)]) == 0  # a done push takes no marks


def test_a_store_marks_each_chunk_of_a_big_push_with_how_far_it_got(tmp_path: Path) -> None:
    store = TieredStore(tmp_path / "t", TABLE, tiered_config(durability="sync"))
    n = 3 * store._chunk + 5
    ids = np.arange(n, dtype=np.int64)[::-1].copy()
    mark = push_mark("w", 1)
    seen: list[bytes] = []
    write = store._rocks.write

    def spy(*a: object, meta: dict | None = None, **kw: object) -> None:
        if meta and mark.key in meta:
            seen.append(meta[mark.key])
        write(*a, meta=meta, **kw)

    store._rocks.write = spy  # type: ignore[method-assign]
    store.apply_gradients(ids, np.ones((n, 4), np.float32), mark=mark)
    c = store._chunk
    # Chunks of the sorted ids, the top c last: each write says how far the push got.
    assert [DurableMark.applied_upto(v) for v in seen] == [c - 1, 2 * c - 1, 2 * c + 4, None]
    store.close()
