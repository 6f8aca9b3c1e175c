"""Benchmark DLRM training through parameter-server shards against the in-process reference.

    .venv/bin/python benchmarks/train.py            # full run
    .venv/bin/python benchmarks/train.py --quick    # under 30 s, shard start-up included

Prints progress on stderr, then one JSON object on the last stdout line. Ratios matter;
absolute numbers on a shared 2-core machine (trainer and shards on the same cores) do not.

Workload: a DLRM (bottom MLP 13 -> 64 -> 16, dot interactions, top MLP 64 -> 32 -> 1) over
26 embedding tables of dim 16 (Adagrad, lr 0.05, on the servers and in process alike),
dense parameters trained by Adam (lr 1e-3) on both sides, batches of 4096 rows of the
synthetic Criteo-shaped dataset (:mod:`recps.worker.synth`: Zipf ids, vocabularies up to
100k per feature), generated to a temporary Parquet directory and read into memory before
anything is timed.

* ``ps_samples_per_s``: one worker, ``--shards`` (2) shard processes (``python -m
  recps.ps.main``, 127.0.0.1 port 0, RocksDB data dirs in a temporary directory),
  :class:`ShardedEmbeddingBagCollection` + :class:`TrainPipeline` with prefetch and
  ``max_inflight_pushes = --staleness`` (bounded staleness; the optimizer runs on the
  servers while the worker computes).
* ``inprocess_samples_per_s``: :class:`LocalEmbeddingBagCollection` (``EmbeddingBag``
  tables, the same Adagrad applied to the touched rows during backward), plain loop.
* ``ratio`` = ps / inprocess.

Both sides run the same warm-up steps first (first touch of the hottest rows, allocator and
torch warm-up), untimed. Then ``--rounds`` rounds, each running ``--steps`` steps of one side
and then the same steps of the other (the order alternates per round), so that load from
other processes hits both alike. A round's rate is its steady state: batch size over the
mean interval between the ends of consecutive steps (the first step's own time is left
out on both sides). Each side's rate is its best round; ``ratio_per_round`` and
``ratio_median`` show the spread. A PS round is one pipeline: ``ratio_with_fill`` counts
each round from pipeline creation to its final flush instead (the first lookup, which
nothing overlaps, and the last pushes), and ``ps_fill_drain_ms_per_round`` is that cost.
torch runs with ``--threads`` intra-op threads on both sides.

The breakdown (``ps_breakdown``, from :class:`PipelineStats` and :class:`EmbeddingStats`
over the timed rounds) says where the trainer thread spent its time: waiting for rows
(``wait_rows_frac``), blocked on push back-pressure (``push_wait_frac``) or computing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 4096
TABLES = 26
DIM = 16

# Runs in the child before exec: die with this process, then become the shard.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"  # PR_SET_PDEATHSIG
    "    if os.getppid() != int(sys.argv[1]):\n"
    "        sys.exit(3)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'recps.ps.main', *sys.argv[2:]])\n"
)


def log(msg: str) -> None:
    print(f"[train bench] {msg}", file=sys.stderr, flush=True)


# ---- shard processes -----------------------------------------------------------------------


class ShardProcs:
    """``n`` shard processes; ``close`` stops (SIGTERM, then SIGKILL) every one it started."""

    def __init__(self, root: Path, n: int, args: Sequence[str] = ()) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.logs = [root / f"shard-{i}.log" for i in range(n)]
        self._lines: list[queue.Queue[str | None]] = []
        for i in range(n):
            argv = [
                *("--data-dir", str(root / f"shard-{i}"), "--shard-id", str(i), "--port", "0"),
                *args,
            ]
            with open(self.logs[i], "wb") as err:
                p = subprocess.Popen(
                    [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    text=True,
                )
            self.procs.append(p)
            q: queue.Queue[str | None] = queue.Queue()
            self._lines.append(q)
            threading.Thread(target=self._pump, args=(p, q), daemon=True).start()

    @staticmethod
    def _pump(p: subprocess.Popen[str], q: queue.Queue[str | None]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            q.put(line)
        q.put(None)

    def addresses(self, timeout_s: float = 60.0) -> list[str]:
        """Wait for every shard's JSON ready line."""
        out = []
        for i, q in enumerate(self._lines):
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    line = q.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    line = None
                if line is None:
                    tail = self.logs[i].read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"shard {i} did not become ready; its stderr:\n{tail}")
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if isinstance(msg, dict) and msg.get("event") == "ready":
                        out.append(f"127.0.0.1:{msg['port']}")
                        break
        return out

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


# ---- data and models -----------------------------------------------------------------------


def make_batches(workdir: Path, n: int, batch_size: int, seed: int = 0) -> list[Any]:
    """``n`` batches of the synthetic Criteo-shaped dataset, in memory."""
    from recps.worker.data import DataReader
    from recps.worker.synth import SynthConfig, reader_config, write_dataset

    rows = n * batch_size
    cfg = SynthConfig(
        rows=rows + rows // 100 + 1000,  # eval split kept small: it is not used
        eval_fraction=(rows // 100 + 1000) / (rows + rows // 100 + 1000),
        num_files=1,
        seed=seed,
        calibration_rows=20_000,
    )
    meta = write_dataset(workdir / "data", cfg)
    reader = DataReader(workdir / "data" / "train", reader_config(meta, batch_size=batch_size))
    batches = [b for b in reader.epoch(0) if len(b) == batch_size][:n]
    assert len(batches) == n, (len(batches), n)
    return batches


def collection_config(tables: int, dim: int) -> Any:
    from recps.embedding import InitializerConfig, OptimizerConfig
    from recps.worker.models import embedding_config

    return embedding_config(
        "dlrm",
        [f"C{i + 1}" for i in range(tables)],
        dim=dim,
        optimizer=OptimizerConfig("adagrad", lr=0.05),
        initializer=InitializerConfig("uniform", scale=0.05),
    )


@dataclass
class Trainer:
    """A DLRM over some embedding collection, its dense optimizer and one training step."""

    model: Any
    opt: Any
    losses: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, embeddings: Any, dim: int) -> Trainer:
        import torch

        from recps.worker.models import build_model

        torch.manual_seed(0)  # the same dense init on both sides
        model = build_model("dlrm", embeddings, bottom_mlp=(64, dim), top_mlp=(64, 32))
        dense = [p for n, p in model.named_parameters() if not n.startswith("embeddings.")]
        return cls(model, torch.optim.Adam(dense, lr=1e-3))

    def step(self, dense: Any, ids: Any, labels: Any) -> None:
        import torch.nn.functional as F

        loss = F.binary_cross_entropy_with_logits(self.model(dense, ids), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses.append(float(loss.detach()))


@dataclass
class Timed:
    """One side's round: when each step ended, and the wall time of the whole round."""

    ends: list[float]
    wall_s: float
    stats: Any = None  # PipelineStats of a PS round

    @property
    def steady_s(self) -> float:
        """Seconds per step between the first and the last step's end (steady state)."""
        return (self.ends[-1] - self.ends[0]) / max(1, len(self.ends) - 1)


def run_inprocess(trainer: Trainer, batches: Sequence[Any]) -> Timed:
    """``batches`` through the plain in-process loop."""
    import torch

    from recps.worker.embedding import keyed_ids

    ends = []
    t0 = time.perf_counter()
    for b in batches:
        # The reader's arrays are read-only views; torch wants writable memory.
        dense, labels = torch.from_numpy(b.dense.copy()), torch.from_numpy(b.labels.copy())
        trainer.step(dense, keyed_ids(b), labels)
        ends.append(time.perf_counter())
    return Timed(ends, time.perf_counter() - t0)


def run_ps(trainer: Trainer, batches: Sequence[Any], config: Any) -> Timed:
    """``batches`` through one :class:`TrainPipeline`; ``wall_s`` from its creation to its
    final flush (pipeline fill and drain included)."""
    from recps.worker.pipeline import TrainPipeline

    ends = []
    t0 = time.perf_counter()
    with TrainPipeline(trainer.model.embeddings, batches, config) as pipe:
        for s in pipe:
            trainer.step(s.dense, s.sparse, s.labels)
            ends.append(time.perf_counter())
    return Timed(ends, time.perf_counter() - t0, pipe.stats)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all threads) from /proc; 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU seconds of this process, of its calling thread and of other processes."""

    pids: Sequence[int] = ()

    def read(self) -> np.ndarray:
        return np.array(
            [time.process_time(), time.thread_time(), sum(cpu_seconds(p) for p in self.pids)]
        )


# ---- the measurement -----------------------------------------------------------------------


_PIPE_FIELDS = ("wait_rows_s", "compute_s", "push_wait_s", "data_s", "gate_wait_s")
_BG_FIELDS = ("lookup_s", "push_s")


def compare(
    make_client: Callable[[Any], Any],
    batches: Sequence[Any],
    *,
    warmup: int,
    steps: int,
    rounds: int,
    staleness: int,
    prefetch: int = 2,
    nice: int = 0,
    tables: int = TABLES,
    dim: int = DIM,
    server_pids: Sequence[int] = (),
) -> dict[str, Any]:
    """The benchmark's core: both sides over the same batches; ``make_client(config)`` returns
    the :class:`RowClient` of the sharded side (a ``PSClient`` of real shards, or
    ``LocalRowClient`` in tests)."""
    from recps.worker.embedding import ShardedEmbeddingBagCollection
    from recps.worker.pipeline import PipelineConfig
    from recps.worker.reference import LocalCollectionConfig, LocalEmbeddingBagCollection

    need = warmup + steps * rounds
    if steps < 2 or rounds < 1:
        raise ValueError("need steps >= 2 (a rate is timed between step ends) and rounds >= 1")
    if len(batches) < need:
        raise ValueError(f"need {need} batches, got {len(batches)}")
    cfg = collection_config(tables, dim)
    local = Trainer.build(
        LocalEmbeddingBagCollection(cfg, LocalCollectionConfig(capacity_rows=1 << 16)), dim
    )
    ebc = ShardedEmbeddingBagCollection(cfg, make_client(cfg))
    sharded = Trainer.build(ebc, dim)
    pcfg = PipelineConfig(
        prefetch_batches=prefetch, max_inflight_pushes=staleness, background_nice=nice
    )

    t = time.perf_counter()
    run_inprocess(local, batches[:warmup])
    run_ps(sharded, batches[:warmup], pcfg)
    log(f"warm-up: {warmup} steps per side in {time.perf_counter() - t:.1f}s")

    runs: dict[str, list[Timed]] = {"local": [], "ps": []}
    meter = CpuMeter(server_pids)
    cpu = {"local": np.zeros(3), "ps": np.zeros(3)}
    sums = dict.fromkeys((*_PIPE_FIELDS, *_BG_FIELDS, "elapsed_s"), 0.0)
    e0 = (ebc.stats.lookup_s, ebc.stats.push_s, ebc.stats.rows_pulled, ebc.stats.rows_pushed)
    batch_size = len(batches[0])
    for r in range(rounds):
        chunk = batches[warmup + r * steps : warmup + (r + 1) * steps]
        order = ("local", "ps") if r % 2 == 0 else ("ps", "local")
        for side in order:
            c0 = meter.read()
            if side == "local":
                runs[side].append(run_inprocess(local, chunk))
            else:
                runs[side].append(run_ps(sharded, chunk, pcfg))
                for k in sums:
                    sums[k] += getattr(runs[side][-1].stats, k)
            cpu[side] += meter.read() - c0
        lo, ps = runs["local"][-1], runs["ps"][-1]
        log(
            f"round {r + 1}/{rounds}: in-process {batch_size / lo.steady_s:,.0f}/s, "
            f"ps {batch_size / ps.steady_s:,.0f}/s, ratio {lo.steady_s / ps.steady_s:.3f} "
            f"(with pipeline fill/drain {lo.wall_s / ps.wall_s:.3f})"
        )
    local_s = [t.steady_s for t in runs["local"]]
    ps_s = [t.steady_s for t in runs["ps"]]
    ps_rate, local_rate = batch_size / min(ps_s), batch_size / min(local_s)
    ps_wall = min(t.wall_s for t in runs["ps"]) / steps
    local_wall = min(t.wall_s for t in runs["local"]) / steps
    el = sums["elapsed_s"] or 1.0
    n_steps = steps * rounds
    s = ebc.stats
    breakdown = {
        **{k.replace("_s", "_frac"): round(sums[k] / el, 4) for k in _PIPE_FIELDS},
        **{f"{k.replace('_s', '')}_ms_per_step": round(1e3 * sums[k] / n_steps, 2) for k in sums},
        "client_lookup_ms_per_step": round(1e3 * (s.lookup_s - e0[0]) / n_steps, 2),
        "client_push_ms_per_step": round(1e3 * (s.push_s - e0[1]) / n_steps, 2),
        "rows_pulled_per_step": round((s.rows_pulled - e0[2]) / n_steps),
        "rows_pushed_per_step": round((s.rows_pushed - e0[3]) / n_steps),
    }
    # CPU milliseconds per step: the worker process, its training thread, the shards.
    cpu_ms = {
        side: dict(zip(("worker", "trainer_thread", "shards"), (1e3 * c / n_steps).round(2)))
        for side, c in cpu.items()
    }
    cpu_ms["local"].pop("shards")
    return {
        "ps_samples_per_s": round(ps_rate, 1),
        "inprocess_samples_per_s": round(local_rate, 1),
        "ratio": round(ps_rate / local_rate, 4),
        "ratio_per_round": [round(a / b, 3) for a, b in zip(local_s, ps_s)],
        "ratio_median": round(float(np.median(np.array(local_s) / np.array(ps_s))), 4),
        "ratio_with_fill": round(local_wall / ps_wall, 4),
        "inprocess_ms_per_step_per_round": [round(1e3 * x, 1) for x in local_s],
        "ps_ms_per_step_per_round": [round(1e3 * x, 1) for x in ps_s],
        "inprocess_ms_per_step": round(1e3 * min(local_s), 2),
        "ps_ms_per_step": round(1e3 * min(ps_s), 2),
        # Pipeline start (first lookup not overlapped) and final flush, per PS round.
        "ps_fill_drain_ms_per_round": round(
            1e3 * float(np.median([t.wall_s - steps * t.steady_s for t in runs["ps"]])), 1
        ),
        "batch_size": batch_size,
        "tables": tables,
        "dim": dim,
        "staleness": staleness,
        "prefetch_batches": prefetch,
        "background_nice": nice,
        "warmup_steps": warmup,
        "steps_per_round": steps,
        "rounds": rounds,
        "steps_measured": n_steps,
        "ps_breakdown": breakdown,
        "cpu_ms_per_step": {"inprocess": cpu_ms["local"], "ps": cpu_ms["ps"]},
        "final_loss": {
            "inprocess": round(float(np.mean(local.losses[-steps:])), 4),
            "ps": round(float(np.mean(sharded.losses[-steps:])), 4),
        },
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch

    from recps.ps.client import PSClient
    from recps.ps.routing import ShardMap

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    shard_args = ["--memory-mb", str(args.memory_mb), "--max-workers", "8"]
    shard_args += ["--flush-interval-ms", str(args.flush_interval_ms)]
    shards = ShardProcs(workdir, args.shards, shard_args)
    clients: list[Any] = []
    try:
        need = args.warmup + args.steps * args.rounds
        batches = make_batches(workdir, need, args.batch_size)  # while the shards start
        log(f"{need} batches of {args.batch_size} in {time.perf_counter() - t_start:.1f}s")
        addresses = shards.addresses()
        log(f"{args.shards} shards up after {time.perf_counter() - t_start:.1f}s: {addresses}")

        def make_client(cfg: Any) -> PSClient:
            client = PSClient(addresses)
            clients.append(client)
            client.install_shard_map(ShardMap.even(addresses, epoch=client.shard_map.epoch + 1))
            return client

        res = compare(
            make_client,
            batches,
            warmup=args.warmup,
            steps=args.steps,
            rounds=args.rounds,
            staleness=args.staleness,
            prefetch=args.prefetch,
            nice=args.nice,
            tables=args.tables,
            dim=args.dim,
            server_pids=[p.pid for p in shards.procs],
        )
    finally:
        for c in clients:
            c.close()
        shards.close()
    res["shards"] = args.shards
    res["torch_threads"] = args.threads
    res["switch_interval_ms"] = sys.getswitchinterval() * 1e3
    res["flush_interval_ms"] = args.flush_interval_ms
    return res


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under 30 s")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--staleness", type=int, default=2, help="max_inflight_pushes (k)")
    p.add_argument("--prefetch", type=int, default=2, help="prefetch_batches")
    p.add_argument("--nice", type=int, default=0, help="PipelineConfig.background_nice")
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--tables", type=int, default=TABLES)
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per side")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round per side")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    p.add_argument("--memory-mb", type=int, default=64, help="shard hot tier per table")
    p.add_argument(
        "--flush-interval-ms", type=int, default=5000, help="shard write-back interval (async)"
    )
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval for this process (default: Python's 5 ms)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.rounds = 4, 7, 5
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the shard processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recps-bench-train-") as d:
        res = run(args, Path(d))
    res["quick"] = args.quick
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
