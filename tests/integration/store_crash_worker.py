"""Crash-test worker: trains a TieredStore and logs which batches are durable, until killed.

``tests/integration/test_store_crash.py`` starts it and SIGKILLs it mid-stream::

    python tests/integration/store_crash_worker.py DATA_DIR sync|async BUDGET_BYTES LOG_DIR

After every batch it appends the number of batches applied so far to LOG_DIR/applied.log
(no fsync: progress only, so the test can kill it between flushes). After each batch that
the durability mode promises is durable it appends that number to LOG_DIR/acks.log, with
an fsync:

* ``sync``: every batch, once ``apply_gradients`` has returned;
* ``async``: every ``FLUSH_EVERY`` batches, once an explicit ``flush()`` has returned
  (the background timer also flushes, unannounced, every ``TIMER_MS``).

The table, the batches and the clock live here so the test replays exactly the same ones
into a ``MemoryStore``. The worker stops by itself after ``MAX_RUN_S`` in case nobody
kills it.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from recps.embedding import (
    InitializerConfig,
    OptimizerConfig,
    TableConfig,
    TieredStore,
    TieredStoreConfig,
)

T0 = 1_700_000_000.0  # every row's updated_at; a fixed clock makes them comparable
DIM = 8
UNIVERSE = 4000  # distinct ids
ID_STRIDE = 1_000_003  # spread the ids over the key space
BATCH = 600  # ids per batch, with repeats; larger than a 64 KiB hot tier's chunk
FLUSH_EVERY = 5
TIMER_MS = 20
SEED = 1023
MAX_RUN_S = 120.0

TABLE = TableConfig(
    "crash",
    dim=DIM,
    initializer=InitializerConfig("uniform", scale=0.05, seed=3),
    optimizer=OptimizerConfig("adagrad", lr=0.05, initial_accumulator=0.1),
)
ALL_IDS = (np.arange(UNIVERSE, dtype=np.int64) - UNIVERSE // 2) * ID_STRIDE


def fixed_clock() -> float:
    return T0


def store_config(durability: str, budget_bytes: int) -> TieredStoreConfig:
    return TieredStoreConfig(
        memory_budget_bytes=budget_bytes,
        durability=durability,  # type: ignore[arg-type]
        flush_interval_ms=TIMER_MS,
        block_cache_bytes=1 << 20,
        write_buffer_bytes=1 << 20,
    )


def batch(b: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``b`` (0-based): ids drawn with replacement, and float32 gradients."""
    rng = np.random.default_rng([SEED, b])
    ids = ALL_IDS[rng.integers(0, UNIVERSE, size=BATCH)]
    grads = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    return ids, grads


def _append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def main(argv: list[str]) -> int:
    data_dir, durability, budget, log_dir = argv[1], argv[2], int(argv[3]), argv[4]
    store = TieredStore(data_dir, TABLE, store_config(durability, budget), clock=fixed_clock)
    applied = _append(os.path.join(log_dir, "applied.log"))
    acks = _append(os.path.join(log_dir, "acks.log"))
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < MAX_RUN_S:
        store.apply_gradients(*batch(n))
        n += 1
        os.write(applied, f"{n}\n".encode())
        if durability == "async":
            if n % FLUSH_EVERY:
                continue
            store.flush()
        os.write(acks, f"{n}\n".encode())
        os.fsync(acks)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
