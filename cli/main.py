"""The `recps` command line: one entry point, subcommands registered per component."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recps",
        description="recps: sharded parameter servers for recommendation models.",
        epilog="Example: recps version",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("version", help="print the installed recps version")
    p.set_defaults(func=_cmd_version)

    demo = sub.add_parser("demo", help="guided demos", epilog="Example: recps demo store")
    demo_sub = demo.add_subparsers(dest="demo", metavar="DEMO", required=True)
    from recps.cli import store_demo

    store_demo.add_parser(demo_sub)
    from recps.cli import serve_demo

    serve_demo.add_parser(demo_sub)

    ps = sub.add_parser("ps", help="parameter-server shard processes")
    ps_sub = ps.add_subparsers(dest="ps", metavar="ACTION", required=True)
    start = ps_sub.add_parser(
        "start",
        help="run one shard in the foreground",
        epilog="Example: recps ps start --data-dir /data/shard0 --shard-id 0 --port 7001",
    )
    from recps.ps import main as ps_main

    ps_main.add_arguments(start)
    start.set_defaults(func=lambda a: ps_main.run(ps_main.config_from_args(a)))

    from recps.cli import cluster_cmds

    cluster_cmds.add_parsers(sub)
    from recps.cli import rebalance_cmds

    rebalance_cmds.add_parser(sub)
    from recps.cli import shard_cmds

    shard_cmds.add_parser(sub)
    from recps.cli import ops_cmds

    ops_cmds.add_parser(sub)

    from recps.cli import data_cmds

    data_cmds.add_parser(sub)

    from recps.cli import train_cmds

    train_cmds.add_parser(sub)
    from recps.cli import export_cmds

    export_cmds.add_parser(sub)
    from recps.cli import serve_cmds

    serve_cmds.add_parser(sub)
    rank = sub.add_parser(
        "rank",
        help="run the ranking service (gRPC Predict + HTTP /predict) over serving replicas",
        epilog="Example: recps rank --model .demo/models --replicas 127.0.0.1:7101 "
        "--http-port 8080",
    )
    from recps.serving import ranking_server

    ranking_server.add_arguments(rank)
    rank.set_defaults(func=_cmd_rank)
    return parser


def _cmd_rank(args: argparse.Namespace) -> int:
    from recps.serving import ranking_server

    return ranking_server.run_from_args(args)


def _cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    print(version("recps"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
