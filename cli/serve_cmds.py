"""`recps serve` and `recps serve-admin`: thin glue over :mod:`recps.serving.replica`.

    recps serve --model /models/ctr --data-dir /srv/r0 --port 7100 --watch-interval-s 10
    recps serve-admin status   --address 127.0.0.1:7100
    recps serve-admin load     --address 127.0.0.1:7100 [--version 120]
    recps serve-admin rollback --address 127.0.0.1:7100 --json

Exit codes: 0 done; 1 the replica refused or failed (its error is printed); 2 bad
arguments, or (serve) a model that cannot be loaded at start.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

_SERVE_EPILOG = """\
Runs one read-only serving replica in the foreground. It ingests the SST files of the
model version (the newest complete one under --model, or the one --model names) for the
serving shards it holds (--shards, default all) into RocksDB under --data-dir, then
answers the parameter server's Lookup RPC on --port, so a PSClient can point at it.
Missing ids get their table's default vector. Push and other writes are refused with
PERMISSION_DENIED. With --watch-interval-s it swaps to newer versions by itself; `recps
serve-admin` loads, rolls back and inspects. Prints a JSON "ready" line once serving;
SIGTERM (Ctrl-C) stops it gracefully.

Example:
  recps serve --model /models/ctr --data-dir /srv/r0 --port 7100 --watch-interval-s 10"""

_ADMIN_EPILOG = """\
  status    current and previous version, tables, rows, cache hit rates
  load      load a version (default: the newest complete one) and swap to it atomically;
            an explicit --version stays pinned (no watching, kept over restarts) until a
            `load` without --version
  rollback  swap back to the previous version, pinned

Example:
  recps serve-admin load --address 127.0.0.1:7100 --version 120
  recps serve-admin rollback --address 127.0.0.1:7100"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from recps.serving import main as serving_main

    fmt = argparse.RawDescriptionHelpFormatter
    serve = sub.add_parser(
        "serve",
        help="run a read-only serving replica of an exported model",
        epilog=_SERVE_EPILOG,
        formatter_class=fmt,
    )
    serving_main.add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    admin = sub.add_parser(
        "serve-admin",
        help="load, roll back or inspect a serving replica's model version",
        epilog=_ADMIN_EPILOG,
        formatter_class=fmt,
    )
    admin.add_argument("action", choices=("status", "load", "rollback"))
    admin.add_argument("--address", required=True, help="host:port of the replica")
    admin.add_argument("--version", type=int, default=None, help="load: this version (pinned)")
    admin.add_argument("--json", action="store_true", help="print the answer as JSON")
    admin.add_argument("--timeout", type=float, default=600.0, help="seconds (a load ingests)")
    admin.add_argument("--auth-token", default=None)
    admin.add_argument("--auth-token-file", default=None, help="read the bearer token from a file")
    admin.add_argument("--tls-ca", default=None, help="roots that sign the replica's certificate")
    admin.add_argument("--tls-cert", default=None, help="client certificate (mTLS)")
    admin.add_argument("--tls-key", default=None)
    admin.set_defaults(func=cmd_admin)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from recps.embedding.errors import ConfigError
    from recps.serving import main as serving_main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = serving_main.config_from_args(args)
    except (ConfigError, OSError) as e:
        print(f"recps serve: {e}", file=sys.stderr)
        return 2
    return serving_main.run(config)


def cmd_admin(args: argparse.Namespace) -> int:
    from recps.embedding.errors import RecpsError
    from recps.ps.config import TlsConfig
    from recps.serving.replica_server import ServingAdminClient

    if args.version is not None and args.action != "load":
        print("recps serve-admin: --version goes with `load` only", file=sys.stderr)
        return 2
    token = args.auth_token
    if args.auth_token_file:
        try:
            with open(args.auth_token_file) as f:
                token = f.read().strip()
        except OSError as e:
            print(f"recps serve-admin: {e}", file=sys.stderr)
            return 2
    tls = None
    if args.tls_ca:
        tls = TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
    try:
        with ServingAdminClient(args.address, token, tls, timeout_s=args.timeout) as admin:
            if args.action == "status":
                answer = admin.status()
            elif args.action == "load":
                answer = admin.load_version(args.version)
            else:
                answer = admin.rollback()
    except RecpsError as e:
        print(f"recps serve-admin {args.action}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(answer) if args.json else summary(args.action, answer))
    return 0


def _version_line(label: str, v: dict[str, Any] | None) -> list[str]:
    if not v:
        return [f"{label}: none"]
    lines = [f"{label}: version {v['version']}  ({v['path']}, loaded in {v['load_seconds']:.2f} s)"]
    for t in v["tables"]:
        lines.append(
            f"  {t['table']:<24} dim {t['dim']:<4} {t['row_format']:<8} rows {t['rows']:<10} "
            f"default {t['default_kind']:<12} cache {t['cache_rows']}/{t['cache_capacity']} "
            f"hit {t['cache_hit_rate']:.1%}"
        )
    return lines


def summary(action: str, answer: dict[str, Any]) -> str:
    """A short human-readable rendering of an admin answer."""
    lines = []
    if action == "load":
        took = f"{answer['seconds']:.2f} s"
        lines.append("swapped" if answer["changed"] else "already serving it")
        lines[-1] += f" ({took})"
    elif action == "rollback":
        lines.append("rolled back")
    else:
        pinned = answer["pinned_version"]
        lines.append(
            f"replica {answer['address']}  root {answer['model_root']}  shards "
            f"{answer['shards']}  latest available {answer['latest_available']}  "
            f"pinned {pinned if pinned is not None else 'no'}  watch "
            f"{answer['watch_interval_s'] or 'off'}"
        )
    lines += _version_line("current", answer["current"])
    lines += _version_line("previous", answer["previous"])
    return "\n".join(lines)
