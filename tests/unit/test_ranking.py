"""The Ranker in process: feature hashing as in training, pooling, the tower, bad input.

Embeddings come from a plain function over a dict of rows (the replica path is in
tests/integration/test_ranking_service.py); the model version is a real directory with a
real TorchScript tower and manifest.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import recps.serving.ranking as ranking_module
from recps.embedding import errors as E
from recps.embedding.feature_ids import HASH_SCHEME, dense_transform, hash_column
from recps.ps.routing import ShardMap
from recps.serving.model_format import (
    COMPLETE_FILE,
    MANIFEST_FILE,
    TOWER_FILE,
    FeatureSpec,
    FileEntry,
    ModelManifest,
    TableSpec,
    file_sha256,
    version_dir,
)
from recps.serving.ranking import Ranker, RankerConfig, resolve_version_dir

DIM = {"user": 3, "item": 3, "tags": 2}


class Tower(torch.nn.Module):
    """logit = w . [dense, pooled...] (linear, so the test can compute it by hand)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, width))

    def forward(self, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([dense] + pooled, dim=1)  # noqa: RUF005 (TorchScript has no starred lists)
        return x @ self.w


def make_version(root: Path, version: int) -> Path:
    vdir = version_dir(root, version)
    (vdir / "dense").mkdir(parents=True)
    width = 1 + sum(DIM.values())
    torch.jit.save(torch.jit.script(Tower(width)), str(vdir / TOWER_FILE))
    manifest = ModelManifest(
        version=version,
        created_at=time.time(),
        source_checkpoint="test",
        step=version,
        model={"kind": "test"},
        dense_features=("I1",),
        features=(
            FeatureSpec("user", "user", "user"),
            FeatureSpec("item", "item", "item"),
            FeatureSpec("tags", "tags", "tags", pooling="mean", multi=True),
        ),
        hashing={"scheme": HASH_SCHEME},
        tables={
            t: TableSpec(dim=d, train_dtype="float32", row_format="float32", rows=0)
            for t, d in DIM.items()
        },
        shard_map=ShardMap.even({0: "replica"}, 16),
        files={
            TOWER_FILE: FileEntry(
                bytes=(vdir / TOWER_FILE).stat().st_size, sha256=file_sha256(vdir / TOWER_FILE)
            )
        },
    )
    (vdir / MANIFEST_FILE).write_text(manifest.to_json())
    (vdir / COMPLETE_FILE).write_text("")
    return vdir


class Rows:
    """Deterministic rows per (table, id), and a record of what was asked."""

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        self.shift = 0.0  # change every stored row (as an applied delta would)

    def row(self, table: str, ids: np.ndarray) -> np.ndarray:
        base = (np.abs(ids) % 997).astype(np.float32)[:, None] / 997.0
        return base * np.arange(1, DIM[table] + 1, dtype=np.float32) - 0.3 + self.shift

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append({t: np.asarray(v).copy() for t, v in batch.items()})
        return {t: self.row(t, np.asarray(v)) for t, v in batch.items()}


def by_hand(rows: Rows, ctx: dict, cands: list[dict]) -> np.ndarray:
    w = torch.linspace(-1.0, 1.0, 1 + sum(DIM.values())).numpy()
    out = []
    for c in cands:
        f = {**ctx, **c}
        x = [dense_transform(np.array([f.get("I1", np.nan)], dtype=np.float64))]
        for name in ("user", "item"):
            ids = hash_column(pa.array([f[name]]), name)
            x.append(rows.row(name, ids)[0:1].ravel())
        tags = f.get("tags") or []
        if tags:
            ids = hash_column(pa.array(tags), "tags")
            x.append(rows.row("tags", ids).mean(0))
        else:
            x.append(np.zeros(DIM["tags"], np.float32))
        logit = float(np.concatenate(x) @ w)
        out.append(1 / (1 + np.exp(-logit)))
    return np.array(out, np.float32)


def test_scores_match_a_hand_computation_and_ids_hash_as_in_training(tmp_path: Path) -> None:
    make_version(tmp_path, 3)
    rows = Rows()
    ranker = Ranker(RankerConfig(str(tmp_path)), rows)  # a root: its newest version
    assert ranker.version == 3
    ctx = {"user": "68fd1e64", "I1": 12, "tags": ["a", "b"]}
    cands = [{"item": 5}, {"item": "abc"}, {"item": 5, "I1": None, "tags": []}]
    got = ranker.score(ctx, cands)
    np.testing.assert_allclose(got, by_hand(rows, ctx, cands), rtol=1e-5, atol=1e-6)
    # One deduplicated lookup per request: the context's user id went once.
    (call,) = rows.calls
    assert len(call["user"]) == 1 and len(call["item"]) == 2 and len(call["tags"]) == 2
    # The hex string hashes like the integer it spells, as the training reader does.
    assert call["user"][0] == hash_column(pa.array([0x68FD1E64]), "user")[0]


def test_column_form_equals_row_form_and_numeric_strings_stay_hex(tmp_path: Path) -> None:
    make_version(tmp_path, 1)
    ranker = Ranker(RankerConfig(str(tmp_path)), Rows())
    ctx = {"user": 77, "I1": 3}
    rows = [{"item": "12", "tags": [1, "b"]}, {"item": 12, "I1": 9.5}, {"item": None}]
    cols = {
        "item": ["12", 12, None],
        "tags": [[1, "b"], None, None],
        "I1": [3, 9.5, 3],
    }
    d1, i1 = ranker.featurize(ctx, rows)
    d2, i2 = ranker.featurize_columns(ctx, cols, 3)
    np.testing.assert_array_equal(d1, d2)
    for name in i1:
        np.testing.assert_array_equal(i1[name][0], i2[name][0])
    # "12" is the hex string training reads as 0x12, never the integer twelve.
    item = i1["item"][0]
    assert item[0] == hash_column(pa.array(["12"]), "item")[0] != item[1]
    assert item[0] == hash_column(pa.array([0x12]), "item")[0]
    # The context's user id is hashed once and broadcast.
    assert (i2["user"][0] == hash_column(pa.array([77]), "user")[0]).all()
    with pytest.raises(E.InvalidArgumentError, match="column 'item' has 2 values"):
        ranker.featurize_columns(ctx, {"item": [1, 2]}, 3)


def test_newest_version_is_resolved_and_bad_requests_are_refused(tmp_path: Path) -> None:
    make_version(tmp_path, 1)
    v2 = make_version(tmp_path, 2)
    (tmp_path / ".tmp-3-99").mkdir()  # an export in progress is not a version
    assert resolve_version_dir(tmp_path) == v2
    ranker = Ranker(RankerConfig(str(v2), max_candidates=4), Rows())
    with pytest.raises(E.InvalidArgumentError, match="at least one candidate"):
        ranker.score({"user": 1}, [])
    with pytest.raises(E.InvalidArgumentError, match="at most 4"):
        ranker.score({"user": 1}, [{"item": i} for i in range(5)])
    with pytest.raises(E.InvalidArgumentError, match="takes one value"):
        ranker.score({"user": [1, 2]}, [{"item": 1}])
    with pytest.raises(E.InvalidArgumentError, match="dense feature 'I1'"):
        ranker.score({"user": 1, "I1": "many"}, [{"item": 1}])
    with pytest.raises(E.RecpsError):
        Ranker(RankerConfig(str(tmp_path / "nothing")), Rows())


def test_a_model_hashed_with_another_scheme_is_refused(tmp_path: Path) -> None:
    vdir = make_version(tmp_path, 1)
    m = (vdir / MANIFEST_FILE).read_text().replace(HASH_SCHEME, "other-scheme-v9")
    (vdir / MANIFEST_FILE).write_text(m)
    with pytest.raises(E.ConfigError, match="other-scheme-v9"):
        Ranker(RankerConfig(str(vdir)), Rows())


def test_the_near_cache_answers_repeats_without_a_lookup_until_its_ttl(tmp_path: Path) -> None:
    make_version(tmp_path, 1)
    rows = Rows()
    ttl = 0.5
    cfg = RankerConfig(str(tmp_path), near_cache_rows=64, near_cache_ttl_s=ttl)
    ranker = Ranker(cfg, rows)  # tables of dims 3, 3 and 2: two caches
    ctx = {"user": "68fd1e64", "I1": 12, "tags": ["a", "b"]}
    cands = [{"item": 5}, {"item": "abc"}, {"item": 7, "tags": ["c"]}]
    want = by_hand(rows, ctx, cands)
    t0 = time.monotonic()
    np.testing.assert_allclose(ranker.score(ctx, cands), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ranker.score(ctx, cands), want, rtol=1e-5, atol=1e-6)
    assert len(rows.calls) == 1, "the repeat was answered from the near cache"
    # One new item: only its row is fetched.
    more = [*cands, {"item": 11}]
    np.testing.assert_allclose(
        ranker.score(ctx, more), by_hand(rows, ctx, more), rtol=1e-5, atol=1e-6
    )
    assert {t: v.tolist() for t, v in rows.calls[-1].items()} == {
        "item": hash_column(pa.array([11]), "item").tolist()
    }
    st = ranker.near_cache_stats()
    assert st is not None and st.rows == 8 and st.hits >= 7 + 7 and st.misses == 7 + 1
    # The replicas' rows change: the cache serves the old ones until they are ttl old.
    rows.shift = 0.25
    if time.monotonic() - t0 < ttl * 0.8:
        np.testing.assert_allclose(ranker.score(ctx, cands), want, rtol=1e-5, atol=1e-6)
    time.sleep(ttl * 1.2)
    fresh = by_hand(rows, ctx, cands)
    assert not np.allclose(fresh, want)
    np.testing.assert_allclose(ranker.score(ctx, cands), fresh, rtol=1e-5, atol=1e-6)


def test_without_a_near_cache_every_request_looks_up(tmp_path: Path) -> None:
    make_version(tmp_path, 1)
    rows = Rows()
    ranker = Ranker(RankerConfig(str(tmp_path)), rows)
    ctx, cands = {"user": 1, "I1": 3}, [{"item": 5}]
    ranker.score(ctx, cands)
    ranker.score(ctx, cands)
    assert len(rows.calls) == 2 and ranker.near_cache_stats() is None
    with pytest.raises(E.ConfigError, match="near_cache"):
        RankerConfig(str(tmp_path), near_cache_rows=-1)


def test_a_near_cache_sized_in_bytes_shares_them_by_tables(tmp_path: Path) -> None:
    from recps.serving.cache import RowCache

    make_version(tmp_path, 1)
    rows = Rows()
    budget = 1 << 20
    ranker = Ranker(RankerConfig(str(tmp_path), near_cache_bytes=budget), rows)
    # tables of dims 3, 3 and 2: two thirds of the bytes to dim 3, a third to dim 2
    caches = {c.dim: c for c, _ in ranker._near}
    assert caches[3].capacity == RowCache.capacity_for_bytes(3, budget * 2 // 3, 3, True)
    assert caches[2].capacity == RowCache.capacity_for_bytes(2, budget // 3, 3, True)
    assert caches[3].capacity > caches[2].capacity > 1000
    assert budget * 0.95 < sum(c.full_bytes for c in caches.values()) <= budget
    ctx, cands = {"user": 1, "I1": 3}, [{"item": 5}, {"item": 6}]
    ranker.score(ctx, cands)
    ranker.score(ctx, cands)
    assert len(rows.calls) == 1
    st = ranker.near_cache_stats()
    assert st is not None and st.capacity == sum(c.capacity for c in caches.values())
    assert 0 < st.memory_bytes <= budget
    # Too few bytes for even 16 rows: no cache, every request asks.
    tiny = Ranker(RankerConfig(str(tmp_path), near_cache_bytes=100), rows)
    assert tiny.near_cache_stats() is None
    with pytest.raises(E.ConfigError, match="near_cache_bytes"):
        RankerConfig(str(tmp_path), near_cache_bytes=-1)


class Flaky(Rows):
    """Rows that can stop answering, as when every replica is down."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.down:
            raise E.ShardUnavailableError("no replica could answer (test)")
        return super().__call__(batch)


@pytest.mark.parametrize("serve_stale", [True, False])
def test_expired_near_cache_rows_score_a_request_while_no_replica_answers(
    tmp_path: Path, serve_stale: bool
) -> None:
    make_version(tmp_path, 1)
    rows = Flaky()
    cfg = RankerConfig(
        str(tmp_path), near_cache_rows=64, near_cache_ttl_s=0.2, serve_stale=serve_stale
    )
    ranker = Ranker(cfg, rows)
    ctx = {"user": 7, "I1": 2, "tags": ["x"]}
    cands = [{"item": 5}, {"item": 6, "tags": ["y", "z"]}]
    want = by_hand(rows, ctx, cands)
    np.testing.assert_allclose(ranker.score(ctx, cands), want, rtol=1e-5, atol=1e-6)
    rows.down = True
    time.sleep(0.3)  # every cached row has expired, and the refetch fails
    if serve_stale:
        np.testing.assert_allclose(ranker.score(ctx, cands), want, rtol=1e-5, atol=1e-6)
        assert ranker.stale_rows_served == 6  # user 7, items 5 and 6, tags x, y and z
    else:
        with pytest.raises(E.ShardUnavailableError):
            ranker.score(ctx, cands)
        assert ranker.stale_rows_served == 0
    # A row never fetched has nothing to fall back on: the request fails.
    with pytest.raises(E.ShardUnavailableError):
        ranker.score(ctx, [{"item": 999}])
    rows.down = False  # back: fresh rows again, and no more stale ones
    before = ranker.stale_rows_served
    np.testing.assert_allclose(ranker.score(ctx, cands), want, rtol=1e-5, atol=1e-6)
    assert ranker.stale_rows_served == before


@pytest.mark.parametrize(("ahead", "chunk"), [(0.5, 4096), (0.5, 2), (0.0, 4096)])
def test_rows_in_use_are_refreshed_in_the_background_before_they_expire(
    tmp_path: Path, ahead: float, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranking_module, "_REFRESH_ROWS", chunk)
    make_version(tmp_path, 1)
    rows = Rows()
    ttl = 2.0  # due after 1 s (ahead 0.5); 0.9 s of slack before expiry on a slow box
    cfg = RankerConfig(
        str(tmp_path), near_cache_rows=64, near_cache_ttl_s=ttl, near_cache_refresh_ahead=ahead
    )
    ranker = Ranker(cfg, rows)
    ctx = {"user": 3, "I1": 1, "tags": ["q"]}
    cands = [{"item": 8}, {"item": 9}]
    old = by_hand(rows, ctx, cands)
    t0 = time.monotonic()
    np.testing.assert_allclose(ranker.score(ctx, cands), old, rtol=1e-5, atol=1e-6)
    fetched = time.monotonic()  # the rows were admitted between t0 and now
    rows.shift = 0.5  # the replicas' rows change
    fresh = by_hand(rows, ctx, cands)
    time.sleep(fetched + 1.1 - time.monotonic())  # past refresh_ahead * ttl, within the ttl
    np.testing.assert_allclose(ranker.score(ctx, cands), old, rtol=1e-5, atol=1e-6)
    assert time.monotonic() - t0 < ttl, "too slow a machine for this test's timing"
    if ahead:
        deadline = time.monotonic() + 5
        while ranker.rows_refreshed < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Background calls refetched every row (user and 2 items of the dim-3 cache, the
        # tag of the dim-2 one): one call per cache, in calls of at most ``chunk`` rows.
        # The next request scores the fresh rows with no call of its own.
        refresh_calls = rows.calls[1:]
        assert ranker.rows_refreshed == 4
        assert len(refresh_calls) == (2 if chunk >= 3 else 3)
        assert all(sum(len(v) for v in c.values()) <= chunk for c in refresh_calls)
        np.testing.assert_allclose(ranker.score(ctx, cands), fresh, rtol=1e-5, atol=1e-6)
        assert len(rows.calls) == 1 + len(refresh_calls) and ranker.refresh_failures == 0
    else:
        time.sleep(0.2)
        assert ranker.rows_refreshed == 0 and len(rows.calls) == 1
    with pytest.raises(E.ConfigError, match="refresh_ahead"):
        RankerConfig(str(tmp_path), near_cache_rows=8, near_cache_refresh_ahead=1.0)


def test_a_closed_ranker_scores_but_no_longer_refreshes(tmp_path: Path) -> None:
    make_version(tmp_path, 1)
    rows = Rows()
    cfg = RankerConfig(str(tmp_path), near_cache_rows=64, near_cache_ttl_s=2.0)
    ranker = Ranker(cfg, rows)  # refresh-ahead at the default half TTL
    ctx, cands = {"user": 4, "I1": 2}, [{"item": 1}]
    want = ranker.score(ctx, cands)
    fetched = time.monotonic()
    ranker.close()  # as a swapped-out version is
    time.sleep(fetched + 1.1 - time.monotonic())  # the rows are due now
    np.testing.assert_allclose(ranker.score(ctx, cands), want, rtol=1e-6)
    time.sleep(0.3)
    assert ranker.rows_refreshed == 0 and len(rows.calls) == 1


def test_pinned_lookups_fall_back_to_the_served_version_and_count_it() -> None:
    from prometheus_client import CollectorRegistry, Counter

    from recps.serving.errors import VersionNotHeldError
    from recps.serving.ranking_server import _PinnedLookup

    class Client:
        held = {1, 2}

        def __init__(self) -> None:
            self.calls: list[tuple[int | None, bool]] = []

        def lookup(self, batch: dict, coalesce: bool = True, version: int | None = None) -> dict:
            self.calls.append((version, coalesce))
            if version is not None and version not in self.held:
                raise VersionNotHeldError(version, sorted(self.held))
            return {t: np.full((len(v), 2), version or 0, np.float32) for t, v in batch.items()}

    client = Client()
    counter = Counter("unpinned", "test", registry=CollectorRegistry())
    pinned = _PinnedLookup(client, counter, coalesce=False)  # type: ignore[arg-type]
    pinned.version = 2
    assert pinned({"t": np.array([1, 2])})["t"].tolist() == [[2, 2], [2, 2]]
    assert counter._value.get() == 0 and client.calls == [(2, False)]
    pinned.version = 3  # no replica has it yet: the served version's rows, counted
    assert pinned({"t": np.array([1])})["t"].tolist() == [[0, 0]]
    assert counter._value.get() == 1 and client.calls[-2:] == [(3, False), (None, False)]
