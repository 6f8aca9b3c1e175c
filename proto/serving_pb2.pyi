from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class LoadVersionResponse(_message.Message):
    __slots__ = ("current", "previous", "changed", "seconds")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    current: VersionInfo
    previous: VersionInfo
    changed: bool
    seconds: float
    def __init__(self, current: _Optional[_Union[VersionInfo, _Mapping]] = ..., previous: _Optional[_Union[VersionInfo, _Mapping]] = ..., changed: _Optional[bool] = ..., seconds: _Optional[float] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("current", "previous")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    current: VersionInfo
    previous: VersionInfo
    def __init__(self, current: _Optional[_Union[VersionInfo, _Mapping]] = ..., previous: _Optional[_Union[VersionInfo, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableStatus(_message.Message):
    __slots__ = ("table", "dim", "row_format", "default_kind", "rows", "disk_bytes", "cache_rows", "cache_capacity", "cache_hits", "cache_misses", "cache_hit_rate", "lookups")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROW_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_KIND_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_ROWS_FIELD_NUMBER: _ClassVar[int]
    CACHE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    table: str
    dim: int
    row_format: str
    default_kind: str
    rows: int
    disk_bytes: int
    cache_rows: int
    cache_capacity: int
    cache_hits: int
    cache_misses: int
    cache_hit_rate: float
    lookups: int
    def __init__(self, table: _Optional[str] = ..., dim: _Optional[int] = ..., row_format: _Optional[str] = ..., default_kind: _Optional[str] = ..., rows: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., cache_rows: _Optional[int] = ..., cache_capacity: _Optional[int] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., cache_hit_rate: _Optional[float] = ..., lookups: _Optional[int] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "path", "tables", "loaded_at", "load_seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    path: str
    tables: _containers.RepeatedCompositeFieldContainer[TableStatus]
    loaded_at: float
    load_seconds: float
    def __init__(self, version: _Optional[int] = ..., path: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableStatus, _Mapping]]] = ..., loaded_at: _Optional[float] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("current", "previous", "model_root", "shards", "pinned_version", "watch_interval_s", "latest_available", "uptime_s", "address", "delta_dir", "deltas", "deltas_applied")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ROOT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    PINNED_VERSION_FIELD_NUMBER: _ClassVar[int]
    WATCH_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LATEST_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DELTA_DIR_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    DELTAS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    current: VersionInfo
    previous: VersionInfo
    model_root: str
    shards: _containers.RepeatedScalarFieldContainer[int]
    pinned_version: int
    watch_interval_s: float
    latest_available: int
    uptime_s: float
    address: str
    delta_dir: str
    deltas: _containers.RepeatedCompositeFieldContainer[DeltaShardStatus]
    deltas_applied: int
    def __init__(self, current: _Optional[_Union[VersionInfo, _Mapping]] = ..., previous: _Optional[_Union[VersionInfo, _Mapping]] = ..., model_root: _Optional[str] = ..., shards: _Optional[_Iterable[int]] = ..., pinned_version: _Optional[int] = ..., watch_interval_s: _Optional[float] = ..., latest_available: _Optional[int] = ..., uptime_s: _Optional[float] = ..., address: _Optional[str] = ..., delta_dir: _Optional[str] = ..., deltas: _Optional[_Iterable[_Union[DeltaShardStatus, _Mapping]]] = ..., deltas_applied: _Optional[int] = ...) -> None: ...

class DeltaShardStatus(_message.Message):
    __slots__ = ("training_shard", "applied_seq", "latest_seq", "lag_s", "applied_at", "error")
    TRAINING_SHARD_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    LATEST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAG_S_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    training_shard: int
    applied_seq: int
    latest_seq: int
    lag_s: float
    applied_at: float
    error: str
    def __init__(self, training_shard: _Optional[int] = ..., applied_seq: _Optional[int] = ..., latest_seq: _Optional[int] = ..., lag_s: _Optional[float] = ..., applied_at: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...
