"""Wire encoding/validation and the one RecpsError <-> gRPC status table."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from recps.embedding import errors as E
from recps.embedding.config import (
    AdmissionConfig,
    ExpiryConfig,
    InitializerConfig,
    OptimizerConfig,
    TableConfig,
)
from recps.proto import ps_pb2
from recps.ps import wire
from recps.ps.errors import EPOCH_KEY, ERROR_TYPE_KEY, code_of, from_rpc_error


@pytest.mark.parametrize(
    "cfg",
    [
        TableConfig("a", 8),
        TableConfig(
            "b.c-1",
            3,
            dtype="float16",
            initializer=InitializerConfig("normal", 0.5, seed=7),
            optimizer=OptimizerConfig("adam", lr=0.001, eps=0.0, weight_decay=0.1),
            admission=AdmissionConfig(min_count=3, sketch_width=1024, sketch_depth=2),
            expiry=ExpiryConfig(ttl_s=3600.0, sweep_interval_s=5.0),
            nonfinite="skip",
        ),
        TableConfig("f", 4, optimizer=OptimizerConfig("ftrl", lr=0.1, l1=0.01, l2=0.1)),
        TableConfig("z", 2, initializer=InitializerConfig("zeros", 0.0)),
    ],
)
def test_table_spec_round_trips(cfg: TableConfig) -> None:
    spec = wire.spec_from_config(cfg)
    again = ps_pb2.TableSpec.FromString(spec.SerializeToString())
    assert wire.config_from_spec(again) == cfg


def test_minimal_spec_takes_defaults() -> None:
    cfg = wire.config_from_spec(ps_pb2.TableSpec(name="t", dim=4))
    assert cfg == TableConfig("t", 4)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (ps_pb2.TableSpec(name="t"), "dim must be set"),
        (ps_pb2.TableSpec(name="bad name!", dim=4), "must match"),
        (ps_pb2.TableSpec(name="t", dim=4, dtype=9), "unknown storage dtype"),
        (
            ps_pb2.TableSpec(name="t", dim=4, optimizer=ps_pb2.OptimizerSpec(kind="lbfgs")),
            "unknown optimizer",
        ),
    ],
)
def test_bad_specs_raise_config_error(spec, needle) -> None:
    with pytest.raises(E.ConfigError, match=needle):
        wire.config_from_spec(spec)


def test_ids_and_rows_decode_with_precise_errors() -> None:
    ids = np.array([5, -7, 2**62], dtype=np.int64)
    assert np.array_equal(wire.decode_ids(wire.encode_ids(ids), "ids"), ids)
    with pytest.raises(E.InvalidArgumentError, match="13 bytes is not a multiple of 8"):
        wire.decode_ids(b"x" * 13, "table 't' ids")
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert np.array_equal(wire.decode_rows(rows.tobytes(), 3, 2, ps_pb2.FLOAT32, "g"), rows)
    half = wire.encode_rows(rows, ps_pb2.FLOAT16)
    assert len(half) == 12
    assert np.array_equal(wire.decode_rows(half, 3, 2, ps_pb2.FLOAT16, "g"), rows)
    with pytest.raises(E.InvalidArgumentError, match="20 bytes, expected 24"):
        wire.decode_rows(rows.tobytes()[:20], 3, 2, ps_pb2.FLOAT32, "g")
    with pytest.raises(E.InvalidArgumentError, match="unknown dtype code 7"):
        wire.decode_rows(rows.tobytes(), 3, 2, 7, "g")
    with pytest.raises(E.DimensionMismatchError, match="dim 3, table expects 2"):
        wire.check_dim(3, TableConfig("t", 2))


class _FakeRpcError(grpc.RpcError):
    """Stands in for a failed call's error object (code, details, trailing metadata)."""

    def __init__(self, code, details, md=()):
        self._c, self._d, self._md = code, details, md

    def code(self):
        return self._c

    def details(self):
        return self._d

    def trailing_metadata(self):
        return self._md


ALL_ERRORS = [
    E.InvalidArgumentError("x"),
    E.DtypeError("ids", "float64", "int64"),
    E.DimensionMismatchError("grads", 4, 8),
    E.LengthMismatchError(3, 2),
    E.NonFiniteGradientError("t", 2),
    E.UnknownTableError("t"),
    E.TableExistsError("t"),
    E.CapacityError("x"),
    E.BackPressureError(9, 8),
    E.StaleShardMapError("moved", 12),
    E.ShardUnavailableError("down"),
    E.StorageError("disk"),
    E.StoreClosedError("t"),
    E.CheckpointError("bad"),
    E.PermissionDeniedError("ro"),
    E.UnauthenticatedError("who"),
]


@pytest.mark.parametrize("err", ALL_ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_survives_the_wire(err: E.RecpsError) -> None:
    code = code_of(err)
    assert code.name == err.status
    md = [(ERROR_TYPE_KEY, type(err).__name__)]
    if isinstance(err, E.StaleShardMapError):
        md.append((EPOCH_KEY, str(err.epoch)))
    back = from_rpc_error(_FakeRpcError(code, str(err), tuple(md)), "shard 0")
    assert type(back) is type(err)
    assert str(err) in str(back) and str(back).startswith("shard 0: ")
    if isinstance(err, E.StaleShardMapError):
        assert back.epoch == 12


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAVAILABLE, E.ShardUnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, E.ShardUnavailableError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, E.BackPressureError),
        (grpc.StatusCode.UNAUTHENTICATED, E.UnauthenticatedError),
        (grpc.StatusCode.INTERNAL, E.RecpsError),
    ],
)
def test_plain_grpc_codes_map_to_a_recps_error(code, cls) -> None:
    back = from_rpc_error(_FakeRpcError(code, "from grpc"))
    assert type(back) is cls and "from grpc" in str(back)


@pytest.mark.parametrize(
    "details",
    ["Received message larger than max (1536191 vs. 1048576)", "Sent message larger than max"],
)
def test_grpcs_message_size_refusal_is_a_capacity_error_not_back_pressure(details) -> None:
    back = from_rpc_error(_FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details), "s0")
    assert type(back) is E.CapacityError
    assert str(back) == f"s0: {details}; split the batch"


@pytest.mark.parametrize(
    "entries",
    [
        [],
        [("a", np.zeros((0, 4), np.float32), 4, ps_pb2.FLOAT32)],
        [
            ("bench", np.arange(1500 * 64, dtype=np.float32).reshape(1500, 64), 64, 1),
            ("x", np.ones((3, 200), np.float32), 200, ps_pb2.FLOAT16),
            ("ünï", np.ones((2, 2), np.float64)[:, :1], 1, ps_pb2.DTYPE_UNSPECIFIED),
        ],
        # one-byte lengths, and a table whose size crosses to two bytes (124-byte rows)
        [
            ("", np.ones((1, 3), np.float32), 3, ps_pb2.FLOAT32),
            ("s", np.ones((5, 5), np.float32), 5, ps_pb2.FLOAT32),
            ("t", np.ones((31, 1), np.float32), 1, ps_pb2.FLOAT32),
            ("z", np.ones((2, 0), np.float32), 0, ps_pb2.FLOAT32),
        ],
    ],
)
def test_hand_encoded_lookup_response_is_protobufs_encoding(entries: list) -> None:
    want = ps_pb2.LookupResponse()
    for name, rows, dim, code in entries:
        want.tables.add(table=name, rows=wire.encode_rows(rows, code), dim=dim, dtype=code)
    assert wire.encode_lookup_response(entries) == want.SerializeToString()
