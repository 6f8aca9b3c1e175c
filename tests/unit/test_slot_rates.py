"""SlotRates: per-slot request rates from a shard's cumulative counters, on a fake clock."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from recps.embedding.errors import ConfigError
from recps.ps.slot_rates import SlotRates


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _run(
    rates: SlotRates, counts: np.ndarray, clock: _Clock, per_s: list[float], seconds: float,
    step_s: float = 0.5,
) -> None:  # fmt: skip
    """Traffic of ``per_s`` ids/s per slot for ``seconds``, folding as the shard does."""
    for _ in range(round(seconds / step_s)):
        clock.t += step_s
        counts += np.asarray(np.round(np.asarray(per_s) * step_s), dtype=np.int64)
        rates.maybe_fold()


def test_steady_traffic_reads_its_rate_from_the_first_seconds() -> None:
    counts, clock = np.zeros(3, np.int64), _Clock()
    rates = SlotRates(counts, window_s=60.0, clock=clock)
    _run(rates, counts, clock, [100, 10, 0], 5)
    # 5 s into a 60 s window: bias-corrected, not 1 - exp(-5/60) ~ 8% of the rate
    np.testing.assert_allclose(rates.rates(), [100, 10, 0], rtol=1e-9, atol=1e-9)
    _run(rates, counts, clock, [100, 10, 0], 300)
    np.testing.assert_allclose(rates.rates(), [100, 10, 0], rtol=1e-9, atol=1e-9)


def test_a_load_shift_shows_within_a_few_windows_unlike_counts() -> None:
    counts, clock = np.zeros(2, np.int64), _Clock()
    rates = SlotRates(counts, window_s=30.0, clock=clock)
    _run(rates, counts, clock, [1000, 0], 600)  # slot 0 was hot for 10 minutes
    _run(rates, counts, clock, [0, 200], 120)  # then the traffic moved to slot 1
    got = rates.rates()
    assert got[0] < 1000 * np.exp(-3.9)  # 4 windows later: ~2% of its old rate
    assert got[1] == pytest.approx(200 * -np.expm1(-4) / -np.expm1(-24), rel=1e-6)
    assert counts[0] > 20 * counts[1]  # what a count since start would balance by


def test_estimate_does_not_depend_on_the_folding_cadence() -> None:
    counts, clock = np.zeros(1, np.int64), _Clock()
    often = SlotRates(counts, window_s=20.0, fold_interval_s=0.0, clock=clock)
    rarely = SlotRates(counts, window_s=20.0, fold_interval_s=1e9, clock=clock)
    _run(often, counts, clock, [40], 50, step_s=0.25)
    _run(often, counts, clock, [40], 10, step_s=0.25)
    np.testing.assert_allclose(rarely.rates(), often.rates(), rtol=1e-9)
    np.testing.assert_allclose(often.rates(), [40], rtol=1e-9)


def test_restart_forgets_a_slots_past_at_once() -> None:
    counts, clock = np.zeros(4, np.int64), _Clock()
    rates = SlotRates(counts, window_s=60.0, clock=clock)
    _run(rates, counts, clock, [500, 500, 6, 0], 120)
    counts[[0, 1]] = 0  # the server zeroes the counters of slots that moved...
    clock.t += 0.2
    rates.maybe_fold()  # (a fold in between sees the counters go down: no harm)
    rates.restart(np.array([0, 1]))  # ...then says so
    assert rates.rates()[:2].tolist() == [0.0, 0.0]
    _run(rates, counts, clock, [20, 0, 6, 0], 4)
    got = rates.rates()
    np.testing.assert_allclose(got[[0, 1, 3]], [20, 0, 0], rtol=1e-9, atol=1e-9)
    assert got[2] == pytest.approx(6, rel=0.01)  # untouched (0.2 s idle: a small dip)


def test_maybe_fold_waits_for_its_interval() -> None:
    counts, clock = np.zeros(1, np.int64), _Clock()
    rates = SlotRates(counts, window_s=60.0, fold_interval_s=5.0, clock=clock)
    clock.t += 1.0
    counts += 10
    rates.maybe_fold()
    assert rates._seen[0] == 0  # not due: the counter was not read
    clock.t += 4.0
    rates.maybe_fold()
    assert rates._seen[0] == 10


def test_concurrent_counting_and_reading_lose_no_ids() -> None:
    counts, clock = np.zeros(8, np.int64), _Clock()
    rates = SlotRates(counts, window_s=1e9, fold_interval_s=0.0, clock=clock)
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            clock.t += 1e-3
            rates.rates()

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(2000):
        counts += 1
        rates.maybe_fold()
    stop.set()
    t.join()
    clock.t += 1.0
    rates.rates()
    assert rates._seen.tolist() == counts.tolist()


@pytest.mark.parametrize("kw", [{"window_s": 0.0}, {"window_s": -1.0}, {"fold_interval_s": -1}])
def test_bad_settings_are_refused(kw: dict) -> None:
    with pytest.raises(ConfigError, match="window_s"):
        SlotRates(np.zeros(2, np.int64), **kw)
