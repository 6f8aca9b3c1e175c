"""The YAML job config: round-trips, defaults, and an error that names its path for each
way a field can be wrong (no sockets, no processes, no Ray)."""

from __future__ import annotations

import doctest
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from recps.embedding.config import InitializerConfig, OptimizerConfig, TableConfig
from recps.embedding.errors import ConfigError
from recps.worker import job_config
from recps.worker.data import CRITEO_DENSE, CRITEO_SPARSE
from recps.worker.job_config import JobConfig, JobConfigError, load_job_config

FULL = """
name: criteo-deepfm
data:
  train: /data/criteo/train
  eval: /data/criteo/eval
  batch_size: 1024
  reader:
    label: clicked
    dense_features: [d1, d2]
    sparse_features: [user, item, site]
    multi_id_features: [history]
    shuffle_files: true
    shuffle_buffer_rows: 10000
    file_format: parquet
table_defaults:
  dim: 32
  initializer: {kind: normal, scale: 0.05, seed: 11}
  optimizer: {kind: adagrad, lr: 0.05, initial_accumulator: 0.1}
tables:
  - name: user
    admission: {min_count: 3, sketch_width: 1024, sketch_depth: 2}
    expiry: {ttl_s: 86400, sweep_interval_s: 600}
  - name: item_shared
    dtype: float16
    optimizer: {kind: adam, lr: 1e-3, beta1: 0.8}
    nonfinite: skip
features:
  user: {}
  item: item_shared
  history: {table: item_shared, pooling: mean}
  site: {pooling: sum}
  user_wide: {input: user}
model:
  kind: deepfm
  deep_mlp: [400, 400, 400]
dense_optimizer: {kind: sgd, lr: 0.1, momentum: 0.9, weight_decay: 1.0e-5}
training:
  steps: 50000
  eval_every_steps: 1000
  checkpoint_every_steps: 5000
  checkpoint_dir: /ckpt/deepfm
  resume: true
  max_inflight_pushes: 0
  prefetch_batches: 4
  seed: 42
  log_every_steps: 10
cluster:
  address: ray://head:10001
  num_workers: 8
  num_shards: 4
  cpus_per_worker: 4
  cpus_per_shard: 2
  gpus_per_worker: 1
  memory_mb: 4096
  durability: sync
  data_dir: /mnt/recps/deepfm
  num_slots: 4096
  placement_strategy: STRICT_SPREAD
  max_restarts: -1
"""

MINIMAL: dict[str, Any] = {"data": {"train": "/data/criteo"}}


def docstring_example() -> str:
    """The example job in recps.worker.job_config's module docstring."""
    doc = job_config.__doc__ or ""
    lines = doc.split("An example job", 1)[1].split("::\n", 1)[1].splitlines()
    block = []
    for line in lines:
        if line.strip() and not line.startswith("    "):
            break  # the first unindented line ends the literal block
        block.append(line)
    assert len(block) > 20
    return textwrap.dedent("\n".join(block))


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with ``value`` at the dotted ``path`` (``"a.b.c"``)."""
    out = yaml.safe_load(yaml.safe_dump(base))
    node = out
    *parents, leaf = path.split(".")
    for k in parents:
        node = node.setdefault(k, {})
    node[leaf] = value
    return out


def error_of(raw: Any) -> JobConfigError:
    with pytest.raises(JobConfigError) as e:
        load_job_config(raw)
    assert isinstance(e.value, ConfigError)
    assert str(e.value) == f"{e.value.path}: {e.value.problem}" or not e.value.path
    return e.value


# ---- valid configs ------------------------------------------------------------------------------


def test_full_config_maps_every_section() -> None:
    cfg = load_job_config(yaml.safe_load(FULL))
    assert cfg.name == "criteo-deepfm"
    r = cfg.data.reader
    assert (r.batch_size, r.label, r.dense_features) == (1024, "clicked", ("d1", "d2"))
    assert r.multi_id_features == ("history",) and r.file_format == "parquet"
    user, item = cfg.table("user"), cfg.table("item_shared")
    assert [t.name for t in cfg.tables] == ["user", "item_shared", "site", "user_wide"]
    assert user.dim == item.dim == cfg.table("site").dim == 32
    assert user.optimizer == OptimizerConfig("adagrad", lr=0.05, initial_accumulator=0.1)
    assert user.admission.min_count == 3 and user.expiry.ttl_s == 86400.0
    assert user.initializer.kind == "normal" and user.initializer.seed == 11
    # Per-table values merge over table_defaults key by key; "1e-3" (a string to PyYAML)
    # is read as a number.
    assert item.optimizer.kind == "adam" and item.optimizer.lr == 1e-3
    assert item.optimizer.beta1 == 0.8 and item.optimizer.initial_accumulator == 0.1
    assert item.dtype == "float16" and item.nonfinite == "skip"
    assert cfg.table("site") == TableConfig(  # made from table_defaults alone
        "site",
        32,
        initializer=InitializerConfig("normal", scale=0.05, seed=11),
        optimizer=OptimizerConfig("adagrad", lr=0.05, initial_accumulator=0.1),
    )
    wide = cfg.table("user_wide")  # first-order weights: dim 1, zeros, else the defaults
    assert wide.dim == 1 and wide.initializer.kind == "zeros" and wide.optimizer.lr == 0.05
    feats = {f.name: (f.table, f.pooling, f.source) for f in cfg.features}
    assert feats == {
        "user": ("user", "sum", "user"),
        "item": ("item_shared", "sum", "item"),
        "history": ("item_shared", "mean", "history"),
        "site": ("site", "sum", "site"),
        "user_wide": ("user_wide", "sum", "user"),
    }
    assert cfg.model.kind == "deepfm" and cfg.model.bottom_mlp is cfg.model.top_mlp is None
    assert cfg.model.model_kwargs() == {"deep_mlp": (400, 400, 400)}
    assert cfg.dense_optimizer.momentum == 0.9 and cfg.dense_optimizer.weight_decay == 1e-5
    t = cfg.training
    assert (t.epochs, t.steps, t.resume, t.max_inflight_pushes) == (None, 50000, "latest", 0)
    c = cfg.cluster
    assert c.address == "ray://head:10001" and c.gpus_per_worker == 1.0
    assert (c.num_shards, c.num_slots, c.max_restarts) == (4, 4096, -1)
    assert c.placement_strategy == "STRICT_SPREAD" and c.durability == "sync"


def test_full_config_round_trips_through_to_dict_and_yaml() -> None:
    cfg = load_job_config(yaml.safe_load(FULL))
    d = cfg.to_dict()
    assert "batch_size" not in d["data"]["reader"]  # one place to set it: data.batch_size
    assert load_job_config(d) == cfg
    assert load_job_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert load_job_config(yaml.safe_load(yaml.safe_dump(d))).to_dict() == d


def test_minimal_config_defaults() -> None:
    cfg = load_job_config(MINIMAL)
    assert cfg.name == "recps-job"
    assert cfg.data.train == "/data/criteo" and cfg.data.eval is None and cfg.data.synth is None
    assert cfg.data.batch_size == cfg.data.reader.batch_size == 4096
    assert cfg.data.reader.dense_features == CRITEO_DENSE
    # C1..C26, each in a table of its own name, with the default table settings.
    assert [(f.name, f.table, f.pooling) for f in cfg.features] == [
        (c, c, "sum") for c in CRITEO_SPARSE
    ]
    assert cfg.tables == tuple(TableConfig(c, dim=16) for c in CRITEO_SPARSE)
    assert cfg.model.kind == "dlrm" and cfg.model.deep_mlp is None
    assert cfg.model.model_kwargs() == {"bottom_mlp": (64, 16), "top_mlp": (64, 32)}
    assert cfg.dense_optimizer.kind == "adam" and cfg.dense_optimizer.lr == 1e-3
    t = cfg.training
    assert (t.epochs, t.steps, t.eval_every_steps, t.resume) == (1, None, None, None)
    assert (t.max_inflight_pushes, t.prefetch_batches) == (0, 2)  # as the pipeline defaults
    assert t.keep_checkpoints == 3
    assert t.checkpoint_dir == str(Path("recps-data") / "checkpoints")
    c = cfg.cluster
    assert c.address is None and (c.num_workers, c.num_shards) == (1, 1)
    assert (c.durability, c.placement_strategy, c.data_dir) == ("async", "SPREAD", "recps-data")
    assert load_job_config(cfg.to_dict()) == cfg


def test_docstring_example_loads_and_round_trips() -> None:
    cfg = load_job_config(yaml.safe_load(docstring_example()))
    assert cfg.data.synth is not None and cfg.data.synth.rows == 200_000
    assert cfg.data.synth.dir == "/tmp/recps-job/synth"  # under cluster.data_dir
    assert cfg.training.checkpoint_dir == "/tmp/recps-job/checkpoints"
    assert cfg.data.reader.sparse_features == ("C1", "C2", "C3")  # the features name them
    assert [t.name for t in cfg.tables] == ["C3", "shared_site"]
    assert cfg.table("shared_site").optimizer.kind == "adam"
    assert cfg.table("C3").optimizer.lr == 0.05  # from table_defaults
    assert load_job_config(cfg.to_dict()) == cfg


def test_a_file_resolves_relative_paths_against_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "jobs" / "job.yaml"
    path.parent.mkdir()
    path.write_text("data: {train: ../criteo, eval: /abs/eval}\ntraining: {epochs: 2}\n")
    cfg = load_job_config(path)
    jobs = tmp_path.resolve() / "jobs"
    assert cfg.data.train == str(jobs / "../criteo")
    assert cfg.data.eval == "/abs/eval"
    assert cfg.cluster.data_dir == str(jobs / "recps-data")
    assert cfg.training.checkpoint_dir == str(jobs / "recps-data" / "checkpoints")
    assert load_job_config(str(path)) == cfg


def test_synth_data_and_features_shorthand() -> None:
    cfg = load_job_config({"data": {"synth": {"rows": 5000}}, "cluster": {"data_dir": "/d"}})
    assert cfg.data.synth is not None and cfg.data.has_eval
    assert cfg.data.synth.synth_config().rows == 5000
    assert cfg.data.synth.dir == "/d/synth"
    cfg = load_job_config({**MINIMAL, "training": {"resume": False}, "features": {"C1": "t"}})
    assert cfg.training.resume is None and cfg.data.reader.sparse_features == ("C1",)
    assert [t.name for t in cfg.tables] == ["t"]


def test_deepfm_and_wide_deep_add_first_order_tables() -> None:
    cfg = load_job_config(
        {**MINIMAL, "model": {"kind": "wide_deep"}, "tables": [{"name": "C1", "dim": 8}]}
    )
    assert cfg.model.model_kwargs() == {"deep_mlp": (64, 32)}
    assert cfg.table("C1").dim == 8 and cfg.table("C2").dim == 16  # wide_deep mixes dims
    assert len(cfg.features) == len(cfg.tables) == 52
    w = cfg.features[26]
    assert (w.name, w.table, w.source) == ("C1_wide", "C1_wide", "C1")
    assert cfg.table("C1_wide") == TableConfig("C1_wide", 1, initializer=InitializerConfig("zeros"))
    assert load_job_config(cfg.to_dict()) == cfg
    deepfm = load_job_config({**MINIMAL, "model": {"kind": "deepfm"}})
    assert [t.dim for t in deepfm.tables] == [16] * 26 + [1] * 26


# ---- errors -------------------------------------------------------------------------------------

ERRORS = [
    # (where, value, path in the message, words of the problem)
    (
        "tables",
        [{"name": "C1"}, {"name": "C2"}, {"name": "C3", "dim": 0}],
        "tables[2].dim",
        "must be in [1, 4096], got 0",
    ),
    ("tables", [{"name": "C1", "dim": "16"}], "tables[0].dim", "must be an integer"),
    ("tables", [{"dim": 16}], "tables[0].name", "is required"),
    ("tables", [{"name": "a b"}], "tables[0].name", "must match"),
    ("tables", [{"name": "C1"}, {"name": "C1"}], "tables[1].name", "already defined at tables[0]"),
    ("tables", [{"name": "unused"}], "tables[0].name", "no feature uses table 'unused'"),
    ("tables", {"name": "C1"}, "tables", "must be a list"),
    (
        "tables",
        [{"name": "C1", "optimizer": {"kind": "adamw"}}],
        "tables[0].optimizer.kind",
        "did you mean 'adam'?",
    ),
    ("tables", [{"name": "C1", "optimizer": {"lr": 0}}], "tables[0].optimizer.lr", "must be > 0"),
    (
        "tables",
        [{"name": "C1", "optimizer": {"beta2": 1}}],
        "tables[0].optimizer.beta2",
        "must be in [0, 1)",
    ),
    (
        "tables",
        [{"name": "C1", "initializer": {"scale": -1}}],
        "tables[0].initializer.scale",
        "must be >= 0",
    ),
    (
        "tables",
        [{"name": "C1", "admission": {"min_count": 0}}],
        "tables[0].admission.min_count",
        "must be in [1, 65535]",
    ),
    (
        "tables",
        [{"name": "C1", "admission": {"sketch_width": 1000}}],
        "tables[0].admission.sketch_width",
        "power of two",
    ),
    ("tables", [{"name": "C1", "expiry": {"ttl_s": 0}}], "tables[0].expiry.ttl_s", "must be > 0"),
    (
        "tables",
        [{"name": "C1", "dtype": "bfloat16"}],
        "tables[0].dtype",
        "one of 'float32', 'float16'",
    ),
    ("tables", [{"name": "C1", "optimizer": "adam"}], "tables[0].optimizer", "must be a mapping"),
    ("tables", [{"name": "C1", "dim": 32}], "tables", "one dim for every embedding"),
    ("table_defaults", {"dim": 1}, "tables", "needs a feature whose table has dim > 1"),
    ("table_defaults", {"dim": 5000}, "table_defaults.dim", "must be in [1, 4096], got 5000"),
    ("table_defaults", {"name": "x"}, "table_defaults.name", "each table names itself"),
    ("data", None, "data", "is required"),
    ("data", {}, "data.train", "is required"),
    ("data", {"train": 7}, "data.train", "must be a string"),
    ("data", {"train": "x", "synth": {}}, "data.train", "not both"),
    ("data", {"synth": {}, "eval": "e"}, "data.eval", "own eval split"),
    ("data", {"synth": {"eval_fraction": 1.5}}, "data.synth.eval_fraction", "must be in (0, 1)"),
    ("data", {"train": "x", "batch_size": 0}, "data.batch_size", "must be in [1, "),
    (
        "data",
        {"train": "x", "reader": {"batch_size": 8}},
        "data.reader.batch_size",
        "set data.batch_size instead",
    ),
    (
        "data",
        {"train": "x", "reader": {"file_format": "csv"}},
        "data.reader.file_format",
        "one of 'auto', 'parquet', 'tsv'",
    ),
    (
        "data",
        {"train": "x", "reader": {"sparse_features": "C1"}},
        "data.reader.sparse_features",
        "must be a list of strings",
    ),
    (
        "data",
        {"train": "x", "reader": {"shuffle_buffer_rows": -1}},
        "data.reader.shuffle_buffer_rows",
        "must be >= 0",
    ),
    ("data", {"train": "x", "reader": {"label": "C1"}}, "data.reader", "named more than once"),
    (
        "data",
        {"train": "x", "reader": {"dense_features": []}},
        "data.reader.dense_features",
        "dlrm needs at least one dense feature",
    ),
    ("features", {"C1": {"pooling": "max"}}, "features.C1.pooling", "one of 'sum', 'mean'"),
    ("features", {"C1": {"table": "no such"}}, "features.C1.table", "must match"),
    ("features", {"C1": {}, "C1w": {"input": 3}}, "features.C1w.input", "must be a string"),
    ("features", {"C1": 3}, "features.C1", "must be a mapping"),
    ("features", [], "features", "must be a mapping of feature -> table"),
    ("model", {"kind": "dlrn"}, "model.kind", "did you mean 'dlrm'?"),
    ("model", {"bottom_mlp": [64, 32]}, "model.bottom_mlp", "embedding dim 16"),
    ("model", {"top_mlp": [64, 0]}, "model.top_mlp", "layer sizes"),
    ("model", {"deep_mlp": [64]}, "model.deep_mlp", "dlrm has no deep_mlp"),
    ("model", {"kind": "deepfm", "top_mlp": [8]}, "model.top_mlp", "settings are deep_mlp"),
    ("model", {"kind": "wide_deep", "deep_mlp": "64"}, "model.deep_mlp", "must be a list of"),
    ("dense_optimizer", {"kind": "lamb"}, "dense_optimizer.kind", "one of 'adam', 'adagrad'"),
    ("dense_optimizer", {"lr": -1}, "dense_optimizer.lr", "must be > 0, got -1"),
    ("dense_optimizer", {"momentum": 0.9}, "dense_optimizer.momentum", "only sgd"),
    ("training", {"epochs": 1, "steps": 10}, "training.steps", "not both"),
    ("training", {"epochs": 0}, "training.epochs", "must be >= 1, got 0"),
    ("training", {"steps": 2.5}, "training.steps", "must be an integer, got 2.5"),
    ("training", {"eval_every_steps": 10}, "training.eval_every_steps", "no eval data"),
    ("training", {"max_inflight_pushes": 100}, "training.max_inflight_pushes", "[0, 64]"),
    ("training", {"resume": 3}, "training.resume", "a string or true or false or null"),
    ("training", {"seed": True}, "training.seed", "must be an integer"),
    ("training", {"keep_checkpoints": 0}, "training.keep_checkpoints", "must be >= 1, got 0"),
    ("cluster", {"num_shards": 0}, "cluster.num_shards", "must be in [1, 65534], got 0"),
    ("cluster", {"num_workers": "2"}, "cluster.num_workers", "must be an integer"),
    ("cluster", {"cpus_per_shard": 0}, "cluster.cpus_per_shard", "must be > 0"),
    ("cluster", {"gpus_per_worker": -1}, "cluster.gpus_per_worker", "must be >= 0"),
    ("cluster", {"memory_mb": 0}, "cluster.memory_mb", "must be >= 1"),
    ("cluster", {"durability": "fsync"}, "cluster.durability", "did you mean 'sync'?"),
    ("cluster", {"num_slots": 1000}, "cluster.num_slots", "power of two"),
    ("cluster", {"num_slots": 2, "num_shards": 4}, "cluster.num_shards", "at least as many slots"),
    (
        "cluster",
        {"placement_strategy": "spread"},
        "cluster.placement_strategy",
        "did you mean 'SPREAD'?",
    ),
    ("cluster", {"address": ""}, "cluster.address", "must not be empty"),
    ("cluster", {"cpus_per_worker": float("nan")}, "cluster.cpus_per_worker", "finite"),
    ("name", "my job", "name", "must match"),
]


@pytest.mark.parametrize(("where", "value", "path", "problem"), ERRORS)
def test_every_error_names_its_yaml_path(where: str, value: Any, path: str, problem: str) -> None:
    raw: dict[str, Any] = {**MINIMAL, where: value}
    if where == "data" and value is None:
        raw = {"model": {}}
    e = error_of(raw)
    assert e.path == path, str(e)
    assert problem in e.problem, str(e)
    assert str(e).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("raw", "path", "suggestion"),
    [
        ({**MINIMAL, "trainig": {}}, "trainig", "did you mean 'training'?"),
        ({**MINIMAL, "training": {"eval_every": 5}}, "training.eval_every", "'eval_every_steps'"),
        ({**MINIMAL, "training": {"staleness": 1}}, "training.staleness", "'max_inflight_pushes'"),
        ({**MINIMAL, "training": {"prefetch": 1}}, "training.prefetch", "'prefetch_batches'"),
        ({**MINIMAL, "cluster": {"num_shard": 2}}, "cluster.num_shard", "'num_shards'"),
        ({**MINIMAL, "cluster": {"Durability": "sync"}}, "cluster.Durability", "'durability'"),
        ({"data": {"train": "x", "batchsize": 8}}, "data.batchsize", "'batch_size'"),
        (
            {**MINIMAL, "tables": [{"name": "C1", "optimizer": {"learning_rate": 1}}]},
            "tables[0].optimizer.learning_rate",
            "did you mean 'lr'?",
        ),
        (
            {**MINIMAL, "tables": [{"name": "C1", "optimizer": {"zzz": 1}}]},
            "tables[0].optimizer.zzz",
            "",
        ),
        (
            {**MINIMAL, "tables": [{"name": "C1", "optimiser": {}}]},
            "tables[0].optimiser",
            "did you mean 'optimizer'?",
        ),
        ({**MINIMAL, "model": {"bottom": [1]}}, "model.bottom", "did you mean 'bottom_mlp'?"),
    ],
)
def test_unknown_keys_suggest_the_closest(raw: dict[str, Any], path: str, suggestion: str) -> None:
    e = error_of(raw)
    assert e.path == path and e.problem.startswith("unknown key"), str(e)
    assert suggestion in e.problem, str(e)
    if not suggestion:  # nothing close: list what exists
        assert "known keys: kind, lr, eps" in e.problem, str(e)


def test_features_and_reader_columns_must_agree() -> None:
    data = {"train": "x", "reader": {"sparse_features": ["C1", "C2"]}}
    e = error_of({"data": data, "features": {"C1": {}, "C99": {}}})
    assert e.path == "features.C99" and "is not a categorical column" in e.problem
    e = error_of({"data": data, "features": {"C1": {}}})
    assert e.path == "features" and "reads ['C2'] but no feature uses them" in e.problem


def test_module_docstring_examples_run() -> None:
    result = doctest.testmod(job_config, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def test_file_errors(tmp_path: Path) -> None:
    assert "no job config at" in str(error_of(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: x\n")
    assert "is not valid YAML" in str(error_of(bad)) and "line" in str(error_of(bad))
    dup = tmp_path / "dup.yaml"
    dup.write_text("data: {train: x}\ntraining: {epochs: 1}\ntraining: {steps: 5}\n")
    assert "'training' appears twice" in str(error_of(dup))
    top = tmp_path / "list.yaml"
    top.write_text("- data\n")
    assert "the top level must be a mapping" in str(error_of(top))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert error_of(empty).path == "data"


def test_config_objects_validate_when_built_in_python() -> None:
    with pytest.raises(JobConfigError, match=r"^num_shards: must be in \[1, 65534\], got 0$"):
        job_config.JobClusterConfig(num_shards=0)
    with pytest.raises(JobConfigError, match="steps: set epochs or steps, not both"):
        job_config.TrainingConfig(epochs=1, steps=1)
    cfg = JobConfig(data=job_config.DataConfig(train="/data/criteo"))  # features, tables derived
    assert cfg == load_job_config(MINIMAL)
    with pytest.raises(JobConfigError, match=r"^tables\[0\].name: no feature uses table 'zz'"):
        JobConfig(data=job_config.DataConfig(train="x"), tables=(TableConfig("zz", 16),))
