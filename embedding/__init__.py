"""recps.embedding: table semantics, server-side optimizers and the tiered embedding store.

No gRPC and no Ray here; ``recps.ps`` builds the network service on top.

Example:
    >>> import numpy as np, tempfile
    >>> from recps.embedding import TableConfig, TieredStore, TieredStoreConfig
    >>> store = TieredStore(tempfile.mkdtemp(), TableConfig("user", dim=16),
    ...                     TieredStoreConfig(memory_budget_bytes=8 << 20))
    >>> ids = np.array([3, 1, 3], dtype=np.int64)
    >>> rows = store.lookup(ids)
    >>> store.apply_gradients(ids, np.ones_like(rows))
    2
    >>> store.close()
"""

from recps.embedding.base import DurableMark, EmbeddingStore, RowBatch, StoreStats
from recps.embedding.config import (
    AdmissionConfig,
    ExpiryConfig,
    InitializerConfig,
    OptimizerConfig,
    TableConfig,
    TieredStoreConfig,
)
from recps.embedding.errors import (
    CapacityError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    DimensionMismatchError,
    DtypeError,
    InvalidArgumentError,
    LengthMismatchError,
    NonFiniteGradientError,
    RecpsError,
    ShapeError,
    StorageError,
    StoreClosedError,
    UnknownTableError,
)
from recps.embedding.memory_store import MemoryStore
from recps.embedding.tiered_store import TieredStore

__all__ = [
    "AdmissionConfig",
    "CapacityError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DimensionMismatchError",
    "DtypeError",
    "DurableMark",
    "EmbeddingStore",
    "ExpiryConfig",
    "InitializerConfig",
    "InvalidArgumentError",
    "LengthMismatchError",
    "MemoryStore",
    "NonFiniteGradientError",
    "OptimizerConfig",
    "RecpsError",
    "RowBatch",
    "ShapeError",
    "StorageError",
    "StoreClosedError",
    "StoreStats",
    "TableConfig",
    "TieredStore",
    "TieredStoreConfig",
    "UnknownTableError",
]
