"""PSClient's control-plane calls against fake stubs: which codes are retried, and how.

The data plane (lookup/push) retries UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED;
control-plane calls (CreateTable, ListTables, Stats, Checkpoint, Restore, GetShardMap)
retry UNAVAILABLE and RESOURCE_EXHAUSTED, only on the shards that failed, within the
call's deadline. Not DEADLINE_EXCEEDED: the call may still be running on the shard.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import numpy as np
import pytest

from recps.embedding import errors as E
from recps.embedding.config import TableConfig
from recps.proto import ps_pb2
from recps.ps.client import PSClient
from recps.ps.config import ClientConfig
from recps.ps.routing import ShardMap

C = grpc.StatusCode


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"fake {self._code.name}"

    def trailing_metadata(self) -> tuple:
        return ()


class _Future:
    def __init__(self, outcome: Any) -> None:
        self._outcome = outcome

    def result(self) -> Any:
        if isinstance(self._outcome, grpc.RpcError):
            raise self._outcome
        return self._outcome


class _Method:
    """One RPC of one fake shard: answers from a script of outcomes, records requests."""

    def __init__(self, script: list[Any], calls: list[Any]) -> None:
        self.script, self.calls = script, calls

    def _next(self, request: Any) -> Any:
        self.calls.append(request)
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def future(self, request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
        return _Future(self._next(request))

    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
        out = self._next(request)
        if isinstance(out, grpc.RpcError):
            raise out
        return out


class _Stub:
    def __init__(self) -> None:
        self.scripts: dict[str, list[Any]] = {}
        self.calls: dict[str, list[Any]] = {}

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_") or name in ("scripts", "calls"):
            raise AttributeError(name)
        return _Method(self.scripts.setdefault(name, [None]), self.calls.setdefault(name, []))


def _client(n_shards: int = 2, **cfg: Any) -> tuple[PSClient, list[_Stub]]:
    m = ShardMap.even([f"shard{i}:1" for i in range(n_shards)], num_slots=16)
    config = ClientConfig(backoff_initial_s=0.001, backoff_max_s=0.005, **cfg)
    client = PSClient(m, config)
    stubs = [_Stub() for _ in range(n_shards)]
    for s in stubs:  # shards know the client's map (checkpoint and restore refresh it)
        s.scripts["GetShardMap"] = [m.to_proto()]
    client._stub = lambda addr: stubs[int(addr[5:-2])]  # type: ignore[method-assign]
    return client, stubs


@pytest.mark.parametrize("code", [C.UNAVAILABLE, C.RESOURCE_EXHAUSTED])
def test_control_plane_retries_only_the_failed_shard(code: grpc.StatusCode) -> None:
    client, (s0, s1) = _client()
    stats = ps_pb2.StatsResponse(shard_id=1)
    s0.scripts["Stats"] = [ps_pb2.StatsResponse(shard_id=0)]
    s1.scripts["Stats"] = [_Error(code), _Error(code), stats]
    out = client.stats()
    assert out[1].shard_id == 1 and out[0].shard_id == 0
    assert (len(s0.calls["Stats"]), len(s1.calls["Stats"])) == (1, 3)


@pytest.mark.parametrize("code", [C.DEADLINE_EXCEEDED, C.INVALID_ARGUMENT, C.INTERNAL])
def test_control_plane_does_not_retry_other_codes(code: grpc.StatusCode) -> None:
    client, (s0, _) = _client()
    s0.scripts["ListTables"] = [_Error(code), ps_pb2.ListTablesResponse()]
    with pytest.raises(E.RecpsError):
        client.list_tables()
    assert len(s0.calls["ListTables"]) == 1


def test_control_plane_gives_up_after_max_retries() -> None:
    client, (s0, _) = _client(max_retries=3)
    s0.scripts["Stats"] = [_Error(C.UNAVAILABLE)]
    with pytest.raises(E.ShardUnavailableError):
        client.stats()
    assert len(s0.calls["Stats"]) == 4


def test_control_plane_retries_stay_within_the_deadline() -> None:
    client, (s0, _) = _client(max_retries=1000, timeout_s=0.3)
    s0.scripts["Stats"] = [_Error(C.UNAVAILABLE)]
    t0 = time.monotonic()
    with pytest.raises(E.ShardUnavailableError):
        client.stats()
    assert time.monotonic() - t0 < 1.0


def test_create_table_retry_accepts_the_table_its_first_try_made() -> None:
    client, (s0, s1) = _client()
    s1.scripts["CreateTable"] = [_Error(C.UNAVAILABLE), ps_pb2.CreateTableResponse()]
    client.create_table(TableConfig("t", 4), if_not_exists=False)
    first, retry = s1.calls["CreateTable"]
    assert not first.if_not_exists and retry.if_not_exists
    assert not s0.calls["CreateTable"][0].if_not_exists


def test_checkpoint_retry_reuses_its_request_id() -> None:
    client, (s0, s1) = _client()
    s0.scripts["Checkpoint"] = [_Error(C.UNAVAILABLE), ps_pb2.CheckpointResponse(path="p0")]
    s1.scripts["Checkpoint"] = [ps_pb2.CheckpointResponse(path="p1")]
    out = client.checkpoint("/ckpt", "tag1")
    assert (out[0].path, out[1].path) == ("p0", "p1")
    reqs = s0.calls["Checkpoint"] + s1.calls["Checkpoint"]
    assert len(reqs) == 3 and len({r.request_id for r in reqs}) == 1 and reqs[0].request_id
    assert {r.tag for r in reqs} == {"tag1"}
    # Another checkpoint call is another request: a new id.
    client.checkpoint("/ckpt", "tag2")
    assert s1.calls["Checkpoint"][-1].request_id != reqs[0].request_id


def test_restore_retries_dry_run_and_restore() -> None:
    client, (s0, _) = _client()
    s0.scripts["Restore"] = [
        _Error(C.UNAVAILABLE),
        ps_pb2.RestoreResponse(),
        _Error(C.RESOURCE_EXHAUSTED),
        ps_pb2.RestoreResponse(path="done"),
    ]
    assert client.restore("/ckpt", "t")[0].path == "done"
    assert [r.dry_run for r in s0.calls["Restore"]] == [True, True, False, False]


def test_one_shard_lookup_is_one_blocking_call_without_routing() -> None:
    client, (s0,) = _client(n_shards=1)
    ids = np.array([7, 3, 7, 100], dtype=np.int64)
    uniq = np.unique(ids)
    rows = np.arange(len(uniq) * 2, dtype=np.float32).reshape(-1, 2)
    resp = ps_pb2.LookupResponse()
    resp.tables.add(table="t", rows=rows.tobytes(), dim=2, dtype=ps_pb2.FLOAT32)
    s0.scripts["Lookup"] = [resp]
    got = client.lookup({"t": ids})["t"]
    np.testing.assert_array_equal(got, rows[np.searchsorted(uniq, ids)])
    (req,) = s0.calls["Lookup"]
    np.testing.assert_array_equal(np.frombuffer(req.tables[0].ids, "<i8"), uniq)
    got[0, 0] = -1  # the caller owns the result
    # assume_unique: sent as given, answered in the same order, writable
    s0.scripts["Lookup"] = [resp]
    ids = np.array([100, 3, 7], dtype=np.int64)
    got = client.lookup({"t": ids}, assume_unique=True)["t"]
    np.testing.assert_array_equal(np.frombuffer(s0.calls["Lookup"][-1].tables[0].ids, "<i8"), ids)
    np.testing.assert_array_equal(got, rows)
    got[0, 0] = -1


class _Replica:
    """A fake full serving replica: answers every id it is sent with rows [id, -id]."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.Lookup = _Method([], [])  # blocking and future calls, answered by _answer
        self.Lookup._next = self._answer  # type: ignore[method-assign]

    def _answer(self, request: Any) -> Any:
        self.requests.append(request)
        resp = ps_pb2.LookupResponse()
        for t in request.tables:
            ids = np.frombuffer(t.ids, "<i8").astype(np.float32)
            rows = np.stack([ids, -ids], axis=1)
            resp.tables.add(table=t.table, rows=rows.tobytes(), dim=2, dtype=ps_pb2.FLOAT32)
        return resp


def test_shards_at_one_address_get_one_request() -> None:
    """A replica holding both shards of a model: one RPC carries every id, so one model
    version answers all of it (two RPCs could straddle a hot swap)."""
    m = ShardMap.even(["replica:1", "replica:1"], num_slots=16)
    client = PSClient(m, ClientConfig())
    replica = _Replica()
    client._stub = lambda addr: replica  # type: ignore[method-assign]
    ids = np.arange(-50, 50, dtype=np.int64)
    owners = m.owners("t", ids)
    assert len(set(owners.tolist())) == 2  # the ids span both shards
    got = client.lookup({"t": ids, "u": ids[:7]})
    assert len(replica.requests) == 1
    (req,) = replica.requests
    assert sorted(t.table for t in req.tables) == ["t", "u"]  # one entry a table
    sent = np.frombuffer(next(t.ids for t in req.tables if t.table == "t"), "<i8")
    assert sorted(sent.tolist()) == ids.tolist()
    np.testing.assert_array_equal(got["t"], np.stack([ids, -ids], axis=1).astype(np.float32))
    np.testing.assert_array_equal(got["u"][:, 0], ids[:7].astype(np.float32))
    # Distinct addresses (a training cluster): one request per shard, as before.
    two = PSClient(ShardMap.even(["a:1", "b:1"], num_slots=16), ClientConfig())
    replicas = {"a:1": _Replica(), "b:1": _Replica()}
    two._stub = lambda addr: replicas[addr]  # type: ignore[method-assign]
    np.testing.assert_array_equal(two.lookup({"t": ids})["t"][:, 1], -ids.astype(np.float32))
    assert [len(r.requests) for r in replicas.values()] == [1, 1]
