"""Shared fixtures for the recps test suite.

* ``clock``: a :class:`ManualClock` that stores take as ``clock=``; time moves only when a
  test calls ``advance``, so timestamps agree bit for bit between two stores.
* ``make_tiered``: opens a :class:`TieredStore` under ``tmp_path`` and closes every store it
  opened when the test ends.
* Tests marked ``gpu`` are skipped when CUDA is unavailable (torch is imported only then).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from recps.embedding import TableConfig, TieredStore, TieredStoreConfig

T0 = 1_700_000_000.0  # a fixed, realistic unix time; 0 would hide "timestamp unset" bugs


class ManualClock:
    """A clock that stands still until told to move. Call it for the current time."""

    def __init__(self, start: float = T0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        assert seconds >= 0, "time never goes backwards"
        self.now += seconds
        return self.now


# Every knob that is not under test is made deterministic: no timer flush (3600 s), a
# small RocksDB footprint so many stores per test stay cheap.
TINY_BUDGET_BYTES = 1 << 16


def tiered_config(
    memory_budget_bytes: int = TINY_BUDGET_BYTES,
    durability: str = "async",
    flush_interval_ms: int = 3_600_000,
    mmap_reads: bool = False,
) -> TieredStoreConfig:
    return TieredStoreConfig(
        memory_budget_bytes=memory_budget_bytes,
        durability=durability,  # type: ignore[arg-type]
        flush_interval_ms=flush_interval_ms,
        block_cache_bytes=1 << 20,
        write_buffer_bytes=1 << 20,
        mmap_reads=mmap_reads,
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def clock_cls() -> type[ManualClock]:
    """The class itself, for tests (e.g. hypothesis state machines) that need many clocks."""
    return ManualClock


@pytest.fixture
def make_tiered(tmp_path: Path) -> Iterator[Callable[..., TieredStore]]:
    """``make_tiered(cfg, budget=..., path=None, clock=None, durability="async", mmap_reads=...)``.

    Without ``path`` each call gets a fresh directory; pass the same ``path`` to reopen.
    """
    opened: list[TieredStore] = []
    counter = itertools.count()

    def factory(
        cfg: TableConfig,
        budget: int = TINY_BUDGET_BYTES,
        *,
        path: Path | None = None,
        clock: Callable[[], float] | None = None,
        durability: str = "async",
        mmap_reads: bool = False,
    ) -> TieredStore:
        if path is None:
            path = tmp_path / f"tiered-{next(counter)}"
        store_cfg = tiered_config(budget, durability, mmap_reads=mmap_reads)
        store = TieredStore(path, cfg, store_cfg, clock=clock)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return  # importing torch costs seconds; only pay for it when a gpu test was collected
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
