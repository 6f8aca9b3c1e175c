from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]

class MigrateAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATE_ACTION_UNSPECIFIED: _ClassVar[MigrateAction]
    BEGIN_SOURCE: _ClassVar[MigrateAction]
    BEGIN_TARGET: _ClassVar[MigrateAction]
    FREEZE: _ClassVar[MigrateAction]
    PREPARE_TARGET: _ClassVar[MigrateAction]
    FINISH: _ClassVar[MigrateAction]
    ABORT_SOURCE: _ClassVar[MigrateAction]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
MIGRATE_ACTION_UNSPECIFIED: MigrateAction
BEGIN_SOURCE: MigrateAction
BEGIN_TARGET: MigrateAction
FREEZE: MigrateAction
PREPARE_TARGET: MigrateAction
FINISH: MigrateAction
ABORT_SOURCE: MigrateAction

class TableIds(_message.Message):
    __slots__ = ("table", "ids")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("shard_map_epoch", "tables", "create_missing", "want_dtype", "model_version")
    SHARD_MAP_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    CREATE_MISSING_FIELD_NUMBER: _ClassVar[int]
    WANT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    shard_map_epoch: int
    tables: _containers.RepeatedCompositeFieldContainer[TableIds]
    create_missing: bool
    want_dtype: DType
    model_version: int
    def __init__(self, shard_map_epoch: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableIds, _Mapping]]] = ..., create_missing: _Optional[bool] = ..., want_dtype: _Optional[_Union[DType, str]] = ..., model_version: _Optional[int] = ...) -> None: ...

class TableRows(_message.Message):
    __slots__ = ("table", "rows", "dim", "dtype")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    table: str
    rows: bytes
    dim: int
    dtype: DType
    def __init__(self, table: _Optional[str] = ..., rows: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableRows]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableRows, _Mapping]]] = ...) -> None: ...

class TableGrads(_message.Message):
    __slots__ = ("table", "ids", "grads", "dim", "dtype")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    grads: bytes
    dim: int
    dtype: DType
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("client_id", "seq", "shard_map_epoch", "tables", "wait_durable")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    WAIT_DURABLE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    seq: int
    shard_map_epoch: int
    tables: _containers.RepeatedCompositeFieldContainer[TableGrads]
    wait_durable: bool
    def __init__(self, client_id: _Optional[str] = ..., seq: _Optional[int] = ..., shard_map_epoch: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableGrads, _Mapping]]] = ..., wait_durable: _Optional[bool] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("applied_rows", "duplicate")
    APPLIED_ROWS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    applied_rows: int
    duplicate: bool
    def __init__(self, applied_rows: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class InitializerSpec(_message.Message):
    __slots__ = ("kind", "scale", "seed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    scale: float
    seed: int
    def __init__(self, kind: _Optional[str] = ..., scale: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("kind", "lr", "eps", "initial_accumulator", "beta1", "beta2", "weight_decay", "ftrl_beta", "l1", "l2")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    FTRL_BETA_FIELD_NUMBER: _ClassVar[int]
    L1_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    kind: str
    lr: float
    eps: float
    initial_accumulator: float
    beta1: float
    beta2: float
    weight_decay: float
    ftrl_beta: float
    l1: float
    l2: float
    def __init__(self, kind: _Optional[str] = ..., lr: _Optional[float] = ..., eps: _Optional[float] = ..., initial_accumulator: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., weight_decay: _Optional[float] = ..., ftrl_beta: _Optional[float] = ..., l1: _Optional[float] = ..., l2: _Optional[float] = ...) -> None: ...

class AdmissionSpec(_message.Message):
    __slots__ = ("min_count", "sketch_width", "sketch_depth")
    MIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    SKETCH_WIDTH_FIELD_NUMBER: _ClassVar[int]
    SKETCH_DEPTH_FIELD_NUMBER: _ClassVar[int]
    min_count: int
    sketch_width: int
    sketch_depth: int
    def __init__(self, min_count: _Optional[int] = ..., sketch_width: _Optional[int] = ..., sketch_depth: _Optional[int] = ...) -> None: ...

class ExpirySpec(_message.Message):
    __slots__ = ("ttl_s", "sweep_interval_s")
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    SWEEP_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    ttl_s: float
    sweep_interval_s: float
    def __init__(self, ttl_s: _Optional[float] = ..., sweep_interval_s: _Optional[float] = ...) -> None: ...

class TableSpec(_message.Message):
    __slots__ = ("name", "dim", "dtype", "initializer", "optimizer", "admission", "expiry", "nonfinite")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    dtype: DType
    initializer: InitializerSpec
    optimizer: OptimizerSpec
    admission: AdmissionSpec
    expiry: ExpirySpec
    nonfinite: str
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., initializer: _Optional[_Union[InitializerSpec, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., admission: _Optional[_Union[AdmissionSpec, _Mapping]] = ..., expiry: _Optional[_Union[ExpirySpec, _Mapping]] = ..., nonfinite: _Optional[str] = ...) -> None: ...

class CreateTableRequest(_message.Message):
    __slots__ = ("spec", "if_not_exists")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IF_NOT_EXISTS_FIELD_NUMBER: _ClassVar[int]
    spec: TableSpec
    if_not_exists: bool
    def __init__(self, spec: _Optional[_Union[TableSpec, _Mapping]] = ..., if_not_exists: _Optional[bool] = ...) -> None: ...

class CreateTableResponse(_message.Message):
    __slots__ = ("spec", "created")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    spec: TableSpec
    created: bool
    def __init__(self, spec: _Optional[_Union[TableSpec, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableSpec]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableSpec, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("tables", "fresh_slot_rows")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    FRESH_SLOT_ROWS_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    fresh_slot_rows: bool
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., fresh_slot_rows: _Optional[bool] = ...) -> None: ...

class TableStats(_message.Message):
    __slots__ = ("table", "rows_in_memory", "rows_on_disk", "hit_rate", "memory_bytes", "disk_bytes", "evictions", "admission_rejected", "expired_rows", "nonfinite_skipped", "lookups", "pushes")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_IN_MEMORY_FIELD_NUMBER: _ClassVar[int]
    ROWS_ON_DISK_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_REJECTED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_ROWS_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    table: str
    rows_in_memory: int
    rows_on_disk: int
    hit_rate: float
    memory_bytes: int
    disk_bytes: int
    evictions: int
    admission_rejected: int
    expired_rows: int
    nonfinite_skipped: int
    lookups: int
    pushes: int
    def __init__(self, table: _Optional[str] = ..., rows_in_memory: _Optional[int] = ..., rows_on_disk: _Optional[int] = ..., hit_rate: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., evictions: _Optional[int] = ..., admission_rejected: _Optional[int] = ..., expired_rows: _Optional[int] = ..., nonfinite_skipped: _Optional[int] = ..., lookups: _Optional[int] = ..., pushes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_id", "epoch", "uptime_s", "rss_bytes", "tables", "slot_ids", "slot_rows", "slot_requests", "slot_bytes", "slot_rows_age_s", "slot_qps")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SLOT_IDS_FIELD_NUMBER: _ClassVar[int]
    SLOT_ROWS_FIELD_NUMBER: _ClassVar[int]
    SLOT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_ROWS_AGE_S_FIELD_NUMBER: _ClassVar[int]
    SLOT_QPS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    epoch: int
    uptime_s: float
    rss_bytes: int
    tables: _containers.RepeatedCompositeFieldContainer[TableStats]
    slot_ids: _containers.RepeatedScalarFieldContainer[int]
    slot_rows: _containers.RepeatedScalarFieldContainer[int]
    slot_requests: _containers.RepeatedScalarFieldContainer[int]
    slot_bytes: _containers.RepeatedScalarFieldContainer[int]
    slot_rows_age_s: float
    slot_qps: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shard_id: _Optional[int] = ..., epoch: _Optional[int] = ..., uptime_s: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableStats, _Mapping]]] = ..., slot_ids: _Optional[_Iterable[int]] = ..., slot_rows: _Optional[_Iterable[int]] = ..., slot_requests: _Optional[_Iterable[int]] = ..., slot_bytes: _Optional[_Iterable[int]] = ..., slot_rows_age_s: _Optional[float] = ..., slot_qps: _Optional[_Iterable[float]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("dir", "tag", "request_id")
    DIR_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    dir: str
    tag: str
    request_id: str
    def __init__(self, dir: _Optional[str] = ..., tag: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("path", "rows", "tables", "seconds")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    rows: int
    tables: _containers.RepeatedScalarFieldContainer[str]
    seconds: float
    def __init__(self, path: _Optional[str] = ..., rows: _Optional[int] = ..., tables: _Optional[_Iterable[str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("dir", "tag", "dry_run")
    DIR_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dir: str
    tag: str
    dry_run: bool
    def __init__(self, dir: _Optional[str] = ..., tag: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("path", "rows", "tables", "seconds")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    rows: int
    tables: _containers.RepeatedScalarFieldContainer[str]
    seconds: float
    def __init__(self, path: _Optional[str] = ..., rows: _Optional[int] = ..., tables: _Optional[_Iterable[str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class GetShardMapRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("shard_id", "address")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    address: str
    def __init__(self, shard_id: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class ShardMap(_message.Message):
    __slots__ = ("epoch", "num_slots", "shards", "slot_owner")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SLOT_OWNER_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    num_slots: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    slot_owner: bytes
    def __init__(self, epoch: _Optional[int] = ..., num_slots: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., slot_owner: _Optional[bytes] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("move_id", "action", "slots")
    MOVE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    move_id: str
    action: MigrateAction
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, move_id: _Optional[str] = ..., action: _Optional[_Union[MigrateAction, str]] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class MigrateResponse(_message.Message):
    __slots__ = ("rows", "epoch")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    rows: int
    epoch: int
    def __init__(self, rows: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class ReadSlotRowsRequest(_message.Message):
    __slots__ = ("move_id", "table", "slots", "delta", "after_id", "has_after_id", "max_rows", "delta_round")
    MOVE_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    DELTA_ROUND_FIELD_NUMBER: _ClassVar[int]
    move_id: str
    table: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    delta: bool
    after_id: int
    has_after_id: bool
    max_rows: int
    delta_round: int
    def __init__(self, move_id: _Optional[str] = ..., table: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ..., delta: _Optional[bool] = ..., after_id: _Optional[int] = ..., has_after_id: _Optional[bool] = ..., max_rows: _Optional[int] = ..., delta_round: _Optional[int] = ...) -> None: ...

class SlotRows(_message.Message):
    __slots__ = ("table", "ids", "weights", "state", "updated_at", "count", "dim", "state_width")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    STATE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    weights: bytes
    state: bytes
    updated_at: bytes
    count: bytes
    dim: int
    state_width: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., weights: _Optional[bytes] = ..., state: _Optional[bytes] = ..., updated_at: _Optional[bytes] = ..., count: _Optional[bytes] = ..., dim: _Optional[int] = ..., state_width: _Optional[int] = ...) -> None: ...

class ReadSlotRowsResponse(_message.Message):
    __slots__ = ("rows", "done")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    rows: SlotRows
    done: bool
    def __init__(self, rows: _Optional[_Union[SlotRows, _Mapping]] = ..., done: _Optional[bool] = ...) -> None: ...

class WriteSlotRowsRequest(_message.Message):
    __slots__ = ("move_id", "rows")
    MOVE_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    move_id: str
    rows: SlotRows
    def __init__(self, move_id: _Optional[str] = ..., rows: _Optional[_Union[SlotRows, _Mapping]] = ...) -> None: ...

class WriteSlotRowsResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class EchoRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class EchoResponse(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...
