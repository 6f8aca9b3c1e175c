"""`recps train`: run a training job on Ray (a local Ray by default).

    recps train --config job.yaml                    # a new job; refuses a used data_dir
    recps train --config job.yaml --resume           # go on from the last checkpoint
    recps train --config job.yaml --overwrite        # clear the earlier run, start over
    recps train --config job.yaml --address ray://head:10001
    recps train --config job.yaml --check            # validate the config and stop
    recps train --config job.yaml --json             # the result as one JSON object

Exit codes: 0 trained; 2 a bad config or data-dir state (nothing was started);
1 training failed (workers failed more often than cluster.max_failures).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="run a training job (PS shards + workers) on Ray",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: recps train --config deploy/job.example.yaml --overwrite",
    )
    p.add_argument("--config", required=True, help="the job's YAML file")
    p.add_argument("--address", default=None, help="a running Ray cluster (default: local Ray)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="discard an earlier run's state")
    p.add_argument("--check", action="store_true", help="validate the config, print it, stop")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="rank 0's progress bar (auto: when stderr is a terminal)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recps.embedding.errors import ConfigError, RecpsError
    from recps.worker.job_config import load_job_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        job = load_job_config(args.config)
    except (ConfigError, OSError) as e:
        print(f"recps train: {args.config}: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(job.to_yaml())
        return 0
    from recps.worker.launcher import JobStateError, run_job

    progress = {"auto": None, "on": True, "off": False}[args.progress]
    try:
        result = run_job(
            job,
            address=args.address,
            resume=True if args.resume else None,
            overwrite=args.overwrite,
            progress=progress,
        )
    except JobStateError as e:
        print(f"recps train: {e}", file=sys.stderr)
        return 2
    except RecpsError as e:
        print(f"recps train: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(summary(result.to_dict()))
    return 0


def summary(r: dict[str, Any]) -> str:
    """The human summary of a :class:`~recps.worker.launcher.JobResult` dict."""
    ev = r.get("eval") or {}
    auc, ll = ev.get("auc", float("nan")), ev.get("logloss", float("nan"))
    lines = [
        f"job {r['name']}: {r['steps']} steps, {r['samples']:,} samples; "
        f"training loop {r.get('train_seconds', 0.0):.1f} s ({r['samples_per_s']:,.0f} samples/s)",
        f"  wall time    {r['total_seconds']:.1f} s in all, {r['seconds']:.1f} s of it in "
        "Ray Train (worker start-up included)",
        f"  eval AUC     {auc:.4f}   logloss {ll:.4f}   ({int(ev.get('rows', 0)):,} held-out rows)",
    ]
    if r.get("planted_auc") is not None:
        lines.append(f"  planted AUC  {r['planted_auc']:.4f}   (the data's own ceiling)")
    if r.get("resumed_from"):
        lines.append(f"  resumed from {r['resumed_from']}")
    if r.get("restarts"):
        lines.append(f"  worker-group restarts after failures: {r['restarts']}")
    if r.get("checkpoints"):
        lines.append(f"  checkpoints: {', '.join(r['checkpoints'])}")
    lines.append(f"  data dir     {r['data_dir']}")
    return "\n".join(lines)
