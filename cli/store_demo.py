"""`recps demo store`: a tour of the tiered store with a table 8x larger than its memory.

Trains a planted logistic model whose only parameters are per-id embeddings, so the
store does real server-side optimizer work; then checkpoints, keeps training, restores,
and shows the restored rows equal the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "store",
        help="tiered-store tour: a table 8x its memory budget, training, checkpoint/restore",
        description=__doc__,
        epilog="Example: recps demo store --budget-mb 16 --steps 300",
    )
    p.add_argument("--budget-mb", type=int, default=16, help="hot-tier memory budget")
    p.add_argument("--over-budget", type=float, default=8.0, help="table size / budget")
    p.add_argument("--steps", type=int, default=300, help="training steps of 4096 ids")
    p.add_argument("--data-dir", type=Path, default=None, help="default: a temp dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI registers every subcommand on start-up and must stay quick.
    import numpy as np
    from tqdm import tqdm

    from recps.embedding import OptimizerConfig, TableConfig, TieredStore, TieredStoreConfig

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="recps-demo-"))
    cfg = TableConfig("demo", dim=16, optimizer=OptimizerConfig("adagrad", lr=0.1))
    store_cfg = TieredStoreConfig(memory_budget_bytes=args.budget_mb << 20)
    store = TieredStore(data_dir / "table", cfg, store_cfg)
    n_ids = int(args.over_budget * store_cfg.memory_budget_bytes / store.codec.record_bytes)
    rng = np.random.default_rng(0)
    truth = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    print(
        f"table of {n_ids:,} ids ({n_ids * store.codec.record_bytes / 2**20:.0f} MiB of rows)"
        f" over a {args.budget_mb} MiB hot tier, in {data_dir}"
    )

    def batch() -> tuple[np.ndarray, np.ndarray]:
        ids = (rng.zipf(1.1, 4096) - 1) % n_ids
        # Planted label: the sign of a fixed hash feature, learnable per id.
        labels = ((ids * 2654435761) % 7 < 3).astype(np.float32)
        return ids.astype(np.int64), labels

    def train(steps: int, desc: str) -> float:
        losses = []
        for _ in tqdm(range(steps), desc=desc, unit="step"):
            ids, y = batch()
            emb = store.lookup(ids)
            logit = emb @ truth
            p = 1 / (1 + np.exp(-logit))
            nll = -(y * np.log(p + 1e-7) + (1 - y) * np.log(1 - p + 1e-7))
            losses.append(float(np.mean(nll)))
            grad = ((p - y)[:, None] * truth[None, :]).astype(np.float32) / len(ids)
            store.apply_gradients(ids, grad)
        return float(np.mean(losses[-20:]))

    t = time.perf_counter()
    first = train(args.steps, "train")
    ids_per_s = args.steps * 4096 / (time.perf_counter() - t)
    print(f"logloss over the last steps: {first:.4f}  ({ids_per_s:,.0f} ids/s)")
    # Touch every id once so the table really outgrows the hot tier.
    for i in tqdm(range(0, n_ids, 65536), desc="fill", unit="chunk"):
        store.lookup(np.arange(i, min(i + 65536, n_ids), dtype=np.int64))
    probe = np.arange(0, n_ids, max(1, n_ids // 5000), dtype=np.int64)
    ckpt = store.checkpoint(data_dir / "ckpt-1")
    before = store.lookup(probe, create_missing=False)
    train(args.steps // 3, "train more")
    changed = not np.array_equal(before, store.lookup(probe, create_missing=False))
    store.restore(ckpt)
    same = np.array_equal(before, store.lookup(probe, create_missing=False))
    stats = store.stats().to_dict()
    store.close()
    print(
        json.dumps(
            {
                k: stats[k]
                for k in (
                    "rows",
                    "rows_in_memory",
                    "rows_on_disk",
                    "memory_bytes",
                    "memory_budget_bytes",
                    "disk_bytes",
                    "hit_rate",
                    "evictions",
                )
            },
            indent=2,
        )
    )
    print(
        f"checkpoint at {ckpt}: training after it changed rows: {changed}; "
        f"restore brought them back exactly: {same}"
    )
    return 0 if (changed and same and stats["rows_on_disk"] > stats["rows_in_memory"]) else 1
