"""The committed gRPC stubs of proto/ps.proto and proto/serving.proto: fresh, importable as
recps.proto, wire-sane."""

from __future__ import annotations

import inspect
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from recps.proto import (
    gen,
    ps_pb2,
    ps_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
    serving_pb2,
    serving_pb2_grpc,
)

# Repeated floats that are not bulk data: one value per candidate of a ranking request
# (~100), packed on the wire anyway.
# One score per candidate, and raw dense feature values of one request's candidates (a
# packed column of at most a few thousand numbers): not embedding rows.
# A shard's per-slot request rates: control plane, one number per owned slot (packed,
# beside the uint64 per-slot counts), asked for by `recps status` and the planner.
_SMALL_FLOAT_LISTS = {
    "ranking": ("PredictResponse.scores", "Column.float_values"),
    "ps": ("StatsResponse.slot_qps",),
}

# proto file stem -> (messages module, gRPC module, proto package)
_MODULES = {
    "ps": (ps_pb2, ps_pb2_grpc, "recps.ps.v1"),
    "serving": (serving_pb2, serving_pb2_grpc, "recps.serving.v1"),
    "ranking": (ranking_pb2, ranking_pb2_grpc, "recps.serving.v1"),
}


def _descriptor_proto(message_name: str, pb2=ps_pb2) -> descriptor_pb2.DescriptorProto:
    out = descriptor_pb2.DescriptorProto()
    pb2.DESCRIPTOR.message_types_by_name[message_name].CopyToProto(out)
    return out


def test_committed_stubs_are_not_stale():
    stale = gen.stale_files()
    assert stale == [], f"stale stubs {stale}: run `python proto/gen.py`"


def test_gen_writes_three_stubs_per_proto(tmp_path):
    written = gen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        f"{stem}{suffix}" for stem in _MODULES for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    )
    assert all(p.parent == tmp_path and p.stat().st_size > 0 for p in written)


def test_every_proto_in_the_folder_is_generated_and_tested():
    on_disk = sorted(p.name for p in gen.PROTO_DIR.glob("*.proto"))
    assert sorted(gen.PROTO_FILES) == on_disk, "add the new .proto to gen.PROTO_FILES"
    assert sorted(f"{stem}.proto" for stem in _MODULES) == on_disk, "and to _MODULES here"


def test_lookup_request_round_trip():
    ids = np.arange(5, dtype="<i8")
    req = ps_pb2.LookupRequest(
        shard_map_epoch=7,
        tables=[ps_pb2.TableIds(table="user_id", ids=ids.tobytes())],
        create_missing=True,
        want_dtype=ps_pb2.FLOAT16,
    )
    back = ps_pb2.LookupRequest.FromString(req.SerializeToString())
    assert back == req
    assert back.shard_map_epoch == 7
    assert back.create_missing is True
    assert back.want_dtype == ps_pb2.FLOAT16
    assert back.tables[0].table == "user_id"
    np.testing.assert_array_equal(np.frombuffer(back.tables[0].ids, dtype="<i8"), ids)


@pytest.mark.parametrize("name", sorted(_MODULES))
def test_grpc_module_imports_package_qualified_pb2(name):
    pb2, pb2_grpc, package = _MODULES[name]
    source = inspect.getsource(pb2_grpc)
    assert f"from recps.proto import {name}_pb2" in source
    assert f"\nimport {name}_pb2" not in source
    assert pb2.DESCRIPTOR.name == f"recps/proto/{name}.proto"
    assert pb2.DESCRIPTOR.package == package


def test_retired_push_field_is_reserved():
    push = _descriptor_proto("PushRequest")
    assert "durability" in push.reserved_name
    assert any(r.start <= 5 < r.end for r in push.reserved_range)
    live_numbers = {f.number for f in push.field}
    assert not any(r.start <= n < r.end for r in push.reserved_range for n in live_numbers)


@pytest.mark.parametrize("name", sorted(_MODULES))
def test_bulk_data_is_bytes_never_repeated_float(name):
    pb2 = _MODULES[name][0]
    float_types = {descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT}
    float_types.add(descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE)
    for msg in pb2.DESCRIPTOR.message_types_by_name:
        for field in _descriptor_proto(msg, pb2).field:
            repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            where = f"{msg}.{field.name}"
            if where in _SMALL_FLOAT_LISTS.get(name, ()):
                continue
            assert not (repeated and field.type in float_types), where


def test_services_and_rpcs():
    ps = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
    assert set(ps.methods_by_name) == {
        "Lookup",
        "Push",
        "CreateTable",
        "ListTables",
        "Stats",
        "Checkpoint",
        "Restore",
        "GetShardMap",
        "UpdateShardMap",
        "Migrate",
        "ReadSlotRows",
        "WriteSlotRows",
    }
    for m in ps.methods:
        if m.name == "UpdateShardMap":  # the map is the resource: it goes in and comes back
            assert m.input_type.name == m.output_type.name == "ShardMap"
            continue
        assert m.input_type.name.endswith("Request"), m.name
        want = "ShardMap" if m.name == "GetShardMap" else f"{m.name}Response"
        assert m.output_type.name == want, m.name
    assert ps.full_name == "recps.ps.v1.ParameterServer"
    assert set(ps_pb2.DESCRIPTOR.services_by_name["Echo"].methods_by_name) == {"Echo"}


def test_serving_admin_service():
    admin = serving_pb2.DESCRIPTOR.services_by_name["ServingAdmin"]
    assert admin.full_name == "recps.serving.v1.ServingAdmin"
    assert set(admin.methods_by_name) == {"LoadVersion", "Rollback", "Status"}
    for m in admin.methods:
        assert m.input_type.name == f"{m.name}Request", m.name
        assert m.output_type.name == f"{m.name}Response", m.name


def test_load_version_distinguishes_latest_from_version_zero():
    latest = serving_pb2.LoadVersionRequest()
    zero = serving_pb2.LoadVersionRequest(version=0)
    assert not latest.HasField("version")
    back = serving_pb2.LoadVersionRequest.FromString(zero.SerializeToString())
    assert back.HasField("version") and back.version == 0


class _Echo(ps_pb2_grpc.EchoServicer):
    def Echo(self, request, context):
        return ps_pb2.EchoResponse(payload=request.payload)


@pytest.fixture
def echo_channel():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ps_pb2_grpc.add_EchoServicer_to_server(_Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(grace=None)


def test_echo_over_grpc(echo_channel):
    payload = np.arange(1024, dtype="<f4").tobytes()
    reply = ps_pb2_grpc.EchoStub(echo_channel).Echo(ps_pb2.EchoRequest(payload=payload), timeout=10)
    assert reply.payload == payload
