"""A thin wrapper over one RocksDB instance (through ``rocksdict``) holding one table.

Raw bytes mode; the table's rows live in a column family named after the table and
small metadata (config, exact row count, admission sketch) in ``__recps_meta__``, so a
metadata update can ride in the same atomic WriteBatch as the rows it describes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import rocksdict as rd

from recps.embedding.config import TieredStoreConfig
from recps.embedding.errors import StorageError

META_CF = "__recps_meta__"
# rocksdict releases the GIL inside get(); two halves of a large multi-get overlap.
_PARALLEL_GET_MIN_KEYS = 256
_get_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="recps-rocks-get")


def _options(cfg: TieredStoreConfig, cache: rd.Cache | None) -> rd.Options:
    opts = rd.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    opts.set_write_buffer_size(cfg.write_buffer_bytes)
    opts.set_max_background_jobs(2)
    # Rows are dense random floats: compression costs CPU and saves nothing.
    opts.set_compression_type(rd.DBCompressionType.none())
    opts.set_allow_mmap_reads(cfg.mmap_reads)
    bbo = rd.BlockBasedOptions()
    if cfg.bloom_bits_per_key:
        bbo.set_bloom_filter(cfg.bloom_bits_per_key, False)
    if cache is not None:
        bbo.set_block_cache(cache)
    else:
        bbo.disable_cache()
    bbo.set_cache_index_and_filter_blocks(True)
    bbo.set_pin_l0_filter_and_index_blocks_in_cache(True)
    bbo.set_block_size(cfg.block_bytes)
    opts.set_block_based_table_factory(bbo)
    if cfg.row_cache_bytes:
        opts.set_row_cache(rd.Cache(cfg.row_cache_bytes))
    return opts


class RocksTable:
    def __init__(self, path: Path, table: str, cfg: TieredStoreConfig) -> None:
        self.path, self.table, self.cfg = Path(path), table, cfg
        cache = rd.Cache(cfg.block_cache_bytes) if cfg.block_cache_bytes else None
        opts = _options(cfg, cache)
        try:
            self.db = rd.Rdict(str(self.path), opts, column_families={table: opts, META_CF: opts})
        except Exception as e:  # rocksdict raises plain Exception on open failures
            raise StorageError(f"cannot open RocksDB at {self.path}: {e}") from e
        self.rows = self.db.get_column_family(table)
        self.meta = self.db.get_column_family(META_CF)
        self._rows_h = self.db.get_column_family_handle(table)
        self._meta_h = self.db.get_column_family_handle(META_CF)
        self._wopts = rd.WriteOptions()
        self._wopts.sync = cfg.fsync

    def multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        if len(keys) < _PARALLEL_GET_MIN_KEYS:
            return self.rows.get(keys) if keys else []
        half = len(keys) // 2
        second = _get_pool.submit(self.rows.get, keys[half:])
        first = self.rows.get(keys[:half])
        return first + second.result()

    def write(
        self,
        keys: list[bytes] = (),  # type: ignore[assignment]
        values: list[bytes] = (),  # type: ignore[assignment]
        deletes: list[bytes] = (),  # type: ignore[assignment]
        meta: dict[bytes, bytes] | None = None,
        meta_drop: tuple[bytes, bytes] | None = None,
    ) -> None:
        """One atomic WriteBatch through the WAL: rows, deletions and metadata together
        (``meta_drop``: a [begin, end) range of metadata keys deleted in it)."""
        wb = rd.WriteBatch(raw_mode=True)
        wb.set_default_column_family(self._rows_h)
        put, delete = wb.put, wb.delete
        for k, v in zip(keys, values):
            put(k, v)
        for k in deletes:
            delete(k)
        if meta_drop is not None:
            wb.delete_range(meta_drop[0], meta_drop[1], self._meta_h)
        for k, v in (meta or {}).items():
            wb.put(k, v, self._meta_h)
        self.db.write(wb, self._wopts)

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Metadata entries whose keys start with ``prefix``, in key order."""
        it = self.meta.iter()
        it.seek(prefix)
        out = []
        while it.valid():
            k = it.key()
            if not k.startswith(prefix):
                break
            out.append((k, it.value()))
            it.next()
        del it
        return out

    def get_meta(self, key: bytes) -> bytes | None:
        return self.meta.get(key)

    def iter_rows(
        self, batch_rows: int, start_key: bytes | None = None
    ) -> Iterator[tuple[list[bytes], list[bytes]]]:
        """Rows in key order from a snapshot taken now, ``batch_rows`` at a time, from
        the first key ``>= start_key`` on (from the start when None)."""
        snap = self.rows.snapshot()
        it = snap.iter()
        if start_key is None:
            it.seek_to_first()
        else:
            it.seek(start_key)
        keys: list[bytes] = []
        vals: list[bytes] = []
        while it.valid():
            keys.append(it.key())
            vals.append(it.value())
            if len(keys) >= batch_rows:
                yield keys, vals
                keys, vals = [], []
            it.next()
        if keys:
            yield keys, vals
        del it, snap

    def checkpoint(self, directory: Path) -> None:
        """RocksDB Checkpoint: hard links to immutable SSTs plus a consistent WAL cut."""
        if directory.exists():
            raise StorageError(f"checkpoint target {directory} already exists")
        directory.parent.mkdir(parents=True, exist_ok=True)
        rd.Checkpoint(self.db).create_checkpoint(str(directory))

    def disk_bytes(self) -> int:
        live = self.rows.property_int_value("rocksdb.total-sst-files-size") or 0
        mem = self.rows.property_int_value("rocksdb.cur-size-all-mem-tables") or 0
        return int(live + mem)

    def close(self) -> None:
        for name in ("rows", "meta", "_rows_h", "_meta_h"):
            setattr(self, name, None)
        self.db.close()

    @staticmethod
    def copy_dir(src: Path, dst: Path) -> None:
        """Copy a RocksDB directory, hard-linking the immutable SST files when possible."""
        dst.mkdir(parents=True)
        for f in src.iterdir():
            target = dst / f.name
            if f.suffix == ".sst":
                try:
                    target.hardlink_to(f)
                    continue
                except OSError:
                    pass
            shutil.copy2(f, target)
