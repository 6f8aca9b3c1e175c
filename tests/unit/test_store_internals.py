"""The store's vectorized building blocks, each against a plain reference.

* ``unique_sum``: the pairwise-tree duplicate sum (both sort paths, skewed batches, the
  sorted-unique early return), exact on integer-valued floats.
* ``HotTier`` index: windowed probing and tombstone-free removal against a dict, under
  heavy churn.
* Key and row codecs built without per-key Python loops, huge-page arrays, the split
  multi-get, and the finite screen that runs on summed gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

from recps.embedding import (
    AdmissionConfig,
    MemoryStore,
    NonFiniteGradientError,
    OptimizerConfig,
    TableConfig,
    TieredStoreConfig,
)
from recps.embedding.base import unique_sum
from recps.embedding.hot_tier import EMPTY, HotTier, zeros
from recps.embedding.rocks import RocksTable
from recps.embedding.rowcodec import RowCodec, decode_keys, encode_keys


def _reference_sum(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, inv = np.unique(ids, return_inverse=True)
    out = np.zeros((len(u), grads.shape[1]), np.float64)
    np.add.at(out, inv, grads.astype(np.float64))
    return u, out


def _zipf_ids(rng: np.random.Generator, n: int, span: int, spread: int = 1) -> np.ndarray:
    return (rng.zipf(1.1, n) % span).astype(np.int64) * spread


@pytest.mark.parametrize("spread", [1, 2**50], ids=["narrow-range", "wide-range"])
@pytest.mark.parametrize("n", [1, 2, 7, 600, 4096])
def test_unique_sum_is_exact_on_integer_valued_floats(n: int, spread: int) -> None:
    # Integer-valued float32 grads sum exactly in any order, so the result must equal the
    # float64 reference bit for bit; Zipf ids give groups of one up to hundreds of rows.
    rng = np.random.default_rng(n)
    ids = _zipf_ids(rng, n, 10_000, spread)
    ids[: n // 3] -= 2**62  # negative ids too
    grads = rng.integers(-8, 9, (n, 5)).astype(np.float32)
    u, s = unique_sum(ids, grads)
    ru, rs = _reference_sum(ids, grads)
    assert np.array_equal(u, ru)
    assert s.dtype == np.float32 and np.array_equal(s, rs.astype(np.float32))


def test_unique_sum_matches_the_reference_within_float32_rounding() -> None:
    rng = np.random.default_rng(7)
    ids = _zipf_ids(rng, 4096, 200_000)
    grads = rng.standard_normal((4096, 64)).astype(np.float32)
    u, s = unique_sum(ids, grads)
    ru, rs = _reference_sum(ids, grads)
    assert np.array_equal(u, ru)
    assert np.abs(s - rs).max() < 1e-4  # the largest group has hundreds of rows


def test_unique_sum_handles_full_int64_range_and_extreme_ids() -> None:
    ids = np.array([2**63 - 1, -(2**63), 5, -(2**63), 2**63 - 1, 5, 5], dtype=np.int64)
    grads = np.arange(14, dtype=np.float32).reshape(7, 2)
    u, s = unique_sum(ids, grads)
    ru, rs = _reference_sum(ids, grads)
    assert np.array_equal(u, ru) and np.array_equal(s, rs.astype(np.float32))


def test_unique_sum_returns_sorted_unique_input_as_is() -> None:
    ids = np.array([-3, 1, 9], dtype=np.int64)
    grads = np.ones((3, 4), np.float32)
    u, s = unique_sum(ids, grads)
    assert u is ids and s is grads  # a client's pre-summed push costs no copy


def test_unique_sum_does_not_modify_its_inputs() -> None:
    rng = np.random.default_rng(3)
    ids = _zipf_ids(rng, 500, 50)
    grads = rng.standard_normal((500, 3)).astype(np.float32)
    ids0, grads0 = ids.copy(), grads.copy()
    unique_sum(ids, grads)
    assert np.array_equal(ids, ids0) and np.array_equal(grads, grads0)


def test_unique_sum_group_result_depends_only_on_its_rows_in_order() -> None:
    # With ids in a narrow range the sort is stable, so a group's sum is a function of its
    # own rows in input order, whatever else the batch holds. (Both stores sum the whole
    # batch with this one function before anything else, so they agree regardless.)
    rng = np.random.default_rng(11)
    grads = rng.standard_normal((300, 8)).astype(np.float32)
    _, alone = unique_sum(np.full(300, 42, dtype=np.int64), grads)
    mixed_ids = 100 + _zipf_ids(rng, 800, 40)
    mixed_grads = rng.standard_normal((800, 8)).astype(np.float32)
    at = np.sort(rng.choice(800, 300, replace=False))  # interleaved, order kept
    mixed_ids[at], mixed_grads[at] = 42, grads
    u, s = unique_sum(mixed_ids, mixed_grads)
    assert np.array_equal(s[u == 42], alone)


def test_hot_tier_index_agrees_with_a_dict_under_churn() -> None:
    rng = np.random.default_rng(0)
    for trial in range(12):
        hot = HotTier(4, "float32", 4, 1 << 16 if trial % 2 else 1 << 18)
        held: dict[int, int] = {}
        if trial % 3:
            universe = rng.integers(-(2**63), 2**63 - 1, 3000)
        else:
            universe = np.arange(3000, dtype=np.int64) << 40  # low bits all zero
        for _ in range(60):
            ids = np.unique(rng.choice(universe, rng.integers(1, 200)))
            want = np.array([held.get(int(i), -1) for i in ids])
            assert np.array_equal(hot.find(ids), want)
            absent = ids[want < 0][: hot.n_free]
            if len(absent):
                held.update(zip(absent.tolist(), hot.insert(absent).tolist()))
            if held and rng.random() < 0.7:
                keys = np.array(list(held))
                gone = rng.choice(keys, min(len(keys), int(rng.integers(1, 150))), replace=False)
                hot.remove(np.array([held.pop(int(i)) for i in gone]))
        keys = np.array(list(held), dtype=np.int64)
        assert np.array_equal(hot.find(keys), np.array([held[int(i)] for i in keys]))
        # No tombstones: every non-empty cell is a live entry.
        assert int(np.count_nonzero(hot._index[:, 1] != EMPTY)) == len(held) == hot.size


def test_huge_page_zeros_are_zeroed_writable_arrays() -> None:
    big = zeros((70_000, 16), np.float32)  # over the huge-page threshold
    small = zeros((10, 3), np.int64)
    for a, shape, dtype in ((big, (70_000, 16), np.float32), (small, (10, 3), np.int64)):
        assert a.shape == shape and a.dtype == dtype and not a.any()
        a[-1] = 1
        assert a.sum() == shape[1]


def test_key_and_row_codecs_round_trip_with_zero_bytes() -> None:
    ids = np.array([-(2**63), -1, 0, 1, 256, 2**40, 2**63 - 1], dtype=np.int64)
    keys = encode_keys(ids)
    assert all(isinstance(k, bytes) and len(k) == 8 for k in keys)
    assert keys == sorted(keys)  # RocksDB's byte order is numeric order
    assert np.array_equal(decode_keys(keys), ids)
    codec = RowCodec(3, "float16", 2)
    emb = np.array([[0, 1, 2], [3, 4, 0]], np.float32)
    vals = codec.pack(emb, np.zeros((2, 2)), np.array([1.0, 0.0]), np.array([0, 9]))
    assert [len(v) for v in vals] == [codec.record_bytes] * 2
    rec = codec.unpack(vals)
    assert np.array_equal(rec["emb"], emb) and rec["count"].tolist() == [0, 9]


def test_multi_get_small_and_split_reads(tmp_path) -> None:
    table = RocksTable(tmp_path / "db", "t", TieredStoreConfig())
    try:
        ids = np.arange(0, 2000, 2, dtype=np.int64)
        table.write(encode_keys(ids), [bytes([i % 251]) * 5 for i in range(len(ids))])
        for probe in (np.arange(10), np.arange(1500)):  # below and above the split size
            got = table.multi_get(encode_keys(probe.astype(np.int64)))
            want = [None if i % 2 or i >= 2000 else bytes([(i // 2) % 251]) * 5 for i in probe]
            assert got == want
    finally:
        table.close()


@pytest.mark.parametrize("nonfinite", ["reject", "skip"])
def test_finite_screen_on_summed_gradients(nonfinite: str) -> None:
    cfg = TableConfig("s", dim=2, optimizer=OptimizerConfig("sgd", lr=1.0), nonfinite=nonfinite)
    store = MemoryStore(cfg)
    ids = np.array([1, 1, 2, 3], dtype=np.int64)
    # +inf and -inf in one group sum to NaN; finite rows that overflow when summed are
    # not "non-finite input" and must not be rejected or skipped.
    grads = np.array([[np.inf, 0], [-np.inf, 0], [3e38, 0], [1, 1]], np.float32)
    if nonfinite == "reject":
        with pytest.raises(NonFiniteGradientError):
            store.apply_gradients(ids, grads)
        assert store.stats().rows == 0 and store.stats().pushes == 0
    else:
        assert store.apply_gradients(ids, grads) == 2
        assert store.stats().nonfinite_skipped == 2
    big = np.array([[3e38, 0], [3e38, 0]], np.float32)
    assert store.apply_gradients(np.array([7, 7], dtype=np.int64), big) == 1


def test_chunked_lookup_admits_the_same_ids_as_memory_store(make_tiered, clock) -> None:
    # A lookup larger than half the hot tier is served in chunks. With a narrow sketch,
    # collisions admit ids early; the tiered store must count every missing id of the
    # lookup before estimating any, as MemoryStore does, or the two admit different ids.
    cfg = TableConfig(
        "adm",
        dim=4,
        admission=AdmissionConfig(min_count=2, sketch_width=64, sketch_depth=1),
    )
    tiered = make_tiered(cfg, 64 << 10, clock=clock)
    memory = MemoryStore(cfg, clock=clock)
    rng = np.random.default_rng(5)
    assert tiered._chunk < 400
    for _ in range(3):
        ids = rng.choice(5000, 900, replace=False).astype(np.int64)
        assert np.array_equal(tiered.lookup(ids), memory.lookup(ids))
        assert tiered.stats().rows == memory.stats().rows > 0
        assert tiered.stats().admission_rejected == memory.stats().admission_rejected
    stored = np.concatenate([b.ids for b in tiered.items()])
    assert np.array_equal(stored, np.concatenate([b.ids for b in memory.items()]))
