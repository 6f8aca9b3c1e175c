"""The shard-map authority on real files and real processes: it survives a kill -9 of
the process holding it, refuses a second holder, and publishes what it decides."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recps.embedding.errors import ConfigError
from recps.ps.coordinator import Coordinator, CoordinatorBusyError
from recps.ps.routing import ShardMap

_HOLDER = """
import os, signal, sys
from recps.ps.coordinator import Coordinator
from recps.ps.routing import ShardMap
c = Coordinator.open(sys.argv[1], initial=ShardMap.even(["a:1", "b:2"], 64))
c.begin_move("m1", 0, 1, [0, 1, 2])
c.decide("m1")
c.begin_move("m2", 0, 1, [3])
print("ready", flush=True)
sys.stdin.readline()  # hold the role until killed
"""


def _holder(root: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_state_survives_kill_9_and_the_lock_goes_with_the_process(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(CoordinatorBusyError, match="another process"):
            Coordinator.open(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    with Coordinator.open(tmp_path) as c:  # the kill released the lock
        m = c.shard_map
        assert m.epoch == 2
        assert m.slot_owner[:4].tolist() == [1, 1, 1, 0]
        states = {k: v["state"] for k, v in c.state().moves.items()}
        assert states == {"m1": "decided", "m2": "copying"}
        c.finish_move("m1")
        c.abandon_move("m2")
    state = Coordinator.read(tmp_path)
    assert state.active_moves() == [] and list(state.moves) == ["m1"]


def test_decisions_are_published_to_the_cluster_file(tmp_path: Path) -> None:
    m = ShardMap.even(["a:1", "b:2"], 64)
    cf = tmp_path / "cluster.json"
    cf.write_text(json.dumps({"shard_map": m.to_dict(), "shards": [], "data_dir": "x"}))
    with Coordinator.open(tmp_path, cluster_file=cf) as c:
        c.begin_move("m", 1, 0, [63])
        new = c.decide("m")
        assert c.decide("m") == new  # deciding twice changes nothing
    info = json.loads(cf.read_text())
    assert info["shard_map"] == new.to_dict() and info["data_dir"] == "x"
    with Coordinator.open(tmp_path, cluster_file=cf) as c:
        grown = c.set_shards({0: "a:1", 1: "b:2", 2: "c:3"})
        assert grown.epoch == new.epoch + 1 and grown.slots_of(2).size == 0
        with pytest.raises(ConfigError, match="still own slots"):
            c.set_shards({0: "a:1"})
        with pytest.raises(ConfigError, match="not shard 2's"):
            c.begin_move("bad", 2, 0, [0])
    assert ShardMap.from_dict(json.loads(cf.read_text())["shard_map"]) == grown


def test_a_newer_map_in_the_cluster_file_is_adopted(tmp_path: Path) -> None:
    m = ShardMap.even(["a:1", "b:2"], 64)
    with Coordinator.open(tmp_path, initial=m):
        pass
    # `recps cluster up` restarted shard 1 on a new port: same owners, epoch + 1
    moved = m.replace(shards={0: "a:1", 1: "b:9"})
    cf = tmp_path / "cluster.json"
    cf.write_text(json.dumps({"shard_map": moved.to_dict(), "shards": [], "data_dir": "x"}))
    with Coordinator.open(tmp_path, cluster_file=cf) as c:
        assert c.shard_map == moved
    assert np.array_equal(Coordinator.read(tmp_path).shard_map.slot_owner, m.slot_owner)


def test_no_state_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="first `recps rebalance apply`"):
        Coordinator.read(tmp_path)
    with pytest.raises(ConfigError, match="start the cluster first"):
        Coordinator.open(tmp_path)
