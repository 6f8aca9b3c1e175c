"""`recps shard add|remove`: grow or shrink a running cluster by one shard, live: a
`recps cluster up` cluster (shard processes) or a Ray job's (shard actors).

Thin glue over :func:`recps.ps.cluster.add_shards` / :func:`~recps.ps.cluster.remove_shards`
(processes), :func:`recps.worker.ray_cluster.add_shard_actors` /
:func:`~recps.worker.ray_cluster.remove_shard_actors` (actors),
:func:`recps.ps.migration.join_shards` (the map) and a rebalance plan + apply (the slots).

Exit codes, for scripts:
    0  done
    1  the cluster misbehaved mid-way (a shard did not start or answer); re-run to finish
    2  the request was wrong: bad arguments, no cluster, an unknown shard, no --yes
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from recps.cli.rebalance_cmds import _cluster_args, _cluster_file, _fail, progress_bar

_ADD_EPILOG = """\
Starts a new shard with the cluster's settings, creates every table on it and adds it
to the shard map owning no slot: clients route nothing to it yet. For a `recps cluster
up` cluster it is a process on this machine (its data in D/shard-<id>, its log in
D/shard-<id>/shard.log); for a training job on Ray (the cluster file `recps train`
writes in its data_dir) it is a new actor on that Ray cluster, stopped with the job.
With --rebalance (and --yes) it then plans and applies a rebalance over all shards (as
`recps rebalance plan` + `apply`), moving slots to it while the cluster serves.

Example:
  recps shard add --data-dir /tmp/recps
  recps shard add --data-dir /tmp/recps --rebalance --by rows --yes
  recps shard add --cluster-file /tmp/job/cluster.json --rebalance --yes   # a Ray job

Exit codes: 0 added (and rebalanced); 1 the shard did not start, or the rebalance
stopped mid-way (re-run `recps rebalance apply`); 2 bad arguments, no cluster, no --yes
with --rebalance."""

_REMOVE_EPILOG = """\
Drains the shard: plans a rebalance onto the other shards (its slots go to the least
loaded ones, --by rows|bytes|qps) and applies it live, drops the shard from the map, then
stops its process (SIGTERM: flush and close; on Ray, the actor's graceful stop, then the
actor is killed). Its data directory stays on disk. Safe to re-run after a failure: it
continues where it stopped.

Example:
  recps shard remove --shard 2 --data-dir /tmp/recps --yes

Exit codes: 0 removed; 1 the drain stopped mid-way (re-run the command); 2 bad
arguments, an unknown shard, the last shard, or no --yes."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    shard = sub.add_parser(
        "shard",
        help="add or remove a shard of a running cluster (local or Ray), live",
        epilog="Example: recps shard add --data-dir /tmp/recps --rebalance --yes",
    )
    actions = shard.add_subparsers(dest="shard_action", metavar="ACTION", required=True)

    add = actions.add_parser("add", help="start a new shard and add it", epilog=_ADD_EPILOG)
    add.formatter_class = fmt
    _cluster_args(add)
    add.add_argument("--id", type=int, default=None, help="shard id (default: highest + 1)")
    add.add_argument("--rebalance", action="store_true", help="then move slots to it")
    _rebalance_args(add)
    add.set_defaults(func=_cmd_add)

    rm = actions.add_parser("remove", help="drain a shard, then stop it", epilog=_REMOVE_EPILOG)
    rm.formatter_class = fmt
    _cluster_args(rm)
    rm.add_argument("--shard", type=int, required=True, help="the shard id to remove")
    _rebalance_args(rm)
    rm.set_defaults(func=_cmd_remove)


def _rebalance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--by", choices=("rows", "bytes", "qps"), default="rows")
    p.add_argument("--tolerance", type=float, default=0.1, help="0.1 = within 10%% of mean")
    p.add_argument("--yes", action="store_true", help="really move slots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _rebalance(path: Any, targets: list[int], added: dict[int, str], args: Any) -> dict[str, Any]:
    """Plan over ``targets`` with fresh slot statistics, then apply it live."""
    from recps.ps.client import PSClient
    from recps.ps.migration import apply_plan
    from recps.ps.rebalance_plan import plan_rebalance

    with PSClient(path) as client:
        m = client.refresh_shard_map()
        plan = plan_rebalance(m, client.slot_stats(), targets, args.by, args.tolerance)
    bar, on_progress = progress_bar(plan.moved_slots, not args.no_progress and not args.json)
    try:
        report = apply_plan(plan, path, added, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    return report


def _print(report: dict[str, Any], args: Any, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print("\n".join(lines))


def _join_ray_env(info: dict[str, Any]) -> None:
    """Before Ray is imported: the job's Ray auth mode (Ray >= 2.5x turns token auth on for
    a local cluster; its driver has RAY_AUTH_MODE=token, an operator's shell does not).
    The token itself Ray reads from ~/.ray/auth_token or RAY_AUTH_TOKEN."""
    mode = (info.get("ray") or {}).get("auth_mode")
    if mode:
        os.environ.setdefault("RAY_AUTH_MODE", str(mode))


def _cmd_add(args: argparse.Namespace) -> int:
    from recps.embedding.errors import ConfigError, RecpsError
    from recps.ps import cluster
    from recps.ps.migration import join_shards
    from recps.ps.routing import ShardMap

    try:
        path = _cluster_file(args)
        info = cluster.read_cluster_file(path)
        m = ShardMap.from_dict(info["shard_map"])
        known = set(m.shards) | {int(s["shard_id"]) for s in info["shards"]}
        sid = args.id if args.id is not None else max(known) + 1
        if sid < 0 or sid >= 0xFFFF:
            raise ConfigError(f"--id must be in [0, 65535), got {sid}")
        if sid in m.shards:
            raise ConfigError(f"shard {sid} is already in the shard map")
        if args.rebalance and not args.yes:
            raise ConfigError("--rebalance moves slots between live shards; add --yes to do it")
    except RecpsError as e:
        return _fail(str(e), 2)
    report: dict[str, Any] = {"shard_id": sid}
    try:
        if info.get("ray"):  # a Ray job's cluster: a new actor of that job
            _join_ray_env(info)
            from recps.worker.ray_cluster import add_shard_actors

            report["address"] = add_shard_actors(path, [sid])[sid]
        else:
            report["address"] = cluster.add_shards(path, [sid])[sid]
        m = join_shards(path, {sid: report["address"]})
        report["epoch"] = m.epoch
        lines = [f"shard {sid} started at {report['address']}; in the map (epoch {m.epoch})"]
        if args.rebalance:
            reb = _rebalance(path, sorted(m.shards), {}, args)
            report["rebalance"] = reb
            lines.append(
                f"rebalanced: {reb['moved_slots']} slots, {reb['moved_rows']:,} rows in "
                f"{reb['seconds']:.1f} s; map epoch {reb['epoch']}"
            )
        else:
            lines.append(
                "it owns no slot yet: recps rebalance plan --shards "
                f"{len(m.shards)} ... then apply, or re-run with --rebalance --yes"
            )
    except ConfigError as e:
        return _fail(str(e), 2)
    except RecpsError as e:
        return _fail(f"{e}\nre-run to finish (the cluster stays consistent)", 1)
    _print(report, args, lines)
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from recps.embedding.errors import ConfigError, RecpsError
    from recps.ps import cluster
    from recps.ps.routing import ShardMap

    try:
        path = _cluster_file(args)
        info = cluster.read_cluster_file(path)
        m = ShardMap.from_dict(info["shard_map"])
        local = {int(s["shard_id"]) for s in info["shards"]}
        sid = args.shard
        if sid not in m.shards and sid not in local:
            raise ConfigError(f"no shard {sid}: the map has {sorted(m.shards)}")
        rest = sorted(s for s in m.shards if s != sid)
        if not rest:
            raise ConfigError(f"shard {sid} is the last one; `recps cluster down` stops it")
    except RecpsError as e:
        return _fail(str(e), 2)
    if not args.yes:
        owned = int((m.slot_owner == sid).sum())
        return _fail(
            f"this drains {owned} slots of shard {sid} onto shards {rest} and stops it; "
            "add --yes to do it",
            2,
        )
    report: dict[str, Any] = {"shard_id": sid}
    try:
        if sid in m.shards:
            reb = _rebalance(path, rest, {}, args)
            report["rebalance"] = reb
        if sid not in local:
            report["stopped"] = None
        elif info.get("ray"):
            _join_ray_env(info)
            from recps.worker.ray_cluster import remove_shard_actors

            report["stopped"] = remove_shard_actors(path, [sid])[sid]
        else:
            report["stopped"] = cluster.remove_shards(path, [sid])[sid]
    except ConfigError as e:
        return _fail(str(e), 2)
    except RecpsError as e:
        return _fail(f"{e}\nre-run the same command to finish", 1)
    reb = report.get("rebalance") or {"moved_slots": 0, "moved_rows": 0, "epoch": m.epoch}
    _print(
        report,
        args,
        [
            f"shard {sid} drained: {reb['moved_slots']} slots, {reb['moved_rows']:,} rows moved; "
            f"map epoch {reb['epoch']}",
            f"process: {report['stopped'] or 'not local, stop it yourself'}",
        ],
    )
    return 0
