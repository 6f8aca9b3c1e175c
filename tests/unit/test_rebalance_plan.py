"""The rebalance planner: a pure function, checked by examples and by hypothesis."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from recps.embedding.errors import ConfigError
from recps.ps.rebalance_plan import RebalancePlan, SlotStats, plan_rebalance
from recps.ps.routing import ShardMap


def _map(owner: np.ndarray, shards: set[int] | None = None, epoch: int = 3) -> ShardMap:
    ids = sorted(set(np.unique(owner).tolist()) | (shards or set()))
    return ShardMap(epoch, len(owner), {s: f"h:{s}" for s in ids}, owner.astype(np.uint16))


def _stats(w: np.ndarray) -> SlotStats:
    w = np.asarray(w, dtype=np.int64)
    return SlotStats(w, w * 100, w * 7)


def _loads(owner: np.ndarray, w: np.ndarray, shards: list[int]) -> dict[int, float]:
    return {s: float(w[owner == s].sum()) for s in shards}


@st.composite
def clusters(draw: st.DrawFn) -> tuple[ShardMap, np.ndarray, list[int], float]:
    n = draw(st.sampled_from([16, 64, 256]))
    k = draw(st.integers(1, 5))
    owner = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    w = np.array(draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n)))
    targets = draw(st.sets(st.integers(0, 6), min_size=1, max_size=5))
    tol = draw(st.sampled_from([0.05, 0.1, 0.25, 0.5]))
    return _map(owner), w, sorted(targets), tol


def _check_consistent(m: ShardMap, w: np.ndarray, plan: RebalancePlan) -> np.ndarray:
    after = plan.target_owner(m.slot_owner)
    for mv in plan.moves:
        assert mv.src != mv.dst
        assert all(int(m.slot_owner[s]) == mv.src for s in mv.slots)
    moved = [s for mv in plan.moves for s in mv.slots]
    assert len(moved) == len(set(moved)) == plan.moved_slots
    assert set(np.flatnonzero(after != m.slot_owner).tolist()) == set(moved)
    w_eff = w if w.sum() > 0 else np.ones_like(w)  # no load at all: slot counts
    assert plan.load_after == pytest.approx(_loads(after, w_eff, list(plan.shards_after)))
    return after


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_drained_shards_own_nothing_and_the_plan_is_consistent(case) -> None:
    m, w, targets, tol = case
    plan = plan_rebalance(m, _stats(w), targets, by="rows", tolerance=tol)
    after = _check_consistent(m, w, plan)
    assert set(np.unique(after).tolist()) <= set(targets)
    assert plan.shards_after == tuple(targets)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_balanced_within_tolerance_when_every_slot_fits_in_the_band(case) -> None:
    m, w, targets, tol = case
    mean = w.sum() / len(targets)
    assume(w.sum() > 0 and w.max() <= tol * mean)
    plan = plan_rebalance(m, _stats(w), targets, by="rows", tolerance=tol)
    assert plan.balanced
    for load in plan.load_after.values():
        assert mean * (1 - tol) - 1e-6 <= load <= mean * (1 + tol) + 1e-6


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_an_already_balanced_cluster_moves_nothing(case) -> None:
    m, w, _, tol = case
    targets = sorted(m.shards)  # no shard added or drained
    loads = _loads(m.slot_owner, w, targets)
    mean = w.sum() / len(targets)
    assume(w.sum() > 0)
    assume(all(mean * (1 - tol) <= v <= mean * (1 + tol) for v in loads.values()))
    plan = plan_rebalance(m, _stats(w), targets, by="rows", tolerance=tol)
    assert plan.moves == () and plan.balanced


@settings(max_examples=60, deadline=None)
@given(clusters())
def test_replanning_after_the_plan_moves_nothing_more(case) -> None:
    m, w, targets, tol = case
    plan = plan_rebalance(m, _stats(w), targets, by="rows", tolerance=tol)
    assume(plan.balanced)
    after = _map(plan.target_owner(m.slot_owner), set(targets))
    again = plan_rebalance(after, _stats(w), targets, by="rows", tolerance=tol)
    assert again.moves == ()


def test_grow_two_to_three_moves_a_third() -> None:
    m = ShardMap.even(["a:1", "b:2"], num_slots=1024)
    plan = plan_rebalance(m, SlotStats.uniform(1024), [0, 1, 2], by="rows", tolerance=0.05)
    assert plan.balanced
    assert {(mv.src, mv.dst) for mv in plan.moves} == {(0, 2), (1, 2)}
    # the minimum: just enough for the new shard to reach the band's lower edge
    assert plan.moved_slots == math.ceil(1024 / 3 * (1 - 0.05))
    assert plan.load_before == {0: 512.0, 1: 512.0}


def test_shrink_three_to_two_drains_and_spreads() -> None:
    m = ShardMap.even(["a:1", "b:2", "c:3"], num_slots=999 + 25)
    plan = plan_rebalance(m, SlotStats.uniform(m.num_slots), [0, 1], by="rows", tolerance=0.02)
    after = plan.target_owner(m.slot_owner)
    assert not (after == 2).any()
    assert plan.balanced
    assert plan.moved_slots == int((m.slot_owner == 2).sum())  # only the drained shard's


def test_hot_spot_moves_the_hot_slot_first() -> None:
    owner = np.zeros(64, np.uint16)
    owner[32:] = 1
    q = np.ones(64, np.int64)
    q[3] = 40  # one hot slot on shard 0
    stats = SlotStats(np.ones(64, np.int64), np.ones(64, np.int64), q)
    m = _map(owner)
    by_rows = plan_rebalance(m, stats, [0, 1], by="rows", tolerance=0.1)
    assert by_rows.moves == ()
    by_qps = plan_rebalance(m, stats, [0, 1], by="qps", tolerance=0.1)
    assert by_qps.balanced
    assert by_qps.moved_slots <= 20  # not one slot at a time across the board
    # a slot hotter than the whole band cannot be evened out: said, not hidden
    q[3] = 1000
    worst = plan_rebalance(m, SlotStats(q, q, q), [0, 1], by="qps", tolerance=0.1)
    assert not worst.balanced


def test_qps_balances_recent_rates_not_counts_since_start() -> None:
    owner = np.zeros(64, np.uint16)
    owner[32:] = 1
    ones = np.ones(64, np.int64)
    counts = ones.copy()
    counts[3] = 5000  # slot 3 was hot once (a count since start remembers it) ...
    rates = np.ones(64)
    rates[40] = 40.0  # ... but the heat is on shard 1's slot 40 now
    m = _map(owner)
    plan = plan_rebalance(m, SlotStats(ones, ones, counts, rates), [0, 1], by="qps", tolerance=0.1)
    assert plan.balanced and plan.moves
    assert all(mv.src == 1 and mv.dst == 0 for mv in plan.moves)
    np.testing.assert_array_equal(SlotStats(ones, ones, counts).measure("qps"), counts)
    old = plan_rebalance(m, SlotStats(ones, ones, counts), [0, 1], by="qps", tolerance=0.1)
    assert all(mv.src == 0 for mv in old.moves)


@pytest.mark.parametrize("bad", [np.full(4, -1.0), np.full(4, np.nan), np.ones(3)])
def test_slot_rates_must_be_non_negative_and_cover_the_slots(bad: np.ndarray) -> None:
    one = np.ones(4, np.int64)
    with pytest.raises(ConfigError, match="qps"):
        SlotStats(one, one, one, bad)


def test_empty_cluster_balances_slot_counts() -> None:
    m = ShardMap.even(["a:1"], num_slots=64)
    zero = np.zeros(64, np.int64)
    plan = plan_rebalance(m, SlotStats(zero, zero, zero), [0, 1, 2, 3], tolerance=0.1)
    counts = np.bincount(plan.target_owner(m.slot_owner), minlength=4)
    assert plan.balanced and all(14.4 <= c <= 17.6 for c in counts)


def test_plan_json_round_trip_is_readable(tmp_path: Path) -> None:
    m = ShardMap.even(["a:1", "b:2"], num_slots=256)
    plan = plan_rebalance(m, SlotStats.uniform(256), [0, 1, 2], by="bytes", tolerance=0.1)
    path = tmp_path / "plan.json"
    plan.save(path)
    d = json.loads(path.read_text())
    assert d["moved_slots"] == plan.moved_slots and d["by"] == "bytes"
    assert d["imbalance_before"] is not None and d["imbalance_after"] < 1.11
    assert all({"src", "dst", "count", "slot_ranges"} <= mv.keys() for mv in d["moves"])
    back = RebalancePlan.load(path)
    assert back == plan
    np.testing.assert_array_equal(back.target_owner(m.slot_owner), plan.target_owner(m.slot_owner))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_shards": []}, "at least one"),
        ({"tolerance": 1.5}, "tolerance"),
        ({"by": "latency"}, "--by"),
        ({"target_shards": [70000]}, "shard ids"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict, match: str) -> None:
    m = ShardMap.even(["a:1"], num_slots=16)
    args = {"target_shards": [0], "by": "rows", "tolerance": 0.1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        plan_rebalance(m, SlotStats.uniform(16), **args)


def test_stats_must_cover_the_map() -> None:
    with pytest.raises(ConfigError, match="cover"):
        plan_rebalance(ShardMap.even(["a:1"], num_slots=16), SlotStats.uniform(8), [0])
    with pytest.raises(ConfigError, match="non-negative"):
        SlotStats(np.array([1, -1]), np.zeros(2), np.zeros(2))


def test_a_file_that_is_not_a_plan_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"format": 9}')
    with pytest.raises(ConfigError, match="not a recps rebalance plan"):
        RebalancePlan.load(tmp_path / "x.json")


@pytest.mark.parametrize(
    "name", ["recps.ps.rebalance_plan", "recps.ps.coordinator", "recps.cli.rebalance_cmds"]
)
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, name
