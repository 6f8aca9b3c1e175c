"""Fixtures over ``ps_harness``: real shard processes that never outlive their test.

* ``ps_group``: a :class:`ShardGroup` for one test; every process it started is killed at
  the end of the test, pass or fail.
* ``ps_module_group``: the same for a whole module (tests that share one cluster).

pytest runs with ``--import-mode=importlib``, so the sibling module is loaded by path and
registered as ``ps_harness`` for the test modules to import.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if "ps_harness" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "ps_harness", Path(__file__).with_name("ps_harness.py")
    )
    assert _spec is not None and _spec.loader is not None
    _harness = importlib.util.module_from_spec(_spec)
    sys.modules["ps_harness"] = _harness
    _spec.loader.exec_module(_harness)

from ps_harness import ShardGroup


@pytest.fixture
def ps_group(tmp_path: Path) -> Iterator[ShardGroup]:
    with ShardGroup(tmp_path / "ps") as group:
        yield group


@pytest.fixture(scope="module")
def ps_module_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShardGroup]:
    with ShardGroup(tmp_path_factory.mktemp("ps-module")) as group:
        yield group
