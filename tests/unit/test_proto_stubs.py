"""The committed gRPC stubs of proto/ps.proto: fresh, importable as recps.proto, wire-sane."""

from __future__ import annotations

import inspect
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from recps.proto import gen, ps_pb2, ps_pb2_grpc


def _descriptor_proto(message_name: str) -> descriptor_pb2.DescriptorProto:
    out = descriptor_pb2.DescriptorProto()
    ps_pb2.DESCRIPTOR.message_types_by_name[message_name].CopyToProto(out)
    return out


def test_committed_stubs_are_not_stale():
    stale = gen.stale_files()
    assert stale == [], f"stale stubs {stale}: run `python proto/gen.py`"


def test_gen_writes_the_three_stubs(tmp_path):
    written = gen.generate(tmp_path)
    assert sorted(p.name for p in written) == ["ps_pb2.py", "ps_pb2.pyi", "ps_pb2_grpc.py"]
    assert all(p.parent == tmp_path and p.stat().st_size > 0 for p in written)


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


def test_grpc_module_imports_package_qualified_pb2():
    source = inspect.getsource(ps_pb2_grpc)
    assert "from recps.proto import ps_pb2" in source
    assert "\nimport ps_pb2" not in source
    assert ps_pb2.DESCRIPTOR.name == "recps/proto/ps.proto"
    assert ps_pb2.DESCRIPTOR.package == "recps.ps.v1"


def test_retired_push_field_is_reserved():
    push = _descriptor_proto("PushRequest")
    assert "durability" in push.reserved_name
    assert any(r.start <= 5 < r.end for r in push.reserved_range)
    live_numbers = {f.number for f in push.field}
    assert not any(r.start <= n < r.end for r in push.reserved_range for n in live_numbers)


def test_bulk_data_is_bytes_never_repeated_float():
    float_types = {descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT}
    float_types.add(descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE)
    for name in ps_pb2.DESCRIPTOR.message_types_by_name:
        for field in _descriptor_proto(name).field:
            repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            assert not (repeated and field.type in float_types), f"{name}.{field.name}"


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
