"""Deterministic row initialization.

A row's initial vector is a pure function of (table name, id, seed, column): a
counter-based generator (splitmix64 over those inputs), so every shard, process and
replica that first touches an id produces the same bits. No RNG state is kept.

Example:
    >>> import numpy as np
    >>> from recps.embedding.config import InitializerConfig
    >>> init = RowInitializer("user", 4, InitializerConfig("uniform", scale=0.1, seed=7))
    >>> a = init(np.array([3, 5], dtype=np.int64))
    >>> bool((init(np.array([5], dtype=np.int64)) == a[1:]).all())
    True
"""

from __future__ import annotations

import numpy as np

from recps.embedding.config import InitializerConfig
from recps.embedding.hashing import GOLDEN, as_u64, mix64, seed_key

_INV_2_53 = 1.0 / float(1 << 53)
_S11 = np.uint64(11)
_SECOND_STREAM = np.uint64(0xD1B54A32D192ED03)


def _uniform01(bits: np.ndarray) -> np.ndarray:
    """Top 53 bits of a uint64 -> float64 in [0, 1)."""
    return (bits >> _S11).astype(np.float64) * _INV_2_53


class RowInitializer:
    """Maps ids to their initial float32 vectors, vectorized over a batch."""

    def __init__(self, table: str, dim: int, config: InitializerConfig) -> None:
        self.dim = dim
        self.config = config
        self._key = seed_key("recps.init", table, config.seed)
        # One odd multiplier per column, so columns are independent streams.
        with np.errstate(over="ignore"):
            self._cols = (np.arange(1, dim + 1, dtype=np.uint64) * GOLDEN) | np.uint64(1)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        n, cfg = len(ids), self.config
        if cfg.kind == "zeros" or cfg.scale == 0.0 or n == 0:
            return np.zeros((n, self.dim), dtype=np.float32)
        base = mix64(as_u64(ids) ^ self._key)
        with np.errstate(over="ignore"):
            bits = mix64(base[:, None] + self._cols[None, :])
        u = _uniform01(bits)
        if cfg.kind == "uniform":
            out = (u * 2.0 - 1.0) * cfg.scale
        else:  # normal, Box-Muller over two independent streams
            u2 = _uniform01(mix64(bits ^ _SECOND_STREAM))
            out = np.sqrt(-2.0 * np.log1p(-u)) * np.cos(2.0 * np.pi * u2) * cfg.scale
        return out.astype(np.float32)
