"""The serving replica's row cache: exact capacity, correct rows, CLOCK keeps the hot set,
thread safety. A plain dict of everything admitted is the reference."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recps.embedding.errors import ConfigError
from recps.serving.cache import RowCache


def _rows(ids: np.ndarray, dim: int) -> np.ndarray:
    """A row that names its id, so a wrong gather shows."""
    return (ids[:, None] * 10 + np.arange(dim)).astype(np.float32)


@pytest.mark.parametrize("capacity", [16, 17, 100, 1000, 4097])
@pytest.mark.parametrize("dim", [1, 16])
def test_capacity_is_exactly_what_was_asked(capacity: int, dim: int) -> None:
    cache = RowCache(dim, capacity)
    assert cache.capacity == capacity
    ids = np.arange(3 * capacity, dtype=np.int64)
    for chunk in np.array_split(ids, 7):
        cache.admit(chunk, _rows(chunk, dim))
    assert cache.stats().rows == capacity
    assert cache.stats().evictions == 2 * capacity


def test_disabled_cache_misses_everything_and_keeps_nothing() -> None:
    cache = RowCache(4, 0)
    ids = np.arange(10, dtype=np.int64)
    cache.admit(ids, _rows(ids, 4))
    hit, rows = cache.lookup(ids)
    assert not hit.any() and rows.shape == (0, 4)
    s = cache.stats()
    assert (s.rows, s.capacity, s.hits, s.misses, s.hit_rate) == (0, 0, 0, 10, 0.0)


def test_bad_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        RowCache(0, 10)
    with pytest.raises(ConfigError):
        RowCache(4, -1)


def test_a_batch_bigger_than_the_cache_keeps_a_prefix() -> None:
    cache = RowCache(2, 16)
    ids = np.arange(100, dtype=np.int64)
    cache.admit(ids, _rows(ids, 2))
    hit, rows = cache.lookup(ids)
    assert hit.sum() == 16 and hit[:16].all()
    np.testing.assert_array_equal(rows, _rows(ids[:16], 2))


def test_hot_rows_survive_a_scan_of_cold_ones() -> None:
    """FIFO would have evicted the first 100 rows after 1000 admissions; CLOCK keeps them."""
    cache = RowCache(4, 1000)
    hot = np.arange(100, dtype=np.int64)
    cache.admit(hot, _rows(hot, 4))
    for start in range(10_000, 30_000, 100):  # 20k one-off ids, 20x the capacity
        cache.lookup(hot)  # the head keeps being asked for: its CLOCK counters stay up
        cold = np.arange(start, start + 100, dtype=np.int64)
        cache.lookup(cold)
        cache.admit(cold, _rows(cold, 4))
    hit, rows = cache.lookup(hot)
    assert hit.mean() > 0.9, hit.mean()
    np.testing.assert_array_equal(rows, _rows(hot[hit], 4))


def test_admitting_an_id_twice_keeps_one_copy() -> None:
    cache = RowCache(2, 64)
    ids = np.array([5, 9], dtype=np.int64)
    cache.admit(ids, _rows(ids, 2))
    cache.admit(np.array([9, 11], dtype=np.int64), _rows(np.array([9, 11]), 2))
    assert cache.stats().rows == 3


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(-50, 50), min_size=0, max_size=30)),
        max_size=40,
    )
)
def test_every_hit_is_the_admitted_row(ops: list[tuple[bool, list[int]]]) -> None:
    cache = RowCache(3, 16)
    admitted: dict[int, np.ndarray] = {}
    for is_admit, raw in ops:
        ids = np.unique(np.array(raw, dtype=np.int64))
        if is_admit:
            rows = _rows(ids, 3)
            cache.admit(ids, rows)
            for i, r in zip(ids.tolist(), rows):
                admitted.setdefault(i, r)
        else:
            hit, rows = cache.lookup(ids)
            assert len(rows) == hit.sum()
            for i, r in zip(ids[hit].tolist(), rows):
                np.testing.assert_array_equal(r, admitted[i])
        assert cache.stats().rows <= 16


def test_concurrent_lookups_and_admits_stay_consistent() -> None:
    cache = RowCache(8, 512)
    errors: list[BaseException] = []
    looked_up: list[int] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(200):
                ids = np.unique(rng.integers(0, 4096, 64))
                looked_up.append(len(ids))
                hit, rows = cache.lookup(ids)
                np.testing.assert_array_equal(rows, _rows(ids[hit], 8))
                miss = ids[~hit]
                cache.admit(miss, _rows(miss, 8))
        except BaseException as e:  # reported below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    s = cache.stats()
    assert s.rows == 512  # 4096 distinct ids went by: full
    assert s.hits + s.misses == sum(looked_up) and s.hits > 0


def test_tables_share_one_cache_without_mixing_rows() -> None:
    cache = RowCache(2, 64, tables=3)
    ids = np.array([1, 2, 3], dtype=np.int64)
    for t in range(3):  # the same ids in every table, different rows
        cache.admit(ids, _rows(ids, 2) + 1000 * t, np.full(3, t))
    for t in range(3):
        hit, rows = cache.lookup(ids, np.full(3, t))
        assert hit.all()
        np.testing.assert_array_equal(rows, _rows(ids, 2) + 1000 * t)
    both = cache.lookup(np.array([2, 2]), np.array([0, 2]))[1]
    np.testing.assert_array_equal(both[:, 0], [20, 2020])
    assert [cache.stats(t).rows for t in range(3)] == [3, 3, 3]
    assert cache.stats().rows == 9 and cache.stats(1).hits == 3 and cache.stats(2).hits == 4


class _CollidingCache(RowCache):
    """Every (table, id) hashed onto 4 keys: collisions everywhere."""

    def _keys(self, ids, table):
        return super()._keys(ids, table) & 3


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),
            st.lists(st.tuples(st.integers(0, 2), st.integers(-20, 20)), max_size=25),
        ),
        max_size=30,
    ),
    colliding=st.booleans(),
)
def test_shared_cache_hits_are_always_the_right_row(ops, colliding: bool) -> None:
    cache = (_CollidingCache if colliding else RowCache)(3, 16, tables=3)
    admitted: dict[tuple[int, int], np.ndarray] = {}
    for is_admit, pairs in ops:
        uniq = sorted(set(pairs))
        table = np.array([t for t, _ in uniq], dtype=np.intp)
        ids = np.array([i for _, i in uniq], dtype=np.int64)
        if is_admit:
            rows = _rows(ids, 3) + 1000 * table[:, None]
            cache.admit(ids, rows.astype(np.float32), table)
            for k, r in zip(uniq, rows):
                admitted.setdefault(k, r)
        else:
            hit, rows = cache.lookup(ids, table)
            for k, r in zip(np.array(uniq, dtype=object)[hit].tolist(), rows):
                np.testing.assert_array_equal(r, admitted[tuple(k)])
        per_table = [cache.stats(t).rows for t in range(3)]
        assert sum(per_table) == cache.stats().rows <= 16


@pytest.mark.parametrize("tables", [1, 3])
def test_rows_older_than_the_ttl_miss_and_admit_refreshes_them(tables: int) -> None:
    now = [100.0]
    cache = RowCache(4, 64, tables=tables, ttl_s=2.0, clock=lambda: now[0])
    ids = np.arange(10, dtype=np.int64)
    tbl = None if tables == 1 else ids % tables
    cache.admit(ids[:6], _rows(ids[:6], 4), None if tbl is None else tbl[:6])
    now[0] += 1.5
    cache.admit(ids[6:], _rows(ids[6:], 4), None if tbl is None else tbl[6:])
    hit, _ = cache.lookup(ids, tbl)
    assert hit.all()
    now[0] += 1.0  # the first six are 2.5 s old, the rest 1.0 s
    hit, rows = cache.lookup(ids, tbl)
    assert hit.tolist() == [False] * 6 + [True] * 4
    np.testing.assert_array_equal(rows, _rows(ids[6:], 4))
    # Fetched again with new values: the stale entries take them and count from now.
    fresh = _rows(ids[:6], 4) + 0.5
    cache.admit(ids[:6], fresh, None if tbl is None else tbl[:6])
    hit, rows = cache.lookup(ids[:6], None if tbl is None else tbl[:6])
    assert hit.all()
    np.testing.assert_array_equal(rows, fresh)
    assert cache.stats().rows == 10  # refreshed in place, not duplicated


def test_without_a_ttl_admitting_a_held_row_keeps_the_first() -> None:
    cache = RowCache(2, 16)
    ids = np.array([3], dtype=np.int64)
    cache.admit(ids, _rows(ids, 2))
    cache.admit(ids, _rows(ids, 2) + 1)
    np.testing.assert_array_equal(cache.lookup(ids)[1], _rows(ids, 2))


def test_a_ttl_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="ttl_s"):
        RowCache(2, 16, ttl_s=0)


@pytest.mark.parametrize("tables", [1, 3])
def test_rows_past_refresh_s_are_named_due_once_until_admitted_again(tables: int) -> None:
    now = [0.0]
    cache = RowCache(4, 64, tables=tables, ttl_s=10.0, clock=lambda: now[0], refresh_s=8.0)
    ids = np.array([1, 2, 3])
    tix = None if tables == 1 else np.array([0, 1, 2])
    cache.admit(ids, np.ones((3, 4), np.float32), tix)
    now[0] = 5.0
    hit, _, due = cache.lookup_due(ids, tix)
    assert hit.all() and not due.any()
    now[0] = 9.0
    hit, rows, due = cache.lookup_due(ids[:2], None if tix is None else tix[:2])
    assert hit.all() and due.all() and len(rows) == 2  # served, and due
    hit, _, due = cache.lookup_due(ids, tix)
    assert hit.all() and due.tolist() == [False, False, True]  # named once each
    cache.admit(ids[:1], np.full((1, 4), 2.0, np.float32), None if tix is None else tix[:1])
    now[0] = 16.0  # row 1 was admitted again at 9: fresh; rows 2 and 3 (from 0) expired
    hit, rows, due = cache.lookup_due(ids, tix)
    assert hit.tolist() == [True, False, False] and not due.any()
    assert rows.tolist() == [[2.0] * 4]
    now[0] = 17.5  # 8.5 s after its refresh: due again
    assert cache.lookup_due(ids[:1], None if tix is None else tix[:1])[2].tolist() == [True]
    # Plain lookups never name rows due.
    assert cache.lookup(ids[:1], None if tix is None else tix[:1])[0].tolist() == [True]


def test_refresh_s_must_lie_below_the_ttl() -> None:
    with pytest.raises(ConfigError, match="refresh_s"):
        RowCache(2, 16, ttl_s=1.0, refresh_s=1.0)
    with pytest.raises(ConfigError, match="refresh_s"):
        RowCache(2, 16, refresh_s=0.5)  # no TTL: nothing to refresh ahead of


@pytest.mark.parametrize("dim, tables, refresh", [(1, 1, False), (16, 26, True), (64, 3, False)])
def test_capacity_for_bytes_is_the_most_that_fits(dim: int, tables: int, refresh: bool) -> None:
    for nbytes in (0, 1000, 5000, 1 << 16, 3_000_001, 1 << 24):
        n = RowCache.capacity_for_bytes(dim, nbytes, tables, refresh)
        ttl = 5.0 if refresh else None
        if n == 0:  # not even the smallest cache (16 rows) fits
            assert (
                RowCache(dim, 16, tables, ttl, refresh_s=2.0 if refresh else None).full_bytes
                > nbytes
            )
            continue
        c = RowCache(dim, n, tables, ttl, refresh_s=2.0 if refresh else None)
        bigger = RowCache(dim, n + 1, tables, ttl, refresh_s=2.0 if refresh else None)
        assert c.capacity == n and c.full_bytes <= nbytes < bigger.full_bytes
        # full_bytes is what the arrays take (the index's 16-byte view is not extra)
        arrays = [
            a for k, a in vars(c._tier).items() if isinstance(a, np.ndarray) and k != "_cells"
        ]
        arrays += [c._ids, c._tbl, c._queued]
        assert sum(a.nbytes for a in arrays) == c.full_bytes
