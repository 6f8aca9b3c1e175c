"""PSClient's dedup of lookup ids: np.unique's answer, faster."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recps.ps.client import _unique_inverse

ids_st = st.one_of(
    hnp.arrays(np.int64, st.integers(0, 300), elements=st.integers(-5, 40)),
    hnp.arrays(np.int64, st.integers(0, 50), elements=st.integers(-(2**63), 2**63 - 1)),
)


@settings(max_examples=300, deadline=None)
@given(ids=ids_st)
def test_unique_inverse_matches_numpy(ids: np.ndarray) -> None:
    uniq, inverse = _unique_inverse(ids)
    np.testing.assert_array_equal(uniq, np.unique(ids))
    if inverse is None:  # already strictly increasing
        assert len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())
        np.testing.assert_array_equal(uniq, ids)
    else:
        np.testing.assert_array_equal(uniq[inverse], ids)
