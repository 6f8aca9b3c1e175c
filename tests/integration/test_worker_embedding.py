"""The sharded embedding collection and its pipeline against two real shard processes.

Every check has an independent oracle: rows read straight through ``PSClient`` and pooled by
a Python loop; gradients derived by hand and applied to ``MemoryStore`` references; the same
training run made synchronously in process (:class:`LocalRowClient`) or with
``torch.nn.EmbeddingBag`` (:class:`LocalEmbeddingBagCollection`).

The cluster is shared by the module; each test uses its own table names.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ps_harness import Cluster, Reference, ShardGroup

from recps.embedding import InitializerConfig, OptimizerConfig, TableConfig
from recps.embedding import errors as E
from recps.ps.client import PSClient
from recps.worker.data import Batch, DataReader, JaggedIds
from recps.worker.embedding import (
    EmbeddingCollectionConfig,
    FeatureSpec,
    ShardedEmbeddingBagCollection,
    keyed_ids,
)
from recps.worker.eval_metrics import auc
from recps.worker.models import build_model, embedding_config, predict
from recps.worker.pipeline import PipelineClosedError, PipelineConfig, TrainPipeline
from recps.worker.reference import LocalEmbeddingBagCollection, LocalRowClient
from recps.worker.synth import SynthConfig, reader_config, write_dataset

pytestmark = pytest.mark.timeout(120)

I64 = np.iinfo(np.int64)


@pytest.fixture(scope="module")
def cluster(ps_module_group: ShardGroup) -> Cluster:
    return ps_module_group.start(2, "--memory-mb", "32")


@pytest.fixture
def client(cluster: Cluster) -> Iterator[PSClient]:
    c = cluster.client()
    yield c
    c.close()


def jagged(rng: np.random.Generator, b: int, pool: np.ndarray, max_len: int = 4) -> JaggedIds:
    """``b`` bags of 0..max_len ids drawn from ``pool`` (empty bags included)."""
    lengths = rng.integers(0, max_len + 1, b)
    lengths[0] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return JaggedIds(rng.choice(pool, int(offsets[-1])), offsets)


def mixed_config(prefix: str, optimizer: OptimizerConfig) -> EmbeddingCollectionConfig:
    """Single-id, jagged sum and jagged mean features; two features share one table."""
    user, tag = f"{prefix}_user", f"{prefix}_tag"
    init = InitializerConfig("uniform", scale=0.5, seed=3)
    return EmbeddingCollectionConfig(
        features=(
            FeatureSpec("user", user),
            FeatureSpec("tags", tag, "mean"),
            FeatureSpec("tags_sum", tag, "sum", input="more_tags"),
        ),
        tables=(
            TableConfig(user, dim=4, initializer=init, optimizer=optimizer),
            TableConfig(tag, dim=3, initializer=init, optimizer=optimizer),
        ),
    )


def mixed_ids(rng: np.random.Generator, b: int) -> dict[str, object]:
    users = np.array([I64.min, -1, 0, 1, 2**62, I64.max], dtype=np.int64)
    tags = rng.integers(I64.min, I64.max, 12, dtype=np.int64, endpoint=True)
    return {
        "user": rng.choice(users, b),
        "tags": jagged(rng, b, tags),
        "more_tags": jagged(rng, b, tags),
    }


def pool_by_hand(
    cfg: EmbeddingCollectionConfig, ids: dict[str, object], rows_of
) -> dict[str, np.ndarray]:
    """Naive per-example pooling; ``rows_of(table, ids) -> float32 [n, dim]``."""
    dims = cfg.table_configs
    out = {}
    for f in cfg.features:
        x = ids[f.source]
        if isinstance(x, JaggedIds):
            bags = [x.values[x.offsets[i] : x.offsets[i + 1]] for i in range(len(x))]
        else:
            bags = [np.array([v]) for v in x]
        res = np.zeros((len(bags), dims[f.table].dim), np.float32)
        for i, bag in enumerate(bags):
            if len(bag):
                r = rows_of(f.table, bag)
                res[i] = r.sum(0) if f.pooling == "sum" else r.mean(0)
        out[f.name] = res
    return out


# ---- (a) forward ----------------------------------------------------------------------


def test_forward_equals_direct_lookups_pooled_by_hand(client: PSClient) -> None:
    cfg = mixed_config("fwd", OptimizerConfig("adagrad", lr=0.1))
    ebc = ShardedEmbeddingBagCollection(cfg, client)
    ids = mixed_ids(np.random.default_rng(0), 32)
    out = ebc(ids)
    want = pool_by_hand(cfg, ids, lambda t, i: client.lookup({t: i})[t])
    assert sorted(out) == sorted(want)
    for f in want:
        assert out[f].dtype == torch.float32 and out[f].shape == want[f].shape
        np.testing.assert_allclose(out[f].detach().numpy(), want[f], rtol=0, atol=1e-6)
    assert ebc.stats.lookups == 1  # every table in one PSClient.lookup


# ---- (b) one SGD step -----------------------------------------------------------------


def test_one_sgd_step_matches_memory_store_math(client: PSClient) -> None:
    cfg = mixed_config("sgd1", OptimizerConfig("sgd", lr=0.5))
    ref = Reference(list(cfg.tables))
    ebc = ShardedEmbeddingBagCollection(cfg, client)
    rng = np.random.default_rng(1)
    ids = mixed_ids(rng, 24)
    weights = {f: rng.standard_normal((24, d)).astype(np.float32) for f, d in cfg.dims.items()}
    out = ebc(ids)
    loss = sum((out[f] * torch.from_numpy(w)).sum() for f, w in weights.items())
    loss.backward()
    assert ebc.stats.pushes == 1

    # d loss / d row = sum over the row's occurrences of the example's weight (/ bag size).
    grads: dict[str, dict[int, np.ndarray]] = {t.name: {} for t in cfg.tables}
    for f in cfg.features:
        x = ids[f.source]
        for b in range(24):
            bag = x.values[x.offsets[b] : x.offsets[b + 1]] if isinstance(x, JaggedIds) else [x[b]]
            for i in bag:
                g = weights[f.name][b] / (len(bag) if f.pooling == "mean" else 1)
                acc = grads[f.table].setdefault(int(i), np.zeros_like(g))
                acc += g
    for t, by_id in grads.items():
        u = np.array(sorted(by_id), dtype=np.int64)
        ref.lookup({t: u})
        ref.push({t: (u, np.stack([by_id[i] for i in u.tolist()]))})
        got = client.lookup({t: u})[t]
        np.testing.assert_allclose(got, ref.lookup({t: u})[t], rtol=0, atol=1e-6)
        assert not np.allclose(got, ref.stores[t].initializer(u))  # the step moved the rows


# ---- (c) staleness 0 + prefetch is bit-exact ------------------------------------------


FEATS = [f"C{i}" for i in range(1, 6)]


def planted_batches(n: int, b: int = 128, seed: int = 0) -> Iterator[Batch]:
    """Labels from hidden per-id weights of 5 features (vocab 40) and 3 dense features."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).standard_normal((len(FEATS), 40))
    for _ in range(n):
        ids = rng.integers(0, 40, (len(FEATS), b))
        dense = rng.random((b, 3)).astype(np.float32)
        logit = w[np.arange(len(FEATS))[:, None], ids].sum(0) + dense[:, 0] - 0.5
        labels = (rng.random(b) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        yield Batch(labels, dense, {f: ids[j] * 7919 + 11 for j, f in enumerate(FEATS)})


def train(
    prefix: str,
    client: object,
    steps: int,
    pipeline: PipelineConfig | None,
    seed: int = 0,
) -> tuple[list[float], dict[str, torch.Tensor], ShardedEmbeddingBagCollection]:
    torch.manual_seed(seed)
    cfg = EmbeddingCollectionConfig(
        tuple(FeatureSpec(f, f"{prefix}_{f}") for f in FEATS),
        tuple(
            TableConfig(f"{prefix}_{f}", dim=8, optimizer=OptimizerConfig("adagrad", lr=0.1))
            for f in FEATS
        ),
    )
    ebc = ShardedEmbeddingBagCollection(cfg, client)
    model = build_model("dlrm", ebc, num_dense=3, bottom_mlp=(16, 8), top_mlp=(16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses: list[float] = []

    def step(dense: torch.Tensor, ids: object, labels: torch.Tensor) -> None:
        loss = F.binary_cross_entropy_with_logits(model(dense, ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    if pipeline is None:
        for b in planted_batches(steps):
            step(torch.from_numpy(b.dense), b.sparse, torch.from_numpy(b.labels))
    else:
        with TrainPipeline(ebc, planted_batches(steps), pipeline) as pipe:
            for s in pipe:
                step(s.dense, s.sparse, s.labels)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, ebc


def rows_of(ebc: ShardedEmbeddingBagCollection) -> dict[str, np.ndarray]:
    every = np.arange(40) * 7919 + 11
    return ebc.client.lookup({t.name: every for t in ebc.config.tables})


def test_staleness_zero_with_prefetch_is_bit_exact(client: PSClient) -> None:
    steps = 25
    want_losses, want_params, ref = train("bx", LocalRowClient(), steps, None)
    cfg = PipelineConfig(prefetch_batches=3, max_inflight_pushes=0)
    losses, params, ebc = train("bx", client, steps, cfg)
    assert losses == want_losses
    for k in want_params:
        assert torch.equal(params[k], want_params[k]), k
    got, want = rows_of(ebc), rows_of(ref)
    for t in want:
        np.testing.assert_array_equal(got[t], want[t], err_msg=t)


# ---- (d) staleness 2 -------------------------------------------------------------------


class RecordingClient:
    """Wraps a client; records how many pushes were acknowledged when each lookup began."""

    def __init__(self, inner: PSClient) -> None:
        self.inner = inner
        self.acked = 0
        self.acked_at_lookup: list[int] = []
        self._lock = threading.Lock()

    def create_table(self, *a: object, **kw: object) -> None:
        self.inner.create_table(*a, **kw)

    def lookup(self, batch, create_missing=True):  # type: ignore[no-untyped-def]
        with self._lock:
            self.acked_at_lookup.append(self.acked)
        return self.inner.lookup(batch, create_missing=create_missing)

    def push(self, grads):  # type: ignore[no-untyped-def]
        n = self.inner.push(grads)
        with self._lock:
            self.acked += 1
        return n


def test_staleness_two_respects_its_bound_and_converges(client: PSClient) -> None:
    k, steps = 2, 120
    rec = RecordingClient(client)
    losses, _, ebc = train("st2", rec, steps, PipelineConfig(max_inflight_pushes=k))
    assert ebc.stats.pushes == steps == rec.acked  # the pipeline flushed at the end
    # The lookup of step s started after the pushes of steps 0..s-1-k were acknowledged.
    for s, acked in enumerate(rec.acked_at_lookup):
        assert acked >= s - k, (s, acked)
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < first - 0.05, (first, last)


# ---- (e) errors surface in the training thread ----------------------------------------


def nan_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(o.sum() for o in out.values()) * float("nan")


@pytest.mark.parametrize("k", [0, 2])
def test_push_error_surfaces_in_training_thread(client: PSClient, k: int) -> None:
    cfg = EmbeddingCollectionConfig.one_table_per_feature([f"nan{k}"], dim=4)
    ebc = ShardedEmbeddingBagCollection(cfg, client)
    batches = (
        Batch(np.zeros(8, np.float32), np.zeros((8, 1), np.float32), {f"nan{k}": np.arange(8)})
        for _ in range(50)
    )
    t0 = time.monotonic()
    pipe = TrainPipeline(ebc, batches, PipelineConfig(max_inflight_pushes=k))
    # k = 0: from that step's backward; k = 2: from a backward or next() at most k steps later.
    with pytest.raises(E.NonFiniteGradientError):
        for i, step in enumerate(pipe):
            assert i <= 3 + k, "the push error was never raised"
            out = ebc(step.sparse)
            loss = nan_loss(out) if i == 3 else sum(o.sum() for o in out.values())
            loss.backward()
    with pytest.raises(E.NonFiniteGradientError):  # the pipeline is broken for good
        next(pipe)
    pipe.close()  # the trainer saw the error already: close does not raise it again
    with pytest.raises(PipelineClosedError):
        next(pipe)
    assert time.monotonic() - t0 < 20


def test_lookup_error_surfaces_from_next(client: PSClient) -> None:
    cfg = EmbeddingCollectionConfig.one_table_per_feature(["never_created"], dim=4)
    ebc = ShardedEmbeddingBagCollection(cfg, client, create_tables=False)
    batches = [Batch(np.zeros(2, np.float32), np.zeros((2, 1)), {"never_created": np.arange(2)})]
    with TrainPipeline(ebc, batches) as pipe, pytest.raises(E.UnknownTableError):
        next(pipe)


def test_iterator_error_surfaces_and_close_does_not_hang(client: PSClient) -> None:
    cfg = EmbeddingCollectionConfig.one_table_per_feature(["it_err"], dim=2)
    ebc = ShardedEmbeddingBagCollection(cfg, client)

    def batches() -> Iterator[Batch]:
        for i in range(3):
            yield Batch(np.zeros(2, np.float32), np.zeros((2, 1)), {"it_err": np.arange(2) + i})
        raise ValueError("bad file")

    pipe = TrainPipeline(ebc, batches(), PipelineConfig(max_inflight_pushes=1))
    with pipe, pytest.raises(ValueError, match="bad file"):
        for step in pipe:
            ebc(step.sparse)["it_err"].sum().backward()
    # Abandoning a pipeline whose prefetch queue is full returns promptly.
    endless = (
        Batch(np.zeros(2, np.float32), np.zeros((2, 1)), {"it_err": np.arange(2)})
        for _ in iter(int, 1)
    )
    t0 = time.monotonic()
    with TrainPipeline(ebc, endless, PipelineConfig(max_inflight_pushes=2)) as pipe:
        for i, step in enumerate(pipe):
            ebc(step.sparse)["it_err"].sum().backward()
            if i == 5:
                break
    assert time.monotonic() - t0 < 10
    assert ebc.stats.pushes == 3 + 6


# ---- (f) DLRM on a planted dataset: sharded vs in process -----------------------------


def fit_dlrm(
    embeddings: torch.nn.Module, data: Path, meta: dict, pipeline: PipelineConfig | None
) -> tuple[float, float]:
    """Train one epoch, return (eval AUC, seconds)."""
    torch.manual_seed(0)
    model = build_model("dlrm", embeddings, num_dense=13, bottom_mlp=(32, 16), top_mlp=(32,))
    dense_params = [p for n, p in model.named_parameters() if not n.startswith("embeddings.")]
    opt = torch.optim.Adam(dense_params, lr=3e-3)
    rc = reader_config(meta, batch_size=256)
    t0 = time.perf_counter()

    def step(dense: torch.Tensor, ids: object, labels: torch.Tensor) -> None:
        loss = F.binary_cross_entropy_with_logits(model(dense, ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    batches = DataReader(data / "train", rc).epoch(0)
    if pipeline is None:
        for b in batches:
            step(torch.tensor(b.dense), keyed_ids(b), torch.tensor(b.labels))
    else:
        with TrainPipeline(embeddings, batches, pipeline) as pipe:
            for s in pipe:
                step(s.dense, s.sparse, s.labels)
    seconds = time.perf_counter() - t0
    labels, scores = [], []
    for b in DataReader(data / "eval", rc.replace(batch_size=4096)).epoch(0):
        scores.append(predict(model, torch.tensor(b.dense), keyed_ids(b)))
        labels.append(b.labels)
    return auc(np.concatenate(labels), np.concatenate(scores)), seconds


def test_dlrm_sharded_matches_in_process_auc(client: PSClient, tmp_path: Path) -> None:
    meta = write_dataset(
        tmp_path,
        SynthConfig(rows=64_000, num_files=1, num_sparse=8, vocab_max=500, calibration_rows=20_000),
    )
    opt = OptimizerConfig("adagrad", lr=0.1)
    local_cfg = embedding_config("dlrm", meta["sparse_features"], dim=16, optimizer=opt)
    local_auc, local_s = fit_dlrm(LocalEmbeddingBagCollection(local_cfg), tmp_path, meta, None)
    sharded = ShardedEmbeddingBagCollection(local_cfg, client)  # tables C1..C26 on the shards
    sharded_auc, sharded_s = fit_dlrm(
        sharded, tmp_path, meta, PipelineConfig(max_inflight_pushes=1)
    )
    print(f"AUC local {local_auc:.4f} ({local_s:.1f} s)")
    print(f"AUC sharded {sharded_auc:.4f} ({sharded_s:.1f} s)")
    assert local_auc > 0.65, local_auc  # it learned something
    assert abs(sharded_auc - local_auc) < 0.01, (sharded_auc, local_auc)
