"""The serving model format: key/row codecs, SST files, versions and the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recps.embedding.errors import InvalidArgumentError, RecpsError
from recps.embedding.rowcodec import encode_keys as store_encode_keys
from recps.ps.routing import ShardMap
from recps.serving import model_format as mf

_ids = hnp.arrays(
    np.int64,
    st.integers(0, 64),
    elements=st.integers(-(1 << 63), (1 << 63) - 1),
)
_finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@given(_ids)
def test_keys_round_trip_and_sort_like_signed_ids(ids: np.ndarray) -> None:
    keys = mf.encode_keys(ids)
    assert all(len(k) == 8 for k in keys)
    np.testing.assert_array_equal(mf.decode_keys(keys), ids)
    assert keys == store_encode_keys(ids)  # the same key the training store uses
    order = sorted(range(len(ids)), key=lambda i: keys[i])
    assert ids[order].tolist() == sorted(ids.tolist())


def test_keys_of_extremes_and_negatives() -> None:
    ids = np.array([-(1 << 63), -1, 0, 1, (1 << 63) - 1], dtype=np.int64)
    keys = mf.encode_keys(ids)
    assert keys[0] == b"\x00" * 8 and keys[-1] == b"\xff" * 8
    assert keys == sorted(keys)
    np.testing.assert_array_equal(mf.decode_keys(b"".join(keys)), ids)
    with pytest.raises(InvalidArgumentError):
        mf.decode_keys(b"\x00" * 7)


@settings(max_examples=60)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=20).filter(
            lambda s: s[1] > 0
        ),
        elements=_finite,
    )
)
def test_rows_round_trip_in_every_format(rows: np.ndarray) -> None:
    dim = rows.shape[1]
    f32 = mf.decode_rows(mf.encode_rows(rows, "float32"), dim, "float32")
    np.testing.assert_array_equal(f32, rows)
    f16 = mf.decode_rows(mf.encode_rows(rows, "float16"), dim, "float16")
    np.testing.assert_array_equal(f16, rows.astype(np.float16).astype(np.float32))
    values = mf.encode_rows(rows, "int8")
    assert all(len(v) == mf.row_bytes(dim, "int8") for v in values)
    i8 = mf.decode_rows(values, dim, "int8")
    assert i8.dtype == np.float32 and i8.shape == rows.shape
    # Per-row bound: half a quantization step (max|x| / 127 / 2), plus float32 rounding.
    step = np.abs(rows).max(axis=1, initial=0.0) / 127.0
    err = np.abs(i8 - rows).max(axis=1, initial=0.0)
    assert (err <= step / 2 + 1e-6 * (1 + np.abs(rows).max(axis=1, initial=0.0))).all()


def test_int8_layout_scale_then_values_and_zero_row() -> None:
    rows = np.array([[0.0, 0.0, 0.0], [127.0, -63.5, 1.0]], dtype=np.float32)
    v0, v1 = mf.encode_rows(rows, "int8")
    assert v0 == b"\x00" * 7  # an all-zero row has scale 0 and q 0
    assert np.frombuffer(v1[:4], "<f4")[0] == 1.0
    assert np.frombuffer(v1[4:], np.int8).tolist() == [127, -64, 1]  # rint: half to even


def test_bad_rows_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="NaN"):
        mf.encode_rows(np.array([[np.nan]], np.float32), "float32")
    with pytest.raises(InvalidArgumentError, match="row_format"):
        mf.encode_rows(np.zeros((1, 2), np.float32), "bf16")
    with pytest.raises(InvalidArgumentError, match="multiple"):
        mf.decode_rows(b"\x00" * 5, 2, "float16")


def test_write_sst_round_trip_and_refusals(tmp_path: Path) -> None:
    ids = np.array([-(1 << 63), -3, 0, 9, (1 << 63) - 1], dtype=np.int64)  # no diff overflow
    rows = np.arange(5 * 4, dtype=np.float32).reshape(5, 4) - 7
    for fmt in mf.ROW_FORMATS:
        path = tmp_path / f"{fmt}.sst"
        assert mf.write_sst(path, ids, rows, fmt) == 5
        got_ids, got_rows = mf.read_sst(path, 4, fmt)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got_rows, rows, atol=0.1 if fmt == "int8" else 0)
    assert mf.write_sst(tmp_path / "empty.sst", ids[:0], rows[:0], "float32") == 0
    assert not (tmp_path / "empty.sst").exists()
    with pytest.raises(InvalidArgumentError, match="increasing"):
        mf.write_sst(tmp_path / "bad.sst", ids[::-1], rows, "float32")
    with pytest.raises(InvalidArgumentError, match="increasing"):
        mf.write_sst(tmp_path / "dup.sst", np.array([1, 1]), rows[:2], "float32")


def test_sst_relpaths() -> None:
    rel = mf.sst_relpath("C1", 2, 0)
    assert rel == "tables/C1/shard-2-part-0.sst"
    assert mf.parse_sst_relpath(rel) == ("C1", 2, 0)
    assert mf.parse_sst_relpath(mf.TOWER_FILE) is None


def _manifest(vdir: Path) -> mf.ModelManifest:
    rel = mf.sst_relpath("C1", 0, 0)
    (vdir / rel).parent.mkdir(parents=True)
    ids = np.array([1, 2], dtype=np.int64)
    mf.write_sst(vdir / rel, ids, np.ones((2, 4), np.float32), "float32")
    files = {
        rel: mf.FileEntry(
            bytes=(vdir / rel).stat().st_size, sha256=mf.file_sha256(vdir / rel), rows=2
        )
    }
    return mf.ModelManifest(
        version=int(vdir.name),
        created_at=1.0,
        source_checkpoint="/ckpt/step-00000007",
        step=7,
        model={"kind": "dlrm"},
        dense_features=("I1",),
        features=(mf.FeatureSpec("C1", "C1", "C1"),),
        hashing={"scheme": "x", "salts": {"C1": 1}},
        tables={"C1": mf.TableSpec(dim=4, train_dtype="float32", row_format="float32", rows=2)},
        shard_map=ShardMap.even(["serving-0"], num_slots=16),
        files=files,
    )


def test_manifest_round_trip_versions_and_corruption(tmp_path: Path) -> None:
    vdir = mf.version_dir(tmp_path, 7)
    assert vdir.name == "000000000007"
    m = _manifest(vdir)
    (vdir / mf.MANIFEST_FILE).write_text(m.to_json())
    # Without COMPLETE the version is invisible and refuses to load.
    assert mf.list_versions(tmp_path) == [] and mf.latest_version(tmp_path) is None
    with pytest.raises(mf.IncompleteModelError):
        mf.ModelManifest.load(vdir)
    (vdir / mf.COMPLETE_FILE).write_text("")
    (tmp_path / ".tmp-9-123").mkdir()
    (tmp_path / "000000000003").mkdir()  # partial: no COMPLETE
    assert mf.list_versions(tmp_path) == [7] and mf.latest_version(tmp_path) == 7

    loaded = mf.ModelManifest.load(vdir)
    assert loaded == m and loaded.path == vdir
    assert json.loads(loaded.to_json()) == json.loads(m.to_json())
    assert loaded.sst_files("C1") == ["tables/C1/shard-0-part-0.sst"]
    assert loaded.sst_files("C1", shard=1) == []

    sst = vdir / "tables/C1/shard-0-part-0.sst"
    data = bytearray(sst.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    sst.write_bytes(bytes(data))
    with pytest.raises(mf.ChecksumMismatchError, match="sha256") as e:
        mf.ModelManifest.load(vdir)
    assert isinstance(e.value, RecpsError) and e.value.path == "tables/C1/shard-0-part-0.sst"
    mf.ModelManifest.load(vdir, verify=False)  # structure alone still parses
    sst.write_bytes(bytes(data[:-1]))
    with pytest.raises(mf.ChecksumMismatchError, match="bytes"):
        mf.ModelManifest.load(vdir)
    with pytest.raises(mf.ModelNotFoundError):
        mf.ModelManifest.load(tmp_path / "nope")


def test_manifest_rejects_unknown_format_and_malformed(tmp_path: Path) -> None:
    vdir = mf.version_dir(tmp_path, 1)
    d = _manifest(vdir).to_dict()
    with pytest.raises(mf.ModelFormatError, match="format"):
        mf.ModelManifest.from_dict({**d, "format": "other-v9"})
    with pytest.raises(mf.ModelFormatError, match="malformed"):
        mf.ModelManifest.from_dict({k: v for k, v in d.items() if k != "tables"})
    with pytest.raises(InvalidArgumentError):
        mf.version_dir(tmp_path, -1)


def test_sst_writer_streams_batches_and_checks_order_across_them(tmp_path: Path) -> None:
    w = mf.SstWriter(tmp_path / "s.sst", dim=2, row_format="float16")
    w.add(np.array([-7, 3]), np.array([[1, 2], [3, 4]], np.float32))
    w.add(np.array([], np.int64), np.empty((0, 2), np.float32))
    w.add(np.array([4]), np.array([[5, 6]], np.float32))
    with pytest.raises(InvalidArgumentError, match="increasing"):
        w.add(np.array([4, 9]), np.zeros((2, 2), np.float32))  # 4 repeats the last id
    with pytest.raises(InvalidArgumentError, match=r"\[n, 2\]"):
        w.add(np.array([10]), np.zeros((1, 3), np.float32))
    assert w.finish() == 3
    ids, rows = mf.read_sst(tmp_path / "s.sst", 2, "float16")
    assert ids.tolist() == [-7, 3, 4] and rows.tolist() == [[1, 2], [3, 4], [5, 6]]
    empty = mf.SstWriter(tmp_path / "none.sst", dim=2, row_format="int8")
    assert empty.finish() == 0 and not (tmp_path / "none.sst").exists()


def test_docstring_examples_run() -> None:
    import doctest

    from recps.serving import export

    for module in (mf, export):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
