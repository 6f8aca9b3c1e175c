"""`recps export`: turn a training checkpoint into a versioned serving model.

    recps export --checkpoint ckpt/ --out models/                 # newest complete step
    recps export --checkpoint ckpt/step-00000110 --out models/ --quantize int8
    recps export --checkpoint ckpt/ --out models/ --version 7 --serving-shards 4 --force

Writes models/<version:012d>/ (manifest.json, dense/tower.pt, tables/<t>/*.sst,
COMPLETE) through a temporary directory and a rename; the version defaults to the
checkpoint's step. See docs/serving.md, "Model export".

Exit codes: 0 exported; 2 a bad request (bad arguments, no such checkpoint, the version
exists without --force); 1 the export failed (an unreadable or damaged checkpoint).

Register under the main CLI with ``export_cmds.add_parser(subparsers)``; run alone with
``python -c "from recps.cli.export_cmds import main; main()" --checkpoint C --out M``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a step-NNNNNNNN checkpoint directory, or the checkpoints directory (newest)",
    )
    p.add_argument("--out", required=True, help="the model root; versions are subdirectories")
    p.add_argument("--version", type=int, default=None, help="default: the checkpoint's step")
    p.add_argument(
        "--serving-shards",
        type=int,
        default=None,
        help="serving shards to split the tables into (default: the training shards)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "float16", "int8"),
        default="none",
        help="row format of the SST files (int8: per-row scale)",
    )
    p.add_argument(
        "--batch-rows", type=int, default=65536, help="rows streamed per step (bounds memory)"
    )
    p.add_argument(
        "--default-vector",
        choices=("initializer", "zeros"),
        default="initializer",
        help="what replicas serve for ids without a row (initializer: as training does)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing version")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the top-level subparsers."""
    p = sub.add_parser(
        "export",
        help="export a training checkpoint as a versioned serving model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: recps export --checkpoint .demo/checkpoints --out .demo/models "
        "--quantize float16",
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recps.embedding.errors import CheckpointNotFoundError, ConfigError, RecpsError
    from recps.serving.export import ExportConfig, export_checkpoint
    from recps.serving.model_format import ModelVersionExistsError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = ExportConfig(
            checkpoint=args.checkpoint,
            out=args.out,
            version=args.version,
            serving_shards=args.serving_shards,
            quantize=args.quantize,
            batch_rows=args.batch_rows,
            force=args.force,
            default_vector=args.default_vector,
        )
        manifest = export_checkpoint(cfg)
    except (ConfigError, CheckpointNotFoundError, ModelVersionExistsError) as e:
        print(f"recps export: {e}", file=sys.stderr)
        return 2
    except RecpsError as e:
        print(f"recps export: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary = {
        "version": manifest.version,
        "path": str(manifest.path),
        "step": manifest.step,
        "serving_shards": len(manifest.shard_map.shards),
        "tables": {name: t.rows for name, t in manifest.tables.items()},
        "row_format": sorted({t.row_format for t in manifest.tables.values()}),
        "bytes": sum(f.bytes for f in manifest.files.values()),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        rows = sum(summary["tables"].values())
        print(
            f"exported step {manifest.step} as version {manifest.version} to {manifest.path}: "
            f"{len(manifest.tables)} tables, {rows:,} rows, {summary['serving_shards']} "
            f"serving shard(s), {summary['bytes'] / 2**20:.1f} MiB"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``recps export`` on its own: ``main(["--checkpoint", "c", "--out", "m"])``."""
    parser = argparse.ArgumentParser(
        prog="recps export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
