"""`recps checkpoint|table|shard` against a real `recps cluster up` cluster (shard
processes, RocksDB). The commands run in this process through their parsers (as
``recps.cli.main`` would call them), so each takes well under a second; values read
back are compared bit for bit with what was read before.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recps.cli import ops_cmds, shard_cmds
from recps.embedding import OptimizerConfig, TableConfig
from recps.ps.client import PSClient
from recps.ps.cluster import ClusterConfig, cluster_down, cluster_up, read_cluster_file

NUM_SLOTS = 256
TABLE = TableConfig("user", dim=8, optimizer=OptimizerConfig("adagrad", lr=0.1))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recps")
    sub = parser.add_subparsers()
    ops_cmds.add_parser(sub)
    shard_cmds.add_parser(sub)
    return parser


class Cli:
    def __init__(self, cluster_file: str, capsys: Any) -> None:
        self.cf = cluster_file
        self.capsys = capsys
        self.parser = _parser()

    def __call__(self, *argv: Any) -> tuple[int, str, str]:
        self.capsys.readouterr()
        args = self.parser.parse_args([*map(str, argv), "--cluster-file", self.cf])
        code = int(args.func(args))
        out = self.capsys.readouterr()
        return code, out.out, out.err

    def json(self, *argv: Any) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    cfg = ClusterConfig(str(tmp_path / "c"), num_shards=2, num_slots=NUM_SLOTS, memory_mb=8)
    info = cluster_up(cfg)
    try:
        yield info["cluster_file"]
    finally:
        cluster_down(info["cluster_file"])


def _rows(cf: str, ids: np.ndarray) -> np.ndarray:
    with PSClient(cf) as c:
        return c.lookup({"user": ids}, create_missing=False)["user"]


def _push(cf: str, ids: np.ndarray, value: float) -> None:
    with PSClient(cf) as c:
        c.push({"user": (ids, np.full((len(ids), TABLE.dim), value, np.float32))})


@pytest.mark.parametrize(
    "argv",
    [
        ["checkpoint", "create"],
        ["checkpoint", "list"],
        ["checkpoint", "restore"],
        ["table", "create"],
        ["table", "list"],
        ["table", "describe"],
        ["shard", "add"],
        ["shard", "remove"],
    ],
)
def test_every_command_has_help_with_an_example(argv: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Example:" in out and f"recps {' '.join(argv)}" in out
    assert "Exit codes" in out


def test_table_create_list_describe(cluster: str, capsys: Any) -> None:
    cli = Cli(cluster, capsys)
    assert cli.json("table", "list") == []
    created = cli.json(
        "table", "create", "user", "--dim", 8, "--optimizer", "adam", "--lr", 0.05, "--init",
        "normal", "--init-scale", 0.1,
    )  # fmt: skip
    assert created["dim"] == 8 and created["optimizer"]["kind"] == "adam"
    # The same again: an error, unless --if-not-exists; a different dim is always one.
    assert cli("table", "create", "user", "--dim", 8, "--optimizer", "adam", "--lr", 0.05)[0] == 2
    code, _, err = cli("table", "create", "user", "--dim", 4, "--if-not-exists")
    assert code == 2 and err.startswith("error:")
    same = ("--optimizer", "adam", "--lr", 0.05, "--init", "normal", "--init-scale", 0.1)
    assert cli("table", "create", "user", "--dim", 8, *same, "--if-not-exists")[0] == 0
    assert cli("table", "create", "bad name", "--dim", 8)[0] == 2

    ids = np.arange(1000, dtype=np.int64)
    _push(cluster, ids, 1.0)
    [row] = cli.json("table", "list")
    assert (row["name"], row["dim"], row["optimizer"]) == ("user", 8, "adam")
    assert row["rows_on_disk"] + row["rows_in_memory"] >= 1000
    desc = cli.json("table", "describe", "user")
    assert desc["config"]["initializer"] == {"kind": "normal", "scale": 0.1, "seed": 0}
    assert sorted(desc["shards"]) == ["0", "1"]
    assert sum(s["pushes"] for s in desc["shards"].values()) == 1000
    code, out, _ = cli("table", "describe", "user")
    assert code == 0 and "optimizer: kind=adam" in out
    code, _, err = cli("table", "describe", "nope")
    assert code == 2 and "nope" in err


def test_checkpoint_create_list_restore(cluster: str, capsys: Any, tmp_path: Path) -> None:
    cli = Cli(cluster, capsys)
    with PSClient(cluster) as c:
        c.create_table(TABLE)
    ids = np.arange(2000, dtype=np.int64)
    _push(cluster, ids, 1.0)
    saved = _rows(cluster, ids)
    made = cli.json("checkpoint", "create", "--tag", "t1")
    assert made["tag"] == "t1" and sorted(made["shards"]) == ["0", "1"] and made["rows"] == 2000
    root = Path(read_cluster_file(cluster)["data_dir"]) / "checkpoints"
    assert (root / "t1" / "shard-1" / "manifest.json").exists()
    assert cli("checkpoint", "create", "--tag", "t1")[0] == 2  # a tag is written once

    [entry] = cli.json("checkpoint", "list")
    assert entry["tag"] == "t1" and entry["shards"] == [0, 1] and entry["missing"] == []
    assert entry["rows"] == 2000 and entry["tables"] == ["user"] and entry["restorable"]
    assert "t1" in cli("checkpoint", "list")[1]

    _push(cluster, ids, -3.0)
    changed = _rows(cluster, ids)
    assert not np.array_equal(changed, saved)
    code, _, err = cli("checkpoint", "restore", "t1")  # no --yes: nothing happens
    assert code == 2 and "--yes" in err
    np.testing.assert_array_equal(_rows(cluster, ids), changed)
    assert cli("checkpoint", "restore", "nope", "--yes")[0] == 2
    assert cli.json("checkpoint", "restore", "t1", "--yes")["rows"] == 2000
    np.testing.assert_array_equal(_rows(cluster, ids), saved)

    # Another directory, given explicitly.
    other = tmp_path / "elsewhere"
    assert cli.json("checkpoint", "create", "--tag", "t2", "--dir", other)["dir"] == str(other)
    assert [e["tag"] for e in cli.json("checkpoint", "list", "--dir", other)] == ["t2"]
    assert cli.json("checkpoint", "list", "--dir", tmp_path / "none") == []


def test_shard_add_then_remove_keeps_every_row(cluster: str, capsys: Any) -> None:
    cli = Cli(cluster, capsys)
    with PSClient(cluster) as c:
        c.create_table(TABLE)
    ids = np.arange(5000, dtype=np.int64)
    _push(cluster, ids, 1.0)
    before = _rows(cluster, ids)
    assert cli.json("checkpoint", "create", "--tag", "before")["rows"] == 5000

    # Joins the map owning nothing: no slot moves.
    added = cli.json("shard", "add", "--no-progress")
    assert added["shard_id"] == 2 and "rebalance" not in added
    m = read_cluster_file(cluster)["shard_map"]
    assert sorted(map(int, m["shards"])) == [0, 1, 2]
    with PSClient(cluster) as c:
        assert [t.name for t in c.list_tables()] == ["user"]
        assert c.shard_map.slots_of(2).size == 0

    code, _, err = cli("shard", "remove", "--shard", 2)  # no --yes
    assert code == 2 and "--yes" in err
    assert cli("shard", "remove", "--shard", 9, "--yes")[0] == 2
    removed = cli.json("shard", "remove", "--shard", 2, "--yes", "--no-progress")
    assert removed["stopped"] == "stopped" and removed["rebalance"]["moved_slots"] == 0
    assert [s["shard_id"] for s in read_cluster_file(cluster)["shards"]] == [0, 1]

    assert cli("shard", "add", "--rebalance")[0] == 2  # moving slots wants --yes
    added = cli.json("shard", "add", "--id", 3, "--rebalance", "--yes", "--no-progress")
    assert added["rebalance"]["moved_slots"] > 0 and added["rebalance"]["shards"] == [0, 1, 3]
    np.testing.assert_array_equal(_rows(cluster, ids), before)
    # The checkpoint predates the new slot layout: listed as not restorable, refused.
    [entry] = cli.json("checkpoint", "list")
    assert entry["restorable"] is False
    assert cli("checkpoint", "restore", "before", "--yes")[0] == 2
    np.testing.assert_array_equal(_rows(cluster, ids), before)

    removed = cli.json("shard", "remove", "--shard", 0, "--yes", "--no-progress")
    assert removed["rebalance"]["shards"] == [1, 3] and removed["stopped"] == "stopped"
    np.testing.assert_array_equal(_rows(cluster, ids), before)
    with PSClient(cluster) as c:
        stats = c.stats()
        assert sorted(stats) == [1, 3]
        assert sum(t.rows_on_disk for r in stats.values() for t in r.tables) == 5000
    assert cli("shard", "remove", "--shard", 1, "--yes")[0] == 0
    assert cli("shard", "remove", "--shard", 3, "--yes")[0] == 2  # the last one
