"""Run a training job on Ray: PS shards as actors, workers through Ray Train's ``TorchTrainer``.

This is ``recps train --config job.yaml``. One call to :func:`run_job`:

1. validates the job (done by :func:`~recps.worker.job_config.load_job_config`) and the
   state of ``cluster.data_dir``: a directory holding an earlier run needs ``resume`` (go on
   from its last checkpoint) or ``overwrite`` (start over), never a silent mix of the two;
2. makes the synthetic dataset when the job asks for one (once, in the driver);
3. starts a local Ray (or joins ``--address``), starts the PS shards as actors in a
   placement group (:mod:`recps.worker.ray_cluster`), writes ``<data_dir>/cluster.json``
   (so ``recps status --data-dir <data_dir>`` works while the job runs) and creates tables;
4. runs :func:`recps.worker.trainer.run_worker` in ``cluster.num_workers`` Ray Train workers
   (gloo on CPU, NCCL when the workers have GPUs). A worker that dies makes Ray Train restart
   the group (``cluster.max_failures`` times); the new workers find the last complete
   checkpoint, roll the shards back to it and go on from its step;
5. stops the shards and the local Ray, and checks that no process it started survives.

Only this module and :mod:`recps.worker.ray_cluster` import Ray.

Example:
    >>> from recps.worker.job_config import load_job_config
    >>> job = load_job_config({"data": {"synth": {"rows": 20000}},
    ...                        "cluster": {"num_workers": 2, "num_shards": 2,
    ...                                    "data_dir": "/tmp/recps-job"}})
    >>> result = run_job(job, overwrite=True)  # doctest: +SKIP
    >>> round(result.eval["auc"], 3)  # doctest: +SKIP
    0.741
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from recps.embedding import errors as E
from recps.ps.client import PSClient
from recps.ps.cluster import pid_alive
from recps.ps.config import ClientConfig
from recps.ps.routing import ShardMap
from recps.worker.job_config import JobConfig
from recps.worker.ray_cluster import RayPSCluster, RayPSConfig, init_ray, shutdown_ray

log = logging.getLogger("recps.worker.launcher")

PIDS_DIR = "worker-pids"  # <data_dir>/worker-pids/rank-<r>.pid: which process is which rank
ATTEMPTS = "attempts"  # <data_dir>/worker-pids/attempts: a line per worker-group start
CLUSTER_FILE = "cluster.json"


class JobStateError(E.ConfigError):
    """``cluster.data_dir`` holds an earlier run and the caller said neither resume nor
    overwrite (or said resume and there is nothing to resume)."""


class JobFailedError(E.RecpsError):
    """The training workers failed more often than ``cluster.max_failures`` allows."""


@dataclass
class JobResult:
    """What :func:`run_job` returns (and ``recps train --json`` prints)."""

    name: str
    steps: int
    samples: int
    seconds: float  # wall time of the training phase (Ray Train's fit, worker start-up included)
    samples_per_s: float  # rank 0's training loop, evals and checkpoints included
    eval: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    resumed_from: str | None = None
    planted_auc: float | None = None  # the synthetic data's ceiling, when data.synth is used
    total_seconds: float = 0.0  # everything: data, Ray, shards, training, shutdown
    ray_start_s: float = 0.0
    restarts: int = 0  # worker-group restarts after failures
    data_dir: str = ""
    train_seconds: float = 0.0  # rank 0's training loop alone

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- data-dir state --------------------------------------------------------------------------


def _result_file(job: JobConfig) -> Path:
    return Path(job.cluster.data_dir) / "result.json"


def _checkpoint_dir(job: JobConfig) -> Path:
    return Path(job.training.checkpoint_dir or Path(job.cluster.data_dir) / "checkpoints")


def _ps_dir(job: JobConfig) -> Path:
    return Path(job.cluster.data_dir) / "ps"


def prepare_data_dir(job: JobConfig, *, resume: bool, overwrite: bool) -> bool:
    """Check (and with ``overwrite`` clear) earlier state; True when the job resumes.

    State is the shards' data (``<data_dir>/ps``) and the checkpoints. The synthetic
    dataset is not state: it is kept and reused when its settings match.
    """
    from recps.worker.trainer import latest_checkpoint

    if resume and overwrite:
        raise JobStateError("resume and overwrite exclude each other")
    ckpt_dir, ps_dir = _checkpoint_dir(job), _ps_dir(job)
    has_state = ps_dir.exists() and any(ps_dir.iterdir())
    latest = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if resume:
        if latest is None:
            raise JobStateError(
                f"nothing to resume: no complete checkpoint in {ckpt_dir} "
                "(run without --resume to start the job)"
            )
        return True
    if overwrite:
        for d in (ps_dir, ckpt_dir, Path(job.cluster.data_dir) / PIDS_DIR):
            shutil.rmtree(d, ignore_errors=True)
        return False
    if has_state or latest is not None:
        raise JobStateError(
            f"{job.cluster.data_dir} holds an earlier run (shards in {ps_dir}"
            + (f", checkpoint {latest.tag}" if latest is not None else "")
            + "); pass --resume to go on from its last checkpoint or --overwrite to start over"
        )
    return False


# ---- the worker side -------------------------------------------------------------------------


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: one rank of the job."""
    from recps.worker.trainer import WorkerContext, run_worker

    job: JobConfig = config["job"]
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", force=True)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    pids = Path(job.cluster.data_dir) / PIDS_DIR
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank-{rank}.pid").write_text(str(os.getpid()))
    if rank == 0:  # one line per attempt of the worker group: restarts = lines - 1
        with open(pids / ATTEMPTS, "a") as f:
            f.write(f"{time.time():.3f} {os.getpid()}\n")
    device = ray.train.torch.get_device()
    wctx = WorkerContext(
        rank=rank,
        world_size=world,
        local_rank=ctx.get_local_rank(),
        device=str(device),
    )
    client_cfg = ClientConfig(timeout_s=config["client_timeout_s"])
    client = PSClient(ShardMap.from_dict(config["shard_map"]), client_cfg)
    # Every rank must call ray.train.report equally often (it is a barrier), so the
    # periodic metrics go to the log, and the result is reported once, by all ranks.
    try:
        result = run_worker(
            job,
            client,
            wctx,
            resume=config["resume"],
            # The trainer logs evals itself; the full metrics only at debug level.
            report=lambda m: log.debug("step %s: %s", m.get("step"), m),
            progress=config["progress"] and rank == 0,
        )
    finally:
        client.close()
    if rank == 0:  # Ray Train v2 drops metrics reported without a checkpoint: use a file
        out = _result_file(job)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_dict()))
        os.replace(tmp, out)
    ray.train.report({"steps": result.steps})  # Ray logs this dict: keep it short


# ---- the driver ------------------------------------------------------------------------------


def _local_cpus(job: JobConfig) -> int:
    """Logical CPUs for a local Ray: what the job asks for, plus room to double its shards
    (`recps shard add` starts each as one more actor of ``cpus_per_shard``), at least this
    machine's count.

    On a 2-core laptop a 2-worker, 2-shard job asks for 4 (+2 spare); Ray's CPUs are
    scheduling units, so oversubscribing them is how a small machine runs the whole job.
    """
    c = job.cluster
    need = c.num_workers * c.cpus_per_worker + 2 * c.num_shards * c.cpus_per_shard
    return max(int(-(-need // 1)), os.cpu_count() or 1)


def run_job(
    job: JobConfig,
    *,
    address: str | None = None,
    resume: bool | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    client_timeout_s: float = 60.0,
) -> JobResult:
    """Run ``job`` to the end on Ray (see the module docstring); returns its result.

    ``resume=None`` takes ``training.resume`` from the job. ``address`` overrides
    ``cluster.address``. ``progress`` shows the rank-0 progress bar (default: when stderr is
    a terminal).
    """
    from recps.worker.trainer import ensure_data

    t_start = time.perf_counter()
    if resume is None:
        resume = job.training.resume is not None
    resuming = prepare_data_dir(job, resume=resume, overwrite=overwrite)
    Path(job.cluster.data_dir).mkdir(parents=True, exist_ok=True)
    attempts = Path(job.cluster.data_dir) / PIDS_DIR / ATTEMPTS
    attempts.unlink(missing_ok=True)
    meta = ensure_data(job) or {}
    address = address if address is not None else job.cluster.address
    # Workers' log lines (progress, evals) reach this terminal; shards stay quiet.
    info = init_ray(address, None if address else _local_cpus(job), log_to_driver=True)
    ps: RayPSCluster | None = None
    try:
        ps = RayPSCluster.start(RayPSConfig.from_job(job.cluster))
        ps.write_cluster_file(Path(job.cluster.data_dir) / CLUSTER_FILE)
        with ps.client(ClientConfig(timeout_s=client_timeout_s)) as client:
            for table in job.tables:
                client.create_table(table, if_not_exists=True)
        c = job.cluster
        use_gpu = c.gpus_per_worker > 0
        resources = {"CPU": c.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = c.gpus_per_worker
        storage = Path(job.cluster.data_dir).resolve() / "ray_results"
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "job": job,
                "shard_map": ps.shard_map.to_dict(),
                # "auto" after the first attempt too: a restarted group resumes from the
                # newest checkpoint (a fresh run cleared them, so none means a fresh start).
                "resume": "must" if resuming else "auto",
                "progress": bool(progress) if progress is not None else _tty(),
                "client_timeout_s": client_timeout_s,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=c.num_workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=f"recps-{job.name or 'job'}",
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=c.max_failures),
            ),
        )
        _result_file(job).unlink(missing_ok=True)  # never report an earlier run's result
        t_fit = time.perf_counter()
        try:
            with ps.watching(interval_s=1.0):  # a restarted shard's new pid/port published
                fit = trainer.fit()
        except Exception as e:  # Ray Train's TrainingFailedError and friends
            raise JobFailedError(f"training failed: {type(e).__name__}: {e}") from e
        fit_s = time.perf_counter() - t_fit
        if getattr(fit, "error", None) is not None:
            raise JobFailedError(f"training failed: {fit.error}") from fit.error
        try:
            worker = json.loads(_result_file(job).read_text())
        except FileNotFoundError as e:
            raise JobFailedError("training ended without rank 0 writing its result") from e
        restarts = _restarts(Path(job.cluster.data_dir))
    finally:
        if ps is not None:
            ps.shutdown()
        if info.started_here:
            shutdown_ray()
    return JobResult(
        name=job.name or "job",
        steps=int(worker["steps"]),
        samples=int(worker["samples"]),
        seconds=fit_s,
        samples_per_s=float(worker["samples_per_s"]),
        eval=dict(worker["eval"]),
        history=list(worker.get("history", [])),
        checkpoints=list(worker.get("checkpoints", [])),
        resumed_from=worker.get("resumed_from"),
        planted_auc=meta.get("planted_auc") if isinstance(meta, dict) else None,
        total_seconds=time.perf_counter() - t_start,
        ray_start_s=info.init_s,
        restarts=restarts,
        data_dir=str(Path(job.cluster.data_dir).resolve()),
        train_seconds=float(worker["seconds"]),
    )


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _restarts(data_dir: Path) -> int:
    """How many times Ray Train restarted the worker group in this run."""
    try:
        return max(0, len((data_dir / PIDS_DIR / ATTEMPTS).read_text().splitlines()) - 1)
    except OSError:
        return 0


def worker_pids(data_dir: str | Path) -> dict[int, int]:
    """rank -> pid of the job's training workers (the latest attempt's), from their pid files."""
    out: dict[int, int] = {}
    for p in sorted((Path(data_dir) / PIDS_DIR).glob("rank-*.pid")):
        try:
            out[int(p.stem.split("-")[1])] = int(p.read_text())
        except (OSError, ValueError):
            continue
    return out


def kill_worker(data_dir: str | Path, rank: int = 0, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to a training worker (fault injection for tests and drills)."""
    pid = worker_pids(data_dir).get(rank)
    if pid is None or not pid_alive(pid):
        raise E.ShardUnavailableError(f"no live training worker of rank {rank} in {data_dir}")
    os.kill(pid, sig)
    return pid
