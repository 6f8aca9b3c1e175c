"""Streaming training data: Parquet or Criteo TSV in, fixed-size numpy batches out.

The reader never holds more than one Arrow record batch, the shuffle buffer and one
output batch in memory. It needs only numpy and pyarrow (no torch, no Ray).

**Columns.** A label, dense integer features (Criteo: ``I1..I13``) and categorical features
(Criteo: ``C1..C26``). Dense values become ``log1p(max(x, 0))`` as float32; missing (null,
or NaN/inf in a float column) -> 0.
Categorical values become int64 ids through :func:`hash_column`, salted per feature so that
ids of different features never collide structurally. A Parquet ``list<int64>`` (or
``list<string>``) column can be read as a multi-id feature: :class:`JaggedIds` values +
offsets.

**Ids** follow :mod:`recps.embedding.feature_ids` (shared with online serving): integers
through a salted bijection per feature, hex strings as their integer, other strings by
their bytes, null/empty as one "missing" id per feature.

**Sharding** (rank, world_size), every row read by exactly one rank, see :func:`plan_shards`:
whole files when there are at least ``world_size`` files; else Parquet row groups when there
are at least ``world_size`` of them; else every rank streams all rows and keeps the blocks of
``interleave_rows`` rows whose index is ``rank`` modulo ``world_size`` (each rank parses the
whole input then; split big TSVs into files to avoid it). Ranks may get unequal row counts;
:attr:`ShardPlan.num_rows` tells a trainer how many this rank will see (Parquet only).

**Order** is deterministic given (seed, epoch, rank): files/row groups in sorted order, or a
permutation of them per epoch with ``shuffle_files``, then an optional shuffle buffer.

Example:
    >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> cfg = ReaderConfig(batch_size=2, dense_features=("I1",), sparse_features=("C1",))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     pq.write_table(pa.table({"label": [1.0, 0.0, 1.0], "I1": [3, None, 7],
    ...                              "C1": ["68fd1e64", "", "abc"]}), f"{d}/part-0.parquet")
    ...     batches = list(DataReader(d, cfg).epoch(0))
    >>> [len(b) for b in batches], batches[0].dense.shape, batches[0].sparse["C1"].dtype
    ([2, 1], (2, 1), dtype('int64'))
    >>> int(batches[0].sparse["C1"][0]) == reference_hash("68fd1e64", "C1")
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recps.embedding.errors import ConfigError, DtypeError, InvalidArgumentError
from recps.embedding.feature_ids import (  # the reader's id scheme, re-exported
    dense_transform,
    hash_column,
)
from recps.embedding.feature_ids import feature_salt as feature_salt
from recps.embedding.feature_ids import hash_int_ids as hash_int_ids
from recps.embedding.feature_ids import missing_id as missing_id
from recps.embedding.feature_ids import reference_hash as reference_hash
from recps.embedding.hashing import seed_key

LABEL = "label"
CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))
PARQUET_SUFFIXES = (".parquet", ".pq")
TSV_SUFFIXES = (".tsv", ".txt", ".csv", ".tsv.gz", ".txt.gz", ".csv.gz")

FileFormat = Literal["auto", "parquet", "tsv"]

# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JaggedIds:
    """A multi-id feature for B rows: row i's ids are ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray  # int64 [N]
    offsets: np.ndarray  # int64 [B + 1], offsets[0] == 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, idx: np.ndarray) -> JaggedIds:
        lengths = self.lengths[idx]
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        shift = np.repeat(self.offsets[:-1][idx] - offsets[:-1], lengths)
        return JaggedIds(self.values[np.arange(offsets[-1], dtype=np.int64) + shift], offsets)

    def slice(self, start: int, stop: int) -> JaggedIds:
        o = self.offsets[start : stop + 1]
        return JaggedIds(self.values[o[0] : o[-1]], o - o[0])

    @staticmethod
    def concat(parts: Sequence[JaggedIds]) -> JaggedIds:
        bases = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
        offsets = [parts[0].offsets[:1]] + [p.offsets[1:] + b for p, b in zip(parts, bases)]
        return JaggedIds(
            np.concatenate([p.values for p in parts]), np.concatenate(offsets).astype(np.int64)
        )


@dataclass(frozen=True)
class Batch:
    """B rows of training data; arrays may be views into the reader's buffers (treat read-only)."""

    labels: np.ndarray  # float32 [B]
    dense: np.ndarray  # float32 [B, num_dense]
    sparse: dict[str, np.ndarray]  # feature -> int64 [B]
    jagged: dict[str, JaggedIds] = field(default_factory=dict)  # multi-id features

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> Batch:
        return Batch(
            self.labels[idx],
            self.dense[idx],
            {k: v[idx] for k, v in self.sparse.items()},
            {k: v.take(idx) for k, v in self.jagged.items()},
        )

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(
            self.labels[start:stop],
            self.dense[start:stop],
            {k: v[start:stop] for k, v in self.sparse.items()},
            {k: v.slice(start, stop) for k, v in self.jagged.items()},
        )

    @staticmethod
    def concat(parts: Sequence[Batch]) -> Batch:
        if len(parts) == 1:
            return parts[0]
        p0 = parts[0]
        return Batch(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.dense for p in parts]),
            {k: np.concatenate([p.sparse[k] for p in parts]) for k in p0.sparse},
            {k: JaggedIds.concat([p.jagged[k] for p in parts]) for k in p0.jagged},
        )


# ---------------------------------------------------------------------------------------
# Config and shard plan
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReaderConfig:
    """What to read and how to batch it. Defaults read Criteo (label, I1..I13, C1..C26)."""

    batch_size: int = 4096
    label: str = LABEL
    dense_features: tuple[str, ...] = CRITEO_DENSE
    sparse_features: tuple[str, ...] = CRITEO_SPARSE
    multi_id_features: tuple[str, ...] = ()  # Parquet list columns -> Batch.jagged
    drop_last: bool = False  # drop this rank's final short batch
    shuffle_files: bool = False  # permute files / row groups per (seed, epoch)
    shuffle_buffer_rows: int = 0  # 0: no row shuffle; else rows mix within about this many
    seed: int = 0
    file_format: FileFormat = "auto"  # auto: .parquet/.pq -> Parquet, anything else -> TSV
    read_batch_rows: int = 65536  # Arrow record batch size for Parquet; bounds memory
    tsv_block_bytes: int = 8 << 20  # TSV parse block; bounds memory
    interleave_rows: int = 8192  # row-block size when ranks share a file (row mode)

    def replace(self, **changes: Any) -> ReaderConfig:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        for name in ("batch_size", "read_batch_rows", "tsv_block_bytes", "interleave_rows"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ReaderConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.shuffle_buffer_rows < 0:
            raise ConfigError("ReaderConfig.shuffle_buffer_rows must be >= 0 (0 disables it)")
        if self.file_format not in ("auto", "parquet", "tsv"):
            raise ConfigError(f"file_format must be auto, parquet or tsv, not {self.file_format!r}")
        names = [self.label, *self.dense_features, *self.sparse_features, *self.multi_id_features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"column(s) {dup} named more than once in ReaderConfig")


@dataclass(frozen=True)
class DataFile:
    """One input file: its format and, for Parquet, the row count of each row group."""

    path: str
    format: Literal["parquet", "tsv"]
    row_group_rows: tuple[int, ...] = ()  # empty for TSV (unknown without reading it)

    @property
    def num_rows(self) -> int | None:
        return sum(self.row_group_rows) if self.format == "parquet" else None


@dataclass(frozen=True)
class ReadUnit:
    """A whole file (``row_group is None``) or one Parquet row group."""

    file: DataFile
    row_group: int | None = None


@dataclass(frozen=True)
class ShardPlan:
    """What one rank reads in one epoch, in order. A value: print it, test it, reuse it."""

    mode: Literal["file", "row_group", "row"]
    rank: int
    world_size: int
    units: tuple[ReadUnit, ...]  # in mode "row", every unit, read by every rank
    interleave_rows: int  # mode "row": keep row blocks b with b % world_size == rank
    num_rows: int | None  # rows this rank yields; None if a TSV is involved


def list_files(
    paths: str | Path | Iterable[str | Path], file_format: FileFormat = "auto"
) -> list[DataFile]:
    """Data files under ``paths`` (files, or directories searched recursively), sorted.

    In directories only known suffixes count (``.parquet``, ``.pq``, ``.tsv``, ``.txt``,
    ``.csv``, optionally ``.gz``); names starting with ``.`` or ``_`` are skipped.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: list[DataFile] = []
    for p in map(Path, paths):
        if p.is_dir():
            cands = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and not f.name.startswith((".", "_"))
                and f.name.endswith(PARQUET_SUFFIXES + TSV_SUFFIXES)
            )
        elif p.is_file():
            cands = [p]
        else:
            raise ConfigError(f"data path {str(p)!r} does not exist")
        for f in cands:
            fmt = file_format
            if fmt == "auto":
                fmt = "parquet" if f.name.endswith(PARQUET_SUFFIXES) else "tsv"
            if fmt == "parquet":
                md = pq.ParquetFile(f).metadata
                rgs = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
                found.append(DataFile(str(f), "parquet", rgs))
            else:
                found.append(DataFile(str(f), "tsv"))
    if not found:
        raise ConfigError(f"no data files (.parquet, .tsv, .txt, .csv) under {list(paths)}")
    return found


def plan_shards(
    files: Sequence[DataFile],
    rank: int,
    world_size: int,
    *,
    interleave_rows: int = 8192,
    order_seed: int | None = None,
) -> ShardPlan:
    """Split ``files`` across ranks so that every row goes to exactly one rank.

    ``order_seed`` (same on all ranks) permutes files / row groups; None keeps sorted order.

    >>> fs = [DataFile(f"f{i}", "parquet", (10, 10)) for i in range(3)]
    >>> [(p.mode, p.num_rows) for p in (plan_shards(fs, 0, 2), plan_shards(fs, 1, 4))]
    [('file', 40), ('row_group', 20)]
    >>> plan_shards(fs[:1], 0, 3, interleave_rows=6).num_rows  # blocks 0 (6 rows), 3 (2 rows)
    8
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if interleave_rows <= 0:
        raise ConfigError(f"interleave_rows must be > 0, got {interleave_rows}")
    rng = None if order_seed is None else np.random.default_rng(order_seed)

    def order(units: list[ReadUnit]) -> list[ReadUnit]:
        return units if rng is None else [units[i] for i in rng.permutation(len(units))]

    if len(files) >= world_size:
        units = order([ReadUnit(f) for f in files])[rank::world_size]
        rows = [u.file.num_rows for u in units]
        n = None if None in rows else sum(rows)  # type: ignore[arg-type]
        return ShardPlan("file", rank, world_size, tuple(units), interleave_rows, n)
    if all(f.format == "parquet" for f in files):
        groups = [ReadUnit(f, g) for f in files for g in range(len(f.row_group_rows))]
        if len(groups) >= world_size:
            units = order(groups)[rank::world_size]
            n = sum(u.file.row_group_rows[u.row_group] for u in units)  # type: ignore[index]
            return ShardPlan("row_group", rank, world_size, tuple(units), interleave_rows, n)
    units = order([ReadUnit(f) for f in files])
    rows = [f.num_rows for f in files]
    n = None
    if None not in rows:
        total = sum(rows)  # type: ignore[arg-type]
        blocks = math.ceil(total / interleave_rows)
        mine = max(0, (blocks - rank + world_size - 1) // world_size)
        n = mine * interleave_rows
        if mine and (blocks - 1) % world_size == rank:
            n -= blocks * interleave_rows - total
    return ShardPlan("row", rank, world_size, tuple(units), interleave_rows, n)


# ---------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------


class DataReader:
    """Streams fixed-size :class:`Batch` es for one rank; see the module docstring.

    Typical use in a training loop::

        reader = DataReader("data/synth/train", ReaderConfig(batch_size=4096), rank, world)
        for epoch in range(epochs):
            for batch in reader.epoch(epoch):
                ...  # batch.labels, batch.dense, batch.sparse["C1"], ...
    """

    def __init__(
        self,
        paths: str | Path | Iterable[str | Path],
        config: ReaderConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config = config or ReaderConfig()
        self.files = list_files(paths, self.config.file_format)
        self.rank, self.world_size = rank, world_size
        if self.config.multi_id_features and any(f.format == "tsv" for f in self.files):
            raise ConfigError("multi_id_features need Parquet list columns; TSV has none")
        self.plan(0)  # validate rank / world_size now

    def plan(self, epoch: int = 0) -> ShardPlan:
        cfg = self.config
        seed = int(seed_key("recps.data.files", cfg.seed, epoch)) if cfg.shuffle_files else None
        return plan_shards(
            self.files,
            self.rank,
            self.world_size,
            interleave_rows=cfg.interleave_rows,
            order_seed=seed,
        )

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches for ``epoch``; equal (seed, epoch, rank) give equal batches."""
        cfg = self.config
        pieces = (self.decode(rb) for rb in self.record_batches(self.plan(epoch)))
        if cfg.shuffle_buffer_rows:
            rng = np.random.default_rng(
                int(seed_key("recps.data.rows", cfg.seed, epoch, self.rank))
            )
            pieces = _shuffle(pieces, cfg.shuffle_buffer_rows, rng)
        return _rebatch(pieces, cfg.batch_size, cfg.drop_last)

    def record_batches(self, plan: ShardPlan) -> Iterator[pa.RecordBatch]:
        """The raw Arrow record batches of ``plan`` (already cut to this rank's rows)."""
        if plan.mode != "row":
            for unit in plan.units:
                yield from self._read(unit)
            return
        k, w, r = plan.interleave_rows, plan.world_size, plan.rank
        row = 0  # global index of the next row across all units
        for unit in plan.units:
            for rb in self._read(unit):
                start, n = row, rb.num_rows
                row += n
                b = start // k
                while b * k < start + n:
                    if b % w == r:
                        lo, hi = max(b * k, start) - start, min((b + 1) * k, start + n) - start
                        yield rb.slice(lo, hi - lo)
                    b += 1

    def decode(self, rb: pa.RecordBatch) -> Batch:
        """Arrow record batch -> :class:`Batch` of the same length (no rebatching)."""
        cfg = self.config
        n = rb.num_rows
        label = rb.column(cfg.label)
        if label.null_count:
            raise InvalidArgumentError(f"label column {cfg.label!r} has {label.null_count} nulls")
        labels = label.cast(pa.float32()).to_numpy(zero_copy_only=False)
        dense = np.empty((n, len(cfg.dense_features)), dtype=np.float32)
        for j, name in enumerate(cfg.dense_features):
            col = rb.column(name)
            if pa.types.is_null(col.type):
                dense[:, j] = 0.0
                continue
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                raise DtypeError(f"dense column {name!r}", col.type, "an integer or float type")
            x = pc.fill_null(col, 0).to_numpy(zero_copy_only=False)
            dense[:, j] = dense_transform(x)  # NaN / inf count as missing
        sparse = {name: hash_column(rb.column(name), name) for name in cfg.sparse_features}
        jagged = {}
        for name in cfg.multi_id_features:
            col = rb.column(name)
            if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
                raise DtypeError(f"multi-id column {name!r}", col.type, "a list type")
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
            offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
            jagged[name] = JaggedIds(hash_column(pc.list_flatten(col), name), offsets)
        return Batch(labels, dense, sparse, jagged)

    def _columns(self) -> list[str]:
        c = self.config
        return [c.label, *c.dense_features, *c.sparse_features, *c.multi_id_features]

    def _read(self, unit: ReadUnit) -> Iterator[pa.RecordBatch]:
        cols = self._columns()
        if unit.file.format == "parquet":
            f = pq.ParquetFile(unit.file.path)
            missing = [c for c in cols if c not in f.schema_arrow.names]
            if missing:
                raise ConfigError(
                    f"{unit.file.path} lacks column(s) {missing}; it has {f.schema_arrow.names}. "
                    "Name the columns in ReaderConfig(label=, dense_features=, sparse_features=)"
                )
            groups = None if unit.row_group is None else [unit.row_group]
            yield from f.iter_batches(self.config.read_batch_rows, row_groups=groups, columns=cols)
            return
        c = self.config
        types = {c.label: pa.float32()}
        types.update({n: pa.int64() for n in c.dense_features})
        types.update({n: pa.string() for n in c.sparse_features})
        reader = pacsv.open_csv(
            unit.file.path,
            read_options=pacsv.ReadOptions(column_names=cols, block_size=c.tsv_block_bytes),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
        )
        yield from reader


def _shuffle(pieces: Iterator[Batch], capacity: int, rng: np.random.Generator) -> Iterator[Batch]:
    """Shuffle buffer: once ``capacity`` rows are pooled, emit a random half, keep the rest."""
    pool: list[Batch] = []
    pooled = 0
    for piece in pieces:
        pool.append(piece)
        pooled += len(piece)
        if pooled >= capacity:
            merged = Batch.concat(pool)
            perm = rng.permutation(pooled)
            keep = capacity // 2
            yield merged.take(perm[keep:])
            pool, pooled = [merged.take(perm[:keep])], keep
    if pooled:
        yield Batch.concat(pool).take(rng.permutation(pooled))


def _rebatch(pieces: Iterable[Batch], size: int, drop_last: bool) -> Iterator[Batch]:
    pending: list[Batch] = []
    have = 0
    for piece in pieces:
        if not len(piece):
            continue
        pending.append(piece)
        have += len(piece)
        if have < size:
            continue
        merged = Batch.concat(pending)
        full = have - have % size
        for s in range(0, full, size):
            yield merged.slice(s, s + size)
        pending = [merged.slice(full, have)] if full < have else []
        have -= full
    if have and not drop_last:
        yield Batch.concat(pending)
