"""Fixtures over ``ps_harness``: real shard processes that never outlive their test.

* ``ps_group``: a :class:`ShardGroup` for one test; every process it started is killed at
  the end of the test, pass or fail.
* ``ps_module_group``: the same for a whole module (tests that share one cluster).

pytest runs with ``--import-mode=importlib``, so the sibling module is loaded by path and
registered as ``ps_harness`` (and ``serving_harness``) for the test modules to import.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

for _name in ("serving_harness", "ps_harness"):  # ps_harness imports serving_harness
    if _name not in sys.modules:
        _spec = importlib.util.spec_from_file_location(
            _name, Path(__file__).with_name(f"{_name}.py")
        )
        assert _spec is not None and _spec.loader is not None
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[_name] = _module
        _spec.loader.exec_module(_module)

from ps_harness import ShardGroup  # noqa: E402 (registered just above)


@pytest.fixture
def ps_group(tmp_path: Path) -> Iterator[ShardGroup]:
    with ShardGroup(tmp_path / "ps") as group:
        yield group


@pytest.fixture(scope="module")
def ps_module_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShardGroup]:
    with ShardGroup(tmp_path_factory.mktemp("ps-module")) as group:
        yield group
