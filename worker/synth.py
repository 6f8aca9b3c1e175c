"""A Criteo-shaped synthetic dataset drawn from a planted model, so model quality has a ceiling.

The planted model is what a DLRM with small embeddings can learn:

* 26 categorical features ``C1..C26`` with vocabularies spread log-uniformly over
  ``[vocab_min, vocab_max]``; ids follow a bounded Zipf law, so a few ids are hot.
* a hidden weight per (feature, id);
* low-rank pairwise interactions: for ``interaction_pairs`` random feature pairs (a, b),
  ``<E_a[id_a], E_b[id_b]> / sqrt(rank)`` with hidden embeddings of ``interaction_rank``;
* 13 dense count features ``I1..I13`` (log-normal counts, some missing) with a weight each
  on ``log1p(count)`` (missing -> 0, exactly the reader's transform).

Each term is scaled to a target standard deviation and the bias is solved for ``base_rate``
on a calibration sample, then ``label ~ Bernoulli(sigmoid(logit))``. The defaults give a
planted AUC near 0.78 (a trained model's ceiling) and a base rate near 0.25 (Criteo's).

**Layout.** ``DIR/train/part-NNNNN.parquet``, ``DIR/eval/part-NNNNN.parquet`` (``num_files``
each, row groups of ``row_group_rows``) and ``DIR/metadata.json``, written last. Rows are
generated ``chunk_rows`` at a time, so memory does not grow with ``rows`` (except one float
per eval row, kept to compute the planted AUC).

**Categorical columns** are int64 raw ids by default (``categorical_format="int64"``), or
8 lowercase hex digits like Criteo (``"hex"``). Raw ids are a bijective 32-bit scramble of
the Zipf rank, distinct within a feature. :mod:`recps.worker.data` reads ``0x68fd1e64`` and
``"68fd1e64"`` as the same id, so both formats give identical batches.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     meta = write_dataset(d, SynthConfig(rows=20_000, num_files=2))
    >>> meta["rows"], 0.7 < meta["planted_auc"] < 0.85
    ({'train': 18000, 'eval': 2000}, True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recps.embedding.errors import ConfigError
from recps.embedding.hashing import seed_key
from recps.worker.data import LABEL, ReaderConfig
from recps.worker.eval_metrics import auc, logloss

FORMAT = "recps-synth-v1"
SPLITS = ("train", "eval")
_M32 = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class SynthConfig:
    """Generator parameters; all of them go into metadata.json."""

    rows: int = 1_000_000  # train + eval
    eval_fraction: float = 0.1
    num_files: int = 4  # per split
    seed: int = 0
    num_dense: int = 13
    num_sparse: int = 26
    vocab_min: int = 10
    vocab_max: int = 100_000
    zipf_exponent: float = 1.1  # P(rank r) ~ r^-s; 1.1 puts ~1/8 of a big vocab's traffic on one id
    interaction_pairs: int = 8
    interaction_rank: int = 4  # well under a DLRM's embedding dim of 16, so it is learnable
    id_logit_std: float = 0.9  # std of each logit term, measured on the calibration sample
    interaction_logit_std: float = 0.7
    dense_logit_std: float = 0.5
    base_rate: float = 0.25  # Criteo's click rate is about 0.25
    dense_missing_max: float = 0.3  # each dense feature is missing with prob in [0, this]
    categorical_format: Literal["int64", "hex"] = "int64"
    chunk_rows: int = 131_072  # rows generated at once; bounds memory
    row_group_rows: int = 65_536
    calibration_rows: int = 100_000

    def replace(self, **changes: Any) -> SynthConfig:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"SynthConfig: {msg}")

        need(self.rows >= 2, f"rows must be >= 2, got {self.rows}")
        need(
            0 < self.eval_fraction < 1, f"eval_fraction must be in (0, 1), got {self.eval_fraction}"
        )
        need(self.num_files >= 1, f"num_files must be >= 1, got {self.num_files}")
        need(self.num_dense >= 0 and self.num_sparse >= 1, "need num_dense >= 0, num_sparse >= 1")
        need(2 <= self.vocab_min <= self.vocab_max <= 1 << 32, "need 2 <= vocab_min <= vocab_max")
        need(self.zipf_exponent > 0, "zipf_exponent must be > 0")
        max_pairs = self.num_sparse * (self.num_sparse - 1) // 2
        need(0 <= self.interaction_pairs <= max_pairs, f"interaction_pairs in [0, {max_pairs}]")
        need(self.interaction_rank >= 1, "interaction_rank must be >= 1")
        need(
            min(self.id_logit_std, self.interaction_logit_std, self.dense_logit_std) >= 0,
            "logit stds must be >= 0",
        )
        need(0 < self.base_rate < 1, f"base_rate must be in (0, 1), got {self.base_rate}")
        need(0 <= self.dense_missing_max < 1, "dense_missing_max must be in [0, 1)")
        need(self.categorical_format in ("int64", "hex"), "categorical_format: int64 or hex")
        need(self.chunk_rows >= 1 and self.row_group_rows >= 1, "chunk/row-group rows >= 1")
        need(self.calibration_rows >= 1000, "calibration_rows must be >= 1000")

    @property
    def eval_rows(self) -> int:
        return max(1, min(self.rows - 1, round(self.rows * self.eval_fraction)))

    @property
    def dense_features(self) -> tuple[str, ...]:
        return tuple(f"I{j + 1}" for j in range(self.num_dense))

    @property
    def sparse_features(self) -> tuple[str, ...]:
        return tuple(f"C{j + 1}" for j in range(self.num_sparse))


@dataclass(frozen=True)
class Rows:
    """Generated features before encoding: Zipf ranks and raw dense counts."""

    ranks: np.ndarray  # int64 [n, num_sparse]; 0 is the most frequent id
    dense: np.ndarray  # int64 [n, num_dense], counts >= 0
    dense_missing: np.ndarray  # bool [n, num_dense]

    def __len__(self) -> int:
        return len(self.ranks)


class PlantedModel:
    """The hidden model; fully determined by the :class:`SynthConfig` (and so by its seed)."""

    def __init__(self, config: SynthConfig) -> None:
        self.config = c = config
        rng = np.random.default_rng(int(seed_key("recps.synth.model", c.seed)))
        sizes = np.geomspace(c.vocab_min, c.vocab_max, c.num_sparse).round().astype(np.int64)
        self.vocab_sizes = rng.permutation(sizes)
        self.id_keys = rng.integers(0, 1 << 32, c.num_sparse, dtype=np.uint64)
        self.raw_id_tables = [
            _scramble32(np.arange(v, dtype=np.uint64), k)
            for v, k in zip(self.vocab_sizes, self.id_keys)
        ]
        self.id_weights = [rng.standard_normal(v) for v in self.vocab_sizes]
        all_pairs = [(a, b) for a in range(c.num_sparse) for b in range(a + 1, c.num_sparse)]
        pick = rng.choice(len(all_pairs), c.interaction_pairs, replace=False)
        self.pairs = [all_pairs[i] for i in sorted(pick)]
        self.embeddings = {
            f: rng.standard_normal((self.vocab_sizes[f], c.interaction_rank))
            for f in sorted({f for p in self.pairs for f in p})
        }
        self.dense_weights = rng.standard_normal(c.num_dense)
        self.dense_log_mean = rng.uniform(0.5, 4.0, c.num_dense)
        self.dense_log_std = rng.uniform(0.5, 1.5, c.num_dense)
        self.dense_missing_rate = rng.uniform(0.0, c.dense_missing_max, c.num_dense)
        self.scales = np.ones(3)
        self.bias = 0.0
        self._calibrate()

    def sample(self, rng: np.random.Generator, n: int) -> Rows:
        """Draw ``n`` rows of features (labels come from :meth:`labels`)."""
        c = self.config
        # Inverse CDF of the density x^-s on [1, V + 1), floored: P(rank k) ~ (k + 1)^-s.
        ranks = np.empty((n, c.num_sparse), dtype=np.int64, order="F")  # columns contiguous
        u = rng.random((c.num_sparse, n))
        s = c.zipf_exponent
        for f, v in enumerate(self.vocab_sizes):
            if abs(s - 1.0) < 1e-9:
                x = np.exp(u[f] * math.log(v + 1.0))
            else:
                x = (1.0 + u[f] * ((v + 1.0) ** (1.0 - s) - 1.0)) ** (1.0 / (1.0 - s))
            ranks[:, f] = np.minimum(x.astype(np.int64) - 1, v - 1)
        logs = rng.standard_normal((n, c.num_dense)) * self.dense_log_std + self.dense_log_mean
        dense = np.floor(np.exp(logs)).astype(np.int64) - 1
        np.maximum(dense, 0, out=dense)
        missing = rng.random((n, c.num_dense)) < self.dense_missing_rate
        return Rows(ranks, dense, missing)

    def terms(self, rows: Rows) -> np.ndarray:
        """Unscaled logit terms, float64 [3, n]: per-id, interactions, dense."""
        r = rows.ranks
        ids = np.zeros(len(rows))
        for f, w in enumerate(self.id_weights):
            ids += w[r[:, f]]
        inter = np.zeros(len(rows))
        for a, b in self.pairs:
            ea, eb = self.embeddings[a][r[:, a]], self.embeddings[b][r[:, b]]
            inter += np.einsum("ij,ij->i", ea, eb)
        inter /= math.sqrt(self.config.interaction_rank)
        d = np.where(rows.dense_missing, 0.0, np.log1p(rows.dense.astype(np.float64)))
        return np.stack([ids, inter, d @ self.dense_weights])

    def logits(self, rows: Rows) -> np.ndarray:
        return self.bias + self.scales @ self.terms(rows)

    def probs(self, rows: Rows) -> np.ndarray:
        return _sigmoid(self.logits(rows))

    def raw_ids(self, rows: Rows) -> np.ndarray:
        """int64 [n, num_sparse]: the ids written to disk, distinct per (feature, rank)."""
        out = np.empty(rows.ranks.shape, dtype=np.int64, order="F")
        for f, table in enumerate(self.raw_id_tables):
            out[:, f] = table[rows.ranks[:, f]]
        return out

    def to_table(self, rows: Rows, labels: np.ndarray) -> pa.Table:
        c = self.config
        cols: dict[str, pa.Array] = {LABEL: pa.array(labels.astype(np.float32))}
        for j, name in enumerate(c.dense_features):
            cols[name] = pa.array(rows.dense[:, j], mask=rows.dense_missing[:, j])
        raw = self.raw_ids(rows)
        for f, name in enumerate(c.sparse_features):
            ids = raw[:, f]
            cols[name] = pa.array(ids) if c.categorical_format == "int64" else _hex8(ids)
        return pa.table(cols)

    def describe(self) -> dict[str, Any]:
        names = self.config.sparse_features
        return {
            "bias": self.bias,
            "term_scales": dict(zip(("ids", "interactions", "dense"), self.scales.tolist())),
            "interaction_pairs": [[names[a], names[b]] for a, b in self.pairs],
            "dense_weights": self.dense_weights.round(6).tolist(),
            "dense_missing_rate": self.dense_missing_rate.round(6).tolist(),
        }

    def _calibrate(self) -> None:
        c = self.config
        rng = np.random.default_rng(int(seed_key("recps.synth.calibration", c.seed)))
        terms = self.terms(self.sample(rng, c.calibration_rows))
        targets = np.array([c.id_logit_std, c.interaction_logit_std, c.dense_logit_std])
        std = terms.std(axis=1)
        self.scales = np.where(std > 0, targets / np.where(std > 0, std, 1.0), 0.0)
        z = self.scales @ terms
        lo, hi = -20.0, 20.0  # mean(sigmoid(z + b)) is increasing in b: bisect
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _sigmoid(z + mid).mean() < c.base_rate else (lo, mid)
        self.bias = (lo + hi) / 2


def write_dataset(
    out_dir: str | Path,
    config: SynthConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the train/eval Parquet files and metadata.json; returns the metadata."""
    c = config or SynthConfig()
    out = Path(out_dir)
    old = [out / "metadata.json", *(f for s in SPLITS for f in (out / s).glob("part-*.parquet"))]
    old = [f for f in old if f.exists()]
    if old and not overwrite:
        raise ConfigError(
            f"{out} already holds a dataset ({len(old)} files); "
            "pass overwrite=True (CLI: --overwrite) to replace it"
        )
    for f in old:
        f.unlink()
    t0 = time.perf_counter()
    model = PlantedModel(c)
    rows = {"train": c.rows - c.eval_rows, "eval": c.eval_rows}
    files: dict[str, list[str]] = {}
    positives: dict[str, int] = {}
    eval_labels, eval_probs = [], []
    bar = _progress(c.rows, progress)
    for split_idx, split in enumerate(SPLITS):
        (out / split).mkdir(parents=True, exist_ok=True)
        files[split], positives[split] = [], 0
        n = rows[split]
        for k in range(c.num_files):
            lo, hi = n * k // c.num_files, n * (k + 1) // c.num_files
            path = out / split / f"part-{k:05d}.parquet"
            files[split].append(str(path.relative_to(out)))
            writer = None
            for chunk, start in enumerate(range(lo, max(hi, lo + 1), c.chunk_rows)):
                m = min(c.chunk_rows, hi - start)
                rng = np.random.default_rng(
                    int(seed_key("recps.synth.rows", c.seed, split_idx, k, chunk))
                )
                feats = model.sample(rng, m)
                p = model.probs(feats)
                y = (rng.random(m) < p).astype(np.float32)
                table = model.to_table(feats, y)
                if writer is None:
                    writer = pq.ParquetWriter(path, table.schema)
                writer.write_table(table, row_group_size=c.row_group_rows)
                positives[split] += int(y.sum())
                if split == "eval":
                    eval_labels.append(y.astype(np.int8))
                    eval_probs.append(p.astype(np.float32))
                bar.update(m)
            assert writer is not None
            writer.close()
    bar.close()
    y_eval, p_eval = np.concatenate(eval_labels), np.concatenate(eval_probs)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "rows": rows,
        "files": files,
        "label": LABEL,
        "dense_features": list(c.dense_features),
        "sparse_features": list(c.sparse_features),
        "vocab_sizes": dict(zip(c.sparse_features, model.vocab_sizes.tolist())),
        "categorical_format": c.categorical_format,
        "seed": c.seed,
        "generator": asdict(c),
        "planted_model": model.describe(),
        "base_rate": {s: positives[s] / rows[s] for s in SPLITS},
        "planted_auc": _auc_or_nan(y_eval, p_eval),
        "planted_logloss": logloss(y_eval, p_eval),
        "constant_logloss": _entropy(positives["eval"] / rows["eval"]),
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    meta["elapsed_s"] = time.perf_counter() - t0  # returned, not written: metadata is reproducible
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """metadata.json of a dataset directory (or the file itself)."""
    p = Path(path)
    p = p / "metadata.json" if p.is_dir() else p
    if not p.exists():
        raise ConfigError(f"{p} not found; write a dataset with `recps data synth --out DIR`")
    return json.loads(p.read_text())


def reader_config(meta: dict[str, Any], **overrides: Any) -> ReaderConfig:
    """A :class:`ReaderConfig` naming the dataset's columns; ``overrides`` set the rest."""
    return ReaderConfig(
        label=meta["label"],
        dense_features=tuple(meta["dense_features"]),
        sparse_features=tuple(meta["sparse_features"]),
        **overrides,
    )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def _entropy(p: float) -> float:
    return float(-(p * math.log(p) + (1 - p) * math.log(1 - p))) if 0 < p < 1 else 0.0


def _auc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    return auc(y, p) if 0 < y.sum() < len(y) else float("nan")


def _scramble32(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A keyed bijection of [0, 2^32): xor, odd multiplies and xorshifts, all invertible."""
    x = (x ^ key) & _M32
    x = (x * np.uint64(0x9E3779B1)) & _M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x85EBCA6B)) & _M32
    x ^= x >> np.uint64(13)
    return x.astype(np.int64)


def _hex8(ids: np.ndarray) -> pa.Array:
    """int ids < 2^32 -> 8 lowercase hex digits each, as one Arrow string array (no loop)."""
    shifts = np.arange(28, -4, -4, dtype=np.int64)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)[(ids[:, None] >> shifts) & 0xF]
    offsets = np.arange(0, 8 * len(ids) + 1, 8, dtype=np.int32)
    return pa.StringArray.from_buffers(
        len(ids), pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(digits))
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional here
        return _NoBar()
    return tqdm(total=total, unit="row", unit_scale=True, desc="synth")
