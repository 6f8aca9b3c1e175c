"""SentRows: when a move's source may delete by the ids it sent instead of scanning."""

from __future__ import annotations

import numpy as np

from recps.ps.sent_rows import SentRows


def _sent(max_ids: int = 1000) -> SentRows:
    return SentRows(lambda ids: ids % 8, num_slots=8, max_ids=max_ids)


def _mask(*slots: int) -> np.ndarray:
    m = np.zeros(8, dtype=bool)
    m[list(slots)] = True
    return m


def test_covered_only_when_this_process_saw_the_first_and_last_page() -> None:
    s = _sent()
    s.add(np.array([1, 9, 17]))
    s.complete(_mask(1))  # the copy began in an earlier process: its first pages unseen
    assert not s.covers(_mask(1))
    s.begin(_mask(1, 2))
    assert not s.covers(_mask(1))  # begun, not complete
    s.add(np.array([25, 2]))
    s.complete(_mask(1))
    assert s.covers(_mask(1)) and not s.covers(_mask(1, 2))
    assert s.ids_in(_mask(1)).tolist() == [1, 9, 17, 25]
    assert s.ids_in(_mask(2)).tolist() == [2]


def test_too_many_ids_fall_back_to_a_scan_until_the_moves_are_over() -> None:
    s = _sent(max_ids=5)
    s.begin(_mask(3))
    s.add(np.array([3, 11, 19]))
    s.add(np.array([27, 35, 43]))  # 6 > 5
    s.complete(_mask(3))
    assert not s.covers(_mask(3)) and s.count == 0
    s.forget(_mask(3))  # no move left: a new one is tracked again
    s.begin(_mask(4))
    s.add(np.array([4]))
    s.complete(_mask(4))
    assert s.covers(_mask(4)) and s.ids_in(_mask(4)).tolist() == [4]


def test_forget_keeps_the_other_slots_records() -> None:
    s = _sent()
    s.begin(_mask(1, 2))
    s.add(np.array([1, 2, 9, 10]))
    s.complete(_mask(1, 2))
    s.forget(_mask(1))
    assert not s.covers(_mask(1)) and s.covers(_mask(2))
    assert s.ids_in(_mask(1, 2)).tolist() == [2, 10] and s.count == 2
