"""Regenerate the committed Python stubs of every .proto here (``PROTO_FILES``).

Usage::

    python proto/gen.py           # rewrite proto/<name>_pb2.py, _pb2_grpc.py, _pb2.pyi
    python proto/gen.py --check   # exit 1, naming the files, if the committed stubs are stale

Each .proto is compiled under the import path ``recps/proto/<name>.proto`` (protoc path
mapping ``-Irecps/proto=<this folder>``), so the generated modules import each other as
``from recps.proto import ps_pb2`` and never as a bare ``ps_pb2`` or ``proto``. The
descriptors are registered as ``recps/proto/<name>.proto``, which keeps them unique in
the pool.

Importable as ``recps.proto.gen``: :func:`generate` and :func:`stale_files`.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
IMPORT_PREFIX = "recps/proto"  # where protoc believes this folder lives
PROTO_FILES = ("ps.proto", "serving.proto", "ranking.proto")
GENERATED = tuple(
    f"{Path(name).stem}{suffix}"
    for name in PROTO_FILES
    for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
)


def _run_protoc(out_root: Path) -> None:
    """Compile every PROTO_FILES entry into ``out_root/recps/proto/``."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",  # argv[0], ignored
        f"-I{IMPORT_PREFIX}={PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(f"{IMPORT_PREFIX}/{name}" for name in PROTO_FILES),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc}: {' '.join(args[1:])}")


def generate(out_dir: Path) -> list[Path]:
    """Generate the stubs into ``out_dir`` (created if missing); return the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recps-protoc-") as tmp:
        tmp_root = Path(tmp)
        _run_protoc(tmp_root)
        produced = tmp_root / IMPORT_PREFIX
        names = sorted(p.name for p in produced.iterdir())
        if names != sorted(GENERATED):
            raise RuntimeError(f"protoc produced {names}, expected {sorted(GENERATED)}")
        written = []
        for name in GENERATED:
            dest = out_dir / name
            shutil.move(str(produced / name), str(dest))
            written.append(dest)
    return written


def _diffs(committed_dir: Path, fresh_dir: Path) -> dict[str, list[str]]:
    """Unified diffs (committed -> fresh) of the generated files that differ."""
    out: dict[str, list[str]] = {}
    for name in GENERATED:
        old_path, new_path = committed_dir / name, fresh_dir / name
        old = old_path.read_bytes() if old_path.exists() else None
        new = new_path.read_bytes()
        if old == new:
            continue
        old_lines = [] if old is None else old.decode("utf-8", "replace").splitlines(True)
        out[name] = list(
            difflib.unified_diff(
                old_lines,
                new.decode("utf-8", "replace").splitlines(True),
                f"committed/{name}" if old is not None else "/dev/null",
                f"regenerated/{name}",
            )
        )
    return out


def stale_files() -> list[str]:
    """Names of the committed stubs in this folder that differ from a fresh generation.

    A missing stub counts as stale. Empty list: the stubs are up to date.
    """
    with tempfile.TemporaryDirectory(prefix="recps-protoc-check-") as tmp:
        fresh = Path(tmp)
        generate(fresh)
        return sorted(_diffs(PROTO_DIR, fresh))


def _check() -> int:
    with tempfile.TemporaryDirectory(prefix="recps-protoc-check-") as tmp:
        fresh = Path(tmp)
        generate(fresh)
        diffs = _diffs(PROTO_DIR, fresh)
    if not diffs:
        print(f"stubs up to date: {', '.join(GENERATED)}")
        return 0
    for name, lines in sorted(diffs.items()):
        if not (PROTO_DIR / name).exists():
            print(f"missing: {PROTO_DIR / name}", file=sys.stderr)
            continue
        print(f"stale: {PROTO_DIR / name}", file=sys.stderr)
        shown = lines[:40]
        sys.stderr.writelines(shown)
        if len(lines) > len(shown):
            print(f"... ({len(lines) - len(shown)} more diff lines)", file=sys.stderr)
    print(f"run `python {Path(__file__).resolve()}` to regenerate", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir; exit 1 if the committed stubs differ",
    )
    args = parser.parse_args(argv)
    if args.check:
        return _check()
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
