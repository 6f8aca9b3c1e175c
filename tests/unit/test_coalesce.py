"""Coalescer: concurrent calls merged into batches, each caller getting its own result."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

import recps.serving.coalesce as coalesce_module
from recps.serving.coalesce import Coalescer

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A batch function that records its batches, and can hold the first one open."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.hold_first = hold_first
        self.running = 0
        self.max_running = 0

    def __call__(self, items: list[int]) -> list[object]:
        with self.lock:
            self.batches.append(list(items))
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            first = len(self.batches) == 1
        self.entered.set()
        if first and self.hold_first:
            assert self.release.wait(10)
        time.sleep(0.001)
        with self.lock:
            self.running -= 1
        return [ValueError(f"bad {x}") if x < 0 else x * 10 for x in items]


def hold_a_batch(pool: ThreadPoolExecutor, co: Coalescer, rec: Recorder) -> Future[int]:
    """Start call 1 and wait until its batch is running (and held by ``rec``)."""
    first = pool.submit(co, 1)
    assert rec.entered.wait(10)
    return first


def wait_queued(co: Coalescer, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(co._queue) < n:
        assert time.monotonic() < deadline, "calls never queued"
        time.sleep(0.001)


def test_a_lone_call_runs_at_once_in_its_own_batch() -> None:
    rec = Recorder()
    co = Coalescer(rec, max_inflight=1)
    assert co(4) == 40
    assert rec.batches == [[4]]
    assert (co.batches, co.calls, co._leaders) == (1, 1, 0)


def test_calls_arriving_while_a_batch_runs_share_the_next_one() -> None:
    rec = Recorder(hold_first=True)
    co = Coalescer(rec, max_inflight=1)
    with ThreadPoolExecutor(8) as pool:
        first = hold_a_batch(pool, co, rec)
        rest = [pool.submit(co, x) for x in range(2, 7)]
        wait_queued(co, 5)
        rec.release.set()
        assert first.result() == 10
        assert [f.result() for f in rest] == [20, 30, 40, 50, 60]
    assert rec.batches[0] == [1]
    assert sorted(rec.batches[1]) == [2, 3, 4, 5, 6]  # all five in one batch, not five
    assert co._leaders == 0 and not co._queue


def test_batches_respect_max_size_but_always_take_one_call() -> None:
    rec = Recorder(hold_first=True)
    co = Coalescer(rec, max_inflight=1, max_size=10, size=lambda x: x)
    with ThreadPoolExecutor(8) as pool:
        first = hold_a_batch(pool, co, rec)
        sizes = [4, 5, 3, 12, 2]
        futs = []
        for s in sizes:  # queue them in a known order
            futs.append(pool.submit(co, s))
            wait_queued(co, len(futs))
        rec.release.set()
        assert first.result() == 10
        assert [f.result() for f in futs] == [s * 10 for s in sizes]
    # FIFO: 4+5 (3 would pass 10), then 3 (12 would), then 12 alone, then 2.
    assert rec.batches[1:] == [[4, 5], [3], [12], [2]]


def test_an_error_reaches_only_its_own_caller_and_batching_goes_on() -> None:
    rec = Recorder(hold_first=True)
    co = Coalescer(rec, max_inflight=1)
    with ThreadPoolExecutor(4) as pool:
        first = hold_a_batch(pool, co, rec)
        good, bad = pool.submit(co, 2), pool.submit(co, -3)
        wait_queued(co, 2)
        rec.release.set()
        first.result()
        assert good.result() == 20
        with pytest.raises(ValueError, match="bad -3"):
            bad.result()
    assert co(5) == 50


def test_a_batch_function_that_raises_fails_its_whole_batch_only() -> None:
    calls = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("replicas gone")
        return items

    co = Coalescer(run, max_inflight=2)
    with pytest.raises(RuntimeError, match="replicas gone"):
        co(1)
    assert co(2) == 2 and co._leaders == 0


def test_a_short_result_list_is_an_error_not_a_hang() -> None:
    co = Coalescer(lambda items: [], max_inflight=1)
    with pytest.raises(RuntimeError, match="got 0 results"):
        co(1)


def test_never_more_batches_in_flight_than_max_inflight() -> None:
    rec = Recorder()
    co = Coalescer(rec, max_inflight=2)
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(co, range(400))) == [x * 10 for x in range(400)]
    assert 1 <= rec.max_running <= 2
    assert co.calls == 400 and co.batches < 400  # some calls did share a batch
    assert co._leaders == 0 and not co._queue


@pytest.mark.parametrize("inflight", [1, 3])
def test_random_arrivals_every_call_answered_once_in_order_of_its_batch(inflight: int) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def run(items: list[int]) -> list[int]:
        with lock:
            seen.extend(items)
        time.sleep(random.random() * 0.002)
        return [-x for x in items]

    co = Coalescer(run, max_inflight=inflight, max_size=5)

    def caller(k: int) -> list[int]:
        out = []
        for i in range(50):
            time.sleep(random.random() * 0.001)
            out.append(co(k * 1000 + i))
        return out

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(caller, range(12)))
    for k, got in enumerate(results):
        assert got == [-(k * 1000 + i) for i in range(50)]
    assert sorted(seen) == sorted(k * 1000 + i for k in range(12) for i in range(50))
    assert co._leaders == 0 and not co._queue


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Coalescer(lambda items: items, max_inflight=0)


class _Interrupted(Exception):
    pass


def test_a_caller_interrupted_after_being_handed_the_lead_passes_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waiting call that dies (KeyboardInterrupt, say) just as it is made leader must
    hand the lead on: else the calls queued behind it would wait forever."""
    doomed = threading.local()

    class DyingCondition(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            got = super().wait(timeout)
            if getattr(doomed, "yes", False):
                raise _Interrupted
            return got

    monkeypatch.setattr(coalesce_module.threading, "Condition", DyingCondition)
    rec = Recorder(hold_first=True)
    co = Coalescer(rec, max_inflight=1)

    def dying_call(x: int) -> int:
        doomed.yes = True
        return co(x)

    with ThreadPoolExecutor(4) as pool:
        first = hold_a_batch(pool, co, rec)
        victim = pool.submit(dying_call, 2)
        wait_queued(co, 1)
        after = pool.submit(co, 3)
        wait_queued(co, 2)
        rec.release.set()  # the leader finishes and hands the lead to the victim
        assert first.result(timeout=10) == 10
        with pytest.raises(_Interrupted):
            victim.result(timeout=10)
        assert after.result(timeout=10) == 30
    assert co._leaders == 0 and not co._queue
