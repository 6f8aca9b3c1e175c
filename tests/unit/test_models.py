"""Models, embedding collections and the pipeline, all in process (no sockets, no processes).

The sharded collection runs over :class:`LocalRowClient` (``MemoryStore`` per table), so its
dedup, pooling, backward push and the pipeline's staleness logic are checked here; the real
shards are in ``tests/integration/test_worker_embedding.py``.
"""

from __future__ import annotations

import doctest
import importlib
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recps.embedding import InitializerConfig, OptimizerConfig, TableConfig
from recps.embedding import errors as E
from recps.worker.data import Batch, JaggedIds
from recps.worker.embedding import (
    EmbeddingCollectionConfig,
    FeatureSpec,
    ShardedEmbeddingBagCollection,
)
from recps.worker.eval_metrics import auc
from recps.worker.models import DLRM, DLRMConfig, build_model, embedding_config, predict
from recps.worker.pipeline import (
    PipelineClosedError,
    PipelineConfig,
    PipelineTimeoutError,
    TrainPipeline,
)
from recps.worker.reference import (
    LocalCollectionConfig,
    LocalEmbeddingBagCollection,
    LocalRowClient,
)

MODELS = ["dlrm", "deepfm", "wide_deep"]


@pytest.mark.parametrize(
    "name",
    [
        "recps.worker.embedding",
        "recps.worker.reference",
        "recps.worker.pipeline",
        "recps.worker.models",
    ],
)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ---- helpers ---------------------------------------------------------------------------


def jagged(rng: np.random.Generator, b: int, vocab: int, max_len: int = 4) -> JaggedIds:
    lengths = rng.integers(0, max_len + 1, b)
    lengths[0] = 0  # always one empty bag
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return JaggedIds(rng.integers(0, vocab, int(offsets[-1])) * 1_000_003 - 7, offsets)


def mixed_config(optimizer: OptimizerConfig) -> EmbeddingCollectionConfig:
    init = InitializerConfig("uniform", scale=0.5, seed=1)
    return EmbeddingCollectionConfig(
        features=(
            FeatureSpec("user", "user"),
            FeatureSpec("tags", "tag", "mean"),
            FeatureSpec("tags_sum", "tag", "sum", input="more_tags"),
        ),
        tables=(
            TableConfig("user", dim=4, initializer=init, optimizer=optimizer),
            TableConfig("tag", dim=3, initializer=init, optimizer=optimizer),
        ),
    )


def mixed_ids(rng: np.random.Generator, b: int, vocab: int = 12) -> dict[str, Any]:
    return {
        "user": rng.integers(-5, 5, b),
        "tags": jagged(rng, b, vocab),
        "more_tags": jagged(rng, b, vocab),
    }


def collection(kind: str, cfg: EmbeddingCollectionConfig) -> torch.nn.Module:
    if kind == "sharded":
        return ShardedEmbeddingBagCollection(cfg, LocalRowClient(cfg.tables))
    if kind == "local":
        return LocalEmbeddingBagCollection(cfg)
    return LocalEmbeddingBagCollection(cfg, LocalCollectionConfig("torch", capacity_rows=64))


def rows_of(ebc: torch.nn.Module, table: str, ids: np.ndarray) -> np.ndarray:
    if isinstance(ebc, ShardedEmbeddingBagCollection):
        return ebc.client.lookup({table: ids})[table]
    return ebc.rows(table, ids)


def pool_by_hand(cfg: EmbeddingCollectionConfig, ids: dict[str, Any], ebc: torch.nn.Module):
    out = {}
    for f in cfg.features:
        x = ids[f.source]
        if isinstance(x, JaggedIds):
            bags = [x.values[x.offsets[i] : x.offsets[i + 1]] for i in range(len(x))]
        else:
            bags = [np.array([v]) for v in x]
        res = np.zeros((len(bags), cfg.dims[f.name]), np.float32)
        for i, bag in enumerate(bags):
            if len(bag):
                r = rows_of(ebc, f.table, bag)
                res[i] = r.sum(0) if f.pooling == "sum" else r.mean(0)
        out[f.name] = res
    return out


# ---- collections ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sharded", "local"])
def test_jagged_sum_and_mean_pooling_match_a_naive_loop(kind: str) -> None:
    cfg = mixed_config(OptimizerConfig("sgd", lr=0.1))
    ebc = collection(kind, cfg)
    ids = mixed_ids(np.random.default_rng(0), 20)
    with torch.no_grad():
        out = ebc(ids)
    want = pool_by_hand(cfg, ids, ebc)
    for f, w in want.items():
        assert out[f].shape == w.shape
        np.testing.assert_allclose(out[f].numpy(), w, rtol=0, atol=1e-6)
    assert not out["tags"][0].any() and not out["tags_sum"][0].any()  # empty bags pool to 0


def test_ids_as_tuples_and_torch_tensors_are_accepted() -> None:
    cfg = mixed_config(OptimizerConfig("sgd", lr=0.1))
    ebc = collection("sharded", cfg)
    ids = mixed_ids(np.random.default_rng(1), 6)
    alt = {
        "user": torch.from_numpy(ids["user"]),
        "tags": (ids["tags"].values, ids["tags"].offsets),
        "more_tags": (torch.from_numpy(ids["more_tags"].values), ids["more_tags"].offsets),
    }
    with torch.no_grad():
        a, b = ebc(ids), ebc(alt)
    for f in a:
        assert torch.equal(a[f], b[f])


@pytest.mark.parametrize(
    "opt",
    [
        OptimizerConfig("sgd", lr=0.3),
        OptimizerConfig("adagrad", lr=0.2, initial_accumulator=0.1),
        OptimizerConfig("adam", lr=0.05, weight_decay=0.01),
        OptimizerConfig("ftrl", lr=0.2, l1=0.01, l2=0.1),
    ],
    ids=lambda o: o.kind,
)
def test_sharded_local_and_torch_optimizers_agree_over_steps(opt: OptimizerConfig) -> None:
    cfg = mixed_config(opt)
    kinds = ["sharded", "local"] + (["torch"] if opt.kind in ("sgd", "adagrad") else [])
    colls = {k: collection(k, cfg) for k in kinds}
    torch_opt = colls["torch"].sparse_optimizer() if "torch" in colls else None
    rng = np.random.default_rng(2)
    for _ in range(8):
        ids = mixed_ids(rng, 16)
        w = {
            f: torch.from_numpy(rng.standard_normal((16, d)).astype(np.float32))
            for f, d in cfg.dims.items()
        }
        for ebc in colls.values():
            out = ebc(ids)
            sum((out[f] * w[f]).sum() for f in out).backward()
        if torch_opt is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's sparse-invariant notice
                torch_opt.step()
            torch_opt.zero_grad()
    every = {"user": np.arange(-5, 5), "tag": np.arange(12) * 1_000_003 - 7}
    want = {t: rows_of(colls["sharded"], t, i) for t, i in every.items()}
    for kind, ebc in colls.items():
        for t, i in every.items():
            np.testing.assert_allclose(rows_of(ebc, t, i), want[t], rtol=0, atol=2e-6, err_msg=kind)
    assert not np.allclose(
        want["tag"], LocalRowClient(cfg.tables).lookup({"tag": every["tag"]})["tag"]
    )


class RecordingClient(LocalRowClient):
    """LocalRowClient that records pushes, and how many were applied when a lookup began."""

    def __init__(self, tables, push_delay_s: float = 0.0, fail_push_at: int | None = None):
        super().__init__(tables)
        self.pushed: list[dict[str, np.ndarray]] = []
        self.acked_at_lookup: list[int] = []
        self.push_delay_s = push_delay_s
        self.fail_push_at = fail_push_at
        self.lock = threading.Lock()

    def lookup(self, batch, create_missing=True):  # type: ignore[no-untyped-def]
        with self.lock:
            self.acked_at_lookup.append(len(self.pushed))
        return super().lookup(batch, create_missing)

    def push(self, grads, wait_durable=False):  # type: ignore[no-untyped-def]
        time.sleep(self.push_delay_s)
        if self.fail_push_at is not None and len(self.pushed) == self.fail_push_at:
            raise E.UnknownTableError("gone")
        n = super().push(grads)
        with self.lock:
            self.pushed.append({t: np.asarray(i) for t, (i, _) in grads.items()})
        return n


def test_backward_pushes_once_per_step_only_the_tables_that_got_gradients() -> None:
    cfg = mixed_config(OptimizerConfig("sgd", lr=0.1))
    client = RecordingClient(cfg.tables)
    ebc = ShardedEmbeddingBagCollection(cfg, client)
    ids = mixed_ids(np.random.default_rng(3), 8)
    out = ebc(ids)
    out["user"].sum().backward()  # the "tag" features are not in the loss
    assert len(client.pushed) == 1 and sorted(client.pushed[0]) == ["user"]
    np.testing.assert_array_equal(client.pushed[0]["user"], np.unique(ids["user"]))
    out = ebc(ids)
    (out["tags"].sum() + out["tags_sum"].sum()).backward()  # shared table: one entry
    assert sorted(client.pushed[1]) == ["tag"]
    both = np.concatenate([ids["tags"].values, ids["more_tags"].values])
    np.testing.assert_array_equal(client.pushed[1]["tag"], np.unique(both))


def test_eval_forward_pushes_nothing_and_stores_no_rows() -> None:
    cfg = mixed_config(OptimizerConfig("sgd", lr=0.1))
    ebc = ShardedEmbeddingBagCollection(cfg, LocalRowClient(cfg.tables))
    ebc.eval()
    with torch.no_grad():
        out = ebc(mixed_ids(np.random.default_rng(4), 8))
    assert not out["user"].requires_grad
    assert all(len(s) == 0 for s in ebc.client.stores.values())
    assert ebc.stats.pushes == 0


def test_bad_inputs_raise_typed_errors() -> None:
    cfg = mixed_config(OptimizerConfig("sgd", lr=0.1))
    ebc = collection("sharded", cfg)
    ids = mixed_ids(np.random.default_rng(5), 4)
    with pytest.raises(E.InvalidArgumentError, match="more_tags"):
        ebc({k: v for k, v in ids.items() if k != "more_tags"})
    with pytest.raises(E.ShapeError, match="examples"):
        ebc({**ids, "user": ids["user"][:3]})
    with pytest.raises(E.ShapeError, match="offsets"):
        ebc({**ids, "tags": (ids["tags"].values, ids["tags"].offsets[::-1])})
    with pytest.raises(E.DtypeError):
        ebc({**ids, "user": ids["user"].astype(np.float32)})
    with pytest.raises(E.ConfigError, match="undeclared"):
        EmbeddingCollectionConfig((FeatureSpec("a", "nope"),), (TableConfig("t", dim=2),))
    with pytest.raises(E.ConfigError, match="more than once"):
        EmbeddingCollectionConfig((FeatureSpec("a", "t"),) * 2, (TableConfig("t", dim=2),))
    with pytest.raises(E.ConfigError):
        FeatureSpec("a", "t", pooling="max")  # type: ignore[arg-type]


def test_local_torch_mode_has_a_fixed_capacity() -> None:
    cfg = EmbeddingCollectionConfig.one_table_per_feature(["C1"], dim=2)
    grow = LocalEmbeddingBagCollection(cfg, LocalCollectionConfig(capacity_rows=2))
    grow({"C1": np.arange(10)})["C1"].sum().backward()  # "recps" mode doubles its capacity
    assert grow.weight("C1").shape[0] >= 10
    fixed = LocalEmbeddingBagCollection(cfg, LocalCollectionConfig("torch", capacity_rows=2))
    with pytest.raises(E.CapacityError, match="capacity_rows"):
        fixed({"C1": np.arange(10)})
    with pytest.raises(E.ConfigError):
        grow.sparse_optimizer()


def test_local_recps_mode_grows_while_an_earlier_graph_is_alive() -> None:
    # A training loop still holds step t's outputs when step t+1's forward grows a table.
    # The live graph keeps autograd's gradient accumulator for the weight, with the old
    # shape cached in it; the next backward must still accept the grown gradient.
    cfg = EmbeddingCollectionConfig.one_table_per_feature(
        ["C1", "C2"], dim=2, optimizer=OptimizerConfig("sgd", lr=1.0)
    )
    ebc = LocalEmbeddingBagCollection(cfg, LocalCollectionConfig(capacity_rows=4))
    first = ebc({"C1": np.arange(3), "C2": np.arange(3)})
    (first["C1"].sum() + first["C2"].sum()).backward()
    before = ebc.rows("C1", np.arange(3)).copy()
    second = ebc({"C1": np.arange(40), "C2": np.zeros(40, np.int64)})  # grows C1: 4 -> 40
    (second["C1"].sum() + second["C2"].sum()).backward()
    assert ebc.weight("C1").shape[0] >= 40
    after = ebc.rows("C1", np.arange(40))
    np.testing.assert_allclose(after[:3], before - 1.0)  # sgd, lr 1, grad 1 per row
    fresh = LocalEmbeddingBagCollection(cfg, LocalCollectionConfig(capacity_rows=64))
    np.testing.assert_allclose(after[3:], fresh.rows("C1", np.arange(3, 40)) - 1.0)
    del first


def fused_config() -> EmbeddingCollectionConfig:
    """Single-id features over tables of two dims (two share a table), plus a table read
    by a jagged and a single-id feature (not fusable)."""
    init = InitializerConfig("uniform", scale=0.5, seed=2)
    feats = (
        FeatureSpec("a", "t1"),
        FeatureSpec("d", "t3"),
        FeatureSpec("b", "t1", input="b_ids"),
        FeatureSpec("c", "t2"),
        FeatureSpec("e", "t4", "mean"),
        FeatureSpec("f", "t4", input="f_ids"),
        FeatureSpec("g", "t5"),
    )
    dims = {"t1": 3, "t2": 3, "t3": 2, "t4": 3, "t5": 2}
    return EmbeddingCollectionConfig(
        feats, tuple(TableConfig(t, dim=d, initializer=init) for t, d in dims.items())
    )


def fused_ids(rng: np.random.Generator, b: int) -> dict[str, Any]:
    ids: dict[str, Any] = {
        k: rng.integers(0, 9, b) * 7919 - 3 for k in ["a", "b_ids", "c", "d", "f_ids", "g"]
    }
    ids["e"] = jagged(rng, b, 9)
    return ids


def grads_by_hand(
    cfg: EmbeddingCollectionConfig,
    ids: dict[str, Any],
    uniq: dict[str, np.ndarray],
    weights: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """d(sum_f <out_f, weights_f>)/d row, per table over its unique ids (numpy add.at)."""
    out = {t: np.zeros((len(u), cfg.table_configs[t].dim)) for t, u in uniq.items()}
    for f in cfg.features:
        if f.name not in weights:
            continue
        x = ids[f.source]
        w = weights[f.name].astype(np.float64)
        if isinstance(x, JaggedIds):
            n = np.diff(x.offsets)
            rows = np.repeat(np.arange(len(n)), n)
            g = w[rows] / (n[rows, None] if f.pooling == "mean" else 1)
            np.add.at(out[f.table], np.searchsorted(uniq[f.table], x.values), g)
        else:
            np.add.at(out[f.table], np.searchsorted(uniq[f.table], x), w)
    return out


@pytest.mark.parametrize("used", ["all", "a c d e f g", "b c e f", "e f"])
def test_fused_pooling_and_gradients_match_a_naive_loop(used: str) -> None:
    cfg = fused_config()
    ebc = ShardedEmbeddingBagCollection(cfg, LocalRowClient(cfg.tables))
    rng = np.random.default_rng(5)
    ids = fused_ids(rng, 33)
    prepared = ebc.prepare(ids)
    groups = {fz.dim: (fz.tables, fz.features) for fz in prepared.fused}
    assert groups == {3: (("t1", "t2"), ("a", "b", "c")), 2: (("t3", "t5"), ("d", "g"))}
    pushed: list[dict[str, tuple[np.ndarray, torch.Tensor]]] = []
    pulled = ebc.pull(prepared, on_grads=lambda step, g: pushed.append(g))
    out = ebc(pulled)
    assert list(out) == [f.name for f in cfg.features]
    want = pool_by_hand(cfg, ids, ebc)
    for f in want:
        assert out[f].shape == want[f].shape and out[f].is_contiguous()
        np.testing.assert_allclose(out[f].detach().numpy(), want[f], rtol=0, atol=1e-6)
    names = [f.name for f in cfg.features] if used == "all" else used.split()
    weights = {f: rng.standard_normal((33, cfg.dims[f])).astype(np.float32) for f in names}
    sum((out[f] * torch.from_numpy(w)).sum() for f, w in weights.items()).backward()
    assert len(pushed) == 1
    # A table is pushed iff one of its features is in the loss, with every unique id.
    want_tables = [
        t for t in prepared.ids if any(f.table == t for f in cfg.features if f.name in names)
    ]
    assert list(pushed[0]) == want_tables
    want_grads = grads_by_hand(cfg, ids, prepared.ids, weights)
    for t, (u, g) in pushed[0].items():
        np.testing.assert_array_equal(u, prepared.ids[t])
        np.testing.assert_allclose(g.numpy(), want_grads[t], rtol=0, atol=1e-5, err_msg=t)


def test_fused_outputs_may_be_modified_in_place() -> None:
    cfg = EmbeddingCollectionConfig.one_table_per_feature(["x", "y"], dim=2)
    ebc = ShardedEmbeddingBagCollection(cfg, LocalRowClient(cfg.tables))
    out = ebc({"x": np.array([1, 2, 1]), "y": np.array([3, 3, 4])})
    (out["x"].relu_().sum() + out["y"].mul_(2).sum()).backward()
    assert ebc.stats.pushes == 1


# ---- models ----------------------------------------------------------------------------

FEATS = ["C1", "C2", "C3", "C4"]


def planted_batches(n: int, b: int = 128, seed: int = 0, jag: bool = False) -> Iterator[Batch]:
    """Labels from hidden per-id weights (4 features, vocab 30) plus one dense feature."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(42).standard_normal((len(FEATS), 30)) * 1.5
    for _ in range(n):
        ids = rng.integers(0, 30, (len(FEATS), b))
        dense = rng.random((b, 3)).astype(np.float32)
        logit = w[np.arange(len(FEATS))[:, None], ids].sum(0) + 2 * dense[:, 0] - 1
        labels = (rng.random(b) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        sparse = {f: ids[j] for j, f in enumerate(FEATS)}
        jagged_ids = {}
        if jag:  # C4 as a bag of one id plus 0..2 noise ids, mean-pooled
            extra = rng.integers(0, 3, b)
            offsets = np.concatenate([[0], np.cumsum(extra + 1)]).astype(np.int64)
            values = rng.integers(100, 130, int(offsets[-1]))
            values[offsets[:-1]] = ids[3]
            jagged_ids = {"C4": JaggedIds(values, offsets)}
            del sparse["C4"]
        yield Batch(labels, dense, sparse, jagged_ids)


def make_model(name: str, kind: str = "local", dim: int = 8, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = embedding_config(name, FEATS, dim=dim, optimizer=OptimizerConfig("adagrad", lr=0.1), **kw)
    extra = {"bottom_mlp": (16, dim), "top_mlp": (16,)} if name == "dlrm" else {"deep_mlp": (16,)}
    return build_model(name, collection(kind, cfg), num_dense=3, **extra)


def ids_of(b: Batch) -> dict[str, Any]:
    return {**b.sparse, **b.jagged}


@pytest.mark.parametrize("name", MODELS)
def test_model_output_shape_and_gradient_flow(name: str) -> None:
    model = make_model(name)
    b = next(planted_batches(1, b=16))
    logits = model(torch.from_numpy(b.dense), ids_of(b))
    assert logits.shape == (16,) and logits.dtype == torch.float32
    before = model.embeddings.rows("C1", b.sparse["C1"]).copy()
    logits.sum().backward()
    for n, p in model.named_parameters():
        if n.startswith("embeddings."):
            assert p.grad is None  # the sparse update consumed it in backward
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert not np.allclose(model.embeddings.rows("C1", b.sparse["C1"]), before)


@pytest.mark.parametrize("name", MODELS)
def test_model_learns_a_planted_problem(name: str) -> None:
    model = make_model(name, pooling="mean")
    opt = torch.optim.Adam(
        [p for n, p in model.named_parameters() if not n.startswith("embeddings.")], lr=1e-2
    )
    losses = []
    for b in planted_batches(150, jag=True):
        loss = F.binary_cross_entropy_with_logits(
            model(torch.from_numpy(b.dense), ids_of(b)), torch.from_numpy(b.labels)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:15]), np.mean(losses[-15:])
    assert last < first - 0.1, (first, last)
    b = next(planted_batches(1, b=2000, seed=7, jag=True))
    p = predict(model, torch.from_numpy(b.dense), ids_of(b))
    assert p.shape == (2000,) and p.min() > 0 and p.max() < 1
    assert auc(b.labels, p) > 0.75


@pytest.mark.parametrize("name", MODELS)
def test_same_model_class_runs_over_both_collections(name: str) -> None:
    sharded, local = make_model(name, "sharded"), make_model(name, "local")
    b = next(planted_batches(1, b=32))
    dense = torch.from_numpy(b.dense)
    for _ in range(3):  # a few steps: the sparse updates agree as well
        ys = [m(dense, b.sparse) for m in (sharded, local)]
        torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=1e-5)
        for y in ys:
            y.sum().backward()


def test_model_configs_are_validated() -> None:
    ebc = collection("local", embedding_config("dlrm", FEATS, dim=8))
    with pytest.raises(E.DimensionMismatchError):
        DLRM(ebc, DLRMConfig(num_dense=3, bottom_mlp=(16, 4)))
    with pytest.raises(E.ConfigError, match="unknown model"):
        build_model("xgboost", ebc)
    with pytest.raises(E.ConfigError, match="DLRMConfig"):
        build_model("dlrm", ebc, no_such_field=1)
    with pytest.raises(E.ConfigError, match="not in the embedding collection"):
        build_model("dlrm", ebc, num_dense=3, bottom_mlp=(8,), features=("C9",))
    wide = collection("local", embedding_config("wide&deep", FEATS, dim=8))
    assert build_model("Wide&Deep", wide, num_dense=3).linear_features == tuple(
        f + "_wide" for f in FEATS
    )


# ---- pipeline (over LocalRowClient) -----------------------------------------------------


def pipeline_run(
    steps: int, cfg: PipelineConfig | None, client_kw: dict[str, Any] | None = None
) -> tuple[list[float], Any, TrainPipeline | None]:
    model = make_model("dlrm", "sharded")
    ebc = model.embeddings
    ebc.client = client = RecordingClient(ebc.config.tables, **(client_kw or {}))
    opt = torch.optim.SGD([p for n, p in model.named_parameters()], lr=0.05)
    losses: list[float] = []

    def step(dense: torch.Tensor, ids: Any, labels: torch.Tensor) -> None:
        loss = F.binary_cross_entropy_with_logits(model(dense, ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    pipe = None
    if cfg is None:
        for b in planted_batches(steps):
            step(torch.from_numpy(b.dense), b.sparse, torch.from_numpy(b.labels))
    else:
        with TrainPipeline(ebc, planted_batches(steps), cfg) as pipe:
            for s in pipe:
                step(s.dense, s.sparse, s.labels)
    return losses, client, pipe


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_staleness_zero_is_bit_exact_with_synchronous_training(prefetch: int) -> None:
    want, ref, _ = pipeline_run(12, None)
    got, client, pipe = pipeline_run(12, PipelineConfig(prefetch, max_inflight_pushes=0))
    assert got == want
    every = np.arange(30)
    for t in ref.stores:
        np.testing.assert_array_equal(
            client.lookup({t: every})[t], ref.lookup({t: every})[t], err_msg=t
        )
    assert pipe is not None and pipe.stats.steps == 12 and pipe.stats.samples == 12 * 128
    stats = pipe.stats.to_dict()
    assert stats["samples_per_s"] > 0 and stats["lookup_s"] > 0 and stats["push_wait_s"] > 0


@pytest.mark.parametrize("k", [1, 3])
def test_lookups_respect_the_staleness_bound(k: int) -> None:
    steps = 20
    _, client, pipe = pipeline_run(
        steps, PipelineConfig(prefetch_batches=4, max_inflight_pushes=k), {"push_delay_s": 0.01}
    )
    assert len(client.pushed) == steps  # leaving the loop flushed every push
    lags = [s - acked for s, acked in enumerate(client.acked_at_lookup)]
    assert max(lags) <= k, lags  # step s looked up after the pushes of steps <= s-1-k
    assert max(lags) >= 1  # ... and the pipeline did use the slack it was given
    assert pipe is not None and pipe.stats.gate_wait_s >= 0


@pytest.mark.parametrize("k", [0, 2])
def test_steps_without_backward_do_not_stall_the_pipeline(k: int) -> None:
    model = make_model("dlrm", "sharded")
    cfg = PipelineConfig(prefetch_batches=2, max_inflight_pushes=k, timeout_s=10)
    with TrainPipeline(model.embeddings, planted_batches(8), cfg) as pipe:
        for i, s in enumerate(pipe):
            if i % 2:
                with torch.no_grad():
                    model(s.dense, s.sparse)
            else:
                model(s.dense, s.sparse).sum().backward()
    assert model.embeddings.stats.pushes == 4


@pytest.mark.parametrize("k", [0, 2])
def test_push_error_is_raised_in_the_training_thread(k: int) -> None:
    model = make_model("dlrm", "sharded")
    model.embeddings.client = RecordingClient(model.embeddings.config.tables, fail_push_at=2)
    pipe = TrainPipeline(
        model.embeddings, planted_batches(30), PipelineConfig(max_inflight_pushes=k)
    )
    with pytest.raises(E.UnknownTableError):
        for i, s in enumerate(pipe):
            assert i <= 2 + k
            model(s.dense, s.sparse).sum().backward()
    with pytest.raises(E.UnknownTableError):
        next(pipe)
    pipe.close()
    with pytest.raises(PipelineClosedError):
        next(pipe)


def test_an_unseen_push_error_is_raised_by_close() -> None:
    model = make_model("dlrm", "sharded")
    model.embeddings.client = RecordingClient(model.embeddings.config.tables, fail_push_at=0)
    pipe = TrainPipeline(
        model.embeddings, planted_batches(3), PipelineConfig(max_inflight_pushes=2)
    )
    s = next(pipe)
    model(s.dense, s.sparse).sum().backward()  # queued; fails in the background
    with pytest.raises(E.UnknownTableError):
        pipe.close()


def test_a_stuck_push_times_out_and_close_returns() -> None:
    model = make_model("dlrm", "sharded")
    model.embeddings.client = RecordingClient(model.embeddings.config.tables, push_delay_s=2.0)
    cfg = PipelineConfig(max_inflight_pushes=1, timeout_s=0.3, join_timeout_s=0.2)
    pipe = TrainPipeline(model.embeddings, planted_batches(10), cfg)
    t0 = time.monotonic()
    with pytest.raises(PipelineTimeoutError):
        for s in pipe:
            model(s.dense, s.sparse).sum().backward()
    pipe.close(flush=False)
    assert time.monotonic() - t0 < 1.9


def test_pipeline_config_is_validated() -> None:
    with pytest.raises(E.ConfigError):
        PipelineConfig(max_inflight_pushes=-1)
    with pytest.raises(E.ConfigError):
        PipelineConfig(prefetch_batches=-1)
    with pytest.raises(E.ConfigError):
        PipelineConfig(timeout_s=0)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [0, 1])
def test_cuda_pipeline_matches_cpu(k: int) -> None:
    """Rows land on the GPU through pinned, non-blocking copies on a side stream."""
    cpu_losses, cpu_client, _ = pipeline_run(10, PipelineConfig(max_inflight_pushes=k))
    model = make_model("dlrm", "sharded").cuda()
    ebc = model.embeddings
    ebc.client = client = RecordingClient(ebc.config.tables)
    opt = torch.optim.SGD(list(model.parameters()), lr=0.05)
    losses = []
    with TrainPipeline(ebc, planted_batches(10), PipelineConfig(max_inflight_pushes=k)) as pipe:
        for s in pipe:
            assert s.dense.is_cuda and s.sparse.rows["C1"].is_cuda
            loss = F.binary_cross_entropy_with_logits(model(s.dense, s.sparse), s.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    np.testing.assert_allclose(losses, cpu_losses, rtol=0, atol=1e-4)
    every = np.arange(30)
    for t in client.stores:
        np.testing.assert_allclose(
            client.lookup({t: every})[t], cpu_client.lookup({t: every})[t], rtol=0, atol=1e-4
        )
