"""A push larger than a table's hot tier takes at once is applied in several WriteBatches.
A kill -9 between two of them must still leave it exactly-once: the retry applies only
the ids the crash left undone.

A real SIGKILL, sent by the shard process to itself right before the write of its second
chunk (the only hook: a wrapper around the table's RocksDB write), then a new servicer on
the same directory and the client's retry with the same (client, seq).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from recps.embedding import MemoryStore, OptimizerConfig, TableConfig
from recps.proto import ps_pb2
from recps.ps import wire
from recps.ps.config import ServerConfig
from recps.ps.metrics import ServerMetrics
from recps.ps.server import PSServicer
from tests.conftest import tiered_config
from tests.unit.test_slot_stats import _call

TABLE = TableConfig("item", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1))
N_IDS = 3000  # several chunks of the tiny hot tier (tiered_config: 64 KiB)

# The child: the same shard, a first push (seq 1), then push seq 2 with a SIGKILL right
# before the second WriteBatch of rows it writes (its second chunk).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from recps.embedding.rocks import RocksTable
    from tests.integration.test_push_chunks_kill9 import N_IDS, grads, push_request, shard

    s = shard(sys.argv[1])
    store = s._tables["item"]
    assert store._chunk < N_IDS // 2, store._chunk  # at least three chunks
    ids = np.arange(N_IDS, dtype=np.int64)
    _call = __import__("tests.unit.test_slot_stats", fromlist=["_call"])._call
    _call(s, "Push", push_request(ids[::7], grads(len(ids[::7]), 1), 1))
    writes = []
    write = RocksTable.write

    def killing_write(self, keys=(), *a, **kw):
        if len(keys):  # a WriteBatch of rows: the push's chunks (sync: nothing is dirty)
            writes.append(len(keys))
            if len(writes) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return write(self, keys, *a, **kw)

    RocksTable.write = killing_write
    _call(s, "Push", push_request(ids[::-1], grads(N_IDS, 2), 2))  # unsorted: the store sorts
    print("not killed", flush=True)
    """
)


def shard(path: str | Path) -> PSServicer:
    cfg = ServerConfig(data_dir=str(path), store=tiered_config(durability="sync"))
    s = PSServicer(cfg, ServerMetrics(0))
    spec = wire.spec_from_config(TABLE)
    _call(s, "CreateTable", ps_pb2.CreateTableRequest(spec=spec, if_not_exists=True))
    return s


def grads(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def push_request(ids: np.ndarray, g: np.ndarray, seq: int) -> ps_pb2.PushRequest:
    req = ps_pb2.PushRequest(client_id="w", seq=seq)
    req.tables.add(table="item", ids=wire.encode_ids(ids), grads=wire.encode_rows(g, 1), dim=4)
    return req


def test_a_push_killed_between_its_chunks_is_applied_once_on_retry(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr

    ids = np.arange(N_IDS, dtype=np.int64)
    ref = MemoryStore(TABLE)
    ref.apply_gradients(ids[::7], grads(len(ids[::7]), 1))
    ref.apply_gradients(ids[::-1], grads(N_IDS, 2))

    s = shard(tmp_path)
    upto = s._dedup.applied_upto("w", 2)
    # The first chunk (the lowest ids) was durable, with its mark; nothing after it.
    assert set(upto) == {"item"} and 0 < upto["item"] < N_IDS - 1
    assert s._dedup.applied_tables("w", 2) == frozenset()
    resp = _call(s, "Push", push_request(ids[::-1], grads(N_IDS, 2), 2))  # the retry
    assert not resp.duplicate and resp.applied_rows == N_IDS - 1 - upto["item"]
    again = _call(s, "Push", push_request(ids[::-1], grads(N_IDS, 2), 2))
    assert again.duplicate and again.applied_rows == 0

    req = ps_pb2.LookupRequest(tables=[ps_pb2.TableIds(table="item", ids=wire.encode_ids(ids))])
    resp = ps_pb2.LookupResponse.FromString(_call(s, "Lookup", req))
    got = wire.decode_rows(resp.tables[0].rows, N_IDS, 4, resp.tables[0].dtype, "rows")
    np.testing.assert_allclose(got, ref.lookup(ids), rtol=1e-6, atol=1e-7)
    s.close()
