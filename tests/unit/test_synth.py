"""recps.worker.synth (planted-model dataset), recps.worker.eval_metrics and `recps data`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recps.cli.data_cmds import main
from recps.embedding.errors import ConfigError, InvalidArgumentError, ShapeError
from recps.worker.data import DataReader
from recps.worker.eval_metrics import auc, logloss
from recps.worker.synth import (
    PlantedModel,
    SynthConfig,
    read_metadata,
    reader_config,
    write_dataset,
)

SMALL = SynthConfig(rows=20_000, num_files=2, chunk_rows=4000, row_group_rows=2000)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, write_dataset(out, SMALL)


# ---------------------------------------------------------------------------------- metrics


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.round(rng.random(n) + 0.3 * y, 1)  # rounding makes many ties
    assert auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)
    assert auc(y, -s) == pytest.approx(1 - _brute_auc(y, s), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert auc([0, 1], [0.2, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.2]) == 0.0
    assert auc([1, 0, 1, 0], [0.5] * 4) == 0.5
    with pytest.raises(InvalidArgumentError, match="both classes"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ShapeError):
        auc([0, 1], [0.1])
    with pytest.raises(InvalidArgumentError, match="0 or 1"):
        auc([0, 2], [0.1, 0.2])


def test_logloss_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 100), rng.uniform(0.01, 0.99, 100)
    want = -np.mean([np.log(q) if t else np.log(1 - q) for t, q in zip(y, p)])
    assert logloss(y, p) == pytest.approx(want, rel=1e-12)
    assert np.isfinite(logloss([1, 0], [0.0, 1.0]))  # clipped, not inf
    with pytest.raises(InvalidArgumentError):
        logloss([1], [1.5])


# ---------------------------------------------------------------------------------- synth


def test_metadata_describes_the_dataset(dataset: tuple[Path, dict]) -> None:
    out, returned = dataset
    meta = read_metadata(out)
    assert meta == {k: v for k, v in returned.items() if k != "elapsed_s"}
    assert meta["rows"] == {"train": 18_000, "eval": 2_000}
    assert meta["sparse_features"] == [f"C{i}" for i in range(1, 27)]
    assert meta["dense_features"] == [f"I{i}" for i in range(1, 14)]
    sizes = list(meta["vocab_sizes"].values())
    assert min(sizes) == 10 and max(sizes) == 100_000 and len(set(sizes)) == 26
    assert meta["generator"]["seed"] == meta["seed"] == 0
    assert 0.72 < meta["planted_auc"] < 0.85
    assert meta["planted_logloss"] < meta["constant_logloss"]
    for split in ("train", "eval"):
        assert 0.2 < meta["base_rate"][split] < 0.3
        files = [out / f for f in meta["files"][split]]
        assert len(files) == 2
        rows = [pq.ParquetFile(f).metadata for f in files]
        assert sum(m.num_rows for m in rows) == meta["rows"][split]
    assert pq.ParquetFile(out / "train/part-00000.parquet").metadata.num_row_groups == 5


def test_reader_reads_the_dataset_and_labels_follow_the_model(dataset: tuple[Path, dict]) -> None:
    out, meta = dataset
    reader = DataReader(out / "eval", reader_config(meta, batch_size=512))
    batches = list(reader.epoch(0))
    assert sum(len(b) for b in batches) == 2_000
    labels = np.concatenate([b.labels for b in batches])
    assert labels.mean() == pytest.approx(meta["base_rate"]["eval"])
    dense = np.concatenate([b.dense for b in batches])
    assert dense.shape == (2_000, 13) and (dense >= 0).all() and (dense == 0).mean() < 0.5


def test_hot_ids_follow_zipf(dataset: tuple[Path, dict]) -> None:
    out, meta = dataset
    ids = pq.read_table(out / "train", columns=["C22"]).column("C22").to_numpy()  # vocab 100k
    _, counts = np.unique(ids, return_counts=True)
    counts = np.sort(counts)[::-1]
    assert meta["vocab_sizes"]["C22"] == 100_000
    assert counts[0] > 0.05 * len(ids) and counts[0] > 1.5 * counts[1]
    assert len(counts) > 1000  # and a long tail


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    cfg = SynthConfig(rows=3000, num_files=1, calibration_rows=5000)
    a, b = write_dataset(tmp_path / "a", cfg), write_dataset(tmp_path / "b", cfg)
    assert {k: v for k, v in a.items() if k != "elapsed_s"} == {
        k: v for k, v in b.items() if k != "elapsed_s"
    }
    ta = pq.read_table(tmp_path / "a/train")
    assert ta.equals(pq.read_table(tmp_path / "b/train"))
    c = write_dataset(tmp_path / "c", cfg.replace(seed=1))
    assert c["vocab_sizes"] != a["vocab_sizes"] or not ta.equals(
        pq.read_table(tmp_path / "c/train")
    )


def test_hex_format_reads_back_identically(tmp_path: Path) -> None:
    cfg = SynthConfig(rows=3000, num_files=1, calibration_rows=5000)
    write_dataset(tmp_path / "int", cfg)
    meta = write_dataset(tmp_path / "hex", cfg.replace(categorical_format="hex"))
    assert pq.read_schema(tmp_path / "hex/train/part-00000.parquet").field("C1").type == "string"
    rc = reader_config(meta, batch_size=1000)
    for a, b in zip(
        DataReader(tmp_path / "int", rc), DataReader(tmp_path / "hex", rc), strict=True
    ):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.dense, b.dense)
        for k in a.sparse:
            np.testing.assert_array_equal(a.sparse[k], b.sparse[k])


def test_raw_ids_are_distinct_per_feature() -> None:
    model = PlantedModel(SynthConfig(vocab_max=5000, calibration_rows=2000))
    for table, v in zip(model.raw_id_tables, model.vocab_sizes):
        assert len(np.unique(table)) == v and table.min() >= 0 and table.max() < 1 << 32


def test_existing_dataset_is_kept_unless_overwrite(tmp_path: Path) -> None:
    cfg = SynthConfig(rows=1000, num_files=1, calibration_rows=2000)
    write_dataset(tmp_path, cfg)
    with pytest.raises(ConfigError, match="overwrite"):
        write_dataset(tmp_path, cfg)
    meta = write_dataset(tmp_path, cfg.replace(num_files=2), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert read_metadata(tmp_path)["files"] == meta["files"]


def test_bad_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="eval_fraction"):
        SynthConfig(eval_fraction=1.0)
    with pytest.raises(ConfigError, match="interaction_pairs"):
        SynthConfig(num_sparse=3, interaction_pairs=4)


# ---------------------------------------------------------------------------------- CLI


def test_cli_synth_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    argv = ["synth", "--rows", "4000", "--out", str(out), "--seed", "3", "--num-files", "2"]
    assert main([*argv, "--eval-fraction", "0.25", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3,000 train + 1,000 eval rows" in printed
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["seed"] == 3 and meta["rows"] == {"train": 3000, "eval": 1000}
    assert len(list((out / "eval").glob("part-*.parquet"))) == 2
    assert main(argv) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["inspect", str(out), "--batch-size", "4"]) == 0
    shown = capsys.readouterr().out
    assert "C1..C26: int64" in shown and "dense float32[4, 13]" in shown


def test_cli_registers_under_a_parent_parser() -> None:
    import argparse

    from recps.cli import data_cmds

    parser = argparse.ArgumentParser(prog="recps")
    data_cmds.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "synth", "--rows", "10", "--out", "x"])
    assert args.func is data_cmds.run_synth and args.rows == 10


def test_docstring_examples() -> None:
    import doctest

    import recps.worker.synth

    result = doctest.testmod(recps.worker.synth, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
