"""The job files shipped in deploy/ load and validate (they are documentation that runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recps.worker.job_config import load_job_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("name", ["demo.yaml", "job.example.yaml"])
def test_shipped_job_configs_validate(name: str) -> None:
    job = load_job_config(DEPLOY / name)
    assert job.tables and job.features
    assert job.cluster.num_workers >= 2 and job.cluster.num_shards >= 2
    # Relative paths are relative to the file, so the demo works from any directory.
    assert Path(job.cluster.data_dir).is_absolute()


def test_demo_matches_the_issue() -> None:
    job = load_job_config(DEPLOY / "demo.yaml")
    assert job.model.kind == "dlrm"
    assert job.data.synth is not None and job.data.synth.rows >= 1_000_000
    assert (job.cluster.num_workers, job.cluster.num_shards) == (2, 2)
