"""A row's life in both stores: admission, TTL expiry, checkpoints taken during training,
tables far larger than the hot tier, and the counters ``stats()`` reports.

Expectations are computed independently of the store under test: initial vectors from a
second store with admission off, Adagrad trajectories from the closed-form recurrence,
expiry survivors from the ids the test itself kept updating. ``ManualClock`` drives TTLs;
only the background-sweep tests use the real clock, and they poll with a deadline.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from recps.embedding import (
    AdmissionConfig,
    ExpiryConfig,
    InitializerConfig,
    MemoryStore,
    OptimizerConfig,
    TableConfig,
    TieredStore,
    rocks,
)
from tests.conftest import T0, TINY_BUDGET_BYTES, tiered_config
from tests.unit.test_store_property import all_items, assert_bit_identical, assert_items_equal

DEADLINE_S = 20.0  # generous: the machine is shared; only liveness is asserted, never speed


@pytest.fixture(params=["memory", "tiered"])
def kind(request) -> str:
    return request.param


def new_store(kind: str, cfg: TableConfig, make_tiered, clock, **tiered_kw):
    if kind == "memory":
        return MemoryStore(cfg, clock=clock)
    return make_tiered(cfg, clock=clock, **tiered_kw)


def stored_ids(store) -> np.ndarray:
    ids = all_items(store)["ids"]
    return np.empty(0, np.int64) if ids is None else ids


def wait_for(cond: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.02)


# ---- admission ---------------------------------------------------------------------------

ADM = AdmissionConfig(min_count=3, sketch_width=1 << 12)
ADM_CFG = TableConfig(
    "lifecycle_adm",
    dim=4,
    initializer=InitializerConfig("uniform", scale=0.1, seed=5),
    optimizer=OptimizerConfig("adagrad", lr=0.1),
    admission=ADM,
)
X = np.array([11, -7, 2**40], dtype=np.int64)


def initial_vectors(cfg: TableConfig, ids: np.ndarray) -> np.ndarray:
    """What any other store (or process) gives for never-stored ids of the same table."""
    other = MemoryStore(cfg.replace(admission=AdmissionConfig()))
    return other.lookup(ids, create_missing=False)


def test_initial_vectors_depend_on_table_and_seed() -> None:
    """Guards the admission tests: equality with initial_vectors() must mean something."""
    want = initial_vectors(ADM_CFG, X)
    assert np.all(want != 0) and np.all(np.abs(want) <= 0.1)
    reseeded = ADM_CFG.replace(initializer=InitializerConfig("uniform", scale=0.1, seed=6))
    assert not np.array_equal(initial_vectors(reseeded, X), want)
    assert not np.array_equal(initial_vectors(ADM_CFG.replace(name="other"), X), want)
    assert np.array_equal(initial_vectors(ADM_CFG, X[::-1]), want[::-1])


def test_admission_stores_nothing_until_min_count_lookups(kind, make_tiered, clock) -> None:
    store = new_store(kind, ADM_CFG, make_tiered, clock)
    want = initial_vectors(ADM_CFG, X)
    grads = np.ones((len(X), ADM_CFG.dim), np.float32)
    for sighting in (1, 2):
        assert_bit_identical(store.lookup(X), want, f"lookup #{sighting} of unadmitted ids")
        # A gradient neither creates the row nor counts as a sighting.
        assert store.apply_gradients(X, grads) == 0
        st = store.stats()
        assert (st.rows, st.rows_in_memory) == (0, 0), f"stored after {sighting} sighting(s)"
        assert len(stored_ids(store)) == 0
        assert st.admission_rejected == sighting * len(X)
        assert st.admission_dropped_grads == sighting * len(X)
        assert st.rows_updated == 0
        assert_bit_identical(store.lookup(X, create_missing=False), want, "dropped grad landed")

    assert_bit_identical(store.lookup(X), want, "the admitting lookup")
    st = store.stats()
    assert st.rows == len(X) and st.admission_rejected == 2 * len(X)
    items = all_items(store)
    order = np.argsort(X)
    assert np.array_equal(items["ids"], X[order])
    assert_bit_identical(items["weights"], want[order], "admitted rows' weights")
    assert np.array_equal(items["count"], np.zeros(len(X), np.int64))
    assert np.all(items["state"] == 0.0), "adagrad accumulator starts at initial_accumulator"
    assert np.all(items["updated_at"] == T0)

    assert store.apply_gradients(X, grads) == len(X)
    assert store.stats().admission_dropped_grads == 2 * len(X), "admitted grads are not dropped"
    after = store.lookup(X, create_missing=False)
    assert np.allclose(after, want - 0.1, atol=1e-6), "first adagrad step with g=1 moves lr"


def test_duplicates_in_one_lookup_count_as_one_sighting(kind, make_tiered, clock) -> None:
    store = new_store(kind, ADM_CFG, make_tiered, clock)
    x = np.array([5, 5, 5, 5], dtype=np.int64)
    store.lookup(x)
    store.lookup(x)
    assert store.stats().rows == 0
    store.lookup(x[:1])
    assert store.stats().rows == 1


@pytest.mark.parametrize(
    "kind",
    [
        "memory",
        "tiered",
    ],
)
def test_an_id_repeated_across_a_large_lookup_counts_once(kind, make_tiered, clock) -> None:
    cfg = ADM_CFG.replace(admission=AdmissionConfig(min_count=2, sketch_width=1 << 14))
    store = new_store(kind, cfg, make_tiered, clock)
    if kind == "tiered":  # the filler must span more than one of the tiered store's chunks
        assert store.stats().extra["hot_capacity_rows"] // 2 < 1000
    filler = np.arange(10_000, 11_000, dtype=np.int64)
    x = np.array([42], dtype=np.int64)
    store.lookup(np.concatenate([x, filler, x]))
    assert store.stats().rows == 0, "one lookup batch is one sighting, however long"


def test_set_admission_at_runtime_takes_effect(kind, make_tiered, clock) -> None:
    store = new_store(
        kind, ADM_CFG.replace(admission=AdmissionConfig(1, 1 << 12)), make_tiered, clock
    )
    a, b, c, d = (np.array([v], dtype=np.int64) for v in (100, 200, 300, 400))
    g = np.ones((1, ADM_CFG.dim), np.float32)
    store.lookup(a)
    assert store.apply_gradients(a, g) == 1
    trained_a = store.lookup(a, create_missing=False)
    assert store.stats().rows == 1

    store.set_admission(ADM)
    assert store.config.admission == ADM
    store.lookup(b)
    store.lookup(d)
    assert store.stats().rows == 1, "min_count=3 must hold back a new id"
    assert_bit_identical(store.lookup(a), trained_a, "a stored row is not affected")
    store.lookup(b)
    assert store.stats().rows == 1
    store.lookup(b)
    assert store.stats().rows == 2, "third sighting admits"

    # Lowering min_count keeps the sketch: d's earlier sighting counts toward the new 2.
    store.set_admission(AdmissionConfig(min_count=2, sketch_width=1 << 12))
    store.lookup(d)
    assert store.stats().rows == 3
    store.set_admission(AdmissionConfig(min_count=1, sketch_width=1 << 12))
    store.lookup(c)
    assert store.stats().rows == 4
    assert np.array_equal(stored_ids(store), np.array([100, 200, 300, 400]))


def test_tiered_admission_sketch_survives_close_and_reopen(make_tiered, clock, tmp_path) -> None:
    path = tmp_path / "adm"
    store = make_tiered(ADM_CFG, path=path, clock=clock)
    store.lookup(X)
    store.lookup(X)
    store.close()
    store = make_tiered(ADM_CFG, path=path, clock=clock)
    assert store.stats().rows == 0
    store.lookup(X)
    assert store.stats().rows == len(X), "the two sightings before close must still count"


def test_tiered_reopen_uses_the_constructor_config_not_a_runtime_change(
    make_tiered, clock, tmp_path
) -> None:
    """Real behaviour: ``set_admission`` writes the new policy into RocksDB meta, but an
    open with a ``TableConfig`` takes the policy from that argument and overwrites the stored
    one. Only layout fields (dim, dtype, optimizer kind) are checked against the stored copy.
    To keep a runtime change, reopen with ``store.config``."""
    path = tmp_path / "adm"
    store = make_tiered(ADM_CFG, path=path, clock=clock)
    five = AdmissionConfig(min_count=5, sketch_width=1 << 12)
    store.set_admission(five)
    live = store.config
    store.close()

    store = make_tiered(live, path=path, clock=clock)
    assert store.config.admission == five
    for _ in range(4):
        store.lookup(X)
    assert store.stats().rows == 0, "min_count=5 after reopening with store.config"
    store.close()

    store = make_tiered(ADM_CFG, path=path, clock=clock)
    assert store.config.admission == ADM, "the constructor's TableConfig wins"
    store.lookup(X[:1])
    assert store.stats().rows == 1, "4 sightings >= min_count 3: the sketch was kept"
    store.close()

    store = make_tiered(ADM_CFG, path=path, clock=clock)
    assert store.config.admission == ADM


# ---- expiry --------------------------------------------------------------------------------

TTL_S = 40.0
EXP_CFG = TableConfig(
    "lifecycle_ttl",
    dim=4,
    optimizer=OptimizerConfig("adagrad", lr=0.1),
    expiry=ExpiryConfig(ttl_s=TTL_S, sweep_interval_s=1e9),  # sweeps only when called
)


def test_expire_deletes_rows_not_updated_for_ttl(kind, make_tiered, clock, tmp_path) -> None:
    path = tmp_path / "ttl"
    store = new_store(kind, EXP_CFG, make_tiered, clock, path=path)
    rng = np.random.default_rng(1)
    all_ids = np.unique(rng.integers(-(2**62), 2**62, size=3000))
    keep = np.sort(rng.choice(all_ids, size=400, replace=False))
    store.lookup(all_ids)  # created at T0
    if kind == "tiered":
        st = store.stats()
        assert st.rows_in_memory < len(all_ids) and st.rows_on_disk > len(all_ids) // 2, (
            "most rows must live only on disk for this test to cover them"
        )
    heard: list[np.ndarray] = []
    store.set_expiry_listener(heard.append)  # what a training shard publishes as deletes
    clock.advance(30.0)
    assert store.apply_gradients(keep, np.ones((len(keep), EXP_CFG.dim), np.float32)) == len(keep)
    store.lookup(all_ids)  # a lookup is not an update: it does not refresh the TTL
    clock.advance(10.0)  # unkept rows are exactly ttl_s old: not yet expired
    assert store.expire() == 0
    assert heard == []
    clock.advance(0.5)
    assert store.expire() == len(all_ids) - len(keep)
    # Exactly the expired ids, in memory and disk-only alike, each once.
    told = np.concatenate(heard)
    assert len(told) == len(np.unique(told))
    np.testing.assert_array_equal(np.sort(told), np.setdiff1d(all_ids, keep))
    st = store.stats()
    assert st.expired_rows == len(all_ids) - len(keep)
    assert st.rows == len(keep)
    assert np.array_equal(stored_ids(store), keep)
    gone = np.setdiff1d(all_ids, keep)[:50]
    assert_bit_identical(
        store.lookup(gone, create_missing=False),
        initial_vectors(EXP_CFG, gone),
        "an expired row reads as a fresh one",
    )
    if kind == "tiered":  # deletions are durable
        store.close()
        store = make_tiered(EXP_CFG, path=path, clock=clock)
        assert np.array_equal(stored_ids(store), keep)
        assert store.stats().rows == len(keep)

    clock.advance(TTL_S)  # keep was updated at T0 + 30; now is T0 + 80.5
    assert store.expire() == len(keep)
    assert store.stats().rows == 0 and len(stored_ids(store)) == 0


def test_background_sweep_expires_rows_with_real_clock(kind, tmp_path) -> None:
    cfg = EXP_CFG.replace(expiry=ExpiryConfig(ttl_s=0.2, sweep_interval_s=0.05))
    ids = np.arange(2000, dtype=np.int64) * 7919
    if kind == "memory":
        store = MemoryStore(cfg)
    else:
        store = TieredStore(tmp_path / "sweep", cfg, tiered_config(flush_interval_ms=50))
    try:
        store.lookup(ids)
        if kind == "tiered":
            assert store.stats().rows_in_memory < len(ids), "some rows must be disk-only"
        wait_for(lambda: store.stats().rows == 0, "the background sweep to expire every row")
        assert store.stats().expired_rows == len(ids)
        assert len(stored_ids(store)) == 0
    finally:
        store.close()


def test_set_expiry_at_runtime_starts_the_background_sweep(kind, tmp_path) -> None:
    ids = np.arange(300, dtype=np.int64)
    if kind == "memory":
        store = MemoryStore(EXP_CFG.replace(expiry=ExpiryConfig()))
    else:
        cfg = EXP_CFG.replace(expiry=ExpiryConfig())
        store = TieredStore(tmp_path / "sweep", cfg, tiered_config(flush_interval_ms=50))
    try:
        store.lookup(ids)
        store.set_expiry(ExpiryConfig(ttl_s=0.2, sweep_interval_s=0.05))
        wait_for(lambda: store.stats().rows == 0, "a sweep after set_expiry")
        assert store.stats().expired_rows == len(ids)
    finally:
        store.close()


# ---- checkpoints during training -------------------------------------------------------------

LR, ACC0 = 0.05, 0.5
CKPT_CFG = TableConfig(
    "lifecycle_ckpt",
    dim=8,
    initializer=InitializerConfig("uniform", scale=0.05, seed=9),
    optimizer=OptimizerConfig("adagrad", lr=LR, initial_accumulator=ACC0),
)
# More ids than the 64 KiB hot tier holds (~500 rows), so every batch evicts mid-batch.
CKPT_IDS = np.sort(np.arange(1200, dtype=np.int64) * 104_729 - 50_000_000)


class AdagradTrajectory:
    """Weights after k Adagrad steps with g = 1 on every coordinate, weight_decay 0:
    ``acc_k = ACC0 + k`` and ``w_k = w_{k-1} - lr / (sqrt(acc_k) + eps)``, in float32."""

    def __init__(self, w0: np.ndarray) -> None:
        self._w = [w0.astype(np.float32)]
        self._eps = np.float32(CKPT_CFG.optimizer.eps)

    def step_size(self, k: int) -> float:
        return float(np.float32(LR) / (np.sqrt(np.float32(ACC0 + k)) + self._eps))

    def weights(self, k: int) -> np.ndarray:
        while len(self._w) <= k:
            n = len(self._w)
            step = np.float32(LR) * (np.float32(1) / (np.sqrt(np.float32(ACC0 + n)) + self._eps))
            self._w.append(self._w[-1] - step)
        return self._w[k]


def assert_consistent_snapshot(items: dict, traj: AdagradTrajectory, what: str) -> int:
    """Every row at one step count c, with weights and accumulator both from step c."""
    assert np.array_equal(items["ids"], CKPT_IDS), f"{what}: wrong row set"
    counts = items["count"]
    c = int(counts[0])
    assert np.all(counts == c), (
        f"{what}: rows from different batches in one snapshot: counts {np.unique(counts)}"
    )
    assert np.array_equal(items["state"], np.full_like(items["state"], ACC0 + c)), (
        f"{what}: accumulator is not initial_accumulator + count ({ACC0} + {c}); "
        f"got {np.unique(items['state'])[:4]}"
    )
    # Consecutive w_k differ by step_size(k) >= step_size(c + 1) on every coordinate, so a
    # quarter of it tells w_c from w_{c-1} and w_{c+1} unambiguously.
    err = float(np.max(np.abs(items["weights"] - traj.weights(c))))
    assert err <= traj.step_size(c + 1) / 4, (
        f"{what}: weights are not those of step {c} (max error {err:.3g}, "
        f"one step is {traj.step_size(c):.3g}): weights and optimizer state are torn"
    )
    return c


def test_consistency_check_rejects_torn_snapshots() -> None:
    """The checker below must tell step c from its neighbours, or the next test proves nothing."""
    traj = AdagradTrajectory(initial_vectors(CKPT_CFG, CKPT_IDS))
    c, n = 40, len(CKPT_IDS)

    def snap(w_step: int, acc_step: int, count: int) -> dict:
        return {
            "ids": CKPT_IDS,
            "weights": traj.weights(w_step).copy(),
            "state": np.full((n, CKPT_CFG.dim), ACC0 + acc_step, np.float32),
            "count": np.full(n, count, np.int64),
        }

    assert assert_consistent_snapshot(snap(c, c, c), traj, "exact") == c
    for torn in (snap(c, c + 1, c), snap(c - 1, c, c), snap(c + 1, c, c), snap(c, c, c + 1)):
        with pytest.raises(AssertionError, match=r"torn|accumulator"):
            assert_consistent_snapshot(torn, traj, "torn")
    mixed = snap(c, c, c)
    mixed["count"][7] = c + 1
    with pytest.raises(AssertionError, match="different batches"):
        assert_consistent_snapshot(mixed, traj, "mixed")


@pytest.mark.parametrize("kind", ["memory", "tiered", "tiered-write-back"])
def test_checkpoints_under_concurrent_training_are_consistent(
    kind, make_tiered, clock, tmp_path
) -> None:
    """ "tiered-write-back" also runs the timer's background write-back every 10 ms."""
    opened = []

    def open_store():
        if kind != "tiered-write-back":
            return new_store(kind, CKPT_CFG, make_tiered, clock)
        path = tmp_path / f"wb{len(opened)}"
        opened.append(TieredStore(path, CKPT_CFG, tiered_config(flush_interval_ms=10), clock=clock))
        return opened[-1]

    try:
        _train_and_checkpoint(open_store, tmp_path)
    finally:
        for s in opened:
            s.close()


def _train_and_checkpoint(open_store: Callable[[], object], tmp_path: Path) -> None:
    store = open_store()
    traj = AdagradTrajectory(initial_vectors(CKPT_CFG, CKPT_IDS))
    grads = np.ones((len(CKPT_IDS), CKPT_CFG.dim), np.float32)
    stop = threading.Event()
    done = [0]
    errors: list[BaseException] = []

    def train() -> None:
        try:
            while not stop.is_set():
                store.apply_gradients(CKPT_IDS, grads)
                done[0] += 1
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    trainer = threading.Thread(target=train, name="trainer", daemon=True)
    trainer.start()
    checkpoints: list[Path] = []
    live_counts: list[int] = []
    try:
        for k in range(5):
            seen = done[0]
            wait_for(lambda s=seen: done[0] >= s + 2 or bool(errors), "training progress")
            assert not errors, f"trainer failed: {errors[0]!r}"
            checkpoints.append(store.checkpoint(tmp_path / f"ckpt{k}"))
            if k % 2:  # items() promises one consistent snapshot too
                live_counts.append(assert_consistent_snapshot(all_items(store), traj, "items()"))
    finally:
        stop.set()
        trainer.join()
    assert not errors, f"trainer failed: {errors[0]!r}"

    counts = []
    for k, ckpt in enumerate(checkpoints):
        fresh = open_store()
        fresh.restore(ckpt)
        counts.append(assert_consistent_snapshot(all_items(fresh), traj, f"checkpoint {k}"))
        fresh.close()
    assert all(a < b for a, b in itertools.pairwise(counts)), (
        f"each checkpoint was taken after more training, counts {counts}"
    )
    assert counts[0] >= 2 and counts[-1] <= done[0]
    assert sorted(live_counts) == live_counts


class HeldWriteBack:
    """Holds the first background write-back open (in flight) until ``release`` is set."""

    def __init__(self) -> None:
        self.in_flight, self.release, self.landed = (threading.Event() for _ in range(3))
        self._write = rocks.RocksTable.write

    def write(self, table, *args, **kwargs):
        held = threading.current_thread().name.startswith("recps-store-")
        if not held or self.in_flight.is_set():
            return self._write(table, *args, **kwargs)
        self.in_flight.set()
        self.release.wait(DEADLINE_S)
        self._write(table, *args, **kwargs)
        self.landed.set()

    def run_in_window(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in a thread while the write is held; a correct store may block on it."""
        wait_for(self.in_flight.is_set, "the background write-back to start")
        t = threading.Thread(target=fn, name="in-the-window")
        t.start()
        t.join(timeout=1.0)
        self.release.set()
        t.join()


@pytest.fixture
def held_write_back(monkeypatch) -> HeldWriteBack:
    held = HeldWriteBack()
    monkeypatch.setattr(rocks.RocksTable, "write", lambda t, *a, **k: held.write(t, *a, **k))
    yield held
    held.release.set()


def test_rows_in_a_background_write_back_are_not_read_stale(
    held_write_back, clock, tmp_path
) -> None:
    """The timer's write-back marks rows clean under the store lock and writes them after
    releasing it. While that write is in flight, a clean row may be evicted without a write;
    reading it back from RocksDB before the write lands would see no row (or an old one),
    and a push would then start it over: lost updates and a wrong row counter."""
    cfg = CKPT_CFG
    store = TieredStore(tmp_path / "wb", cfg, tiered_config(flush_interval_ms=20), clock=clock)
    memory = MemoryStore(cfg, clock=clock)
    try:
        capacity = int(store.stats().extra["hot_capacity_rows"])
        clean = np.arange(capacity, dtype=np.int64) + 10_000  # on disk, clean
        trained = np.arange(200, dtype=np.int64)  # dirty, then handed to the write-back
        g = np.ones((len(trained), cfg.dim), np.float32)
        for s in (store, memory):
            s.lookup(clean)
            s.flush()
            s.apply_gradients(trained, g)

        def in_the_window() -> None:
            for s in (store, memory):
                s.lookup(clean, create_missing=False)  # evicts the rows being written
                s.apply_gradients(trained, g)  # reads them back

        held_write_back.run_in_window(in_the_window)
        store.flush()
        assert_items_equal(store, memory)
        assert store.stats().rows == memory.stats().rows == capacity + len(trained)
    finally:
        store.close()


def test_flush_waits_for_a_background_write_back_in_flight(held_write_back, tmp_path) -> None:
    """flush() promises every applied update is in the WAL when it returns, including rows
    the timer's write-back has taken (marked clean) but not yet written."""
    store = TieredStore(tmp_path / "wb", STATS_CFG, tiered_config(flush_interval_ms=20))
    try:
        store.apply_gradients(np.arange(50, dtype=np.int64), np.ones((50, 4), np.float32))
        returned_early = []

        def flush() -> None:
            store.flush()
            returned_early.append(not held_write_back.landed.is_set())

        held_write_back.run_in_window(flush)
        assert returned_early == [False], "flush() returned before the rows reached RocksDB"
    finally:
        store.close()


# ---- a table much larger than the memory budget ----------------------------------------------

BIG_CFG = TableConfig(
    "lifecycle_big",
    dim=16,
    initializer=InitializerConfig("normal", scale=0.02, seed=4),
    optimizer=OptimizerConfig("adagrad", lr=0.05, initial_accumulator=0.1),
)
BIG_BUDGET = 2 << 20
BIG_ROWS = 100_000


@pytest.mark.parametrize("mmap_reads", [False, True], ids=["pread", "mmap"])
def test_table_many_times_the_memory_budget_round_trips(make_tiered, clock, mmap_reads) -> None:
    tiered = make_tiered(BIG_CFG, budget=BIG_BUDGET, clock=clock, mmap_reads=mmap_reads)
    memory = MemoryStore(BIG_CFG, clock=clock)
    capacity = int(tiered.stats().extra["hot_capacity_rows"])
    assert 8 * capacity <= BIG_ROWS, f"capacity {capacity} rows: the table would mostly fit"
    rng = np.random.default_rng(7)
    ids = rng.permutation(BIG_ROWS).astype(np.int64) * 1_000_003 - 2**50

    def check_bounded(what: str) -> None:
        st = tiered.stats()
        assert st.rows_in_memory <= capacity, f"{what}: {st.rows_in_memory} rows in memory"
        assert st.memory_bytes <= BIG_BUDGET, f"{what}: {st.memory_bytes} B > budget"
        assert st.memory_budget_bytes == BIG_BUDGET

    for i, part in enumerate(np.array_split(ids, 5)):
        assert_bit_identical(tiered.lookup(part), memory.lookup(part), f"create lookup {i}")
        check_bounded(f"after create lookup {i}")
    clock.advance(1.0)
    for i, part in enumerate(np.array_split(rng.permutation(ids), 5)):
        # Draw with replacement within the part, so batches carry duplicate ids.
        batch = np.concatenate([part, rng.choice(part, size=len(part) // 10)])
        g = rng.standard_normal((len(batch), BIG_CFG.dim)).astype(np.float32)
        assert tiered.apply_gradients(batch, g) == memory.apply_gradients(batch, g)
        check_bounded(f"after gradient batch {i}")
        clock.advance(1.0)

    sample = rng.choice(ids, size=10_000, replace=False)
    got = tiered.lookup(sample, create_missing=False)
    assert_bit_identical(got, memory.lookup(sample, create_missing=False), "sample lookup")
    assert_items_equal(tiered, memory)
    st = tiered.stats()
    assert st.rows == BIG_ROWS and st.rows_on_disk == BIG_ROWS
    assert st.rows_in_memory == capacity, "a full hot tier stays full"
    assert st.memory_bytes >= 0.9 * BIG_BUDGET, f"{st.memory_bytes} B: budget left unused"
    assert st.evictions >= BIG_ROWS - capacity
    check_bounded("at the end")
    maps = Path("/proc/self/maps")
    if maps.exists():  # the knob reaches RocksDB: SST files are mapped exactly when asked
        mapped = [ln for ln in maps.read_text().splitlines() if ln.endswith(".sst")]
        mine = [ln for ln in mapped if str(tiered.path) in ln]
        assert bool(mine) == mmap_reads, f"mmap_reads={mmap_reads}, mapped SSTs: {mine[:3]}"


# ---- stats -------------------------------------------------------------------------------------

STATS_CFG = TableConfig("lifecycle_stats", dim=4, optimizer=OptimizerConfig("sgd", lr=0.1))


def test_stats_count_lookups_hits_and_updates(kind, make_tiered, clock) -> None:
    store = new_store(kind, STATS_CFG, make_tiered, clock)
    assert store.stats().hit_rate == 1.0, "no lookups yet: nothing missed"
    ids = np.arange(10, dtype=np.int64) * 3
    store.lookup(ids)
    st = store.stats()
    assert (st.lookups, st.rows_looked_up, st.hits, st.misses) == (1, 10, 0, 10)
    assert st.hit_rate == 0.0 and st.rows == 10 and st.rows_in_memory == 10
    store.lookup(ids[:4])
    st = store.stats()
    assert (st.lookups, st.rows_looked_up, st.hits, st.misses) == (2, 14, 4, 10)
    assert st.hit_rate == pytest.approx(4 / 14)
    assert st.to_dict()["hit_rate"] == st.hit_rate
    g = np.ones((3, STATS_CFG.dim), np.float32)
    assert store.apply_gradients(ids[[0, 0, 1]], g) == 2
    st = store.stats()
    assert (st.pushes, st.rows_updated, st.evictions, st.expired_rows) == (1, 2, 0, 0)
    assert st.table == STATS_CFG.name and st.memory_bytes > 0
    if kind == "memory":
        assert (st.rows_on_disk, st.disk_bytes, st.writebacks) == (0, 0, 0)
        return
    assert st.rows_on_disk == 0 and st.extra["dirty_rows"] == 10, "async: nothing written yet"
    store.flush()
    st = store.stats()
    assert st.rows_on_disk == 10 and st.rows == 10 and st.extra["dirty_rows"] == 0
    assert st.writebacks == 10 and st.disk_bytes > 0


def test_tiered_stats_under_a_tiny_budget(make_tiered, clock) -> None:
    store = make_tiered(STATS_CFG, budget=TINY_BUDGET_BYTES, clock=clock)
    capacity = int(store.stats().extra["hot_capacity_rows"])
    ids = np.arange(5000, dtype=np.int64) * 11
    for part in np.array_split(ids, 25):
        store.lookup(part)
    st = store.stats()
    assert (st.misses, st.hits, st.rows) == (len(ids), 0, len(ids))
    assert st.rows_in_memory == capacity < len(ids)
    # Every id was new, so each one past the capacity pushed exactly one row out, and
    # every evicted row was dirty (never written) and so written back.
    assert st.evictions == len(ids) - capacity
    assert st.writebacks == st.evictions == st.rows_on_disk
    assert st.memory_bytes <= TINY_BUDGET_BYTES and st.disk_bytes > 0

    store.lookup(ids[-100:])  # the newest rows are still hot
    st2 = store.stats()
    assert (st2.hits, st2.misses, st2.evictions) == (100, len(ids), st.evictions)
    store.lookup(ids[:100])  # the oldest were evicted: read back from disk
    st3 = store.stats()
    assert (st3.hits, st3.misses, st3.rows) == (100, len(ids) + 100, len(ids))
    assert st3.evictions == st.evictions + 100
    assert 0 < st3.hit_rate < 0.05
    store.flush()
    st4 = store.stats()
    assert st4.rows_on_disk == len(ids) == st4.rows and st4.extra["dirty_rows"] == 0
