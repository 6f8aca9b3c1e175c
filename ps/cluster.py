"""A local cluster: N shard processes on one machine, started, stopped and inspected.

This is the library behind ``recps cluster up``, ``recps cluster down`` and ``recps status``::

    recps cluster up --shards 2 --data-dir /tmp/recps --num-slots 1024
    recps status --data-dir /tmp/recps
    recps cluster down --data-dir /tmp/recps

Layout under the data directory ``D``::

    D/cluster.json          the cluster file: shard map, shard pids/addresses (PSClient reads it)
    D/.cluster.lock         held while `up` or `down` runs, so two of them never interleave
    D/shard-<i>/            shard i's data directory (tables, shard_map.json, server.json)
    D/shard-<i>/shard.log   shard i's stdout and stderr, appended across restarts

Shards are detached (a session of their own), so they outlive the command that started
them. ``up`` on a data directory that already holds a cluster keeps its data: each shard
restarts on the port its map names, so the map stays valid and nothing is re-hashed. If a
port was taken meanwhile, that shard starts on a new port and the map is re-issued with
the same slot owners, the new address and epoch + 1. Shards that are still running are
left as they are, so ``up`` also restarts just the shards that died.

Example:
    >>> info = cluster_up(ClusterConfig("/tmp/recps", num_shards=2))  # doctest: +SKIP
    >>> [s["state"] for s in cluster_status(info["cluster_file"])]  # doctest: +SKIP
    ['up', 'up']
    >>> cluster_down(data_dir="/tmp/recps")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from recps.embedding import errors as E
from recps.ps.config import ClientConfig
from recps.ps.routing import DEFAULT_NUM_SLOTS, ShardMap

CLUSTER_FILE = "cluster.json"
LOCK_FILE = ".cluster.lock"
SHARD_LOG = "shard.log"
# A pid is only signalled when its command line says it is a recps shard (pids get reused).
SHARD_MARKERS = ("recps.ps.main", "ps start")
_BIND_FAILED = re.compile(r"Failed to bind|Address already in use", re.IGNORECASE)
_SHARD_DIR = re.compile(r"^shard-(\d+)$")
_HAS_PROC = Path("/proc/self/stat").exists()


class ShardStartError(E.ShardUnavailableError):
    """A shard process exited or did not become ready in time; the log tail says why."""

    def __init__(
        self, shard_id: int, reason: str, log_path: Path, log_tail: str, exit_code: int | None
    ) -> None:
        self.shard_id, self.reason, self.exit_code = shard_id, reason, exit_code
        self.log_path, self.log_tail = log_path, log_tail
        super().__init__(
            f"shard {shard_id} failed to start: {reason}; the shards this command started "
            f"were stopped. Full log: {log_path}"
        )


@dataclass(frozen=True)
class ClusterConfig:
    """What ``recps cluster up`` starts. ``None`` means "as the existing cluster has it"."""

    data_dir: str
    num_shards: int | None = None  # required the first time; must match on a re-`up`
    num_slots: int | None = None  # None: DEFAULT_NUM_SLOTS, or the existing map's
    # None below: what the last `up` of this cluster used (kept in the cluster file), so a
    # restart never silently weakens durability; else the default in the comment.
    memory_mb: int | None = None  # hot-tier budget per table per shard (256)
    durability: str | None = None  # "sync": pushes are in the WAL when acknowledged ("async")
    metrics: bool | None = None  # Prometheus metrics on an ephemeral port per shard (False)
    cluster_file: str | None = None  # None: data_dir/cluster.json
    host: str = "127.0.0.1"  # loopback unless an operator opens it up on purpose
    ready_timeout_s: float = 60.0  # a shard is normally ready in about a second
    stop_timeout_s: float = 30.0  # graceful stop (flush + close) before SIGKILL

    def __post_init__(self) -> None:
        if self.num_shards is not None and not 1 <= self.num_shards < 0xFFFF:
            raise E.ConfigError(f"--shards must be in [1, 65535), got {self.num_shards}")
        n = self.num_slots
        if n is not None and (n < 1 or n & (n - 1) or n > 1 << 16):
            raise E.ConfigError(f"--num-slots must be a power of two in [1, 65536], got {n}")
        if n is not None and self.num_shards is not None and self.num_shards > n:
            raise E.ConfigError(f"{self.num_shards} shards need at least as many slots, got {n}")
        if self.memory_mb is not None and self.memory_mb < 1:
            raise E.ConfigError(f"--memory-mb must be >= 1, got {self.memory_mb}")
        if self.durability not in (None, "async", "sync"):
            raise E.ConfigError(f"--durability must be async or sync, got {self.durability!r}")
        if self.ready_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise E.ConfigError("timeouts must be > 0")

    def settled(self, previous: dict[str, Any]) -> ClusterConfig:
        """Unset options taken from ``previous`` (a cluster file's settings), else defaults."""
        defaults = {"memory_mb": 256, "durability": "async", "metrics": False}
        return replace(
            self,
            **{
                k: v if (v := getattr(self, k)) is not None else previous.get(k, default)
                for k, default in defaults.items()
            },
        )

    def settings(self) -> dict[str, Any]:
        return {"memory_mb": self.memory_mb, "durability": self.durability, "metrics": self.metrics}

    @property
    def root(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def cluster_path(self) -> Path:
        return Path(self.cluster_file).resolve() if self.cluster_file else self.root / CLUSTER_FILE


# ---- the cluster file -----------------------------------------------------------------------


def read_cluster_file(path: str | Path) -> dict[str, Any]:
    """The cluster file as a dict; ``ConfigError`` (saying what to run) when unusable."""
    path = Path(path)
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise E.ConfigError(
            f"no cluster file at {path}; start a cluster with "
            f"`recps cluster up --shards N --data-dir D`, or pass --cluster-file"
        ) from None
    except (OSError, ValueError) as e:
        raise E.ConfigError(f"cannot read cluster file {path}: {e}") from e
    if not isinstance(info, dict) or not {"shard_map", "shards", "data_dir"} <= info.keys():
        raise E.ConfigError(f"{path} is not a recps cluster file (needs shard_map, shards)")
    try:
        ShardMap.from_dict(info["shard_map"])
    except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise E.ConfigError(f"{path} holds a malformed shard map: {e}") from e
    return info


def _write_json_atomic(path: Path, obj: Any) -> None:
    """tmp + fsync + rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    if not root.is_dir():  # nothing there to protect (down of a deleted cluster)
        yield
        return
    with open(root / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise E.ConfigError(
                f"another `recps cluster` command is running on {root}; wait for it to finish"
            ) from None
        yield  # the lock goes with the file descriptor; children never inherit it


# ---- processes ------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    if _HAS_PROC:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        except OSError:
            return True  # it exists; we may not read it
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> tuple[list[str], Path | None]:
    """(argv, cwd) of ``pid``; ([], None) when it cannot be read."""
    if _HAS_PROC:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return [], None
        try:
            cwd: Path | None = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            cwd = None
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a], cwd
    try:  # no /proc: ask ps (argv joined by spaces, good enough for absolute paths)
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return [], None
    return out.split(), None


def is_shard_process(pid: int, shard_dir: str | Path) -> bool:
    """True when ``pid`` is alive and is a recps shard serving ``shard_dir``.

    Both must hold before a pid is signalled: its command line names ``recps.ps.main`` (or
    ``ps start``) and its ``--data-dir`` resolves to ``shard_dir``. A pid reused by any other
    process fails the check and is left alone.
    """
    if pid <= 0 or not pid_alive(pid):
        return False
    args, cwd = _cmdline(pid)
    joined = " ".join(args)
    if not any(m in joined for m in SHARD_MARKERS):
        return False
    data_dir = None
    for i, a in enumerate(args):
        if a == "--data-dir" and i + 1 < len(args):
            data_dir = args[i + 1]
        elif a.startswith("--data-dir="):
            data_dir = a.split("=", 1)[1]
    if data_dir is None:
        return False
    p = Path(data_dir)
    if not p.is_absolute():
        if cwd is None:
            return False
        p = cwd / p
    return os.path.realpath(p) == os.path.realpath(shard_dir)


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child (no zombie is left behind)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _stop_pids(pids: list[int], timeout_s: float) -> dict[int, str]:
    """SIGTERM every pid, wait up to ``timeout_s``, SIGKILL what is left. Pid -> outcome."""
    out: dict[int, str] = {}
    waiting = set(pids)
    steps = ((signal.SIGTERM, timeout_s, "stopped"), (signal.SIGKILL, 10.0, "killed"))
    for sig, limit_s, outcome in steps:
        for pid in sorted(waiting):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                out[pid] = "already gone" if sig == signal.SIGTERM else "stopped"
        waiting -= out.keys()
        deadline = time.monotonic() + limit_s
        while waiting:
            for pid in sorted(waiting):
                _reap(pid)
                if not pid_alive(pid):
                    out[pid] = outcome
            waiting -= out.keys()
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    for pid in waiting:
        out[pid] = "still running after SIGKILL"
    return out


# ---- up -------------------------------------------------------------------------------------


@dataclass
class _Launch:
    """One shard process this command started."""

    shard_id: int
    shard_dir: Path
    port: int
    metrics_port: int | None
    proc: subprocess.Popen[bytes] | None = None
    log_offset: int = 0
    retried: bool = False
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.shard_dir / SHARD_LOG

    def log_tail(self, n_chars: int = 4000) -> str:
        """What this launch wrote to the log (earlier runs' output is skipped)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(self.log_offset, f.seek(0, os.SEEK_END) - n_chars))
                return f.read().decode(errors="replace")
        except OSError:
            return "<no log>"


def _shard_argv(cfg: ClusterConfig, launch: _Launch, num_slots: int) -> list[str]:
    opts: dict[str, Any] = {
        "--data-dir": launch.shard_dir,
        "--shard-id": launch.shard_id,
        "--host": cfg.host,
        "--port": launch.port,
        "--num-slots": num_slots,
        "--memory-mb": cfg.memory_mb,
        "--durability": cfg.durability,
    }
    if launch.metrics_port is not None:
        opts["--metrics-port"] = launch.metrics_port
    return [sys.executable, "-m", "recps.ps.main", *(str(x) for kv in opts.items() for x in kv)]


def _spawn(cfg: ClusterConfig, launch: _Launch, num_slots: int) -> None:
    launch.shard_dir.mkdir(parents=True, exist_ok=True)
    # The previous process's file; the new one writes its own once it serves.
    (launch.shard_dir / "server.json").unlink(missing_ok=True)
    argv = _shard_argv(cfg, launch, num_slots)
    with open(launch.log_path, "ab") as log:
        launch.log_offset = log.tell()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n==== {stamp} recps cluster up: {' '.join(argv)}\n".encode())
        log.flush()
        launch.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=launch.shard_dir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # detached: no signal of the CLI's terminal reaches it
            close_fds=True,
        )


def _wait_ready(cfg: ClusterConfig, launches: list[_Launch], num_slots: int) -> None:
    """Until every launch has written its server.json (or raise ``ShardStartError``)."""
    deadline = time.monotonic() + cfg.ready_timeout_s
    pending = list(launches)
    while pending:
        for launch in list(pending):
            assert launch.proc is not None
            info = _read_json(launch.shard_dir / "server.json")
            if info and info.get("pid") == launch.proc.pid:  # written once it serves
                launch.ready = info
                pending.remove(launch)
                continue
            rc = launch.proc.poll()
            if rc is None:
                continue
            tail = launch.log_tail()
            if not launch.retried and launch.port and _BIND_FAILED.search(tail):
                # The recorded port was taken meanwhile: take any port; the map gets the
                # new address under a new epoch.
                launch.retried, launch.port = True, 0
                if launch.metrics_port:
                    launch.metrics_port = 0
                _spawn(cfg, launch, num_slots)
                continue
            raise ShardStartError(
                launch.shard_id, f"it exited with code {rc}", launch.log_path, tail, rc
            )
        if pending and time.monotonic() > deadline:
            launch = pending[0]
            raise ShardStartError(
                launch.shard_id,
                f"not ready after {cfg.ready_timeout_s:g} s",
                launch.log_path,
                launch.log_tail(),
                None,
            )
        if pending:
            time.sleep(0.05)


def _existing_map(root: Path, cluster_path: Path) -> ShardMap | None:
    """The newest map this data directory knows: the cluster file's or a shard's own."""
    maps = []
    info = _read_json(cluster_path)
    if info and "shard_map" in info:
        with contextlib.suppress(E.RecpsError, KeyError, TypeError, ValueError):
            maps.append(ShardMap.from_dict(info["shard_map"]))
    for d in _shard_dirs(root):
        path = d / "shard_map.json"
        if path.exists():
            try:
                maps.append(ShardMap.load(path))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise E.ConfigError(f"cannot read {path}: {e}; fix or remove it") from e
    maps = [m for m in maps if m.epoch > 0]
    return max(maps, key=lambda m: m.epoch) if maps else None


def _shard_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and _SHARD_DIR.match(d.name)]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def _port_of(address: str) -> int:
    try:
        return int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0


def _sync_map(address: str, new: ShardMap, timeout_s: float) -> str:
    """Install ``new`` on the shard at ``address`` unless it has this epoch or a newer one."""
    from recps.ps.client import PSClient

    cfg = ClientConfig(timeout_s=timeout_s, max_retries=0)
    with PSClient([address], cfg) as client:  # fetches the shard's current map
        cur = client.shard_map
        if cur.epoch > new.epoch:
            return f"kept its newer epoch {cur.epoch}"
        if cur.epoch == new.epoch:
            if cur.slot_owner.tobytes() != new.slot_owner.tobytes() or cur.shards != new.shards:
                raise E.ConfigError(
                    f"shard at {address} holds a different map with the same epoch "
                    f"{cur.epoch}; fix its shard_map.json or re-issue the map with a newer epoch"
                )
            return "already current"
        try:
            client.install_shard_map(new, [address])
        except E.StaleShardMapError:
            return "already current"  # raced with another installer
        return "installed"


def cluster_up(config: ClusterConfig) -> dict[str, Any]:
    """Start (or restart) the cluster's shards, install the map, write the cluster file.

    Returns the cluster file's content plus ``cluster_file`` (its path) and ``actions``
    (shard id -> what happened to it). Raises ``ShardStartError`` when a shard does not
    come up (every shard started by this call is stopped again) and ``ConfigError`` when
    the request contradicts the data directory.
    """
    root, cluster_path = config.root, config.cluster_path
    if config.num_shards is None and not root.is_dir():
        raise E.ConfigError(f"{root} holds no cluster yet; say how many: --shards N")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        prev = _read_json(cluster_path) or {}
        config = config.settled(prev.get("settings") or {})
        old = _existing_map(root, cluster_path)
        if old is None:
            if config.num_shards is None:
                raise E.ConfigError(f"{root} holds no cluster yet; say how many: --shards N")
            num_slots = config.num_slots or DEFAULT_NUM_SLOTS
            if config.num_shards > num_slots:
                raise E.ConfigError(f"{config.num_shards} shards need at least as many slots")
            ports = dict.fromkeys(range(config.num_shards), 0)
        else:
            if config.num_shards is not None and config.num_shards != len(old.shards):
                raise E.ConfigError(
                    f"{root} holds a cluster of {len(old.shards)} shards, not "
                    f"{config.num_shards}; omit --shards to restart it, or use a new --data-dir"
                )
            if config.num_slots is not None and config.num_slots != old.num_slots:
                raise E.ConfigError(
                    f"{root} holds a cluster with {old.num_slots} slots, not {config.num_slots}"
                )
            num_slots = old.num_slots
            ports = {sid: _port_of(addr) for sid, addr in old.shards.items()}

        actions: dict[int, str] = {}
        running: dict[int, dict[str, Any]] = {}
        launches: list[_Launch] = []
        for sid, port in sorted(ports.items()):
            shard_dir = root / f"shard-{sid}"
            info = _read_json(shard_dir / "server.json")
            if info and is_shard_process(int(info.get("pid", 0)), shard_dir):
                running[sid] = info
                actions[sid] = "already running"
                continue
            metrics_port = None
            if config.metrics:
                metrics_port = int((info or {}).get("metrics_port") or 0) if port else 0
            launches.append(_Launch(sid, shard_dir, port, metrics_port))

        try:
            for launch in launches:
                _spawn(config, launch, num_slots)
            _wait_ready(config, launches, num_slots)
            for launch in launches:
                running[launch.shard_id] = launch.ready
                actions[launch.shard_id] = (
                    "restarted on a new port" if launch.retried else "started"
                )
            addresses = {sid: str(running[sid]["address"]) for sid in sorted(running)}
            if old is None:
                new = ShardMap.even([addresses[i] for i in sorted(addresses)], num_slots, epoch=1)
            elif addresses != old.shards:
                new = old.replace(shards=addresses)  # same slot owners, new addresses
            else:
                new = old
            installs = {sid: _sync_map(addr, new, 30.0) for sid, addr in addresses.items()}
        except BaseException:
            started = [
                launch.proc.pid
                for launch in launches
                if launch.proc is not None and launch.proc.poll() is None
            ]
            _stop_pids(started, config.stop_timeout_s)
            for launch in launches:
                if launch.proc is not None:
                    launch.proc.poll()  # reap
            raise

        now = time.time()
        content = {
            "shard_map": new.to_dict(),
            "shards": [
                {
                    "shard_id": sid,
                    "address": addresses[sid],
                    "pid": int(running[sid]["pid"]),
                    "data_dir": str(root / f"shard-{sid}"),
                    "log": str(root / f"shard-{sid}" / SHARD_LOG),
                    "metrics_port": running[sid].get("metrics_port"),
                }
                for sid in sorted(running)
            ],
            "data_dir": str(root),
            "settings": config.settings(),
            "created_at": prev.get("created_at", now),
            "updated_at": now,
        }
        cluster_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(cluster_path, content)
    for sid, how in installs.items():
        actions[sid] += f"; map epoch {new.epoch} {how}"
    return {**content, "cluster_file": str(cluster_path), "actions": actions}


# ---- down -----------------------------------------------------------------------------------


def _resolve(cluster_file: str | Path | None, data_dir: str | Path | None) -> Path:
    if cluster_file is not None:
        return Path(cluster_file).resolve()
    if data_dir is not None:
        return Path(data_dir).resolve() / CLUSTER_FILE
    raise E.ConfigError("say which cluster: --cluster-file F or --data-dir D")


def cluster_down(
    cluster_file: str | Path | None = None,
    data_dir: str | Path | None = None,
    timeout_s: float = 30.0,
) -> list[dict[str, Any]]:
    """Stop every shard of the cluster: SIGTERM (flush + close), SIGKILL after ``timeout_s``.

    The pids come from the cluster file and from each shard's own ``server.json`` (the
    newest process on that data directory). A pid is signalled only if it still is that
    shard (see :func:`is_shard_process`). The cluster file is kept: the next ``up`` reads
    its map. Returns one dict per shard: ``shard_id``, ``pids`` (the candidates),
    ``outcome`` (what was done, in words), ``notes`` (pids left alone and why) and ``ok``
    (False only when a process survived SIGKILL).
    """
    path = _resolve(cluster_file, data_dir)
    if path.exists() or data_dir is None:
        info = read_cluster_file(path)
        root = Path(info["data_dir"])
        entries = {int(s["shard_id"]): s for s in info["shards"]}
    else:  # no cluster file (say, an `up` that failed): whatever shard dirs are there
        root = Path(data_dir).resolve()
        entries = {}
    shard_dirs = {int(d.name.split("-")[1]): d for d in _shard_dirs(root)}
    for sid, s in entries.items():
        shard_dirs.setdefault(sid, Path(s["data_dir"]))
    if not shard_dirs:
        raise E.ConfigError(f"no cluster at {root}: no cluster file and no shard-* directories")

    with _locked(root):
        report = []
        for sid, shard_dir in sorted(shard_dirs.items()):
            server = _read_json(shard_dir / "server.json") or {}
            candidates = {int(entries.get(sid, {}).get("pid") or 0), int(server.get("pid") or 0)}
            pids = sorted(p for p in candidates if p > 0)
            mine = [p for p in pids if is_shard_process(p, shard_dir)]
            notes = [
                f"pid {p} is no longer this shard (reused); left alone"
                for p in pids
                if p not in mine and pid_alive(p)
            ]
            report.append({"shard_id": sid, "pids": pids, "mine": mine, "notes": notes})
        outcomes = _stop_pids([p for r in report for p in r["mine"]], timeout_s)
        for r in report:
            done = {p: outcomes[p] for p in r.pop("mine")}
            r["outcome"] = ", ".join(f"pid {p} {how}" for p, how in done.items())
            r["outcome"] = r["outcome"] or "was not running"
            r["ok"] = "still running after SIGKILL" not in done.values()
        return report


# ---- status ---------------------------------------------------------------------------------


def _shard_stats(client: Any, shard_id: int) -> tuple[Any, str | None]:
    try:
        return client.stats()[shard_id], None
    except E.RecpsError as e:
        return None, str(e).splitlines()[0][:200]


def cluster_status(
    cluster_file: str | Path, sample_s: float = 0.5, timeout_s: float = 2.0
) -> list[dict[str, Any]]:
    """One dict per shard of the cluster file, from two ``Stats`` samples ``sample_s`` apart.

    Keys: ``shard_id``, ``address``, ``pid``, ``state`` (``up``: answered Stats; ``down``:
    no process; ``unreachable``: the process lives but did not answer), ``error``,
    ``epoch``, ``uptime_s``, ``rss_bytes``, ``rows_in_memory`` (rows in the hot tiers),
    ``rows_on_disk`` (rows in RocksDB; a row may be in both, so neither is the total),
    ``hit_rate`` (share of looked-up ids served from memory since start, over all tables,
    weighted by ids looked up; None before the first lookup), ``slots`` (slots the shard
    owns by its own map), ``rows_per_s`` (ids looked up + rows pushed per second, from the
    delta of the per-table ``lookups`` + ``pushes`` counters between the samples, timed by
    the shard's uptime), ``tables`` (names), ``hot_slots`` (its top slots by request rate:
    slot, qps, requests since start, rows, bytes). A shard that is not up has None in the numbers.
    """
    from recps.ps.client import PSClient

    info = read_cluster_file(cluster_file)
    m = ShardMap.from_dict(info["shard_map"])
    entries = {int(s["shard_id"]): s for s in info["shards"]}
    cfg = ClientConfig(timeout_s=timeout_s, max_retries=0)
    clients = {}
    for sid, addr in sorted(m.shards.items()):
        # A one-shard map, so each shard is asked alone and one down shard fails only itself.
        owner = np.full(m.num_slots, sid, dtype=np.uint16)
        clients[sid] = PSClient(ShardMap(0, m.num_slots, {sid: addr}, owner), cfg)
    try:
        first = {sid: _shard_stats(c, sid) for sid, c in clients.items()}
        if any(r is not None for r, _ in first.values()):
            time.sleep(sample_s)
        second = {
            sid: _shard_stats(c, sid) if first[sid][0] is not None else first[sid]
            for sid, c in clients.items()
        }
    finally:
        for c in clients.values():
            c.close()

    out = []
    for sid, addr in sorted(m.shards.items()):
        entry = entries.get(sid, {})
        pid = entry.get("pid")
        shard_dir = entry.get("data_dir") or str(Path(info["data_dir"]) / f"shard-{sid}")
        row: dict[str, Any] = {
            "shard_id": sid,
            "address": addr,
            "pid": pid,
            "state": "up",
            "error": None,
            "epoch": None,
            "uptime_s": None,
            "rss_bytes": None,
            "rows_in_memory": None,
            "rows_on_disk": None,
            "hit_rate": None,
            "slots": None,
            "rows_per_s": None,
            "tables": [],
            "hot_slots": [],
        }
        (r1, _), (r2, err) = first[sid], second[sid]
        if r1 is None or r2 is None:
            row["error"] = err
            alive = pid is not None and is_shard_process(int(pid), shard_dir)
            row["state"] = "unreachable" if alive else "down"
            out.append(row)
            continue
        looked_up = sum(t.lookups for t in r2.tables)
        hits = sum(t.hit_rate * t.lookups for t in r2.tables)
        row.update(
            epoch=r2.epoch,
            uptime_s=round(r2.uptime_s, 3),
            rss_bytes=r2.rss_bytes,
            rows_in_memory=sum(t.rows_in_memory for t in r2.tables),
            rows_on_disk=sum(t.rows_on_disk for t in r2.tables),
            hit_rate=hits / looked_up if looked_up else None,
            slots=len(r2.slot_ids),
            tables=[t.table for t in r2.tables],
            hot_slots=hot_slots(r2),
        )
        dt = r2.uptime_s - r1.uptime_s
        if r1 is not None and dt > 0:
            n1 = sum(t.lookups + t.pushes for t in r1.tables)
            n2 = sum(t.lookups + t.pushes for t in r2.tables)
            if n2 >= n1:  # counters restart with the process
                row["rows_per_s"] = round((n2 - n1) / dt, 1)
        out.append(row)
    return out


# ---- shards joining and leaving (rebalancing) -----------------------------------------------


def add_shards(
    cluster_file: str | Path, shard_ids: list[int], ready_timeout_s: float = 60.0
) -> dict[int, str]:
    """Start local shard processes for ``shard_ids`` with the cluster's settings; returns
    their addresses. They own no slot until a rebalance moves some to them (the map is
    the coordinator's to change); the cluster file lists them so ``down`` stops them.
    Shards already running are left as they are."""
    path = Path(cluster_file).resolve()
    info = read_cluster_file(path)
    root = Path(info["data_dir"])
    m = ShardMap.from_dict(info["shard_map"])
    cfg = ClusterConfig(str(root), cluster_file=str(path), ready_timeout_s=ready_timeout_s).settled(
        info.get("settings") or {}
    )
    out: dict[int, str] = {}
    with _locked(root):
        launches = []
        for sid in sorted(set(shard_ids)):
            shard_dir = root / f"shard-{sid}"
            srv = _read_json(shard_dir / "server.json")
            if srv and is_shard_process(int(srv.get("pid", 0)), shard_dir):
                out[sid] = str(srv["address"])
                continue
            launches.append(_Launch(sid, shard_dir, 0, 0 if cfg.metrics else None))
        try:
            for launch in launches:
                _spawn(cfg, launch, m.num_slots)
            _wait_ready(cfg, launches, m.num_slots)
        except BaseException:
            started = [x.proc.pid for x in launches if x.proc is not None and x.proc.poll() is None]
            _stop_pids(started, cfg.stop_timeout_s)
            raise
        info = read_cluster_file(path)
        entries = {int(s["shard_id"]): s for s in info["shards"]}
        for launch in launches:
            out[launch.shard_id] = str(launch.ready["address"])
            entries[launch.shard_id] = {
                "shard_id": launch.shard_id,
                "address": out[launch.shard_id],
                "pid": int(launch.ready["pid"]),
                "data_dir": str(launch.shard_dir),
                "log": str(launch.log_path),
                "metrics_port": launch.ready.get("metrics_port"),
            }
        info["shards"] = [entries[k] for k in sorted(entries)]
        info["updated_at"] = time.time()
        _write_json_atomic(path, info)
    return out


def remove_shards(
    cluster_file: str | Path, shard_ids: list[int], timeout_s: float = 30.0
) -> dict[int, str]:
    """Stop the processes of drained shards (refused while the map still lists them) and
    drop them from the cluster file. Their data directories stay. Shard id -> outcome."""
    path = Path(cluster_file).resolve()
    info = read_cluster_file(path)
    m = ShardMap.from_dict(info["shard_map"])
    still = sorted(set(shard_ids) & set(m.shards))
    if still:
        raise E.ConfigError(f"shards {still} are still in the shard map; drain them first")
    root = Path(info["data_dir"])
    out: dict[int, str] = {}
    with _locked(root):
        for sid in shard_ids:
            shard_dir = root / f"shard-{sid}"
            srv = _read_json(shard_dir / "server.json") or {}
            pid = int(srv.get("pid") or 0)
            if is_shard_process(pid, shard_dir):
                out[sid] = _stop_pids([pid], timeout_s)[pid]
            else:
                out[sid] = "was not running"
        info = read_cluster_file(path)
        info["shards"] = [s for s in info["shards"] if int(s["shard_id"]) not in shard_ids]
        info["updated_at"] = time.time()
        _write_json_atomic(path, info)
    return out


def hot_slots(stats: Any, top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` slots of one ``StatsResponse`` by request rate (by requests since start
    from a shard too old to send rates): slot, qps, requests, rows, bytes."""
    req = np.asarray(stats.slot_requests, dtype=np.int64)
    if not len(req):
        return []
    qps = np.asarray(stats.slot_qps, dtype=np.float64)
    if len(qps) != len(req):
        qps = None
    key = req if qps is None else qps
    order = np.argsort(-key, kind="stable")[:top]
    return [
        {
            "slot": int(stats.slot_ids[i]),
            "qps": None if qps is None else round(float(qps[i]), 1),
            "requests": int(req[i]),
            "rows": int(stats.slot_rows[i]),
            "bytes": int(stats.slot_bytes[i]) if len(stats.slot_bytes) else 0,
        }
        for i in order
        if key[i] > 0
    ]
