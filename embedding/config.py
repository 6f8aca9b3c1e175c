"""Frozen configs for tables and stores. Validated on construction.

Example:
    >>> cfg = TableConfig(name="user_id", dim=16, optimizer=OptimizerConfig("adagrad", lr=0.05))
    >>> cfg.optimizer.eps  # per-optimizer default filled in
    1e-10
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from recps.embedding.errors import ConfigError

InitKind = Literal["zeros", "uniform", "normal"]
OptimizerKind = Literal["sgd", "adagrad", "adam", "ftrl"]
StorageDtype = Literal["float32", "float16"]
Durability = Literal["async", "sync"]

_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_DEFAULT_EPS = {"sgd": 0.0, "adagrad": 1e-10, "adam": 1e-8, "ftrl": 0.0}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class InitializerConfig:
    """How a row is born. Deterministic in (table, id, seed): every shard agrees."""

    kind: InitKind = "uniform"
    scale: float = 0.01  # uniform: U(-scale, scale); normal: N(0, scale**2)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.kind in ("zeros", "uniform", "normal"), f"unknown initializer {self.kind!r}")
        _require(self.scale >= 0, f"initializer scale must be >= 0, got {self.scale}")


@dataclass(frozen=True)
class OptimizerConfig:
    """Server-side sparse optimizer. ``eps=None`` takes the optimizer's usual default."""

    kind: OptimizerKind = "adagrad"
    lr: float = 0.01
    eps: float | None = None
    initial_accumulator: float = 0.0  # adagrad: starting value of the squared-grad sum
    beta1: float = 0.9  # adam
    beta2: float = 0.999  # adam
    weight_decay: float = 0.0  # sgd/adagrad/adam: L2 added to the gradient, as torch does
    ftrl_beta: float = 1.0  # ftrl: the "beta" in the per-coordinate learning rate
    l1: float = 0.0  # ftrl
    l2: float = 0.0  # ftrl

    def __post_init__(self) -> None:
        _require(self.kind in _DEFAULT_EPS, f"unknown optimizer {self.kind!r}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        if self.eps is None:
            object.__setattr__(self, "eps", _DEFAULT_EPS[self.kind])
        _require(self.eps >= 0, "eps must be >= 0")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "adam betas must be in [0, 1)")
        _require(self.initial_accumulator >= 0, "initial_accumulator must be >= 0")
        _require(self.l1 >= 0 and self.l2 >= 0 and self.ftrl_beta >= 0, "ftrl l1, l2, beta >= 0")
        _require(self.weight_decay >= 0, "weight_decay must be >= 0")


@dataclass(frozen=True)
class AdmissionConfig:
    """An id gets a stored row only after ``min_count`` lookups (1 = admit at once).

    Counting uses a count-min sketch of ``sketch_depth x sketch_width`` 16-bit counters,
    so memory is bounded; a hash collision can only admit an id early, never late.
    """

    min_count: int = 1
    sketch_width: int = 1 << 18
    sketch_depth: int = 4

    def __post_init__(self) -> None:
        _require(1 <= self.min_count <= 65535, "min_count must be in [1, 65535]")
        _require(self.sketch_width >= 64, "sketch_width must be >= 64")
        _require(
            self.sketch_width & (self.sketch_width - 1) == 0, "sketch_width must be a power of 2"
        )
        _require(1 <= self.sketch_depth <= 8, "sketch_depth must be in [1, 8]")

    @property
    def enabled(self) -> bool:
        return self.min_count > 1


@dataclass(frozen=True)
class ExpiryConfig:
    """Rows not updated for ``ttl_s`` seconds are deleted by a periodic sweep."""

    ttl_s: float | None = None  # None: rows never expire
    sweep_interval_s: float = 60.0

    def __post_init__(self) -> None:
        _require(self.ttl_s is None or self.ttl_s > 0, "ttl_s must be > 0 or None")
        _require(self.sweep_interval_s > 0, "sweep_interval_s must be > 0")


@dataclass(frozen=True)
class TableConfig:
    """Everything that defines one embedding table's semantics."""

    name: str
    dim: int
    dtype: StorageDtype = "float32"  # storage dtype of the embedding; lookups return float32
    initializer: InitializerConfig = field(default_factory=InitializerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    expiry: ExpiryConfig = field(default_factory=ExpiryConfig)
    nonfinite: Literal["reject", "skip"] = "reject"  # NaN/Inf gradients: fail batch, or drop rows

    def __post_init__(self) -> None:
        _require(
            isinstance(self.name, str) and bool(_TABLE_NAME.match(self.name)),
            f"table name {self.name!r} must match {_TABLE_NAME.pattern}",
        )
        _require(isinstance(self.dim, int) and 1 <= self.dim <= 4096, "dim must be in [1, 4096]")
        _require(self.dtype in ("float32", "float16"), f"unsupported dtype {self.dtype!r}")
        _require(self.nonfinite in ("reject", "skip"), "nonfinite must be 'reject' or 'skip'")

    def replace(self, **changes: Any) -> TableConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableConfig:
        d = dict(d)
        d["initializer"] = InitializerConfig(**d.get("initializer", {}))
        d["optimizer"] = OptimizerConfig(**d.get("optimizer", {}))
        d["admission"] = AdmissionConfig(**d.get("admission", {}))
        d["expiry"] = ExpiryConfig(**d.get("expiry", {}))
        return cls(**d)


@dataclass(frozen=True)
class TieredStoreConfig:
    """Memory and durability knobs of a :class:`TieredStore`."""

    memory_budget_bytes: int = 256 << 20  # hot tier: rows, optimizer state and hash index
    durability: Durability = "async"  # async: WAL on flush/evict/timer; sync: WAL per batch
    # async: background write-back of dirty rows. Each pass rewrites every row dirtied
    # since the last one (~4 us a row through rocksdict, GIL held), so a short interval
    # costs training throughput; 5 s bounds the loss window on a crash.
    flush_interval_ms: int = 5000
    fsync: bool = False  # also fsync the WAL (power-loss safety); kill -9 needs only the WAL
    block_cache_bytes: int = 64 << 20
    row_cache_bytes: int = 0  # RocksDB row cache; 0 disables it
    bloom_bits_per_key: int = 10
    write_buffer_bytes: int = 32 << 20
    # SST data block size. A miss reads one whole block for one ~0.5 KiB row: small
    # blocks cut the bytes copied and checksummed per read and let the block cache hold
    # ~4x more distinct rows than 4 KiB blocks (~30% less time per multi-get key), for an
    # index of ~2% of the data instead of ~0.5%.
    block_bytes: int = 1024
    # Read SST files through mmap instead of pread: a cold row read skips a syscall and a
    # copy into the block cache (benchmarks/store.py full run: cold lookups 1.0 -> 1.6 M
    # rows/s). Off by default: mapped SST pages count toward the process's RSS (page
    # cache, reclaimable, but RSS), which took that run from budget + 277 MB to budget +
    # 930 MB, past the store's budget + 300 MB bound.
    mmap_reads: bool = False

    def __post_init__(self) -> None:
        _require(self.memory_budget_bytes >= 1 << 16, "memory_budget_bytes must be >= 64 KiB")
        _require(self.durability in ("async", "sync"), "durability must be 'async' or 'sync'")
        _require(self.flush_interval_ms > 0, "flush_interval_ms must be > 0")
        _require(self.block_cache_bytes >= 0 and self.row_cache_bytes >= 0, "caches must be >= 0")
        _require(0 <= self.bloom_bits_per_key <= 64, "bloom_bits_per_key must be in [0, 64]")
        _require(self.write_buffer_bytes >= 1 << 20, "write_buffer_bytes must be >= 1 MiB")
        _require(512 <= self.block_bytes <= 1 << 20, "block_bytes must be in [512, 1 MiB]")
