"""`recps export` against a real training run: shard processes, a checkpoint, SST files.

One module-scoped run trains a small DeepFM (dim-8 embeddings plus dim-1 "wide" tables,
table C2 with admission ``min_count=2``) for a few steps through 2 real shards and
checkpoints it; the tests export that checkpoint and check the model against the shards:

* rows: exactly the rows the store holds (never-admitted ids absent), each equal to the
  shard's row (float32), within the bound for float16 / int8, in the right serving shard;
* the tower: loaded by ``torch.jit.load`` in an isolated interpreter that never imports
  recps, it gives the training model's logits; fed the exported rows (plus the default
  vector for unknown ids) it gives the scores the training model gives through the shards;
* versions appear atomically, an existing one is refused, a failed export leaves nothing,
  a corrupted file is detected;
* streaming: a 200k-row table exported 4096 rows at a time peaks far below its size.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from ps_harness import ShardGroup

from recps.cli import export_cmds
from recps.embedding import TableConfig, TieredStore, TieredStoreConfig
from recps.embedding.config import InitializerConfig
from recps.embedding.errors import CheckpointError, CheckpointNotFoundError
from recps.embedding.feature_ids import HASH_SCHEME, feature_salt, missing_id
from recps.embedding.initializers import RowInitializer
from recps.ps.client import PSClient
from recps.ps.routing import ShardMap
from recps.serving import model_format as mf
from recps.serving.export import ExportConfig, build_tower, export_checkpoint, export_table
from recps.worker.checkpoint import (
    DENSE_FILE,
    finish_checkpoint,
    latest_checkpoint,
    load_dense,
    read_checkpoint,
)
from recps.worker.data import Batch, DataReader
from recps.worker.embedding import ShardedEmbeddingBagCollection, keyed_ids
from recps.worker.job_config import JobConfig, load_job_config
from recps.worker.reference import LocalEmbeddingBagCollection
from recps.worker.synth import SynthConfig, write_dataset
from recps.worker.trainer import (
    WorkerContext,
    build_job_model,
    data_paths,
    embedding_collection_config,
    run_worker,
)

pytestmark = [
    pytest.mark.timeout(240),
    # torch 2.13 deprecates TorchScript, which the format names; loading it still works.
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
]

SPARSE = ("C1", "C2", "C3", "C4")
DENSE = tuple(f"I{i}" for i in range(1, 14))
BATCH, STEPS = 64, 6


@dataclass
class Trained:
    job: JobConfig
    client: PSClient
    step_dir: Path


def make_job(data: Path, ckpt: Path) -> JobConfig:
    return load_job_config(
        {
            "data": {
                "train": str(data / "train"),
                "eval": str(data / "eval"),
                "batch_size": BATCH,
                "reader": {"dense_features": list(DENSE), "sparse_features": list(SPARSE)},
            },
            "table_defaults": {"dim": 8, "optimizer": {"kind": "adagrad", "lr": 0.1}},
            "tables": [{"name": "C2", "admission": {"min_count": 2}}],
            "model": {"kind": "deepfm", "deep_mlp": [16]},
            "dense_optimizer": {"kind": "adam", "lr": 0.01},
            "training": {
                "checkpoint_dir": str(ckpt),
                "steps": STEPS,
                "checkpoint_every_steps": STEPS,
            },
            "cluster": {"num_workers": 1},
        }
    )


@pytest.fixture(scope="module")
def trained(ps_module_group: ShardGroup, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    data = tmp_path_factory.mktemp("synth")
    write_dataset(
        data,
        SynthConfig(
            rows=2000,
            num_files=1,
            num_sparse=4,
            vocab_max=400,
            calibration_rows=1000,
            interaction_pairs=4,
        ),
    )
    job = make_job(data, tmp_path_factory.mktemp("ckpt"))
    cluster = ps_module_group.start(2)
    client = cluster.client()
    run_worker(job, client, WorkerContext(device="cpu"), progress=False)
    info = latest_checkpoint(job.training.checkpoint_dir)
    assert info is not None and info.step == STEPS
    return Trained(job, client, Path(info.path))


def read_export(vdir: Path, m: mf.ModelManifest, table: str) -> tuple[np.ndarray, np.ndarray]:
    """Every exported (id, row) of ``table``, checking each file's serving shard."""
    spec = m.tables[table]
    ids, rows = [], []
    for rel in m.sst_files(table):
        _, shard, _ = mf.parse_sst_relpath(rel)  # type: ignore[misc]
        i, r = mf.read_sst(vdir / rel, spec.dim, spec.row_format)
        assert len(i) == m.files[rel].rows > 0
        assert (m.shard_map.owners(table, i) == shard).all(), rel
        ids.append(i)
        rows.append(r)
    if not ids:
        return np.empty(0, np.int64), np.empty((0, spec.dim), np.float32)
    return np.concatenate(ids), np.concatenate(rows)


def store_ids(step_dir: Path, table: TableConfig, tmp: Path) -> np.ndarray:
    """The ids a checkpoint holds for ``table``, read back through the training store."""
    out = []
    for shard in sorted(step_dir.glob("shard-*")):
        store = TieredStore(tmp / shard.name / table.name, table, TieredStoreConfig())
        try:
            store.restore(shard / "tables" / table.name)
            out += [b.ids for b in store.items()]
        finally:
            store.close()
    return np.sort(np.concatenate(out))


def first_batches(job: JobConfig, n: int) -> list[Batch]:
    reader = DataReader(data_paths(job)[0], job.data.reader.replace(batch_size=BATCH))
    batches = []
    for b in reader.epoch(0):
        batches.append(b)
        if len(batches) == n:
            break
    return batches


# ---- rows ------------------------------------------------------------------------------------


def test_export_holds_exactly_the_trained_rows_of_the_shards(
    trained: Trained, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    m = export_checkpoint(ExportConfig(str(trained.step_dir), str(root), serving_shards=3))
    vdir = root / f"{STEPS:012d}"
    assert m.path == vdir and m.version == m.step == STEPS
    assert mf.list_versions(root) == [STEPS]
    assert m == mf.ModelManifest.load(vdir)  # every checksum verifies
    assert len(m.shard_map.shards) == 3 and m.shard_map.num_slots == 16384
    assert {f.name for f in m.features} == {*SPARSE, *(f"{c}_wide" for c in SPARSE)}
    assert m.hashing["scheme"] == HASH_SCHEME
    salts = m.hashing["salts"]
    assert set(salts) == {f.name for f in m.features}
    assert salts["C1_wide"] == salts["C1"] == int(feature_salt("C1"))  # the input's salt
    assert m.hashing["missing_ids"]["C3_wide"] == missing_id("C3")
    assert m.delta_seqs == {}  # these shards publish no delta stream: nothing recorded

    for table in trained.job.tables:
        ids, rows = read_export(vdir, m, table.name)
        assert len(ids) == m.tables[table.name].rows == len(np.unique(ids))
        # The same set of ids the training store holds (its own reader, not the exporter's).
        np.testing.assert_array_equal(np.sort(ids), store_ids(trained.step_dir, table, tmp_path))
        ps = trained.client.lookup({table.name: ids}, create_missing=False)[table.name]
        np.testing.assert_array_equal(rows, ps)  # float32: bit for bit
        assert m.tables[table.name].row_format == "float32"
        assert m.tables[table.name].default == (
            {"kind": "zeros"}
            if table.name.endswith("_wide")
            else {
                "kind": "initializer",
                "initializer": {"kind": "uniform", "scale": 0.01, "seed": 0},
            }
        )

    # C2 admits an id on its second lookup batch: ids seen in one batch only have no row.
    batches = first_batches(trained.job, STEPS)
    seen = np.concatenate([np.unique(b.sparse["C2"]) for b in batches])
    uniq, batches_with = np.unique(seen, return_counts=True)
    exported, _ = read_export(vdir, m, "C2")
    once = uniq[batches_with == 1]
    assert len(once) > 0 and not np.isin(once, exported).any()
    assert np.isin(uniq[batches_with >= 2], exported).all()
    c1, _ = read_export(vdir, m, "C1")  # C1 admits at once: every id seen has a row
    assert np.isin(np.concatenate([b.sparse["C1"] for b in batches]), c1).all()


@pytest.mark.parametrize(("quantize", "k"), [("float16", 1), ("int8", 2)])
def test_quantized_rows_stay_within_their_bound(
    trained: Trained, tmp_path: Path, quantize: str, k: int
) -> None:
    root = tmp_path / "models"
    m = export_checkpoint(
        ExportConfig(str(trained.step_dir), str(root), quantize=quantize, serving_shards=k)  # type: ignore[arg-type]
    )
    for table in trained.job.tables:
        spec = m.tables[table.name]
        assert spec.row_format == quantize and spec.train_dtype == "float32"
        ids, rows = read_export(root / f"{STEPS:012d}", m, table.name)
        assert len(ids) == spec.rows > 0
        ps = trained.client.lookup({table.name: ids}, create_missing=False)[table.name]
        if quantize == "float16":
            np.testing.assert_array_equal(rows, ps.astype(np.float16).astype(np.float32))
        else:
            half_step = np.abs(ps).max(axis=1, keepdims=True) / 127 / 2
            assert (np.abs(rows - ps) <= half_step * (1 + 1e-5) + 1e-9).all()
            if spec.dim > 1:  # a dim-1 row is exact in int8 (q = +-127)
                assert not np.array_equal(rows, ps)  # it really quantized


# ---- the dense tower -------------------------------------------------------------------------


_CLEAN_TOWER = """
import sys, torch
tower = torch.jit.load(sys.argv[1])
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    out = tower(inputs["dense"], inputs["pooled"])
torch.save(out, sys.argv[3])
leaked = sorted(m for m in sys.modules if m == "recps" or m.startswith("recps."))
assert not leaked, leaked
"""


def training_model(trained: Trained) -> torch.nn.Module:
    emb = ShardedEmbeddingBagCollection(
        embedding_collection_config(trained.job), trained.client, create_tables=False
    )
    model = build_job_model(trained.job, emb)
    model.load_state_dict(load_dense((trained.step_dir / DENSE_FILE).read_bytes())["model"])
    return model.eval()


def eval_batch(job: JobConfig) -> Batch:
    reader = DataReader(data_paths(job)[1], job.data.reader.replace(batch_size=200))
    return next(iter(reader.epoch(0)))


def test_tower_in_a_clean_interpreter_gives_the_training_logits(
    trained: Trained, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    m = export_checkpoint(ExportConfig(str(trained.step_dir), str(root)))
    model, batch = training_model(trained), eval_batch(trained.job)
    dense = torch.from_numpy(batch.dense)
    with torch.no_grad():
        pooled = model.embeddings(keyed_ids(batch))  # eval: unknown ids create no rows
        want = model.forward_pooled(dense, pooled)
    inputs = {"dense": dense, "pooled": [pooled[f.name] for f in m.features]}
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run(
        [
            sys.executable,
            "-I",  # isolated: no cwd, no PYTHONPATH, so recps could only come in by import
            "-c",
            _CLEAN_TOWER,
            str(root / f"{STEPS:012d}" / mf.TOWER_FILE),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    got = torch.load(tmp_path / "out.pt")
    assert got.shape == (len(batch),)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_exported_rows_and_defaults_reproduce_the_training_scores(
    trained: Trained, tmp_path: Path
) -> None:
    # What a ranking service does: rows from the SST files, the manifest's default vector
    # for ids without one, pooled in the manifest's feature order, through the tower.
    root = tmp_path / "models"
    m = export_checkpoint(ExportConfig(str(trained.step_dir), str(root), serving_shards=2))
    vdir = root / f"{STEPS:012d}"
    tower = torch.jit.load(str(vdir / mf.TOWER_FILE))
    model, batch = training_model(trained), eval_batch(trained.job)
    pooled, missing = [], 0
    for f in m.features:
        spec = m.tables[f.table]
        ids, rows = read_export(vdir, m, f.table)
        order = np.argsort(ids)
        ids, rows = ids[order], rows[order]
        want = batch.sparse[f.input]
        pos = np.minimum(np.searchsorted(ids, want), max(len(ids) - 1, 0))
        found = ids[pos] == want
        out = np.zeros((len(want), spec.dim), np.float32)
        out[found] = rows[pos[found]]
        if spec.default["kind"] == "initializer":
            init = InitializerConfig(**spec.default["initializer"])
            out[~found] = RowInitializer(f.table, spec.dim, init)(want[~found])
        missing += int((~found).sum())
        pooled.append(torch.from_numpy(out))
    assert missing > 0  # the eval split has ids training never saw: defaults are exercised
    dense = torch.from_numpy(batch.dense)
    with torch.no_grad():
        got = tower(dense, pooled)
        want_logits = model(dense, keyed_ids(batch))
    torch.testing.assert_close(got, want_logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["dlrm", "deepfm", "wide_deep"])
def test_traced_tower_matches_every_model_kind_at_any_batch_size(kind: str) -> None:
    job = load_job_config(
        {
            "data": {"train": "unused", "reader": {"dense_features": ["I1", "I2"]}},
            "features": {"C1": {}, "C2": {"table": "C1"}},
            "table_defaults": {"dim": 4},
            "model": {"kind": kind, **({"bottom_mlp": [8, 4]} if kind == "dlrm" else {})},
        }
    )
    torch.manual_seed(1)
    ref = build_job_model(job, LocalEmbeddingBagCollection(embedding_collection_config(job)))
    _, tower, names = build_tower(job, ref.state_dict())
    dims = embedding_collection_config(job).dims
    for b in (1, 7):
        dense = torch.randn(b, 2)
        pooled = {f: torch.randn(b, dims[f]) for f in names}
        with torch.no_grad():
            torch.testing.assert_close(
                tower(dense, [pooled[f] for f in names]), ref.forward_pooled(dense, pooled)
            )


# ---- versions --------------------------------------------------------------------------------


def test_versions_appear_atomically_and_corruption_is_detected(
    trained: Trained, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    cfg = ExportConfig(str(trained.step_dir.parent), str(root), version=5)  # the ckpt dir
    first = export_checkpoint(cfg)
    assert first.step == STEPS and mf.list_versions(root) == [5]
    assert [p.name for p in root.iterdir()] == ["000000000005"]  # no .tmp- left behind
    with pytest.raises(mf.ModelVersionExistsError):
        export_checkpoint(cfg)
    replaced = export_checkpoint(
        ExportConfig(cfg.checkpoint, cfg.out, version=5, quantize="int8", force=True)
    )
    assert replaced.tables["C1"].row_format == "int8"
    assert mf.ModelManifest.load(root / "000000000005").tables["C1"].row_format == "int8"
    assert [p.name for p in root.iterdir()] == ["000000000005"]

    sst = root / "000000000005" / replaced.sst_files("C1")[0]
    data = bytearray(sst.read_bytes())
    data[len(data) // 3] ^= 0x01
    sst.write_bytes(bytes(data))
    with pytest.raises(mf.ChecksumMismatchError) as e:
        mf.ModelManifest.load(root / "000000000005")
    assert e.value.path == replaced.sst_files("C1")[0]


def test_a_failed_export_leaves_no_version(trained: Trained, tmp_path: Path) -> None:
    # A checkpoint whose manifest promises more rows than its RocksDB holds is damaged.
    broken = tmp_path / "ckpt" / trained.step_dir.name
    broken.parent.mkdir()
    subprocess.run(["cp", "-a", str(trained.step_dir), str(broken)], check=True)
    tm = broken / "shard-1" / "tables" / "C3" / "manifest.json"
    doc = json.loads(tm.read_text())
    tm.write_text(json.dumps({**doc, "rows": doc["rows"] + 1}))
    root = tmp_path / "models"
    with pytest.raises(CheckpointError, match="C3"):
        export_checkpoint(ExportConfig(str(broken), str(root)))
    assert list(root.iterdir()) == [] and mf.latest_version(root) is None
    with pytest.raises(CheckpointNotFoundError):
        export_checkpoint(ExportConfig(str(tmp_path / "nothing"), str(root)))


def test_cli_exports_and_refuses_an_existing_version(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    args = ["--checkpoint", str(trained.step_dir), "--out", str(root), "--json"]
    assert export_cmds.main([*args, "--quantize", "float16", "--batch-rows", "7"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["version"] == STEPS and out["row_format"] == ["float16"]
    assert out["tables"] == {
        t: s.rows for t, s in mf.ModelManifest.load(root / f"{STEPS:012d}").tables.items()
    }
    assert export_cmds.main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert export_cmds.main([*args, "--batch-rows", "0"]) == 2


def test_cli_registers_the_export_subcommand() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="recps")
    export_cmds.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--checkpoint", "c", "--out", "m", "--quantize", "int8"])
    assert (args.quantize, args.serving_shards, args.batch_rows) == ("int8", None, 65536)
    sub = parser._subparsers._group_actions[0].choices["export"]  # type: ignore[union-attr]
    assert "Example: recps export" in sub.format_help()


# ---- streaming -------------------------------------------------------------------------------


def test_export_streams_a_table_bigger_than_its_batches(tmp_path: Path) -> None:
    n, dim = 200_000, 16
    table = TableConfig("big", dim=dim)
    store = TieredStore(tmp_path / "store", table, TieredStoreConfig(durability="async"))
    ids = np.random.default_rng(0).choice(1 << 62, n, replace=False).astype(np.int64) - (1 << 61)
    for i in range(0, n, 50_000):
        chunk = ids[i : i + 50_000]
        store.lookup(chunk)
        store.apply_gradients(chunk, np.ones((len(chunk), dim), np.float32))
    store.checkpoint(tmp_path / "ckpt")
    store.close()
    table_bytes = n * dim * 4  # 12.8 MB of float32 rows alone
    serving = ShardMap.even(["a", "b"], num_slots=1024)

    def peak(batch_rows: int, out: Path) -> tuple[int, int]:
        tracemalloc.start()
        try:
            res = export_table(
                table,
                [(0, tmp_path / "ckpt" / "rocksdb")],
                out,
                serving,
                "float32",
                batch_rows,
                True,
            )
            return res.rows, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    rows, small = peak(4096, tmp_path / "small")
    assert rows == n
    assert small < table_bytes / 4, f"peak {small} bytes for a {table_bytes}-byte table"
    # The same measurement does see a whole table when the batch is the table.
    _, whole = peak(n, tmp_path / "whole")
    assert whole > table_bytes, whole
    got = np.concatenate(
        [mf.read_sst(p, dim, "float32")[0] for p in sorted((tmp_path / "small").rglob("*.sst"))]
    )
    np.testing.assert_array_equal(np.sort(got), np.sort(ids))


# ---- untrained rows (runs last: it adds rows to the shared shards) ----------------------------


def test_untrained_rows_are_left_to_the_default_vector(trained: Trained, tmp_path: Path) -> None:
    fresh = np.arange(10**15, 10**15 + 50, dtype=np.int64)  # ids no data row has
    born = trained.client.lookup({"C1": fresh})["C1"]  # stored now, never updated (count 0)
    tag = "step-00000099"
    trained.client.checkpoint(str(tmp_path / "ckpt"), tag)
    step_dir = tmp_path / "ckpt" / tag
    shutil.copy(trained.step_dir / DENSE_FILE, step_dir / DENSE_FILE)
    meta = read_checkpoint(trained.step_dir).meta or {}
    finish_checkpoint(step_dir, {"job": meta["job"], "step": 99})

    init = export_checkpoint(ExportConfig(str(step_dir), str(tmp_path / "a")))
    zeros = export_checkpoint(
        ExportConfig(str(step_dir), str(tmp_path / "b"), default_vector="zeros")
    )
    ids_init, _ = read_export(tmp_path / "a" / f"{99:012d}", init, "C1")
    ids_zeros, rows_zeros = read_export(tmp_path / "b" / f"{99:012d}", zeros, "C1")
    assert not np.isin(fresh, ids_init).any()
    assert zeros.tables["C1"].rows == init.tables["C1"].rows + len(fresh)
    assert zeros.tables["C1"].default == {"kind": "zeros"}
    # Skipping them loses nothing: the default vector a replica serves is the stored row.
    default = init.tables["C1"].default
    assert default["kind"] == "initializer"
    init_cfg = InitializerConfig(**default["initializer"])
    np.testing.assert_array_equal(RowInitializer("C1", 8, init_cfg)(fresh), born)
    order = np.argsort(ids_zeros)
    pos = np.searchsorted(ids_zeros[order], fresh)
    np.testing.assert_array_equal(rows_zeros[order][pos], born)


def test_format_and_exporter_import_no_training_stack() -> None:
    # A replica imports model_format; even the exporter loads worker/torch only when run.
    code = (
        "import sys, json; import recps.serving.model_format, recps.serving.export; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = set(json.loads(out.stdout))
    heavy = {"torch", "ray", "grpc", "recps.worker"}
    assert not {m for m in loaded if m.split(".")[0] in heavy or m.startswith("recps.worker")}
    assert "rocksdict" in loaded
