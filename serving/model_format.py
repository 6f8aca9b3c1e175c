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

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recps.embedding.errors import InvalidArgumentError, RecpsError

# The row and key codecs and the SST writer live in recps.embedding.sstfile, so the
# training shards' delta stream writes the same files without importing serving.
from recps.embedding.sstfile import (  # noqa: F401 - re-exported: this module is the format
    ROW_FORMATS,
    RowFormat,
    SstWriter,
    _check_format,
    decode_keys,
    decode_rows,
    encode_keys,
    encode_rows,
    file_sha256,
    quantize_int8,
    read_sst,
    row_bytes,
    sst_options,
    write_sst,
)
from recps.ps.routing import ShardMap

FORMAT = "recps-serving-model-v1"
MANIFEST_FILE = "manifest.json"
COMPLETE_FILE = "COMPLETE"
TOWER_FILE = "dense/tower.pt"
TABLES_DIR = "tables"
TMP_PREFIX = ".tmp-"
VERSION_DIGITS = 12
# The dense transform training applies (recps.embedding.feature_ids.dense_transform); the
# tower takes dense features *after* it, so a ranking service applies it to raw values first.
DENSE_TRANSFORM = {"kind": "log1p_clamp0", "missing": 0.0, "applied_in_tower": False}

_VERSION_RE = re.compile(rf"^\d{{{VERSION_DIGITS}}}$")
_SST_RE = re.compile(r"^shard-(\d+)-part-(\d+)\.sst$")


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
    # Per training shard, the last delta (recps.ps.delta) its checkpoint holds: a replica
    # serving this version applies that shard's deltas with a greater seq. Empty: the
    # checkpoint's shards published no delta stream.
    delta_seqs: dict[int, int] = field(default_factory=dict)
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
            "delta_seqs": {str(k): v for k, v in sorted(self.delta_seqs.items())},
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
                delta_seqs={int(k): int(v) for k, v in d.get("delta_seqs", {}).items()},
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
