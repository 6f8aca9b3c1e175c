"""Per-slot statistics and the shard side of slot moves, in process (no sockets).

The servicer's RPC methods are called directly with a fake context that raises what
``context.abort`` would send, so the move protocol's steps and refusals are checked
without a gRPC server.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from recps.embedding import MemoryStore, OptimizerConfig, RowBatch, TableConfig, TieredStore
from recps.embedding import errors as E
from recps.proto import ps_pb2
from recps.ps import errors as PE
from recps.ps import wire
from recps.ps.config import ServerConfig
from recps.ps.metrics import ServerMetrics
from recps.ps.migration import decode_slot_rows, encode_slot_rows
from recps.ps.routing import ShardMap, slot_of
from recps.ps.server import PSServicer
from tests.conftest import tiered_config

NUM_SLOTS = 64
TABLE = TableConfig("item", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1))


# ---- store-level row moves ------------------------------------------------------------------


def _stores(tmp_path: Path) -> list[Any]:
    return [
        MemoryStore(TABLE),
        TieredStore(tmp_path / "a", TABLE, tiered_config()),  # 64 KiB: most rows on disk
    ]


def _rows(store: Any) -> RowBatch:
    cols = [(b.ids, b.weights, b.state, b.updated_at, b.count) for b in store.items()]
    return RowBatch(*(np.concatenate(c) for c in zip(*cols)))


_FIELDS = ("ids", "weights", "state", "updated_at", "count")


@pytest.mark.parametrize("kind", [0, 1], ids=["memory", "tiered"])
def test_export_ingest_delete_round_trip(tmp_path: Path, kind: int) -> None:
    rng = np.random.default_rng(0)
    src = _stores(tmp_path / "src")[kind]
    dst = _stores(tmp_path / "dst")[kind]
    ids = rng.integers(-5000, 5000, 4000)
    src.apply_gradients(ids, rng.normal(size=(4000, 4)).astype(np.float32))
    src.apply_gradients(ids[:100], rng.normal(size=(100, 4)).astype(np.float32))
    want = _rows(src)
    got = src.export_rows(np.concatenate([want.ids, [9000, 9001]]))  # absent ids skipped
    for f in _FIELDS:
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
    # a stale copy in the target is replaced, optimizer state and counters included
    dst.apply_gradients(want.ids[:10], np.ones((10, 4), np.float32))
    assert dst.ingest(got) == len(want)
    back = _rows(dst)
    np.testing.assert_array_equal(back.weights, want.weights)
    np.testing.assert_array_equal(back.state, want.state)
    np.testing.assert_array_equal(back.count, want.count)
    assert dst.stats().rows == len(want)
    # scan from an id on: the tail only
    mid = int(want.ids[len(want) // 2])
    tail = np.concatenate([b.ids for b in dst.scan(mid, batch_size=7)])
    np.testing.assert_array_equal(tail, want.ids[want.ids >= mid])
    assert dst.delete(np.concatenate([want.ids[:50], [99999]])) == 50
    assert dst.stats().rows == len(want) - 50
    np.testing.assert_array_equal(_rows(dst).ids, want.ids[50:])
    src.close()
    dst.close()


def test_tiered_ingest_survives_reopen(tmp_path: Path) -> None:
    cfg = tiered_config()
    s = TieredStore(tmp_path / "t", TABLE, cfg)
    batch = RowBatch(
        np.arange(10, dtype=np.int64),
        np.full((10, 4), 2.0, np.float32),
        np.full((10, 4), 3.0, np.float32),
        np.full(10, 7.0),
        np.full(10, 4, np.int64),
    )
    s.ingest(batch)
    s.close()
    again = TieredStore(tmp_path / "t", TABLE, cfg)
    got = again.export_rows(np.arange(10))
    np.testing.assert_array_equal(got.state, batch.state)
    np.testing.assert_array_equal(got.count, batch.count)
    assert again.stats().rows == 10
    again.close()


def test_slot_rows_codec_checks_lengths() -> None:
    batch = RowBatch(
        np.array([3, 9]), np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32),
        np.array([1.0, 2.0]), np.array([1, 2]),
    )  # fmt: skip
    msg = encode_slot_rows("t", batch)
    back = decode_slot_rows(msg, 4, 4)
    np.testing.assert_array_equal(back.ids, [3, 9])
    with pytest.raises(E.InvalidArgumentError, match="byte lengths"):
        decode_slot_rows(msg, 4, 8)


# ---- the servicer, in process ---------------------------------------------------------------


class _Aborted(Exception):
    pass


class _Context:
    """What the servicer needs of a ``grpc.ServicerContext``: abort raises instead."""

    def __init__(self) -> None:
        self.md: dict[str, str] = {}

    def set_trailing_metadata(self, md: Any) -> None:
        self.md = dict(md)

    def abort(self, code: Any, details: str) -> None:
        raise _Aborted(code, details, self.md.get(PE.ERROR_TYPE_KEY))


def _call(servicer: PSServicer, method: str, request: Any) -> Any:
    return getattr(servicer, method)(request, _Context())


def _error(servicer: PSServicer, method: str, request: Any) -> tuple[Any, str]:
    with pytest.raises(_Aborted) as info:
        _call(servicer, method, request)
    code, _, name = info.value.args
    return code, name


def _shard(path: Path, sid: int, shard_map: ShardMap) -> PSServicer:
    cfg = ServerConfig(data_dir=str(path), shard_id=sid, num_slots=NUM_SLOTS, store=tiered_config())
    s = PSServicer(cfg, ServerMetrics(sid))
    if shard_map.epoch > s.shard_map.epoch:
        _call(s, "UpdateShardMap", shard_map.to_proto())
    spec = wire.spec_from_config(TABLE)
    _call(s, "CreateTable", ps_pb2.CreateTableRequest(spec=spec, if_not_exists=True))
    return s


def _push(s: PSServicer, ids: np.ndarray, grads: np.ndarray, seq: int) -> Any:
    return _call(s, "Push", _push_req(ids, seq, grads))


def _lookup(s: PSServicer, ids: np.ndarray) -> np.ndarray:
    req = ps_pb2.LookupRequest(create_missing=True)
    req.tables.add(table="item", ids=wire.encode_ids(ids))
    resp = ps_pb2.LookupResponse.FromString(_call(s, "Lookup", req))
    return np.frombuffer(resp.tables[0].rows, "<f4").reshape(-1, 4)


def test_stats_report_rows_bytes_and_requests_per_slot(tmp_path: Path) -> None:
    m = ShardMap(1, NUM_SLOTS, {0: "x"}, np.zeros(NUM_SLOTS, np.uint16))
    s = _shard(tmp_path, 0, m)
    ids = np.arange(1000, dtype=np.int64)
    _lookup(s, ids)
    _push(s, ids[:300], np.ones((300, 4), np.float32), 1)
    resp = _call(s, "Stats", ps_pb2.StatsRequest(fresh_slot_rows=True))
    slots = slot_of("item", ids, NUM_SLOTS)
    rows = np.bincount(slots, minlength=NUM_SLOTS)
    reqs = rows + np.bincount(slots[:300], minlength=NUM_SLOTS)
    got = np.zeros(NUM_SLOTS, np.int64)
    got[list(resp.slot_ids)] = resp.slot_rows
    np.testing.assert_array_equal(got, rows)
    got[list(resp.slot_ids)] = resp.slot_requests
    np.testing.assert_array_equal(got, reqs)
    qps = np.zeros(NUM_SLOTS)
    qps[list(resp.slot_ids)] = resp.slot_qps
    np.testing.assert_array_equal(qps > 0, reqs > 0)  # rates where, and only where, ids went
    row_bytes = 8 + 4 * 4 + 4 * 4 + 16  # key + emb + adagrad state + updated_at + count
    got[list(resp.slot_ids)] = resp.slot_bytes
    np.testing.assert_array_equal(got, rows * row_bytes)
    assert 0 <= resp.slot_rows_age_s < 5
    s.close()


def _two_shards(tmp_path: Path) -> tuple[PSServicer, PSServicer, ShardMap]:
    m = ShardMap(1, NUM_SLOTS, {0: "a", 1: "b"}, np.zeros(NUM_SLOTS, np.uint16))
    return _shard(tmp_path / "s0", 0, m), _shard(tmp_path / "s1", 1, m), m


def _migrate(s: PSServicer, action: int, slots: list[int]) -> Any:
    return _call(s, "Migrate", ps_pb2.MigrateRequest(move_id="m", action=action, slots=slots))


def _copy(src: PSServicer, dst: PSServicer, slots: list[int], delta: bool, page: int = 7) -> int:
    after, n = None, 0
    while True:
        req = ps_pb2.ReadSlotRowsRequest(
            table="item", slots=slots, delta=delta, after_id=after or 0,
            has_after_id=after is not None, max_rows=page,
        )  # fmt: skip
        resp = _call(src, "ReadSlotRows", req)
        k = len(resp.rows.ids) // 8
        if k:
            _call(dst, "WriteSlotRows", ps_pb2.WriteSlotRowsRequest(move_id="m", rows=resp.rows))
            after = int(np.frombuffer(resp.rows.ids, "<i8")[-1])
            n += k
        if resp.done or not k:
            return n


def test_move_protocol_in_process(tmp_path: Path) -> None:
    src, dst, m = _two_shards(tmp_path)
    ref = MemoryStore(TABLE)
    rng = np.random.default_rng(1)
    ids = np.arange(2000, dtype=np.int64)
    slots = slot_of("item", ids, NUM_SLOTS)
    moving = list(range(0, NUM_SLOTS, 3))
    in_move = np.isin(slots, moving)

    def push(sel: np.ndarray, seq: int) -> None:
        g = rng.normal(size=(len(sel), 4)).astype(np.float32)
        _push(src, sel, g, seq)
        ref.apply_gradients(sel, g)

    push(ids, 1)
    # the target refuses rows it does not expect
    rows = encode_slot_rows("item", src._tables["item"].export_rows(ids[in_move][:3]))
    code, name = _error(dst, "WriteSlotRows", ps_pb2.WriteSlotRowsRequest(rows=rows))
    assert name == "MigrationError"
    # and the source cannot be made a target of its own slots
    req = ps_pb2.MigrateRequest(action=ps_pb2.BEGIN_TARGET, slots=moving)
    assert _error(src, "Migrate", req)[1] == "MigrationError"

    _migrate(dst, ps_pb2.BEGIN_TARGET, moving)
    _migrate(src, ps_pb2.BEGIN_SOURCE, moving)
    assert _copy(src, dst, moving, delta=False) == int(in_move.sum())
    push(ids[::5], 2)  # writes during the copy: recorded as the delta
    _lookup(src, np.array([10_000, 10_001]))  # creates rows: recorded too
    ref.lookup(np.array([10_000, 10_001]))
    _migrate(src, ps_pb2.FREEZE, moving)
    frozen_ids = ids[in_move][:4]
    code, name = _error(src, "Push", _push_req(frozen_ids, 3))
    assert name == "SlotFrozenError" and code.name == "UNAVAILABLE"
    unfrozen = ids[~in_move][:4]
    push(unfrozen, 4)  # other slots take writes as ever
    before = src._tables["item"].stats().rows
    fresh = np.arange(20_000, 20_050)
    _lookup(src, fresh)  # reads of frozen slots are answered, but make no rows there
    created = src._tables["item"].stats().rows - before
    made = ~np.isin(slot_of("item", fresh, NUM_SLOTS), moving)
    assert created == int(made.sum()) > 0
    ref.lookup(fresh[made])
    assert _copy(src, dst, moving, delta=True) > 0
    _migrate(dst, ps_pb2.PREPARE_TARGET, moving)
    owner = m.slot_owner.copy()
    owner[moving] = 1
    new = m.replace(slot_owner=owner)
    _call(dst, "UpdateShardMap", new.to_proto())
    _call(src, "UpdateShardMap", new.to_proto())
    # after the handover the old owner answers "stale", never applies
    assert _error(src, "Push", _push_req(frozen_ids, 5))[1] == "StaleShardMapError"
    assert src._slot_rates.rates()[moving].min() > 0
    assert _migrate(src, ps_pb2.FINISH, moving).rows > 0
    # The moved slots' traffic restarts at the owner: the old one forgets its rates.
    assert not src._slot_rates.rates()[moving].any()
    assert src._slot_rates.rates()[[s for s in range(NUM_SLOTS) if s not in moving]].all()
    _migrate(dst, ps_pb2.FINISH, moving)
    g = np.ones((len(frozen_ids), 4), np.float32)
    _push(dst, frozen_ids, g, 6)
    ref.apply_gradients(frozen_ids, g)

    # every row lives once, with the reference's weights, state and count
    want = _rows(ref)
    got = [_rows(s._tables["item"]) for s in (src, dst)]
    assert not set(got[0].ids.tolist()) & set(got[1].ids.tolist())
    ids_all = np.concatenate([b.ids for b in got])
    order = np.argsort(ids_all)
    np.testing.assert_array_equal(ids_all[order], want.ids)
    for f in ("weights", "state", "count"):
        merged = np.concatenate([getattr(b, f) for b in got])[order]
        np.testing.assert_allclose(merged, getattr(want, f), rtol=1e-6, atol=1e-6, err_msg=f)
    assert src._moving is False and dst._moving is False
    # The source dropped its old copy by the ids it sent, without a scan of the table.
    deletes = src.metrics.slot_deletes
    assert deletes.labels("sent")._value.get() == 1 and deletes.labels("scan")._value.get() == 0
    assert src._sent["item"].count == 0  # and forgot them
    src.close()
    dst.close()


def _move_all(
    src: PSServicer, dst: PSServicer, m: ShardMap, moving: list[int], after_copy: Any = None
) -> ShardMap:
    """BEGIN, full copy, ``after_copy()``, FREEZE, final delta, handover: up to FINISH."""
    _migrate(dst, ps_pb2.BEGIN_TARGET, moving)
    _migrate(src, ps_pb2.BEGIN_SOURCE, moving)
    _copy(src, dst, moving, delta=False)
    if after_copy is not None:
        after_copy()
    _migrate(src, ps_pb2.FREEZE, moving)
    _copy(src, dst, moving, delta=True)
    owner = m.slot_owner.copy()
    owner[moving] = 1
    new = m.replace(slot_owner=owner)
    _call(dst, "UpdateShardMap", new.to_proto())
    _call(src, "UpdateShardMap", new.to_proto())
    return new


def test_a_source_restarted_before_finish_scans_for_the_rows_to_drop(tmp_path: Path) -> None:
    src, dst, m = _two_shards(tmp_path)
    ids = np.arange(3000, dtype=np.int64)
    _push(src, ids, np.ones((len(ids), 4), np.float32), 1)
    moving = list(range(1, NUM_SLOTS, 2))
    _move_all(src, dst, m, moving)
    src.close()  # what it sent is forgotten with the process
    again = PSServicer(src.config, ServerMetrics(0))
    in_move = np.isin(slot_of("item", ids, NUM_SLOTS), moving)
    assert _migrate(again, ps_pb2.FINISH, moving).rows == int(in_move.sum())
    deletes = again.metrics.slot_deletes
    assert deletes.labels("scan")._value.get() == 1 and deletes.labels("sent")._value.get() == 0
    np.testing.assert_array_equal(_rows(again._tables["item"]).ids, ids[~in_move])
    again.close()
    dst.close()


def test_finish_by_sent_ids_drops_rows_created_during_the_copy(tmp_path: Path) -> None:
    """Rows that appear in moving slots after the full copy passed them (pushes and
    lookups that create rows) reach the target in a delta round, so the sent ids cover
    them; FINISH must leave none behind."""
    src, dst, m = _two_shards(tmp_path)
    ids = np.arange(2000, dtype=np.int64)
    _push(src, ids, np.ones((len(ids), 4), np.float32), 1)
    moving = list(range(0, NUM_SLOTS, 2))
    late = np.arange(5000, 5400, dtype=np.int64)

    def write_during_the_move() -> None:
        _push(src, late[:200], np.ones((200, 4), np.float32), 2)
        _lookup(src, late[200:])

    _move_all(src, dst, m, moving, after_copy=write_during_the_move)
    _migrate(src, ps_pb2.FINISH, moving)
    assert src.metrics.slot_deletes.labels("sent")._value.get() == 1
    left = _rows(src._tables["item"]).ids
    assert not np.isin(slot_of("item", left, NUM_SLOTS), moving).any()
    every = np.concatenate([ids, late])
    np.testing.assert_array_equal(
        left, np.sort(every[~np.isin(slot_of("item", every, NUM_SLOTS), moving)])
    )
    src.close()
    dst.close()


def _push_req(ids: np.ndarray, seq: int, grads: np.ndarray | None = None) -> Any:
    req = ps_pb2.PushRequest(client_id="c", seq=seq)
    g = np.ones((len(ids), 4), np.float32) if grads is None else grads
    add = req.tables.add
    add(table="item", ids=wire.encode_ids(ids), grads=wire.encode_rows(g, 1), dim=4, dtype=1)
    return req


def test_frozen_slots_survive_a_restart_and_abort_unfreezes(tmp_path: Path) -> None:
    src, dst, m = _two_shards(tmp_path)
    _migrate(src, ps_pb2.BEGIN_SOURCE, [1, 2])
    _migrate(src, ps_pb2.FREEZE, [1, 2])
    src.close()
    again = PSServicer(src.config, ServerMetrics(0))
    ids = np.arange(500, dtype=np.int64)
    frozen = ids[np.isin(slot_of("item", ids, NUM_SLOTS), [1, 2])][:3]
    assert _error(again, "Push", _push_req(frozen, 1))[1] == "SlotFrozenError"
    _migrate(again, ps_pb2.ABORT_SOURCE, [1, 2])
    assert _call(again, "Push", _push_req(frozen, 2)).applied_rows == 3
    # once handed over, a move cannot be aborted
    owner = m.slot_owner.copy()
    owner[[1, 2]] = 1
    _call(again, "UpdateShardMap", m.replace(slot_owner=owner).to_proto())
    req = ps_pb2.MigrateRequest(action=ps_pb2.ABORT_SOURCE, slots=[1])
    assert _error(again, "Migrate", req)[1] == "MigrationError"
    again.close()
    dst.close()


def test_migrate_rejects_bad_slots(tmp_path: Path) -> None:
    src, dst, _ = _two_shards(tmp_path)
    for slots in ([], [NUM_SLOTS]):
        req = ps_pb2.MigrateRequest(action=ps_pb2.BEGIN_SOURCE, slots=slots)
        assert _error(src, "Migrate", req)[0].name == "INVALID_ARGUMENT"
    src.close()
    dst.close()


# ---- the client around a handover (fake stubs, no sockets) ---------------------------------


def _fake_client(max_retries: int = 3) -> tuple[Any, list[Any]]:
    from tests.unit.test_ps_client_retry import _client

    return _client(2, max_retries=max_retries)


class _Frozen(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "slots frozen for a handover"

    def trailing_metadata(self) -> tuple:
        return ((PE.ERROR_TYPE_KEY, "SlotFrozenError"),)


def test_frozen_slots_are_waited_out_without_spending_retries() -> None:
    client, (s0, s1) = _fake_client(max_retries=2)
    ids = np.array([i for i in range(64) if client.shard_map.owners("t", np.array([i]))[0] == 0])
    s0.scripts["Push"] = [_Frozen()] * 8 + [ps_pb2.PushResponse(applied_rows=len(ids))]
    assert client.push({"t": (ids, np.ones((len(ids), 2), np.float32))}) == len(ids)
    seqs = {r.seq for r in s0.calls["Push"]}
    assert len(s0.calls["Push"]) == 9 and len(seqs) == 1  # one payload, one seq
    assert s1.calls.get("Push", []) == []


def test_a_push_of_unknown_outcome_is_resent_where_it_went(monkeypatch: Any) -> None:
    """Its first try timed out and the slots moved meanwhile: the retry still goes to the
    old owner with the same seq (it answers "duplicate"), never to the new owner."""
    from recps.ps import client as client_mod
    from tests.unit.test_ps_client_retry import _Error

    client, (s0, s1) = _fake_client()
    m = client.shard_map
    ids = np.array([i for i in range(64) if m.owners("t", np.array([i]))[0] == 0])
    moved = m.replace(slot_owner=np.ones(m.num_slots, np.uint16))  # all slots to shard 1

    class _Time:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(s: float) -> None:
            client._map = moved  # the map changes while the client backs off

    monkeypatch.setattr(client_mod, "time", _Time)
    timed_out = _Error(grpc.StatusCode.DEADLINE_EXCEEDED)
    s0.scripts["Push"] = [timed_out, ps_pb2.PushResponse(duplicate=True)]
    client.push({"t": (ids, np.ones((len(ids), 2), np.float32))})
    first, retry = s0.calls["Push"]
    assert retry.seq == first.seq and retry.shard_map_epoch == first.shard_map_epoch
    assert s1.calls.get("Push", []) == []
