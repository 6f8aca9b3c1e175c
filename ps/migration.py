"""Live slot moves: executing a :class:`RebalancePlan` while the cluster serves.

One move takes some slots from a source shard to a target shard. The moves of one
(source, target) pair share their full copy (one scan of the source however many moves),
then each is caught up, frozen and handed over in turn:

1. journal each move as ``copying`` in the :class:`Coordinator`;
2. ``BEGIN_TARGET`` (the target drops rows an earlier try left in those slots) and
   ``BEGIN_SOURCE`` (the source starts recording every id looked up or pushed there);
3. copy every row of the slots, a page at a time, table by table (``ReadSlotRows`` /
   ``WriteSlotRows``): full rows, optimizer state and counters included, while the
   source keeps serving reads and writes; pages are paced (``copy_duty_cycle``);
4. per move: ``PREPARE_TARGET`` (the target flushes), delta rounds (rows of the ids
   touched since the last round) while writes still flow, then ``FREEZE`` on the
   source: writes to the slots now get the retryable :class:`SlotFrozenError` (clients
   back off and retry), reads are still served;
5. copy the last delta (small: the rows touched during the last round);
6. the coordinator **decides**: the slots belong to the target from epoch + 1 on. This
   one durable write is the handover; everything before it can be redone from scratch,
   everything after it only finishes what was decided;
7. install the new map on the target and the source (together), then every other shard,
   then publish it in the cluster file;
8. once every move of the pair is decided: ``FINISH`` on both, once for all of them (the
   source deletes its old copies in one pass); journal ``done``.

A crash anywhere leaves each slot owned by exactly one shard with its full data: before
6 the source owns it (and a re-run starts the move over), after 6 the target does (the
copy and the delta are durable on it, and the source refuses writes to frozen slots,
even after a restart, until it learns the new map). Re-running :func:`apply_plan`
finishes decided moves first, then moves whatever is not yet where the plan wants it.

Example:
    >>> report = apply_plan(plan, "/tmp/recps/cluster.json")  # doctest: +SKIP
    >>> report["moved_slots"], report["moved_rows"]  # doctest: +SKIP
    (5461, 1000000)
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from recps.embedding import errors as E
from recps.embedding.base import RowBatch
from recps.proto import ps_pb2

log = logging.getLogger("recps.ps.migration")


# ---- codec (server and executor) -------------------------------------------------------------


def encode_slot_rows(table: str, batch: RowBatch) -> ps_pb2.SlotRows:
    n = len(batch)
    w = np.ascontiguousarray(batch.weights, dtype="<f4")
    st = np.ascontiguousarray(batch.state, dtype="<f4")
    return ps_pb2.SlotRows(
        table=table,
        ids=np.ascontiguousarray(batch.ids, dtype="<i8").tobytes(),
        weights=w.tobytes(),
        state=st.tobytes(),
        updated_at=np.ascontiguousarray(batch.updated_at, dtype="<f8").tobytes(),
        count=np.ascontiguousarray(batch.count, dtype="<i8").tobytes(),
        dim=w.shape[1] if n else 0,
        state_width=st.shape[1] if n else 0,
    )


def decode_slot_rows(msg: ps_pb2.SlotRows, dim: int, state_width: int) -> RowBatch:
    """The rows of ``msg``, checked against the table's ``dim`` and ``state_width``."""
    n, rest = divmod(len(msg.ids), 8)
    want = {
        "weights": n * dim * 4,
        "state": n * state_width * 4,
        "updated_at": n * 8,
        "count": n * 8,
    }
    if rest or any(len(getattr(msg, k)) != v for k, v in want.items()):
        raise E.InvalidArgumentError(
            f"slot rows of table {msg.table!r}: byte lengths do not match {n} rows of dim "
            f"{dim} and state width {state_width}"
        )
    return RowBatch(
        ids=np.frombuffer(msg.ids, "<i8").astype(np.int64),
        weights=np.frombuffer(msg.weights, "<f4").reshape(n, dim).astype(np.float32),
        state=np.frombuffer(msg.state, "<f4").reshape(n, state_width).astype(np.float32),
        updated_at=np.frombuffer(msg.updated_at, "<f8").astype(np.float64),
        count=np.frombuffer(msg.count, "<i8").astype(np.int64),
    )


# ---- executor ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationConfig:
    """How ``apply`` moves slots."""

    # Slots frozen and handed over together. Every handover stalls the writers that touch
    # its slots for about one freeze (a training batch touches nearly every slot), and
    # the freeze's cost is mostly fixed (fsyncs, map installs), so few large moves stall
    # less in total than many small ones.
    slots_per_move: int = 4096
    # Slots of one (source, target) pair copied in one pass over the source's tables: the
    # full copy scans every row of the source however few slots it wants, so one pass
    # for many moves costs a move's scan once (the moves then freeze and hand over one
    # after another, and the source deletes its old copies in one pass at the end).
    slots_per_copy: int = 16384
    page_rows: int = 16384  # rows per ReadSlotRows/WriteSlotRows message (~2.5 MB at dim 16)
    timeout_s: float = 120.0  # deadline of each control call (a page scans a table)
    retries: int = 5  # UNAVAILABLE retries per call before apply gives up (resumable)
    # Delta rounds copied before the freeze, each taking the rows touched during the last
    # one, until one is at most freeze_below_rows: the freeze then lasts one small round.
    precopy_rounds: int = 3
    freeze_below_rows: int = 2048
    # Share of wall time the background full copy may keep the source busy: after each
    # page, apply pauses (1 - duty) / duty times as long as the page took, leaving the
    # source's GIL to the training traffic. 1.0 = copy flat out.
    copy_duty_cycle: float = 0.35

    def __post_init__(self) -> None:
        if min(self.slots_per_move, self.slots_per_copy, self.page_rows) < 1 or self.timeout_s <= 0:
            raise E.ConfigError(
                "slots_per_move, slots_per_copy, page_rows and timeout_s must be positive"
            )
        if not 0 < self.copy_duty_cycle <= 1:
            raise E.ConfigError(f"copy_duty_cycle must be in (0, 1], got {self.copy_duty_cycle}")


@dataclass
class Progress:
    """What ``apply`` reports after every page and every move."""

    moves_done: int = 0
    moves_total: int = 0
    slots_moved: int = 0
    slots_total: int = 0
    rows_copied: int = 0
    bytes_copied: int = 0
    started_at: float = 0.0
    current: str = ""
    max_freeze_ms: float = 0.0  # longest a move's slots refused writes (freeze to handover)

    @property
    def rows_per_s(self) -> float:
        dt = time.monotonic() - self.started_at
        return self.rows_copied / dt if dt > 0 else 0.0


class _Shards:
    """Control calls to shards by id, over a PSClient's channels (auth, TLS)."""

    def __init__(self, client: Any, config: MigrationConfig) -> None:
        self.client = client
        self.config = config

    def call(self, address: str, method: str, request: Any) -> Any:
        from recps.ps.errors import from_rpc_error

        delay = 0.1
        for attempt in range(self.config.retries + 1):
            try:
                return getattr(self.client._stub(address), method)(
                    request, timeout=self.config.timeout_s, metadata=self.client._metadata()
                )
            except grpc.RpcError as e:
                err = from_rpc_error(e, f"{method} on {address}")
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.config.retries:
                    raise err from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")


def _install(shards: _Shards, new: Any, order: list[str], parallel: bool = False) -> None:
    """UpdateShardMap on each address in order (or all at once when ``parallel``); one
    that already has it (or newer) is fine."""

    def one(addr: str) -> None:
        with contextlib.suppress(E.StaleShardMapError):
            shards.call(addr, "UpdateShardMap", new.to_proto())

    if parallel and len(order) > 1:
        with ThreadPoolExecutor(len(order)) as pool:
            for f in [pool.submit(one, a) for a in order]:
                f.result()
    else:
        for addr in order:
            one(addr)


def _migrate(shards: _Shards, addr: str, action: int, move_id: str, slots: list[int]) -> int:
    req = ps_pb2.MigrateRequest(move_id=move_id, action=action, slots=slots)
    t0 = time.monotonic()
    rows = int(shards.call(addr, "Migrate", req).rows)
    log.debug(
        "move %s: %s on %s, %d slots, %d rows, %.3f s",
        move_id, ps_pb2.MigrateAction.Name(action), addr, len(slots), rows,
        time.monotonic() - t0,
    )  # fmt: skip
    return rows


def _copy(
    shards: _Shards,
    src: str,
    dst: str,
    move_id: str,
    tables: list[str],
    slots: list[int],
    delta: bool,
    progress: Progress,
    report: Callable[[Progress], None],
    round_: int = 0,
) -> tuple[int, int]:
    rows = nbytes = 0
    duty = 1.0 if delta else shards.config.copy_duty_cycle
    for table in tables:
        after: int | None = None
        while True:
            t0 = time.monotonic()
            req = ps_pb2.ReadSlotRowsRequest(
                move_id=move_id,
                table=table,
                slots=slots,
                delta=delta,
                delta_round=round_,
                after_id=after or 0,
                has_after_id=after is not None,
                max_rows=shards.config.page_rows,
            )
            resp = shards.call(src, "ReadSlotRows", req)
            t_read = time.monotonic()
            page = resp.rows
            n = len(page.ids) // 8
            if n:
                wreq = ps_pb2.WriteSlotRowsRequest(move_id=move_id, rows=page)
                shards.call(dst, "WriteSlotRows", wreq)
                log.debug(
                    "%s page of %s: %d rows, read %.3f s, write %.3f s",
                    "delta" if delta else "copy", table, n, t_read - t0,
                    time.monotonic() - t_read,
                )  # fmt: skip
                size = page.ByteSize()
                rows += n
                nbytes += size
                progress.rows_copied += n
                progress.bytes_copied += size
                report(progress)
                after = int(np.frombuffer(page.ids[-8:], "<i8")[0])
            if resp.done or not n:
                break
            if duty < 1.0:
                time.sleep((time.monotonic() - t0) * (1 - duty) / duty)
    return rows, nbytes


def _tables(shards: _Shards, address: str) -> list[Any]:
    return list(shards.call(address, "ListTables", ps_pb2.ListTablesRequest()).tables)


def apply_plan(
    plan: Any,
    cluster_file: str | Path,
    addresses: dict[int, str] | None = None,
    config: MigrationConfig | None = None,
    client_config: Any = None,
    on_progress: Callable[[Progress], None] | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Execute ``plan`` (a :class:`RebalancePlan`) on the cluster of ``cluster_file``.

    Idempotent and resumable: decided moves in the journal are finished first, then every
    planned slot not yet at its planned owner is moved. ``addresses`` names the shards
    the plan adds (already running, e.g. by ``recps shard add``); the others come from
    the map. Shards the plan drains are dropped from the map once they own nothing.
    The coordinator's state lives under ``data_dir`` (default: the cluster file's
    folder). Returns a report: moves, slots, rows, bytes, seconds, final epoch.
    """
    from recps.ps.client import PSClient
    from recps.ps.coordinator import Coordinator
    from recps.ps.errors import MigrationError
    from recps.ps.routing import ShardMap

    cfg = config or MigrationConfig()
    cluster_file = Path(cluster_file)
    root = Path(data_dir) if data_dir is not None else cluster_file.parent
    report = on_progress or (lambda p: None)
    progress = Progress(started_at=time.monotonic())
    t0 = time.monotonic()
    with Coordinator.open(root, cluster_file=cluster_file) as coord:
        m = coord.shard_map
        if plan.num_slots != m.num_slots:
            raise MigrationError(f"the plan has {plan.num_slots} slots, the cluster {m.num_slots}")
        coord.set_plan(plan.to_dict())
        client = PSClient(m, client_config)
        shards = _Shards(client, cfg)
        try:
            # 1. Finish what was decided before a crash; forget what was not.
            for mv in coord.state().active_moves():
                if mv["state"] == "decided":
                    _finish(shards, coord, mv)
                else:
                    src_addr = coord.shard_map.shards.get(mv["src"])
                    if src_addr:  # unfreeze: the source kept the slots
                        try:
                            _migrate(shards, src_addr, ps_pb2.ABORT_SOURCE, mv["id"], mv["slots"])
                        except E.RecpsError as e:
                            log.warning("abort of move %s on its source: %s", mv["id"], e)
                    coord.abandon_move(mv["id"])

            # 2. New shards join the map (owning nothing yet) and get every table.
            m = coord.shard_map
            new_ids = [s for s in plan.shards_after if s not in m.shards]
            if new_ids:
                missing = [s for s in new_ids if s not in (addresses or {})]
                if missing:
                    raise MigrationError(
                        f"the plan adds shards {missing}; start them first and pass their "
                        "addresses (recps rebalance apply --add-shard ID=HOST:PORT)"
                    )
                assert addresses is not None
                m = _join(shards, coord, {s: addresses[s] for s in new_ids})
            tables = [t.name for t in _tables(shards, m.shards[min(m.shards)])]

            # 3. Every planned slot not at its planned owner yet, grouped by (src, dst).
            want = plan.target_owner(m.slot_owner)
            todo = np.flatnonzero(want != m.slot_owner)
            groups: dict[tuple[int, int], list[int]] = {}
            for s in todo.tolist():
                groups.setdefault((int(m.slot_owner[s]), int(want[s])), []).append(s)
            copies = [
                (src, dst, sl[i : i + cfg.slots_per_copy])
                for (src, dst), sl in sorted(groups.items())
                for i in range(0, len(sl), cfg.slots_per_copy)
            ]
            progress.moves_total = sum(-(-len(c) // cfg.slots_per_move) for *_, c in copies)
            progress.slots_total = len(todo)
            report(progress)
            for src, dst, slots in copies:
                chunks = [
                    slots[i : i + cfg.slots_per_move]
                    for i in range(0, len(slots), cfg.slots_per_move)
                ]
                _move_group(shards, coord, src, dst, chunks, tables, progress, report)

            # 4. Drained shards leave the map once they own nothing.
            m = coord.shard_map
            owners = set(np.unique(m.slot_owner).tolist())
            leaving = [s for s in m.shards if s not in plan.shards_after and s not in owners]
            if leaving:
                old_addrs = [m.shards[s] for s in leaving]
                m = coord.set_shards({k: v for k, v in m.shards.items() if k not in leaving})
                _install(shards, m, [*m.shards.values(), *old_addrs])
            coord.set_plan(None)
            final: ShardMap = coord.shard_map
        finally:
            client.close()
    return {
        "moves": progress.moves_done,
        "moved_slots": progress.slots_moved,
        "moved_rows": progress.rows_copied,
        "moved_bytes": progress.bytes_copied,
        "seconds": round(time.monotonic() - t0, 3),
        "max_freeze_ms": round(progress.max_freeze_ms, 1),
        "epoch": final.epoch,
        "shards": sorted(final.shards),
    }


def _join(shards: _Shards, coord: Any, new: dict[int, str]) -> Any:
    """Give the shards of ``new`` (id -> address) every table, then add them to the map
    owning no slot (epoch + 1, durable, installed everywhere)."""
    m = coord.shard_map
    specs = _tables(shards, m.shards[min(m.shards)])
    for addr in new.values():
        for spec in specs:
            req = ps_pb2.CreateTableRequest(spec=spec, if_not_exists=True)
            shards.call(addr, "CreateTable", req)
    m = coord.set_shards({**m.shards, **new})
    _install(shards, m, list(m.shards.values()))
    return m


def join_shards(
    cluster_file: str | Path,
    addresses: dict[int, str],
    config: MigrationConfig | None = None,
    client_config: Any = None,
    data_dir: str | Path | None = None,
) -> Any:
    """Add running, empty shards (id -> address) to the cluster's map, owning no slot
    yet, with every table created on them; returns the new :class:`ShardMap`. A
    rebalance (:func:`apply_plan`) then gives them slots. Shards already in the map with
    the same address are left as they are; an id in the map at another address is
    refused.

    Example:
        >>> join_shards("/tmp/recps/cluster.json", {2: "127.0.0.1:7003"})  # doctest: +SKIP
        ShardMap(epoch=5, ...)
    """
    from recps.ps.client import PSClient
    from recps.ps.coordinator import Coordinator
    from recps.ps.errors import MigrationError

    cluster_file = Path(cluster_file)
    root = Path(data_dir) if data_dir is not None else cluster_file.parent
    with Coordinator.open(root, cluster_file=cluster_file) as coord:
        m = coord.shard_map
        clash = {s: a for s, a in addresses.items() if s in m.shards and m.shards[s] != a}
        if clash:
            raise MigrationError(
                f"shards {sorted(clash)} are already in the map at other addresses "
                f"({ {s: m.shards[s] for s in clash} })"
            )
        new = {s: a for s, a in addresses.items() if s not in m.shards}
        if not new:
            return m
        client = PSClient(m, client_config)
        try:
            return _join(_Shards(client, config or MigrationConfig()), coord, new)
        finally:
            client.close()


def _move_group(
    shards: _Shards,
    coord: Any,
    src: int,
    dst: int,
    chunks: list[list[int]],
    tables: list[str],
    progress: Progress,
    report: Callable[[Progress], None],
) -> None:
    """Moves of ``chunks`` (slot lists) from ``src`` to ``dst`` sharing one full copy: one
    scan of the source for all of them, then each chunk is caught up, frozen, decided and
    installed in turn, then the source drops its old rows of all of them in one pass."""
    m = coord.shard_map
    src_addr, dst_addr = m.shards[src], m.shards[dst]
    every = sorted(s for c in chunks for s in c)
    ids = [uuid.uuid4().hex[:12] for _ in chunks]
    for move_id, slots in zip(ids, chunks):
        coord.begin_move(move_id, src, dst, slots)
    decided: set[str] = set()
    t0 = time.monotonic()
    try:
        _migrate(shards, dst_addr, ps_pb2.BEGIN_TARGET, ids[0], every)
        _migrate(shards, src_addr, ps_pb2.BEGIN_SOURCE, ids[0], every)
        progress.current = f"copy {len(every)} slots {src} -> {dst}"
        copy = (shards, src_addr, dst_addr, ids[0], tables, every)
        rows, nbytes = _copy(*copy, False, progress, report)
        log.info(
            "copy of %d slots %d -> %d: %d rows in %.2f s",
            len(every), src, dst, rows, time.monotonic() - t0,
        )  # fmt: skip
        for move_id, slots in zip(ids, chunks):
            progress.current = f"{len(slots)} slots {src} -> {dst}"
            _hand_over_chunk(
                shards, coord, move_id, src_addr, dst_addr, slots, tables, progress, report
            )
            decided.add(move_id)
            progress.moves_done += 1
            progress.slots_moved += len(slots)
            report(progress)
    except BaseException:
        # Undecided chunks stay the source's. Unfreeze them if it answers; a re-run of
        # apply does the same for moves this process could not clean up, and finishes
        # the decided ones.
        for move_id, slots in zip(ids, chunks):
            if move_id in decided or coord.move(move_id)["state"] != "copying":
                continue  # decided: the target owns it now, never unfreeze the source
            try:
                _migrate(shards, src_addr, ps_pb2.ABORT_SOURCE, move_id, slots)
                coord.abandon_move(move_id)
            except E.RecpsError as e:
                log.warning("move %s: could not abort on its source: %s", move_id, e)
        raise
    coord.note_progress(ids[0], rows, nbytes)
    _clean_up(shards, coord, [coord.move(i) for i in ids])


def _hand_over_chunk(
    shards: _Shards,
    coord: Any,
    move_id: str,
    src_addr: str,
    dst_addr: str,
    slots: list[int],
    tables: list[str],
    progress: Progress,
    report: Callable[[Progress], None],
) -> None:
    """Catch one chunk up (delta rounds while writes flow), freeze it, copy the last
    delta, decide, install. Its full copy is already on the target."""
    t0 = time.monotonic()
    cfg = shards.config
    args = (shards, src_addr, dst_addr, move_id, tables, slots)
    # The target flushes its hot tier now, while writes still flow: the rows it is sent
    # go straight to its RocksDB WAL (ingest), so this only keeps the flush of its other
    # rows out of the freeze, and out of the last delta round before it.
    _migrate(shards, dst_addr, ps_pb2.PREPARE_TARGET, move_id, slots)
    rows = nbytes = 0
    rnd = 1
    while rnd <= cfg.precopy_rounds:  # shrink the delta while writes still flow
        n, b = _copy(*args, True, progress, report, rnd)
        rows, nbytes, rnd = rows + n, nbytes + b, rnd + 1
        if n <= cfg.freeze_below_rows:
            break
    t_freeze = time.monotonic()
    _migrate(shards, src_addr, ps_pb2.FREEZE, move_id, slots)
    r2, b2 = _copy(*args, True, progress, report, rnd)
    # Tables created since the copy began: their rows in the slots, in full (they are
    # frozen now, so this is complete).
    late = [t.name for t in _tables(shards, src_addr) if t.name not in tables]
    if late:
        n, b = _copy(shards, src_addr, dst_addr, move_id, late, slots, False, progress, report)
        r2, b2 = r2 + n, b2 + b
    coord.note_progress(move_id, rows + r2, nbytes + b2)
    t_decide = time.monotonic()
    coord.decide(move_id, publish=False)  # the handover
    log.debug("move %s: decided in %.3f s", move_id, time.monotonic() - t_decide)
    handed_over = _hand_over(shards, coord, coord.move(move_id))
    frozen_ms = 1000 * (handed_over - t_freeze)
    progress.max_freeze_ms = max(progress.max_freeze_ms, frozen_ms)
    log.info(
        "move %s: %d slots, delta %d rows in %d rounds + %d frozen, %.2f s, frozen %.0f ms",
        move_id, len(slots), rows, rnd - 1, r2, time.monotonic() - t0, frozen_ms,
    )  # fmt: skip


def _hand_over(shards: _Shards, coord: Any, mv: dict[str, Any]) -> float:
    """Install the map of a decided move on its target, its source, then every other
    shard, and publish it in the cluster file. Returns when (monotonic) the source learnt
    it: its frozen slots then answer "stale" and clients re-route."""
    m = coord.shard_map
    src_addr, dst_addr = m.shards.get(mv["src"]), m.shards[mv["dst"]]
    others = [a for s, a in sorted(m.shards.items()) if s not in (mv["src"], mv["dst"])]
    # Both at once: a client the source already turned away may reach the target before
    # it has the map; the target then answers "stale" too, and the client retries.
    _install(shards, m, [dst_addr, *([src_addr] if src_addr else [])], parallel=True)
    handed_over = time.monotonic()
    _install(shards, m, others)
    coord.publish()
    return handed_over


def _clean_up(shards: _Shards, coord: Any, moves: list[dict[str, Any]]) -> None:
    """``FINISH`` decided moves sharing a source and a target, in one call to each: the
    source deletes its old copies (one pass over its tables), both forget the moves."""
    m = coord.shard_map
    src_addr, dst_addr = m.shards.get(moves[0]["src"]), m.shards[moves[0]["dst"]]
    every = sorted(s for mv in moves for s in mv["slots"])
    if src_addr:
        _migrate(shards, src_addr, ps_pb2.FINISH, moves[0]["id"], every)
    _migrate(shards, dst_addr, ps_pb2.FINISH, moves[0]["id"], every)
    for mv in moves:
        coord.finish_move(mv["id"])


def _finish(shards: _Shards, coord: Any, mv: dict[str, Any]) -> None:
    """Finish one decided move (a re-run after a crash): install, publish, clean up."""
    _hand_over(shards, coord, mv)
    _clean_up(shards, coord, [mv])
