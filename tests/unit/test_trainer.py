"""The training loop in process: the sharded path over ``LocalRowClient`` (plus a checkpointing
twin of it), the schedule, checkpoint files and the resume rules. Real shards and several
worker processes are in ``tests/integration/test_trainer.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recps.embedding import errors as E
from recps.worker import checkpoint as ckpt
from recps.worker.data import DataReader, ReaderConfig
from recps.worker.job_config import JobConfig, load_job_config
from recps.worker.reference import LocalRowClient
from recps.worker.synth import SynthConfig, write_dataset
from recps.worker.trainer import (
    TrainResult,
    WorkerContext,
    _pick_checkpoint,
    _ScaleGrad,
    _Schedule,
    config_fingerprint,
    ensure_data,
    fit_inprocess,
    latest_checkpoint,
    list_checkpoints,
    run_worker,
)

pytestmark = pytest.mark.timeout(120)

SPARSE = ("C1", "C2", "C3", "C4")
DENSE = tuple(f"I{i}" for i in range(1, 14))
CPU = WorkerContext(device="cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Small matrices: one torch thread is fastest, and kind to a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    write_dataset(
        d,
        SynthConfig(
            rows=4000,
            num_files=2,
            num_sparse=4,
            vocab_max=200,
            interaction_pairs=4,
            calibration_rows=2000,
        ),
    )
    return d


def make_job(data: Path, ckpt_dir: Path, **training: Any) -> JobConfig:
    return load_job_config(
        {
            "data": {
                "train": str(data / "train"),
                "eval": str(data / "eval"),
                "batch_size": 64,
                "reader": {"dense_features": list(DENSE), "sparse_features": list(SPARSE)},
            },
            "table_defaults": {"dim": 8, "optimizer": {"kind": "adagrad", "lr": 0.1}},
            "model": {"bottom_mlp": [16, 8], "top_mlp": [16]},
            "dense_optimizer": {"kind": "adam", "lr": 0.003},
            "training": {"checkpoint_dir": str(ckpt_dir), **training},
        }
    )


class CheckpointingClient(LocalRowClient):
    """``LocalRowClient`` with ``PSClient``'s checkpoint/restore (one "shard")."""

    def checkpoint(self, directory: str, tag: str = "") -> dict[int, Any]:
        root = Path(directory) / tag / "shard-0"
        for name, store in self.stores.items():
            store.checkpoint(root / name)
        return {0: None}

    def restore(self, directory: str, tag: str) -> dict[int, Any]:
        root = Path(directory) / tag / "shard-0"
        if not root.is_dir():
            raise E.CheckpointNotFoundError(str(root))
        for name, store in self.stores.items():
            store.restore(root / name)
        return {0: None}


def all_ids(job: JobConfig) -> dict[str, np.ndarray]:
    reader = DataReader(job.data.train, job.data.reader.replace(batch_size=4096))
    cols: dict[str, list[np.ndarray]] = {f: [] for f in SPARSE}
    for b in reader.epoch(0):
        for f in SPARSE:
            cols[f].append(b.sparse[f])
    return {f: np.unique(np.concatenate(v)) for f, v in cols.items()}


def final_dense(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    info = latest_checkpoint(ckpt_dir)
    assert info is not None
    return ckpt.load_dense(ckpt.read_dense_bytes(info.path))["model"]


# ---- training ---------------------------------------------------------------------------


def test_worker_over_a_local_client_equals_the_in_process_reference(
    data: Path, tmp_path: Path
) -> None:
    job = make_job(data, tmp_path / "ckpt", epochs=2, eval_every_steps=40)
    reports: list[dict[str, Any]] = []
    client = LocalRowClient(job.tables)
    got = run_worker(job, client, CPU, report=reports.append)
    ref = fit_inprocess(job, device="cpu")

    steps_per_epoch = -(-3600 // 64)  # 3600 train rows in 2 files, one worker reads both
    assert got.steps == ref.result.steps == 2 * steps_per_epoch == 114
    assert got.samples == ref.result.samples == 2 * 3600
    assert [h["step"] for h in got.history] == [40, 80, 114]
    assert [r["done"] for r in reports] == [False, False, True]
    assert got.eval["rows"] == 400 and 0.5 < got.eval["auc"] < 1
    assert got.eval["auc"] == pytest.approx(ref.result.eval["auc"], abs=1e-4)
    ids = all_ids(job)
    rows = client.lookup(ids, create_missing=False)
    for t, i in ids.items():
        np.testing.assert_allclose(rows[t], ref.model.embeddings.rows(t, i), rtol=1e-4, atol=1e-6)
    json.dumps(got.to_dict())  # plain data
    assert got.checkpoints == []  # LocalRowClient cannot checkpoint: skipped, not failed


def test_resume_mid_epoch_is_bit_exact(data: Path, tmp_path: Path) -> None:
    """Crash in epoch 1 after a checkpoint in the middle of it; resume skips the batches
    that epoch had already consumed and ends exactly where an uninterrupted run ends."""
    kw = {"epochs": 2, "eval_every_steps": 10, "checkpoint_every_steps": 40}
    whole_job = make_job(data, tmp_path / "whole", **kw)
    whole_client = CheckpointingClient(whole_job.tables)
    whole = run_worker(whole_job, whole_client, CPU)
    assert whole.checkpoints == ["step-00000040", "step-00000080", "step-00000114"]
    assert [c.tag for c in list_checkpoints(tmp_path / "whole")] == whole.checkpoints[-3:]

    job = make_job(data, tmp_path / "crashy", **kw)
    client = CheckpointingClient(job.tables)

    def crash(metrics: dict[str, Any]) -> None:
        if metrics["step"] == 100:
            raise KeyboardInterrupt  # anything: the run just stops

    with pytest.raises(KeyboardInterrupt):
        run_worker(job, client, CPU, report=crash)
    latest = latest_checkpoint(tmp_path / "crashy")
    assert latest is not None and (latest.step, latest.epoch, latest.step_in_epoch) == (80, 1, 23)

    resumed = run_worker(job, client, CPU, resume="must")
    assert resumed.resumed_from == "step-00000080"
    assert (resumed.steps, resumed.samples) == (whole.steps, whole.samples)
    assert resumed.eval == whole.eval
    ids = all_ids(job)
    a, b = whole_client.lookup(ids, False), client.lookup(ids, False)
    for t in ids:
        np.testing.assert_array_equal(a[t], b[t])
    da, db = final_dense(tmp_path / "whole"), final_dense(tmp_path / "crashy")
    assert all(torch.equal(da[k], db[k]) for k in da)

    # Resuming from the final checkpoint trains nothing and writes nothing.
    reports: list[dict[str, Any]] = []
    again = run_worker(job, client, CPU, report=reports.append)
    assert [r["done"] for r in reports] == [True] and reports[0]["auc"] == whole.eval["auc"]
    assert again.resumed_from == "step-00000114" and again.steps == 114
    assert again.checkpoints == [] and again.eval == whole.eval
    # "never" starts over (and overwrites the old checkpoints as it goes).
    fresh = run_worker(job, CheckpointingClient(job.tables), CPU, resume="never")
    assert fresh.resumed_from is None and fresh.eval == whole.eval


# ---- resume rules -----------------------------------------------------------------------


def test_must_without_a_checkpoint_says_so(data: Path, tmp_path: Path) -> None:
    job = make_job(data, tmp_path / "ckpt", steps=2)
    (tmp_path / "ckpt" / "step-00000002").mkdir(parents=True)  # interrupted: no marker
    with pytest.raises(E.CheckpointNotFoundError, match="no complete checkpoint") as err:
        run_worker(job, CheckpointingClient(job.tables), CPU, resume="must")
    assert "step-00000002: incomplete" in str(err.value)
    # "auto" starts fresh when there is none.
    assert run_worker(job, CheckpointingClient(job.tables), CPU).resumed_from is None


def fake_checkpoint(root: Path, step: int, **meta: Any) -> None:
    path = ckpt.new_checkpoint_dir(root, ckpt.checkpoint_tag(step))
    ckpt.finish_checkpoint(path, {"step": step, **meta})


def test_a_checkpoint_of_another_job_or_world_size_is_refused(data: Path, tmp_path: Path) -> None:
    job = make_job(data, tmp_path / "ckpt", steps=4)
    config_hash, sections = config_fingerprint(job)
    other = make_job(data, tmp_path / "ckpt", steps=4).to_dict()
    other["dense_optimizer"]["lr"] = 0.1
    _, other_sections = config_fingerprint(load_job_config(other))
    fake_checkpoint(tmp_path / "ckpt", 2, world_size=1, config_hash="x", fingerprint=other_sections)
    with pytest.raises(E.CheckpointMismatchError, match="dense_optimizer changed"):
        _pick_checkpoint(job, "auto", 1, (config_hash, sections))
    fake_checkpoint(tmp_path / "ckpt", 3, world_size=2, config_hash=config_hash)
    with pytest.raises(E.CheckpointMismatchError, match="taken with 2 worker"):
        _pick_checkpoint(job, "auto", 1, (config_hash, sections))
    assert _pick_checkpoint(job, "never", 1, (config_hash, sections)) is None
    # A config that differs only in what may change (steps, paths) still fits.
    later = make_job(data, tmp_path / "elsewhere", steps=400, eval_every_steps=7)
    assert config_fingerprint(later)[0] == config_hash


def test_checkpoint_listing_marker_and_pruning(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    for s in (10, 20, 30):
        fake_checkpoint(root, s)
    (root / "step-00000040").mkdir()  # interrupted
    (root / "step-00000005").mkdir()  # interrupted, older
    (root / "notes").mkdir()
    assert [c.step for c in list_checkpoints(root)] == [10, 20, 30]
    assert latest_checkpoint(root).tag == "step-00000030"  # type: ignore[union-attr]
    with pytest.raises(E.CheckpointNotFoundError, match="incomplete"):
        ckpt.read_checkpoint(root / "step-00000040")
    gone = ckpt.prune_checkpoints(root, keep=2, current_step=30)
    assert sorted(gone) == ["step-00000005", "step-00000010"]
    assert sorted(os.listdir(root)) == ["notes", "step-00000020", "step-00000030", "step-00000040"]
    # Writing a tag again replaces what is there.
    (root / "step-00000040" / "junk").write_text("x")
    slot = ckpt.new_checkpoint_dir(root, "step-00000040")
    assert not slot.exists()


# ---- pieces -----------------------------------------------------------------------------


def write_parquet(path: Path, rows: int) -> None:
    pq.write_table(
        pa.table(
            {"label": np.zeros(rows, np.float32), "I1": np.arange(rows), "C1": np.arange(rows)}
        ),
        path,
    )


def test_schedule_takes_the_shortest_shard(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", 300)
    write_parquet(tmp_path / "b.parquet", 200)
    job = load_job_config(
        {
            "data": {
                "train": str(tmp_path),
                "batch_size": 64,
                "reader": {"dense_features": ["I1"], "sparse_features": ["C1"]},
            },
            "table_defaults": {"dim": 4},
            "model": {"bottom_mlp": [4]},
            "training": {"epochs": 3},
        }
    )
    reader = DataReader(tmp_path, job.data.reader, 0, 2)
    s = _Schedule(reader, 2, job)
    assert s.rows(0) == (300, 200)
    assert s.epoch_steps(0) == 4  # ceil(200 / 64); rank 0 has 5 batches
    assert s.batch_sizes(0, 0) == (64, 64) and s.batch_sizes(0, 3) == (64, 8)
    assert s.skipped_rows(0) == 300 - 256
    assert s.total_steps == 12 and s.locate(0) == (0, 0) and s.locate(9) == (2, 1)
    one = _Schedule(
        DataReader(
            tmp_path, ReaderConfig(batch_size=64, dense_features=("I1",), sparse_features=("C1",))
        ),
        1,
        job,
    )
    assert one.epoch_steps(0) == 8 and one.total_steps == 24


def test_scale_grad_scales_only_the_gradient() -> None:
    x = torch.ones(3, requires_grad=True)
    y = _ScaleGrad.apply(x, 0.25)
    assert torch.equal(y, x)
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 0.5))


def test_worker_context_and_result() -> None:
    assert WorkerContext().torch_device.type in ("cpu", "cuda")
    assert str(WorkerContext(local_rank=1, device="cpu").torch_device) == "cpu"
    with pytest.raises(E.ConfigError, match="rank"):
        WorkerContext(rank=2, world_size=2)
    r = TrainResult(1, 2, 0.5, 4.0, {"auc": 0.7}, [{"step": 1.0}], ["step-00000001"], None)
    assert json.loads(json.dumps(r.to_dict()))["checkpoints"] == ["step-00000001"]


def test_several_workers_need_torch_distributed(data: Path, tmp_path: Path) -> None:
    job = make_job(data, tmp_path / "ckpt", steps=2)
    with pytest.raises(E.ConfigError, match="init_process_group"):
        run_worker(job, LocalRowClient(job.tables), WorkerContext(0, 2, device="cpu"))


def test_ensure_data_writes_the_synthetic_dataset_once(tmp_path: Path) -> None:
    job = load_job_config(
        {"data": {"synth": {"rows": 3000, "num_files": 1}}, "cluster": {"data_dir": str(tmp_path)}}
    )
    meta = ensure_data(job)
    assert meta["rows"] == {"train": 2700, "eval": 300}
    stamp = (tmp_path / "synth" / "metadata.json").stat().st_mtime_ns
    assert ensure_data(job)["rows"] == meta["rows"]
    assert (tmp_path / "synth" / "metadata.json").stat().st_mtime_ns == stamp  # reused


@pytest.mark.gpu
def test_cuda_worker_matches_the_in_process_reference(data: Path, tmp_path: Path) -> None:
    job = make_job(data, tmp_path / "ckpt", steps=30, checkpoint_every_steps=15)
    client = CheckpointingClient(job.tables)
    got = run_worker(job, client, WorkerContext())  # cuda:0 by default
    ref = fit_inprocess(job)  # on the GPU too
    assert got.eval["auc"] == pytest.approx(ref.result.eval["auc"], abs=1e-3)
    resumed = run_worker(job, client, WorkerContext(), resume="must")
    assert resumed.resumed_from == "step-00000030" and resumed.eval == got.eval
