"""`recps cluster up|down` and `recps status`: thin glue over :mod:`recps.ps.cluster`.

Exit codes, for scripts:
    0  done (status: every shard is up)
    1  the cluster misbehaved: a shard did not start, a process would not stop, or
       (status) at least one shard is down or unreachable
    2  the request was wrong: bad arguments, no cluster file, a data directory that
       holds a different cluster
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

CLUSTER_FILE_ENV = "RECPS_CLUSTER_FILE"  # default cluster file of `status` and `down`

_UP_EPILOG = """\
Starts one `recps.ps.main` process per shard, detached from this command, each with its
own data directory D/shard-<i> and log D/shard-<i>/shard.log, on 127.0.0.1. Once every
shard serves, a shard map (epoch 1, slots split evenly) is installed on all of them and
the cluster file (default D/cluster.json) is written; PSClient(cluster_file) reads it.

Run again on the same data directory (after `recps cluster down`, or after a shard died)
to restart the stopped shards on their old ports with their data; running shards are left
alone. --shards may be omitted then, and options not given (--memory-mb, --durability,
--metrics) are those of the last `up`, kept in the cluster file.

Example:
  recps cluster up --shards 2 --data-dir /tmp/recps --num-slots 1024
  recps cluster up --data-dir /tmp/recps     # restart it later, data kept

Exit codes: 0 up; 1 a shard failed to start (its log tail is printed; the shards this
command started are stopped again); 2 bad arguments or a data directory that disagrees."""

_DOWN_EPILOG = """\
Sends SIGTERM to every shard (each flushes and closes its tables), waits up to --timeout
seconds, then sends SIGKILL. A pid is signalled only while its command line still names
recps.ps.main (or `ps start`) with that shard's data directory, so a reused pid is never
hit. The cluster file and the data stay; `recps cluster up --data-dir D` restarts it.

Example:
  recps cluster down --data-dir /tmp/recps

Exit codes: 0 every shard is stopped; 1 a process survived SIGKILL; 2 no such cluster."""

_STATUS_EPILOG = f"""\
Columns: ROWS(MEM) rows in the hot tiers, ROWS(DISK) rows in RocksDB (summed over tables;
a row may be in both). RSS is the process's resident memory. HIT is the share of looked-up
ids served from memory since the shard started. SLOTS are the hash slots the shard owns.
ROWS/S is ids looked up + rows pushed per second, measured over --sample seconds. Below
the table, each shard's hottest slots (ids requested per second over about the last
minute, ids requested since it started, rows stored): the skew `recps rebalance plan
--by qps` evens out. A shard
whose process is gone shows as down; one whose process lives but does not answer, as
unreachable.

The cluster file comes from --cluster-file, else --data-dir D (D/cluster.json), else
${CLUSTER_FILE_ENV}.

Example:
  recps status --data-dir /tmp/recps
  recps status --cluster-file /tmp/recps/cluster.json --json | jq '.[].state'

Exit codes: 0 every shard is up; 1 some shard is down or unreachable; 2 no cluster file."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    cluster = sub.add_parser(
        "cluster",
        help="start and stop a local sharded cluster",
        epilog="Example: recps cluster up --shards 2 --data-dir /tmp/recps",
    )
    actions = cluster.add_subparsers(dest="cluster", metavar="ACTION", required=True)

    up = actions.add_parser(
        "up", help="start N shard processes and install a shard map", epilog=_UP_EPILOG
    )
    up.formatter_class = fmt
    up.add_argument("--shards", type=int, default=None, help="number of shards (first up)")
    up.add_argument("--data-dir", required=True, help="root directory of the cluster's data")
    up.add_argument(
        "--num-slots", type=int, default=None, help="hash slots, a power of two (default 16384)"
    )
    up.add_argument(
        "--memory-mb", type=int, default=None, help="hot-tier budget per table (default 256)"
    )
    up.add_argument(
        "--durability",
        choices=("async", "sync"),
        default=None,
        help="sync: a push is in the WAL when acknowledged (default async)",
    )
    up.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a Prometheus endpoint per shard (default off)",
    )
    up.add_argument("--cluster-file", default=None, help="default: DATA_DIR/cluster.json")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait per start")
    up.add_argument("--json", action="store_true", help="print the result as JSON")
    up.set_defaults(func=_cmd_up)

    down = actions.add_parser("down", help="stop every shard gracefully", epilog=_DOWN_EPILOG)
    down.formatter_class = fmt
    _add_cluster_args(down)
    down.add_argument("--timeout", type=float, default=30.0, help="seconds before SIGKILL")
    down.add_argument("--json", action="store_true", help="print the result as JSON")
    down.set_defaults(func=_cmd_down)

    status = sub.add_parser(
        "status", help="rows, memory, hit rate, QPS of each shard", epilog=_STATUS_EPILOG
    )
    status.formatter_class = fmt
    _add_cluster_args(status)
    status.add_argument("--json", action="store_true", help="one JSON list, one dict per shard")
    status.add_argument("--sample", type=float, default=0.5, help="seconds between samples")
    status.set_defaults(func=_cmd_status)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cluster-file", default=None, help="the file `recps cluster up` wrote")
    g.add_argument("--data-dir", default=None, help="the cluster's data directory")


def _cluster_file(args: argparse.Namespace) -> str | None:
    if args.cluster_file or args.data_dir:
        return args.cluster_file
    return os.environ.get(CLUSTER_FILE_ENV)  # the CLI edge is the one place env is read


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# ---- up -------------------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    from recps.embedding.errors import RecpsError
    from recps.ps.cluster import ClusterConfig, ShardStartError, cluster_up

    try:
        config = ClusterConfig(
            data_dir=args.data_dir,
            num_shards=args.shards,
            num_slots=args.num_slots,
            memory_mb=args.memory_mb,
            durability=args.durability,
            metrics=args.metrics,
            cluster_file=args.cluster_file,
            ready_timeout_s=args.timeout,
        )
        result = cluster_up(config)
    except ShardStartError as e:
        print(f"error: {e}\n---- last lines of {e.log_path} ----", file=sys.stderr)
        print(e.log_tail.rstrip(), file=sys.stderr)
        return 1
    except RecpsError as e:
        return _fail(str(e), 2)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    m = result["shard_map"]
    for s in result["shards"]:
        action = result["actions"][s["shard_id"]]
        print(f"shard {s['shard_id']}  {s['address']}  pid {s['pid']}  {action}")
    print(f"shard map: epoch {m['epoch']}, {m['num_slots']} slots over {len(m['shards'])} shards")
    print(f"cluster file: {result['cluster_file']}")
    print(f"next: recps status --cluster-file {result['cluster_file']}")
    return 0


# ---- down -----------------------------------------------------------------------------------


def _cmd_down(args: argparse.Namespace) -> int:
    from recps.embedding.errors import RecpsError
    from recps.ps.cluster import cluster_down

    try:
        report = cluster_down(_cluster_file(args), args.data_dir, timeout_s=args.timeout)
    except RecpsError as e:
        return _fail(str(e), 2)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for r in report:
            print(f"shard {r['shard_id']}: {r['outcome']}")
            for note in r["notes"]:
                print(f"shard {r['shard_id']}: {note}")
    return 0 if all(r["ok"] for r in report) else 1


# ---- status ---------------------------------------------------------------------------------


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def format_status(rows: list[dict[str, Any]]) -> str:
    """The plain-text table of ``recps status`` (no third-party dependency)."""
    header = (
        "SHARD",
        "ADDRESS",
        "STATE",
        "PID",
        "EPOCH",
        "SLOTS",
        "ROWS(MEM)",
        "ROWS(DISK)",
        "RSS",
        "HIT",
        "ROWS/S",
        "TABLES",
    )
    lines = [header]
    for r in rows:
        hit = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
        lines.append(
            (
                str(r["shard_id"]),
                r["address"],
                r["state"],
                _cell(r["pid"]),
                _cell(r["epoch"]),
                _cell(r["slots"]),
                _cell(r["rows_in_memory"]),
                _cell(r["rows_on_disk"]),
                _human_bytes(r["rss_bytes"]),
                hit,
                _cell(r["rows_per_s"]),
                ",".join(r["tables"]) or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    for r in rows:
        hot = r.get("hot_slots") or []
        if hot:
            cells = ", ".join(_hot_slot_cell(h) for h in hot)
            text.append(f"shard {r['shard_id']} hot slots: {cells}")
    up = sum(r["state"] == "up" for r in rows)
    text.append(f"{up}/{len(rows)} shards up")
    for r in rows:
        if r["error"]:
            text.append(f"shard {r['shard_id']} {r['state']}: {r['error']}")
    return "\n".join(text)


def _hot_slot_cell(h: dict) -> str:
    rate = "" if h.get("qps") is None else f"{h['qps']:g} ids/s, "
    return f"{h['slot']} ({rate}{h['requests']} ids since start, {h['rows']} rows)"


def _cmd_status(args: argparse.Namespace) -> int:
    from recps.embedding.errors import RecpsError
    from recps.ps.cluster import CLUSTER_FILE, cluster_status

    path = _cluster_file(args)
    if path is None and args.data_dir is None:
        return _fail(
            f"say which cluster: --cluster-file F, --data-dir D, or set {CLUSTER_FILE_ENV}", 2
        )
    if path is None:
        path = os.path.join(args.data_dir, CLUSTER_FILE)
    try:
        rows = cluster_status(path, sample_s=args.sample)
    except RecpsError as e:
        return _fail(str(e), 2)
    print(json.dumps(rows, indent=1) if args.json else format_status(rows))
    return 0 if all(r["state"] == "up" for r in rows) else 1
