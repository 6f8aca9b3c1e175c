"""Hash-slot routing: every (table, id) maps to one of ``num_slots`` slots; a versioned
:class:`ShardMap` assigns each slot to one shard.

Moving a slot between shards changes one entry of ``slot_owner`` and bumps the epoch, so
rebalancing never rehashes anything (unlike ``hash % num_shards``).

Example:
    >>> import numpy as np
    >>> m = ShardMap.even(["127.0.0.1:7001", "127.0.0.1:7002"], num_slots=16)
    >>> m.owners("user", np.array([1, 2, 3])).tolist()  # doctest: +SKIP
    [1, 0, 1]
    >>> m.epoch, len(m.shards)
    (1, 2)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from recps.embedding.errors import ConfigError
from recps.embedding.hashing import as_u64, mix64, stable_hash64

DEFAULT_NUM_SLOTS = 16384


@lru_cache(maxsize=4096)
def table_salt(table: str) -> np.uint64:
    """Per-table salt, so one id lands on different slots in different tables."""
    return np.uint64(stable_hash64("recps-slot\x1f" + table))


def slot_of(table: str, ids: np.ndarray, num_slots: int) -> np.ndarray:
    """Slot of each id: the top bits of a stable 64-bit mix of (table, id). int64 array."""
    shift = np.uint64(64 - (num_slots.bit_length() - 1))
    return (mix64(as_u64(ids) ^ table_salt(table)) >> shift).astype(np.int64)


def slots_of_tables(tables: list[str], ids: list[np.ndarray], num_slots: int) -> np.ndarray:
    """``slot_of`` of every table's ids, concatenated, in one vectorized pass (each id
    XORed with its own table's salt): a request with 26 tables pays one hash, not 26."""
    if len(tables) == 1:
        return slot_of(tables[0], ids[0], num_slots)
    if not tables:
        return np.empty(0, dtype=np.int64)
    salts = np.array([table_salt(t) for t in tables], dtype=np.uint64)
    salted = as_u64(np.concatenate(ids)) ^ np.repeat(salts, [len(i) for i in ids])
    shift = np.uint64(64 - (num_slots.bit_length() - 1))
    return (mix64(salted) >> shift).astype(np.int64)


@dataclass(frozen=True)
class ShardMap:
    """Slot -> shard routing with an epoch that increases on every change.

    ``shards`` maps shard id to ``host:port``; ``slot_owner[s]`` is the owner of slot ``s``.
    """

    epoch: int
    num_slots: int
    shards: dict[int, str]
    slot_owner: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        n = self.num_slots
        if n < 1 or n & (n - 1) or n > 1 << 16:
            raise ConfigError(f"num_slots must be a power of two in [1, 65536], got {n}")
        owner = np.ascontiguousarray(self.slot_owner, dtype=np.uint16)
        if owner.shape != (n,):
            raise ConfigError(f"slot_owner must have {n} entries, got {owner.shape}")
        unknown = set(np.unique(owner).tolist()) - set(self.shards)
        if unknown:
            raise ConfigError(f"slots are owned by unknown shards {sorted(unknown)}")
        object.__setattr__(self, "slot_owner", owner)
        owner.setflags(write=False)

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def even(
        cls, addresses: list[str], num_slots: int = DEFAULT_NUM_SLOTS, epoch: int = 1
    ) -> ShardMap:
        """Shards 0..n-1 own equal contiguous slot ranges."""
        if not addresses:
            raise ConfigError("a shard map needs at least one shard")
        n = len(addresses)
        owner = (np.arange(num_slots, dtype=np.int64) * n // num_slots).astype(np.uint16)
        return cls(epoch, num_slots, dict(enumerate(addresses)), owner)

    def replace(
        self,
        *,
        epoch: int | None = None,
        shards: dict[int, str] | None = None,
        slot_owner: np.ndarray | None = None,
    ) -> ShardMap:
        return ShardMap(
            self.epoch + 1 if epoch is None else epoch,
            self.num_slots,
            dict(self.shards if shards is None else shards),
            self.slot_owner if slot_owner is None else slot_owner,
        )

    # ---- routing ---------------------------------------------------------------------------

    def owners(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Owning shard id of each id (int64 array)."""
        return self.slot_owner[slot_of(table, ids, self.num_slots)].astype(np.int64)

    def slots_of(self, shard_id: int) -> np.ndarray:
        return np.flatnonzero(self.slot_owner == shard_id)

    # ---- serialization ---------------------------------------------------------------------

    def to_proto(self) -> Any:
        from recps.proto import ps_pb2

        return ps_pb2.ShardMap(
            epoch=self.epoch,
            num_slots=self.num_slots,
            shards=[
                ps_pb2.ShardInfo(shard_id=k, address=v) for k, v in sorted(self.shards.items())
            ],
            slot_owner=self.slot_owner.astype("<u2").tobytes(),
        )

    @classmethod
    def from_proto(cls, msg: Any) -> ShardMap:
        owner = np.frombuffer(msg.slot_owner, dtype="<u2")
        return cls(msg.epoch, msg.num_slots, {s.shard_id: s.address for s in msg.shards}, owner)

    def to_dict(self) -> dict[str, Any]:
        # Run-length encoded: a map of 16384 slots is a handful of ranges in practice.
        runs: list[list[int]] = []
        for s, o in enumerate(self.slot_owner.tolist()):
            if runs and runs[-1][2] == o and runs[-1][1] == s:
                runs[-1][1] = s + 1
            else:
                runs.append([s, s + 1, o])
        return {
            "epoch": self.epoch,
            "num_slots": self.num_slots,
            "shards": {str(k): v for k, v in sorted(self.shards.items())},
            "slot_ranges": runs,  # [start, stop, shard_id]
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardMap:
        n = int(d["num_slots"])
        owner = np.full(n, 0xFFFF, dtype=np.uint16)
        for start, stop, shard in d["slot_ranges"]:
            owner[start:stop] = shard
        if (owner == 0xFFFF).any():
            raise ConfigError("shard map leaves some slots without an owner")
        return cls(int(d["epoch"]), n, {int(k): v for k, v in d["shards"].items()}, owner)

    def save(self, path: str | Path) -> None:
        """Atomic write (tmp + rename), so a crash never leaves half a map."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ShardMap:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ShardMap)
            and (self.epoch, self.num_slots, self.shards)
            == (other.epoch, other.num_slots, other.shards)
            and bool(np.array_equal(self.slot_owner, other.slot_owner))
        )

    __hash__ = None  # type: ignore[assignment]
