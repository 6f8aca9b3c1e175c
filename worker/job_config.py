"""The job config of ``recps train --config job.yaml``: frozen dataclasses, validated up front.

Every section is checked before anything starts (no Ray, no shard, no data read). A bad
field raises :class:`JobConfigError` naming its YAML path, e.g.
``tables[2].dim: must be in [1, 4096], got 0``; an unknown key says which keys exist and
suggests the closest (``training.eval_every: unknown key (did you mean 'eval_every_steps'?)``).

An example job (``name`` is optional; every section but ``data`` may be left out)::

    name: criteo-dlrm
    data:
      synth: {rows: 200000, seed: 7}   # or: train: /data/criteo/train, eval: /data/criteo/eval
      batch_size: 2048
      reader: {shuffle_buffer_rows: 65536, shuffle_files: true}
    table_defaults:                    # merged into every table; also makes unlisted ones
      dim: 16
      optimizer: {kind: adagrad, lr: 0.05}
    tables:
      - name: C3
        admission: {min_count: 2}
        expiry: {ttl_s: 86400}
      - name: shared_site
        optimizer: {kind: adam, lr: 0.01}
    features:                          # default: C1..C26, each into its own table
      C1: shared_site
      C2: {table: shared_site, pooling: sum}
      C3: {}                           # {table, pooling, input}; input: the column read
    model:
      kind: dlrm                       # dlrm | deepfm | wide_deep (those two: deep_mlp)
      bottom_mlp: [64, 16]             # dlrm: the last size is the embedding dim
      top_mlp: [128, 64]
    dense_optimizer: {kind: adam, lr: 0.001}
    training:
      epochs: 2                        # or: steps: 10000
      eval_every_steps: 500
      checkpoint_every_steps: 1000
      keep_checkpoints: 3              # the newest complete checkpoints kept on disk
      max_inflight_pushes: 2           # bounded staleness: pushes not yet acknowledged
      prefetch_batches: 2
      seed: 0
    cluster:
      address: null                    # null: a local Ray; else ray://... or host:port
      num_workers: 2
      num_shards: 2
      cpus_per_worker: 1
      cpus_per_shard: 1
      memory_mb: 256                   # hot tier per table per shard
      durability: sync
      data_dir: /tmp/recps-job

**Defaults that depend on other sections** are filled in at load time, so
:meth:`JobConfig.to_dict` shows the whole job: ``features`` come from the reader's
``sparse_features`` (+ ``multi_id_features``), each into a table of its own name, and for
deepfm and wide_deep also into a dim-1 table ``<column>_wide`` (first-order weights); a table
that a feature names but ``tables`` does not list is made from ``table_defaults`` (a
``*_wide`` one with dim 1 and zero init); dlrm's ``bottom_mlp`` is ``[64, dim]``;
``training.checkpoint_dir`` is ``<data_dir>/checkpoints`` and ``data.synth.dir`` is
``<data_dir>/synth``. When the config comes from a file, relative paths are relative to
that file's folder.

Example:
    >>> cfg = load_job_config({"data": {"train": "/data/criteo"}})
    >>> len(cfg.features), cfg.tables[0].name, cfg.tables[0].dim, cfg.model.bottom_mlp
    (26, 'C1', 16, (64, 16))
    >>> load_job_config({"data": {"train": "x"}, "tables": [{"name": "C1", "dim": 0}]})
    Traceback (most recent call last):
    ...
    recps.worker.job_config.JobConfigError: tables[0].dim: must be in [1, 4096], got 0
    >>> load_job_config({"data": {"train": "x"}, "trainig": {}})
    Traceback (most recent call last):
    ...
    recps.worker.job_config.JobConfigError: trainig: unknown key (did you mean 'training'?)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from recps.embedding.config import (
    AdmissionConfig,
    ExpiryConfig,
    InitializerConfig,
    OptimizerConfig,
    TableConfig,
)
from recps.embedding.errors import ConfigError
from recps.ps.routing import DEFAULT_NUM_SLOTS
from recps.worker.data import ReaderConfig
from recps.worker.synth import SynthConfig

ModelKind = Literal["dlrm", "deepfm", "wide_deep"]
DenseOptimizerKind = Literal["adam", "adagrad", "sgd"]
Pooling = Literal["sum", "mean"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]

DEFAULT_TABLE_DIM = 16  # DLRM's usual Criteo embedding size; small enough for a laptop
DEFAULT_MLP = (64, 32)  # small: the embeddings hold most of a CTR model's capacity
WIDE_SUFFIX = "_wide"  # a dim-1 table of first-order weights (deepfm, wide_deep)
TOP_LEVEL_KEYS = (
    "name",
    "data",
    "table_defaults",
    "tables",
    "features",
    "model",
    "dense_optimizer",
    "training",
    "cluster",
)
# Names people reach for that difflib cannot connect to ours.
_ALIASES = {
    "staleness": "max_inflight_pushes",
    "max_staleness": "max_inflight_pushes",
    "prefetch": "prefetch_batches",
    "workers": "num_workers",
    "shards": "num_shards",
    "memory": "memory_mb",
    "optim": "optimizer",
    "init": "initializer",
    "embedding_dim": "dim",
    "learning_rate": "lr",
}


class JobConfigError(ConfigError):
    """A job config value is wrong; ``path`` is where in the YAML (``tables[2].dim``)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}" if path else problem)

    def under(self, prefix: str) -> JobConfigError:
        """The same error, re-rooted under ``prefix`` (a section's own path)."""
        return JobConfigError(_join(prefix, self.path), self.problem)


# ---- small validation vocabulary --------------------------------------------------------------

Check = Callable[[Any], "str | None"]  # value -> problem, or None when fine


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _between(lo: float, hi: float, *, hi_open: bool = False) -> Check:
    close = ")" if hi_open else "]"

    def check(v: Any) -> str | None:
        ok = _is_num(v) and lo <= v and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in [{lo:g}, {hi:g}{close}, got {v!r}"

    return check


def _at_least(lo: float) -> Check:
    return lambda v: None if _is_num(v) and v >= lo else f"must be >= {lo:g}, got {v!r}"


def _above(lo: float) -> Check:
    return lambda v: None if _is_num(v) and v > lo else f"must be > {lo:g}, got {v!r}"


def _power_of_two(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and lo <= v <= hi and v & (v - 1) == 0
        return None if ok else f"must be a power of two in [{lo}, {hi}], got {v!r}"

    return check


def _pattern(regex: re.Pattern[str]) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, str) and regex.match(v)
        return None if ok else f"must match {regex.pattern}, got {v!r}"

    return check


def _layers(v: Any) -> str | None:
    if not all(isinstance(n, int) and 1 <= n <= 65536 for n in v):
        return f"layer sizes must be integers in [1, 65536], got {list(v)}"
    return None


def _nonempty(v: Any) -> str | None:
    return None if v else "must not be empty"


def _run_checks(obj: Any, checks: Mapping[str, Check]) -> None:
    """Run ``checks`` on ``obj``'s fields (None values are skipped: "not set")."""
    for name, check in checks.items():
        value = getattr(obj, name)
        if value is not None and (problem := check(value)):
            raise JobConfigError(name, problem)


def _require(cond: bool, path: str, problem: str) -> None:
    if not cond:
        raise JobConfigError(path, problem)


# Field checks for the classes this module does not own, so a bad value names its field
# (their own __post_init__ still runs; its message is then prefixed with the object's path).
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_FOREIGN_CHECKS: dict[type, dict[str, Check]] = {
    TableConfig: {"name": _pattern(_TABLE_NAME), "dim": _between(1, 4096)},
    InitializerConfig: {"scale": _at_least(0)},
    OptimizerConfig: {
        "lr": _above(0),
        "eps": _at_least(0),
        "initial_accumulator": _at_least(0),
        "beta1": _between(0, 1, hi_open=True),
        "beta2": _between(0, 1, hi_open=True),
        "weight_decay": _at_least(0),
        "ftrl_beta": _at_least(0),
        "l1": _at_least(0),
        "l2": _at_least(0),
    },
    AdmissionConfig: {
        "min_count": _between(1, 65535),
        "sketch_width": _power_of_two(64, 1 << 30),
        "sketch_depth": _between(1, 8),
    },
    ExpiryConfig: {"ttl_s": _above(0), "sweep_interval_s": _above(0)},
    ReaderConfig: {
        "read_batch_rows": _above(0),
        "tsv_block_bytes": _above(0),
        "interleave_rows": _above(0),
        "shuffle_buffer_rows": _at_least(0),
    },
}
# Keys a section must not take, and what to do instead.
_EXCLUDED: dict[type, dict[str, str]] = {
    ReaderConfig: {"batch_size": "set data.batch_size instead"},
}


# ---- sections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthDataConfig:
    """Generate a synthetic Criteo-shaped dataset (:mod:`recps.worker.synth`) to train on."""

    rows: int = 1_000_000  # train + eval
    seed: int = 0
    eval_fraction: float = 0.1
    num_files: int = 4  # per split; >= num_workers lets each worker read whole files
    dir: str | None = None  # where to write it; None: <cluster.data_dir>/synth

    def __post_init__(self) -> None:
        _run_checks(
            self,
            {
                "rows": _at_least(2),
                "eval_fraction": lambda v: (
                    None if _is_num(v) and 0 < v < 1 else f"must be in (0, 1), got {v!r}"
                ),
                "num_files": _at_least(1),
            },
        )

    def synth_config(self) -> SynthConfig:
        return SynthConfig(
            rows=self.rows,
            seed=self.seed,
            eval_fraction=self.eval_fraction,
            num_files=self.num_files,
        )


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from: Parquet/TSV paths, or a synthetic dataset."""

    train: str | None = None  # a file or a directory of part files
    eval: str | None = None
    synth: SynthDataConfig | None = None
    batch_size: int = 4096  # per worker
    reader: ReaderConfig = field(default_factory=ReaderConfig)  # columns, shuffling, ...

    def __post_init__(self) -> None:
        _run_checks(self, {"batch_size": _between(1, 1 << 24)})
        if self.synth is None:
            _require(
                self.train is not None,
                "train",
                "is required: a Parquet/TSV file or directory (or use data.synth: {rows, seed})",
            )
        else:
            _require(self.train is None, "train", "set either data.train or data.synth, not both")
            _require(
                self.eval is None, "eval", "data.synth writes its own eval split; remove data.eval"
            )
        if self.reader.batch_size != self.batch_size:
            object.__setattr__(self, "reader", self.reader.replace(batch_size=self.batch_size))

    @property
    def has_eval(self) -> bool:
        return self.synth is not None or self.eval is not None

    def to_dict(self) -> dict[str, Any]:
        d = _plain(self)
        del d["reader"]["batch_size"]  # data.batch_size is the one place to set it
        return d


@dataclass(frozen=True)
class FeatureConfig:
    """One pooled embedding input of the model: ids from the reader column ``input``, rows
    from ``table`` (as :class:`recps.worker.embedding.FeatureSpec`). Several features may
    share a table, and one column may feed several tables (``C1`` and ``C1_wide``)."""

    name: str
    table: str | None = None  # None: a table named like the feature
    pooling: Pooling = "sum"  # multi-id features: how a row's embeddings combine
    input: str | None = None  # the reader column; None: the feature's own name

    def __post_init__(self) -> None:
        if self.table is None:
            object.__setattr__(self, "table", self.name)
        _run_checks(self, {"table": _pattern(_TABLE_NAME)})

    @property
    def source(self) -> str:
        return self.input or self.name


@dataclass(frozen=True)
class ModelConfig:
    """The dense model around the embedding lookups (:mod:`recps.worker.models`).

    Features of dim > 1 are embeddings; features of dim 1 are the first-order ("wide")
    weights of deepfm and wide_deep. dlrm dots every embedding with the bottom MLP's output.
    """

    kind: ModelKind = "dlrm"
    # dlrm: MLP over the dense features; the last size must equal the embedding dim.
    # None: [64, dim].
    bottom_mlp: tuple[int, ...] | None = None
    top_mlp: tuple[int, ...] | None = None  # dlrm: over the interactions; None: [64, 32]
    deep_mlp: tuple[int, ...] | None = None  # deepfm, wide_deep: the deep tower; None: [64, 32]

    def __post_init__(self) -> None:
        _run_checks(self, {"bottom_mlp": _layers, "top_mlp": _layers, "deep_mlp": _layers})
        mine = ("bottom_mlp", "top_mlp") if self.kind == "dlrm" else ("deep_mlp",)
        for name in ("bottom_mlp", "top_mlp", "deep_mlp"):
            if name not in mine:
                _require(
                    getattr(self, name) is None,
                    name,
                    f"{self.kind} has no {name}; its MLP settings are {' and '.join(mine)}",
                )
        if self.kind == "dlrm" and self.top_mlp is None:
            object.__setattr__(self, "top_mlp", DEFAULT_MLP)
        if self.kind != "dlrm" and self.deep_mlp is None:
            object.__setattr__(self, "deep_mlp", DEFAULT_MLP)

    def model_kwargs(self) -> dict[str, tuple[int, ...]]:
        """The MLP fields of the model's config in :mod:`recps.worker.models` (``num_dense``
        comes from the reader's dense features)."""
        names = ("bottom_mlp", "top_mlp") if self.kind == "dlrm" else ("deep_mlp",)
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class DenseOptimizerConfig:
    """torch optimizer of the dense parameters (the embeddings are optimized on the PS)."""

    kind: DenseOptimizerKind = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only

    def __post_init__(self) -> None:
        _run_checks(
            self,
            {
                "lr": _above(0),
                "weight_decay": _at_least(0),
                "momentum": _between(0, 1, hi_open=True),
            },
        )
        _require(
            self.momentum == 0 or self.kind == "sgd",
            "momentum",
            f"only sgd uses it, not {self.kind}",
        )


@dataclass(frozen=True)
class TrainingConfig:
    """How long to train, when to evaluate and checkpoint, and how far ahead to run."""

    epochs: int | None = None  # None with steps None: 1 epoch
    steps: int | None = None  # per worker; set this or epochs
    eval_every_steps: int | None = None  # None: evaluate at the end of each epoch
    checkpoint_every_steps: int | None = None  # None: checkpoint at the end of each epoch
    checkpoint_dir: str | None = None  # None: <cluster.data_dir>/checkpoints
    keep_checkpoints: int = 3  # the newest complete checkpoints kept; older ones are deleted
    # "latest" (or true): the newest checkpoint in checkpoint_dir; else a tag or a path.
    # None (or false): start fresh.
    resume: str | bool | None = None
    # Bounded staleness: pushes still in flight when the next batch's lookup is sent.
    # 0 is synchronous (exact, as recps.worker.pipeline defaults); 1 overlaps a push with
    # the next step's lookup, for throughput.
    max_inflight_pushes: int = 0
    prefetch_batches: int = 2  # batches read and looked up ahead of the step
    seed: int = 0  # dense weights init and data order
    log_every_steps: int = 100

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise JobConfigError("steps", "set epochs or steps, not both")
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "epochs", 1)
        if self.resume is True:
            object.__setattr__(self, "resume", "latest")
        elif self.resume is False or self.resume == "":
            object.__setattr__(self, "resume", None)
        _run_checks(
            self,
            {
                "epochs": _at_least(1),
                "steps": _at_least(1),
                "eval_every_steps": _at_least(1),
                "checkpoint_every_steps": _at_least(1),
                "keep_checkpoints": _at_least(1),
                "max_inflight_pushes": _between(0, 64),
                "prefetch_batches": _between(0, 64),
                "log_every_steps": _at_least(1),
            },
        )


@dataclass(frozen=True)
class JobClusterConfig:
    """Where the job runs: Ray workers and parameter-server shard actors."""

    address: str | None = None  # None: start a local Ray in this process; else connect
    num_workers: int = 1
    num_shards: int = 1
    cpus_per_worker: float = 1.0
    cpus_per_shard: float = 1.0
    gpus_per_worker: float = 0.0
    memory_mb: int = 256  # hot-tier budget per table per shard
    durability: Literal["async", "sync"] = "async"  # sync: pushes are in the WAL when acked
    data_dir: str = "recps-data"  # shard data under <data_dir>/ps, synth data, checkpoints
    num_slots: int = DEFAULT_NUM_SLOTS
    # Shards across nodes: SPREAD is best effort (one node is fine); STRICT_SPREAD needs a
    # node per shard.
    placement_strategy: PlacementStrategy = "SPREAD"
    max_restarts: int = 3  # a crashed shard actor restarts on its data dir; -1: forever
    # Ray Train restarts the worker group from the last checkpoint this many times; -1: forever
    max_failures: int = 2

    def __post_init__(self) -> None:
        _run_checks(
            self,
            {
                "address": _nonempty,
                "num_workers": _between(1, 4096),
                "num_shards": _between(1, 0xFFFE),
                "cpus_per_worker": _above(0),
                "cpus_per_shard": _above(0),
                "gpus_per_worker": _at_least(0),
                "memory_mb": _at_least(1),
                "data_dir": _nonempty,
                "num_slots": _power_of_two(1, 1 << 16),
                "max_restarts": _at_least(-1),
                "max_failures": _at_least(-1),
            },
        )
        _require(
            self.num_shards <= self.num_slots,
            "num_shards",
            f"{self.num_shards} shards need at least as many slots (num_slots={self.num_slots})",
        )


@dataclass(frozen=True)
class JobConfig:
    """A whole training job. Build it with :func:`load_job_config`."""

    data: DataConfig
    tables: tuple[TableConfig, ...] = ()  # every table a feature uses, and no other
    features: tuple[FeatureConfig, ...] = ()  # () : the reader's categorical columns
    model: ModelConfig = field(default_factory=ModelConfig)
    dense_optimizer: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    cluster: JobClusterConfig = field(default_factory=JobClusterConfig)
    name: str = "recps-job"

    def __post_init__(self) -> None:
        _run_checks(self, {"name": _pattern(_TABLE_NAME)})
        if not self.features:
            features = _default_features(self.data.reader, self.model.kind)
            object.__setattr__(self, "features", features)
        self._check_features()
        listed = {t.name for t in self.tables}
        missing = dict.fromkeys(str(f.table) for f in self.features if f.table not in listed)
        if missing:  # load_job_config makes these from table_defaults; here, plain defaults
            more = tuple(TableConfig.from_dict(_new_table(n, {})) for n in missing)
            object.__setattr__(self, "tables", self.tables + more)
        self._check_tables()
        self._fill_model()
        data_dir = Path(self.cluster.data_dir)
        if self.training.checkpoint_dir is None:
            training = dataclasses.replace(
                self.training, checkpoint_dir=str(data_dir / "checkpoints")
            )
            object.__setattr__(self, "training", training)
        if self.data.synth is not None and self.data.synth.dir is None:
            synth = dataclasses.replace(self.data.synth, dir=str(data_dir / "synth"))
            object.__setattr__(self, "data", dataclasses.replace(self.data, synth=synth))
        if self.training.eval_every_steps is not None and not self.data.has_eval:
            raise JobConfigError(
                "training.eval_every_steps", "there is no eval data; set data.eval"
            )

    def _check_features(self) -> None:
        r = self.data.reader
        columns = {*r.sparse_features, *r.multi_id_features}
        names: set[str] = set()
        for f in self.features:
            path = _join("features", f.name)
            _require(f.name not in names, path, "named twice")
            names.add(f.name)
            _require(
                f.source in columns,
                _join(path, "input") if f.input else path,
                f"{f.source!r} is not a categorical column the reader reads "
                "(data.reader.sparse_features / multi_id_features)"
                f"{_did_you_mean(f.source, columns)}",
            )
        unused = sorted(columns - {f.source for f in self.features})
        _require(
            not unused,
            "features",
            f"the reader reads {unused} but no feature uses them; add them to features "
            "or remove them from data.reader.sparse_features",
        )

    def _check_tables(self) -> None:
        index: dict[str, int] = {}
        for i, t in enumerate(self.tables):
            if t.name in index:
                raise JobConfigError(
                    f"tables[{i}].name", f"{t.name!r} is already defined at tables[{index[t.name]}]"
                )
            index[t.name] = i
        used = {f.table for f in self.features}
        for name, i in index.items():
            _require(
                name in used,
                f"tables[{i}].name",
                f"no feature uses table {name!r}; map a feature to it in features, or remove it",
            )

    def _fill_model(self) -> None:
        m = self.model
        dims = {f.name: self.table(str(f.table)).dim for f in self.features}
        emb = {name: d for name, d in dims.items() if d > 1}  # dim 1: first-order weights
        if m.kind == "wide_deep":
            return
        why = "deepfm's FM term" if m.kind == "deepfm" else "dlrm's dot interaction"
        by_dim: dict[int, list[str]] = {}
        for name, d in emb.items():
            by_dim.setdefault(d, []).append(name)
        got = "; ".join(f"dim {d}: {_some(names)}" for d, names in by_dim.items())
        _require(bool(emb), "tables", f"{why} needs a feature whose table has dim > 1")
        _require(
            len(by_dim) == 1,
            "tables",
            f"{why} needs one dim for every embedding (tables of dim > 1); got {got}",
        )
        if m.kind != "dlrm":
            return
        dim = next(iter(by_dim))
        _require(
            bool(self.data.reader.dense_features),
            "data.reader.dense_features",
            "dlrm needs at least one dense feature (the bottom MLP's input)",
        )
        if m.bottom_mlp is None:
            object.__setattr__(self, "model", dataclasses.replace(m, bottom_mlp=(64, dim)))
            return
        _require(
            bool(m.bottom_mlp) and m.bottom_mlp[-1] == dim,
            "model.bottom_mlp",
            f"dlrm's dot interaction needs the last size equal to the embedding dim {dim}, "
            f"got {list(m.bottom_mlp)}",
        )

    # ---- accessors ---------------------------------------------------------------------------

    def table(self, name: str) -> TableConfig:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, scalars) that :func:`load_job_config` reads back equal."""
        return {
            "name": self.name,
            "data": self.data.to_dict(),
            "tables": [_plain(t) for t in self.tables],
            "features": {
                f.name: {"table": f.table, "pooling": f.pooling, "input": f.input}
                for f in self.features
            },
            "model": _plain(self.model),
            "dense_optimizer": _plain(self.dense_optimizer),
            "training": _plain(self.training),
            "cluster": _plain(self.cluster),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _default_features(reader: ReaderConfig, kind: str) -> tuple[FeatureConfig, ...]:
    """Each categorical column into a table of its name; deepfm and wide_deep also get the
    column's first-order weights from a dim-1 table ``<column>_wide``."""
    columns = (*reader.sparse_features, *reader.multi_id_features)
    out = [FeatureConfig(c) for c in columns]
    if kind != "dlrm":
        out += [FeatureConfig(c + WIDE_SUFFIX, input=c) for c in columns]
    return tuple(out)


def _new_table(name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The raw spec of a table no entry of ``tables`` lists: ``table_defaults``, except that a
    ``*_wide`` table holds first-order weights (dim 1, zero-initialized)."""
    spec = {"dim": DEFAULT_TABLE_DIM, **defaults, "name": name}
    if name.endswith(WIDE_SUFFIX):
        spec.update(dim=1, initializer={"kind": "zeros"})
    return spec


# ---- loading ------------------------------------------------------------------------------------


def load_job_config(source: str | Path | Mapping[str, Any]) -> JobConfig:
    """Read and validate a job: a YAML file's path, or the parsed mapping itself.

    Raises :class:`JobConfigError` (a ``ConfigError``) naming the YAML path of the first bad
    field. Relative paths in a file are taken relative to the file's folder.
    """
    base: Path | None = None
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        raw = _read_yaml(path)
        base = path.resolve().parent
    elif isinstance(source, Mapping):
        raw = source
    else:
        raise JobConfigError("", f"a job config is a YAML path or a mapping, got {_show(source)}")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise JobConfigError("", f"the top level must be a mapping of sections, got {_show(raw)}")
    _check_keys(raw, TOP_LEVEL_KEYS, "")
    if base is not None:
        raw = _resolve_paths(raw, base)

    data = _build(DataConfig, raw.get("data"), "data", required=True)
    model = _build(ModelConfig, raw.get("model"), "model")
    raw_features = raw.get("features")
    if raw_features is None:
        features = _default_features(data.reader, model.kind)
    else:
        features = _build_features(raw_features)
        reader_raw = (raw.get("data") or {}).get("reader") or {}
        if "sparse_features" not in reader_raw and "multi_id_features" not in reader_raw:
            # The features name the columns to read, as single-id columns (list columns go
            # in data.reader.multi_id_features, which then names the reader's columns).
            sparse = tuple(dict.fromkeys(f.source for f in features))
            try:
                reader = data.reader.replace(sparse_features=sparse)
            except ConfigError as e:
                raise JobConfigError("features", str(e)) from None
            data = dataclasses.replace(data, reader=reader)
    tables = _build_tables(raw.get("table_defaults"), raw.get("tables"), features)
    sections: dict[str, Any] = {
        "model": model,
        "dense_optimizer": _build(
            DenseOptimizerConfig, raw.get("dense_optimizer"), "dense_optimizer"
        ),
        "training": _build(TrainingConfig, raw.get("training"), "training"),
        "cluster": _build(JobClusterConfig, raw.get("cluster"), "cluster"),
    }
    if "name" in raw:
        sections["name"] = _coerce(raw["name"], str, "name")
    try:
        return JobConfig(data=data, tables=tables, features=features, **sections)
    except JobConfigError:
        raise
    except ConfigError as e:
        raise JobConfigError("", str(e)) from None


def _build_features(raw: Any) -> tuple[FeatureConfig, ...]:
    if not isinstance(raw, Mapping):
        raise JobConfigError("features", f"must be a mapping of feature -> table, got {_show(raw)}")
    out = []
    for name, spec in raw.items():
        path = _join("features", str(name))
        if not isinstance(name, str) or not name:
            raise JobConfigError(path, "feature names must be non-empty strings")
        if isinstance(spec, str):  # shorthand: `C1: shared_table`
            spec = {"table": spec}
        out.append(_build(FeatureConfig, spec, path, preset={"name": name}))
    if not out:
        raise JobConfigError("features", "must name at least one feature (or leave it out)")
    return tuple(out)


def _build_tables(
    raw_defaults: Any, raw_tables: Any, features: tuple[FeatureConfig, ...]
) -> tuple[TableConfig, ...]:
    defaults: dict[str, Any] = {"dim": DEFAULT_TABLE_DIM}
    if raw_defaults is not None:
        if not isinstance(raw_defaults, Mapping):
            raise JobConfigError("table_defaults", f"must be a mapping, got {_show(raw_defaults)}")
        if "name" in raw_defaults:
            raise JobConfigError("table_defaults.name", "not allowed here: each table names itself")
        defaults = _merge(defaults, raw_defaults)
        # Validate the defaults on their own, so their errors point at table_defaults.
        _build(TableConfig, defaults, "table_defaults", preset={"name": "defaults"})
    if raw_tables is None:
        raw_tables = []
    if not isinstance(raw_tables, list):
        raise JobConfigError("tables", f"must be a list of tables, got {_show(raw_tables)}")
    tables = []
    for i, entry in enumerate(raw_tables):
        path = f"tables[{i}]"
        if not isinstance(entry, Mapping):
            raise JobConfigError(path, f"must be a mapping, got {_show(entry)}")
        if "name" not in entry:
            raise JobConfigError(_join(path, "name"), "is required")
        tables.append(_build(TableConfig, _merge(defaults, entry), path))
    listed = {t.name for t in tables}
    for f in features:  # tables a feature names but `tables` leaves out
        if f.table not in listed:
            listed.add(str(f.table))
            tables.append(_build(TableConfig, _new_table(str(f.table), defaults), "table_defaults"))
    return tuple(tables)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; nested mappings (optimizer, ...) merge key by key."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


_PATH_FIELDS = (
    ("data", "train"),
    ("data", "eval"),
    ("data", "synth", "dir"),
    ("training", "checkpoint_dir"),
    ("cluster", "data_dir"),
)


def _resolve_paths(raw: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """A copy of ``raw`` whose relative path fields are made absolute under ``base``."""
    out = copy.deepcopy(dict(raw))
    cluster = out.get("cluster")
    if cluster is None:
        cluster = out["cluster"] = {}
    if isinstance(cluster, dict) and "data_dir" not in cluster:
        cluster["data_dir"] = JobClusterConfig.data_dir  # the default is relative, too
    for keys in _PATH_FIELDS:
        node: Any = out
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value:  # anything else: the builder reports it
            p = Path(value).expanduser()
            node[keys[-1]] = str(p if p.is_absolute() else base / p)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", mark
            )
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise JobConfigError("", f"no job config at {path}") from None
    except OSError as e:
        raise JobConfigError("", f"cannot read {path}: {e}") from e
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise JobConfigError("", f"{path} is not valid YAML: {e}") from None


# ---- the generic, typed builder ------------------------------------------------------------------


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(
    cls: type,
    raw: Any,
    path: str,
    *,
    preset: Mapping[str, Any] | None = None,
    required: bool = False,
) -> Any:
    """``cls(**raw)`` with every key type-checked and range-checked, errors naming paths."""
    if raw is None:
        if required:
            raise JobConfigError(path, "is required")
        raw = {}
    if not isinstance(raw, Mapping):
        raise JobConfigError(path, f"must be a mapping, got {_show(raw)}")
    hints = _hints(cls)
    preset = dict(preset or {})
    excluded = _EXCLUDED.get(cls, {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    allowed = [n for n in fields if n not in preset and n not in excluded]
    for key in raw:
        if key in excluded:
            raise JobConfigError(_join(path, str(key)), f"not allowed here: {excluded[key]}")
    _check_keys(raw, allowed, path)
    kwargs = dict(preset)
    for name in allowed:
        f = fields[name]
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise JobConfigError(_join(path, name), "is required")
    for name, check in _FOREIGN_CHECKS.get(cls, {}).items():
        value = kwargs.get(name)
        if value is not None and (problem := check(value)):
            raise JobConfigError(_join(path, name), problem)
    try:
        return cls(**kwargs)
    except JobConfigError as e:
        raise e.under(path) from None
    except ConfigError as e:
        raise JobConfigError(path, str(e)) from None


def _check_keys(raw: Mapping[Any, Any], allowed: Any, path: str) -> None:
    allowed = list(allowed)
    for key in raw:
        if key in allowed:
            continue
        key_path = _join(path, str(key))
        if not isinstance(key, str):
            raise JobConfigError(key_path, f"keys must be strings, got {_show(key)}")
        hint = _did_you_mean(key, allowed)
        if not hint:
            hint = f" (known keys: {', '.join(allowed)})"
        raise JobConfigError(key_path, f"unknown key{hint}")


def _did_you_mean(word: str, choices: Any) -> str:
    choices = [str(c) for c in choices]
    alias = _ALIASES.get(word.lower())
    if alias in choices:
        return f" (did you mean {alias!r}?)"
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return f" (did you mean {lowered[word.lower()]!r}?)"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` as type ``tp`` (a dataclass, scalar, Literal, Optional, tuple), or raise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(options) < len(typing.get_args(tp)):
                return None
            raise JobConfigError(path, f"must be {_describe(tp)}, got null")
        if len(options) == 1:
            return _coerce(value, options[0], path)
        for option in options:
            if _fits(value, option):
                return _coerce(value, option, path)
        raise JobConfigError(path, f"must be {_describe(tp)}, got {_show(value)}")
    if value is None:
        raise JobConfigError(path, f"must be {_describe(tp)}, got null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        hint = _did_you_mean(value, choices) if isinstance(value, str) else ""
        raise JobConfigError(path, f"must be {_describe(tp)}, got {value!r}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if _is_num(value):
            if not math.isfinite(value):
                raise JobConfigError(path, f"must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, path)  # type: ignore[arg-type]
    else:  # pragma: no cover - a field type this loader was never taught
        raise AssertionError(f"{path}: unsupported field type {tp!r}")
    raise JobConfigError(path, f"must be {_describe(tp)}, got {_show(value)}")


def _fits(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (int, float):
        return _is_num(value)
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    return False


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return f"{text} or null" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin is tuple:
        return (
            f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
        )
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    return "a mapping"


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
    return f"{text} ({kind})"


def _some(names: list[str], n: int = 4) -> str:
    """``a, b, c`` or ``a, b, c, d and 22 more``."""
    head = ", ".join(names[:n])
    return f"{head} and {len(names) - n} more" if len(names) > n else head


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    if key.startswith("["):
        return prefix + key
    return f"{prefix}.{key}"


def _plain(obj: Any) -> Any:
    """A dataclass as dicts/lists/scalars (tuples become lists: YAML-safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
