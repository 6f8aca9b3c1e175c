"""Turn a training checkpoint into a versioned serving model (``recps export``).

The export reads the checkpoint's files directly (no shard process is needed) and writes
the layout of :mod:`recps.serving.model_format`:

1. Resolve the checkpoint (a ``step-NNNNNNNN`` directory, or the checkpoint directory:
   its newest complete step) and rebuild the job from ``meta.json``.
2. Per table and per training shard (the "part"), open the shard's RocksDB checkpoint
   read-only and stream its rows in key order, ``batch_rows`` at a time: keep only the
   embedding (no optimizer state), route each id to its serving shard with the PS slot
   function, and append it to that (shard, part)'s SST writer. A table is never held in
   memory; every file is sorted because the source iteration is.
3. Trace the dense tower (the model without its embeddings) to TorchScript.
4. Checksum every file, write ``manifest.json`` and ``COMPLETE``, then rename the
   temporary directory to ``<version:012d>/``.

Which rows are exported: the training store keeps a row only once an id is admitted
(``admission.min_count``), so never-admitted ids have no row and are never exported. With
``default_vector="initializer"`` (the default) rows that were admitted but never updated
(``count == 0``) are skipped too: they hold exactly the initial vector, which the replica
serves for any id it lacks (as the training PS does). With ``"zeros"`` they are kept.

This module imports ``recps.worker`` (to rebuild the model from the job config) and torch,
lazily inside the functions that need them: the serving path never imports it.

Example::

    manifest = export_checkpoint(ExportConfig(checkpoint="ckpt/", out="models/",
                                              quantize="int8"))
    print(manifest.version, {t: s.rows for t, s in manifest.tables.items()})
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rocksdict as rd

from recps.embedding.config import TableConfig
from recps.embedding.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from recps.embedding.feature_ids import HASH_SCHEME, feature_salt, missing_id
from recps.embedding.optimizers import make_optimizer
from recps.embedding.rocks import META_CF
from recps.embedding.rowcodec import RowCodec
from recps.ps.routing import ShardMap
from recps.serving import model_format as mf

log = logging.getLogger(__name__)

Quantize = Literal["none", "float16", "int8"]
DefaultVector = Literal["initializer", "zeros"]
_HASH_DESCRIPTION = (
    "recps.embedding.feature_ids.hash_column(values, feature.input): integer x -> "
    "mix64(mix64(x) ^ salt) (splitmix64 finalizer, uint64 wrap, as int64); a string of "
    "1..16 hex digits is that integer; any other string hashes its UTF-8 bytes; null or "
    "'' -> missing_ids[feature]. salt = stable_hash64(input) = blake2b(input, "
    "digest_size=8) little-endian; salts and missing_ids are keyed by feature name."
)


class ExportError(mf.ModelFormatError):
    """The export could not produce a model version (bad input, or it would lose data)."""


@dataclass(frozen=True)
class ExportConfig:
    """One ``recps export`` run.

    Example:
        >>> ExportConfig(checkpoint="ckpt", out="models", quantize="int8").row_format
        'int8'
    """

    checkpoint: str  # a step-NNNNNNNN directory, or the checkpoints dir (newest complete)
    out: str  # the model root; the version lands in <out>/<version:012d>/
    version: int | None = None  # None: the checkpoint's step, so versions follow training
    serving_shards: int | None = None  # None: as many as the training shards
    quantize: Quantize = "none"  # SST row format: float32 ("none"), float16 or int8
    batch_rows: int = 65536  # rows read, routed and written per step: bounds memory
    force: bool = False  # replace an existing version instead of refusing
    default_vector: DefaultVector = "initializer"  # what a replica serves for a missing id

    def __post_init__(self) -> None:
        if self.quantize not in ("none", "float16", "int8"):
            raise ConfigError(f"quantize must be none, float16 or int8, got {self.quantize!r}")
        if self.batch_rows < 1:
            raise ConfigError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if self.serving_shards is not None and not 1 <= self.serving_shards <= 4096:
            raise ConfigError(f"serving_shards must be in [1, 4096], got {self.serving_shards}")
        if self.version is not None and not 0 <= self.version < 10**mf.VERSION_DIGITS:
            raise ConfigError(f"version must be in [0, 10**{mf.VERSION_DIGITS})")
        if self.default_vector not in ("initializer", "zeros"):
            raise ConfigError("default_vector must be 'initializer' or 'zeros'")

    @property
    def row_format(self) -> str:
        return "float32" if self.quantize == "none" else self.quantize


@dataclass(frozen=True)
class SourceShard:
    """One training shard's part of a checkpoint."""

    shard_id: int
    path: Path
    shard_map: ShardMap
    tables: dict[str, TableConfig]
    delta_seq: int | None = None  # the shard's last published delta at the checkpoint


# ---- reading the checkpoint ------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Any:
    """The :class:`~recps.worker.checkpoint.CheckpointInfo` of a step directory, or of the
    newest complete checkpoint under a checkpoints directory."""
    from recps.worker import checkpoint as ckpt

    p = Path(path)
    if (p / ckpt.COMPLETE).is_file() or (p / ckpt.META_FILE).is_file():
        return ckpt.read_checkpoint(p)
    info = ckpt.latest_checkpoint(p)
    if info is None:
        why = "does not exist" if not p.exists() else "holds no complete checkpoint"
        raise CheckpointNotFoundError(
            f"{p} {why}; pass a step-NNNNNNNN directory with a COMPLETE marker, or the "
            "training.checkpoint_dir that holds them"
        )
    return info


def source_shards(step_dir: str | Path) -> list[SourceShard]:
    """The ``shard-k/`` parts of a checkpoint, by shard id."""
    out = []
    for d in sorted(Path(step_dir).glob("shard-*")):
        try:
            m = json.loads((d / "manifest.json").read_text())
            out.append(
                SourceShard(
                    int(m["shard_id"]),
                    d,
                    ShardMap.from_dict(m["shard_map"]),
                    {t["name"]: TableConfig.from_dict(t) for t in m["tables"]},
                    int(m["delta_seq"]) if m.get("delta_seq") is not None else None,
                )
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"unreadable shard manifest in {d}: {e}") from e
    if not out:
        raise CheckpointError(f"checkpoint {step_dir} has no shard-k/ directories")
    return sorted(out, key=lambda s: s.shard_id)


def delta_seqs(shards: list[SourceShard]) -> dict[int, int]:
    """``{training shard: last delta seq its checkpoint holds}`` for the manifest (shards
    without a delta stream are left out).

    Example:
        >>> delta_seqs([SourceShard(0, Path("."), ShardMap.even(["a"]), {}, 7)])
        {0: 7}
    """
    return {s.shard_id: s.delta_seq for s in shards if s.delta_seq is not None}


def iter_table_rows(
    rocksdb_dir: str | Path, table: TableConfig, batch_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(ids int64, emb float32 [n, dim], count int64)`` of a table's RocksDB checkpoint in
    key (= id) order, ``batch_rows`` at a time. Opens it read-only: the checkpoint shares
    its SST files with the live store through hard links and must not change."""
    opts = rd.Options(raw_mode=True)
    try:
        db = rd.Rdict(
            str(rocksdb_dir),
            opts,
            column_families={table.name: opts, META_CF: opts},
            access_type=rd.AccessType.read_only(),
        )
    except Exception as e:  # rocksdict raises plain Exception on open failures
        raise CheckpointError(f"cannot open the table checkpoint {rocksdb_dir}: {e}") from e
    codec = RowCodec(table.dim, table.dtype, make_optimizer(table.optimizer).state_width(table.dim))
    try:
        it = db.get_column_family(table.name).iter()
        it.seek_to_first()
        while it.valid():
            keys: list[bytes] = []
            vals: list[bytes] = []
            while it.valid() and len(keys) < batch_rows:
                keys.append(it.key())
                vals.append(it.value())
                it.next()
            rec = codec.unpack(vals)
            yield mf.decode_keys(keys), rec["emb"].astype(np.float32), rec["count"]
        del it
    finally:
        db.close()


# ---- tables ----------------------------------------------------------------------------------


@dataclass
class TableExport:
    """What :func:`export_table` wrote: SST relpaths -> rows, and totals."""

    files: dict[str, int]
    rows: int  # rows exported
    scanned: int  # rows read from the checkpoint
    skipped_untrained: int


def export_table(
    table: TableConfig,
    parts: list[tuple[int, Path]],
    out_dir: Path,
    serving_map: ShardMap,
    row_format: str,
    batch_rows: int,
    skip_untrained: bool,
) -> TableExport:
    """Stream one table from the training shards' RocksDB checkpoints (``parts``:
    ``(part, rocksdb_dir)``) into ``out_dir/tables/<table>/shard-<k>-part-<part>.sst``.

    Memory is O(``batch_rows``): one batch of rows, plus one open SST writer per serving
    shard (RocksDB buffers a data block per writer).
    """
    (out_dir / mf.TABLES_DIR / table.name).mkdir(parents=True, exist_ok=True)
    files: dict[str, int] = {}
    exported = scanned = untrained = 0
    for part, rocksdb_dir in parts:
        writers: dict[int, mf.SstWriter] = {}
        for ids, emb, count in iter_table_rows(rocksdb_dir, table, batch_rows):
            scanned += len(ids)
            if skip_untrained:
                trained = count > 0
                untrained += int(len(ids) - np.count_nonzero(trained))
                ids, emb = ids[trained], emb[trained]
            owners = serving_map.owners(table.name, ids)
            # Group by serving shard; a stable sort keeps each group in id order.
            order = np.argsort(owners, kind="stable")
            shards, starts = np.unique(owners[order], return_index=True)
            bounds = [*starts.tolist(), len(order)]
            for i, k in enumerate(shards.tolist()):
                sel = order[bounds[i] : bounds[i + 1]]
                w = writers.get(k)
                if w is None:
                    rel = mf.sst_relpath(table.name, k, part)
                    w = writers[k] = mf.SstWriter(out_dir / rel, table.dim, row_format)
                w.add(ids[sel], emb[sel])
        for k, w in sorted(writers.items()):
            n = w.finish()
            if n:
                files[mf.sst_relpath(table.name, k, part)] = n
                exported += n
    return TableExport(files, exported, scanned, untrained)


# ---- the dense tower -------------------------------------------------------------------------


def tower_features(model: Any) -> list[str]:
    """The features the model's dense part reads, in the order the tower takes them."""
    names = [*getattr(model, "features", ()), *getattr(model, "linear_features", ())]
    return list(dict.fromkeys(names))


def build_tower(job: Any, model_state: dict[str, Any]) -> tuple[Any, Any, list[str]]:
    """``(model, traced tower, feature names)``: the job's model with the checkpoint's
    dense weights (and no embedding collection), and its TorchScript tower
    ``forward(dense [B, n_dense], pooled: List[[B, dim_i]]) -> logits [B]``."""
    import torch
    from torch import nn

    from recps.worker.trainer import build_job_model, embedding_collection_config

    dims = embedding_collection_config(job).dims

    class _DimsOnly(nn.Module):
        """Stands in for the embedding collection: the model asks it only for ``dims``."""

        def __init__(self) -> None:
            super().__init__()
            self.dims = dims

    model = build_job_model(job, _DimsOnly())
    dense = {k: v for k, v in model_state.items() if not k.startswith("embeddings.")}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    missing = [k for k in missing if not k.startswith("embeddings.")]
    if missing or unexpected:
        raise ExportError(
            f"dense.pt does not fit the job's model: missing {missing}, unexpected {unexpected}"
        )
    model.embeddings = None  # the tower carries no embedding module
    model.eval().requires_grad_(False)  # inference only: no autograd graph per request
    names = tower_features(model)

    class _Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
            return self.model.forward_pooled(dense, dict(zip(names, pooled)))

    num_dense = len(job.data.reader.dense_features)
    example = (torch.zeros(3, num_dense), [torch.zeros(3, dims[f]) for f in names])
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 marks TorchScript deprecated in favour of torch.export; the format
        # still names TorchScript (loads with torch.jit.load and no Python source).
        warnings.simplefilter("ignore", DeprecationWarning)
        # Tracing records ops on dynamic batch sizes (size() calls), so any B works;
        # the models have no data-dependent control flow.
        traced = torch.jit.trace(_Tower().eval(), example, check_trace=False)
    return model, traced, names


# ---- the export ------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _default_vector(table: TableConfig, kind: str) -> dict[str, Any]:
    init = table.initializer
    if kind == "zeros" or init.kind == "zeros" or init.scale == 0.0:
        return {"kind": "zeros"}
    return {"kind": "initializer", "initializer": dataclasses.asdict(init)}


def _hashing(features: tuple[mf.FeatureSpec, ...]) -> dict[str, Any]:
    # Training salts with the raw input column's name, so features that share an input
    # (C1 and C1_wide) share its salt and ids.
    return {
        "scheme": HASH_SCHEME,
        "description": _HASH_DESCRIPTION,
        "salts": {f.name: int(feature_salt(f.input)) for f in features},
        "missing_ids": {f.name: missing_id(f.input) for f in features},
    }


def export_checkpoint(cfg: ExportConfig) -> mf.ModelManifest:
    """Export ``cfg.checkpoint`` into ``cfg.out``; returns the written (verified) manifest.

    Raises :class:`~recps.serving.model_format.ModelVersionExistsError` when the version
    exists and ``cfg.force`` is off, ``CheckpointNotFoundError`` / ``CheckpointError`` for
    a missing or unreadable checkpoint.
    """
    import torch

    from recps.worker.job_config import load_job_config
    from recps.worker.trainer import embedding_collection_config

    t0 = time.perf_counter()
    info = resolve_checkpoint(cfg.checkpoint)
    meta = info.meta or {}
    if "job" not in meta:
        raise CheckpointError(f"{info.path}/meta.json has no 'job'; cannot rebuild the model")
    job = load_job_config(meta["job"])
    shards = source_shards(info.path)
    train_map = shards[0].shard_map
    k = cfg.serving_shards or len(shards)
    serving_map = ShardMap.even([f"serving-{i}" for i in range(k)], num_slots=train_map.num_slots)

    version = info.step if cfg.version is None else cfg.version
    root = Path(cfg.out)
    final = mf.version_dir(root, version)
    if final.exists() and not cfg.force:
        raise mf.ModelVersionExistsError(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{mf.TMP_PREFIX}{version}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        collection = embedding_collection_config(job)
        try:
            state = torch.load(Path(info.path) / "dense.pt", map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"cannot read {info.path}/dense.pt: {e}") from e
        model, tower, names = build_tower(job, state["model"])
        (tmp / mf.TOWER_FILE).parent.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(tower, str(tmp / mf.TOWER_FILE))

        by_name = {f.name: f for f in collection.features}
        multi = set(job.data.reader.multi_id_features)
        features = tuple(
            mf.FeatureSpec(
                n,
                by_name[n].table,
                by_name[n].source,
                by_name[n].pooling,
                by_name[n].source in multi,
            )
            for n in names
        )
        sst_rows: dict[str, int] = {}
        tables: dict[str, mf.TableSpec] = {}
        for table in sorted(job.tables, key=lambda t: t.name):
            parts = []
            expected_rows = 0
            for s in shards:
                tdir = s.path / "tables" / table.name
                if table.name not in s.tables or not (tdir / "rocksdb").is_dir():
                    raise CheckpointError(f"shard {s.shard_id} has no checkpoint of {table.name!r}")
                try:
                    tm = json.loads((tdir / "manifest.json").read_text())
                    expected_rows += int(tm["rows"])
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"unreadable table manifest in {tdir}: {e}") from e
                parts.append((s.shard_id, tdir / "rocksdb"))
            res = export_table(
                table,
                parts,
                tmp,
                serving_map,
                cfg.row_format,
                cfg.batch_rows,
                skip_untrained=cfg.default_vector == "initializer",
            )
            if res.scanned != expected_rows:
                raise CheckpointError(
                    f"table {table.name!r}: read {res.scanned} rows, the shard manifests "
                    f"say {expected_rows}; the checkpoint is damaged"
                )
            sst_rows.update(res.files)
            tables[table.name] = mf.TableSpec(
                dim=table.dim,
                train_dtype=table.dtype,
                row_format=cfg.row_format,
                rows=res.rows,
                default=_default_vector(table, cfg.default_vector),
            )
            log.info(
                "exported %s: %d rows (%d untrained skipped)",
                table.name,
                res.rows,
                res.skipped_untrained,
            )

        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_dir():
                _fsync_dir(p)
                continue
            rel = p.relative_to(tmp).as_posix()
            files[rel] = mf.FileEntry(p.stat().st_size, mf.file_sha256(p), sst_rows.get(rel))
            with open(p, "rb") as f:  # durable before COMPLETE claims the version is whole
                os.fsync(f.fileno())
        manifest = mf.ModelManifest(
            version=version,
            created_at=time.time(),
            source_checkpoint=str(Path(info.path).resolve()),
            step=info.step,
            model={"kind": job.model.kind, **_plain(dataclasses.asdict(model.config))},
            dense_features=tuple(job.data.reader.dense_features),
            features=features,
            hashing=_hashing(features),
            tables=tables,
            shard_map=serving_map,
            files=files,
            delta_seqs=delta_seqs(shards),
        )
        _write_file(tmp / mf.MANIFEST_FILE, manifest.to_json().encode())
        _write_file(tmp / mf.COMPLETE_FILE, f"{version}\n".encode())
        _fsync_dir(tmp)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s as version %d in %.1f s", info.path, version, time.perf_counter() - t0)
    return dataclasses.replace(manifest, path=final)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (``--force``) is moved aside
    first, since a directory rename cannot replace a non-empty directory."""
    old = None
    if final.exists():
        old = final.with_name(f"{mf.TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)  # put the previous version back
        raise
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
