"""Malformed input, closed stores, mismatched reopen and bad checkpoints, for both stores.

Every rejection must be a specific ``RecpsError`` subclass whose message names the problem,
and must leave the store exactly as it was.
"""

from __future__ import annotations

import numpy as np
import pytest

from recps.embedding import (
    CheckpointError,
    ConfigError,
    DimensionMismatchError,
    DtypeError,
    ExpiryConfig,
    InvalidArgumentError,
    LengthMismatchError,
    MemoryStore,
    NonFiniteGradientError,
    OptimizerConfig,
    RecpsError,
    ShapeError,
    StoreClosedError,
    TableConfig,
    TieredStore,
)
from recps.embedding.config import AdmissionConfig

DIM = 4
CFG = TableConfig(
    "bad_input",
    dim=DIM,
    optimizer=OptimizerConfig("adagrad", lr=0.1),
    expiry=ExpiryConfig(ttl_s=1e6, sweep_interval_s=1e9),  # so expire() is a real call
)
SEEDED = np.array([-(2**63), -5, 0, 3, 2**40, 2**63 - 1], dtype=np.int64)
PROBE = np.concatenate([SEEDED, np.array([7, 8, 9], dtype=np.int64)])


def _new_store(kind: str, make_tiered, clock, cfg: TableConfig = CFG):
    if kind == "memory":
        return MemoryStore(cfg, clock=clock)
    return make_tiered(cfg, clock=clock)


@pytest.fixture(params=["memory", "tiered"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def store(kind, make_tiered, clock):
    """A store holding a few trained rows, some with int64-extreme ids."""
    s = _new_store(kind, make_tiered, clock)
    s.lookup(SEEDED)
    g = np.linspace(-1, 1, len(SEEDED) * DIM, dtype=np.float32).reshape(len(SEEDED), DIM)
    assert s.apply_gradients(SEEDED, g) == len(SEEDED)
    yield s
    s.close()


def snapshot(store) -> dict[str, object]:
    rows = list(store.items())
    return {
        "ids": np.concatenate([b.ids for b in rows]),
        "weights": np.concatenate([b.weights for b in rows]),
        "state": np.concatenate([b.state for b in rows]),
        "count": np.concatenate([b.count for b in rows]),
        "updated_at": np.concatenate([b.updated_at for b in rows]),
        "probe": store.lookup(PROBE, create_missing=False),
        "rows": store.stats().rows,
    }


def assert_unchanged(before: dict[str, object], store) -> None:
    after = snapshot(store)
    assert before.keys() == after.keys()
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, after[k]), f"{k} changed by a rejected call"
        else:
            assert v == after[k], f"{k} changed by a rejected call: {v} -> {after[k]}"


def good_grads(n: int) -> np.ndarray:
    return np.full((n, DIM), 0.5, dtype=np.float32)


# ---- ids ---------------------------------------------------------------------------------

BAD_ID_DTYPES = {
    "float64": np.array([1.0, 2.0]),
    "object": np.array([1, 2], dtype=object),
    "uint64": np.array([1, 2**64 - 1], dtype=np.uint64),  # would wrap to -1 if cast
    "bool": np.array([True, False]),
    "int64-big-endian": np.array([1, 2], dtype=">i8"),
}


@pytest.mark.parametrize("name", BAD_ID_DTYPES)
@pytest.mark.parametrize("call", ["lookup", "apply_gradients"])
def test_ids_with_wrong_dtype_raise_dtype_error(store, name, call) -> None:
    ids = BAD_ID_DTYPES[name]
    before = snapshot(store)
    with pytest.raises(DtypeError) as e:
        if call == "lookup":
            store.lookup(ids)
        else:
            store.apply_gradients(ids, good_grads(len(ids)))
    assert e.value.what == "ids"
    assert "ids" in str(e.value) and str(ids.dtype) in str(e.value) and "int64" in str(e.value)
    assert e.value.status == "INVALID_ARGUMENT"
    assert_unchanged(before, store)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32])
def test_narrow_integer_ids_are_widened_losslessly(store, dtype) -> None:
    ids = np.array([0, 3, np.iinfo(dtype).max, np.iinfo(dtype).min], dtype=dtype)
    got = store.lookup(ids, create_missing=False)
    want = store.lookup(ids.astype(np.int64), create_missing=False)
    assert np.array_equal(got, want)


def test_ids_as_python_list_raise_dtype_error(store) -> None:
    before = snapshot(store)
    with pytest.raises(DtypeError, match=r"ids has dtype list, expected a numpy int64 array"):
        store.lookup([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(DtypeError, match="ids"):
        store.apply_gradients([1, 2], good_grads(2))  # type: ignore[arg-type]
    assert_unchanged(before, store)


@pytest.mark.parametrize(
    "ids", [np.zeros((2, 3), np.int64), np.array(5, dtype=np.int64)], ids=["2d", "0d"]
)
def test_ids_not_1d_raise_shape_error(store, ids) -> None:
    before = snapshot(store)
    with pytest.raises(ShapeError) as e:
        store.lookup(ids)
    assert type(e.value) is ShapeError
    assert "1-D" in str(e.value) and str(ids.shape) in str(e.value)
    with pytest.raises(ShapeError):
        store.apply_gradients(ids, good_grads(ids.size))
    assert_unchanged(before, store)


def test_strided_and_empty_ids_are_fine(store) -> None:
    ids = np.arange(20, dtype=np.int64)[::3]
    assert not ids.flags.c_contiguous
    assert np.array_equal(store.lookup(ids), store.lookup(ids.copy()))
    assert store.lookup(np.empty(0, np.int64)).shape == (0, DIM)
    assert store.apply_gradients(np.empty(0, np.int64), np.empty((0, DIM), np.float32)) == 0


# ---- gradients ---------------------------------------------------------------------------


def test_grads_with_wrong_dim_raise_dimension_mismatch(store) -> None:
    before = snapshot(store)
    with pytest.raises(DimensionMismatchError) as e:
        store.apply_gradients(SEEDED[:2], np.ones((2, DIM + 3), np.float32))
    assert (e.value.what, e.value.expected, e.value.got) == ("grads", DIM, DIM + 3)
    assert str(e.value) == f"grads has dim {DIM + 3}, table expects {DIM}"
    assert isinstance(e.value, ShapeError) and isinstance(e.value, RecpsError)
    assert_unchanged(before, store)


def test_grads_1d_raise_shape_error(store) -> None:
    before = snapshot(store)
    with pytest.raises(ShapeError) as e:
        store.apply_gradients(SEEDED[:1], np.ones(DIM, np.float32))
    assert type(e.value) is ShapeError, "a 1-D gradient is not a dimension/length mismatch"
    assert "2-D" in str(e.value) and f"({DIM},)" in str(e.value)
    assert_unchanged(before, store)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, object])
def test_grads_non_float_raise_dtype_error(store, dtype) -> None:
    before = snapshot(store)
    with pytest.raises(DtypeError) as e:
        store.apply_gradients(SEEDED[:2], np.ones((2, DIM), dtype=dtype))
    assert e.value.what == "grads" and "float32" in str(e.value)
    assert_unchanged(before, store)


def test_grads_as_python_list_raise_dtype_error(store) -> None:
    with pytest.raises(DtypeError, match="grads has dtype list"):
        store.apply_gradients(SEEDED[:1], [[0.0] * DIM])  # type: ignore[arg-type]


@pytest.mark.parametrize("n_grads", [0, 2, 4])
def test_mismatched_lengths_raise_length_mismatch(store, n_grads) -> None:
    before = snapshot(store)
    with pytest.raises(LengthMismatchError) as e:
        store.apply_gradients(SEEDED[:3], good_grads(n_grads))
    assert (e.value.ids, e.value.rows) == (3, n_grads)
    assert f"3 ids but {n_grads} gradient rows" in str(e.value)
    assert_unchanged(before, store)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, ">f4"])
def test_other_float_grads_are_converted(kind, make_tiered, clock, dtype) -> None:
    a, b = _new_store(kind, make_tiered, clock), _new_store(kind, make_tiered, clock)
    g = np.array([[0.5, -0.25, 1.0, 2.0]], dtype=dtype)
    ids = np.array([11], np.int64)
    assert a.apply_gradients(ids, g) == 1
    assert b.apply_gradients(ids, g.astype(np.float32)) == 1
    assert np.array_equal(a.lookup(ids), b.lookup(ids))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_grads_rejected_and_store_unchanged(store, bad) -> None:
    before = snapshot(store)
    pushes = store.stats().pushes
    g = good_grads(len(SEEDED))
    g[1, 2] = bad
    g[4, 0] = bad
    with pytest.raises(NonFiniteGradientError) as e:
        store.apply_gradients(SEEDED, g)
    assert e.value.bad_rows == 2 and e.value.table == CFG.name
    assert "2 gradient row(s) contain NaN or Inf" in str(e.value)
    assert isinstance(e.value, InvalidArgumentError) and e.value.status == "INVALID_ARGUMENT"
    assert_unchanged(before, store)
    assert store.stats().pushes == pushes


def test_float64_grad_overflowing_float32_is_nonfinite(store) -> None:
    """1e39 is finite in float64 but inf once stored as float32: rejected, not applied."""
    before = snapshot(store)
    g = np.full((1, DIM), 1e39, dtype=np.float64)
    with pytest.raises(NonFiniteGradientError):
        store.apply_gradients(SEEDED[:1], g)
    assert_unchanged(before, store)


def test_nonfinite_grads_skipped_drop_only_bad_rows(kind, make_tiered, clock) -> None:
    cfg = CFG.replace(nonfinite="skip")
    store = _new_store(kind, make_tiered, clock, cfg)
    ref = MemoryStore(cfg, clock=clock)
    ids = np.array([1, 2, 3, 2, 5, 6], dtype=np.int64)  # id 2 twice: one good row, one bad
    g = np.arange(len(ids) * DIM, dtype=np.float32).reshape(len(ids), DIM) / 10
    g[3, 1] = np.nan  # the second row for id 2
    g[5, :] = np.inf  # id 6 has only a bad row
    store.lookup(ids)
    ref.lookup(ids)
    good = np.isfinite(g).all(axis=1)

    assert store.apply_gradients(ids, g) == 4  # ids 1, 2, 3, 5
    assert ref.apply_gradients(ids[good], g[good]) == 4
    assert store.stats().nonfinite_skipped == 2
    assert store.stats().pushes == 1
    got, want = snapshot(store), snapshot(ref)
    for k in ("ids", "weights", "state", "count", "probe"):
        assert np.array_equal(got[k], want[k]), k
    counts = dict(zip(got["ids"].tolist(), got["count"].tolist()))
    assert counts == {1: 1, 2: 1, 3: 1, 5: 1, 6: 0}

    # A batch that is entirely bad applies nothing and counts every row.
    assert store.apply_gradients(ids[:2], np.full((2, DIM), np.nan, np.float32)) == 0
    assert store.stats().nonfinite_skipped == 4


# ---- closed stores -----------------------------------------------------------------------


def test_closed_store_raises_store_closed(store, tmp_path) -> None:
    ckpt = tmp_path / "ckpt-before-close"
    store.checkpoint(ckpt)
    store.close()
    store.close()  # idempotent
    calls = {
        "lookup": lambda: store.lookup(SEEDED),
        "lookup(peek)": lambda: store.lookup(SEEDED, create_missing=False),
        "apply_gradients": lambda: store.apply_gradients(SEEDED, good_grads(len(SEEDED))),
        "flush": store.flush,
        "checkpoint": lambda: store.checkpoint(tmp_path / "ckpt-after-close"),
        "restore": lambda: store.restore(ckpt),
        "expire": store.expire,
    }
    for name, call in calls.items():
        with pytest.raises(StoreClosedError, match=f"store for table '{CFG.name}' is closed"):
            call()
        assert StoreClosedError.status == "FAILED_PRECONDITION", name


@pytest.mark.parametrize(
    "kind",
    [
        "memory",
        "tiered",
    ],
)
def test_items_on_closed_store_raises_store_closed(store) -> None:
    store.close()
    with pytest.raises(StoreClosedError):
        list(store.items())


@pytest.mark.parametrize(
    "kind",
    [
        "memory",
        "tiered",
    ],
)
def test_stats_on_closed_store_is_a_recps_error_or_stats(store) -> None:
    store.close()
    try:
        stats = store.stats()
    except StoreClosedError:
        return
    assert stats.table == CFG.name
    assert len(store) == stats.rows


@pytest.mark.parametrize(
    "kind",
    [
        "memory",
        "tiered",
    ],
)
def test_policy_changes_on_closed_store_raise_store_closed(store) -> None:
    store.close()
    for call in (
        lambda: store.set_admission(AdmissionConfig(min_count=2)),
        lambda: store.set_expiry(ExpiryConfig(ttl_s=5.0)),
    ):
        with pytest.raises(StoreClosedError):
            call()


# ---- reopening with a different layout ---------------------------------------------------


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"dim": DIM * 2}, "dim=4, not 8"),
        ({"dtype": "float16"}, "dtype='float32', not 'float16'"),
        ({"optimizer": OptimizerConfig("adam")}, "stores adagrad optimizer state"),
    ],
    ids=["dim", "dtype", "optimizer"],
)
def test_reopen_tiered_with_different_layout_raises_config_error(
    make_tiered, clock, tmp_path, change, needle
) -> None:
    path = tmp_path / "reopen"
    s = make_tiered(CFG, path=path, clock=clock)
    s.apply_gradients(SEEDED, good_grads(len(SEEDED)))
    want = snapshot(s)
    s.close()
    with pytest.raises(ConfigError, match=needle):
        TieredStore(path, CFG.replace(**change), clock=clock)
    # The rejected open must not have rewritten the stored config or rows.
    del want["rows"]  # stats counters of a fresh store start from zero anyway
    s2 = make_tiered(CFG, path=path, clock=clock)
    got = snapshot(s2)
    for k, v in want.items():
        assert np.array_equal(v, got[k]), k


def test_failed_reopen_does_not_hold_the_rocksdb_lock(make_tiered, clock, tmp_path) -> None:
    path = tmp_path / "reopen"
    make_tiered(CFG, path=path, clock=clock).close()
    # Keep the exception alive, as a logger or an error report would.
    with pytest.raises(ConfigError) as excinfo:
        TieredStore(path, CFG.replace(dim=DIM * 2), clock=clock)
    s = make_tiered(CFG, path=path, clock=clock)
    assert s.lookup(SEEDED).shape == (len(SEEDED), DIM)
    assert excinfo.value is not None


# ---- restore from something that is not a matching checkpoint ---------------------------


@pytest.mark.parametrize("what", ["missing", "empty", "other-store-kind"])
def test_restore_from_non_checkpoint_raises_checkpoint_error(
    store, kind, tmp_path, make_tiered, clock, what
) -> None:
    target = tmp_path / f"not-a-checkpoint-{what}"
    if what == "empty":
        target.mkdir()
    elif what == "other-store-kind":
        other = _new_store("tiered" if kind == "memory" else "memory", make_tiered, clock)
        other.apply_gradients(SEEDED, good_grads(len(SEEDED)))
        other.checkpoint(target)
    before = snapshot(store)
    with pytest.raises(CheckpointError) as e:
        store.restore(target)
    assert str(target) in str(e.value)
    assert_unchanged(before, store)


@pytest.mark.parametrize(
    "kind",
    [
        "memory",
        "tiered",
    ],
)
def test_restore_from_truncated_checkpoint_raises_checkpoint_error(store, tmp_path, kind) -> None:
    ckpt = store.checkpoint(tmp_path / "to-truncate")
    victim = ckpt / ("memory_store.npz" if kind == "memory" else "manifest.json")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    before = snapshot(store)
    with pytest.raises(CheckpointError):
        store.restore(ckpt)
    assert_unchanged(before, store)


def test_restore_tiered_checkpoint_without_data_files_raises(make_tiered, clock, tmp_path) -> None:
    s = make_tiered(CFG, clock=clock)
    s.apply_gradients(SEEDED, good_grads(len(SEEDED)))
    ckpt = s.checkpoint(tmp_path / "ckpt")
    for f in (ckpt / "rocksdb").iterdir():  # e.g. a copy that carried only the manifest
        f.unlink()
    before = snapshot(s)
    with pytest.raises(CheckpointError):
        s.restore(ckpt)
    assert_unchanged(before, s)


def _checkpoint_of(kind, make_tiered, clock, tmp_path, cfg: TableConfig):
    other = _new_store(kind, make_tiered, clock, cfg)
    ids = np.array([100, 101], np.int64)
    other.apply_gradients(ids, np.ones((2, cfg.dim), np.float32))
    return other.checkpoint(tmp_path / f"ckpt-{kind}-{cfg.dim}-{cfg.optimizer.kind}")


@pytest.mark.parametrize(
    "kind",
    [
        "memory",
        "tiered",
    ],
)
def test_restore_checkpoint_with_other_dim_raises_and_keeps_store(
    store, kind, make_tiered, clock, tmp_path
) -> None:
    ckpt = _checkpoint_of(kind, make_tiered, clock, tmp_path, CFG.replace(dim=DIM * 2))
    before = snapshot(store)
    with pytest.raises(CheckpointError, match="dim"):
        store.restore(ckpt)
    assert_unchanged(before, store)


@pytest.mark.parametrize(
    "kind",
    [
        "memory",
        "tiered",
    ],
)
def test_restore_checkpoint_with_other_optimizer_raises_and_keeps_store(
    store, kind, make_tiered, clock, tmp_path
) -> None:
    ckpt = _checkpoint_of(
        kind, make_tiered, clock, tmp_path, CFG.replace(optimizer=OptimizerConfig("adam"))
    )
    before = snapshot(store)
    with pytest.raises(CheckpointError, match=r"optimizer|adam"):
        store.restore(ckpt)
    assert_unchanged(before, store)
    if kind == "tiered":
        path = store.path
        store.close()
        reopened = make_tiered(CFG, path=path, clock=clock)
        assert np.array_equal(snapshot(reopened)["weights"], before["weights"])


def test_checkpoint_into_non_empty_directory_is_refused_by_tiered(
    make_tiered, clock, tmp_path
) -> None:
    s = make_tiered(CFG, clock=clock)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("someone else's file")
    with pytest.raises(CheckpointError, match="not empty"):
        s.checkpoint(target)
    assert (target / "keep.txt").read_text() == "someone else's file"


def test_every_error_type_is_a_recps_error() -> None:
    for err in (
        DtypeError("ids", "float64", "int64"),
        ShapeError("x"),
        DimensionMismatchError("grads", 4, 8),
        LengthMismatchError(3, 2),
        NonFiniteGradientError("t", 1),
        StoreClosedError("t"),
        CheckpointError("x"),
        ConfigError("x"),
    ):
        assert isinstance(err, RecpsError), type(err)
        assert isinstance(err.status, str) and err.status.isupper()
