"""TieredStore against the MemoryStore reference, driven by hypothesis state machines.

Each parametrized case runs random sequences of lookups (with and without
``create_missing``, duplicate ids, int64 extremes), gradient batches (duplicates, NaN/Inf
rows), flushes, close+reopen, checkpoints and restores to *earlier* checkpoints, clock
moves and expiry, on a TieredStore whose 64 KiB hot tier holds only a few hundred rows,
so nearly every step evicts. The MemoryStore sees the same calls (a restore goes to its own
checkpoint from the same point). After every step lookups must be bit-identical and the
row counts equal; at the end ``items()`` must agree on ids, weights, optimizer state,
counts and timestamps.

Set ``HYPOTHESIS_PROFILE=thorough`` for a longer search.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from recps.embedding import (
    AdmissionConfig,
    ExpiryConfig,
    InitializerConfig,
    MemoryStore,
    NonFiniteGradientError,
    OptimizerConfig,
    TableConfig,
)

_PROFILES = {
    # ~2-4 s per case on 2 cores; the whole file stays well under 30 s.
    "default": settings(max_examples=6, stateful_step_count=18),
    "thorough": settings(max_examples=200, stateful_step_count=40),
}
PROFILE = _PROFILES[os.environ.get("HYPOTHESIS_PROFILE", "default")]

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
HANDPICKED = [
    I64_MIN,
    I64_MIN + 1,
    -(2**32),
    -1,
    0,
    1,
    2,
    2**31 - 1,
    2**32,
    2**53 + 1,
    I64_MAX - 1,
    I64_MAX,
]
# A few thousand distinct ids: several times the hot capacity, and drawn with replacement
# from batches of hundreds, so batches repeat ids and steps keep evicting each other's rows.
UNIVERSE = np.concatenate(
    [np.array(HANDPICKED, dtype=np.int64), (np.arange(2500, dtype=np.int64) - 1250) * 1_000_003]
)
MAX_BATCH = 600


@dataclass(frozen=True)
class Case:
    id: str
    table: TableConfig


CASES = [
    Case(
        "sgd-ttl",
        TableConfig(
            "sgd_ttl",
            dim=4,
            optimizer=OptimizerConfig("sgd", lr=0.05),
            expiry=ExpiryConfig(ttl_s=40.0, sweep_interval_s=1e9),  # sweeps only when called
        ),
    ),
    Case(
        "adagrad",
        TableConfig(
            "adagrad",
            dim=5,
            initializer=InitializerConfig("normal", scale=0.05, seed=3),
            optimizer=OptimizerConfig(
                "adagrad", lr=0.1, initial_accumulator=0.1, weight_decay=0.01
            ),
        ),
    ),
    Case(
        "adam",
        TableConfig("adam", dim=8, optimizer=OptimizerConfig("adam", lr=0.01, weight_decay=1e-3)),
    ),
    Case(
        "ftrl-skip",
        TableConfig(
            "ftrl",
            dim=6,
            optimizer=OptimizerConfig("ftrl", lr=0.1, l1=0.01, l2=0.001),
            nonfinite="skip",
        ),
    ),
    Case(
        "adagrad-admission2",
        TableConfig(
            "admission",
            dim=4,
            optimizer=OptimizerConfig("adagrad", lr=0.05),
            admission=AdmissionConfig(min_count=2, sketch_width=1 << 12),
        ),
    ),
    Case(
        "adam-float16",
        TableConfig(
            "half",
            dim=7,
            dtype="float16",
            initializer=InitializerConfig("uniform", scale=0.5, seed=11),
            optimizer=OptimizerConfig("adam", lr=0.02),
        ),
    ),
]

id_batches = st.tuples(
    st.lists(st.sampled_from(HANDPICKED), max_size=6),
    st.integers(0, MAX_BATCH),
    st.integers(0, 2**32 - 1),
)


def make_ids(spec: tuple[list[int], int, int], max_n: int) -> np.ndarray:
    picked, n, seed = spec
    rng = np.random.default_rng(seed)
    drawn = rng.choice(UNIVERSE, size=n, replace=True)
    ids = np.concatenate([np.array(picked, dtype=np.int64), drawn])
    rng.shuffle(ids)
    return ids[:max_n]


def bits(a: np.ndarray) -> np.ndarray:
    """Compare floats bit for bit: -0.0 != +0.0 and NaN payloads count."""
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bit_identical(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if not np.array_equal(bits(got), bits(want)):
        bad = np.flatnonzero((bits(got) != bits(want)).reshape(len(got), -1).any(axis=1))
        raise AssertionError(
            f"{what}: {len(bad)} row(s) differ, first at {bad[0]}: "
            f"tiered {got[bad[0]]!r} vs memory {want[bad[0]]!r}"
        )


def all_items(store) -> dict[str, np.ndarray]:
    batches = list(store.items(batch_size=257))
    fields = ("ids", "weights", "state", "updated_at", "count")
    if not batches:
        return {f: None for f in fields}
    return {f: np.concatenate([getattr(b, f) for b in batches]) for f in fields}


def assert_items_equal(tiered, memory) -> None:
    got, want = all_items(tiered), all_items(memory)
    if want["ids"] is None or got["ids"] is None:
        assert got["ids"] is None and want["ids"] is None, "one store is empty, the other not"
        return
    assert np.array_equal(got["ids"], want["ids"]), (
        f"stored ids differ: {len(got['ids'])} vs {len(want['ids'])} rows, only in tiered "
        f"{np.setdiff1d(got['ids'], want['ids'])[:5]}, only in memory "
        f"{np.setdiff1d(want['ids'], got['ids'])[:5]}"
    )
    # Compare neighbours, not np.diff: the difference of extreme int64 ids overflows.
    assert np.all(got["ids"][1:] > got["ids"][:-1]), "items() must be sorted by id"
    for f in ("weights", "state", "updated_at"):
        assert_bit_identical(got[f], want[f], f"items().{f}")
    assert np.array_equal(got["count"], want["count"]), "items().count differs"


class StoreMachine(RuleBasedStateMachine):
    """One TieredStore and one MemoryStore, fed identical calls."""

    CASE: Case
    ROOT: Path
    MAKE_TIERED = None
    CLOCK_CLS = None

    checkpoints = Bundle("checkpoints")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(dir=self.ROOT))
        self.clock = self.CLOCK_CLS()
        self.cfg = self.CASE.table
        self.ts = None
        self.ms = None
        self.n_checkpoints = 0
        self.recent = np.array(HANDPICKED, dtype=np.int64)

    # ---- helpers ------------------------------------------------------------------------

    def _open_tiered(self):
        # Reopen with the store's current config: runtime set_admission calls carry over,
        # as a server re-creating the store from its live config would do.
        cfg = self.ts.config if self.ts is not None else self.cfg
        return type(self).MAKE_TIERED(
            cfg, path=self.dir / "store", clock=self.clock, durability=self.durability
        )

    def _remember(self, ids: np.ndarray) -> None:
        self.recent = np.concatenate([ids[:24], self.recent])[:96]

    # ---- rules --------------------------------------------------------------------------

    @initialize(durability=st.sampled_from(["async", "sync"]))
    def open_stores(self, durability: str) -> None:
        self.durability = durability
        self.ts = self._open_tiered()
        self.ms = MemoryStore(self.cfg, clock=self.clock)
        capacity = int(self.ts.stats().extra["hot_capacity_rows"])
        # Lookups larger than the hot tier's chunk (capacity // 2) are deduplicated, then
        # chunked; exercise both paths.
        self.max_lookup = MAX_BATCH if capacity < MAX_BATCH else capacity

    @rule(spec=id_batches, create=st.booleans())
    def lookup(self, spec, create: bool) -> None:
        ids = make_ids(spec, self.max_lookup)
        got = self.ts.lookup(ids, create_missing=create)
        want = self.ms.lookup(ids, create_missing=create)
        assert got.dtype == np.float32
        assert got.shape == (len(ids), self.cfg.dim)
        assert_bit_identical(got, want, f"lookup(create_missing={create})")
        self._remember(ids)

    @rule(
        spec=id_batches,
        seed=st.integers(0, 2**32 - 1),
        scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
        poison=st.sampled_from([0, 0, 0, 1, 3]),
    )
    def apply_gradients(self, spec, seed: int, scale: float, poison: int) -> None:
        ids = make_ids(spec, MAX_BATCH)
        rng = np.random.default_rng(seed)
        grads = (rng.standard_normal((len(ids), self.cfg.dim)) * scale).astype(np.float32)
        poison = min(poison, len(ids))
        if poison:
            rows = rng.choice(len(ids), size=poison, replace=False)
            grads[rows, rng.integers(0, self.cfg.dim, size=poison)] = rng.choice(
                [np.nan, np.inf, -np.inf], size=poison
            )
        if poison and self.cfg.nonfinite == "reject":
            with pytest.raises(NonFiniteGradientError):
                self.ts.apply_gradients(ids, grads)
            with pytest.raises(NonFiniteGradientError):
                self.ms.apply_gradients(ids, grads)
            return
        got = self.ts.apply_gradients(ids, grads)
        want = self.ms.apply_gradients(ids, grads)
        assert got == want, f"apply_gradients updated {got} rows, reference {want}"
        self._remember(ids)

    @rule()
    def flush(self) -> None:
        self.ts.flush()
        self.ms.flush()

    @rule()
    def close_and_reopen(self) -> None:
        self.ts.close()
        self.ts = self._open_tiered()

    @rule(target=checkpoints)
    def checkpoint(self):
        k = self.n_checkpoints
        self.n_checkpoints += 1
        tiered_dir, memory_dir = self.dir / f"ckpt{k}-tiered", self.dir / f"ckpt{k}-memory"
        assert self.ts.checkpoint(tiered_dir) == tiered_dir
        self.ms.checkpoint(memory_dir)
        return (tiered_dir, memory_dir)

    @rule(ckpt=checkpoints)
    def restore(self, ckpt) -> None:
        tiered_dir, memory_dir = ckpt
        self.ts.restore(tiered_dir)
        self.ms.restore(memory_dir)

    @rule(seconds=st.sampled_from([0.25, 1.0, 7.0, 30.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self.cfg.expiry.ttl_s is not None)
    @rule()
    def expire(self) -> None:
        got, want = self.ts.expire(), self.ms.expire()
        assert got == want, f"expire() removed {got} rows, reference {want}"

    @precondition(lambda self: self.cfg.admission.enabled)
    @rule(min_count=st.integers(1, 3))
    def set_admission(self, min_count: int) -> None:
        adm = AdmissionConfig(min_count=min_count, sketch_width=self.cfg.admission.sketch_width)
        self.ts.set_admission(adm)
        self.ms.set_admission(adm)

    @rule()
    def compare_items(self) -> None:
        assert_items_equal(self.ts, self.ms)

    # ---- invariants -----------------------------------------------------------------------

    @invariant()
    def lookups_and_row_counts_agree(self) -> None:
        probe = np.concatenate([self.recent, UNIVERSE[:: len(UNIVERSE) // 40]])
        got = self.ts.lookup(probe, create_missing=False)
        want = self.ms.lookup(probe, create_missing=False)
        assert_bit_identical(got, want, "probe lookup(create_missing=False)")
        assert self.ts.stats().rows == self.ms.stats().rows, "stats().rows differs"

    def teardown(self) -> None:
        try:
            if self.ts is not None:
                assert_items_equal(self.ts, self.ms)
        finally:
            if self.ts is not None:
                self.ts.close()
            if self.ms is not None:
                self.ms.close()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tiered_store_matches_memory_store(case: Case, tmp_path, make_tiered, clock_cls) -> None:
    machine = type(
        f"StoreMachine_{case.id.replace('-', '_')}",
        (StoreMachine,),
        {"CASE": case, "ROOT": tmp_path, "MAKE_TIERED": make_tiered, "CLOCK_CLS": clock_cls},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            PROFILE,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
