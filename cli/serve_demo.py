"""`recps demo serve`: the second half of `make demo`, from a trained job to ranked items.

1. exports the job's newest checkpoint (``recps export``) to ``<data_dir>/models``;
2. starts a serving replica (``python -m recps.serving.main``) on it and the ranking
   service (``python -m recps.serving.ranking_server``) over the replica, both on
   127.0.0.1 port 0;
3. for a few "users" (an eval row's dense features and C1..C13 as the context) ranks 100
   candidate "items" (other eval rows' C14..C26) through the HTTP endpoint, prints each
   user's top items, then the latency of the requests;
4. stops both processes.

Criteo-shaped data has no user/item columns; the split of the 26 categorical features into
a context half and a candidate half only shows the request shape a ranking system sends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

CANDIDATES = 100
USERS = 3
TIMING_REQUESTS = 30


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="export a trained job, serve it, rank 100 candidates for a few users",
        description=__doc__,
        epilog="Example: recps demo serve --config deploy/demo.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="the job YAML that `recps train` ran")
    p.add_argument("--users", type=int, default=USERS)
    p.set_defaults(func=run)


def _post(port: int, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow.parquet as pq

    from recps.embedding.errors import RecpsError
    from recps.serving.export import ExportConfig, export_checkpoint
    from recps.serving.process import start_service, stop_service
    from recps.worker.job_config import load_job_config
    from recps.worker.trainer import data_paths

    try:
        job = load_job_config(args.config)
    except (RecpsError, OSError) as e:
        print(f"recps demo serve: {e}", file=sys.stderr)
        return 2
    data_dir = Path(job.cluster.data_dir)
    ckpts = Path(job.training.checkpoint_dir or data_dir / "checkpoints")
    models = data_dir / "models"
    t0 = time.perf_counter()
    try:
        m = export_checkpoint(ExportConfig(str(ckpts), str(models), force=True))
    except RecpsError as e:
        print(f"recps demo serve: export failed ({e}); run `recps train` first", file=sys.stderr)
        return 1
    rows = sum(t.rows for t in m.tables.values())
    print(
        f"exported version {m.version}: {len(m.tables)} tables, {rows:,} trained rows, "
        f"{len(m.files)} files -> {models} ({time.perf_counter() - t0:.1f} s)"
    )

    dense = list(m.dense_features)
    inputs = list(dict.fromkeys(f.input for f in m.features))
    user_cols, item_cols = inputs[: len(inputs) // 2], inputs[len(inputs) // 2 :]
    eval_dir = Path(data_paths(job)[1] or data_paths(job)[0])
    files = sorted(eval_dir.rglob("*.parquet"))
    table = pq.read_table(files[0]).slice(0, CANDIDATES + args.users)
    cols = {c: table.column(c).to_pylist() for c in (*dense, *inputs)}

    logs = data_dir / "serving-logs"
    logs.mkdir(parents=True, exist_ok=True)
    replica = ranking = None
    try:
        replica, r = start_service(
            "recps.serving.main",
            ["--model", str(models), "--data-dir", str(data_dir / "replica-0"), "--port", "0"],
            logs / "replica-0.log",
        )
        ranking, k = start_service(
            "recps.serving.ranking_server",
            [
                "--model",
                str(models),
                "--replicas",
                r["address"],
                "--port",
                "0",
                "--http-port",
                "0",
                "--watch-interval-s",
                "0",
            ],
            logs / "ranking.log",
        )
        print(
            f"serving replica at {r['address']} (version {r.get('version')}), ranking "
            f"service at {k['address']} (gRPC) and http://127.0.0.1:{k['http_port']}/predict"
        )
        items = [{c: cols[c][args.users + i] for c in item_cols} for i in range(CANDIDATES)]
        latencies = []
        for u in range(args.users):
            context = {c: cols[c][u] for c in (*dense, *user_cols)}
            t1 = time.perf_counter()
            resp = _post(k["http_port"], {"context": context, "candidates": items})
            latencies.append((time.perf_counter() - t1) * 1e3)
            scores = np.asarray(resp["scores"])
            top = np.argsort(-scores)[:5]
            shown = ", ".join(f"item {i} ({scores[i]:.3f})" for i in top)
            print(f"  user {u}: top 5 of {CANDIDATES}: {shown}")
        context = {c: cols[c][0] for c in (*dense, *user_cols)}
        latencies.clear()  # the users' requests above warmed caches and threads
        for _ in range(TIMING_REQUESTS):
            t1 = time.perf_counter()
            resp = _post(k["http_port"], {"context": context, "candidates": items})
            latencies.append((time.perf_counter() - t1) * 1e3)
        lat = np.asarray(latencies)
        print(
            f"  warm request latency, {len(lat)} requests of 1 user x {CANDIDATES} candidates "
            f"({len(inputs) * CANDIDATES:,} ids): p50 {np.percentile(lat, 50):.1f} ms, "
            f"p99 {np.percentile(lat, 99):.1f} ms (last: lookup {resp['lookup_ms']:.1f} ms, "
            f"tower {resp['tower_ms']:.1f} ms)"
        )
    except (RecpsError, OSError) as e:
        print(f"recps demo serve: {e}", file=sys.stderr)
        return 1
    finally:
        stop_service(ranking)
        stop_service(replica)
    return 0
