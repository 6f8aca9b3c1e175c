"""The serving model format, ``recps-serving-model-v1``, as code: what ``recps export``
writes and what a serving replica reads.

A model root holds one directory per version, ``<version:012d>/``::

    ROOT/000000000110/
      manifest.json                          # ModelManifest.to_json()
      dense/tower.pt                         # TorchScript: forward(dense, pooled) -> logits [B]
      tables/<table>/shard-<k>-part-<p>.sst  # serving shard k, source part p; keys sorted
      COMPLETE                               # written last; a version without it is ignored

The exporter builds a version in ``ROOT/.tmp-<version>-<pid>/`` and renames it into place,
so a reader never sees half a version.

* **SST key**: 8 bytes big-endian of ``uint64(id) ^ 2**63``, so RocksDB's bytewise order
  is the signed int64 order (the same key the training store uses).
* **SST value** by ``row_format``: ``float32`` dim*4 bytes LE; ``float16`` dim*2 bytes LE;
  ``int8`` a 4-byte LE float32 scale then dim int8 values, value = q * scale with
  scale = max|x| / 127 (an all-zero row has scale 0).

Example:
    >>> import numpy as np
    >>> ids = np.array([-5, 0, 7], dtype=np.int64)
    >>> decode_keys(encode_keys(ids)).tolist()
    [-5, 0, 7]
    >>> rows = np.array([[0.5, -1.0], [0.0, 0.0], [2.0, 1.0]], dtype=np.float32)
    >>> back = decode_rows(encode_rows(rows, "int8"), 2, "int8")
    >>> bool(np.abs(back - rows).max() <= 2.0 / 127 / 2 + 1e-6)  # within half a step
    True
    >>> row_bytes(16, "int8"), row_bytes(16, "float16")
    (20, 32)
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rocksdict as rd

from recps.embedding.errors import InvalidArgumentError, RecpsError
from recps.ps.routing import ShardMap

FORMAT = "recps-serving-model-v1"
MANIFEST_FILE = "manifest.json"
COMPLETE_FILE = "COMPLETE"
TOWER_FILE = "dense/tower.pt"
TABLES_DIR = "tables"
TMP_PREFIX = ".tmp-"
VERSION_DIGITS = 12
RowFormat = Literal["float32", "float16", "int8"]
ROW_FORMATS: tuple[str, ...] = ("float32", "float16", "int8")
# The dense transform training applies (recps.embedding.feature_ids.dense_transform); the
# tower takes dense features *after* it, so a ranking service applies it to raw values first.
DENSE_TRANSFORM = {"kind": "log1p_clamp0", "missing": 0.0, "applied_in_tower": False}

_SIGN = np.uint64(1 << 63)
_VERSION_RE = re.compile(rf"^\d{{{VERSION_DIGITS}}}$")
_SST_RE = re.compile(r"^shard-(\d+)-part-(\d+)\.sst$")
_HASH_CHUNK_BYTES = 1 << 20


# ---- errors ----------------------------------------------------------------------------------


class ModelFormatError(RecpsError):
    """A model directory is missing, incomplete, corrupt or of an unknown format."""

    status = "FAILED_PRECONDITION"


class ModelNotFoundError(ModelFormatError):
    status = "NOT_FOUND"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(f"no serving model at {self.path}; run `recps export` to create one")


class IncompleteModelError(ModelFormatError):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(
            f"model version {self.path} has no {COMPLETE_FILE} marker: the export did not "
            "finish; export again (with --force to replace it)"
        )


class ChecksumMismatchError(ModelFormatError):
    """A file's size or sha256 differs from the manifest: the copy is corrupt."""

    def __init__(self, path: str, expected: str, got: str) -> None:
        self.path, self.expected, self.got = path, expected, got
        super().__init__(f"{path}: expected {expected}, found {got}; the model copy is corrupt")


class ModelVersionExistsError(ModelFormatError):
    status = "ALREADY_EXISTS"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(f"model version {self.path} already exists; pass --force to replace it")


# ---- keys and rows ---------------------------------------------------------------------------


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


# ---- SST files -------------------------------------------------------------------------------


def sst_relpath(table: str, shard: int, part: int) -> str:
    return f"{TABLES_DIR}/{table}/shard-{shard}-part-{part}.sst"


def parse_sst_relpath(relpath: str) -> tuple[str, int, int] | None:
    """``(table, shard, part)`` of an SST path, or None for any other file."""
    parts = relpath.split("/")
    if len(parts) != 3 or parts[0] != TABLES_DIR:
        return None
    m = _SST_RE.match(parts[2])
    return (parts[1], int(m.group(1)), int(m.group(2))) if m else None


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


# ---- versions --------------------------------------------------------------------------------


def version_dir(root: str | Path, version: int) -> Path:
    if not 0 <= int(version) < 10**VERSION_DIGITS:
        raise InvalidArgumentError(f"model version must be in [0, 10**{VERSION_DIGITS})")
    return Path(root) / f"{int(version):0{VERSION_DIGITS}d}"


def list_versions(root: str | Path) -> list[int]:
    """Complete versions under ``root``, ascending (partial and temporary ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in root.iterdir()
        if _VERSION_RE.match(p.name) and (p / COMPLETE_FILE).is_file()
    )


def latest_version(root: str | Path) -> int | None:
    versions = list_versions(root)
    return versions[-1] if versions else None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


# ---- manifest --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """One pooled input of the tower: ``input`` column hashed into ids of ``table``."""

    name: str
    table: str
    input: str
    pooling: str = "sum"
    multi: bool = False  # a multi-id (list) column, pooled with ``pooling``


@dataclass(frozen=True)
class TableSpec:
    dim: int
    train_dtype: str  # the training store's dtype ("float32" | "float16")
    row_format: str  # the SST value encoding
    rows: int
    # What to serve for an id without a row: {"kind": "zeros"} or
    # {"kind": "initializer", "initializer": InitializerConfig fields} (training's init).
    default: dict[str, Any] = field(default_factory=lambda: {"kind": "zeros"})

    def __post_init__(self) -> None:
        _check_format(self.row_format)


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str
    rows: int | None = None  # SST files only


@dataclass(frozen=True)
class ModelManifest:
    """The parsed ``manifest.json`` of one model version.

    Example:
        >>> m = ModelManifest.load("/models/000000000110")  # doctest: +SKIP
        >>> m.tables["C1"].row_format, m.sst_files("C1", shard=0)  # doctest: +SKIP
        ('float32', ['tables/C1/shard-0-part-0.sst', 'tables/C1/shard-0-part-1.sst'])
    """

    version: int
    created_at: float
    source_checkpoint: str
    step: int
    model: dict[str, Any]
    dense_features: tuple[str, ...]
    features: tuple[FeatureSpec, ...]
    hashing: dict[str, Any]
    tables: dict[str, TableSpec]
    shard_map: ShardMap
    files: dict[str, FileEntry]
    dense_transform: dict[str, Any] = field(default_factory=lambda: dict(DENSE_TRANSFORM))
    format: str = FORMAT
    path: Path | None = field(default=None, compare=False)  # the version dir it was loaded from

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ModelFormatError(f"unknown model format {self.format!r}; expected {FORMAT!r}")
        unknown = {f.table for f in self.features} - set(self.tables)
        if unknown:
            raise ModelFormatError(f"features use tables {sorted(unknown)} the model lacks")

    def sst_files(self, table: str, shard: int | None = None) -> list[str]:
        """Relative paths of ``table``'s SST files (of one serving shard, or all), in
        (shard, part) order."""
        found = []
        for rel in self.files:
            parsed = parse_sst_relpath(rel)
            if parsed and parsed[0] == table and (shard is None or parsed[1] == shard):
                found.append((parsed[1], parsed[2], rel))
        return [rel for _, _, rel in sorted(found)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "created_at": self.created_at,
            "source_checkpoint": self.source_checkpoint,
            "step": self.step,
            "model": self.model,
            "dense_features": list(self.dense_features),
            "dense_transform": self.dense_transform,
            "features": [vars(f).copy() for f in self.features],
            "hashing": self.hashing,
            "tables": {name: vars(t).copy() for name, t in self.tables.items()},
            "shard_map": self.shard_map.to_dict(),
            "files": {
                rel: {k: v for k, v in vars(e).items() if v is not None}
                for rel, e in sorted(self.files.items())
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> ModelManifest:
        try:
            return cls(
                version=int(d["version"]),
                created_at=float(d["created_at"]),
                source_checkpoint=str(d["source_checkpoint"]),
                step=int(d["step"]),
                model=dict(d["model"]),
                dense_features=tuple(d["dense_features"]),
                features=tuple(FeatureSpec(**f) for f in d["features"]),
                hashing=dict(d["hashing"]),
                tables={k: TableSpec(**v) for k, v in d["tables"].items()},
                shard_map=ShardMap.from_dict(d["shard_map"]),
                files={k: FileEntry(**v) for k, v in d["files"].items()},
                dense_transform=dict(d.get("dense_transform", DENSE_TRANSFORM)),
                format=str(d["format"]),
                path=path,
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, RecpsError):
                raise
            where = f" at {path}" if path else ""
            raise ModelFormatError(f"malformed manifest{where}: {e!r}") from e

    @classmethod
    def load(cls, version_dir: str | Path, verify: bool = True) -> ModelManifest:
        """Read a version directory's manifest. It must be COMPLETE; with ``verify`` every
        listed file's size and sha256 are checked (reads every byte once)."""
        vdir = Path(version_dir)
        if not vdir.is_dir():
            raise ModelNotFoundError(vdir)
        if not (vdir / COMPLETE_FILE).is_file():
            raise IncompleteModelError(vdir)
        try:
            d = json.loads((vdir / MANIFEST_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"cannot read {vdir / MANIFEST_FILE}: {e}") from e
        manifest = cls.from_dict(d, path=vdir)
        if verify:
            manifest.verify(vdir)
        return manifest

    def verify(self, version_dir: str | Path) -> None:
        """Raise :class:`ChecksumMismatchError` unless every file matches the manifest."""
        vdir = Path(version_dir)
        for rel, entry in sorted(self.files.items()):
            p = vdir / rel
            if not p.is_file():
                raise ChecksumMismatchError(rel, f"{entry.bytes} bytes", "no such file")
            size = p.stat().st_size
            if size != entry.bytes:
                raise ChecksumMismatchError(rel, f"{entry.bytes} bytes", f"{size} bytes")
            digest = file_sha256(p)
            if digest != entry.sha256:
                raise ChecksumMismatchError(rel, f"sha256 {entry.sha256}", f"sha256 {digest}")
