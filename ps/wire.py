"""Conversions between protobuf messages and numpy / recps configs, with validation.

Every decode checks byte lengths before ``np.frombuffer`` so that a malformed request
becomes an :class:`InvalidArgumentError` naming the field, never a numpy traceback.

Example:
    >>> import numpy as np
    >>> decode_ids(encode_ids(np.array([1, -2])), "ids").tolist()
    [1, -2]
"""

from __future__ import annotations

import numpy as np

from recps.embedding.config import (
    AdmissionConfig,
    ExpiryConfig,
    InitializerConfig,
    OptimizerConfig,
    TableConfig,
)
from recps.embedding.errors import ConfigError, DimensionMismatchError, InvalidArgumentError
from recps.proto import ps_pb2

WIRE_DTYPES = {ps_pb2.DTYPE_UNSPECIFIED: "<f4", ps_pb2.FLOAT32: "<f4", ps_pb2.FLOAT16: "<f2"}
STORAGE_TO_WIRE = {"float32": ps_pb2.FLOAT32, "float16": ps_pb2.FLOAT16}


def encode_ids(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def _name(what: str, table: str | None) -> str:
    # Error messages are formatted only on error: decoding is on every request's path.
    return what if table is None else f"table {table!r} {what}"


def decode_ids(raw: bytes, what: str, table: str | None = None) -> np.ndarray:
    """Read-only int64 view of the bytes (no copy)."""
    if len(raw) % 8:
        what = _name(what, table)
        raise InvalidArgumentError(
            f"{what}: {len(raw)} bytes is not a multiple of 8 (int64 little-endian ids)"
        )
    return np.frombuffer(raw, dtype="<i8")


def wire_dtype(code: int, what: str) -> np.dtype:
    try:
        return np.dtype(WIRE_DTYPES[code])
    except KeyError:
        raise InvalidArgumentError(f"{what}: unknown dtype code {code}") from None


def decode_rows(
    raw: bytes, n: int, dim: int, dtype_code: int, what: str, table: str | None = None
) -> np.ndarray:
    """``n x dim`` rows from bytes, as float32 (float16 on the wire is widened); float32
    rows are a read-only view of the bytes (no copy)."""
    code = WIRE_DTYPES.get(dtype_code)
    if code is None:
        wire_dtype(dtype_code, _name(what, table))  # raises
    dt = np.dtype(code)
    want = n * dim * dt.itemsize
    if len(raw) != want:
        what = _name(what, table)
        raise InvalidArgumentError(
            f"{what}: {len(raw)} bytes, expected {want} ({n} ids x dim {dim} x {dt.itemsize} B)"
        )
    rows = np.frombuffer(raw, dtype=dt).reshape(n, dim)
    return rows if dt == np.float32 else rows.astype(np.float32)


def encode_rows(rows: np.ndarray, dtype_code: int) -> bytes:
    if rows.dtype == np.float32 and dtype_code != ps_pb2.FLOAT16 and rows.flags.c_contiguous:
        return rows.tobytes()  # the common case, without the dtype lookups
    return np.ascontiguousarray(rows, dtype=wire_dtype(dtype_code, "rows")).tobytes()


def check_dim(sent: int, table: TableConfig) -> None:
    if sent and sent != table.dim:
        raise DimensionMismatchError(f"table {table.name!r} grads", table.dim, sent)


# ---- table specs ------------------------------------------------------------------------


def spec_from_config(cfg: TableConfig) -> ps_pb2.TableSpec:
    o = cfg.optimizer
    return ps_pb2.TableSpec(
        name=cfg.name,
        dim=cfg.dim,
        dtype=STORAGE_TO_WIRE[cfg.dtype],
        initializer=ps_pb2.InitializerSpec(
            kind=cfg.initializer.kind, scale=cfg.initializer.scale, seed=cfg.initializer.seed
        ),
        optimizer=ps_pb2.OptimizerSpec(
            kind=o.kind,
            lr=o.lr,
            eps=o.eps,
            initial_accumulator=o.initial_accumulator,
            beta1=o.beta1,
            beta2=o.beta2,
            weight_decay=o.weight_decay,
            ftrl_beta=o.ftrl_beta,
            l1=o.l1,
            l2=o.l2,
        ),
        admission=ps_pb2.AdmissionSpec(
            min_count=cfg.admission.min_count,
            sketch_width=cfg.admission.sketch_width,
            sketch_depth=cfg.admission.sketch_depth,
        ),
        expiry=ps_pb2.ExpirySpec(
            ttl_s=cfg.expiry.ttl_s or 0.0, sweep_interval_s=cfg.expiry.sweep_interval_s
        ),
        nonfinite=cfg.nonfinite,
    )


def config_from_spec(spec: ps_pb2.TableSpec) -> TableConfig:
    """A validated TableConfig; unset fields take recps defaults. Raises ConfigError."""
    try:
        dtype = {0: "float32", ps_pb2.FLOAT32: "float32", ps_pb2.FLOAT16: "float16"}[spec.dtype]
    except KeyError:
        raise ConfigError(f"table {spec.name!r}: unknown storage dtype {spec.dtype}") from None
    init = InitializerConfig()
    if spec.HasField("initializer"):
        i = spec.initializer
        init = InitializerConfig(kind=i.kind or "uniform", scale=i.scale, seed=i.seed)
    opt = OptimizerConfig()
    if spec.HasField("optimizer"):
        o, d = spec.optimizer, OptimizerConfig()
        opt = OptimizerConfig(
            kind=o.kind or d.kind,
            lr=o.lr or d.lr,
            eps=o.eps if o.HasField("eps") else None,
            initial_accumulator=o.initial_accumulator,
            beta1=o.beta1 if o.HasField("beta1") else d.beta1,
            beta2=o.beta2 if o.HasField("beta2") else d.beta2,
            weight_decay=o.weight_decay,
            ftrl_beta=o.ftrl_beta if o.HasField("ftrl_beta") else d.ftrl_beta,
            l1=o.l1,
            l2=o.l2,
        )
    adm = AdmissionConfig()
    if spec.HasField("admission"):
        a, d = spec.admission, AdmissionConfig()
        adm = AdmissionConfig(
            min_count=a.min_count or 1,
            sketch_width=a.sketch_width or d.sketch_width,
            sketch_depth=a.sketch_depth or d.sketch_depth,
        )
    exp = ExpiryConfig()
    if spec.HasField("expiry"):
        e = spec.expiry
        exp = ExpiryConfig(
            ttl_s=e.ttl_s or None, sweep_interval_s=e.sweep_interval_s or exp.sweep_interval_s
        )
    if not isinstance(spec.dim, int) or spec.dim == 0:
        raise ConfigError(f"table {spec.name!r}: dim must be set")
    return TableConfig(
        name=spec.name,
        dim=spec.dim,
        dtype=dtype,  # type: ignore[arg-type]
        initializer=init,
        optimizer=opt,
        admission=adm,
        expiry=exp,
        nonfinite=spec.nonfinite or "reject",  # type: ignore[arg-type]
    )


# ---- hand-encoded LookupResponse --------------------------------------------------------
# The Lookup response is ~all row bytes. Built as messages, the rows are copied three
# times (ndarray -> bytes -> message -> serialized); encoded here they are copied once,
# straight from the array into the serialized response. The layout is the canonical
# proto3 encoding of LookupResponse (tests check it byte for byte against protobuf).

_TABLE_ROWS = b"\x0a"  # LookupResponse.tables = 1, length-delimited
_NAME, _ROWS, _DIM, _DTYPE = b"\x0a", b"\x12", b"\x18", b"\x20"  # TableRows fields 1-4


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# (name, dim, dtype code) -> (encoded name field, encoded dim + dtype fields): the same
# few tables answer every call, so their fixed parts are encoded once.
_TABLE_PARTS: dict[tuple[str, int, int], tuple[bytes, bytes]] = {}
_SMALL_VARINTS = [bytes((n,)) for n in range(0x80)]


def _table_parts(name: str, dim: int, code: int) -> tuple[bytes, bytes]:
    key = (name, dim, code)
    parts = _TABLE_PARTS.get(key)
    if parts is None:
        raw = name.encode()
        head = _NAME + _varint(len(raw)) + raw if raw else b""
        tail = (_DIM + _varint(dim) if dim else b"") + (_DTYPE + _varint(code) if code else b"")
        parts = (head, tail)
        if len(_TABLE_PARTS) < 4096:  # bounded: table names come from requests
            _TABLE_PARTS[key] = parts
    return parts


def encode_lookup_response(tables: list[tuple[str, np.ndarray, int, int]]) -> bytes:
    """Serialized ``LookupResponse`` of ``(table, rows, dim, dtype_code)`` entries; rows
    are converted to the wire dtype named by ``dtype_code``."""
    parts: list[bytes | np.ndarray] = []
    add = parts.append
    small = _SMALL_VARINTS
    for name, rows, dim, code in tables:
        if rows.dtype != WIRE_DTYPES[code] or not rows.flags.c_contiguous:
            rows = np.ascontiguousarray(rows, dtype=wire_dtype(code, "rows"))
        head, tail = _table_parts(name, dim, code)
        nbytes = rows.nbytes
        if nbytes:
            rows_len = small[nbytes] if nbytes < 0x80 else _varint(nbytes)
            size = len(head) + 1 + len(rows_len) + nbytes + len(tail)
        else:
            size = len(head) + len(tail)
        add(_TABLE_ROWS)
        add(small[size] if size < 0x80 else _varint(size))
        add(head)
        if nbytes:
            add(_ROWS)
            add(rows_len)
            add(rows)  # joined through the buffer protocol: the only copy
        add(tail)
    return b"".join(parts)  # type: ignore[arg-type]
