"""Benchmark online serving: embedding lookups on a replica, and Predict end to end.

    .venv/bin/python benchmarks/serving.py            # full run
    .venv/bin/python benchmarks/serving.py --quick    # under 30 s, process start-ups included

Prints progress on stderr, then one JSON object on the last stdout line. Absolute numbers
on a shared 2-core machine (client, ranking service and replica on the same cores) are what
the targets are stated in; the in-process figure, measured in the same run, says how much
of a lookup is the network path.

Workload: a model version written in the serving format (``recps.serving.model_format``)
with 26 tables C1..C26 of dim 16 (``--vocab`` rows each, float32) and a DLRM tower
(13 dense inputs, bottom MLP 64-16, top MLP 64-32) traced by the exporter's own
``build_tower``. Stored ids are the training hash of raw values 0..vocab-1, so requests of
raw values hit stored rows (and values past the vocabulary miss, as new items do). A
request is 1 user context plus 100 candidates, each with 26 categorical values drawn
Zipf(1.1) over 1.2 x vocab values (the context carries the 13 dense values): 2,626 ids,
~1,400-1,600 unique after dedup. ``--requests`` distinct requests (128) are cycled.
docs/benchmarks.md has runs with 1,024, where the tail rows of a request recur only
every few seconds and, with the full run's vocabulary, the rows in use outgrow the
ranking service's default near cache.

* lookup_*: ``ServingClient.lookup`` of one request's ids against one replica process
  (``python -m recps.serving.main``), ``--concurrency`` threads back to back, with the
  client's defaults: concurrent calls coalesced into shared RPCs
  (``lookup_calls_per_rpc`` says how many a merged RPC carried on average)
* uncoalesced_lookup_*: the same, each call its own RPC (``coalesce_inflight=0``),
  measured first
* inprocess_lookup_p99_ms: the same lookups against the same version opened in this
  process (``ServingReplica``, no gRPC), one thread
* predict_*: ``Ranking/Predict`` (column-form requests) over gRPC against a ranking-service process
  (``python -m recps.serving.ranking_server``) that reads from the replica,
  ``--concurrency`` threads
* swap_failed_requests: a second version is published and loaded on the replica (admin
  ``LoadVersion``) and the ranking service (watching the root) while Predict traffic runs;
  failed requests are counted (must be 0), and ``swap_versions_seen`` shows both served.

Replica and ranking service run with their default settings (one gRPC handler thread per
core, the ranking service's near cache on). Each measurement follows one pass over the
request set, so the figures are the warm steady state; in the full run (15 s phases) the
near cache's 5 s TTL expires during the Predict phase, so re-fetches are included.

Targets (issue 5): lookup_p99_ms <= 10, predict_p99_ms <= 25, swap_failed_requests == 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

TABLES = [f"C{i}" for i in range(1, 27)]
DENSE = [f"I{i}" for i in range(1, 14)]
DIM = 16
CANDIDATES = 100


def log(msg: str) -> None:
    print(f"[serving-bench] {msg}", file=sys.stderr, flush=True)


# ---- the model version -------------------------------------------------------------------


def job_config() -> Any:
    from recps.worker.job_config import load_job_config

    return load_job_config(
        {
            "data": {"train": "unused", "batch_size": 128},
            "table_defaults": {"dim": DIM},
            "model": {"kind": "dlrm", "bottom_mlp": [64, DIM], "top_mlp": [64, 32]},
        }
    )


def write_version(root: Path, version: int, vocab: int, seed: int) -> Path:
    """A complete model version: SST files, a traced DLRM tower, the manifest."""
    import torch

    from recps.embedding.feature_ids import HASH_SCHEME, hash_int_ids
    from recps.ps.routing import ShardMap
    from recps.serving import model_format as mf
    from recps.serving.export import build_tower

    tmp = root / f"{mf.TMP_PREFIX}{version}-{os.getpid()}"
    (tmp / "dense").mkdir(parents=True)
    from recps.worker.reference import LocalEmbeddingBagCollection
    from recps.worker.trainer import build_job_model, embedding_collection_config

    job = job_config()
    torch.manual_seed(seed)
    full = build_job_model(job, LocalEmbeddingBagCollection(embedding_collection_config(job)))
    _, tower, names = build_tower(job, full.state_dict())
    torch.jit.save(tower, str(tmp / mf.TOWER_FILE))
    files: dict[str, mf.FileEntry] = {}
    rng = np.random.default_rng(seed)
    for t in TABLES:
        ids = np.sort(hash_int_ids(np.arange(vocab), t))
        rows = (rng.standard_normal((vocab, DIM)) * 0.05).astype(np.float32)
        rel = mf.sst_relpath(t, 0, 0)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        n = mf.write_sst(tmp / rel, ids, rows, "float32")
        files[rel] = mf.FileEntry((tmp / rel).stat().st_size, mf.file_sha256(tmp / rel), n)
    files[mf.TOWER_FILE] = mf.FileEntry(
        (tmp / mf.TOWER_FILE).stat().st_size, mf.file_sha256(tmp / mf.TOWER_FILE)
    )
    manifest = mf.ModelManifest(
        version=version,
        created_at=time.time(),
        source_checkpoint="benchmarks/serving.py",
        step=version,
        model={"kind": "dlrm"},
        dense_features=tuple(DENSE),
        features=tuple(mf.FeatureSpec(name=f, table=f, input=f) for f in names),
        hashing={"scheme": HASH_SCHEME},
        tables={t: mf.TableSpec(DIM, "float32", "float32", vocab) for t in TABLES},
        shard_map=ShardMap.even({0: "serving-0"}, 1024),
        files=files,
    )
    (tmp / mf.MANIFEST_FILE).write_text(manifest.to_json())
    (tmp / mf.COMPLETE_FILE).write_text("")
    final = mf.version_dir(root, version)
    os.rename(tmp, final)
    return final


def requests(n: int, vocab: int, seed: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Raw (context, candidates) requests; categorical values Zipf over 1.2 x vocab."""
    rng = np.random.default_rng(seed)
    space = int(vocab * 1.2)
    perm = np.random.default_rng(7).permutation(space)
    out = []
    for _ in range(n):
        z = rng.zipf(1.1, (CANDIDATES + 1) * len(TABLES) * 2)
        z = z[z <= space][: (CANDIDATES + 1) * len(TABLES)]
        vals = perm[z - 1].reshape(CANDIDATES + 1, len(TABLES))
        ctx: dict[str, Any] = {d: int(rng.integers(0, 1000)) for d in DENSE}
        ctx.update({t: int(vals[0, j]) for j, t in enumerate(TABLES[:3])})  # user features
        cands = [
            {t: int(vals[i, j]) for j, t in enumerate(TABLES[3:], 3)}
            for i in range(1, CANDIDATES + 1)
        ]
        out.append((ctx, cands))
    return out


def request_ids(req: tuple[dict[str, Any], list[dict[str, Any]]]) -> dict[str, np.ndarray]:
    """The ids one Predict looks up, per table (what the ranking service sends)."""
    import pyarrow as pa

    from recps.embedding.feature_ids import hash_column

    ctx, cands = req
    out = {}
    for t in TABLES:
        vals = [c.get(t, ctx.get(t)) for c in cands]
        out[t] = hash_column(pa.array(vals), t)
    return out


# ---- processes -----------------------------------------------------------------------------


# ---- measuring -----------------------------------------------------------------------------


def run_threads(fn: Any, items: list[Any], concurrency: int, seconds: float) -> dict[str, Any]:
    """``fn(item)`` back to back in ``concurrency`` threads for ``seconds``: latencies, qps."""
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    stop = threading.Event()

    def worker(k: int) -> None:
        i = k
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                fn(items[i % len(items)])
            except Exception as e:  # counted, not raised: the figure is the failure count
                errors.append(repr(e)[:200])
                continue
            lat[k].append(time.perf_counter() - t0)
            i += concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = np.array([x for xs in lat for x in xs]) * 1e3
    return {
        "p50_ms": float(np.percentile(all_lat, 50)) if len(all_lat) else float("nan"),
        "p99_ms": float(np.percentile(all_lat, 99)) if len(all_lat) else float("nan"),
        "qps": len(all_lat) / wall,
        "requests": len(all_lat),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small vocab, short rounds")
    p.add_argument("--vocab", type=int, default=None, help="rows per table")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--requests", type=int, default=None, help="distinct requests, cycled (default 128)"
    )
    p.add_argument("--seconds", type=float, default=None, help="per measurement")
    p.add_argument(
        "--coalesce",
        type=int,
        default=None,
        help="ServingClientConfig.coalesce_inflight for the lookup phase (default: the client's)",
    )
    p.add_argument(
        "--ranking-coalesce",
        type=int,
        default=None,
        help="the ranking service's --lookup-coalesce-inflight (default: its own)",
    )
    a = p.parse_args()
    vocab = a.vocab or (5_000 if a.quick else 100_000)
    seconds = a.seconds or (2.0 if a.quick else 15.0)
    n_requests = a.requests or 128
    t_start = time.perf_counter()

    from recps.proto import ranking_pb2, ranking_pb2_grpc
    from recps.serving.client import ServingClient, ServingClientConfig
    from recps.serving.process import start_service, stop_service
    from recps.serving.replica import ReplicaConfig, ServingReplica
    from recps.serving.replica_server import ServingAdminClient

    with tempfile.TemporaryDirectory(prefix="recps-serving-bench-") as tmp_s:
        tmp = Path(tmp_s)
        root = tmp / "models"
        root.mkdir()
        t0 = time.perf_counter()
        write_version(root, 1, vocab, seed=1)
        log(f"version 1: 26 tables x {vocab} rows written in {time.perf_counter() - t0:.1f} s")
        reqs = requests(n_requests, vocab, seed=3)
        ids = [request_ids(r) for r in reqs]
        uniq = int(np.mean([sum(len(np.unique(v)) for v in x.values()) for x in ids]))
        log(f"requests: {sum(len(v) for v in ids[0].values())} ids, ~{uniq} unique")

        # In process: the same version, no gRPC.
        local = ServingReplica(
            ReplicaConfig(model=str(root), data_dir=str(tmp / "local"), cache_rows=vocab)
        )
        for x in ids:
            local.lookup(x)  # warm the cache as the replica's will be
        inproc = run_threads(local.lookup, ids, 1, min(seconds, 3.0))
        local.close()
        log(f"in-process lookup p99 {inproc['p99_ms']:.2f} ms")

        replica, ready = start_service(
            "recps.serving.main",
            [
                "--model",
                str(root),
                "--data-dir",
                str(tmp / "r0"),
                "--port",
                "0",
                "--cache-rows",
                str(vocab),
            ],
            tmp / "replica.log",
        )
        ranking = None
        try:
            addr = ready["address"]
            # Each call its own RPC first (the baseline), then the client's default:
            # concurrent calls coalesced into shared RPCs.
            single = ServingClient([addr], ServingClientConfig(coalesce_inflight=0))
            # One pass over the request set first: the figures are steady-state serving,
            # with the replica's row cache (and the ranking service's near cache) warm.
            for x in ids:
                single.lookup(x)
            uncoalesced = run_threads(single.lookup, ids, a.concurrency, seconds)
            single.close()
            log(
                f"lookup, one RPC per call: p50 {uncoalesced['p50_ms']:.2f} "
                f"p99 {uncoalesced['p99_ms']:.2f} ms, {uncoalesced['qps']:.0f} qps"
            )
            client = ServingClient([addr], ServingClientConfig(coalesce_inflight=a.coalesce))
            lookup = run_threads(client.lookup, ids, a.concurrency, seconds)
            co = client.coalesce_stats()
            log(
                f"lookup p50 {lookup['p50_ms']:.2f} p99 {lookup['p99_ms']:.2f} ms, "
                f"{lookup['qps']:.0f} qps, {co['calls'] / max(1, co['batches']):.2f} calls an RPC"
            )

            ranking, rready = start_service(
                "recps.serving.ranking_server",
                [
                    "--model",
                    str(root),
                    "--replicas",
                    addr,
                    "--port",
                    "0",
                    "--http-port",
                    "-1",
                    "--watch-interval-s",
                    "0.5",
                    *(
                        []
                        if a.ranking_coalesce is None
                        else ["--lookup-coalesce-inflight", str(a.ranking_coalesce)]
                    ),
                ],
                tmp / "ranking.log",
            )
            import grpc

            stub = ranking_pb2_grpc.RankingStub(grpc.insecure_channel(rready["address"]))
            protos = [_predict_request(ranking_pb2, r) for r in reqs]
            versions: set[int] = set()

            def predict(req: Any) -> None:
                versions.add(stub.Predict(req, timeout=10).model_version)

            for r in protos:
                predict(r)
            pred = run_threads(predict, protos, a.concurrency, seconds)
            log(
                f"predict p50 {pred['p50_ms']:.2f} p99 {pred['p99_ms']:.2f} ms, "
                f"{pred['qps']:.0f} qps"
            )

            # Hot swap under Predict traffic: publish v2, load it on the replica; the
            # ranking service follows the root by itself.
            versions.clear()
            swap: dict[str, Any] = {}

            def do_swap() -> None:
                time.sleep(0.5)
                write_version(root, 2, vocab, seed=2)
                ServingAdminClient(addr, timeout_s=120).load_version()
                swap["done_at"] = time.perf_counter()

            swapper = threading.Thread(target=do_swap)
            swapper.start()
            during = run_threads(predict, protos, a.concurrency, max(seconds, 4.0))
            swapper.join()
            log(f"swap: {during['errors']} failed of {during['requests']}, versions {versions}")
            client.close()
        finally:
            stop_service(ranking, timeout_s=5)
            stop_service(replica, timeout_s=5)

    failed = during["errors"] + lookup["errors"] + uncoalesced["errors"] + pred["errors"]
    out = {
        "lookup_p50_ms": round(lookup["p50_ms"], 3),
        "lookup_p99_ms": round(lookup["p99_ms"], 3),
        "lookup_qps": round(lookup["qps"], 1),
        "predict_p50_ms": round(pred["p50_ms"], 3),
        "predict_p99_ms": round(pred["p99_ms"], 3),
        "predict_qps": round(pred["qps"], 1),
        "lookup_calls_per_rpc": round(co["calls"] / max(1, co["batches"]), 2),
        "uncoalesced_lookup_p50_ms": round(uncoalesced["p50_ms"], 3),
        "uncoalesced_lookup_p99_ms": round(uncoalesced["p99_ms"], 3),
        "uncoalesced_lookup_qps": round(uncoalesced["qps"], 1),
        "inprocess_lookup_p99_ms": round(inproc["p99_ms"], 3),
        "inprocess_lookup_p50_ms": round(inproc["p50_ms"], 3),
        "lookup_p99_over_inprocess": round(lookup["p99_ms"] / inproc["p99_ms"], 2),
        # Across the swap, and (stricter) every failure of the run counts.
        "swap_failed_requests": failed,
        "swap_requests": during["requests"],
        "swap_versions_seen": sorted(versions),
        "concurrency": a.concurrency,
        "distinct_requests": n_requests,
        "ids_per_request": sum(len(v) for v in ids[0].values()),
        "unique_ids_per_request": uniq,
        "vocab_per_table": vocab,
        "quick": a.quick,
        "targets_met": {
            "lookup_p99_ms<=10": lookup["p99_ms"] <= 10,
            "predict_p99_ms<=25": pred["p99_ms"] <= 25,
            "swap_failed_requests==0": failed == 0,
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if during["first_errors"]:
        out["swap_first_errors"] = during["first_errors"]
    print(json.dumps(out))


def _predict_request(pb: Any, req: tuple[dict[str, Any], list[dict[str, Any]]]) -> Any:
    """Column-form: one packed int64 column per candidate feature (the fast request form)."""
    ctx, cands = req
    msg = pb.PredictRequest()
    for k, v in ctx.items():
        msg.context.values[k].int_value = v
    for k in cands[0]:
        msg.columns[k].int_values.extend(c[k] for c in cands)
    return msg


if __name__ == "__main__":
    main()
