"""`recps data`: write a synthetic dataset with a planted model, or inspect a dataset.

    recps data synth --rows 1000000 --out data/synth      # train/, eval/, metadata.json
    recps data inspect data/synth                         # files, rows, a decoded batch

Exit codes: 0 done; 2 a bad request (bad arguments, an existing dataset without
--overwrite, a path with no data). Heavy imports happen only when a command runs.

Register under the main CLI with ``data_cmds.add_parser(subparsers)``; run alone with
``python -c "from recps.cli.data_cmds import main; main()" synth --rows 1000 --out d``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` (with actions ``synth`` and ``inspect``) to the top-level subparsers."""
    p = sub.add_parser(
        "data",
        help="synthetic datasets and dataset inspection",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: recps data synth --rows 1000000 --out data/synth",
    )
    _add_actions(p.add_subparsers(dest="data", metavar="ACTION", required=True))


def _add_actions(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "synth",
        help="write a Criteo-shaped Parquet dataset drawn from a planted model",
        epilog="Example: recps data synth --rows 1000000 --out data/synth --num-files 8",
    )
    s.add_argument("--rows", type=int, required=True, help="rows in train + eval")
    s.add_argument("--out", type=Path, required=True, help="dataset directory")
    s.add_argument("--seed", type=int, default=0, help="everything follows from it")
    s.add_argument("--eval-fraction", type=float, default=0.1, help="share of rows in eval/")
    s.add_argument("--num-files", type=int, default=4, help="Parquet files per split")
    s.add_argument(
        "--categorical-format",
        choices=("int64", "hex"),
        default="int64",
        help="int64 raw ids, or 8 hex digits like Criteo (the reader gives the same ids)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_synth)

    i = sub.add_parser(
        "inspect",
        help="summarize a dataset: metadata, files, row groups, one decoded batch",
        epilog="Example: recps data inspect data/synth",
    )
    i.add_argument("path", type=Path, help="dataset directory, data directory or file")
    i.add_argument("--batch-size", type=int, default=8, help="rows in the sample batch")
    i.set_defaults(func=run_inspect)


def run_synth(args: argparse.Namespace) -> int:
    from recps.embedding.errors import RecpsError
    from recps.worker.synth import SynthConfig, write_dataset

    try:
        cfg = SynthConfig(
            rows=args.rows,
            eval_fraction=args.eval_fraction,
            num_files=args.num_files,
            seed=args.seed,
            categorical_format=args.categorical_format,
        )
        meta = write_dataset(args.out, cfg, overwrite=args.overwrite, progress=not args.no_progress)
    except RecpsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = meta["rows"]
    print(
        f"wrote {rows['train']:,} train + {rows['eval']:,} eval rows to {args.out} "
        f"in {meta['elapsed_s']:.1f} s ({(rows['train'] + rows['eval']) / meta['elapsed_s']:,.0f}"
        " rows/s)"
    )
    summary = {
        k: meta[k] for k in ("base_rate", "planted_auc", "planted_logloss", "constant_logloss")
    }
    print(json.dumps(summary, indent=2))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from recps.embedding.errors import RecpsError
    from recps.worker.data import DataReader, ReaderConfig, list_files
    from recps.worker.synth import read_metadata, reader_config

    try:
        path: Path = args.path
        meta = read_metadata(path) if (path / "metadata.json").exists() else None
        if meta:
            keep = ("format", "rows", "base_rate", "planted_auc", "planted_logloss", "seed")
            print(json.dumps({k: meta[k] for k in keep if k in meta}, indent=2))
        files = list_files(path)
        for f in files:
            rows = "?" if f.num_rows is None else f"{f.num_rows:,}"
            print(f"{f.path}  {f.format}  rows={rows}  row_groups={len(f.row_group_rows)}")
        if files[0].format == "parquet":
            print(f"columns: {_schema_summary(pq.ParquetFile(files[0].path).schema_arrow)}")
        data_path = path / "train" if meta and (path / "train").is_dir() else path
        cfg = (
            reader_config(meta, batch_size=args.batch_size)
            if meta
            else ReaderConfig(batch_size=args.batch_size)
        )
        batch = next(iter(DataReader(data_path, cfg)), None)
    except RecpsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if batch is None:
        print("no rows")
        return 0
    print(f"first batch: labels {batch.labels.dtype}{list(batch.labels.shape)}")
    print(f"  labels: {batch.labels.tolist()}")
    print(f"  dense {batch.dense.dtype}{list(batch.dense.shape)}, row 0: {batch.dense[0].round(3)}")
    for name, ids in list(batch.sparse.items())[:3]:
        print(f"  {name} {ids.dtype}{list(ids.shape)}: {ids.tolist()}")
    if len(batch.sparse) > 3:
        print(f"  ... and {len(batch.sparse) - 3} more sparse features")
    return 0


def _schema_summary(schema: pa.Schema) -> str:
    """``label: float, I1..I13: int64, C1..C26: string``: runs of one type and prefix."""
    runs: list[list[Any]] = []
    for f in schema:
        key = (f.type, f.name.rstrip("0123456789"))
        if runs and runs[-1][2] == key:
            runs[-1][1] = f.name
        else:
            runs.append([f.name, f.name, key])
    return ", ".join(f"{a}: {t}" if a == b else f"{a}..{b}: {t}" for a, b, (t, _) in runs)


def main(argv: list[str] | None = None) -> int:
    """``recps data`` on its own: ``main(["synth", "--rows", "1000", "--out", "d"])``."""
    parser = argparse.ArgumentParser(prog="recps data", description=__doc__)
    _add_actions(parser.add_subparsers(dest="data", metavar="ACTION", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
