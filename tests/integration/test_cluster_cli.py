"""`recps cluster up|down` and `recps status`, run as the real CLI in subprocesses.

The shards the CLI starts are detached (a session of their own), so they are not children
of this test: the ``data_dir`` fixture kills, by pid, every ``recps.ps.main`` process whose
command line names the test's data directory, whatever the test did. Values read through
the cluster are compared bit for bit with a ``MemoryStore`` fed the same sequence.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recps.cli.main import main
from recps.embedding import MemoryStore, OptimizerConfig, TableConfig
from recps.ps.client import PSClient

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/cmdline").exists(), reason="finds stray shards through /proc"
)

NUM_SLOTS = 1024
TABLE = TableConfig("user", dim=8, optimizer=OptimizerConfig("adagrad", lr=0.1))
CLI_TIMEOUT_S = 120  # liveness only; each command takes about a second


def recps(*args: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RECPS_CLUSTER_FILE"}
    return subprocess.run(
        [sys.executable, "-m", "recps.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=env,
    )


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def up(data_dir: Path, *args: Any) -> dict[str, Any]:
    ok(recps("cluster", "up", "--data-dir", data_dir, "--memory-mb", 16, *args))
    return json.loads((data_dir / "cluster.json").read_text())


def status(data_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    r = recps("status", "--data-dir", data_dir, "--json", "--sample", 0.2)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def is_shard_of(pid: int, data_dir: Path) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "recps.ps.main" in cmd and str(data_dir) in cmd and alive(pid)


def shards_of(data_dir: Path) -> list[int]:
    """Pids of the running shard processes whose command line names ``data_dir``."""
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and is_shard_of(int(p.name), data_dir)
    ]


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "cluster"
    yield d
    # Whatever happened: the pids the cluster file names, and any other shard process on
    # this data directory, if they still are shards of it (a reused pid is left alone).
    pids = set(shards_of(d))
    if (d / "cluster.json").exists():
        pids |= {s["pid"] for s in json.loads((d / "cluster.json").read_text())["shards"]}
    stray = [p for p in pids if is_shard_of(p, d)]
    for pid in stray:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(stray)


def test_up_status_client_down_and_up_again_keeps_the_data(data_dir: Path) -> None:
    info = up(data_dir, "--shards", 2, "--num-slots", NUM_SLOTS)
    pids = [s["pid"] for s in info["shards"]]
    assert [s["shard_id"] for s in info["shards"]] == [0, 1]
    assert info["shard_map"]["epoch"] == 1 and info["shard_map"]["num_slots"] == NUM_SLOTS
    assert all(alive(p) for p in pids)
    assert (data_dir / "shard-1" / "shard.log").exists()

    code, rows = status(data_dir)
    assert code == 0
    assert [r["state"] for r in rows] == ["up", "up"]
    assert sum(r["slots"] for r in rows) == NUM_SLOTS
    assert {r["epoch"] for r in rows} == {1}

    # The cluster against the reference, fed the same sequence.
    ref = MemoryStore(TABLE)
    rng = np.random.default_rng(7)
    with PSClient(data_dir / "cluster.json") as client:
        client.create_table(TABLE)
        for _ in range(4):
            ids = rng.integers(-500, 500, size=300)  # duplicates included
            np.testing.assert_array_equal(
                client.lookup({"user": ids})["user"], ref.lookup(ids, create_missing=True)
            )
            grads = rng.standard_normal((len(ids), TABLE.dim)).astype(np.float32)
            client.push({"user": (ids, grads)})
            ref.apply_gradients(ids, grads)
        probe = np.arange(-600, 600)  # stored rows and never-seen ids
        before = client.lookup({"user": probe}, create_missing=False)["user"]
    np.testing.assert_array_equal(before, ref.lookup(probe, create_missing=False))
    stored = ref.stats().rows

    code, rows = status(data_dir)
    assert code == 0
    assert all(r["tables"] == ["user"] for r in rows)
    assert sum(r["rows_in_memory"] for r in rows) == stored  # 16 MiB holds every row
    assert all(r["rows_per_s"] is not None and r["rows_per_s"] >= 0 for r in rows)
    assert all(r["rss_bytes"] > 0 for r in rows)
    for r in rows:  # hottest first, by recent rate; every slot here saw traffic
        qps = [h["qps"] for h in r["hot_slots"]]
        assert len(qps) == 5 and qps == sorted(qps, reverse=True) and qps[-1] > 0, r
    text = ok(recps("status", "--data-dir", data_dir, "--sample", 0.1)).stdout
    assert text.count("hot slots:") == 2 and "ids/s" in text, text

    r = ok(recps("cluster", "down", "--data-dir", data_dir))
    assert r.stdout.count("stopped") == 2, r.stdout
    assert not any(alive(p) for p in pids), "down returns once every shard has exited"
    code, rows = status(data_dir)
    assert code == 1 and [r["state"] for r in rows] == ["down", "down"]

    again = up(data_dir)  # no --shards: the data directory knows
    assert not set(pids) & {s["pid"] for s in again["shards"]}
    assert again["shard_map"]["slot_ranges"] == info["shard_map"]["slot_ranges"]
    assert again["settings"]["memory_mb"] == 16  # kept from the first `up`
    if again["shard_map"]["shards"] == info["shard_map"]["shards"]:  # the old ports were free
        assert again["shard_map"]["epoch"] == 1
    else:
        assert again["shard_map"]["epoch"] == 2
    with PSClient(data_dir / "cluster.json") as client:
        assert [t.name for t in client.list_tables()] == ["user"]
        after = client.lookup({"user": probe}, create_missing=False)["user"]
    np.testing.assert_array_equal(after, before)

    ok(recps("cluster", "down", "--cluster-file", data_dir / "cluster.json"))
    assert not shards_of(data_dir)


def test_a_killed_shard_shows_as_down_and_up_restarts_only_it(data_dir: Path) -> None:
    info = up(data_dir, "--shards", 2, "--num-slots", NUM_SLOTS)
    pid0, pid1 = (s["pid"] for s in info["shards"])
    os.kill(pid1, signal.SIGKILL)
    wait_gone([pid1])

    code, rows = status(data_dir)
    assert code == 1
    assert [r["state"] for r in rows] == ["up", "down"]
    assert rows[1]["slots"] is None and rows[1]["error"]
    assert rows[0]["slots"] == NUM_SLOTS // 2
    r = recps("status", "--data-dir", data_dir, "--sample", 0.1)
    assert r.returncode == 1
    assert "down" in r.stdout and "1/2 shards up" in r.stdout, r.stdout

    r = ok(recps("cluster", "up", "--data-dir", data_dir))
    assert "shard 0" in r.stdout and "already running" in r.stdout, r.stdout
    again = json.loads((data_dir / "cluster.json").read_text())
    assert again["shards"][0]["pid"] == pid0
    code, rows = status(data_dir)
    assert code == 0 and [r["state"] for r in rows] == ["up", "up"]
    ok(recps("cluster", "down", "--data-dir", data_dir))
    assert not shards_of(data_dir)


def test_a_shard_that_fails_to_start_stops_the_others(data_dir: Path) -> None:
    (data_dir / "shard-1").mkdir(parents=True)
    (data_dir / "shard-1" / "tables.json").write_text("{not json")  # shard 1 dies on start
    r = recps("cluster", "up", "--shards", 2, "--data-dir", data_dir, "--num-slots", NUM_SLOTS)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "shard 1 failed to start" in r.stderr
    assert "JSONDecodeError" in r.stderr  # the log tail says why
    assert not (data_dir / "cluster.json").exists()
    server0 = data_dir / "shard-0" / "server.json"
    if server0.exists():
        wait_gone([json.loads(server0.read_text())["pid"]], timeout_s=1.0)
    assert not shards_of(data_dir), "the shards this `up` started must be stopped again"


def test_down_leaves_a_reused_pid_alone(data_dir: Path) -> None:
    # A cluster file whose pid now belongs to an unrelated process.
    other = subprocess.Popen(["sleep", "60"])
    try:
        data_dir.mkdir()
        (data_dir / "shard-0").mkdir()
        shard_map = {
            "epoch": 1,
            "num_slots": 16,
            "shards": {"0": "127.0.0.1:1"},
            "slot_ranges": [[0, 16, 0]],
        }
        shard = {"shard_id": 0, "address": "127.0.0.1:1", "pid": other.pid}
        shard |= {"data_dir": str(data_dir / "shard-0"), "log": "", "metrics_port": None}
        cluster = {"shard_map": shard_map, "shards": [shard], "data_dir": str(data_dir)}
        (data_dir / "cluster.json").write_text(json.dumps(cluster))
        r = ok(recps("cluster", "down", "--data-dir", data_dir, "--json"))
        [report] = json.loads(r.stdout)
        assert report["outcome"] == "was not running"
        assert "left alone" in report["notes"][0]
        assert other.poll() is None, "down killed a process that is not a shard"
    finally:
        other.kill()
        other.wait()


def test_usage_errors_exit_2_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No process starts here, so the CLI runs in-process (same code, no interpreter start).
    monkeypatch.delenv("RECPS_CLUSTER_FILE", raising=False)
    nowhere = str(tmp_path / "nowhere")

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, _, err = run("status", "--data-dir", nowhere)
    assert code == 2 and "recps cluster up" in err, err
    code, _, err = run("status")
    assert code == 2 and "--cluster-file" in err, err
    code, _, err = run("cluster", "down", "--data-dir", nowhere)
    assert code == 2 and "no cluster" in err, err
    code, _, err = run("cluster", "up", "--data-dir", nowhere)
    assert code == 2 and "--shards" in err, err
    code, _, err = run(
        "cluster", "up", "--data-dir", nowhere, "--shards", "2", "--num-slots", "1000"
    )
    assert code == 2 and "power of two" in err, err
    assert not (tmp_path / "nowhere").exists()
    for cmd in (("cluster", "up"), ("cluster", "down"), ("status",)):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "Example:" in out and "Exit codes" in out, cmd
