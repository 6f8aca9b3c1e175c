"""`recps train` for real: a local Ray, PS shards as actors, Ray Train workers over gloo.

One job runs end to end and is checked for quality, checkpoints and leftovers; a second
loses a worker to SIGKILL after its first checkpoint and must finish through Ray Train's
restart, resuming from that checkpoint; a third grows by a shard (`recps shard add
--rebalance`, a second driver on the job's Ray) while it trains; a fourth loses a PS
shard to SIGKILL and trains on through Ray's restart of it. They are small so the
suite stays quick on 2 cores (the third runs ~50 s: the add must end well inside training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from recps.ps.cluster import pid_alive
from recps.worker.job_config import load_job_config
from recps.worker.launcher import JobStateError, kill_worker, prepare_data_dir, run_job

pytestmark = pytest.mark.timeout(600)


def job_dict(data_dir: Path, **training: Any) -> dict[str, Any]:
    return {
        "name": "ray-test",
        "data": {"synth": {"rows": 24000, "seed": 3, "num_files": 2}, "batch_size": 512},
        "table_defaults": {"dim": 8, "optimizer": {"kind": "adagrad", "lr": 0.05}},
        "model": {"kind": "dlrm", "bottom_mlp": [16, 8], "top_mlp": [32]},
        "dense_optimizer": {"kind": "adam", "lr": 0.003},
        "training": {"epochs": 1, "max_inflight_pushes": 1, **training},
        "cluster": {
            "num_workers": 2,
            "num_shards": 2,
            "cpus_per_worker": 1,
            "cpus_per_shard": 1,
            "memory_mb": 32,
            "data_dir": str(data_dir),
            "max_failures": 2,
        },
    }


def shard_pids(data_dir: Path) -> list[int]:
    cluster = json.loads((data_dir / "cluster.json").read_text())
    return [int(s["pid"]) for s in cluster["shards"]]


def _on_first_checkpoint(data_dir: Path, act: Any) -> threading.Thread:
    """A thread that waits (up to 300 s) for the job's first complete checkpoint, then
    calls ``act(names of the checkpoints so far)`` once."""

    def watch() -> None:
        ckpts = data_dir / "checkpoints"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if ckpts.exists() and any((c / "COMPLETE").exists() for c in ckpts.iterdir()):
                act(sorted(c.name for c in ckpts.iterdir()))
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_job_trains_checkpoints_and_leaves_nothing_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "job"
    job = load_job_config(job_dict(data_dir, checkpoint_every_steps=8))
    result = run_job(job, progress=False)

    # 21.6k train rows over 2 workers x 512 rows: 21 steps each (the last partial batch too
    # when the reader keeps it), all of them on both ranks.
    assert result.steps >= 20
    assert result.samples >= 20 * 2 * 512
    assert 0.6 < result.eval["auc"] <= 1.0, result.eval
    assert result.planted_auc is not None and result.eval["auc"] < result.planted_auc + 0.02
    assert result.eval["rows"] == 2400
    assert result.restarts == 0 and result.resumed_from is None
    assert len(result.checkpoints) >= 2
    ckpts = sorted(p.name for p in (data_dir / "checkpoints").iterdir())
    assert set(result.checkpoints) <= set(ckpts)
    for tag in result.checkpoints:
        assert (data_dir / "checkpoints" / tag / "shard-0" / "manifest.json").exists()
        assert (data_dir / "checkpoints" / tag / "shard-1" / "manifest.json").exists()

    # Nothing survives: shard actors, training workers, the local Ray.
    pids = shard_pids(data_dir) + list(_worker_pids(data_dir).values())
    assert pids
    deadline = time.monotonic() + 20
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if pid_alive(p)], "processes left running after the job"

    # The data dir now holds a run: a new job must say resume or overwrite.
    with pytest.raises(JobStateError, match=r"--resume|--overwrite"):
        prepare_data_dir(job, resume=False, overwrite=False)
    assert prepare_data_dir(job, resume=True, overwrite=False) is True


def _worker_pids(data_dir: Path) -> dict[int, int]:
    from recps.worker.launcher import worker_pids

    return worker_pids(data_dir)


def test_killed_worker_restarts_from_the_last_checkpoint(tmp_path: Path) -> None:
    data_dir = tmp_path / "job"
    job = load_job_config(job_dict(data_dir, checkpoint_every_steps=5, max_inflight_pushes=0))
    killed: dict[str, Any] = {}

    def killer(ckpts: list[str]) -> None:
        try:
            killed["pid"] = kill_worker(data_dir, rank=1)
            killed["at"] = ckpts
        except Exception as e:  # reported by the assertion below
            killed["error"] = repr(e)

    t = _on_first_checkpoint(data_dir, killer)
    result = run_job(job, progress=False)
    t.join(timeout=5)
    assert "pid" in killed, killed
    assert result.restarts >= 1
    assert result.resumed_from is not None
    assert result.steps >= 20  # the step count of the whole job, not of the last attempt
    assert 0.6 < result.eval["auc"] <= 1.0


def test_cli_check_and_bad_config(tmp_path: Path) -> None:
    import yaml

    good = tmp_path / "job.yaml"
    good.write_text(yaml.safe_dump(job_dict(tmp_path / "d")))
    exe = [sys.executable, "-m", "recps.cli.main", "train", "--config"]
    out = subprocess.run([*exe, str(good), "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "num_shards: 2" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**job_dict(tmp_path / "d"), "trainig": {}}))
    out = subprocess.run([*exe, str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "trainig: unknown key (did you mean 'training'?)" in out.stderr
    # --resume on a data dir that never ran: exit 2, nothing started.
    out = subprocess.run([*exe, str(good), "--resume"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "nothing to resume" in out.stderr


def test_a_shard_added_while_the_job_trains_takes_slots_and_is_checkpointed(
    tmp_path: Path,
) -> None:
    """`recps shard add --rebalance` against a running `recps train` job: the new shard
    actor joins the job's Ray, takes slots live, the workers train through the move, the
    job's later checkpoints include the new shard, and its shutdown stops it too."""
    data_dir = tmp_path / "job"
    # Long enough that the add (an actor start and a paced move, ~10 s here) ends well
    # inside training: 6 epochs of 90k rows, ~530 steps. More epochs of the small data
    # set would overfit (AUC ~0.56 after 70 epochs, with or without a move).
    cfg = job_dict(data_dir, checkpoint_every_steps=40, epochs=6)
    cfg["data"]["synth"]["rows"] = 100_000
    job = load_job_config(cfg)
    grown: dict[str, Any] = {}

    def grow(ckpts: list[str]) -> None:
        grown["before"] = ckpts
        cmd = [sys.executable, "-m", "recps.cli.main", "shard", "add"]
        cmd += ["--cluster-file", str(data_dir / "cluster.json"), "--rebalance", "--yes", "--json"]
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        grown.update(rc=r.returncode, out=r.stdout, err=r.stderr, at=time.monotonic())
        grown["took_s"] = grown["at"] - t0

    t = _on_first_checkpoint(data_dir, grow)
    result = run_job(job, progress=False)
    ended = time.monotonic()
    t.join(timeout=5)
    assert grown.get("rc") == 0, grown.get("err", "no shard add ran")[-3000:]
    assert grown["at"] < ended, f"the job ended before the shard joined: {grown['took_s']} s"
    added = json.loads(grown["out"])
    assert added["shard_id"] == 2 and added["rebalance"]["moved_slots"] > 0
    assert result.steps >= 500 and 0.6 < result.eval["auc"] <= 1.0, (result.steps, result.eval)
    kept = sorted(c.name for c in (data_dir / "checkpoints").iterdir())  # the newest 3
    later = [c for c in kept if c not in grown["before"]]
    assert later, (kept, grown["before"])
    for tag in later:  # taken on 3 shards, the new one holding its moved rows
        ckpt = data_dir / "checkpoints" / tag
        assert (ckpt / "shard-2" / "manifest.json").exists(), sorted(os.listdir(ckpt))
    entry = [s for s in json.loads((data_dir / "cluster.json").read_text())["shards"]]
    pids = [int(s["pid"]) for s in entry]
    assert [s["shard_id"] for s in entry] == [0, 1, 2]
    deadline = time.monotonic() + 20
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if pid_alive(p)], "shards left running after the job"


def test_a_shard_killed_while_the_job_trains_is_restarted_and_training_finishes(
    tmp_path: Path,
) -> None:
    """SIGKILL of a PS shard process mid-training: Ray restarts its actor on the same data
    directory and port, the workers' calls retry until it answers, and the job finishes
    with the same quality (rows it had not yet written back are lost: async durability)."""
    data_dir = tmp_path / "job"
    cfg = job_dict(data_dir, checkpoint_every_steps=5)
    cfg["data"]["synth"]["rows"] = 60_000  # ~53 steps: the restart lands well inside
    job = load_job_config(cfg)
    killed: dict[str, Any] = {}

    def kill_shard(ckpts: list[str]) -> None:
        try:
            pid = shard_pids(data_dir)[1]
            os.kill(pid, 9)
            t0 = time.monotonic()
            killed.update(pid=pid, at=ckpts)
            # The job's shard watch publishes the restarted process in the cluster file.
            while time.monotonic() - t0 < 60:
                new = shard_pids(data_dir)[1]
                if new != pid:
                    killed.update(new_pid=new, published_after_s=time.monotonic() - t0)
                    return
                time.sleep(0.05)
        except Exception as e:  # reported by the assertion below
            killed["error"] = repr(e)

    t = _on_first_checkpoint(data_dir, kill_shard)
    result = run_job(job, progress=False)
    ended = time.monotonic()
    t.join(timeout=60)
    assert "new_pid" in killed, killed  # published while the job ran
    assert not pid_alive(killed["pid"])
    # the kill came at step ~5 of ~53, and no worker had to restart for it
    assert result.steps >= 50 and result.restarts == 0, result
    assert 0.6 < result.eval["auc"] <= 1.0, result.eval
    assert ended > 0 and shard_pids(data_dir)[1] == killed["new_pid"]
