"""``benchmarks/train.py`` on tiny sizes, so that it cannot rot: its core over an in-process
client, and the script end to end over real shard processes (which must not outlive it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from recps.worker.reference import LocalRowClient

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train.py"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("recps_bench_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_core_compares_both_sides_over_the_same_batches(bench: ModuleType, tmp_path: Path) -> None:
    batches = bench.make_batches(tmp_path, 5, 64)
    res = bench.compare(
        lambda cfg: LocalRowClient(cfg.tables),
        batches,
        warmup=1,
        steps=2,
        rounds=2,
        staleness=1,
        tables=3,
        dim=8,
    )
    assert res["ps_samples_per_s"] > 0 and res["inprocess_samples_per_s"] > 0
    assert res["ratio"] == pytest.approx(
        res["ps_samples_per_s"] / res["inprocess_samples_per_s"], rel=1e-3
    )
    assert (res["batch_size"], res["tables"], res["dim"], res["steps_measured"]) == (64, 3, 8, 4)
    assert len(res["ratio_per_round"]) == 2
    assert 0 <= res["ps_breakdown"]["wait_rows_frac"] <= 1
    assert res["ps_breakdown"]["rows_pushed_per_step"] > 0
    # Both sides trained the same model on the same data: losses agree loosely.
    losses = res["final_loss"]
    assert abs(losses["ps"] - losses["inprocess"]) < 0.1, losses


def _processes_under(path: Path) -> list[int]:
    """Pids whose command line mentions ``path`` (shards get their data dir there)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmd:
            out.append(int(d.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_script_runs_with_real_shards_and_stops_them(tmp_path: Path) -> None:
    argv = ["--batch-size", "128", "--tables", "3", "--dim", "8"]
    argv += ["--warmup", "1", "--steps", "2", "--rounds", "2", "--staleness", "1"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the shards' data dirs land here
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["shards"] == 2 and res["staleness"] == 1 and res["steps_measured"] == 4
    assert res["ps_samples_per_s"] > 0 and res["inprocess_samples_per_s"] > 0
    assert res["cpu_ms_per_step"]["ps"]["shards"] >= 0
    assert "round 2/2" in proc.stderr
    assert _processes_under(tmp_path) == []
