"""Rebalance plans: which hash slots move where, as a value that can be saved and reviewed.

:func:`plan_rebalance` is a pure function of the current :class:`ShardMap`, per-slot
statistics and the wanted set of shards. ``recps rebalance plan`` writes its result as
JSON; ``recps rebalance apply`` executes it (idempotently: slots already at their planned
owner are skipped).

What the planner guarantees (tested with hypothesis in tests/unit/test_rebalance_plan.py):

* **Drained shards own nothing**: every slot of a shard outside ``target_shards`` moves,
  heaviest first, to the least-loaded target shard at that moment.
* **Nothing moves needlessly**: when every target shard's load is already within
  ``tolerance`` of the mean (and no shard is drained), the plan is empty. A slot whose
  final owner is its current one is never listed, even if the search considered it.
* **Balance when achievable**: while a shard is above ``mean * (1 + tolerance)`` or below
  ``mean * (1 - tolerance)``, the heaviest slot of the most-loaded shard that fits in
  the gap to the least-loaded one moves there. Each such move strictly lowers the sum of
  squared loads, so the search ends; if every slot weighs at most ``tolerance * mean``,
  it ends with every shard within tolerance. Otherwise (a single slot hotter than the
  band) ``balanced`` is false and the plan is the best the greedy search found.
* **Few moves**: heaviest fitting slots go first, so the number of moved slots is close
  to the minimum (the exact minimum is a bin-packing problem; the greedy is not optimal
  in every case).

With no load at all (a fresh cluster), slot counts are balanced instead.

Example:
    >>> import numpy as np
    >>> m = ShardMap.even(["a:1", "b:2"], num_slots=8)
    >>> stats = SlotStats.uniform(8)
    >>> plan = plan_rebalance(m, stats, target_shards=[0, 1, 2], by="rows", tolerance=0.3)
    >>> plan.balanced, plan.moved_slots
    (True, 2)
    >>> sorted(plan.load_after.values())
    [2.0, 3.0, 3.0]
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recps.embedding.errors import ConfigError
from recps.ps.routing import ShardMap

MEASURES = ("rows", "bytes", "qps")
_FORMAT = 1


@dataclass(frozen=True)
class SlotStats:
    """Per-slot load of a whole cluster: rows stored, bytes stored, requests (ids looked
    up + rows pushed) since each slot's owner started counting, each an int64 array of
    ``num_slots`` entries; and ``qps``, the recent request rate per slot (float64), which
    ``--by qps`` balances. Without ``qps`` (shards too old to report it) the counts stand
    in for it."""

    rows: np.ndarray
    bytes: np.ndarray
    requests: np.ndarray
    qps: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.rows)
        for name in ("rows", "bytes", "requests"):
            a = np.asarray(getattr(self, name), dtype=np.int64)
            if a.shape != (n,) or (a < 0).any():
                raise ConfigError(f"slot stats {name} must be {n} non-negative counts")
            object.__setattr__(self, name, a)
        if self.qps is not None:
            q = np.asarray(self.qps, dtype=np.float64)
            if q.shape != (n,) or not (q >= 0).all():  # also refuses NaN
                raise ConfigError(f"slot stats qps must be {n} non-negative rates")
            object.__setattr__(self, "qps", q)

    @classmethod
    def uniform(cls, num_slots: int) -> SlotStats:
        """One row, one byte, one request per slot (tests, examples)."""
        one = np.ones(num_slots, dtype=np.int64)
        return cls(one, one.copy(), one.copy())

    def measure(self, by: str) -> np.ndarray:
        if by not in MEASURES:
            raise ConfigError(f"--by must be one of {MEASURES}, got {by!r}")
        if by == "qps":
            return self.requests if self.qps is None else self.qps
        return {"rows": self.rows, "bytes": self.bytes}[by]


@dataclass(frozen=True)
class SlotMove:
    """Slots that go from one shard to another, as ``[start, stop)`` ranges."""

    src: int
    dst: int
    slots: tuple[int, ...]
    load: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "count": len(self.slots),
            "load": self.load,
            "slot_ranges": _ranges(self.slots),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlotMove:
        slots = tuple(s for a, b in d["slot_ranges"] for s in range(a, b))
        return cls(int(d["src"]), int(d["dst"]), slots, float(d.get("load", 0.0)))


@dataclass(frozen=True)
class RebalancePlan:
    """The planner's answer: moves, and the load per shard before and after them."""

    base_epoch: int
    num_slots: int
    by: str
    tolerance: float
    shards_before: tuple[int, ...]
    shards_after: tuple[int, ...]
    moves: tuple[SlotMove, ...]
    load_before: dict[int, float]
    load_after: dict[int, float]
    balanced: bool
    created_at: float = field(default_factory=time.time)

    @property
    def moved_slots(self) -> int:
        return sum(len(m.slots) for m in self.moves)

    @property
    def moved_load(self) -> float:
        return float(sum(m.load for m in self.moves))

    def target_owner(self, current: np.ndarray) -> np.ndarray:
        """``current`` with every planned slot at its planned owner."""
        owner = np.array(current, dtype=np.uint16, copy=True)
        for m in self.moves:
            owner[np.asarray(m.slots, dtype=np.int64)] = m.dst
        return owner

    def to_dict(self) -> dict[str, Any]:
        def imbalance(load: dict[int, float]) -> float | None:
            vals = list(load.values())
            mean = sum(vals) / len(vals) if vals else 0.0
            return round(max(vals) / mean, 4) if mean > 0 else None

        return {
            "format": _FORMAT,
            "base_epoch": self.base_epoch,
            "num_slots": self.num_slots,
            "by": self.by,
            "tolerance": self.tolerance,
            "shards_before": list(self.shards_before),
            "shards_after": list(self.shards_after),
            "moved_slots": self.moved_slots,
            "moved_load": self.moved_load,
            "balanced": self.balanced,
            # max / mean: 1.0 is perfect balance
            "imbalance_before": imbalance(self.load_before),
            "imbalance_after": imbalance(self.load_after),
            "load_before": {str(k): v for k, v in sorted(self.load_before.items())},
            "load_after": {str(k): v for k, v in sorted(self.load_after.items())},
            "moves": [m.to_dict() for m in self.moves],
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RebalancePlan:
        if d.get("format") != _FORMAT:
            raise ConfigError(f"not a recps rebalance plan (format {d.get('format')!r})")
        try:
            return cls(
                base_epoch=int(d["base_epoch"]),
                num_slots=int(d["num_slots"]),
                by=str(d["by"]),
                tolerance=float(d["tolerance"]),
                shards_before=tuple(int(s) for s in d["shards_before"]),
                shards_after=tuple(int(s) for s in d["shards_after"]),
                moves=tuple(SlotMove.from_dict(m) for m in d["moves"]),
                load_before={int(k): float(v) for k, v in d["load_before"].items()},
                load_after={int(k): float(v) for k, v in d["load_after"].items()},
                balanced=bool(d["balanced"]),
                created_at=float(d.get("created_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed rebalance plan: {e}") from e

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> RebalancePlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"cannot read plan {path}: {e}") from e


def _ranges(slots: Iterable[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(slots):
        if out and out[-1][1] == s:
            out[-1][1] = s + 1
        else:
            out.append([s, s + 1])
    return out


def plan_rebalance(
    current: ShardMap,
    stats: SlotStats,
    target_shards: Iterable[int],
    by: str = "rows",
    tolerance: float = 0.1,
) -> RebalancePlan:
    """Plan the fewest slot moves that bring every target shard's load (``by``: rows,
    bytes or qps) within ``tolerance`` of the mean, draining shards not in
    ``target_shards``. Pure: reads nothing but its arguments. See the module docstring
    for what it guarantees."""
    targets = sorted({int(s) for s in target_shards})
    if not targets:
        raise ConfigError("a plan needs at least one target shard")
    if any(not 0 <= s < 0xFFFF for s in targets):
        raise ConfigError(f"shard ids must be in [0, 65535), got {targets}")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be in [0, 1), got {tolerance}")
    if len(stats.rows) != current.num_slots:
        raise ConfigError(f"stats cover {len(stats.rows)} slots, the map has {current.num_slots}")
    if len(targets) > current.num_slots:
        raise ConfigError(f"{len(targets)} shards need at least as many slots")
    w = stats.measure(by).astype(np.float64)
    if w.sum() <= 0:
        w = np.ones(current.num_slots)  # nothing stored or asked yet: balance slot counts
    base = current.slot_owner.astype(np.int64)
    owner = base.copy()
    before_shards = sorted(set(current.shards) | set(np.unique(base).tolist()))
    load = {s: float(w[owner == s].sum()) for s in sorted(set(before_shards) | set(targets))}
    load_before = {s: load[s] for s in before_shards}

    # Phase 1: drain. Heaviest slot first to the least-loaded target (LPT scheduling).
    drained = np.flatnonzero(~np.isin(owner, targets))
    for s in drained[np.argsort(-w[drained], kind="stable")]:
        dst = min(targets, key=lambda t: (load[t], t))
        load[int(owner[s])] -= w[s]
        load[dst] += w[s]
        owner[s] = dst

    # Phase 2: even out. Per shard, its slots sorted by weight (ascending) for bisect.
    mean = sum(load[t] for t in targets) / len(targets)
    hi, lo = mean * (1 + tolerance), mean * (1 - tolerance)
    by_shard: dict[int, list[tuple[float, int]]] = {t: [] for t in targets}
    for s in np.flatnonzero(np.isin(owner, targets)):
        by_shard[int(owner[s])].append((float(w[s]), int(s)))
    for t in targets:
        by_shard[t].sort()
    for _ in range(current.num_slots * len(targets)):  # a bound; the loop ends far sooner
        h = max(targets, key=lambda t: (load[t], -t))
        low = min(targets, key=lambda t: (load[t], t))
        if load[h] <= hi and load[low] >= lo:
            break
        gap = load[h] - load[low]
        slots = by_shard[h]
        # Prefer a slot that overshoots neither side; else any that narrows the spread.
        pick = _heaviest_at_most(slots, min(load[h] - mean, mean - load[low]))
        if pick is None:
            pick = _heaviest_below(slots, gap)
        if pick is None:
            break
        wt, s = slots.pop(pick)
        bisect.insort(by_shard[low], (wt, s))
        load[h] -= wt
        load[low] += wt
        owner[s] = low

    changed = np.flatnonzero(owner != base)
    groups: dict[tuple[int, int], list[int]] = {}
    for s in changed.tolist():
        groups.setdefault((int(base[s]), int(owner[s])), []).append(s)
    moves = tuple(
        SlotMove(src, dst, tuple(sl), float(w[sl].sum()))
        for (src, dst), sl in sorted(groups.items())
    )
    load_after = {t: float(w[owner == t].sum()) for t in targets}
    balanced = all(
        lo - 1e-9 * max(mean, 1) <= load_after[t] <= hi + 1e-9 * max(mean, 1) for t in targets
    )
    return RebalancePlan(
        base_epoch=current.epoch,
        num_slots=current.num_slots,
        by=by,
        tolerance=tolerance,
        shards_before=tuple(sorted(current.shards)),
        shards_after=tuple(targets),
        moves=moves,
        load_before=load_before,
        load_after=load_after,
        balanced=balanced,
    )


def _heaviest_at_most(slots: list[tuple[float, int]], limit: float) -> int | None:
    """Index of the heaviest slot with 0 < weight <= limit (``slots`` sorted ascending)."""
    i = bisect.bisect_right(slots, (limit, 1 << 62)) - 1
    return i if i >= 0 and slots[i][0] > 0 else None


def _heaviest_below(slots: list[tuple[float, int]], limit: float) -> int | None:
    """Index of the heaviest slot with 0 < weight < limit."""
    i = bisect.bisect_left(slots, (limit, -1)) - 1
    return i if i >= 0 and slots[i][0] > 0 else None
