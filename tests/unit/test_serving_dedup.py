"""``dedup_tables``: one sort deduplicates every table of a request; rows come back in
the caller's order, for tables of one dim (one gather) and of several dims."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recps.serving.client import dedup_tables

ids = st.integers(-3, 3) | st.integers(-(2**63), 2**63 - 1)  # many repeats, and extremes
batches = st.dictionaries(st.sampled_from("abcdef"), st.lists(ids, max_size=20), max_size=6)


def row_of(i: int, dim: int) -> np.ndarray:
    return np.full(dim, float(i % 1009), np.float32) + np.arange(dim, dtype=np.float32)


@settings(max_examples=200, deadline=None)
@given(batches, st.booleans())
def test_rows_come_back_in_the_callers_order(batch: dict[str, list[int]], mixed: bool) -> None:
    uniq, expand = dedup_tables(batch)
    assert list(uniq) == list(batch)
    for t, got in uniq.items():
        a = np.array(batch[t], dtype=np.int64)
        if len(a) > 1 and not (a[1:] > a[:-1]).all():
            np.testing.assert_array_equal(got, np.unique(a))
        else:
            np.testing.assert_array_equal(got, a)  # already unique and sorted: as sent
    dims = {t: 2 if mixed and t in "ab" else 3 for t in batch}
    rows = {
        t: np.stack([row_of(i, dims[t]) for i in u])
        if len(u)
        else np.zeros((0, dims[t]), np.float32)
        for t, u in uniq.items()
    }
    out = expand(rows)
    for t, sent in batch.items():
        want = np.stack([row_of(i, dims[t]) for i in sent]) if sent else np.zeros((0, dims[t]))
        np.testing.assert_array_equal(out[t], want)


def test_expanded_rows_are_writable_copies_of_read_only_buffers() -> None:
    uniq, expand = dedup_tables({"a": np.array([3, 1, 3]), "b": np.array([1, 2])})
    assert uniq["a"].tolist() == [1, 3] and uniq["b"].tolist() == [1, 2]
    buf = np.arange(4, dtype=np.float32).tobytes()
    rows = {
        "a": np.frombuffer(buf, np.float32).reshape(2, 2),  # read-only, as decoded
        "b": np.frombuffer(buf, np.float32).reshape(2, 2),
    }
    out = expand(rows)
    assert out["a"].tolist() == [[2.0, 3.0], [0.0, 1.0], [2.0, 3.0]]
    assert out["b"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    for r in out.values():
        assert r.flags.writeable
        r[0, 0] = -1.0  # the caller owns them


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(ids, st.integers(0, 40) | st.integers(0, 2**20)), max_size=40),
)
def test_table_major_order_sorts_pairs_as_lexsort_does(pairs: list[tuple[int, int]]) -> None:
    from recps.embedding.base import table_major_order

    i = np.array([p[0] for p in pairs], dtype=np.int64)
    t = np.array([p[1] for p in pairs], dtype=np.int64)
    order = table_major_order(i, t)
    assert sorted(order.tolist()) == list(range(len(pairs)))  # a permutation
    want = np.lexsort((i, t))
    np.testing.assert_array_equal(t[order], t[want])  # equal pairs may swap, values may not
    np.testing.assert_array_equal(i[order], i[want])
