"""`recps checkpoint create|list|restore` and `recps table create|list|describe`: thin glue
over :class:`recps.ps.client.PSClient` for operators of a running cluster.

The cluster comes from --cluster-file F, else --data-dir D (D/cluster.json), else
$RECPS_CLUSTER_FILE. Read commands take --json; restore (destructive) wants --yes.

Exit codes, for scripts:
    0  done
    1  the cluster misbehaved (a shard did not answer, a checkpoint could not be taken)
    2  the request was wrong: bad arguments, no cluster, an unknown table or checkpoint,
       a checkpoint that does not fit the cluster, no --yes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from recps.cli.rebalance_cmds import _cluster_args, _cluster_file, _fail

CHECKPOINTS_DIR = "checkpoints"  # default checkpoint directory under the cluster's data dir

_CKPT_CREATE_EPILOG = """\
Asks every shard for a consistent checkpoint of all its tables (weights, optimizer
state, admission counters, de-dup marks) under DIR/TAG/shard-<i>/; pushes wait while a
shard takes its part. DIR defaults to D/checkpoints (D: the cluster's data directory),
TAG to ckpt-YYYYmmdd-HHMMSS. The directory is on the shards' file system.

Example:
  recps checkpoint create --data-dir /tmp/recps --tag before-upgrade

Exit codes: 0 taken; 1 a shard failed (the tag may be partly written: use another);
2 bad arguments, no cluster, or a tag that exists."""

_CKPT_LIST_EPILOG = """\
Lists the checkpoints under DIR (default D/checkpoints): tag, shards with a complete
part (a manifest), rows, tables, when it was taken, and whether it fits the cluster now
(every shard of the current map has a part covering exactly the slots it owns; a
rebalance since the checkpoint makes it unrestorable).

Example:
  recps checkpoint list --data-dir /tmp/recps
  recps checkpoint list --data-dir /tmp/recps --json | jq '.[] | select(.restorable)'

Exit codes: 0 listed (also when there are none); 2 no cluster."""

_CKPT_RESTORE_EPILOG = """\
Rolls every shard back to DIR/TAG: rows pushed since are lost, tables created since are
dropped. Every shard first checks its part (dry run); a missing part, or a checkpoint
from another slot layout, changes nothing. Stop training first.

Example:
  recps checkpoint restore before-upgrade --data-dir /tmp/recps --yes

Exit codes: 0 restored; 1 a shard failed mid-restore (re-run); 2 no such checkpoint, one
that does not fit the cluster, or no --yes."""

_TABLE_CREATE_EPILOG = """\
Creates an embedding table on every shard (each holds its own slots' rows). With
--if-not-exists an existing table with the same settings is not an error; one with other
settings always is.

Example:
  recps table create item_id --dim 16 --optimizer adagrad --lr 0.05 --data-dir /tmp/recps

Exit codes: 0 created (or there already, with --if-not-exists); 1 a shard failed;
2 bad settings, a table that exists, or no cluster."""

_TABLE_LIST_EPILOG = """\
One line per table: dim, optimizer, rows on disk and in memory summed over shards
(a row may be in both tiers, so neither is the total by itself).

Example:
  recps table list --data-dir /tmp/recps --json

Exit codes: 0 listed; 1 a shard did not answer; 2 no cluster."""

_TABLE_DESCRIBE_EPILOG = """\
A table's full settings (initializer, optimizer, admission, expiry, dtype) and its
per-shard statistics: rows in memory and on disk, bytes, hit rate, lookups, pushes.

Example:
  recps table describe item_id --data-dir /tmp/recps --json

Exit codes: 0 described; 1 a shard did not answer; 2 no such table, or no cluster."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    ckpt = sub.add_parser(
        "checkpoint",
        help="take, list and restore cluster checkpoints",
        epilog="Example: recps checkpoint create --data-dir /tmp/recps --tag nightly",
    )
    ca = ckpt.add_subparsers(dest="checkpoint", metavar="ACTION", required=True)
    p = ca.add_parser("create", help="checkpoint every shard", epilog=_CKPT_CREATE_EPILOG)
    p.formatter_class = fmt
    _cluster_args(p)
    p.add_argument("--dir", default=None, help="checkpoint directory (default D/checkpoints)")
    p.add_argument("--tag", default="", help="name of the checkpoint (default: a timestamp)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_ckpt_create)
    p = ca.add_parser("list", help="list checkpoints", epilog=_CKPT_LIST_EPILOG)
    p.formatter_class = fmt
    _cluster_args(p)
    p.add_argument("--dir", default=None, help="checkpoint directory (default D/checkpoints)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_ckpt_list)
    p = ca.add_parser("restore", help="roll every shard back", epilog=_CKPT_RESTORE_EPILOG)
    p.formatter_class = fmt
    p.add_argument("tag", help="the checkpoint's tag (see `recps checkpoint list`)")
    _cluster_args(p)
    p.add_argument("--dir", default=None, help="checkpoint directory (default D/checkpoints)")
    p.add_argument("--yes", action="store_true", help="really roll the cluster back")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_ckpt_restore)

    table = sub.add_parser(
        "table",
        help="create, list and describe embedding tables",
        epilog="Example: recps table list --data-dir /tmp/recps",
    )
    ta = table.add_subparsers(dest="table", metavar="ACTION", required=True)
    p = ta.add_parser("create", help="create a table on every shard", epilog=_TABLE_CREATE_EPILOG)
    p.formatter_class = fmt
    p.add_argument("name", help="table name")
    _cluster_args(p)
    p.add_argument("--dim", type=int, required=True, help="embedding dimension")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument(
        "--optimizer", default="adagrad", help="sgd, adagrad, adam, ftrl (server-side, sparse)"
    )
    p.add_argument("--lr", type=float, default=0.01, help="learning rate")
    p.add_argument("--init", choices=("zeros", "uniform", "normal"), default="uniform")
    p.add_argument("--init-scale", type=float, default=0.01, help="uniform bound / normal std")
    p.add_argument("--min-count", type=int, default=1, help="lookups before a row is stored")
    p.add_argument("--ttl-s", type=float, default=None, help="delete rows idle this long")
    p.add_argument("--if-not-exists", action="store_true", help="an equal table is fine")
    p.add_argument("--json", action="store_true", help="print the table's settings as JSON")
    p.set_defaults(func=_cmd_table_create)
    p = ta.add_parser("list", help="list tables", epilog=_TABLE_LIST_EPILOG)
    p.formatter_class = fmt
    _cluster_args(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_table_list)
    p = ta.add_parser("describe", help="one table in detail", epilog=_TABLE_DESCRIBE_EPILOG)
    p.formatter_class = fmt
    p.add_argument("name", help="table name")
    _cluster_args(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_table_describe)


# ---- helpers ----------------------------------------------------------------------------------


def _ckpt_dir(args: argparse.Namespace, path: Path) -> Path:
    from recps.ps.cluster import read_cluster_file

    if args.dir:
        return Path(args.dir).resolve()
    info = read_cluster_file(path)
    return Path(info.get("data_dir") or path.parent) / CHECKPOINTS_DIR


def _run(fn: Any) -> tuple[Any, int]:
    """``fn()``, with errors turned into exit codes: 2 for a wrong request, 1 otherwise."""
    from recps.embedding import errors as E

    wrong = (
        E.ConfigError,
        E.InvalidArgumentError,
        E.UnknownTableError,
        E.TableExistsError,
        E.CheckpointError,
    )
    try:
        return fn(), 0
    except wrong as e:
        return None, _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 2)
    except E.RecpsError as e:
        return None, _fail(str(e), 1)


def list_checkpoints(directory: Path, current: Any = None) -> list[dict[str, Any]]:
    """The checkpoints under ``directory`` (``TAG/shard-<i>/manifest.json``), oldest first.

    Each: ``tag``, ``path``, ``shards`` (ids with a complete part), ``missing`` (shards
    of the checkpoint's own map without one), ``rows``, ``tables``, ``created_at``, and
    with ``current`` (a :class:`ShardMap`) ``restorable``: every shard of it has a part
    whose slots are exactly the ones it owns now.

    >>> list_checkpoints(Path("/nonexistent"))
    []
    """
    import numpy as np

    from recps.ps.routing import ShardMap

    out = []
    if not directory.is_dir():
        return out
    for tag_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        parts: dict[int, dict[str, Any]] = {}
        for part in tag_dir.glob("shard-*/manifest.json"):
            try:
                parts[int(part.parent.name.split("-", 1)[1])] = json.loads(part.read_text())
            except (ValueError, OSError):
                continue
        if not parts:
            continue
        first = parts[min(parts)]
        ckpt_map = ShardMap.from_dict(first["shard_map"])
        entry: dict[str, Any] = {
            "tag": tag_dir.name,
            "path": str(tag_dir),
            "shards": sorted(parts),
            "missing": sorted(set(ckpt_map.shards) - set(parts)),
            "rows": int(sum(int(p.get("rows", 0)) for p in parts.values())),
            "tables": sorted({t["name"] for p in parts.values() for t in p.get("tables", [])}),
            "created_at": max(float(p.get("created_at", 0.0)) for p in parts.values()),
            "epoch": ckpt_map.epoch,
        }
        if current is not None:
            ok = set(current.shards) <= set(parts)
            for sid in current.shards if ok else ():
                theirs = ShardMap.from_dict(parts[sid]["shard_map"])
                if not np.array_equal(theirs.slot_owner == sid, current.slot_owner == sid):
                    ok = False
                    break
            entry["restorable"] = ok
        out.append(entry)
    out.sort(key=lambda e: e["created_at"])
    return out


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


# ---- checkpoint --------------------------------------------------------------------------------


def _cmd_ckpt_create(args: argparse.Namespace) -> int:
    from recps.ps.client import PSClient

    def go() -> dict[str, Any]:
        path = _cluster_file(args)
        directory = _ckpt_dir(args, path)
        tag = args.tag or time.strftime("ckpt-%Y%m%d-%H%M%S")
        directory.mkdir(parents=True, exist_ok=True)
        with PSClient(path) as client:
            resp = client.checkpoint(str(directory), tag)
        return {
            "tag": tag,
            "dir": str(directory),
            "shards": {
                str(sid): {
                    "path": r.path,
                    "rows": r.rows,
                    "tables": list(r.tables),
                    "seconds": round(r.seconds, 3),
                }
                for sid, r in sorted(resp.items())
            },
            "rows": int(sum(r.rows for r in resp.values())),
        }

    out, code = _run(go)
    if code:
        return code
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(
            f"checkpoint {out['tag']}: {len(out['shards'])} shards, {out['rows']:,} rows "
            f"under {out['dir']}/{out['tag']}"
        )
        print(f"restore: recps checkpoint restore {out['tag']} --dir {out['dir']} --yes")
    return 0


def _cmd_ckpt_list(args: argparse.Namespace) -> int:
    from recps.ps.cluster import read_cluster_file
    from recps.ps.routing import ShardMap

    def go() -> tuple[Path, list[dict[str, Any]]]:
        path = _cluster_file(args)
        current = ShardMap.from_dict(read_cluster_file(path)["shard_map"])
        directory = _ckpt_dir(args, path)
        return directory, list_checkpoints(directory, current)

    res, code = _run(go)
    if code:
        return code
    directory, entries = res
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    if not entries:
        print(f"no checkpoints under {directory}")
        return 0
    print(f"{'TAG':<28} {'TAKEN':<19} {'SHARDS':>6} {'ROWS':>12}  RESTORABLE  TABLES")
    for e in entries:
        shards = f"{len(e['shards'])}" + (f"-{len(e['missing'])}" if e["missing"] else "")
        print(
            f"{e['tag']:<28} {_when(e['created_at']):<19} {shards:>6} {e['rows']:>12,}  "
            f"{'yes' if e.get('restorable') else 'no':<10}  {','.join(e['tables'])}"
        )
    return 0


def _cmd_ckpt_restore(args: argparse.Namespace) -> int:
    from recps.embedding.errors import RecpsError
    from recps.ps.client import PSClient

    try:
        path = _cluster_file(args)
        directory = _ckpt_dir(args, path)
    except RecpsError as e:
        return _fail(str(e), 2)
    if not (directory / args.tag).is_dir():
        return _fail(f"no checkpoint {args.tag!r} under {directory} (recps checkpoint list)", 2)
    if not args.yes:
        return _fail(
            f"this rolls every shard back to {args.tag}: rows pushed since are lost and "
            "tables created since are dropped; add --yes to do it",
            2,
        )

    def go() -> dict[str, Any]:
        with PSClient(path) as client:
            resp = client.restore(str(directory), args.tag)
        return {
            "tag": args.tag,
            "dir": str(directory),
            "rows": int(sum(r.rows for r in resp.values())),
            "shards": {str(s): {"rows": r.rows, "tables": list(r.tables)} for s, r in resp.items()},
        }

    out, code = _run(go)
    if code:
        return code
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"restored {args.tag}: {len(out['shards'])} shards, {out['rows']:,} rows")
    return 0


# ---- table -------------------------------------------------------------------------------------


def _cmd_table_create(args: argparse.Namespace) -> int:
    from recps.embedding import (
        AdmissionConfig,
        ExpiryConfig,
        InitializerConfig,
        OptimizerConfig,
        TableConfig,
    )
    from recps.ps.client import PSClient

    def go() -> dict[str, Any]:
        path = _cluster_file(args)
        cfg = TableConfig(
            args.name,
            args.dim,
            dtype=args.dtype,
            initializer=InitializerConfig(args.init, args.init_scale),
            optimizer=OptimizerConfig(args.optimizer, lr=args.lr),
            admission=AdmissionConfig(min_count=args.min_count),
            expiry=ExpiryConfig(ttl_s=args.ttl_s),
        )
        with PSClient(path) as client:
            client.create_table(cfg, if_not_exists=args.if_not_exists)
        return cfg.to_dict()

    out, code = _run(go)
    if code:
        return code
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        opt = out["optimizer"]
        print(f"table {out['name']}: dim {out['dim']}, {opt['kind']} lr {opt['lr']:g}")
    return 0


def _table_rows(client: Any) -> dict[str, dict[str, int]]:
    """Per table: rows on disk and in memory, bytes, summed over the shards."""
    out: dict[str, dict[str, int]] = {}
    for r in client.stats().values():
        for t in r.tables:
            d = out.setdefault(
                t.table,
                {"rows_on_disk": 0, "rows_in_memory": 0, "disk_bytes": 0, "memory_bytes": 0},
            )
            d["rows_on_disk"] += t.rows_on_disk
            d["rows_in_memory"] += t.rows_in_memory
            d["disk_bytes"] += t.disk_bytes
            d["memory_bytes"] += t.memory_bytes
    return out


def _cmd_table_list(args: argparse.Namespace) -> int:
    from recps.ps.client import PSClient

    def go() -> list[dict[str, Any]]:
        with PSClient(_cluster_file(args)) as client:
            configs = client.list_tables()
            rows = _table_rows(client)
        return [
            {
                "name": c.name,
                "dim": c.dim,
                "dtype": c.dtype,
                "optimizer": c.optimizer.kind,
                "lr": c.optimizer.lr,
                **rows.get(c.name, {}),
            }
            for c in sorted(configs, key=lambda c: c.name)
        ]

    out, code = _run(go)
    if code:
        return code
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    if not out:
        print("no tables (recps table create NAME --dim N)")
        return 0
    print(
        f"{'TABLE':<24} {'DIM':>5} {'DTYPE':<8} {'OPTIMIZER':<10} "
        f"{'ROWS(DISK)':>12} {'ROWS(MEM)':>12}"
    )
    for t in out:
        print(
            f"{t['name']:<24} {t['dim']:>5} {t['dtype']:<8} {t['optimizer']:<10} "
            f"{t.get('rows_on_disk', 0):>12,} {t.get('rows_in_memory', 0):>12,}"
        )
    return 0


def _cmd_table_describe(args: argparse.Namespace) -> int:
    from recps.embedding.errors import UnknownTableError
    from recps.ps.client import PSClient

    def go() -> dict[str, Any]:
        with PSClient(_cluster_file(args)) as client:
            configs = {c.name: c for c in client.list_tables()}
            if args.name not in configs:
                raise UnknownTableError(args.name)
            shards = {}
            for sid, r in sorted(client.stats().items()):
                for t in r.tables:
                    if t.table == args.name:
                        shards[str(sid)] = {
                            "rows_in_memory": t.rows_in_memory,
                            "rows_on_disk": t.rows_on_disk,
                            "memory_bytes": t.memory_bytes,
                            "disk_bytes": t.disk_bytes,
                            "hit_rate": round(t.hit_rate, 4),
                            "lookups": t.lookups,
                            "pushes": t.pushes,
                            "evictions": t.evictions,
                        }
        return {"config": configs[args.name].to_dict(), "shards": shards}

    out, code = _run(go)
    if code:
        return code
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    c = out["config"]
    print(f"table {c['name']}: dim {c['dim']}, dtype {c['dtype']}, nonfinite {c['nonfinite']}")
    for key in ("initializer", "optimizer", "admission", "expiry"):
        print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in c[key].items()))
    print(
        f"  {'SHARD':>5} {'ROWS(DISK)':>12} {'ROWS(MEM)':>12} {'HIT':>6} "
        f"{'LOOKUPS':>10} {'PUSHES':>10}"
    )
    for sid, s in out["shards"].items():
        print(
            f"  {sid:>5} {s['rows_on_disk']:>12,} {s['rows_in_memory']:>12,} "
            f"{s['hit_rate']:>6.3f} {s['lookups']:>10,} {s['pushes']:>10,}"
        )
    return 0
