"""Restore RPC on real shard processes: a rollback to a checkpoint, and refusals that change
nothing (missing part, wrong shard, moved slots)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from ps_harness import Reference, ShardGroup

from recps.embedding import OptimizerConfig, TableConfig
from recps.embedding import errors as E
from recps.ps.routing import ShardMap

TABLES = [
    TableConfig("users", dim=8, optimizer=OptimizerConfig("adagrad", lr=0.1)),
    TableConfig("items", dim=4, optimizer=OptimizerConfig("adam", lr=0.01)),
]


def grads(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for t in TABLES:
        ids = rng.integers(-50, 50, 300)
        out[t.name] = (ids, rng.standard_normal((300, t.dim)).astype(np.float32))
    return out


def all_rows(client, ids: np.ndarray) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return client.lookup({t.name: ids for t in TABLES}, create_missing=False)


def test_restore_rolls_back_weights_state_and_tables(ps_group: ShardGroup, tmp_path: Path) -> None:
    cluster = ps_group.start(2)
    client = cluster.client()
    for t in TABLES:
        client.create_table(t)
    ref = Reference(TABLES)
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = grads(rng)
        client.push(g)
        ref.push(g)
    ckpt = str(tmp_path / "ckpt")
    client.checkpoint(ckpt, tag="step-3")
    probe = np.arange(-50, 50)
    before = all_rows(client, probe)

    # Diverge: more pushes, and a table created after the checkpoint.
    for _ in range(2):
        client.push(grads(rng))
    client.create_table(TableConfig("late", dim=2))
    assert not np.array_equal(all_rows(client, probe)["users"], before["users"])

    resp = client.restore(ckpt, "step-3")
    assert sorted(resp) == [0, 1]
    assert all(sorted(r.tables) == ["items", "users"] for r in resp.values())
    after = all_rows(client, probe)
    for t in TABLES:
        np.testing.assert_array_equal(after[t.name], before[t.name])
    assert sorted(t.name for t in client.list_tables()) == ["items", "users"]

    # Optimizer state came back too: the same next push gives the reference's rows.
    g = grads(rng)
    client.push(g, wait_durable=True)
    ref.push(g)
    got = all_rows(client, probe)
    want = ref.lookup({t.name: probe for t in TABLES}, create_missing=False)
    for t in TABLES:
        np.testing.assert_allclose(got[t.name], want[t.name], rtol=1e-6, atol=1e-7)

    # Survives a restart of a shard on its data directory.
    cluster.shards[0].restart()  # same port, same data directory
    client.wait_ready()
    np.testing.assert_array_equal(all_rows(client, probe)["users"], got["users"])


def test_restore_refusals_change_nothing(ps_group: ShardGroup, tmp_path: Path) -> None:
    cluster = ps_group.start(2)
    client = cluster.client()
    for t in TABLES:
        client.create_table(t)
    rng = np.random.default_rng(1)
    client.push(grads(rng))
    ckpt = tmp_path / "ckpt"
    client.checkpoint(str(ckpt), tag="a")
    client.push(grads(rng))
    probe = np.arange(-50, 50)
    current = all_rows(client, probe)

    with pytest.raises(E.CheckpointNotFoundError):
        client.restore(str(ckpt), "nope")

    # One shard's part missing: the dry run on every shard refuses before any rollback.
    shutil.rmtree(ckpt / "a" / "shard-1")
    with pytest.raises(E.CheckpointNotFoundError, match=r"shard-1"):
        client.restore(str(ckpt), "a")
    for t in TABLES:
        np.testing.assert_array_equal(all_rows(client, probe)[t.name], current[t.name])

    # Slots moved since the checkpoint: refused with FAILED_PRECONDITION.
    client.checkpoint(str(ckpt), tag="b")
    owner = client.shard_map.slot_owner.copy()
    owner[:10] = 1 - owner[:10]
    moved = ShardMap(
        client.shard_map.epoch + 1, client.shard_map.num_slots, dict(client.shard_map.shards), owner
    )
    client.install_shard_map(moved)
    with pytest.raises(E.CheckpointMismatchError, match="slots"):
        client.restore(str(ckpt), "b")
    with pytest.raises(E.InvalidArgumentError):
        client.restore(str(ckpt), "../b")
    # The server keeps serving.
    assert all_rows(client, probe)["users"].shape == (100, 8)
