"""recps.worker.data: Criteo TSV / Parquet streaming, id hashing, rank sharding, batching."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recps.embedding.errors import ConfigError, DtypeError, InvalidArgumentError
from recps.worker.data import (
    CRITEO_DENSE,
    CRITEO_SPARSE,
    Batch,
    DataFile,
    DataReader,
    JaggedIds,
    ReaderConfig,
    hash_column,
    hash_int_ids,
    missing_id,
    plan_shards,
    reference_hash,
)

# A Criteo TSV: label, I1..I13, C1..C26; empty fields are missing; I2 may be negative.
TSV_ROWS = [
    ["1", "5", "-1", "", "0", *["3"] * 9, "68fd1e64", "", *["0a519c5c"] * 24],
    ["0", "", "2", "7", "", *[""] * 9, "05db9164", "38a947a1", *[""] * 24],
    ["0", "100", "0", "1", "1", *["2"] * 9, "68FD1E64", "ffffffff", *["12345678"] * 24],
]


def _write_tsv(path: Path, rows: list[list[str]]) -> Path:
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


def _criteo_table(n: int, seed: int = 0, *, strings: bool = True) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {"label": pa.array(rng.integers(0, 2, n).astype(np.float32))}
    for name in CRITEO_DENSE:
        cols[name] = pa.array(rng.integers(-2, 1000, n), mask=rng.random(n) < 0.2)
    for name in CRITEO_SPARSE:
        ids = rng.integers(0, 1 << 32, n)
        missing = rng.random(n) < 0.1
        if strings:
            cols[name] = pa.array([None if m else f"{i:08x}" for i, m in zip(ids, missing)])
        else:
            cols[name] = pa.array(ids, mask=missing)
    return pa.table(cols)


def _rowid_dataset(tmp: Path, rows_per_file: list[int], row_group_rows: int) -> Path:
    """Files whose sparse column ``rowid`` holds the global row number."""
    start = 0
    for k, n in enumerate(rows_per_file):
        t = pa.table(
            {
                "label": pa.array(np.zeros(n, np.float32)),
                "I1": pa.array(np.arange(n)),
                "rowid": pa.array(np.arange(start, start + n)),
            }
        )
        pq.write_table(t, tmp / f"part-{k:03d}.parquet", row_group_size=row_group_rows)
        start += n
    return tmp


ROWID_CFG = ReaderConfig(batch_size=7, dense_features=("I1",), sparse_features=("rowid",))


def _rows_seen(reader: DataReader, epoch: int = 0) -> list[int]:
    total = sum(f.num_rows or 0 for f in reader.files) + 10
    back = {int(h): i for i, h in enumerate(hash_int_ids(np.arange(total), "rowid"))}
    return [back[int(h)] for b in reader.epoch(epoch) for h in b.sparse["rowid"]]


# ---------------------------------------------------------------------------------- hashing


def test_hash_golden_values_are_stable() -> None:
    # Changing these silently would orphan every trained embedding row: bump a version instead.
    assert reference_hash("68fd1e64", "C1") == 6236735035567891259
    assert reference_hash(0x68FD1E64, "C1") == 6236735035567891259
    assert reference_hash("68fd1e64", "C2") == -4688864584569840278
    assert reference_hash(12345, "C2") == 3140759491169373280
    assert reference_hash("hello world, not hex", "C3") == -8279079288051679529
    assert missing_id("C1") == 7779827152916651969
    got = hash_column(pa.array(["68fd1e64", None, "hello world, not hex"]), "C1").tolist()
    assert got == [
        6236735035567891259,
        7779827152916651969,
        reference_hash("hello world, not hex", "C1"),
    ]


def test_ids_are_salted_per_feature() -> None:
    values = pa.array([f"{i:08x}" for i in range(1000)])
    a, b = hash_column(values, "C1"), hash_column(values, "C2")
    assert len(set(a.tolist()) | set(b.tolist())) == 2000
    assert missing_id("C1") != missing_id("C2")
    assert hash_int_ids(np.array([7]), "C1")[0] != hash_int_ids(np.array([7]), "C2")[0]


def test_integer_ids_are_a_bijection_per_feature() -> None:
    x = np.random.default_rng(0).integers(-(1 << 63), (1 << 63) - 1, 200_000)
    x = np.unique(x)
    assert len(np.unique(hash_int_ids(x, "C9"))) == len(x)


def test_string_int_and_hex_spellings_agree() -> None:
    ids = np.array([0, 1, 0x68FD1E64, 0xFFFFFFFF, -1])
    spelled = ["00000000", "1", "68FD1E64", "ffffffff", "ffffffffffffffff"]
    want = hash_int_ids(ids, "C4")
    for arr in (pa.array(spelled), pa.array(spelled, pa.large_string()), pa.array(ids)):
        assert hash_column(arr, "C4").tolist() == want.tolist()
    assert hash_column(pa.array(ids.astype(np.uint64)), "C4").tolist() == want.tolist()
    small = np.array([0, 1, 0x68FD1E64, -1])  # fits int32: the value counts, not the width
    assert hash_column(pa.array(small.astype(np.int32)), "C4").tolist() == [
        reference_hash(int(v), "C4") for v in small
    ]


def _random_values(rng: np.random.Generator, n: int) -> list[str | None]:
    out: list[str | None] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            out.append(None)
        elif r < 0.15:
            out.append("")
        elif r < 0.5:
            out.append("".join(rng.choice(list("0123456789abcdefABCDEF"), rng.integers(1, 18))))
        else:
            out.append("".join(rng.choice(list("xyz\t é01a"), rng.integers(1, 40))))
    return out


@pytest.mark.parametrize("kind", ["string", "large_string", "binary", "dictionary", "sliced"])
def test_vectorized_hash_matches_the_reference(kind: str) -> None:
    values = _random_values(np.random.default_rng(1), 1500)
    if kind == "dictionary":
        arr = pa.array(values).dictionary_encode()
    elif kind == "binary":
        arr = pa.array([None if v is None else v.encode() for v in values], pa.binary())
    elif kind == "sliced":
        arr, values = pa.array(values).slice(17, 1000), values[17:1017]
    else:
        arr = pa.array(values, getattr(pa, kind)())
    assert hash_column(arr, "C7").tolist() == [reference_hash(v, "C7") for v in values]


def test_criteo_fast_path_matches_the_reference() -> None:
    rng = np.random.default_rng(2)
    values = [f"{i:08x}" if i % 4 else None for i in rng.integers(0, 1 << 32, 3000)]
    values += ["zzzzzzzz", "ABCDEF01", ""]  # same length, not hex; uppercase; empty
    arr = pa.array(values).slice(5)
    assert hash_column(arr, "C8").tolist() == [reference_hash(v, "C8") for v in values[5:]]


def test_unsupported_categorical_type_is_a_dtype_error() -> None:
    with pytest.raises(DtypeError, match="C1"):
        hash_column(pa.array([1.5, 2.5]), "C1")


# ---------------------------------------------------------------------------------- reading


def test_criteo_tsv_with_missing_values(tmp_path: Path) -> None:
    path = _write_tsv(tmp_path / "day_0.tsv", TSV_ROWS)
    (batch,) = list(DataReader(path, ReaderConfig(batch_size=8)).epoch(0))
    assert len(batch) == 3
    assert batch.labels.dtype == np.float32 and batch.labels.tolist() == [1.0, 0.0, 0.0]
    assert batch.dense.dtype == np.float32 and batch.dense.shape == (3, 13)
    np.testing.assert_allclose(batch.dense[0, :4], np.log1p([5, 0, 0, 0]), rtol=1e-6)  # -1 -> 0
    np.testing.assert_allclose(batch.dense[1, :4], np.log1p([0, 2, 7, 0]), rtol=1e-6)
    assert set(batch.sparse) == set(CRITEO_SPARSE)
    for name, ids in batch.sparse.items():
        j = 14 + CRITEO_SPARSE.index(name)
        assert ids.dtype == np.int64 and ids.shape == (3,)
        assert ids.tolist() == [reference_hash(r[j], name) for r in TSV_ROWS]
    assert batch.sparse["C1"][0] == batch.sparse["C1"][2]  # hex digits ignore case
    assert batch.sparse["C2"][0] == missing_id("C2")


def test_tsv_and_parquet_give_the_same_batches(tmp_path: Path) -> None:
    table = _criteo_table(300, seed=3)
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=64)
    columns = [table.column(c).to_pylist() for c in table.column_names]
    rows = [[str(int(r[0]))] + ["" if v is None else str(v) for v in r[1:]] for r in zip(*columns)]
    _write_tsv(tmp_path / "a.tsv", rows)
    cfg = ReaderConfig(batch_size=128)
    from_pq = list(DataReader(tmp_path / "a.parquet", cfg).epoch(0))
    from_tsv = list(
        DataReader(tmp_path / "a.tsv", ReaderConfig(batch_size=128, tsv_block_bytes=4096)).epoch(0)
    )
    assert [len(b) for b in from_pq] == [len(b) for b in from_tsv] == [128, 128, 44]
    for a, b in zip(from_pq, from_tsv):
        _assert_batches_equal(a, b)


def test_int64_and_hex_string_parquet_agree(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "i").mkdir()
    pq.write_table(_criteo_table(200, seed=4, strings=True), tmp_path / "s" / "x.parquet")
    pq.write_table(_criteo_table(200, seed=4, strings=False), tmp_path / "i" / "x.parquet")
    cfg = ReaderConfig(batch_size=64)
    for a, b in zip(DataReader(tmp_path / "s", cfg), DataReader(tmp_path / "i", cfg)):
        _assert_batches_equal(a, b)


def _assert_batches_equal(a: Batch, b: Batch) -> None:
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.dense, b.dense)
    assert a.sparse.keys() == b.sparse.keys()
    for k in a.sparse:
        np.testing.assert_array_equal(a.sparse[k], b.sparse[k])
    for k in a.jagged:
        np.testing.assert_array_equal(a.jagged[k].values, b.jagged[k].values)
        np.testing.assert_array_equal(a.jagged[k].offsets, b.jagged[k].offsets)


def test_batches_are_fixed_size_and_bounded(tmp_path: Path) -> None:
    pq.write_table(_criteo_table(1000), tmp_path / "a.parquet", row_group_size=300)
    cfg = ReaderConfig(batch_size=64, read_batch_rows=50)
    reader = DataReader(tmp_path, cfg)
    assert all(rb.num_rows <= 50 for rb in reader.record_batches(reader.plan(0)))
    sizes = [len(b) for b in reader.epoch(0)]
    assert sizes == [64] * 15 + [40]
    dropped = DataReader(tmp_path, ReaderConfig(batch_size=64, read_batch_rows=50, drop_last=True))
    assert [len(b) for b in dropped.epoch(0)] == [64] * 15
    b = next(iter(reader))
    assert (b.labels.dtype, b.labels.shape) == (np.float32, (64,))
    assert (b.dense.dtype, b.dense.shape) == (np.float32, (64, 13))
    assert all(v.dtype == np.int64 and v.shape == (64,) for v in b.sparse.values())


def test_tsv_streams_in_small_blocks(tmp_path: Path) -> None:
    path = _write_tsv(tmp_path / "big.txt", TSV_ROWS * 200)
    reader = DataReader(path, ReaderConfig(batch_size=100, tsv_block_bytes=2048))
    blocks = list(reader.record_batches(reader.plan(0)))
    assert len(blocks) > 10 and max(rb.num_rows for rb in blocks) < 100
    assert [len(b) for b in reader.epoch(0)] == [100] * 6


def test_multi_id_list_column_gives_values_and_offsets(tmp_path: Path) -> None:
    lists = [[1, 2], None, [], [3], [4, 5, 6], [7], None, [8, 9]]
    t = pa.table(
        {
            "label": pa.array(np.arange(8, dtype=np.float32)),
            "I1": pa.array(np.arange(8)),
            "C1": pa.array(np.arange(8)),
            "tags": pa.array(lists, pa.list_(pa.int64())),
        }
    )
    pq.write_table(t, tmp_path / "m.parquet", row_group_size=3)
    cfg = ReaderConfig(
        batch_size=3,
        dense_features=("I1",),
        sparse_features=("C1",),
        multi_id_features=("tags",),
        read_batch_rows=2,
    )
    batches = list(DataReader(tmp_path, cfg).epoch(0))
    got = [
        b.jagged["tags"]
        .values[b.jagged["tags"].offsets[i] : b.jagged["tags"].offsets[i + 1]]
        .tolist()
        for b in batches
        for i in range(len(b))
    ]
    want = [[reference_hash(v, "tags") for v in (row or [])] for row in lists]
    assert got == want
    assert all(b.jagged["tags"].offsets[0] == 0 for b in batches)
    assert batches[0].jagged["tags"].lengths.tolist() == [2, 0, 0]
    # Shuffling permutes rows and their id lists together.
    shuffled = DataReader(tmp_path, cfg.replace(shuffle_buffer_rows=4))
    pairs = sorted(
        (int(b.labels[i]), b.jagged["tags"].take(np.array([i])).values.tolist())
        for b in shuffled.epoch(0)
        for i in range(len(b))
    )
    assert pairs == [(i, w) for i, w in enumerate(want)]


def test_jagged_take_concat_slice() -> None:
    j = JaggedIds(np.arange(6, dtype=np.int64), np.array([0, 2, 2, 5, 6]))
    t = j.take(np.array([3, 0, 2]))
    assert t.values.tolist() == [5, 0, 1, 2, 3, 4] and t.offsets.tolist() == [0, 1, 3, 6]
    s = j.slice(1, 3)
    assert s.values.tolist() == [2, 3, 4] and s.offsets.tolist() == [0, 0, 3]
    c = JaggedIds.concat([s, j.slice(0, 1)])
    assert c.values.tolist() == [2, 3, 4, 0, 1] and c.offsets.tolist() == [0, 0, 3, 5]


# ---------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(
    ("rows_per_file", "row_group_rows", "world", "mode"),
    [
        ([40, 23, 31, 5], 100, 3, "file"),  # 4 files >= 3 ranks
        ([40, 23, 31, 5], 100, 4, "file"),
        ([95], 10, 4, "row_group"),  # one file, 10 row groups
        ([30, 20], 7, 5, "row_group"),
        ([101], 1000, 3, "row"),  # one file, one row group: interleaved row blocks
        ([13, 20], 1000, 4, "row"),
    ],
)
def test_every_row_is_read_by_exactly_one_rank(
    tmp_path: Path, rows_per_file: list[int], row_group_rows: int, world: int, mode: str
) -> None:
    _rowid_dataset(tmp_path, rows_per_file, row_group_rows)
    cfg = ROWID_CFG.replace(interleave_rows=6, read_batch_rows=8)
    seen: list[int] = []
    for rank in range(world):
        reader = DataReader(tmp_path, cfg, rank=rank, world_size=world)
        plan = reader.plan(0)
        assert plan.mode == mode
        mine = _rows_seen(reader)
        assert plan.num_rows == len(mine)
        assert mine == _rows_seen(reader)  # deterministic
        seen += mine
    assert sorted(seen) == list(range(sum(rows_per_file)))


def test_tsv_row_interleaving_covers_every_row(tmp_path: Path) -> None:
    rows = [[str(i % 2), str(i)] + ["1"] * 12 + [f"{i:08x}"] * 26 for i in range(250)]
    _write_tsv(tmp_path / "a.tsv", rows[:120])
    _write_tsv(tmp_path / "b.tsv", rows[120:])
    cfg = ReaderConfig(batch_size=16, interleave_rows=10, tsv_block_bytes=1 << 12)
    back = {int(h): i for i, h in enumerate(hash_int_ids(np.arange(250), "C1"))}
    seen = []
    for rank in range(3):
        reader = DataReader(tmp_path, cfg, rank=rank, world_size=3)
        assert reader.plan(0).mode == "row" and reader.plan(0).num_rows is None
        seen += [back[int(h)] for b in reader.epoch(0) for h in b.sparse["C1"]]
    assert sorted(seen) == list(range(250))


def test_shuffling_is_deterministic_per_seed_and_epoch(tmp_path: Path) -> None:
    _rowid_dataset(tmp_path, [50, 50, 50, 50], 10)
    cfg = ROWID_CFG.replace(shuffle_files=True, shuffle_buffer_rows=30)
    reader = DataReader(tmp_path, cfg, rank=1, world_size=2)
    e0, e0_again, e1 = _rows_seen(reader, 0), _rows_seen(reader, 0), _rows_seen(reader, 1)
    assert e0 == e0_again and e0 != e1
    assert sorted(e0) != list(range(len(e0)))  # rows really moved
    other = DataReader(tmp_path, cfg.replace(seed=1), rank=1, world_size=2)
    assert _rows_seen(other, 0) != e0
    # Within one epoch the ranks still split the rows exactly.
    r0 = DataReader(tmp_path, cfg, rank=0, world_size=2)
    assert sorted(_rows_seen(r0, 1) + e1) == list(range(200))


def test_plan_is_a_value() -> None:
    files = [DataFile(f"f{i}", "parquet", (10, 10, 5)) for i in range(2)]
    plan = plan_shards(files, 1, 3)
    assert plan.mode == "row_group"
    assert [(u.file.path, u.row_group) for u in plan.units] == [("f0", 1), ("f1", 1)]
    assert plan.num_rows == 20
    assert plan_shards(files, 0, 2, order_seed=5) == plan_shards(files, 0, 2, order_seed=5)


# ---------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_typed_errors(tmp_path: Path) -> None:
    _rowid_dataset(tmp_path, [10], 10)
    with pytest.raises(ConfigError, match="lacks column"):
        list(DataReader(tmp_path, ReaderConfig()))
    with pytest.raises(ConfigError, match="rank"):
        DataReader(tmp_path, ROWID_CFG, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        ReaderConfig(batch_size=0)
    with pytest.raises(ConfigError, match="more than once"):
        ReaderConfig(sparse_features=("C1", "C1"))
    with pytest.raises(ConfigError, match="does not exist"):
        DataReader(tmp_path / "nope", ROWID_CFG)
    with pytest.raises(ConfigError, match="no data files"):
        DataReader((tmp_path / "empty").mkdir() or tmp_path / "empty", ROWID_CFG)
    pq.write_table(
        pa.table({"label": [1.0, None], "I1": [1, 2], "rowid": [1, 2]}), tmp_path / "n.parquet"
    )
    with pytest.raises(InvalidArgumentError, match="nulls"):
        list(DataReader(tmp_path / "n.parquet", ROWID_CFG))


def test_reader_modules_import_no_torch_or_ray() -> None:
    code = (
        "import sys, json; import recps.worker.data, recps.worker.synth, recps.cli.data_cmds; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert not loaded & {"torch", "ray", "grpc"}, loaded & {"torch", "ray", "grpc"}


@pytest.mark.parametrize("module", ["recps.worker.data", "recps.worker.eval_metrics"])
def test_docstring_examples(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
