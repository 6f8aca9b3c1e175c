"""The shard-map authority: one durable, versioned source of truth for slot ownership.

Every change of the map (a slot handed over, a shard added or retired) is decided here
first, written atomically to ``state.json``, and only then installed on the shards and
published in the cluster file that clients read. Whatever crashes afterwards, re-running
the installation from this file converges every shard and client on it.

Layout under the cluster's data directory ``D``::

    D/coordinator/state.json   the map + the move journal (tmp + fsync + rename)
    D/coordinator/LOCK         held (flock) by the one process acting as coordinator

Placement: the coordinator is a role, not a daemon. Whoever changes the map (``recps
rebalance apply``) opens it, which takes the lock, so two writers never interleave; a
crash releases the lock with the process. On Ray the same class would live in a named
actor. See docs/architecture.md, "Shard-map authority and rebalancing".

Move journal: each move (slots from one shard to another) is ``copying`` until the
coordinator decides it, ``decided`` from the moment its epoch bump is durable (the
handover has happened, even if no shard knows yet), ``done`` once both shards finished.

Example:
    >>> import tempfile
    >>> from recps.ps.routing import ShardMap
    >>> d = tempfile.mkdtemp()
    >>> with Coordinator.open(d, initial=ShardMap.even(["a:1", "b:2"], 16)) as c:
    ...     c.begin_move("m1", src=0, dst=1, slots=[0, 1])
    ...     c.decide("m1").epoch
    2
    >>> Coordinator.read(d).shard_map.slot_owner[:3].tolist()
    [1, 1, 0]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recps.embedding import errors as E
from recps.ps.routing import ShardMap

STATE_DIR = "coordinator"
STATE_FILE = "state.json"
LOCK_FILE = "LOCK"
_FORMAT = 1
_KEEP_DONE_MOVES = 1000  # journal entries of finished moves kept for `rebalance status`


class CoordinatorBusyError(E.ConfigError):
    """Another process holds the coordinator lock (an apply is running)."""


@dataclass(frozen=True)
class CoordinatorState:
    """A read-only view of the authority's file."""

    shard_map: ShardMap
    moves: dict[str, dict[str, Any]]
    plan: dict[str, Any] | None
    updated_at: float

    def active_moves(self) -> list[dict[str, Any]]:
        return [m for m in self.moves.values() if m["state"] != "done"]


def _atomic_write(path: Path, obj: Any, indent: int | None = 1) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=indent, separators=None if indent else (",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)


class Coordinator:
    """The map authority of one cluster, held open by one process at a time."""

    def __init__(self, root: Path, lock_fd: Any, state: dict[str, Any], cluster_file: Path | None):
        self.root = root
        self._lock_fd = lock_fd
        self._state = state
        self.cluster_file = cluster_file

    # ---- opening -----------------------------------------------------------------------

    @staticmethod
    def _load(root: Path) -> dict[str, Any] | None:
        path = root / STATE_FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise E.ConfigError(f"cannot read the coordinator state {path}: {e}") from e
        if d.get("format") != _FORMAT:
            raise E.ConfigError(f"{path} has format {d.get('format')}, expected {_FORMAT}")
        return d

    @classmethod
    def read(cls, data_dir: str | Path) -> CoordinatorState:
        """The authority's current state, without taking the lock (``rebalance status``)."""
        root = Path(data_dir) / STATE_DIR
        d = cls._load(root)
        if d is None:
            raise E.ConfigError(
                f"no coordinator state under {root}; it is created by the first "
                "`recps rebalance apply`"
            )
        return _view(d)

    @classmethod
    def open(
        cls,
        data_dir: str | Path,
        initial: ShardMap | None = None,
        cluster_file: str | Path | None = None,
    ) -> Coordinator:
        """Take the coordinator role for the cluster under ``data_dir``.

        The map is the newest of the saved state, ``initial`` and the cluster file's
        (``recps cluster up`` re-issues the map when a shard restarts on a new port).
        Raises :class:`CoordinatorBusyError` while another process holds the role.
        """
        root = Path(data_dir) / STATE_DIR
        root.mkdir(parents=True, exist_ok=True)
        fd = open(root / LOCK_FILE, "w")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fd.close()
            raise CoordinatorBusyError(
                f"another process is coordinating {data_dir} (an apply is running); wait "
                "for it, or check `recps rebalance status`"
            ) from None
        try:
            state = cls._load(root) or {"format": _FORMAT, "moves": {}, "plan": None}
            cf = Path(cluster_file) if cluster_file else None
            candidates = []
            if "shard_map" in state:
                candidates.append(ShardMap.from_dict(state["shard_map"]))
            if initial is not None:
                candidates.append(initial)
            if cf is not None and cf.exists():
                with contextlib.suppress(KeyError, ValueError, OSError):
                    candidates.append(ShardMap.from_dict(json.loads(cf.read_text())["shard_map"]))
            if not candidates:
                raise E.ConfigError(f"no shard map for {data_dir}: start the cluster first")
            newest = max(candidates, key=lambda m: m.epoch)
            coord = cls(root, fd, state, cf)
            if state.get("shard_map") != newest.to_dict():
                state["shard_map"] = newest.to_dict()
                coord._save()
            return coord
        except BaseException:
            fd.close()
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            self._lock_fd.close()  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------

    @property
    def shard_map(self) -> ShardMap:
        return ShardMap.from_dict(self._state["shard_map"])

    def state(self) -> CoordinatorState:
        return _view(self._state)

    def move(self, move_id: str) -> dict[str, Any]:
        try:
            return dict(self._state["moves"][move_id])
        except KeyError:
            raise E.ConfigError(f"no move {move_id!r} in the journal") from None

    # ---- changing ------------------------------------------------------------------------

    def _save(self) -> None:
        assert self._lock_fd is not None, "the coordinator was closed"
        self._state["updated_at"] = time.time()
        moves = self._state["moves"]
        done = [k for k, v in moves.items() if v["state"] == "done"]
        for k in done[: max(0, len(done) - _KEEP_DONE_MOVES)]:
            del moves[k]
        # Compact: a decision is written while its slots are frozen, and indenting the
        # journal's slot lists costs several times the write (`jq .` reads it fine).
        _atomic_write(self.root / STATE_FILE, self._state, indent=None)

    def set_plan(self, plan: dict[str, Any] | None) -> None:
        """Record the plan being applied (``rebalance status`` shows it)."""
        self._state["plan"] = plan
        self._save()

    def begin_move(self, move_id: str, src: int, dst: int, slots: Iterable[int]) -> None:
        """Journal a move as ``copying``: nothing is decided; the source still owns them."""
        slots = sorted(int(s) for s in slots)
        m = self.shard_map
        wrong = [s for s in slots if int(m.slot_owner[s]) != src]
        if wrong:
            raise E.ConfigError(f"move {move_id}: slots {wrong[:5]} are not shard {src}'s")
        if dst not in m.shards:
            raise E.ConfigError(f"move {move_id}: shard {dst} is not in the map")
        self._state["moves"][move_id] = {
            "id": move_id,
            "src": src,
            "dst": dst,
            "slots": slots,
            "state": "copying",
            "started_at": time.time(),
            "rows": 0,
            "bytes": 0,
        }
        self._save()

    def note_progress(self, move_id: str, rows: int, nbytes: int) -> None:
        mv = self._state["moves"][move_id]
        mv["rows"], mv["bytes"] = rows, nbytes  # persisted with the next state change

    def decide(self, move_id: str, publish: bool = True) -> ShardMap:
        """The handover: the move's slots belong to its target from this epoch on. Durable
        before it returns, and published to the cluster file unless ``publish=False``
        (the caller then calls :meth:`publish` once the shards have the map: clients
        find the newest epoch on the shards as well, so the slots' freeze need not wait
        for the cluster file's fsyncs)."""
        mv = self._state["moves"][move_id]
        if mv["state"] != "copying":
            return self.shard_map
        m = self.shard_map
        owner = m.slot_owner.copy()
        owner[np.asarray(mv["slots"], dtype=np.int64)] = mv["dst"]
        new = m.replace(slot_owner=owner)
        mv["state"] = "decided"
        mv["epoch"] = new.epoch
        mv["decided_at"] = time.time()
        self._state["shard_map"] = new.to_dict()
        self._save()
        if publish:
            self.publish()
        return new

    def finish_move(self, move_id: str) -> None:
        mv = self._state["moves"][move_id]
        mv["state"] = "done"
        mv["finished_at"] = time.time()
        self._save()

    def abandon_move(self, move_id: str) -> None:
        """Forget a move that was never decided (the source kept the slots)."""
        mv = self._state["moves"].get(move_id)
        if mv is not None and mv["state"] == "copying":
            del self._state["moves"][move_id]
            self._save()

    def set_shards(self, shards: dict[int, str]) -> ShardMap:
        """A new map with these shard addresses (adding a shard, or retiring one that owns
        no slot), epoch + 1; durable and published."""
        m = self.shard_map
        owners = set(np.unique(m.slot_owner).tolist())
        if not owners <= set(shards):
            raise E.ConfigError(f"shards {sorted(owners - set(shards))} still own slots")
        if shards == m.shards:
            return m
        new = m.replace(shards=dict(shards))
        self._state["shard_map"] = new.to_dict()
        self._save()
        self.publish()
        return new

    def publish(self) -> None:
        """Copy the map into the cluster file (what clients read first on a refresh),
        under the cluster lock that `recps cluster up|down` take."""
        cf = self.cluster_file
        if cf is None or not cf.exists():
            return
        with cluster_file_lock(cf):
            try:
                info = json.loads(cf.read_text())
            except (OSError, ValueError):
                return
            cur = info.get("shard_map") or {}
            if int(cur.get("epoch", 0)) >= self.shard_map.epoch:
                return
            info["shard_map"] = self._state["shard_map"]
            info["updated_at"] = time.time()
            _atomic_write(cf, info)


@contextlib.contextmanager
def cluster_file_lock(path: Path) -> Iterator[None]:
    """The lock every writer of a cluster file takes (beside it, blocking): the
    coordinator publishing a map, a Ray job and `recps shard` listing shards."""
    with open(path.parent / ".cluster.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _view(d: dict[str, Any]) -> CoordinatorState:
    return CoordinatorState(
        shard_map=ShardMap.from_dict(d["shard_map"]),
        moves={k: dict(v) for k, v in d.get("moves", {}).items()},
        plan=d.get("plan"),
        updated_at=float(d.get("updated_at", 0.0)),
    )
