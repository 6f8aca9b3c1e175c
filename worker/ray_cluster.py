"""Parameter-server shards as Ray actors: placed together, restarted on a crash, stopped cleanly.

The only recps module that imports Ray (``recps.embedding`` and ``recps.ps`` never do). Each
:class:`PSShardActor` runs one gRPC shard of :mod:`recps.ps.server` in its own Ray worker
process, on its own data directory ``<data_dir>/shard-<i>``; the shards are reached over
gRPC exactly like the processes of ``recps cluster up`` (a :class:`PSClient` on
:attr:`RayPSCluster.shard_map`). Ray only places, restarts and stops them.

**Placement.** One placement-group bundle of ``cpus_per_shard`` CPUs per shard, strategy
``SPREAD`` by default (best effort: on one node they share it; ``STRICT_SPREAD`` needs a node
per shard, ``PACK``/``STRICT_PACK`` keep them together).

**Addresses.** A shard binds ``127.0.0.1`` when the Ray cluster is this one machine, else
its node's IP (``ray.util.get_node_ip_address()``): loopback unless reaching it from
another node needs more.

**Restarts.** An actor restarts up to ``max_restarts`` times, on the same data directory,
so RocksDB replays its WAL (with ``durability="sync"`` an acknowledged push survives a
crash). It binds the port its ``server.json`` names, so the shard map stays valid and a
client just retries. When that port is taken, it serves on a new one and says so in
:meth:`PSShardActor.ready`; :meth:`RayPSCluster.refresh` then re-issues the map (same
slot owners, new address, epoch + 1) on every shard.

**Restarting a job** on a data directory that holds shards keeps their map: the slot owners
stay, only changed addresses are re-issued (as ``recps cluster up`` does).

Example:
    >>> info = init_ray(num_cpus=2)  # doctest: +SKIP
    >>> with start_ps_shards(2, "/tmp/recps-ps", cpus_per_shard=0.5) as ps:  # doctest: +SKIP
    ...     client = PSClient(ps.shard_map)
    ...     client.create_table(TableConfig("user", dim=16))
    ...     ps.write_cluster_file("/tmp/recps-ps/cluster.json")  # for `recps status`
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from recps.embedding import errors as E
from recps.embedding.config import TieredStoreConfig
from recps.ps.client import PSClient
from recps.ps.cluster import pid_alive
from recps.ps.config import ClientConfig, ServerConfig
from recps.ps.coordinator import cluster_file_lock
from recps.ps.metrics import rss_bytes
from recps.ps.routing import DEFAULT_NUM_SLOTS, ShardMap
from recps.ps.server import PSServer, create_server

if TYPE_CHECKING:
    from recps.worker.job_config import JobClusterConfig

log = logging.getLogger("recps.worker.ray_cluster")

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
LOOPBACK = "127.0.0.1"
MIN_OBJECT_STORE_MB = 75  # Ray refuses less
_TABLE_STATS = (
    "rows_in_memory",
    "rows_on_disk",
    "hit_rate",
    "memory_bytes",
    "disk_bytes",
    "evictions",
    "admission_rejected",
    "expired_rows",
    "nonfinite_skipped",
    "lookups",
    "pushes",
)


class PlacementError(E.ShardUnavailableError):
    """The Ray cluster cannot host the shards' placement group (too few CPUs or nodes)."""

    def __init__(self, bundles: list[dict[str, float]], strategy: str, available: float) -> None:
        self.bundles, self.strategy, self.available_cpus = bundles, strategy, available
        need = sum(b.get("CPU", 0) for b in bundles)
        super().__init__(
            f"cannot place {len(bundles)} PS shards ({need:g} CPUs, strategy {strategy}); the "
            f"Ray cluster has {available:g} CPUs free. Lower cluster.cpus_per_shard or "
            "num_shards, add nodes, or use SPREAD/PACK (STRICT_SPREAD needs a node per shard)"
        )


# ---- Ray itself ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayInfo:
    """The Ray this process is attached to."""

    address: str  # the GCS address (host:port)
    started_here: bool  # True: an embedded local Ray that this process started
    num_nodes: int
    num_cpus: float
    init_s: float  # how long ray.init took (0 when Ray was already up)


# Without the dashboard there is no state API, so Ray Train's placement-group cleaner warns
# once a second that it cannot query the controller; we remove placement groups ourselves.
# The per-report INFO line repeats every metric the trainer already logs.
_NOISY_RAY_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.train.v2._internal.execution.context": logging.WARNING,
}


def quiet_ray_loggers() -> None:
    """Raise the level of Ray loggers that only add noise to a recps job's output."""
    for name, level in _NOISY_RAY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    object_store_mb: int = 100,
    namespace: str | None = None,
    log_to_driver: bool = False,
) -> RayInfo:
    """Start an embedded local Ray (``address=None``) or connect to a running cluster.

    The local Ray is lean, for a trainer and its tests: no dashboard, workers' output not
    forwarded to this process unless ``log_to_driver`` (else each actor logs to Ray's
    session logs), a small object store
    (batches travel over gRPC, not through Ray), no usage-stats reporting. Returns at once
    when Ray is already initialized in this process.
    """
    t0 = time.perf_counter()
    if ray.is_initialized():
        return _ray_info(started_here=False, init_s=0.0)
    if object_store_mb < MIN_OBJECT_STORE_MB:
        raise E.ConfigError(f"object_store_mb must be >= {MIN_OBJECT_STORE_MB} (Ray's minimum)")
    common: dict[str, Any] = {
        "log_to_driver": log_to_driver,
        # Runs in every Ray worker process, Ray Train's own actors included.
        "runtime_env": {"worker_process_setup_hook": "recps.worker.ray_cluster.quiet_ray_loggers"},
        "logging_level": logging.WARNING,
        "namespace": namespace,
    }
    if address is None:
        if num_cpus is not None and num_cpus < 1:
            raise E.ConfigError(f"num_cpus must be >= 1, got {num_cpus}")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves this machine
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=object_store_mb << 20,
            **common,
        )
    else:
        if num_cpus is not None:
            raise E.ConfigError(
                f"num_cpus sizes a local Ray only; the cluster at {address} has its own CPUs"
            )
        ray.init(address=address, **common)
    return _ray_info(started_here=True, init_s=time.perf_counter() - t0)


def shutdown_ray() -> None:
    """Disconnect (and stop the embedded local Ray, if this process started one)."""
    if ray.is_initialized():
        ray.shutdown()


def _ray_info(started_here: bool, init_s: float) -> RayInfo:
    ctx = ray.get_runtime_context()
    gcs = getattr(ctx, "gcs_address", "") or ""
    return RayInfo(
        address=str(gcs),
        started_here=started_here,
        num_nodes=len(_alive_nodes()),
        num_cpus=float(ray.cluster_resources().get("CPU", 0.0)),
        init_s=init_s,
    )


def _alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _default_host() -> str | None:
    """Loopback when the Ray cluster is this one machine; None: each shard's node IP."""
    nodes = _alive_nodes()
    here = ray.util.get_node_ip_address()
    if len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == here:
        return LOOPBACK
    return None


# ---- one shard ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _port_free(host: str, port: int) -> bool:
    """Can ``host:port`` be bound? (SO_REUSEADDR, as gRPC binds: TIME_WAIT does not count.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class PSShard:
    """One parameter-server shard serving gRPC from inside a Ray actor (see the module doc).

    ``host=None`` binds the node's IP. The constructor returns once the shard serves.
    """

    def __init__(
        self,
        shard_id: int,
        data_dir: str,
        *,
        host: str | None = LOOPBACK,
        num_slots: int = DEFAULT_NUM_SLOTS,
        memory_mb: int = 256,
        durability: Literal["async", "sync"] = "async",
        flush_interval_ms: int = 5000,
    ) -> None:
        self.shard_id = shard_id
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.node_ip = ray.util.get_node_ip_address()
        self.host = host or self.node_ip
        with warnings.catch_warnings():  # Ray's own property trips its actor_id deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        # Re-use the port of the previous process on this data dir: the map still names it.
        previous = int(_read_json(self.data_dir / "server.json").get("port") or 0)
        port, self.note = previous, None
        if previous and not _port_free(self.host, previous):
            port = 0
            self.note = (
                f"port {previous} of the previous process is taken; serving on a new port "
                "(RayPSCluster.refresh() re-issues the shard map)"
            )
            log.warning("shard %d: %s", shard_id, self.note)
        config = ServerConfig(
            data_dir=str(self.data_dir),
            shard_id=shard_id,
            host=self.host,
            port=port,
            num_slots=num_slots,
            store=TieredStoreConfig(
                memory_budget_bytes=memory_mb << 20,
                durability=durability,
                flush_interval_ms=flush_interval_ms,
            ),
        )
        self.server: PSServer
        self.server, self.port = create_server(config)
        self.port_changed = bool(previous) and self.port != previous
        self.started_at = time.time()
        self._stopped = False

    def ready(self) -> dict[str, Any]:
        """Where and how this shard serves; also its own shard map (``shard_map``, a dict)."""
        return {
            "shard_id": self.shard_id,
            "address": self.server.address,
            "port": self.port,
            "pid": os.getpid(),
            "node_ip": self.node_ip,
            "data_dir": str(self.data_dir),
            "restarted": self.restarted,
            "port_changed": self.port_changed,
            "note": self.note,
            "shard_map": self.server.servicer.shard_map.to_dict(),
        }

    def address(self) -> str:
        return self.server.address

    def stats(self) -> dict[str, Any]:
        """Plain-dict counters: per-table store stats, rows, slots, RSS, uptime."""
        if self._stopped:
            raise E.ShardUnavailableError(f"shard {self.shard_id} is stopped")
        snap = self.server.servicer.state_snapshot()
        tables = {t.table: {k: getattr(t, k) for k in _TABLE_STATS} for t in snap["tables"]}
        return {
            "shard_id": self.shard_id,
            "address": self.server.address,
            "pid": os.getpid(),
            "epoch": snap["epoch"],
            "uptime_s": time.time() - self.started_at,
            "rss_bytes": rss_bytes(),
            "slots": len(snap["slot_ids"]),
            "rows_in_memory": sum(t["rows_in_memory"] for t in tables.values()),
            "rows_on_disk": sum(t["rows_on_disk"] for t in tables.values()),
            "restarted": self.restarted,
            "tables": tables,
        }

    def stop(self, grace_s: float | None = None) -> bool:
        """Graceful: refuse new calls, finish in-flight ones, flush and close every table.

        The process stays (Ray owns it) until :meth:`RayPSCluster.shutdown` kills it.
        """
        self._stopped = True
        self.server.stop(grace_s)
        return True


# The actor class. Options (CPUs, restarts, placement) are set per start in RayPSCluster.
PSShardActor = ray.remote(PSShard)

# Shard actors are named in this namespace, whatever the job's: an ops command is another
# Ray driver, and finds them only by (namespace, name).
RAY_NAMESPACE = "recps"
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"


def actor_name(cluster_id: str, shard_id: int) -> str:
    return f"recps-ps-{cluster_id}-{shard_id}"


def _gcs_address() -> str:
    return str(getattr(ray.get_runtime_context(), "gcs_address", "") or "")


# ---- the shard group ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RayPSConfig:
    """The PS shards of a job, as Ray actors."""

    num_shards: int
    data_dir: str  # shard i lives in <data_dir>/shard-<i>; made absolute here
    cpus_per_shard: float = 1.0
    memory_mb: int = 256  # hot-tier budget per table per shard
    durability: Literal["async", "sync"] = "async"  # sync: an acked push survives a crash
    num_slots: int = DEFAULT_NUM_SLOTS
    placement_strategy: PlacementStrategy = "SPREAD"
    max_restarts: int = 3  # per actor; -1: without limit
    host: str | None = None  # None: loopback on one node, else the node IP
    flush_interval_ms: int = 5000
    ready_timeout_s: float = 120.0  # placement + actor start; a shard is up in ~2 s
    stop_timeout_s: float = 30.0  # graceful stop (flush + close) before the actor is killed

    def __post_init__(self) -> None:
        if not 1 <= self.num_shards < 0xFFFF:
            raise E.ConfigError(f"num_shards must be in [1, 65535), got {self.num_shards}")
        n = self.num_slots
        if n < 1 or n & (n - 1) or n > 1 << 16 or n < self.num_shards:
            raise E.ConfigError(f"num_slots must be a power of two in [num_shards, 65536], got {n}")
        if self.cpus_per_shard <= 0:
            raise E.ConfigError(
                f"cpus_per_shard must be > 0 (a placement bundle needs some CPU), "
                f"got {self.cpus_per_shard}"
            )
        if self.memory_mb < 1:
            raise E.ConfigError(f"memory_mb must be >= 1, got {self.memory_mb}")
        if self.durability not in ("async", "sync"):
            raise E.ConfigError(f"durability must be async or sync, got {self.durability!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise E.ConfigError(f"unknown placement strategy {self.placement_strategy!r}")
        if self.max_restarts < -1:
            raise E.ConfigError(f"max_restarts must be >= -1, got {self.max_restarts}")
        if self.ready_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise E.ConfigError("ready_timeout_s and stop_timeout_s must be > 0")
        object.__setattr__(self, "data_dir", str(Path(self.data_dir).expanduser().resolve()))

    @classmethod
    def from_job(cls, cluster: JobClusterConfig, **overrides: Any) -> RayPSConfig:
        """From a job's ``cluster`` section (:class:`recps.worker.job_config.JobClusterConfig`);
        the shards live under ``<cluster.data_dir>/ps``."""
        kwargs: dict[str, Any] = {
            "num_shards": cluster.num_shards,
            "data_dir": str(Path(cluster.data_dir) / "ps"),
            "cpus_per_shard": cluster.cpus_per_shard,
            "memory_mb": cluster.memory_mb,
            "durability": cluster.durability,
            "num_slots": cluster.num_slots,
            "placement_strategy": cluster.placement_strategy,
            "max_restarts": cluster.max_restarts,
        }
        return cls(**{**kwargs, **overrides})

    def shard_dir(self, shard_id: int) -> Path:
        return Path(self.data_dir) / f"shard-{shard_id}"

    def shard_ids(self) -> list[int]:
        """The shards to start: those of the newest map the shard directories hold (a job
        restarted after `recps shard add|remove` keeps its ids, gaps included), else
        ``0 .. num_shards-1`` on an empty ``data_dir``.

        Raises ConfigError when the directories hold a different number of shards.
        """
        newest: ShardMap | None = None
        for path in sorted(Path(self.data_dir).glob("shard-*/shard_map.json")):
            try:
                m = ShardMap.load(path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise E.ConfigError(f"cannot read {path}: {e}") from e
            if m.epoch > 0 and (newest is None or m.epoch > newest.epoch):
                newest = m
        if newest is None:
            return list(range(self.num_shards))
        ids = sorted(newest.shards)
        if len(ids) != self.num_shards:
            raise E.ConfigError(
                f"{self.data_dir} holds a PS cluster of {len(ids)} shards (ids {ids}, map "
                f"epoch {newest.epoch}), not {self.num_shards}; start it with "
                f"num_shards={len(ids)} or use a new data_dir"
            )
        return ids


def start_ps_shards(
    num_shards: int,
    data_dir: str | Path,
    cpus_per_shard: float = 1.0,
    memory_mb: int = 256,
    durability: Literal["async", "sync"] = "async",
    num_slots: int = DEFAULT_NUM_SLOTS,
    **options: Any,
) -> RayPSCluster:
    """Start ``num_shards`` shard actors and install their map; see :class:`RayPSConfig`
    for ``options`` (``placement_strategy``, ``max_restarts``, ``host``, timeouts)."""
    config = RayPSConfig(
        num_shards=num_shards,
        data_dir=str(data_dir),
        cpus_per_shard=cpus_per_shard,
        memory_mb=memory_mb,
        durability=durability,
        num_slots=num_slots,
        **options,
    )
    return RayPSCluster.start(config)


class RayPSCluster:
    """Running shard actors, their placement group and their shard map. Use :meth:`start`."""

    def __init__(
        self,
        config: RayPSConfig,
        pg: PlacementGroup,
        actors: list[Any],
        infos: list[dict[str, Any]],
        shard_map: ShardMap,
        cluster_id: str = "",
    ) -> None:
        self.config = config
        self.cluster_id = cluster_id
        self.placement_group = pg
        self.actors = actors
        self.infos = infos
        self._map = shard_map
        self._cluster_files: list[Path] = []
        self._known_pids = {int(i["pid"]): i["node_ip"] for i in infos}
        self._report: dict[int, str] | None = None
        self.created_at = time.time()

    # ---- start ----------------------------------------------------------------------------

    @classmethod
    def start(cls, config: RayPSConfig) -> RayPSCluster:
        if not ray.is_initialized():
            raise E.ConfigError("Ray is not running in this process; call init_ray() first")
        host = config.host if config.host is not None else _default_host()
        shard_ids = config.shard_ids()
        bundles = [{"CPU": float(config.cpus_per_shard)}] * len(shard_ids)
        cluster_id = uuid.uuid4().hex[:8]
        pg = placement_group(
            bundles, strategy=config.placement_strategy, name=f"recps-ps-{cluster_id}"
        )
        try:
            ray.get(pg.ready(), timeout=config.ready_timeout_s)
        except GetTimeoutError:
            free = float(ray.available_resources().get("CPU", 0.0))
            remove_placement_group(pg)
            raise PlacementError(bundles, config.placement_strategy, free) from None
        actors = [
            PSShardActor.options(
                # Named, so that `recps shard remove` (another Ray driver) can stop it.
                name=actor_name(cluster_id, sid),
                namespace=RAY_NAMESPACE,
                num_cpus=config.cpus_per_shard,
                max_restarts=config.max_restarts,
                max_task_retries=0,  # a call cut by a crash fails; the caller decides
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=k
                ),
            ).remote(
                sid,
                str(config.shard_dir(sid)),
                host=host,
                num_slots=config.num_slots,
                memory_mb=config.memory_mb,
                durability=config.durability,
                flush_interval_ms=config.flush_interval_ms,
            )
            for k, sid in enumerate(shard_ids)
        ]
        try:
            infos = _ready_all(actors, config.ready_timeout_s)
            shard_map = _settle_map(infos, config)
        except BaseException:
            _teardown(actors, pg)
            raise
        return cls(config, pg, actors, infos, shard_map, cluster_id)

    # ---- state ----------------------------------------------------------------------------

    @property
    def shard_map(self) -> ShardMap:
        return self._map

    @property
    def addresses(self) -> list[str]:
        """Shard addresses in shard-id order."""
        return [self._map.shards[i] for i in sorted(self._map.shards)]

    @property
    def pids(self) -> list[int]:
        """The shard processes' pids as last seen (a restart changes them)."""
        return [int(i["pid"]) for i in self.infos]

    def client(self, config: ClientConfig | None = None) -> PSClient:
        """A client of these shards; with :meth:`write_cluster_file` called first, it also
        follows re-issued maps through that file."""
        if self._cluster_files:
            return PSClient(self._cluster_files[-1], config)
        return PSClient(self._map, config)

    def wait_ready(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Every shard's :meth:`PSShard.ready` (waiting out restarts); updates ``infos``.

        A shard of this job that `recps shard remove` drained out of the map is skipped
        (its actor is gone); its last info stays.
        """
        ks = self._in_map()
        got = dict(zip(ks, _ready_all([self.actors[k] for k in ks], self._timeout(timeout_s))))
        self.infos = [got.get(k, info) for k, info in enumerate(self.infos)]
        self._known_pids.update({int(i["pid"]): i["node_ip"] for i in got.values()})
        return self.infos

    def _in_map(self) -> list[int]:
        """Indices into ``actors``/``infos`` of the shards in the newest map. (Actors and
        infos are in start order; their shard ids need not be 0..n-1.)"""
        in_map = self._newest_map().shards
        return [k for k, i in enumerate(self.infos) if int(i["shard_id"]) in in_map]

    def _timeout(self, timeout_s: float | None) -> float:
        return timeout_s or self.config.ready_timeout_s

    def _newest_map(self) -> ShardMap:
        """The newest of the map held here and those in the cluster files written: `recps
        shard add|remove` and `recps rebalance` change the map from other processes."""
        for path in self._cluster_files:
            try:
                m = ShardMap.from_dict(json.loads(path.read_text())["shard_map"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if m.epoch > self._map.epoch:
                self._map = m
        return self._map

    def refresh(self, timeout_s: float | None = None) -> ShardMap:
        """After restarts: re-issue the map if a shard serves on a new address.

        The new map keeps every slot owner, names the new addresses and has epoch + 1; it
        is installed on every shard and written to the cluster files written before.
        """
        self.wait_ready(timeout_s)
        in_map = set(self._map.shards)
        mine = [i for i in self.infos if int(i["shard_id"]) in in_map]
        new = _settle_map(mine, self.config, current=self._map)
        if new.epoch != self._map.epoch:
            log.warning("shard addresses changed; shard map re-issued at epoch %d", new.epoch)
        self._map = new
        for path in self._cluster_files:
            self._write_cluster_file(path)
        return new

    @contextlib.contextmanager
    def watching(self, interval_s: float = 2.0) -> Iterator[None]:
        """While inside, a thread asks every shard actor for its process every
        ``interval_s`` (Ray restarts a shard that died): a restarted shard's new pid is
        written to the cluster files at once (else `recps status` shows it down), and
        one that came back on another port gets a re-issued map (:meth:`refresh`), which
        clients fetch from the other shards and the cluster files.

        Example:
            >>> with ps.watching():  # doctest: +SKIP
            ...     trainer.fit()
        """
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(interval_s):
                try:
                    moved = self._poll_restarts(interval_s)
                    if moved:  # a new address: re-issue the map (waits for every shard)
                        log.warning("PS shards %s came back on new addresses", moved)
                        self.refresh()
                except E.RecpsError as e:  # a shard still restarting: ask again next tick
                    log.info("shard watch: %s", e)
                except Exception:  # never let the watch die of a surprise
                    log.warning("shard watch failed; trying again", exc_info=True)

        t = threading.Thread(target=watch, name="recps-shard-watch", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=30 * interval_s + 30)

    def _poll_restarts(self, timeout_s: float) -> list[int]:
        """Ask every shard actor in the map for its process, without waiting on one that
        is still restarting; a new pid is written to the cluster files at once. Returns
        the shard ids now serving on another address than the map's."""
        refs = {k: self.actors[k].ready.remote() for k in self._in_map()}
        in_map = self._map.shards  # as _in_map just read it
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        answered = set(done)
        changed, moved = False, []
        for k, ref in refs.items():
            if ref not in answered:
                continue
            try:
                info = ray.get(ref)
            except RayActorError:
                continue  # died again since: the next tick sees its successor
            if info["pid"] != self.infos[k]["pid"]:
                log.warning("PS shard %s restarted (pid %s)", info["shard_id"], info["pid"])
                self.infos[k] = info
                self._known_pids[int(info["pid"])] = info["node_ip"]
                changed = True
                if info["address"] != in_map[int(info["shard_id"])]:
                    moved.append(int(info["shard_id"]))
        if changed:
            for path in self._cluster_files:
                self._write_cluster_file(path)
        return moved

    def stats(self, timeout_s: float = 30.0) -> dict[int, dict[str, Any]]:
        """Each shard's :meth:`PSShard.stats`, asked through Ray (not gRPC)."""
        refs = [a.stats.remote() for a in self.actors]
        return dict(enumerate(ray.get(refs, timeout=timeout_s)))

    # ---- cluster file ---------------------------------------------------------------------

    def write_cluster_file(self, path: str | Path) -> Path:
        """The cluster file that ``PSClient(path)``, ``recps status`` and ``recps cluster``
        read. It is rewritten by :meth:`refresh` when the map changes."""
        path = Path(path).expanduser().resolve()
        self._write_cluster_file(path)
        if path not in self._cluster_files:
            self._cluster_files.append(path)
        return path

    def _write_cluster_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with cluster_file_lock(path):
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                old = {}
            if isinstance(old.get("shard_map"), dict):
                theirs = ShardMap.from_dict(old["shard_map"])
                if theirs.epoch > self._map.epoch:  # a rebalance or `shard add` since
                    self._map = theirs
            infos = {int(i["shard_id"]): i for i in self.infos}
            mine = [
                {
                    "shard_id": sid,
                    "address": self._map.shards[sid],
                    "pid": int(infos[sid]["pid"]),
                    "data_dir": infos[sid]["data_dir"],
                    "node_ip": infos[sid]["node_ip"],
                    "log": None,  # in Ray's session logs (worker-*.err of that pid)
                    "metrics_port": None,
                    "ray_actor": actor_name(self.cluster_id, sid) if self.cluster_id else None,
                }
                for sid in sorted(infos)
                if sid in self._map.shards
            ]
            # Shards that `recps shard add` started (detached actors) are theirs to list.
            added = [s for s in old.get("shards", []) if s.get("detached")]
            content = {
                "shard_map": self._map.to_dict(),
                "shards": sorted(mine + added, key=lambda s: int(s["shard_id"])),
                "data_dir": self.config.data_dir,
                "settings": {
                    "memory_mb": self.config.memory_mb,
                    "durability": self.config.durability,
                    "metrics": False,
                    "cpus_per_shard": self.config.cpus_per_shard,
                    "max_restarts": self.config.max_restarts,
                    "flush_interval_ms": self.config.flush_interval_ms,
                    "host": self.config.host,
                },
                "ray": {
                    "address": _gcs_address(),
                    # Ray >= 2.5x turns token auth on for a local cluster by setting this
                    # in the driver's environment; a second driver must set it too.
                    "auth_mode": os.environ.get(RAY_AUTH_MODE_ENV),
                    "namespace": RAY_NAMESPACE,
                    "cluster_id": self.cluster_id,
                    "placement_group": self.placement_group.id.hex(),
                    "strategy": self.config.placement_strategy,
                },
                "created_at": self.created_at,
                "updated_at": time.time(),
            }
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(content, indent=1) + "\n")
            os.replace(tmp, path)

    # ---- stop -----------------------------------------------------------------------------

    def shutdown(self, timeout_s: float | None = None) -> dict[int, str]:
        """Stop every shard gracefully, kill the actors, remove the placement group, and
        wait until the shard processes on this node are gone. Idempotent.

        Returns shard id -> what happened (``"stopped"``, or why it was killed instead).
        """
        if self._report is not None:
            return self._report
        timeout_s = timeout_s or self.config.stop_timeout_s
        refs = [a.stop.remote() for a in self.actors]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        done_set = set(done)
        report: dict[int, str] = {}
        sids = [int(i["shard_id"]) for i in self.infos]  # start order, as the actors
        for sid, ref in zip(sids, refs):
            if ref not in done_set:
                report[sid] = f"did not stop within {timeout_s:g} s; killed"
                continue
            try:
                ray.get(ref)
                report[sid] = "stopped"
            except RayActorError as e:
                report[sid] = f"was not running ({type(e).__name__}); killed"
        _teardown(self.actors, self.placement_group)
        for path in self._cluster_files:  # and the ones `recps shard add` started
            for sid, outcome in _stop_added(path, timeout_s).items():
                report[sid] = outcome
        here = ray.util.get_node_ip_address()
        local = [pid for pid, ip in self._known_pids.items() if ip == here]
        deadline = time.monotonic() + 10.0
        while any(pid_alive(p) for p in local) and time.monotonic() < deadline:
            time.sleep(0.05)
        for sid, info in zip(sids, self.infos):
            pid = int(info["pid"])
            if pid in local and pid_alive(pid):
                report[sid] += f"; pid {pid} still running"
        self._report = report
        return report

    def __enter__(self) -> RayPSCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _ready_all(actors: list[Any], timeout_s: float) -> list[dict[str, Any]]:
    """``ready()`` of every actor; an actor that is restarting is asked again until the
    deadline. A constructor that failed raises ``ShardUnavailableError`` with its cause."""
    deadline = time.monotonic() + timeout_s
    infos: dict[int, dict[str, Any]] = {}
    while len(infos) < len(actors):
        pending = [i for i in range(len(actors)) if i not in infos]
        refs = {i: actors[i].ready.remote() for i in pending}
        for i, ref in refs.items():
            left = deadline - time.monotonic()
            try:
                infos[i] = ray.get(ref, timeout=max(left, 0.001))
            except GetTimeoutError:
                raise E.ShardUnavailableError(
                    f"PS shard {i} not ready after {timeout_s:g} s (see Ray's worker logs)"
                ) from None
            except RayActorError as e:
                if e.actor_init_failed or time.monotonic() > deadline:
                    raise E.ShardUnavailableError(f"PS shard {i} failed: {e}") from None
                time.sleep(0.1)  # restarting (or dead for good: then until the deadline)
    return [infos[i] for i in range(len(actors))]


def _settle_map(
    infos: list[dict[str, Any]], config: RayPSConfig, current: ShardMap | None = None
) -> ShardMap:
    """The map the shards should hold, installed where it is missing.

    First start on empty dirs: an even split at epoch 1. Shards that already hold a map
    (a restarted job, or restarted actors): keep its slot owners; if an address changed,
    the same owners with the new addresses at epoch + 1.
    """
    addresses = {int(i["shard_id"]): str(i["address"]) for i in infos}
    held = {int(i["shard_id"]): ShardMap.from_dict(i["shard_map"]) for i in infos}
    known = [m for m in held.values() if m.epoch > 0]
    if current is not None:
        known.append(current)
    if not known:
        new = ShardMap.even([addresses[i] for i in sorted(addresses)], config.num_slots)
    else:
        old = max(known, key=lambda m: m.epoch)
        if current is None and set(old.shards) != set(addresses):
            raise E.ConfigError(
                f"{config.data_dir} holds a PS cluster of {len(old.shards)} shards, not "
                f"{len(addresses)}; start it with num_shards={len(old.shards)} or use a new "
                "data_dir"
            )
        # While running, the map may also name shards that `recps shard add` started:
        # they keep their addresses.
        merged = {**old.shards, **addresses}
        new = old if old.shards == merged else old.replace(shards=merged)
    stale = [addresses[s] for s, m in sorted(held.items()) if m.epoch < new.epoch]
    if known and new is not old:  # re-issued: the added shards need it too
        stale += [a for s, a in sorted(new.shards.items()) if s not in held]
    if stale:
        with PSClient(new, ClientConfig(timeout_s=10.0, max_retries=5)) as client:
            client.install_shard_map(new, stale)
    return new


def _teardown(actors: list[Any], pg: PlacementGroup) -> None:
    for a in actors:
        with contextlib.suppress(Exception):
            ray.kill(a, no_restart=True)
    with contextlib.suppress(Exception):
        remove_placement_group(pg)


# ---- shards added to a running job (`recps shard add|remove`) -------------------------------


@contextlib.contextmanager
def _ray_of(info: dict[str, Any]) -> Iterator[None]:
    """Connected to the Ray cluster a cluster file names (as a second driver, unless this
    process is connected already); disconnects after. Detached actors outlive it."""
    ray_info = info.get("ray") or {}
    if ray.is_initialized():
        yield
        return
    address = ray_info.get("address")
    if not address:
        raise E.ConfigError("the cluster file names no Ray address; is its job still running?")
    mode = ray_info.get("auth_mode")
    if mode and os.environ.get(RAY_AUTH_MODE_ENV) != mode:
        # Ray reads it when it is imported: too late here. (`recps shard` sets it first.)
        raise E.ConfigError(
            f"the job's Ray cluster uses {RAY_AUTH_MODE_ENV}={mode}; set it in this "
            "process's environment before Ray is imported"
        )
    try:
        init_ray(address)
    except ConnectionError as e:
        raise E.ShardUnavailableError(
            f"cannot reach the job's Ray cluster at {address} ({e}); is the job still running?"
        ) from None
    try:
        yield
    finally:
        shutdown_ray()


def add_shard_actors(
    cluster_file: str | Path, shard_ids: list[int], ready_timeout_s: float = 120.0
) -> dict[int, str]:
    """Start shards ``shard_ids`` as new actors of the Ray job whose cluster file this is;
    returns their addresses. They own no slot (``recps.ps.migration.join_shards`` and a
    rebalance give them some) and are listed in the cluster file.

    A process that is not the job's driver needs the job's ``RAY_AUTH_MODE`` (the
    cluster file's ``ray.auth_mode``) in its environment before it imports Ray.

    They are *detached* actors with the job's settings, outside its placement group
    (that group's bundles are fixed when the job starts); the job's shutdown stops them.
    A shard already running under its name is left as it is.

    Example:
        >>> add_shard_actors("/tmp/job/cluster.json", [2])  # doctest: +SKIP
        {2: '127.0.0.1:41237'}
    """
    from recps.ps.cluster import read_cluster_file

    path = Path(cluster_file).resolve()
    info = read_cluster_file(path)
    r, st = info.get("ray") or {}, info.get("settings") or {}
    if not r.get("cluster_id"):
        raise E.ConfigError(f"{path} is not the cluster file of a Ray job")
    m = ShardMap.from_dict(info["shard_map"])
    host = st.get("host")
    out: dict[int, str] = {}
    with _ray_of(info):
        host = host if host is not None else _default_host()
        cpus = float(st.get("cpus_per_shard", 1.0))
        free = float(ray.available_resources().get("CPU", 0.0))
        new = [s for s in set(shard_ids) if not _actor_exists(actor_name(r["cluster_id"], s))]
        if free < cpus * len(new):
            # Else the actor would wait for CPUs that never come, until the ready timeout.
            raise E.ShardUnavailableError(
                f"no room for {len(new)} more shard(s) of {cpus:g} CPUs: the Ray cluster has "
                f"{free:g} CPUs free. Add a node (or, for a local Ray, start the job with "
                "more shards: it keeps room to double them)"
            )
        started = []
        for sid in sorted(set(shard_ids)):
            name = actor_name(r["cluster_id"], sid)
            if sid not in new:  # running already (a re-run): wait for it, start nothing
                started.append((sid, name, ray.get_actor(name, namespace=RAY_NAMESPACE)))
                continue
            actor = PSShardActor.options(
                name=name,
                namespace=RAY_NAMESPACE,
                lifetime="detached",
                num_cpus=float(st.get("cpus_per_shard", 1.0)),
                max_restarts=int(st.get("max_restarts", 3)),
                max_task_retries=0,
            ).remote(
                sid,
                str(Path(info["data_dir"]) / f"shard-{sid}"),
                host=host,
                num_slots=m.num_slots,
                memory_mb=int(st.get("memory_mb", 256)),
                durability=st.get("durability", "async"),
                flush_interval_ms=int(st.get("flush_interval_ms", 5000)),
            )
            started.append((sid, name, actor))
        try:
            infos = _ready_all([a for _, _, a in started], ready_timeout_s)
        except BaseException:
            for _, _, a in started:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
            raise
        with cluster_file_lock(path):
            info = read_cluster_file(path)
            entries = {int(s["shard_id"]): s for s in info["shards"]}
            for (sid, name, _), got in zip(started, infos):
                out[sid] = str(got["address"])
                entries[sid] = {
                    "shard_id": sid,
                    "address": out[sid],
                    "pid": int(got["pid"]),
                    "data_dir": got["data_dir"],
                    "node_ip": got["node_ip"],
                    "log": None,
                    "metrics_port": None,
                    "ray_actor": name,
                    "detached": True,
                }
            info["shards"] = [entries[k] for k in sorted(entries)]
            info["updated_at"] = time.time()
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(info, indent=1) + "\n")
            os.replace(tmp, path)
    return out


def _actor_exists(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=RAY_NAMESPACE)
    except ValueError:
        return False
    return True


def remove_shard_actors(
    cluster_file: str | Path, shard_ids: list[int], timeout_s: float = 30.0
) -> dict[int, str]:
    """Stop the actors of drained shards (refused while the map still names them: drain
    first) and drop them from the cluster file; their data directories stay. Works for
    the job's own shards too (their actors are named). Shard id -> outcome."""
    from recps.ps.cluster import read_cluster_file

    path = Path(cluster_file).resolve()
    info = read_cluster_file(path)
    still = sorted(set(shard_ids) & set(ShardMap.from_dict(info["shard_map"]).shards))
    if still:
        raise E.ConfigError(f"shards {still} are still in the shard map; drain them first")
    entries = {int(s["shard_id"]): s for s in info["shards"]}
    out: dict[int, str] = {}
    with _ray_of(info):
        for sid in shard_ids:
            name = (entries.get(sid) or {}).get("ray_actor")
            out[sid] = _stop_actor(name, timeout_s) if name else "not a Ray actor; not stopped"
    with cluster_file_lock(path):
        info = read_cluster_file(path)
        info["shards"] = [s for s in info["shards"] if int(s["shard_id"]) not in shard_ids]
        info["updated_at"] = time.time()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, path)
    return out


def _stop_actor(name: str, timeout_s: float) -> str:
    """Graceful stop (flush, close), then kill for good; waits until its process is gone
    when it runs on this node."""
    try:
        actor = ray.get_actor(name, namespace=RAY_NAMESPACE)
    except ValueError:
        return "was not running"
    pid, ip = None, None
    try:
        got = ray.get(actor.ready.remote(), timeout=timeout_s)
        pid, ip = int(got["pid"]), got["node_ip"]
        ray.get(actor.stop.remote(), timeout=timeout_s)
        outcome = "stopped"
    except (GetTimeoutError, RayActorError) as e:
        outcome = f"did not stop ({type(e).__name__}); killed"
    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)
    if pid is not None and ip == ray.util.get_node_ip_address():
        deadline = time.monotonic() + 10.0
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            outcome += f"; pid {pid} still running"
    return outcome


def _stop_added(path: Path, timeout_s: float) -> dict[int, str]:
    """Stop the detached shard actors a cluster file lists (the job is ending)."""
    try:
        shards = json.loads(path.read_text()).get("shards", [])
    except (OSError, ValueError):
        return {}
    return {
        int(s["shard_id"]): _stop_actor(s["ray_actor"], timeout_s)
        for s in shards
        if s.get("detached") and s.get("ray_actor")
    }
