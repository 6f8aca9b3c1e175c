"""The training loop of a recps job: data, steps, evaluation, coordinated checkpoints, resume.

:func:`run_worker` is what one worker process runs (the Ray launcher calls it on every
worker; :func:`spawn_workers` does the same with plain processes): a DLRM / DeepFM /
Wide&Deep whose embeddings live on the parameter servers
(:class:`~recps.worker.embedding.ShardedEmbeddingBagCollection` through a
:class:`~recps.worker.pipeline.TrainPipeline`) and whose dense part is replicated on every
worker and kept in sync by DDP. :func:`run_inprocess` is the reference: the same model, data
order, global batch and hyperparameters in one process, embeddings in
:class:`~recps.worker.reference.LocalEmbeddingBagCollection`.

**Steps and batches.** ``data.batch_size`` is *per worker*: a step of W workers trains one
global batch of up to ``W * batch_size`` rows, rank r contributing its r-th shard's next
batch (:class:`~recps.worker.data.DataReader` sharded by rank). ``training.steps`` counts
these global steps. Every rank must take the same number of steps per epoch (DDP), so an
epoch lasts ``min`` over ranks of their batch counts; rows past that on a larger shard are
skipped (logged). The gradient of every step is that of the mean loss over the global batch:
the loss is ``sum over local rows * W / global rows``, DDP averages the dense gradients over
the W workers, and the gradients flowing into the embeddings are scaled by ``1/W`` so that
the W pushes the servers add up are the global mean's. With an SGD sparse optimizer this is
the same update as one process over the combined batch; adaptive server optimizers (Adagrad,
Adam) apply the W pushes one after the other, the usual parameter-server semantics, so hot
rows shared by several workers move slightly differently than in one process.

**Order** is deterministic given ``training.seed``, ``data.reader.seed``, the epoch and the
worker count: the reader's shuffling seed is derived from both seeds, and epoch ``e`` of rank
``r`` always yields the same batches.

**Staleness.** With ``max_inflight_pushes: 0`` the run is synchronous: every worker's lookup
of step s sees every worker's push of step s-1 and none of step s (two barriers per step when
W > 1). With k >= 1 a lookup may miss up to k steps of this worker's updates, and the other
workers' pushes land whenever they land (the usual asynchronous parameter-server contract).
The pipeline is drained at every evaluation, checkpoint and epoch boundary, so those
boundaries see all updates whatever k is.

**Evaluation** every ``eval_every_steps`` (default: each epoch's end) and at the end, on the
held-out split: each rank scores its shard with ``create_missing=False`` lookups, rank 0
computes AUC and logloss over all rows and every rank returns the same numbers.

**Coordinated checkpoints** every ``checkpoint_every_steps`` (default: each epoch's end) and
at the end, layout in :mod:`recps.worker.checkpoint`: all ranks drain their pushes and meet at
a barrier; rank 0 calls ``PSClient.checkpoint(checkpoint_dir, tag="step-NNNNNNNN")`` (every
shard at one instant), then writes ``dense.pt`` (dense weights, dense optimizer state, every
rank's RNG state, position in the data, history) and ``meta.json``, then the ``COMPLETE``
marker; a barrier ends it. The newest ``training.keep_checkpoints`` are kept.

**Resume** (``resume="auto"`` with a complete checkpoint, or ``"must"``): rank 0 rolls the
shards back with ``PSClient.restore`` (they may hold newer rows, e.g. when Ray restarted the
workers of a failed step), reads ``dense.pt`` and sends it to every rank; training continues
at the next step with the same data order (the batches of the current epoch already consumed
are skipped). With 1 worker and ``max_inflight_pushes: 0`` a resumed run ends with *bit for
bit* the rows and dense weights of an uninterrupted one. With several workers a shard adds
their pushes in whichever order they arrive, in the resumed run as in any run: equal to float
rounding with SGD, slightly different with Adagrad/Adam; k >= 1 adds timing nondeterminism.

Example (a job on one worker against shards listening at two addresses)::

    job = load_job_config("job.yaml")
    ensure_data(job)                                   # synthesizes data.synth if missing
    with PSClient(["127.0.0.1:7001", "127.0.0.1:7002"]) as client:
        result = run_worker(job, client, WorkerContext(), resume="auto")
    print(result.eval["auc"], result.checkpoints)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import pickle
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.csv as pacsv
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from recps.embedding.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    RecpsError,
)
from recps.embedding.hashing import seed_key
from recps.worker import checkpoint as ckpt
from recps.worker.checkpoint import CheckpointInfo, latest_checkpoint, list_checkpoints
from recps.worker.data import Batch, DataReader, ReaderConfig, ShardPlan
from recps.worker.embedding import (
    EmbeddingCollectionConfig,
    FeatureSpec,
    RowClient,
    ShardedEmbeddingBagCollection,
    keyed_ids,
)
from recps.worker.eval_metrics import auc, logloss
from recps.worker.job_config import DenseOptimizerConfig, JobConfig
from recps.worker.models import build_model, predict
from recps.worker.pipeline import PipelineConfig, TrainPipeline
from recps.worker.reference import LocalEmbeddingBagCollection

__all__ = [
    "CheckpointInfo",
    "InprocessRun",
    "ResumeMode",
    "TrainResult",
    "TrainerError",
    "WorkerContext",
    "build_job_model",
    "config_fingerprint",
    "data_paths",
    "distributed_backend",
    "embedding_collection_config",
    "ensure_data",
    "fit_inprocess",
    "latest_checkpoint",
    "list_checkpoints",
    "make_dense_optimizer",
    "run_inprocess",
    "run_worker",
    "spawn_workers",
]

log = logging.getLogger(__name__)

ResumeMode = Literal["auto", "never", "must"]
_POSTFIX_EVERY_S = 0.5  # tqdm postfix refresh: reading the loss syncs a CUDA stream


class TrainerError(RecpsError):
    """Training cannot go on: a rank failed in a collective step, or the data did not
    yield what the schedule planned."""

    status = "INTERNAL"


# ---------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerContext:
    """Where this worker sits in the job: its rank, the worker count, its device.

    ``device=None`` picks ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.

    Example:
        >>> WorkerContext(rank=1, world_size=2, device="cpu").torch_device
        device(type='cpu')
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"WorkerContext needs 0 <= rank < world_size, got rank={self.rank} "
                f"world_size={self.world_size}"
            )
        if self.local_rank < 0:
            raise ConfigError(f"local_rank must be >= 0, got {self.local_rank}")

    @property
    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


@dataclass
class TrainResult:
    """What a training run did; plain data (picklable), :meth:`to_dict` is JSON-able.

    ``steps`` is the global step reached (a resumed run counts the steps before the resume
    too) and ``samples`` the training rows of all workers up to it; ``seconds`` is this
    invocation's wall time, ``samples_per_s`` this invocation's training throughput (rows
    of all workers per second spent in training steps, evaluation and checkpoints excluded).
    """

    steps: int
    samples: int
    seconds: float
    samples_per_s: float
    eval: dict[str, float]  # the final evaluation: auc, logloss, rows ({} without eval data)
    history: list[dict[str, float]]  # one entry per evaluation (resumed runs: from step 0)
    checkpoints: list[str]  # tags written by this invocation
    resumed_from: str | None  # tag resumed from, if any

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=float))


@dataclass
class InprocessRun:
    """:func:`fit_inprocess`'s result and the trained model (embeddings in process)."""

    result: TrainResult
    model: nn.Module


# ---------------------------------------------------------------------------------------
# The job's pieces
# ---------------------------------------------------------------------------------------


def embedding_collection_config(job: JobConfig) -> EmbeddingCollectionConfig:
    """The job's features and tables as the embedding collection's config.

    Example:
        >>> from recps.worker.job_config import load_job_config
        >>> job = load_job_config({"data": {"train": "x"}, "features": {"C1": {}, "C2": "C1"}})
        >>> [(f.name, f.table) for f in embedding_collection_config(job).features]
        [('C1', 'C1'), ('C2', 'C1')]
    """
    features = tuple(FeatureSpec(f.name, str(f.table), f.pooling, f.input) for f in job.features)
    return EmbeddingCollectionConfig(features, tuple(job.tables))


def build_job_model(job: JobConfig, embeddings: nn.Module) -> nn.Module:
    """``job.model`` over ``embeddings`` (seed torch first for a reproducible dense init)."""
    return build_model(
        job.model.kind,
        embeddings,
        num_dense=len(job.data.reader.dense_features),
        **job.model.model_kwargs(),
    )


def make_dense_optimizer(
    config: DenseOptimizerConfig, params: Sequence[nn.Parameter]
) -> torch.optim.Optimizer:
    """The torch optimizer of the dense parameters (Adam, Adagrad or SGD).

    Example:
        >>> opt = make_dense_optimizer(DenseOptimizerConfig("sgd", lr=0.1, momentum=0.9),
        ...                            [nn.Parameter(torch.zeros(2))])
        >>> type(opt).__name__, opt.defaults["momentum"]
        ('SGD', 0.9)
    """
    params = list(params)
    c = config
    if c.kind == "adam":
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
    if c.kind == "adagrad":
        return torch.optim.Adagrad(params, lr=c.lr, weight_decay=c.weight_decay)
    if c.kind == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    raise ConfigError(f"unknown dense optimizer {c.kind!r}; choose adam, adagrad or sgd")


def _dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    # The in-process collection has parameters (its tables); they are not the dense part.
    return [p for n, p in model.named_parameters() if not n.startswith("embeddings.")]


def config_fingerprint(job: JobConfig) -> tuple[str, dict[str, str]]:
    """``(hash, {section: hash})`` of what a checkpoint must share with the job resuming it:
    data layout (batch size, reader, synthetic generator), tables, features, model, dense
    optimizer and ``training.seed``. Paths, step counts, eval/checkpoint frequencies,
    staleness and the cluster may change between runs.

    Example:
        >>> from recps.worker.job_config import load_job_config
        >>> a = load_job_config({"data": {"train": "x"}, "training": {"steps": 10}})
        >>> b = load_job_config({"data": {"train": "y"}, "training": {"steps": 99}})
        >>> c = load_job_config({"data": {"train": "x", "batch_size": 8}})
        >>> config_fingerprint(a)[0] == config_fingerprint(b)[0] != config_fingerprint(c)[0]
        True
    """
    d = job.to_dict()
    data = dict(d["data"])
    for k in ("train", "eval"):
        data.pop(k, None)
    if data.get("synth"):
        data["synth"] = {k: v for k, v in data["synth"].items() if k != "dir"}
    parts = {
        "data": data,
        "tables": d["tables"],
        "features": d["features"],
        "model": d["model"],
        "dense_optimizer": d["dense_optimizer"],
        "training.seed": d["training"]["seed"],
    }

    def h(x: Any) -> str:
        return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]

    sections = {k: h(v) for k, v in parts.items()}
    return h(sections), sections


def data_paths(job: JobConfig) -> tuple[str, str | None]:
    """``(train, eval or None)`` paths of the job's data (the synthetic dataset's splits)."""
    if job.data.synth is not None:
        root = Path(str(job.data.synth.dir))
        return str(root / "train"), str(root / "eval")
    return str(job.data.train), job.data.eval


def ensure_data(job: JobConfig, *, progress: bool = False) -> dict[str, Any]:
    """Make sure the job's data exists; call it once before the workers start.

    ``data.synth``: writes the synthetic dataset to ``data.synth.dir`` unless a complete one
    made with the same generator settings is there (a different one is replaced); returns its
    metadata. Files: checks that they exist; returns ``{"train": ..., "eval": ...}``.
    """
    from recps.worker.synth import read_metadata, write_dataset

    if job.data.synth is None:
        train, evl = data_paths(job)
        for p in (train, evl):
            if p is not None and not Path(p).exists():
                raise ConfigError(f"data path {p!r} does not exist")
        return {"train": train, "eval": evl}
    out = Path(str(job.data.synth.dir))
    want = dataclasses.asdict(job.data.synth.synth_config())
    if (out / "metadata.json").exists():
        meta = read_metadata(out)
        if meta.get("generator") == want:
            return meta
        log.warning("%s holds a synthetic dataset made with other settings; rewriting it", out)
    log.info("writing the synthetic dataset (%d rows) to %s", job.data.synth.rows, out)
    return write_dataset(out, job.data.synth.synth_config(), overwrite=True, progress=progress)


def distributed_backend(device: torch.device | str) -> str:
    """The ``torch.distributed`` backend for a device: NCCL on CUDA, gloo otherwise.

    >>> distributed_backend("cpu")
    'gloo'
    """
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _reader_config(job: JobConfig) -> ReaderConfig:
    # Both seeds decide the order: training.seed is the job's one knob, data.reader.seed
    # stays meaningful for people who set it.
    r = job.data.reader
    seed = int(seed_key("recps.trainer.order", job.training.seed, r.seed) >> np.uint64(1))
    return r.replace(batch_size=job.data.batch_size, seed=seed)


# ---------------------------------------------------------------------------------------
# The schedule: epochs, steps per epoch, global batch sizes
# ---------------------------------------------------------------------------------------


def _tsv_rows(path: str, cache: dict[str, int]) -> int:
    if path not in cache:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(autogenerate_column_names=True),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(include_columns=["f0"]),
        )
        cache[path] = sum(rb.num_rows for rb in reader)
    return cache[path]


class _Schedule:
    """Rows per rank and steps of each epoch, the global batch of each step: a pure function
    of the data files, the batch size and the worker count, the same on every rank."""

    def __init__(self, reader: DataReader, world_size: int, job: JobConfig) -> None:
        self._reader = reader
        self.world_size = world_size
        self.batch_size = job.data.batch_size
        self.drop_last = reader.config.drop_last
        self._rows: dict[int, tuple[int, ...]] = {}
        self._tsv: dict[str, int] = {}
        t = job.training
        if t.steps is not None:
            self.total_steps = int(t.steps)
        else:
            self.total_steps = sum(self.epoch_steps(e) for e in range(int(t.epochs or 1)))

    def _plan_rows(self, plan: ShardPlan) -> int:
        if plan.num_rows is not None:
            return plan.num_rows
        # A TSV is involved: count its rows once (a pass over the data, cached per file).
        if plan.mode != "row":
            return sum(_tsv_rows(u.file.path, self._tsv) for u in plan.units)
        total = sum(_tsv_rows(u.file.path, self._tsv) for u in plan.units)
        k, w, r = plan.interleave_rows, plan.world_size, plan.rank
        blocks = math.ceil(total / k)
        mine = max(0, (blocks - r + w - 1) // w)
        n = mine * k
        if mine and (blocks - 1) % w == r:
            n -= blocks * k - total
        return n

    def rows(self, epoch: int) -> tuple[int, ...]:
        """Training rows of each rank in ``epoch``."""
        if epoch not in self._rows:
            out = []
            for r in range(self.world_size):
                rd = copy.copy(self._reader)
                rd.rank, rd.world_size = r, self.world_size
                out.append(self._plan_rows(rd.plan(epoch)))
            self._rows[epoch] = tuple(out)
        return self._rows[epoch]

    def _batches(self, rows: int) -> int:
        b = self.batch_size
        return rows // b if self.drop_last else -(-rows // b)

    def epoch_steps(self, epoch: int) -> int:
        rows = self.rows(epoch)
        counts = [self._batches(n) for n in rows]
        steps = min(counts)
        if steps == 0:
            r = counts.index(0)
            raise ConfigError(
                f"worker {r} of {self.world_size} gets {rows[r]} training rows in epoch {epoch}"
                f" (batch_size {self.batch_size}): too few for one step; split the data into "
                "more files or row groups, or use fewer workers"
            )
        return steps

    def batch_sizes(self, epoch: int, pos: int) -> tuple[int, ...]:
        """Rows each rank contributes to step ``pos`` of ``epoch``."""
        b = self.batch_size
        return tuple(min(b, n - pos * b) for n in self.rows(epoch))

    def locate(self, step: int) -> tuple[int, int]:
        """``(epoch, position in it)`` of global step ``step`` (0-based)."""
        epoch = 0
        while step >= (n := self.epoch_steps(epoch)):
            step -= n
            epoch += 1
        return epoch, step

    def skipped_rows(self, epoch: int) -> int:
        """Rows of ``epoch`` no step reads (ranks with more batches than the shortest)."""
        n = self.epoch_steps(epoch)
        return sum(max(0, rows - n * self.batch_size) for rows in self.rows(epoch))


class _EpochCursor:
    """One reader's batches, kept open across the segments of an epoch."""

    def __init__(self, make: Callable[[int], Iterator[Any]]) -> None:
        self._make = make
        self._at: tuple[int, int] | None = None
        self._it: Iterator[Any] | None = None

    def take(self, epoch: int, pos: int, n: int) -> Iterator[Any]:
        """Items ``pos .. pos+n-1`` of ``epoch``; consecutive calls continue the stream."""
        if self._at != (epoch, pos) or self._it is None:
            self._it = self._make(epoch)
            for _ in itertools.islice(self._it, pos):  # resume: skip what was consumed
                pass
        self._at = (epoch, pos + n)
        return itertools.islice(self._it, n)


# ---------------------------------------------------------------------------------------
# Collective helpers (no-ops with one worker)
# ---------------------------------------------------------------------------------------


class _Comm:
    def __init__(self, ctx: WorkerContext) -> None:
        self.rank, self.world = ctx.rank, ctx.world_size
        if self.world > 1:
            if not dist.is_available() or not dist.is_initialized():
                raise ConfigError(
                    f"world_size={self.world} needs torch.distributed initialized first "
                    "(dist.init_process_group; Ray Train does it, spawn_workers too)"
                )
            if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world):
                raise ConfigError(
                    f"WorkerContext says rank {self.rank} of {self.world}, torch.distributed "
                    f"says rank {dist.get_rank()} of {dist.get_world_size()}"
                )

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        if not self.on:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        if not self.on:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def rank0(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0; its result, or its failure, reaches every rank (so no rank
        waits forever at the next collective when rank 0 failed)."""
        if not self.on:
            return fn()
        outcome: tuple[bool, Any] | None = None
        error: BaseException | None = None
        if self.rank == 0:
            try:
                outcome = (True, fn())
            except BaseException as e:
                error = e
                outcome = (False, f"{type(e).__name__}: {e}")
        outcome = self.broadcast(outcome)
        assert outcome is not None
        ok, value = outcome
        if ok:
            return value
        if error is not None:
            raise error
        raise TrainerError(f"rank 0 failed: {value}")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient (the sparse path's 1/W)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _ddp(module: nn.Module, device_ids: list[int] | None) -> nn.Module:
    # No buffer sync per forward: the models' buffers are constants (interaction indices).
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(module, device_ids=device_ids, forward_sync_buffers=False)
    return ddp(module, device_ids=device_ids, broadcast_buffers=False)


class _DenseTower(nn.Module):
    """The dense part of a model (what DDP wraps): pooled embeddings in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, pooled: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.forward_pooled(dense, pooled)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # fewer devices than when it was saved
            torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------
# The loop shared by the PS worker and the in-process reference
# ---------------------------------------------------------------------------------------


@dataclass
class _State:
    step: int = 0
    samples: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _due(step: int, every: int | None, epoch_end: bool) -> bool:
    return step % every == 0 if every is not None else epoch_end


def _next_multiple(step: int, every: int | None) -> int:
    return (step // every + 1) * every if every else sys.maxsize


def _metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    nan = float("nan")
    if not len(labels):
        return {"auc": nan, "logloss": nan, "rows": 0.0}
    try:
        area = auc(labels, scores)
    except RecpsError:  # one class only: AUC is undefined
        area = nan
    return {"auc": area, "logloss": logloss(labels, scores), "rows": float(len(labels))}


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="train", dynamic_ncols=True)


class _Loop:
    """Segments between stop points (evaluation, checkpoint, epoch end, the end), progress,
    history and reporting. Subclasses train a segment, evaluate and checkpoint."""

    def __init__(
        self,
        job: JobConfig,
        schedule: _Schedule,
        rank: int,
        device: torch.device,
        report: Callable[[dict[str, Any]], None] | None,
        progress: bool | None,
    ) -> None:
        self.job = job
        self.schedule = schedule
        self.rank = rank
        self.device = device
        self.report = report
        if progress is None:
            progress = sys.stderr.isatty()
        self.show_progress = progress and rank == 0
        self.checkpoints: list[str] = []
        self.state = _State()

    # -- to implement
    def train_segment(self, epoch: int, pos: int, n: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Run ``n`` steps from ``pos`` of ``epoch``; yield per step (rows of all workers,
        this rank's mean loss as a detached tensor)."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def checkpoint(self, epoch: int, pos: int) -> str | None:
        """Checkpoint after the current step; the next step is ``pos`` of ``epoch``."""
        return None

    # -- the loop
    def run(self) -> tuple[dict[str, float], float, float]:
        """Train to the end; returns (final eval, wall seconds, training seconds)."""
        sched, st, t = self.schedule, self.state, self.job.training
        total = sched.total_steps
        t_start = time.perf_counter()
        train_s = 0.0
        final_eval: dict[str, float] = {}
        bar = _progress_bar(self.show_progress, total, st.step)
        win = _Window(self.device)  # training since the last evaluation
        last_postfix = 0.0
        last_log = st.step
        try:
            if st.step >= total:  # resumed from the final checkpoint: nothing left to train
                final_eval = self.evaluate()
                if self.rank == 0 and self.report is not None:
                    epoch = float(sched.locate(total - 1)[0]) if total else 0.0
                    self.report(
                        {"step": float(st.step), "epoch": epoch, **final_eval, "done": True}
                    )
            while st.step < total:
                epoch, pos = sched.locate(st.step)
                n_epoch = sched.epoch_steps(epoch)
                if pos == 0 and self.rank == 0 and (skipped := sched.skipped_rows(epoch)):
                    log.info("epoch %d: %d rows past the shortest shard skipped", epoch, skipped)
                stop = min(
                    total,
                    st.step + n_epoch - pos,
                    _next_multiple(st.step, t.eval_every_steps),
                    _next_multiple(st.step, t.checkpoint_every_steps),
                )
                n = stop - st.step
                t0 = time.perf_counter()
                for rows, loss in self.train_segment(epoch, pos, n):
                    st.step += 1
                    st.samples += rows
                    win.add(rows, loss)
                    if bar is not None:
                        bar.update(1)
                        now = time.perf_counter()
                        if now - last_postfix > _POSTFIX_EVERY_S:
                            last_postfix = now
                            bar.set_postfix(
                                loss=f"{win.loss():.4f}",
                                samples_s=f"{win.rate(now - t0):,.0f}",
                            )
                    if self.rank == 0 and st.step - last_log >= t.log_every_steps:
                        last_log = st.step
                        log.info(
                            "step %d/%d loss %.4f samples/s %.0f",
                            st.step,
                            total,
                            win.loss(),
                            win.rate(time.perf_counter() - t0),
                        )
                seg_s = time.perf_counter() - t0
                train_s += seg_s
                win.seconds += seg_s
                epoch_end = pos + n == n_epoch
                final = st.step == total
                if _due(st.step, t.eval_every_steps, epoch_end) or final:
                    final_eval = self._evaluate_and_report(epoch, win, final)
                    win = _Window(self.device)
                if _due(st.step, t.checkpoint_every_steps, epoch_end) or final:
                    nxt = (epoch + 1, 0) if epoch_end else (epoch, pos + n)
                    tag = self.checkpoint(*nxt)
                    if tag is not None:
                        self.checkpoints.append(tag)
        finally:
            if bar is not None:
                bar.close()
        return final_eval, time.perf_counter() - t_start, train_s

    def _evaluate_and_report(self, epoch: int, win: _Window, final: bool) -> dict[str, float]:
        st = self.state
        metrics = self.evaluate()
        entry = {
            "step": float(st.step),
            "epoch": float(epoch),
            **metrics,
            "loss": win.loss(),
            "samples_per_s": win.rate(0.0),
        }
        st.history.append(entry)
        if self.rank == 0:
            log.info(
                "eval at step %d: auc %.4f logloss %.4f (%d rows)",
                st.step,
                metrics.get("auc", float("nan")),
                metrics.get("logloss", float("nan")),
                int(metrics.get("rows", 0)),
            )
            if self.report is not None:
                self.report({**entry, "samples": float(st.samples), "done": final})
        return metrics


class _Window:
    """Rows, loss and seconds of the training steps since the last evaluation."""

    def __init__(self, device: torch.device) -> None:
        self.rows = 0
        self.steps = 0
        self.seconds = 0.0  # of finished segments
        # Summed on the device: reading it would wait for the GPU at every step.
        self._loss = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, rows: int, loss: torch.Tensor) -> None:
        self.rows += rows
        self.steps += 1
        self._loss += loss.double()

    def loss(self) -> float:
        return float(self._loss.item()) / max(1, self.steps)

    def rate(self, running_s: float) -> float:
        return self.rows / max(self.seconds + running_s, 1e-9)


# ---------------------------------------------------------------------------------------
# Training through the parameter servers
# ---------------------------------------------------------------------------------------


def _eval_reader(path: str | None, job: JobConfig, rank: int, world: int) -> DataReader | None:
    if path is None:
        return None
    # Order does not matter for AUC/logloss: no shuffling, keep every row.
    cfg = _reader_config(job).replace(shuffle_buffer_rows=0, shuffle_files=False, drop_last=False)
    return DataReader(path, cfg, rank, world)


def _score(model: nn.Module, reader: DataReader, device: torch.device) -> tuple[np.ndarray, ...]:
    labels, scores = [], []
    for b in reader.epoch(0):
        dense = torch.from_numpy(np.require(b.dense, np.float32, ["C", "W"])).to(device)
        scores.append(predict(model, dense, keyed_ids(b)))
        labels.append(b.labels)
    if not labels:
        return np.zeros(0, np.float32), np.zeros(0, np.float64)
    return np.concatenate(labels), np.concatenate(scores)


def _check_batch(got: int, sizes: tuple[int, ...], rank: int, epoch: int, pos: int) -> None:
    if got != sizes[rank]:
        raise TrainerError(
            f"rank {rank}: step {pos} of epoch {epoch} has {got} rows, the schedule planned "
            f"{sizes[rank]}; did the data change while training?"
        )


class _PSLoop(_Loop):
    def __init__(
        self,
        job: JobConfig,
        schedule: _Schedule,
        ctx: WorkerContext,
        comm: _Comm,
        client: RowClient,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_reader: DataReader,
        eval_reader: DataReader | None,
        fingerprint: tuple[str, dict[str, str]],
        report: Callable[[dict[str, Any]], None] | None,
        progress: bool | None,
    ) -> None:
        super().__init__(job, schedule, ctx.rank, ctx.torch_device, report, progress)
        self.ctx, self.comm, self.client = ctx, comm, client
        self.model, self.optimizer = model, optimizer
        self.tower: nn.Module = _DenseTower(model)
        self.cursor = _EpochCursor(train_reader.epoch)
        self.eval_reader = eval_reader
        self.fingerprint = fingerprint
        t = job.training
        self.pipeline_config = PipelineConfig(
            prefetch_batches=t.prefetch_batches, max_inflight_pushes=t.max_inflight_pushes
        )
        # k = 0 promises synchronous training: every worker's lookup of step s sees every
        # push of step s-1 and none of step s. The pipeline orders one worker's lookups and
        # pushes; across workers it takes two barriers per step (a push runs inside
        # backward, possibly before DDP's allreduce makes the workers wait for each other).
        self.sync_steps = comm.on and t.max_inflight_pushes == 0
        self.can_checkpoint = callable(getattr(client, "checkpoint", None))
        self.root = Path(str(t.checkpoint_dir))
        self._warned = False

    def train_segment(self, epoch: int, pos: int, n: int) -> Iterator[tuple[int, torch.Tensor]]:
        world, rank = self.ctx.world_size, self.ctx.rank
        embeddings = self.model.embeddings
        batches = self.cursor.take(epoch, pos, n)
        with TrainPipeline(embeddings, batches, self.pipeline_config) as pipe:
            for i, step in enumerate(pipe):
                if self.sync_steps:  # every rank has its rows of this step: now push
                    dist.barrier()
                sizes = self.schedule.batch_sizes(epoch, pos + i)
                _check_batch(len(step), sizes, rank, epoch, pos + i)
                pooled = embeddings(step.sparse)
                if world > 1:  # the servers add the W pushes: each carries 1/W of the mean
                    pooled = {k: _ScaleGrad.apply(v, 1.0 / world) for k, v in pooled.items()}
                logits = self.tower(step.dense, pooled)
                loss_sum = F.binary_cross_entropy_with_logits(logits, step.labels, reduction="sum")
                self.optimizer.zero_grad(set_to_none=True)
                # DDP averages dense gradients over W: scale so the average is the global mean.
                (loss_sum * (world / sum(sizes))).backward()
                self.optimizer.step()
                if self.sync_steps:  # every push of this step is applied: now look up
                    dist.barrier()
                yield sum(sizes), loss_sum.detach() / len(step)
        # Leaving the pipeline applied every push of this rank; the barrier waits for all
        # ranks' pushes, so evaluation, checkpoints and the next segment see them.
        self.comm.barrier()

    def evaluate(self) -> dict[str, float]:
        if self.eval_reader is None:
            return {}
        labels, scores = _score(self.model, self.eval_reader, self.device)
        parts = self.comm.gather((labels, scores))
        metrics = None
        if parts is not None:
            metrics = _metrics(
                np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            )
        return self.comm.broadcast(metrics)

    def checkpoint(self, epoch: int, pos: int) -> str | None:
        if not self.can_checkpoint:
            if self.rank == 0 and not self._warned:
                log.warning("%s has no checkpoint(): not checkpointing", type(self.client))
            self._warned = True
            return None
        st = self.state
        tag = ckpt.checkpoint_tag(st.step)
        rng = self.comm.gather(_rng_state())
        config_hash, sections = self.fingerprint

        def write() -> str:
            t0 = time.perf_counter()
            path = ckpt.new_checkpoint_dir(self.root, tag)
            shards = self.client.checkpoint(str(self.root), tag=tag)  # type: ignore[attr-defined]
            position = {
                "step": st.step,
                "epoch": epoch,
                "step_in_epoch": pos,
                "samples": st.samples,
                "world_size": self.ctx.world_size,
                "config_hash": config_hash,
            }
            state = {
                "format": ckpt.FORMAT,
                **position,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng": rng,
                "history": st.history,
            }
            ckpt.write_dense(path, state)
            meta = {
                **position,
                "fingerprint": sections,
                "history": st.history,
                "shards": {
                    str(k): {"path": getattr(v, "path", ""), "rows": int(getattr(v, "rows", 0))}
                    for k, v in (shards or {}).items()
                },
                "job": self.job.to_dict(),
            }
            ckpt.finish_checkpoint(path, meta)
            gone = ckpt.prune_checkpoints(self.root, self.job.training.keep_checkpoints, st.step)
            log.info(
                "checkpoint %s written in %.2f s%s",
                path,
                time.perf_counter() - t0,
                f" (deleted {', '.join(gone)})" if gone else "",
            )
            return tag

        return self.comm.rank0(write)


def _pick_checkpoint(
    job: JobConfig,
    resume: ResumeMode,
    world: int,
    fingerprint: tuple[str, dict[str, str]],
) -> CheckpointInfo | None:
    """The checkpoint to resume from (rank 0), validated against this job; None: fresh."""
    if resume == "never":
        return None
    root = Path(str(job.training.checkpoint_dir))
    want = job.training.resume
    if want in (None, "latest"):
        info = latest_checkpoint(root)
        if info is None:
            if resume == "must":
                partial = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
                raise CheckpointNotFoundError(
                    f"resume='must', but {root} holds no complete checkpoint"
                    + (f" ({', '.join(partial)}: incomplete, ignored)" if partial else "")
                    + "; start without resuming, or point training.checkpoint_dir at the "
                    "job's checkpoints"
                )
            return None
    else:
        path = Path(str(want))
        if not path.is_absolute() and len(path.parts) == 1:
            path = root / path  # a tag
        info = ckpt.read_checkpoint(path)
    if info.world_size != world:
        raise CheckpointMismatchError(
            f"checkpoint {info.path} was taken with {info.world_size} worker(s), this run has "
            f"{world}: the data shards and the position in the epoch depend on the worker "
            f"count. Resume with cluster.num_workers: {info.world_size}, or start fresh."
        )
    config_hash, sections = fingerprint
    if info.config_hash != config_hash:
        saved = (info.meta or {}).get("fingerprint", {})
        changed = sorted(k for k in {*saved, *sections} if saved.get(k) != sections.get(k))
        raise CheckpointMismatchError(
            f"checkpoint {info.path} belongs to a different job: "
            f"{', '.join(changed) or 'the config'} changed since it was taken, so its weights "
            "and data position do not fit this job. Restore those settings, or start fresh "
            "(resume='never', or another training.checkpoint_dir)."
        )
    return info


def _load_state(
    loop: _Loop,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    raw: bytes,
    rank: int,
    info: CheckpointInfo,
) -> None:
    state = ckpt.load_dense(raw, map_location=loop.device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng = state.get("rng") or []
    if rank < len(rng) and rng[rank] is not None:
        _set_rng_state(rng[rank])
    loop.state = _State(int(state["step"]), int(state["samples"]), list(state["history"]))
    step = loop.state.step
    if step < loop.schedule.total_steps:
        where = loop.schedule.locate(step)
        saved = (int(state["epoch"]), int(state["step_in_epoch"]))
        if where != saved:
            raise CheckpointMismatchError(
                f"checkpoint {info.path}: step {step} is at (epoch, batch) {saved} there, "
                f"{where} with the data as it is now; the training data changed"
            )


def _result(loop: _Loop, start: _State, out: tuple[dict[str, float], float, float]) -> TrainResult:
    final_eval, wall_s, train_s = out
    st = loop.state
    new = st.samples - start.samples
    return TrainResult(
        steps=st.step,
        samples=st.samples,
        seconds=wall_s,
        samples_per_s=new / train_s if train_s > 0 else 0.0,
        eval=dict(final_eval),
        history=[dict(h) for h in st.history],
        checkpoints=list(loop.checkpoints),
        resumed_from=None,
    )


def run_worker(
    job: JobConfig,
    client: RowClient,
    ctx: WorkerContext | None = None,
    *,
    resume: ResumeMode = "auto",
    report: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train ``job`` as worker ``ctx.rank`` of ``ctx.world_size``; see the module docstring.

    ``client`` reaches the shards (a :class:`~recps.ps.client.PSClient`; checkpoints need
    its ``checkpoint``/``restore``). With ``world_size > 1`` the caller has initialized
    ``torch.distributed`` (gloo on CPU, NCCL on GPU: :func:`distributed_backend`). The data
    must exist (:func:`ensure_data`). ``resume``: ``"auto"`` continues from the newest
    complete checkpoint in ``training.checkpoint_dir`` (or the one ``training.resume``
    names) when there is one, ``"must"`` raises :class:`CheckpointNotFoundError` when there
    is none, ``"never"`` starts fresh. ``report(metrics)`` is called on rank 0 after every
    evaluation (the last one with ``done=True``). ``progress``: a tqdm bar on rank 0;
    None shows it when stderr is a terminal.

    Example::

        with PSClient(shard_map) as client:
            result = run_worker(job, client, WorkerContext(rank, world, local_rank))
    """
    ctx = ctx or WorkerContext()
    if resume not in ("auto", "never", "must"):
        raise ConfigError(f"resume must be 'auto', 'never' or 'must', got {resume!r}")
    comm = _Comm(ctx)
    device = ctx.torch_device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL object collectives use the current device
    train_path, eval_path = data_paths(job)
    train_reader = DataReader(train_path, _reader_config(job), ctx.rank, ctx.world_size)
    eval_reader = _eval_reader(eval_path, job, ctx.rank, ctx.world_size)
    schedule = _Schedule(train_reader, ctx.world_size, job)
    fingerprint = config_fingerprint(job)

    def setup() -> tuple[CheckpointInfo, bytes] | None:
        create = getattr(client, "create_table", None)
        if create is not None:  # the launcher made them; harmless when it did
            for t in job.tables:
                create(t, if_not_exists=True)
        info = _pick_checkpoint(job, resume, ctx.world_size, fingerprint)
        if info is None:
            return None
        restore = getattr(client, "restore", None)
        if restore is None:
            raise ConfigError(f"{type(client).__name__} cannot restore checkpoints")
        t0 = time.perf_counter()
        restore(info.root, info.tag)  # the shards may hold newer rows: roll them back
        log.info("restored the shards to %s in %.2f s", info.path, time.perf_counter() - t0)
        return info, ckpt.read_dense_bytes(info.path)

    picked = comm.rank0(setup)
    torch.manual_seed(job.training.seed)  # the same dense init on every rank
    embeddings = ShardedEmbeddingBagCollection(
        embedding_collection_config(job), client, create_tables=False
    )
    model = build_job_model(job, embeddings).to(device)
    optimizer = make_dense_optimizer(job.dense_optimizer, _dense_parameters(model))
    loop = _PSLoop(
        job,
        schedule,
        ctx,
        comm,
        client,
        model,
        optimizer,
        train_reader,
        eval_reader,
        fingerprint,
        report,
        progress,
    )
    resumed_from = None
    if picked is not None:
        info, raw = picked
        _load_state(loop, model, optimizer, raw, ctx.rank, info)
        resumed_from = info.tag
        if ctx.rank == 0:
            log.info("resuming at step %d from %s", loop.state.step, info.path)
    if comm.on:
        ddp_devices = [device.index] if device.type == "cuda" else None
        loop.tower = _ddp(_DenseTower(model), ddp_devices)
    start = copy.deepcopy(loop.state)
    result = _result(loop, start, loop.run())
    result.resumed_from = resumed_from
    return result


# ---------------------------------------------------------------------------------------
# The in-process reference
# ---------------------------------------------------------------------------------------


class _LocalLoop(_Loop):
    def __init__(
        self,
        job: JobConfig,
        schedule: _Schedule,
        device: torch.device,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        readers: list[DataReader],
        eval_reader: DataReader | None,
        progress: bool | None,
    ) -> None:
        super().__init__(job, schedule, 0, device, None, progress)
        self.model, self.optimizer = model, optimizer
        self.cursors = [_EpochCursor(r.epoch) for r in readers]
        self.eval_reader = eval_reader

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(a, np.float32, ["C", "W"])).to(self.device)

    def train_segment(self, epoch: int, pos: int, n: int) -> Iterator[tuple[int, torch.Tensor]]:
        parts = [c.take(epoch, pos, n) for c in self.cursors]
        for i, batches in enumerate(zip(*parts)):
            sizes = self.schedule.batch_sizes(epoch, pos + i)
            for r, b in enumerate(batches):
                _check_batch(len(b), sizes, r, epoch, pos + i)
            batch: Batch = Batch.concat(batches)  # rank order, as the workers' global batch
            pooled = self.model.embeddings(keyed_ids(batch))
            logits = self.model.forward_pooled(self._tensor(batch.dense), pooled)
            labels = self._tensor(batch.labels)
            loss_sum = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
            self.optimizer.zero_grad(set_to_none=True)
            (loss_sum / len(batch)).backward()  # the sparse update happens in backward
            self.optimizer.step()
            yield len(batch), loss_sum.detach() / len(batch)

    def evaluate(self) -> dict[str, float]:
        if self.eval_reader is None:
            return {}
        return _metrics(*_score(self.model, self.eval_reader, self.device))


def fit_inprocess(
    job: JobConfig, *, progress: bool | None = None, device: str | None = None
) -> InprocessRun:
    """:func:`run_inprocess`, returning the trained model too (for comparing rows).

    Read ``model.embeddings.rows(table, ids)`` for the embedding rows.
    """
    world = job.cluster.num_workers
    dev = WorkerContext(device=device).torch_device
    train_path, eval_path = data_paths(job)
    cfg = _reader_config(job)
    readers = [DataReader(train_path, cfg, r, world) for r in range(world)]
    schedule = _Schedule(readers[0], world, job)
    torch.manual_seed(job.training.seed)  # the same dense init as the workers
    embeddings = LocalEmbeddingBagCollection(embedding_collection_config(job))
    model = build_job_model(job, embeddings).to(dev)
    optimizer = make_dense_optimizer(job.dense_optimizer, _dense_parameters(model))
    loop = _LocalLoop(
        job,
        schedule,
        dev,
        model,
        optimizer,
        readers,
        _eval_reader(eval_path, job, 0, 1),
        progress,
    )
    result = _result(loop, _State(), loop.run())
    return InprocessRun(result, model)


def run_inprocess(job: JobConfig, *, progress: bool | None = None) -> TrainResult:
    """Train ``job`` in this process: the reference a recps run is measured against.

    The same model and dense init, data order, global batch (the ``cluster.num_workers``
    ranks' batches of each step concatenated in rank order), steps, evaluations and
    hyperparameters as :func:`run_worker` on that many workers, with the embeddings in
    :class:`~recps.worker.reference.LocalEmbeddingBagCollection` (the servers' sparse
    optimizer, applied to the combined batch's gradient). No shards, no checkpoints.

    Example::

        ref = run_inprocess(job)
        print(ref.eval["auc"], ref.history[-1]["logloss"])
    """
    return fit_inprocess(job, progress=progress).result


# ---------------------------------------------------------------------------------------
# Plain multi-process launch (no Ray): tests, benchmarks, a single machine
# ---------------------------------------------------------------------------------------


def _spawned(
    rank: int,
    world: int,
    init_method: str,
    job: JobConfig,
    cluster: Any,
    client_config: Any,
    resume: ResumeMode,
    threads: int | None,
    device: str | None,
    out_dir: str,
    timeout_s: float,
) -> None:
    from recps.ps.client import PSClient

    if threads is not None:
        torch.set_num_threads(threads)
    ctx = WorkerContext(rank, world, rank, device)
    dist.init_process_group(
        distributed_backend(ctx.torch_device),
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        client = PSClient(cluster, client_config)
        try:
            result = run_worker(job, client, ctx, resume=resume, progress=False)
        finally:
            client.close()
        with open(os.path.join(out_dir, f"result-{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        # The DDP model holds the process group, and a reference cycle can keep it alive
        # past destroy_process_group until interpreter finalization, where gloo's threads
        # then die in std::terminate (SIGABRT after a successful run: ~1 run in 10 of
        # test_two_sync_workers_equal_one_process_on_the_combined_batch). Collecting first
        # frees it while the interpreter is whole: 0 in 30.
        gc.collect()
        dist.destroy_process_group()


def spawn_workers(
    job: JobConfig,
    cluster: Any,
    num_workers: int | None = None,
    *,
    resume: ResumeMode = "auto",
    client_config: Any = None,
    threads: int | None = None,
    device: str | None = None,
    timeout_s: float = 300.0,
) -> list[TrainResult]:
    """Run ``job`` on ``num_workers`` (default ``cluster.num_workers``) local processes.

    Each process (``torch.multiprocessing`` spawn) joins a gloo / NCCL group, opens its own
    ``PSClient(cluster, client_config)`` (``cluster``: shard addresses, a ``ShardMap`` or a
    cluster file) and calls :func:`run_worker`. ``threads`` sets torch's intra-op threads
    per process; ``device`` every worker's device (None: ``cuda:<rank>`` when there are
    enough GPUs, else CPU). Returns every rank's :class:`TrainResult`; a failing worker
    raises ``torch.multiprocessing.ProcessRaisedException`` with its traceback.

    Example::

        results = spawn_workers(job, ["127.0.0.1:7001", "127.0.0.1:7002"], 2, threads=1)
    """
    import torch.multiprocessing as mp

    world = num_workers or job.cluster.num_workers
    if device is None and torch.cuda.is_available() and torch.cuda.device_count() < world:
        device = "cpu"  # one process per GPU, or none
    with tempfile.TemporaryDirectory(prefix="recps-spawn-") as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.start_processes(
            _spawned,
            args=(
                world,
                init,
                job,
                cluster,
                client_config,
                resume,
                threads,
                device,
                tmp,
                timeout_s,
            ),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        out = []
        for r in range(world):
            with open(os.path.join(tmp, f"result-{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
        return out
