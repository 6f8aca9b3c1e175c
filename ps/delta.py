"""The online delta stream: a training shard publishes the rows pushed since its last
publish as a versioned, sorted-SST delta that serving replicas ingest.

Layout of a delta root (one per training job, shared by every shard)::

    DELTA_ROOT/shard-<p>/<seq:012d>/manifest.json            DeltaManifest.to_dict()
    DELTA_ROOT/shard-<p>/<seq:012d>/tables/<t>/shard-<k>.sst  rows of serving shard k
    DELTA_ROOT/shard-<p>/<seq:012d>/tables/<t>/shard-<k>.ids  their ids, int64 LE, sorted
    DELTA_ROOT/shard-<p>/<seq:012d>/tables/<t>/shard-<k>.del  ids deleted (TTL), int64 LE
    DELTA_ROOT/shard-<p>/<seq:012d>/COMPLETE                  written last

``p`` is the training shard, ``seq`` counts its deltas from 1 with no gaps. A delta is
built in ``shard-<p>/.tmp-<seq>-<pid>/`` and renamed into place, so a reader never sees
half of one; :func:`list_deltas` counts only directories with ``COMPLETE``. SSTs use the
serving model's encoding (:mod:`recps.embedding.sstfile`, ``float32`` rows by default)
and its serving shards (``ShardMap.even(K)`` over the training map's slots, the export's
default split), so a replica ingests a delta as it ingests an exported version.

A delta holds each changed row's *current* embedding (no optimizer state): values, not
increments, so applying one twice, or applying one whose rows a checkpoint already holds,
is harmless; applying them in ``seq`` order leaves each row at its newest published value.
It also lists the ids whose rows the shard's TTL sweep deleted (and that were not
re-created by the time of the delta): a replica deletes them, so an expired row serves
its table's default again, as training would. Rows that leave a shard because a
rebalance moved their slot are *not* deletions: the new owner publishes them.

Example:
    >>> ch = ChangedIds()
    >>> ch.add("user", np.array([5, 3, 5]))
    >>> ch.add("user", np.array([9]))
    >>> {t: ids.tolist() for t, ids in ch.take().items()}
    {'user': [3, 5, 9]}
    >>> ch.pending()
    0
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recps.embedding.errors import InvalidArgumentError, RecpsError
from recps.embedding.sstfile import ROW_FORMATS, file_sha256, write_sst
from recps.ps.routing import ShardMap

log = logging.getLogger("recps.ps.delta")

DELTA_FORMAT = "recps-delta-v1"
MANIFEST_FILE = "manifest.json"
COMPLETE_FILE = "COMPLETE"
TMP_PREFIX = ".tmp-"
SEQ_DIGITS = 12
STATE_FILE = "delta_state.json"  # in the shard's data_dir: seq and changes_before
EXPIRED_LOG_FILE = "delta_expired.log"  # next to it: TTL-deleted ids not yet published
_SEQ_RE = re.compile(rf"^\d{{{SEQ_DIGITS}}}$")
_SHARD_RE = re.compile(r"^shard-(\d+)$")
# Compact a table's pending chunks once they hold this many ids more than the set itself.
_COMPACT_MIN_IDS = 1 << 16


class DeltaError(RecpsError):
    """A delta is missing, incomplete or corrupt, or a stream has a gap."""

    status = "FAILED_PRECONDITION"


# ---- changed-id tracking ---------------------------------------------------------------------


class ChangedIds:
    """Per table, the set of ids changed since the last :meth:`take`. Thread-safe.

    The push path calls :meth:`add` with each applied batch: an append under a lock, no
    per-id work. Chunks are merged with one ``np.unique`` once they outgrow the merged set
    (amortized O(n log n), memory at most ~2x the distinct ids plus one ``_COMPACT_MIN_IDS``).

    Example:
        >>> ch = ChangedIds()
        >>> ch.add("t", np.array([2, 1]))
        >>> taken = ch.take()
        >>> ch.add("t", np.array([7]))
        >>> ch.restore(taken)  # a failed publish puts its ids back
        >>> ch.take()["t"].tolist()
        [1, 2, 7]
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._merged: dict[str, np.ndarray] = {}  # sorted unique
        self._chunks: dict[str, list[np.ndarray]] = {}
        self._chunk_ids: dict[str, int] = {}

    def add(self, table: str, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return
        with self._lock:
            self._chunks.setdefault(table, []).append(ids)
            n = self._chunk_ids.get(table, 0) + len(ids)
            self._chunk_ids[table] = n
            if n > max(_COMPACT_MIN_IDS, len(self._merged.get(table, ()))):
                self._compact(table)

    def _compact(self, table: str) -> None:
        parts = self._chunks.pop(table, [])
        self._chunk_ids[table] = 0
        base = self._merged.get(table)
        if base is not None:
            parts.append(base)
        if parts:
            self._merged[table] = np.unique(np.concatenate(parts))

    def take(self) -> dict[str, np.ndarray]:
        """The changed ids per table (sorted, unique), and start a new, empty set."""
        with self._lock:
            for table in list(self._chunks):
                self._compact(table)
            out = {t: ids for t, ids in self._merged.items() if len(ids)}
            self._merged, self._chunks, self._chunk_ids = {}, {}, {}
        return out

    def restore(self, taken: Mapping[str, np.ndarray]) -> None:
        """Merge ids a :meth:`take` returned back in (their publish failed)."""
        for table, ids in taken.items():
            self.add(table, ids)

    def drop_table(self, table: str) -> None:
        with self._lock:
            self._merged.pop(table, None)
            self._chunks.pop(table, None)
            self._chunk_ids.pop(table, None)

    def pending(self, table: str | None = None) -> int:
        """Distinct ids pending (of one table, or all)."""
        with self._lock:
            for t in list(self._chunks):
                self._compact(t)
            if table is not None:
                return len(self._merged.get(table, ()))
            return sum(len(v) for v in self._merged.values())


# ---- the on-disk format ----------------------------------------------------------------------


def shard_dir(root: str | Path, training_shard: int) -> Path:
    return Path(root) / f"shard-{int(training_shard)}"


def delta_dir(root: str | Path, training_shard: int, seq: int) -> Path:
    return shard_dir(root, training_shard) / f"{int(seq):0{SEQ_DIGITS}d}"


def del_relpath(table: str, serving_shard: int) -> str:
    return f"tables/{table}/shard-{serving_shard}.del"


def sst_relpath(table: str, serving_shard: int) -> str:
    return f"tables/{table}/shard-{serving_shard}.sst"


def ids_relpath(table: str, serving_shard: int) -> str:
    return f"tables/{table}/shard-{serving_shard}.ids"


def list_training_shards(root: str | Path) -> list[int]:
    """Training shards that have a delta folder under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _SHARD_RE.match(p.name)))


def list_deltas(root: str | Path, training_shard: int) -> list[int]:
    """Complete delta seqs of one training shard, ascending (temporary ones excluded)."""
    d = shard_dir(root, training_shard)
    if not d.is_dir():
        return []
    return sorted(
        int(p.name) for p in d.iterdir() if _SEQ_RE.match(p.name) and (p / COMPLETE_FILE).is_file()
    )


@dataclass(frozen=True)
class DeltaTable:
    dim: int
    rows: int
    deleted: int = 0  # ids whose rows were deleted (TTL)


@dataclass(frozen=True)
class DeltaManifest:
    """The parsed ``manifest.json`` of one delta.

    ``created_at`` is the wall time the delta was published (its rows were read just
    before); ``changes_before`` is when its id set was taken: every push applied before
    that instant is in this delta or an earlier one.
    """

    training_shard: int
    seq: int
    created_at: float
    changes_before: float
    num_slots: int
    serving_shards: int
    row_format: str
    tables: dict[str, DeltaTable]
    files: dict[str, dict[str, Any]]  # relpath -> {"bytes", "sha256", "rows"}
    format: str = DELTA_FORMAT
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.format != DELTA_FORMAT:
            raise DeltaError(f"unknown delta format {self.format!r}; expected {DELTA_FORMAT!r}")

    def serving_map(self) -> ShardMap:
        """The serving shards the files are split by."""
        return ShardMap.even([""] * self.serving_shards, num_slots=self.num_slots)

    def files_of(self, table: str, serving_shards: list[int] | None = None) -> list[int]:
        """Serving shards of ``table`` that have a file (of ``serving_shards`` if given)."""
        out = []
        for k in range(self.serving_shards):
            if sst_relpath(table, k) in self.files and (
                serving_shards is None or k in serving_shards
            ):
                out.append(k)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "training_shard": self.training_shard,
            "seq": self.seq,
            "created_at": self.created_at,
            "changes_before": self.changes_before,
            "num_slots": self.num_slots,
            "serving_shards": self.serving_shards,
            "row_format": self.row_format,
            "tables": {n: vars(t).copy() for n, t in sorted(self.tables.items())},
            "files": dict(sorted(self.files.items())),
        }

    @classmethod
    def load(cls, directory: str | Path, verify: bool = False) -> DeltaManifest:
        """Read a delta's manifest; it must be COMPLETE. ``verify`` checks every file's
        size and sha256."""
        d = Path(directory)
        if not (d / COMPLETE_FILE).is_file():
            raise DeltaError(f"delta {d} is missing or has no {COMPLETE_FILE} marker")
        try:
            raw = json.loads((d / MANIFEST_FILE).read_text())
            m = cls(
                training_shard=int(raw["training_shard"]),
                seq=int(raw["seq"]),
                created_at=float(raw["created_at"]),
                changes_before=float(raw["changes_before"]),
                num_slots=int(raw["num_slots"]),
                serving_shards=int(raw["serving_shards"]),
                row_format=str(raw["row_format"]),
                tables={n: DeltaTable(**t) for n, t in raw["tables"].items()},
                files=dict(raw["files"]),
                format=str(raw["format"]),
                path=d,
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DeltaError(f"unreadable delta manifest in {d}: {e}") from e
        if verify:
            for rel, entry in sorted(m.files.items()):
                p = d / rel
                size = p.stat().st_size if p.is_file() else -1
                if size != entry["bytes"] or file_sha256(p) != entry["sha256"]:
                    raise DeltaError(f"delta {d}: {rel} does not match its manifest (corrupt)")
        return m

    def read_ids(self, table: str, serving_shard: int) -> np.ndarray:
        assert self.path is not None
        raw = (self.path / ids_relpath(table, serving_shard)).read_bytes()
        return np.frombuffer(raw, dtype="<i8").astype(np.int64)

    def deletes_of(self, table: str, serving_shards: list[int] | None = None) -> list[int]:
        """Serving shards of ``table`` with deleted ids (of ``serving_shards`` if given)."""
        return [
            k
            for k in range(self.serving_shards)
            if del_relpath(table, k) in self.files
            and (serving_shards is None or k in serving_shards)
        ]

    def read_deleted(self, table: str, serving_shard: int) -> np.ndarray:
        assert self.path is not None
        raw = (self.path / del_relpath(table, serving_shard)).read_bytes()
        return np.frombuffer(raw, dtype="<i8").astype(np.int64)


def write_delta(
    root: str | Path,
    training_shard: int,
    seq: int,
    rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
    num_slots: int,
    serving_shards: int,
    changes_before: float,
    row_format: str = "float32",
    deleted: Mapping[str, np.ndarray] | None = None,
) -> DeltaManifest:
    """Publish one delta: ``rows`` is ``{table: (sorted unique ids, float32 [n, dim])}``,
    ``deleted`` is ``{table: sorted unique ids}`` whose rows are gone.

    Written in a temporary folder, files fsynced, ``COMPLETE`` last, then renamed to
    ``<seq:012d>/``. A delta with no rows is still written (the stream has no gaps).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     m = write_delta(d, 0, 1, {"t": (np.array([1, 9]), np.ones((2, 4), np.float32))},
        ...                     num_slots=64, serving_shards=2, changes_before=0.0)
        ...     list_deltas(d, 0), sum(f["rows"] for f in m.files.values() if "rows" in f)
        ([1], 2)
    """
    if row_format not in ROW_FORMATS:
        raise InvalidArgumentError(f"row_format must be one of {ROW_FORMATS}")
    final = delta_dir(root, training_shard, seq)
    if final.exists():
        raise DeltaError(f"delta {final} already exists; the shard's delta seq went backwards")
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TMP_PREFIX}{seq}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    smap = ShardMap.even([""] * serving_shards, num_slots=num_slots)
    files: dict[str, dict[str, Any]] = {}
    tables: dict[str, DeltaTable] = {}
    deleted = deleted or {}

    def add_file(rel: str, **extra: int) -> None:
        p = tmp / rel
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[rel] = {"bytes": p.stat().st_size, "sha256": file_sha256(p), **extra}

    try:
        for name in sorted(set(rows) | set(deleted)):
            ids, emb = rows.get(name, (np.empty(0, np.int64), None))
            ids = np.asarray(ids, dtype=np.int64)
            gone = np.asarray(deleted.get(name, ()), dtype=np.int64)
            dim = int(emb.shape[1]) if emb is not None else 0
            tables[name] = DeltaTable(dim, len(ids), len(gone))
            if not len(ids) and not len(gone):
                continue
            (tmp / "tables" / name).mkdir(parents=True, exist_ok=True)
            for k, sel in _by_serving_shard(smap, name, ids):
                rel = sst_relpath(name, k)
                n = write_sst(tmp / rel, ids[sel], np.asarray(emb, np.float32)[sel], row_format)
                (tmp / ids_relpath(name, k)).write_bytes(ids[sel].astype("<i8").tobytes())
                add_file(rel, rows=n)
                add_file(ids_relpath(name, k))
            for k, sel in _by_serving_shard(smap, name, gone):
                (tmp / del_relpath(name, k)).write_bytes(gone[sel].astype("<i8").tobytes())
                add_file(del_relpath(name, k), deleted=len(sel))
        manifest = DeltaManifest(
            training_shard=training_shard,
            seq=seq,
            created_at=time.time(),
            changes_before=changes_before,
            num_slots=num_slots,
            serving_shards=serving_shards,
            row_format=row_format,
            tables=tables,
            files=files,
        )
        _write_synced(tmp / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=1).encode())
        _write_synced(tmp / COMPLETE_FILE, f"{seq}\n".encode())
        os.rename(tmp, final)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dataclasses.replace(manifest, path=final)


def _by_serving_shard(smap: ShardMap, table: str, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(serving shard, positions of its ids in ``ids``), each group in ``ids``' order."""
    if not len(ids):
        return []
    owners = smap.owners(table, ids)
    order = np.argsort(owners, kind="stable")  # stable: each group stays sorted
    shards, starts = np.unique(owners[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    return [(k, order[bounds[i] : bounds[i + 1]]) for i, k in enumerate(shards.tolist())]


def prune_deltas(root: str | Path, training_shard: int, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` complete deltas of a shard; returns the deleted."""
    seqs = list_deltas(root, training_shard)
    doomed = seqs[:-keep] if keep > 0 else seqs
    for s in doomed:
        d = delta_dir(root, training_shard, s)
        # COMPLETE first: a reader never sees a complete delta with files missing.
        (d / COMPLETE_FILE).unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)
    return doomed


def _read_expired_log(path: Path) -> list[tuple[str, np.ndarray]]:
    """The records of an expired-ids log; a torn last record (a crash mid-append) is
    ignored: its rows' deletion had not been reported yet either."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    out, pos, head = [], 0, struct.calcsize("<HQ")
    while pos + head <= len(raw):
        name_len, n = struct.unpack_from("<HQ", raw, pos)
        end = pos + head + name_len + 8 * n
        if end > len(raw):
            log.warning("%s: torn last record ignored", path)
            break
        name = raw[pos + head : pos + head + name_len].decode()
        out.append((name, np.frombuffer(raw, "<i8", n, pos + head + name_len).astype(np.int64)))
        pos = end
    return out


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the publisher (one per training shard) --------------------------------------------------


class DeltaPublisher:
    """Publishes a training shard's changed rows every ``interval_s`` (see the module doc).

    ``read_rows(table, ids) -> (ids present, float32 rows)`` reads the current embeddings;
    ``serving_shards()`` says how many serving shards to split by. ``lock`` is held for a
    whole publish: a checkpoint takes it too, so the seq a checkpoint records (``seq``,
    the last complete delta) and the ids still pending partition the pushes exactly.
    """

    def __init__(
        self,
        root: str | Path,
        training_shard: int,
        state_path: Path,
        num_slots: int,
        read_rows: Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]],
        serving_shards: Callable[[], int],
        keep: int,
        row_format: str = "float32",
    ) -> None:
        self.root = Path(root)
        self.training_shard = training_shard
        self.num_slots = num_slots
        self.changed = ChangedIds()
        # Ids the TTL sweep deleted since the last publish. Pushes are recovered after a
        # crash from the rows' updated_at; a deleted row leaves no trace, so these are
        # also appended to a log next to the state file, emptied by each publish.
        self.expired = ChangedIds()
        self._expired_log = state_path.with_name(EXPIRED_LOG_FILE)
        self._expired_log_lock = threading.Lock()
        self.lock = threading.Lock()
        self._read_rows = read_rows
        self._serving_shards = serving_shards
        self._keep = keep
        self._row_format = row_format
        self._state_path = state_path
        self.published = 0  # deltas published by this process
        self.failures = 0  # publishes that raised (their ids are kept for the next)
        self.last_published_at = 0.0
        self.last_publish_s = 0.0  # how long the last publish took (read + write + fsync)
        self.seq, self.changes_before = self._load_state()
        for p in shard_dir(self.root, training_shard).glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)  # left by a crash mid-publish
        for table, ids in _read_expired_log(self._expired_log):
            self.expired.add(table, ids)

    def note_expired(self, table: str, ids: np.ndarray) -> None:
        """Rows of ``table`` the TTL sweep deleted: publish them as deletions, and log
        them durably first (a crash before the next publish must not forget them)."""
        ids = np.ascontiguousarray(ids, dtype="<i8")
        if not len(ids):
            return
        name = table.encode()
        record = struct.pack("<HQ", len(name), len(ids)) + name + ids.tobytes()
        with self._expired_log_lock:
            with open(self._expired_log, "ab") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            self.expired.add(table, ids)

    def _trim_expired_log(self, upto: int) -> None:
        """Drop the log's first ``upto`` bytes (published); keep what came since."""
        with self._expired_log_lock:
            try:
                rest = self._expired_log.read_bytes()[upto:]
            except FileNotFoundError:
                return
            tmp = self._expired_log.with_suffix(".tmp")
            _write_synced(tmp, rest)
            tmp.replace(self._expired_log)

    def _load_state(self) -> tuple[int, float]:
        seq, since = 0, None
        try:
            d = json.loads(self._state_path.read_text())
            seq, since = int(d["seq"]), float(d["changes_before"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        seqs = list_deltas(self.root, self.training_shard)
        if seqs and seqs[-1] >= seq:
            m = DeltaManifest.load(delta_dir(self.root, self.training_shard, seqs[-1]))
            seq, since = m.seq, m.changes_before
        if since is None:
            since = time.time()  # the stream starts now: earlier rows are in checkpoints
            self._save_state(seq, since)
        return seq, since

    def _save_state(self, seq: int, changes_before: float) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": seq, "changes_before": changes_before}))
        tmp.replace(self._state_path)

    def metrics(self) -> dict[str, float]:
        """Counters for the shard's Prometheus endpoint."""
        return {
            "seq": self.seq,
            "pending_ids": self.changed.pending(),
            "expired_pending_ids": self.expired.pending(),
            "published": self.published,
            "failures": self.failures,
            "last_published_at": self.last_published_at,
            "last_publish_s": self.last_publish_s,
        }

    def recover(self, tables: Mapping[str, Any]) -> int:
        """After a restart: mark every row updated since the last delta's id set was taken
        (``updated_at >= changes_before``) as changed, so a crash loses no change. One
        scan of every table; returns the rows marked."""
        n = 0
        for name, store in tables.items():
            for batch in store.items(batch_size=1 << 16):
                ids = batch.ids[batch.updated_at >= self.changes_before - 1.0]
                self.changed.add(name, ids)
                n += len(ids)
        return n

    def publish(self, force: bool = False) -> DeltaManifest | None:
        """Publish the pending ids' rows as the next delta; None when nothing changed
        (unless ``force``: then an empty delta is written)."""
        with self.lock:
            taken = self.changed.take()
            with self._expired_log_lock:  # the ids taken are the log's first bytes
                gone = self.expired.take()
                logged = self._expired_log.stat().st_size if self._expired_log.exists() else 0
            if not taken and not gone and not force:
                return None
            changes_before = time.time()
            t0 = time.perf_counter()
            try:
                rows = {}
                for table, ids in taken.items():
                    present, emb = self._read_rows(table, ids)
                    if len(present):
                        rows[table] = (present, emb)
                deleted = {}
                for table, ids in gone.items():
                    back, _ = self._read_rows(table, ids)  # pushed again after it expired
                    ids = np.setdiff1d(ids, back, assume_unique=True)
                    if len(ids):
                        deleted[table] = ids
                m = write_delta(
                    self.root,
                    self.training_shard,
                    self.seq + 1,
                    rows,
                    self.num_slots,
                    max(1, int(self._serving_shards())),
                    changes_before,
                    self._row_format,
                    deleted,
                )
            except BaseException:
                self.changed.restore(taken)
                self.expired.restore(gone)
                self.failures += 1
                raise
            self.seq, self.changes_before = m.seq, changes_before
            self._save_state(self.seq, changes_before)
            if logged:
                self._trim_expired_log(logged)
            self.published += 1
            self.last_published_at = m.created_at
            self.last_publish_s = time.perf_counter() - t0
        if self._keep:
            prune_deltas(self.root, self.training_shard, self._keep)
        return m
