"""Sorted SST files of embedding rows, and their key and value codecs: the one encoding
shared by ``recps export`` (:mod:`recps.serving.model_format`), the training shards' delta
stream (:mod:`recps.ps.delta`) and the serving replica. No gRPC, no serving code: the PS
writes these files without importing ``recps.serving``.

* **Key**: 8 bytes big-endian of ``uint64(id) ^ 2**63``, so RocksDB's bytewise order is
  the signed int64 order (the same key the training store uses).
* **Value** by ``row_format``: ``float32`` dim*4 bytes LE; ``float16`` dim*2 bytes LE;
  ``int8`` a 4-byte LE float32 scale then dim int8 values, value = q * scale with
  scale = max|x| / 127 (an all-zero row has scale 0).

Example:
    >>> import numpy as np
    >>> decode_keys(encode_keys(np.array([-5, 0, 7]))).tolist()
    [-5, 0, 7]
    >>> row_bytes(16, "int8"), row_bytes(16, "float16")
    (20, 32)
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import rocksdict as rd

from recps.embedding.errors import InvalidArgumentError

RowFormat = Literal["float32", "float16", "int8"]
ROW_FORMATS: tuple[str, ...] = ("float32", "float16", "int8")

_SIGN = np.uint64(1 << 63)
_HASH_CHUNK_BYTES = 1 << 20


def encode_keys(ids: np.ndarray) -> list[bytes]:
    """int64 ids -> 8-byte keys whose bytewise order is the ids' numeric order."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    # "V8" items keep trailing zero bytes (unlike "S8") and become bytes in C.
    return (ids.view(np.uint64) ^ _SIGN).astype(">u8").view("V8").tolist()


def decode_keys(keys: Sequence[bytes] | bytes) -> np.ndarray:
    """Inverse of :func:`encode_keys`: a list of 8-byte keys (or their concatenation)."""
    raw = keys if isinstance(keys, bytes | bytearray) else b"".join(keys)
    if len(raw) % 8:
        raise InvalidArgumentError(f"keys hold {len(raw)} bytes, not a multiple of 8")
    return (np.frombuffer(raw, dtype=">u8").astype(np.uint64) ^ _SIGN).view(np.int64)


def _check_format(row_format: str) -> None:
    if row_format not in ROW_FORMATS:
        raise InvalidArgumentError(f"unknown row_format {row_format!r}; use one of {ROW_FORMATS}")


def _int8_dtype(dim: int) -> np.dtype:
    return np.dtype([("scale", "<f4"), ("q", "i1", (dim,))])


def row_bytes(dim: int, row_format: str) -> int:
    """Bytes of one encoded value."""
    _check_format(row_format)
    return {"float32": 4 * dim, "float16": 2 * dim, "int8": 4 + dim}[row_format]


def quantize_int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: ``(scale float32 [n], q int8 [n, dim])``, |x - q*scale| <=
    scale/2 (plus float32 rounding)."""
    x = np.asarray(rows, dtype=np.float32)
    scale = (np.abs(x).max(axis=1, initial=0.0) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))  # all-zero rows: q = 0, scale = 0
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return scale, q


def encode_rows(rows: np.ndarray, row_format: str) -> list[bytes]:
    """float32 ``[n, dim]`` rows -> one value (bytes) per row in ``row_format``."""
    _check_format(row_format)
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise InvalidArgumentError(f"rows must be 2-D [n, dim], got shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise InvalidArgumentError("rows contain NaN or Inf; refusing to serve them")
    n, dim = rows.shape
    if row_format == "int8":
        rec = np.empty(n, dtype=_int8_dtype(dim))
        rec["scale"], rec["q"] = quantize_int8(rows)
    else:
        rec = np.ascontiguousarray(rows, dtype="<f4" if row_format == "float32" else "<f2")
    return rec.view(np.dtype((np.void, row_bytes(dim, row_format)))).reshape(n).tolist()


def decode_rows(values: Sequence[bytes] | bytes, dim: int, row_format: str) -> np.ndarray:
    """Values (a list, or their concatenation) -> float32 ``[n, dim]``."""
    _check_format(row_format)
    raw = values if isinstance(values, bytes | bytearray) else b"".join(values)
    width = row_bytes(dim, row_format)
    if len(raw) % width:
        raise InvalidArgumentError(
            f"{len(raw)} value bytes are not a multiple of {width} ({row_format}, dim {dim})"
        )
    if row_format == "int8":
        rec = np.frombuffer(raw, dtype=_int8_dtype(dim))
        return rec["q"].astype(np.float32) * rec["scale"][:, None]
    dt = "<f4" if row_format == "float32" else "<f2"
    return np.frombuffer(raw, dtype=dt).reshape(-1, dim).astype(np.float32)


def sst_options(block_bytes: int = 1024, bloom_bits_per_key: int = 10) -> rd.Options:
    """Options for the SST files. Block size and bloom filter are baked into a file and an
    ingested file keeps them, so they match the training store's lookup-tuned layout."""
    opts = rd.Options(raw_mode=True)
    opts.set_compression_type(rd.DBCompressionType.none())  # dense floats do not compress
    bbo = rd.BlockBasedOptions()
    if bloom_bits_per_key:
        bbo.set_bloom_filter(bloom_bits_per_key, False)
    bbo.set_block_size(block_bytes)
    opts.set_block_based_table_factory(bbo)
    return opts


class SstWriter:
    """One SST file written incrementally: batches of sorted ids, strictly increasing
    across batches too. The file is created on the first non-empty batch, so a writer that
    never gets a row leaves no file (RocksDB cannot ingest an empty SST).

    Example:
        >>> import tempfile, numpy as np
        >>> with tempfile.TemporaryDirectory() as d:
        ...     w = SstWriter(f"{d}/a.sst", dim=4, row_format="int8")
        ...     w.add(np.array([1, 5]), np.ones((2, 4), np.float32))
        ...     w.add(np.array([9]), np.zeros((1, 4), np.float32))
        ...     w.finish()
        3
    """

    def __init__(
        self, path: str | Path, dim: int, row_format: str, options: rd.Options | None = None
    ) -> None:
        _check_format(row_format)
        self.path, self.dim, self.row_format = Path(path), dim, row_format
        self.rows = 0
        self._options = options
        self._writer: rd.SstFileWriter | None = None
        self._last: int | None = None

    def add(self, ids_sorted: np.ndarray, rows: np.ndarray) -> None:
        ids = np.asarray(ids_sorted, dtype=np.int64)
        if len(ids) != len(rows):
            raise InvalidArgumentError(f"{len(ids)} ids but {len(rows)} rows")
        if len(ids) == 0:
            return
        if np.ndim(rows) != 2 or np.shape(rows)[1] != self.dim:
            raise InvalidArgumentError(f"rows must be [n, {self.dim}], got {np.shape(rows)}")
        if (len(ids) > 1 and not (ids[1:] > ids[:-1]).all()) or (
            self._last is not None and ids[0] <= self._last
        ):
            raise InvalidArgumentError(f"{self.path.name}: SST ids must be strictly increasing")
        keys, values = encode_keys(ids), encode_rows(rows, self.row_format)
        if self._writer is None:
            self._writer = rd.SstFileWriter(self._options or sst_options())
            self._writer.open(str(self.path))
        writer = self._writer
        for k, v in zip(keys, values):  # rocksdict has no bulk put; one C call per key
            writer[k] = v
        self._last = int(ids[-1])
        self.rows += len(ids)

    def finish(self) -> int:
        """Close the file; returns the rows written (0: no file was created)."""
        if self._writer is not None:
            self._writer.finish()
            self._writer = None
        return self.rows


def write_sst(
    path: str | Path,
    ids_sorted: np.ndarray,
    rows: np.ndarray,
    row_format: str,
    options: rd.Options | None = None,
) -> int:
    """Write one SST file of ``ids_sorted`` (strictly increasing int64) -> ``rows``.

    Returns the number of rows written; writes no file for zero rows.

    Example:
        >>> import tempfile, numpy as np
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_sst(f"{d}/a.sst", np.array([-1, 4]), np.ones((2, 8), np.float32), "float16")
        2
    """
    rows = np.asarray(rows)
    writer = SstWriter(path, rows.shape[1] if rows.ndim == 2 else 0, row_format, options)
    writer.add(ids_sorted, rows)
    return writer.finish()


def read_sst(path: str | Path, dim: int, row_format: str) -> tuple[np.ndarray, np.ndarray]:
    """All ``(ids, rows float32)`` of one SST file, in key order (for tests and tools; a
    replica ingests files instead of reading them)."""
    # rocksdict has no SST reader: ingest a copy into a scratch DB and iterate it.
    with tempfile.TemporaryDirectory(prefix="recps-read-sst-") as scratch:
        db = rd.Rdict(f"{scratch}/db", rd.Options(raw_mode=True))
        try:
            db.ingest_external_file([str(path)])
            keys = list(db.keys())
            vals = list(db.values())
        finally:
            db.close()
    return decode_keys(keys), decode_rows(vals, dim, row_format)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()
