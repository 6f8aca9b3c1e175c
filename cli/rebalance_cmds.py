"""`recps rebalance plan|apply|status`: thin glue over :mod:`recps.ps.rebalance_plan`,
:mod:`recps.ps.migration` and :mod:`recps.ps.coordinator`.

Exit codes, for scripts:
    0  done
    1  the cluster misbehaved mid-apply (a shard did not answer); re-run apply to finish
    2  the request was wrong: bad arguments, no cluster, a plan that does not fit, no --yes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLUSTER_FILE_ENV = "RECPS_CLUSTER_FILE"

_PLAN_EPILOG = """\
Reads the shard map and per-slot statistics (rows, bytes, requests; each shard counts
its slots afresh) and writes a plan: which slots move from which shard to which, and the
load per shard before and after. Nothing changes until `recps rebalance apply`.

--shards N keeps the N lowest shard ids (drains the others) or adds new ids after the
highest. --by picks what to balance: rows stored, bytes stored, or qps (ids looked up +
rows pushed since each shard started). --tolerance is how far from the mean a shard may
stay (0.1 = within 10%).

Example:
  recps rebalance plan --shards 3 --data-dir /tmp/recps -o plan.json
  recps rebalance plan --shards 2 --by qps --data-dir /tmp/recps -o shrink.json

Exit codes: 0 written; 2 bad arguments or no cluster."""

_APPLY_EPILOG = """\
Moves the plan's slots while the cluster serves: each group of slots is copied in the
background, frozen briefly while the delta is copied (writes to it are retried by
clients), then handed over by an epoch bump. Local shards the plan adds are started
first (or give --add-shard ID=HOST:PORT for shards started elsewhere); drained shards
are stopped once they own nothing. Apply is idempotent: after a crash of anything,
re-run the same command to finish.

Example:
  recps rebalance apply plan.json --data-dir /tmp/recps --yes

Exit codes: 0 applied; 1 a shard failed mid-apply (re-run to finish); 2 bad arguments,
a plan for another cluster, or no --yes."""

_STATUS_EPILOG = """\
What the coordinator (the shard-map authority, D/coordinator/state.json) knows: the map
epoch, slots per shard, moves in flight (copying: the source still owns them; decided:
handed over, cleanup pending) and the latest finished moves.

Example:
  recps rebalance status --data-dir /tmp/recps --json

Exit codes: 0 nothing in flight; 1 moves in flight (an apply runs, or must be re-run);
2 no cluster."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    reb = sub.add_parser(
        "rebalance",
        help="move hash slots between live shards",
        epilog="Example: recps rebalance plan --shards 3 --data-dir /tmp/recps -o plan.json",
    )
    actions = reb.add_subparsers(dest="rebalance", metavar="ACTION", required=True)

    plan = actions.add_parser("plan", help="write a rebalance plan", epilog=_PLAN_EPILOG)
    plan.formatter_class = fmt
    _cluster_args(plan)
    plan.add_argument("--shards", type=int, required=True, help="number of shards after")
    plan.add_argument("--by", choices=("rows", "bytes", "qps"), default="rows")
    plan.add_argument("--tolerance", type=float, default=0.1, help="0.1 = within 10%% of mean")
    plan.add_argument("-o", "--output", required=True, help="where to write the plan JSON")
    plan.add_argument("--json", action="store_true", help="print the plan summary as JSON")
    plan.set_defaults(func=_cmd_plan)

    apply = actions.add_parser("apply", help="execute a plan, live", epilog=_APPLY_EPILOG)
    apply.formatter_class = fmt
    apply.add_argument("plan", help="a plan written by `recps rebalance plan`")
    _cluster_args(apply)
    apply.add_argument("--yes", action="store_true", help="really move the slots")
    apply.add_argument(
        "--add-shard",
        action="append",
        default=[],
        metavar="ID=HOST:PORT",
        help="a shard the plan adds, already running elsewhere (repeatable)",
    )
    apply.add_argument(
        "--slots-per-move", type=int, default=None, help="slots frozen together (4096)"
    )
    apply.add_argument(
        "--copy-duty-cycle",
        type=float,
        default=None,
        help="share of time the background copy may load a source (0.35; 1 = flat out)",
    )
    apply.add_argument("--no-progress", action="store_true", help="no progress bar")
    apply.add_argument("--json", action="store_true", help="print the report as JSON")
    apply.set_defaults(func=_cmd_apply)

    status = actions.add_parser("status", help="moves in flight and done", epilog=_STATUS_EPILOG)
    status.formatter_class = fmt
    _cluster_args(status)
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.set_defaults(func=_cmd_status)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cluster-file", default=None, help="the file `recps cluster up` wrote")
    g.add_argument("--data-dir", default=None, help="the cluster's data directory")


def _cluster_file(args: argparse.Namespace) -> Path:
    from recps.embedding.errors import ConfigError

    if args.cluster_file:
        return Path(args.cluster_file)
    if args.data_dir:
        return Path(args.data_dir) / "cluster.json"
    env = os.environ.get(CLUSTER_FILE_ENV)  # the CLI edge is the one place env is read
    if env:
        return Path(env)
    raise ConfigError(f"say which cluster: --cluster-file F, --data-dir D, or ${CLUSTER_FILE_ENV}")


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def target_shards(current: list[int], n: int) -> list[int]:
    """``n`` shards: the lowest current ids, or all of them plus new ids after the highest.

    >>> target_shards([0, 1], 3), target_shards([0, 1, 2], 2)
    ([0, 1, 2], [0, 1])
    """
    from recps.embedding.errors import ConfigError

    if n < 1:
        raise ConfigError(f"--shards must be >= 1, got {n}")
    cur = sorted(current)
    if n <= len(cur):
        return cur[:n]
    top = cur[-1] if cur else -1
    return cur + list(range(top + 1, top + 1 + n - len(cur)))


def _summary(plan: Any) -> str:
    d = plan.to_dict()
    lines = [
        f"plan by {plan.by}, tolerance {plan.tolerance:g}: shards {list(plan.shards_before)} "
        f"-> {list(plan.shards_after)}, {plan.moved_slots} slots move "
        f"({'balanced' if plan.balanced else 'NOT balanced: a slot is hotter than the band'})",
        f"imbalance (max/mean): {d['imbalance_before']} -> {d['imbalance_after']}",
    ]
    for s in sorted(set(plan.load_before) | set(plan.load_after)):
        before = plan.load_before.get(s, 0.0)
        after = plan.load_after.get(s, 0.0)
        lines.append(f"  shard {s}: {before:,.0f} -> {after:,.0f}")
    for mv in plan.moves:
        lines.append(f"  move {len(mv.slots)} slots {mv.src} -> {mv.dst} ({mv.load:,.0f})")
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    from recps.embedding.errors import RecpsError
    from recps.ps.client import PSClient
    from recps.ps.rebalance_plan import plan_rebalance

    try:
        path = _cluster_file(args)
        with PSClient(path) as client:
            client.refresh_shard_map()
            m = client.shard_map
            targets = target_shards(list(m.shards), args.shards)
            plan = plan_rebalance(m, client.slot_stats(), targets, args.by, args.tolerance)
        plan.save(args.output)
    except RecpsError as e:
        return _fail(str(e), 2)
    if args.json:
        print(json.dumps({k: v for k, v in plan.to_dict().items() if k != "moves"}, indent=1))
    else:
        print(_summary(plan))
        print(f"written to {args.output}; next: recps rebalance apply {args.output} --yes")
    return 0


def _parse_add(values: list[str]) -> dict[int, str]:
    from recps.embedding.errors import ConfigError

    out = {}
    for v in values:
        sid, sep, addr = v.partition("=")
        if not sep or not sid.isdigit() or ":" not in addr:
            raise ConfigError(f"--add-shard wants ID=HOST:PORT, got {v!r}")
        out[int(sid)] = addr
    return out


def progress_bar(total: int, enabled: bool) -> tuple[Any, Callable[[Any], None]]:
    """A tqdm bar on stderr (None when not ``enabled``) and the ``on_progress`` callback
    of :func:`recps.ps.migration.apply_plan` that drives it: slots moved, rows, MiB, rate."""
    bar = None
    if enabled:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="slot", desc="rebalance", file=sys.stderr)

    def on_progress(p: Any) -> None:
        if bar is None:
            return
        bar.total = p.slots_total or bar.total
        bar.n = p.slots_moved
        bar.set_postfix_str(
            f"{p.rows_copied:,} rows, {p.bytes_copied / 2**20:.1f} MiB, "
            f"{p.rows_per_s:,.0f} rows/s, {p.current}",
            refresh=True,
        )

    return bar, on_progress


def _cmd_apply(args: argparse.Namespace) -> int:
    from recps.embedding.errors import ConfigError, RecpsError
    from recps.ps import cluster
    from recps.ps.migration import MigrationConfig, apply_plan
    from recps.ps.rebalance_plan import RebalancePlan

    try:
        path = _cluster_file(args)
        plan = RebalancePlan.load(args.plan)
        added = _parse_add(args.add_shard)
        given = {"slots_per_move": args.slots_per_move, "copy_duty_cycle": args.copy_duty_cycle}
        cfg = MigrationConfig(**{k: v for k, v in given.items() if v is not None})
        info = cluster.read_cluster_file(path)
    except RecpsError as e:
        return _fail(str(e), 2)
    if not args.yes:
        return _fail(
            f"this moves {plan.moved_slots} slots between live shards; add --yes to do it", 2
        )
    bar, on_progress = progress_bar(plan.moved_slots, not args.no_progress and not args.json)
    try:
        from recps.ps.routing import ShardMap

        current = ShardMap.from_dict(info["shard_map"])
        new_ids = [s for s in plan.shards_after if s not in current.shards and s not in added]
        if new_ids:  # local cluster: start them here
            added.update(cluster.add_shards(path, new_ids))
        report = apply_plan(plan, path, added, cfg, on_progress=on_progress)
        leaving = [s for s in current.shards if s not in report["shards"]]
        local = {int(s["shard_id"]) for s in cluster.read_cluster_file(path)["shards"]}
        stopped = cluster.remove_shards(path, [s for s in leaving if s in local])
    except ConfigError as e:
        return _fail(str(e), 2)
    except RecpsError as e:
        return _fail(f"{e}\nthe cluster is consistent; re-run the same command to finish", 1)
    finally:
        if bar is not None:
            bar.close()
    report["stopped"] = stopped
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"moved {report['moved_slots']} slots in {report['moves']} moves: "
            f"{report['moved_rows']:,} rows, {report['moved_bytes'] / 2**20:.1f} MiB in "
            f"{report['seconds']:.1f} s; map epoch {report['epoch']}, shards {report['shards']}"
        )
        for sid, how in stopped.items():
            print(f"shard {sid} (drained): {how}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from recps.embedding.errors import RecpsError
    from recps.ps.coordinator import Coordinator

    try:
        path = _cluster_file(args)
        root = Path(args.data_dir) if args.data_dir else path.parent
        state = Coordinator.read(root)
    except RecpsError as e:
        return _fail(str(e), 2)
    m = state.shard_map
    owned = {s: int((m.slot_owner == s).sum()) for s in sorted(m.shards)}
    active = state.active_moves()
    done = sorted(
        (v for v in state.moves.values() if v["state"] == "done"),
        key=lambda v: v.get("finished_at", 0),
    )

    def brief(mv: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in mv.items() if k != "slots"}, "slots": len(mv["slots"])}

    out: dict[str, Any] = {
        "epoch": m.epoch,
        "slots_per_shard": owned,
        "in_flight": [brief(mv) for mv in active],
        "done": len(done),
        "recent": [brief(mv) for mv in done[-5:]],
        "plan_in_progress": state.plan is not None,
    }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"shard map epoch {m.epoch}; slots per shard: {owned}")
        if state.plan is not None:
            p = state.plan
            print(
                f"plan in progress: {p['moved_slots']} slots, shards {p['shards_before']} -> "
                f"{p['shards_after']} (if no apply runs, re-run it to finish)"
            )
        for mv in out["in_flight"]:
            what = f"{mv['slots']} slots {mv['src']} -> {mv['dst']}"
            print(f"in flight: move {mv['id']} {what} ({mv['state']})")
        for mv in out["recent"]:
            what = f"{mv['slots']} slots {mv['src']} -> {mv['dst']}"
            print(f"done: move {mv['id']} {what}, {mv['rows']:,} rows")
        print(f"{len(done)} moves done, {len(active)} in flight")
    return 1 if active else 0
