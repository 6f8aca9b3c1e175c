"""Client/server gaps closed after the first release, on real shard processes:

* an empty lookup returns ``(0, dim)`` even from a client that never saw the table;
* control-plane calls ride out a shard restart (UNAVAILABLE is retried);
* a retried Checkpoint that had completed answers as the first try did (request_id),
  while any other reuse of a tag is still refused;
* a lookup whose response is past the client's message limit is a CapacityError at
  once, not retried as back pressure.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from ps_harness import ShardGroup

from recps.embedding import TableConfig
from recps.embedding import errors as E
from recps.proto import ps_pb2


def test_empty_lookup_has_the_tables_dim(ps_group: ShardGroup) -> None:
    cluster = ps_group.start(2)
    with cluster.client() as maker:
        maker.create_table(TableConfig("e", dim=8))
        maker.create_table(TableConfig("g", dim=3))
    with cluster.client() as fresh:  # has never seen table "e"
        got = fresh.lookup({"e": np.array([], dtype=np.int64)})["e"]
        assert got.shape == (0, 8) and got.dtype == np.float32
    with cluster.client() as fresh:  # one table empty, the other not
        got = fresh.lookup({"e": np.array([], dtype=np.int64), "g": np.arange(3)}, False)
        assert got["e"].shape == (0, 8)


def test_empty_lookup_of_unknown_table_raises(ps_group: ShardGroup) -> None:
    cluster = ps_group.start(1)
    with cluster.client() as client, pytest.raises(E.UnknownTableError):
        client.lookup({"nope": np.array([], dtype=np.int64)})


def test_control_plane_rides_out_a_restart(ps_group: ShardGroup) -> None:
    cluster = ps_group.start(2)
    with cluster.client(max_retries=60, backoff_max_s=0.5) as client:
        client.create_table(TableConfig("r", dim=4))
        shard = cluster.shards[1]
        assert shard.stop() == 0
        restarter = threading.Timer(0.5, shard.restart)
        restarter.start()
        try:
            stats = client.stats()  # UNAVAILABLE from shard 1 until it is back
        finally:
            restarter.join()
        assert sorted(stats) == [0, 1]
        assert [t.name for t in client.list_tables()] == ["r"]


def test_checkpoint_retry_with_the_same_request_id_is_answered(
    ps_group: ShardGroup, tmp_path: Path
) -> None:
    cluster = ps_group.start(1)
    with cluster.client() as client:
        client.create_table(TableConfig("c", dim=4))
        client.lookup({"c": np.arange(10)})
    stub = cluster.stub(0)
    req = ps_pb2.CheckpointRequest(dir=str(tmp_path), tag="t1", request_id="req-1")
    first = stub.Checkpoint(req, timeout=60)
    again = stub.Checkpoint(req, timeout=60)  # the retry of a call whose answer was lost
    assert (again.path, again.rows, list(again.tables)) == (first.path, first.rows, ["c"])
    for other in ("req-2", ""):  # anyone else reusing the tag is refused, as before
        with pytest.raises(grpc.RpcError) as e:
            stub.Checkpoint(
                ps_pb2.CheckpointRequest(dir=str(tmp_path), tag="t1", request_id=other),
                timeout=60,
            )
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "already exists" in e.value.details()


def test_a_response_too_big_for_the_client_is_a_capacity_error_without_retries(
    ps_group: ShardGroup,
) -> None:
    cluster = ps_group.start(1)
    with cluster.client() as maker:
        maker.create_table(TableConfig("big", dim=16))
    # 1 MiB receive limit; 20,000 rows of 64 B come back as ~1.3 MB. Retries as back
    # pressure (5, from 0.5 s) would take seconds; a CapacityError comes at once.
    with cluster.client(
        max_message_bytes=1 << 20, max_retries=5, backoff_initial_s=0.5, backoff_max_s=1.0
    ) as client:
        t0 = time.monotonic()
        with pytest.raises(E.CapacityError, match=r"larger than max.*split the batch"):
            client.lookup({"big": np.arange(20_000)}, create_missing=False)
        assert time.monotonic() - t0 < 0.5
        assert client.lookup({"big": np.arange(1000)})["big"].shape == (1000, 16)
