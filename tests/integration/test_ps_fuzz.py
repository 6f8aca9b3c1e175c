"""Bad input gets a precise status and the shard keeps serving.

Hypothesis throws random and malformed requests at ONE live shard process (started once
for the module, with ``--max-message-mb 2``). After every example a valid lookup must still
work and the reference tables must hold exactly what a ``MemoryStore`` fed the setup holds:
a rejected push changes nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from ps_harness import Cluster, Reference, ShardGroup

from recps.embedding import OptimizerConfig, TableConfig
from recps.embedding import errors as E
from recps.proto import ps_pb2
from recps.ps import wire
from recps.ps.client import PSClient
from recps.ps.errors import ERROR_TYPE_KEY

C = grpc.StatusCode
MAX_MESSAGE_BYTES = 2 << 20
REF = TableConfig("ref", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1))
REF2 = TableConfig("ref2", dim=3, optimizer=OptimizerConfig("sgd", lr=0.5))
DIMS = {"ref": 4, "ref2": 3}
REF_IDS = np.arange(-32, 32, dtype=np.int64) * 7919
FLOAT_SIZE = {ps_pb2.DTYPE_UNSPECIFIED: 4, ps_pb2.FLOAT32: 4, ps_pb2.FLOAT16: 2}
I64 = np.iinfo(np.int64)


@dataclass
class Shard:
    cluster: Cluster
    ref: Reference
    snapshot: dict[str, np.ndarray]
    rows: dict[str, int]
    raw: dict[str, grpc.UnaryUnaryMultiCallable] = field(default_factory=dict)


def lookup_rows(cluster: Cluster, table: str, ids: np.ndarray) -> np.ndarray:
    resp = cluster.stub(0).Lookup(
        ps_pb2.LookupRequest(tables=[ps_pb2.TableIds(table=table, ids=ids.tobytes())]),
        timeout=30,
    )
    return np.frombuffer(resp.tables[0].rows, "<f4").reshape(len(ids), DIMS[table])


def stored_rows(cluster: Cluster) -> dict[str, int]:
    resp = cluster.stub(0).Stats(ps_pb2.StatsRequest(), timeout=30)
    return {t.table: t.rows_in_memory for t in resp.tables}


@pytest.fixture(scope="module")
def shard(ps_module_group: ShardGroup) -> Shard:
    cluster = ps_module_group.start(1, "--max-message-mb", "2", "--memory-mb", "16")
    ref = Reference([REF, REF2])
    rng = np.random.default_rng(0)
    with cluster.client() as client:
        for cfg in (REF, REF2):
            client.create_table(cfg)
        for _ in range(3):
            push = {
                t: (REF_IDS, rng.normal(size=(len(REF_IDS), d)).astype(np.float32))
                for t, d in DIMS.items()
            }
            client.push(push)
            ref.push(push)
    snapshot = {t: lookup_rows(cluster, t, REF_IDS) for t in DIMS}
    for t in DIMS:
        np.testing.assert_array_equal(snapshot[t], ref.stores[t].lookup(REF_IDS))
    ch = cluster.channel(0)
    raw = {
        m: ch.unary_unary(f"/recps.ps.v1.ParameterServer/{m}")  # bytes in, bytes out
        for m in ("Lookup", "Push", "Stats", "GetShardMap", "ListTables")
    }
    return Shard(cluster, ref, snapshot, stored_rows(cluster), raw)


# ---- strategies: (method, request or raw bytes, allowed codes, recps error class) --------

ids_st = st.lists(
    st.one_of(
        st.integers(I64.min, I64.max),
        st.sampled_from([int(i) for i in REF_IDS]),
        st.sampled_from([I64.min, I64.max, -1, 0]),
    ),
    max_size=40,
).map(lambda v: np.array(v, dtype=np.int64))
table_st = st.sampled_from(["ref", "ref2"])
dtype_st = st.sampled_from([ps_pb2.DTYPE_UNSPECIFIED, ps_pb2.FLOAT32, ps_pb2.FLOAT16])
unknown_table_st = st.text(max_size=20).filter(lambda s: s not in DIMS)


def grads_bytes(n: int, dim: int, dtype: int) -> bytes:
    dt = "<f2" if dtype == ps_pb2.FLOAT16 else "<f4"
    return np.linspace(-1, 1, n * dim).astype(dt).tobytes()


def valid_grads(table: str, ids: np.ndarray, dtype: int = ps_pb2.FLOAT32) -> ps_pb2.TableGrads:
    d = DIMS[table]
    return ps_pb2.TableGrads(
        table=table, ids=ids.tobytes(), grads=grads_bytes(len(ids), d, dtype), dim=d, dtype=dtype
    )


@st.composite
def bad_ids(draw):
    table = draw(table_st)
    n = draw(st.integers(0, 24)) * 8 + draw(st.integers(1, 7))
    raw = draw(st.binary(min_size=n, max_size=n))
    if draw(st.booleans()):
        req = ps_pb2.LookupRequest(tables=[ps_pb2.TableIds(table=table, ids=raw)])
        return "Lookup", req, {C.INVALID_ARGUMENT}, "InvalidArgumentError"
    t = ps_pb2.TableGrads(table=table, ids=raw, grads=draw(st.binary(max_size=64)))
    return "Push", ps_pb2.PushRequest(tables=[t]), {C.INVALID_ARGUMENT}, "InvalidArgumentError"


@st.composite
def bad_grads_length(draw):
    table, ids, dtype = draw(table_st), draw(ids_st), draw(dtype_st)
    want = len(ids) * DIMS[table] * FLOAT_SIZE[dtype]
    size = draw(st.integers(0, want + 64).filter(lambda n: n != want))
    t = ps_pb2.TableGrads(
        table=table,
        ids=ids.tobytes(),
        grads=draw(st.binary(min_size=size, max_size=size)),
        dim=draw(st.sampled_from([0, DIMS[table]])),
        dtype=dtype,
    )
    return "Push", ps_pb2.PushRequest(tables=[t]), {C.INVALID_ARGUMENT}, "InvalidArgumentError"


@st.composite
def wrong_dim(draw):
    table, ids = draw(table_st), draw(ids_st)
    dim = draw(st.integers(1, 2**32 - 1).filter(lambda d: d != DIMS[table]))
    # Grads sized for the claimed dim when that is small, so only the dim field is wrong.
    n_dim = dim if dim <= 64 else DIMS[table]
    t = ps_pb2.TableGrads(
        table=table, ids=ids.tobytes(), grads=grads_bytes(len(ids), n_dim, 1), dim=dim
    )
    return "Push", ps_pb2.PushRequest(tables=[t]), {C.INVALID_ARGUMENT}, "DimensionMismatchError"


@st.composite
def nonfinite_grads(draw):
    table = draw(table_st)
    ids = np.concatenate([draw(ids_st), [draw(st.integers(I64.min, I64.max))]]).astype(np.int64)
    dtype = draw(st.sampled_from([ps_pb2.FLOAT32, ps_pb2.FLOAT16]))
    d = DIMS[table]
    g = np.linspace(-1, 1, len(ids) * d).astype(np.float32)
    bad = draw(st.lists(st.integers(0, len(g) - 1), min_size=1, max_size=5))
    g[bad] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    dt = "<f2" if dtype == ps_pb2.FLOAT16 else "<f4"
    entry = ps_pb2.TableGrads(
        table=table, ids=ids.tobytes(), grads=g.astype(dt).tobytes(), dim=d, dtype=dtype
    )
    tables = [entry]
    if draw(st.booleans()):  # a valid entry for the other table: must not be applied either
        other = "ref2" if table == "ref" else "ref"
        tables.insert(draw(st.integers(0, 1)), valid_grads(other, REF_IDS[:8]))
    req = ps_pb2.PushRequest(
        tables=tables,
        client_id=draw(st.sampled_from(["", "fuzz"])),
        seq=draw(st.integers(0, 2**64 - 1)),
    )
    return "Push", req, {C.INVALID_ARGUMENT}, "NonFiniteGradientError"


@st.composite
def unknown_table(draw):
    name, ids = draw(unknown_table_st), draw(ids_st)
    if draw(st.booleans()):
        req = ps_pb2.LookupRequest(
            tables=[ps_pb2.TableIds(table="ref", ids=REF_IDS[:3].tobytes())]
            * draw(st.integers(0, 1))
            + [ps_pb2.TableIds(table=name, ids=ids.tobytes())],
            create_missing=draw(st.booleans()),
        )
        return "Lookup", req, {C.NOT_FOUND}, "UnknownTableError"
    bad = ps_pb2.TableGrads(table=name, ids=ids.tobytes(), grads=grads_bytes(len(ids), 4, 1))
    tables = [valid_grads("ref", REF_IDS[:5])] * draw(st.integers(0, 1)) + [bad]
    return "Push", ps_pb2.PushRequest(tables=tables), {C.NOT_FOUND}, "UnknownTableError"


@st.composite
def duplicate_table(draw):
    table, ids = draw(table_st), draw(ids_st)
    if draw(st.booleans()):
        entry = ps_pb2.TableIds(table=table, ids=ids.tobytes())
        req = ps_pb2.LookupRequest(tables=[entry, entry])
        return "Lookup", req, {C.INVALID_ARGUMENT}, "InvalidArgumentError"
    req = ps_pb2.PushRequest(tables=[valid_grads(table, ids), valid_grads(table, REF_IDS[:2])])
    return "Push", req, {C.INVALID_ARGUMENT}, "InvalidArgumentError"


@st.composite
def bad_dtype(draw):
    code = draw(st.integers(3, 2**31 - 1))
    table, ids = draw(table_st), draw(ids_st)
    if draw(st.booleans()):
        req = ps_pb2.LookupRequest(
            tables=[ps_pb2.TableIds(table=table, ids=ids.tobytes())], want_dtype=code
        )
        return "Lookup", req, {C.INVALID_ARGUMENT}, "InvalidArgumentError"
    t = valid_grads(table, ids)
    t.dtype = code
    return "Push", ps_pb2.PushRequest(tables=[t]), {C.INVALID_ARGUMENT}, "InvalidArgumentError"


@st.composite
def garbage(draw):
    """Random bytes as the whole request: not a message, or a message nobody meant."""
    method = draw(st.sampled_from(["Lookup", "Push", "Stats"]))
    data = draw(st.binary(max_size=300))
    cls = {"Lookup": ps_pb2.LookupRequest, "Push": ps_pb2.PushRequest}.get(
        method, ps_pb2.StatsRequest
    )
    try:
        msg = cls.FromString(data)
    except Exception:  # does not parse: gRPC answers INTERNAL
        return method, data, {C.INTERNAL, C.INVALID_ARGUMENT}, None
    # It parses: whatever it asks for must get an orderly answer. (A push that happens to
    # name a real table with valid payload is not garbage; such bytes are skipped.)
    names = {t.table for t in msg.tables} if method in ("Lookup", "Push") else set()
    assume(not names & set(DIMS))
    return method, data, {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND}, None


@st.composite
def oversized(draw):
    n = (MAX_MESSAGE_BYTES // 8) + draw(st.integers(1, 1 << 16))
    ids = np.zeros(n, dtype=np.int64).tobytes()
    if draw(st.booleans()):
        req = ps_pb2.LookupRequest(tables=[ps_pb2.TableIds(table="ref", ids=ids)])
        return "Lookup", req, {C.RESOURCE_EXHAUSTED}, None
    t = ps_pb2.TableGrads(table="ref", ids=ids, grads=b"")
    return "Push", ps_pb2.PushRequest(tables=[t]), {C.RESOURCE_EXHAUSTED}, None


@st.composite
def valid_lookup(draw):
    tables = draw(st.lists(table_st, min_size=1, max_size=2, unique=True))
    req = ps_pb2.LookupRequest(
        tables=[ps_pb2.TableIds(table=t, ids=draw(ids_st).tobytes()) for t in tables],
        want_dtype=draw(dtype_st),
    )
    return "Lookup", req, {C.OK}, None


CASES = {
    "bad_ids": bad_ids(),
    "bad_grads_length": bad_grads_length(),
    "wrong_dim": wrong_dim(),
    "nonfinite_grads": nonfinite_grads(),
    "unknown_table": unknown_table(),
    "duplicate_table": duplicate_table(),
    "bad_dtype": bad_dtype(),
    "garbage": garbage(),
    "valid_lookup": valid_lookup(),
    "oversized": oversized(),
}
# Pick the kind first, so every kind gets its share of the examples.
case_st = st.sampled_from(sorted(CASES)).flatmap(lambda k: CASES[k].map(lambda c: (k, *c)))


def check_valid_lookup(shard: Shard, req: ps_pb2.LookupRequest, resp: bytes) -> None:
    out = ps_pb2.LookupResponse.FromString(resp)
    assert [t.table for t in out.tables] == [t.table for t in req.tables]
    for asked, got in zip(req.tables, out.tables):
        ids = np.frombuffer(asked.ids, "<i8")
        want = shard.ref.stores[asked.table].lookup(ids.copy(), create_missing=False)
        dt = "<f2" if req.want_dtype == ps_pb2.FLOAT16 else "<f4"
        assert got.dim == DIMS[asked.table]
        rows = np.frombuffer(got.rows, dt).reshape(len(ids), got.dim)
        np.testing.assert_array_equal(rows, want.astype(dt))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=case_st)
def test_malformed_requests_get_precise_status(shard: Shard, case) -> None:
    kind, method, request, allowed, error_class = case
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    code, details, md, resp = C.OK, "", {}, b""
    try:
        resp = shard.raw[method](payload, timeout=30)
    except grpc.RpcError as e:
        code, details, md = e.code(), e.details(), dict(e.trailing_metadata() or ())
    event(f"{kind}: {method} -> {code.name}")
    assert code in allowed, f"{method}: got {code} {details!r}, expected one of {allowed}"
    if error_class is not None:
        assert md.get(ERROR_TYPE_KEY) == error_class, (md, details)
    if code == C.OK and method == "Lookup" and not isinstance(request, bytes):
        check_valid_lookup(shard, request, resp)
    # The shard still serves, and nothing a rejected request carried was applied.
    for t in DIMS:
        np.testing.assert_array_equal(lookup_rows(shard.cluster, t, REF_IDS), shard.snapshot[t])
    assert stored_rows(shard.cluster) == shard.rows


def test_nonfinite_push_with_seq_can_be_retried(shard: Shard) -> None:
    """A rejected push does not consume its (client_id, seq): fixed and resent, it applies."""
    stub = shard.cluster.stub(0)
    ids = np.array([10**15, -(10**15)], dtype=np.int64)
    g = np.ones((2, 4), np.float32)
    g[1, 2] = np.nan
    req = ps_pb2.PushRequest(
        client_id="retry-me",
        seq=1,
        tables=[ps_pb2.TableGrads(table="ref", ids=ids.tobytes(), grads=g.tobytes())],
    )
    with pytest.raises(grpc.RpcError) as ei:
        stub.Push(req, timeout=30)
    assert ei.value.code() == C.INVALID_ARGUMENT
    with PSClient(shard.cluster.shard_map, shard.cluster.client_config()) as client:
        with pytest.raises(E.NonFiniteGradientError):
            client.push({"ref": (ids, g)})
        np.testing.assert_array_equal(
            client.lookup({"ref": ids}, create_missing=False)["ref"],
            shard.ref.stores["ref"].lookup(ids, create_missing=False),
        )
        g[1, 2] = 0.5
        req.tables[0].grads = g.tobytes()
        resp = stub.Push(req, timeout=30)
        assert (resp.duplicate, resp.applied_rows) == (False, 2)
        shard.ref.push({"ref": (ids, g)})
        np.testing.assert_array_equal(
            client.lookup({"ref": ids}, create_missing=False)["ref"],
            shard.ref.stores["ref"].lookup(ids, create_missing=False),
        )
    shard.rows = stored_rows(shard.cluster)


# ---- back-pressure ------------------------------------------------------------------------


def _when_free(fn, *args, **kw):
    """Call ``fn`` until it is not refused for back-pressure (the server frees its one slot
    a moment after the previous caller saw its answer)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return fn(*args, **kw)
        except grpc.RpcError as e:
            if e.code() != C.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _wait_until(cond, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_back_pressure_refuses_fast_and_keeps_serving(ps_group: ShardGroup) -> None:
    cluster = ps_group.start(1, "--max-concurrent-rpcs", "1", "--max-workers", "4")
    cfg = TableConfig("bp", dim=16)
    ref = Reference([cfg])
    rng = np.random.default_rng(2)
    heavy = [rng.integers(I64.min, I64.max, 150_000, dtype=np.int64) for _ in range(12)]
    stub = cluster.stub(0)
    spec = ps_pb2.CreateTableRequest(spec=wire.spec_from_config(cfg))
    _when_free(stub.CreateTable, spec, timeout=30)
    _when_free(stub.GetShardMap, ps_pb2.GetShardMapRequest(), timeout=30)  # connection is up
    t0 = time.monotonic()
    finished: dict[int, float] = {}
    futures = []
    for k, ids in enumerate(heavy):
        f = stub.Lookup.future(
            ps_pb2.LookupRequest(tables=[ps_pb2.TableIds(table="bp", ids=ids.tobytes())]),
            timeout=60,
        )
        f.add_done_callback(lambda _, k=k: finished.setdefault(k, time.monotonic() - t0))
        futures.append(f)
    done: list[tuple[grpc.StatusCode, float]] = []
    for k, (ids, f) in enumerate(zip(heavy, futures)):
        try:
            resp = f.result(timeout=60)  # none hangs
            rows = np.frombuffer(resp.tables[0].rows, "<f4").reshape(-1, 16)
            np.testing.assert_array_equal(rows[:50], ref.stores["bp"].lookup(ids[:50], False))
            code = C.OK
        except grpc.RpcError as e:
            code = e.code()
            assert code == C.RESOURCE_EXHAUSTED, e
        _wait_until(lambda k=k: k in finished)
        done.append((code, finished[k]))
    codes = [c for c, _ in done]
    assert C.OK in codes and C.RESOURCE_EXHAUSTED in codes, codes
    # Refusals come back at once, not after queueing behind the heavy lookups.
    refused = [t for c, t in done if c == C.RESOURCE_EXHAUSTED]
    served = [t for c, t in done if c == C.OK]
    assert min(refused) < max(served)

    # Through PSClient: without retries the refusal is a typed BackPressureError; with
    # retries every caller gets its rows.
    results: dict[int, object] = {}
    barrier = threading.Barrier(6)

    def call(k: int, retries: int) -> None:
        config = cluster.client_config(
            max_retries=retries, backoff_initial_s=0.05, backoff_max_s=0.2
        )
        with PSClient(cluster.shard_map, config) as client:
            barrier.wait(timeout=30)
            try:
                results[k] = client.lookup({"bp": heavy[k][:60_000]}, create_missing=False)
            except E.RecpsError as e:
                results[k] = e

    for retries in (0, 100):
        results.clear()
        threads = [threading.Thread(target=call, args=(k, retries)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        errors = [r for r in results.values() if isinstance(r, Exception)]
        assert all(isinstance(e, E.BackPressureError) for e in errors), errors
        if retries:
            assert not errors
            for k, r in results.items():
                want = ref.stores["bp"].lookup(heavy[k][:60_000], create_missing=False)
                np.testing.assert_array_equal(r["bp"], want)
        else:
            assert 0 < len(errors) < 6, errors
    # Still serving.
    ids = np.arange(10, dtype=np.int64)
    req = ps_pb2.LookupRequest(tables=[ps_pb2.TableIds(table="bp", ids=ids.tobytes())])
    resp = _when_free(stub.Lookup, req, timeout=30)
    assert len(resp.tables[0].rows) == 10 * 16 * 4
