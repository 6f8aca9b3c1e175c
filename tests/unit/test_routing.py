"""Hash-slot routing and the shard map."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recps.embedding.errors import ConfigError
from recps.ps.routing import ShardMap, slot_of


def test_slots_are_stable_across_calls_and_processes() -> None:
    ids = np.array([0, 1, -1, 2**63 - 1, -(2**63)], dtype=np.int64)
    # Golden values: if routing changes between releases, existing data is misrouted.
    got = slot_of("user", ids, 16384).tolist()
    assert got == [5884, 289, 9082, 3117, 11180]
    assert got == slot_of("user", ids.copy(), 16384).tolist()
    assert all(0 <= s < 16384 for s in got)
    import subprocess
    import sys

    code = (
        "import numpy as np; from recps.ps.routing import slot_of; "
        "print(slot_of('user', np.array([0, 1, -1, 2**63-1, -2**63], dtype=np.int64), 16384)"
        ".tolist())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(got)


def test_tables_salt_the_slot() -> None:
    ids = np.arange(10_000, dtype=np.int64)
    a, b = slot_of("user", ids, 1024), slot_of("item", ids, 1024)
    assert np.mean(a == b) < 0.01


def test_slots_are_balanced() -> None:
    counts = np.bincount(slot_of("t", np.arange(1_000_000, dtype=np.int64), 256), minlength=256)
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()


def test_even_map_splits_slots_contiguously() -> None:
    m = ShardMap.even(["a:1", "b:2", "c:3"], num_slots=16)
    assert m.slot_owner.tolist() == [0] * 6 + [1] * 5 + [2] * 5
    assert sorted(m.slots_of(1).tolist()) == list(range(6, 11))


@settings(max_examples=50, deadline=None)
@given(
    owners=st.lists(st.integers(0, 3), min_size=64, max_size=64),
    epoch=st.integers(0, 2**40),
)
def test_map_round_trips_through_dict_json_and_proto(owners, epoch, tmp_path_factory) -> None:
    shards = {i: f"127.0.0.1:{7000 + i}" for i in range(4)}
    m = ShardMap(epoch, 64, shards, np.array(owners))
    assert ShardMap.from_dict(m.to_dict()) == m
    assert ShardMap.from_proto(m.to_proto()) == m
    path = tmp_path_factory.mktemp("map") / "m.json"
    m.save(path)
    assert ShardMap.load(path) == m


def test_owners_follow_slot_owner() -> None:
    m = ShardMap.even(["a", "b"], num_slots=64)
    ids = np.arange(1000, dtype=np.int64)
    assert np.array_equal(m.owners("t", ids), m.slot_owner[slot_of("t", ids, 64)])
    moved = m.slot_owner.copy()
    moved[:] = 1
    m2 = m.replace(slot_owner=moved)
    assert m2.epoch == m.epoch + 1 and (m2.owners("t", ids) == 1).all()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_slots": 100}, "power of two"),
        ({"slot_owner": np.zeros(8)}, "must have 16 entries"),
        ({"slot_owner": np.full(16, 5)}, "unknown shards"),
    ],
)
def test_invalid_maps_are_refused(kwargs, needle) -> None:
    base = {"epoch": 1, "num_slots": 16, "shards": {0: "a"}, "slot_owner": np.zeros(16)}
    base.update(kwargs)
    if "num_slots" in kwargs:
        base["slot_owner"] = np.zeros(kwargs["num_slots"])
    with pytest.raises(ConfigError, match=needle):
        ShardMap(**base)


def test_map_with_unowned_slot_range_is_refused() -> None:
    d = ShardMap.even(["a", "b"], num_slots=16).to_dict()
    d["slot_ranges"] = d["slot_ranges"][:1]
    with pytest.raises(ConfigError, match="without an owner"):
        ShardMap.from_dict(d)


def test_slots_of_tables_is_slot_of_per_table() -> None:
    from recps.ps.routing import slots_of_tables

    rng = np.random.default_rng(0)
    names = ["a", "b", "user", "ads"]
    ids = [rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64) for n in (5, 0, 300, 1)]
    want = np.concatenate([slot_of(t, i, 16384) for t, i in zip(names, ids)])
    np.testing.assert_array_equal(slots_of_tables(names, ids, 16384), want)
    np.testing.assert_array_equal(slots_of_tables(names[:1], ids[:1], 64), slot_of("a", ids[0], 64))
    assert slots_of_tables([], [], 16384).shape == (0,)
