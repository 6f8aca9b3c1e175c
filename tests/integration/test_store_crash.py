"""kill -9 a process that is training a TieredStore, reopen its RocksDB files, and check that
every batch it acknowledged as durable is there, and nothing is torn.

The worker (``store_crash_worker.py``, a real subprocess on real files) logs the number of
batches applied each time its durability mode promises they are durable ("ack"), and,
without fsync, after every batch ("applied"); it is killed a few batches past an async
flush. The test then reopens the store and replays the same deterministic batches into a
``MemoryStore``, looking for the number of batches N the files correspond to:

* hot tier large enough for the whole table: every batch reaches the WAL as one
  WriteBatch (sync push, explicit flush, or a timer write-back, which packs the dirty rows
  under the store lock, i.e. between batches, and the 4000-row table fits in one of its
  8192-row chunks), so the whole table must equal the reference after exactly N batches, with
  N in {ack, ack + 1} for sync (the next batch may land before its ack line) and
  N in [ack, applied + 1] for async (the timer may have flushed later batches).
* 64 KiB hot tier: a batch is applied in chunks and eviction writes rows back at any
  moment, so each *row* must equal the reference after some N_row in that window (a row's
  weights, optimizer state and count still travel together in one value).

Weights, optimizer state and counts are compared bit for bit; updated_at is the worker's
fixed clock.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from recps.embedding import MemoryStore, TieredStore

WORKER_PATH = Path(__file__).with_name("store_crash_worker.py")
_spec = importlib.util.spec_from_file_location("store_crash_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

FITS_BUDGET = 4 << 20  # ~33k rows: the 4000-row table never leaves memory
TINY_BUDGET = 1 << 16  # ~500 rows: every batch evicts, and is applied in chunks
ACK_TARGET = 40  # batches acknowledged before the kill
KILL_AFTER = ACK_TARGET + 3  # batches applied before the kill: between two async flushes
ACK_DEADLINE_S = 60.0  # liveness only; normally reached in about a second


@dataclass(frozen=True)
class Case:
    durability: str
    budget: int

    @property
    def whole_table(self) -> bool:
        """Whether every batch is atomic on disk (no chunking, no eviction)."""
        return self.budget == FITS_BUDGET


CASES = {
    "sync-fits": Case("sync", FITS_BUDGET),
    "async-fits": Case("async", FITS_BUDGET),
    "sync-tiny": Case("sync", TINY_BUDGET),
    "async-tiny": Case("async", TINY_BUDGET),
}


@dataclass
class Rows:
    """A table as dense arrays over ``worker.ALL_IDS``."""

    present: np.ndarray
    weights: np.ndarray
    state: np.ndarray
    count: np.ndarray
    updated_at: np.ndarray

    @classmethod
    def of(cls, store) -> Rows:
        n, dim, width = worker.UNIVERSE, store.dim, store.state_width
        rows = cls(
            np.zeros(n, bool),
            np.zeros((n, dim), np.float32),
            np.zeros((n, width), np.float32),
            np.zeros(n, np.int64),
            np.zeros(n, np.float64),
        )
        for b in store.items():
            idx = np.searchsorted(worker.ALL_IDS, b.ids)
            assert np.array_equal(worker.ALL_IDS[idx], b.ids), "an id no batch ever sent"
            rows.present[idx] = True
            rows.weights[idx], rows.state[idx] = b.weights, b.state
            rows.count[idx], rows.updated_at[idx] = b.count, b.updated_at
        return rows

    def equal_rows(self, other: Rows) -> np.ndarray:
        """Per id: both absent, or both present with bit-identical weights, state, count."""
        same = self.present == other.present
        both = np.flatnonzero(self.present & other.present)
        same[both] = (
            (self.weights[both].view(np.uint32) == other.weights[both].view(np.uint32)).all(1)
            & (self.state[both].view(np.uint32) == other.state[both].view(np.uint32)).all(1)
            & (self.count[both] == other.count[both])
        )
        return same


def read_log(path: Path) -> list[int]:
    """Complete lines only: a kill may cut the last one short."""
    return [int(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def last(path: Path) -> int:
    return (read_log(path) or [0])[-1]


def run_and_kill(tmp_path: Path, case: Case) -> tuple[Path, list[int], int]:
    """Start the worker, SIGKILL it mid-stream; returns (data dir, acks, last batch logged)."""
    data, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    err_path = logs / "stderr"
    cmd = [sys.executable, str(WORKER_PATH), str(data), case.durability, str(case.budget)]
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([*cmd, str(logs)], stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + ACK_DEADLINE_S
        # Past KILL_AFTER, so that in async mode some applied batches are not yet flushed.
        while last(logs / "acks.log") < ACK_TARGET or last(logs / "applied.log") < KILL_AFTER:
            assert proc.poll() is None, f"worker exited early:\n{err_path.read_text()}"
            assert time.monotonic() < deadline, f"too few batches acknowledged in time: {logs}"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"worker was not killed:\n{err_path.read_text()}"
    return data, read_log(logs / "acks.log"), last(logs / "applied.log")


def replay(lo: int, hi: int, got: Rows, whole_table: bool) -> tuple[int | None, object]:
    """Replay batches into a MemoryStore, comparing after each N in [lo, hi].

    whole_table: returns (N, the reference store at N) for the first N where every row
    matches, else (None, None). Otherwise returns (None, matched), matched[i] being whether
    row i equals the reference at some N in the window.
    """
    ref = MemoryStore(worker.TABLE, clock=worker.fixed_clock)
    matched = np.zeros(worker.UNIVERSE, bool)
    for n in range(hi + 1):
        if n >= lo:
            same = Rows.of(ref).equal_rows(got)
            if whole_table and same.all():
                return n, ref
            matched |= same
        if n < hi:
            ref.apply_gradients(*worker.batch(n))
    return None, (None if whole_table else matched)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_acknowledged_batches_survive_kill_9(tmp_path: Path, case: Case) -> None:
    data, acks, applied = run_and_kill(tmp_path, case)
    every = 1 if case.durability == "sync" else worker.FLUSH_EVERY
    assert acks == list(range(every, acks[-1] + 1, every)), "ack log out of order"
    ack = acks[-1]

    store = TieredStore(
        data,
        worker.TABLE,
        worker.store_config(case.durability, case.budget),
        clock=worker.fixed_clock,
    )
    try:
        got = Rows.of(store)
        assert store.stats().rows == int(got.present.sum()), "row counter torn from rows"
        assert np.all(got.updated_at[got.present] == worker.T0)
        # A batch may be applied before its line reaches applied.log, hence the + 1.
        hi = ack + 1 if case.durability == "sync" else applied + 1
        n, found = replay(ack, hi, got, case.whole_table)
        if case.whole_table:
            assert n is not None, (
                f"{case.durability}: reopened table equals the reference after no N in "
                f"[{ack}, {hi}] (acknowledged {ack}, applied {applied}); rows present "
                f"{int(got.present.sum())}, total count {int(got.count.sum())}"
            )
            # The store carries on from where the crash left it.
            ids, grads = worker.batch(n)
            assert store.apply_gradients(ids, grads) == found.apply_gradients(ids, grads)
            assert Rows.of(store).equal_rows(Rows.of(found)).all()
        else:
            bad = np.flatnonzero(~found)
            assert not len(bad), (
                f"{len(bad)} row(s) equal the reference after no N in [{ack}, {hi}] "
                f"(acknowledged {ack}, applied {applied}); first id {worker.ALL_IDS[bad[0]]} "
                f"with count {got.count[bad[0]]} (present: {got.present[bad[0]]})"
            )
    finally:
        store.close()
