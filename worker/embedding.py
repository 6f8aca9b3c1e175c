"""``ShardedEmbeddingBagCollection``: pooled embeddings whose rows live on the parameter servers.

The module looks like any ``torch.nn.Module``: ``pooled = ebc(ids)`` returns one ``[B, dim]``
tensor per feature, and ``loss.backward()`` sends the gradient of every row it touched to the
servers, whose optimizer (``TableConfig.optimizer``) applies it. Nothing else is called by hand.

**Forward.** Per table, the ids of every feature reading it are deduplicated together; the
unique ids of *all* tables go out in one :meth:`PSClient.lookup` (one RPC per shard). The rows
become a tensor of unique rows on the module's device, and each feature is pooled from it with
``F.embedding_bag`` (multi-id, ``sum``/``mean``) or ``F.embedding`` (one id per example).
Tables read only by single-id features (Criteo's 26) are *fused* per dim: their unique rows
sit back to back in one tensor, each feature is one ``index_select`` of it, and backward
reduces the gradients of all of them with one ``embedding_bag`` over positions presorted
by ``prepare`` (:class:`FusedIds`), instead of one embedding backward per feature (a BLAS
call per index: ~10 ms a step for 26 x 4096 ids, against ~1 ms).
**Backward.** Autograd sums the gradient of each unique row over its occurrences; one
autograd node per step hands ``{table: (unique ids, grad rows)}`` to a push callback
(by default a synchronous :meth:`PSClient.push`; :mod:`recps.worker.pipeline` installs an
asynchronous one with a staleness bound).

Fetching is split so that a pipeline can run it ahead of time: :meth:`prepare` (dedup and
index building, no network), then :meth:`pull` (the lookup and the copy to the device), then
``forward`` on the :class:`PulledBatch`.

The client can be anything with ``PSClient``'s ``lookup``/``push``; the in-process twin is
:class:`recps.worker.reference.LocalRowClient` (one ``MemoryStore`` per table).

Example:
    >>> from recps.embedding import TableConfig
    >>> from recps.worker.reference import LocalRowClient
    >>> cfg = EmbeddingCollectionConfig(
    ...     features=(FeatureSpec("user", "user"), FeatureSpec("tags", "tag", pooling="mean")),
    ...     tables=(TableConfig("user", dim=4), TableConfig("tag", dim=2)),
    ... )
    >>> ebc = ShardedEmbeddingBagCollection(cfg, LocalRowClient(cfg.tables))
    >>> out = ebc({"user": np.array([7, 9]), "tags": (np.array([1, 2, 2]), np.array([0, 2, 3]))})
    >>> {k: tuple(v.shape) for k, v in out.items()}
    {'user': (2, 4), 'tags': (2, 2)}
    >>> out["user"].sum().backward()  # pushes the gradient of rows 7 and 9 of "user"
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from recps.embedding.config import TableConfig
from recps.embedding.errors import (
    ConfigError,
    DimensionMismatchError,
    DtypeError,
    InvalidArgumentError,
    ShapeError,
)
from recps.worker.data import Batch, JaggedIds

__all__ = [
    "EmbeddingCollectionConfig",
    "EmbeddingStats",
    "FeatureSpec",
    "FusedIds",
    "GradPayload",
    "KeyedIds",
    "PreparedIds",
    "PulledBatch",
    "PulledGroup",
    "RowClient",
    "ShardedEmbeddingBagCollection",
    "keyed_ids",
    "pool",
    "prepare_ids",
]

Pooling = Literal["sum", "mean"]
IdsLike = np.ndarray | torch.Tensor | Sequence[int]
# feature -> int64 [B] (one id per example), or jagged (values [N], offsets [B + 1]).
KeyedIds = Mapping[str, IdsLike | JaggedIds | tuple[IdsLike, IdsLike]]
# table -> (unique ids, gradient rows [n, dim]); grads on any device until pushed.
GradPayload = dict[str, tuple[np.ndarray, torch.Tensor]]
GradSink = Callable[[int, GradPayload], None]


class RowClient(Protocol):
    """What the collection needs from a client: :class:`recps.ps.client.PSClient`'s data plane."""

    def lookup(
        self, batch: Mapping[str, Any], create_missing: bool = True
    ) -> dict[str, np.ndarray]: ...

    def push(self, grads: Mapping[str, tuple[Any, Any]]) -> int: ...


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """One pooled output: ids read from ``input`` (default: ``name``), rows from ``table``.

    Several features may share a table (their ids are deduplicated together), and one input
    may feed several tables (e.g. a dim-16 and a dim-1 "wide" table).

    Example:
        >>> FeatureSpec("C1_wide", table="C1_wide", input="C1").source
        'C1'
    """

    name: str
    table: str
    pooling: Pooling = "sum"  # of the ids of one example; "mean" of zero ids is 0
    input: str | None = None  # key in the KeyedIds; None: the feature's own name

    def __post_init__(self) -> None:
        if not self.name or not self.table:
            raise ConfigError("FeatureSpec needs a name and a table")
        if self.pooling not in ("sum", "mean"):
            raise ConfigError(f"feature {self.name!r}: pooling must be sum or mean")

    @property
    def source(self) -> str:
        return self.input or self.name


@dataclass(frozen=True)
class EmbeddingCollectionConfig:
    """Features and the tables they read; dims may differ per table.

    Example:
        >>> from recps.embedding import TableConfig
        >>> cfg = EmbeddingCollectionConfig.one_table_per_feature(["C1", "C2"], dim=8)
        >>> cfg.dims
        {'C1': 8, 'C2': 8}
    """

    features: tuple[FeatureSpec, ...]
    tables: tuple[TableConfig, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "tables", tuple(self.tables))
        if not self.features:
            raise ConfigError("an embedding collection needs at least one feature")
        names = [f.name for f in self.features]
        tables = [t.name for t in self.tables]
        for what, seq in (("feature", names), ("table", tables)):
            dup = sorted({n for n in seq if seq.count(n) > 1})
            if dup:
                raise ConfigError(f"{what}(s) {dup} named more than once")
        missing = sorted({f.table for f in self.features} - set(tables))
        if missing:
            raise ConfigError(f"features read undeclared table(s) {missing}; add TableConfigs")

    @classmethod
    def one_table_per_feature(
        cls, features: Sequence[str], dim: int, pooling: Pooling = "sum", **table_kw: Any
    ) -> EmbeddingCollectionConfig:
        """A table named after each feature, all of ``dim`` and ``table_kw`` (optimizer...)."""
        return cls(
            tuple(FeatureSpec(f, f, pooling) for f in features),
            tuple(TableConfig(f, dim=dim, **table_kw) for f in features),
        )

    @property
    def table_configs(self) -> dict[str, TableConfig]:
        return {t.name: t for t in self.tables}

    @property
    def dims(self) -> dict[str, int]:
        """Output width of each feature."""
        t = self.table_configs
        return {f.name: t[f.table].dim for f in self.features}

    @property
    def inputs(self) -> tuple[str, ...]:
        """The KeyedIds keys the collection reads, in first-use order."""
        return tuple(dict.fromkeys(f.source for f in self.features))


def keyed_ids(batch: Batch) -> dict[str, Any]:
    """The ids of a :class:`~recps.worker.data.Batch`: single-id and jagged features together."""
    return {**batch.sparse, **batch.jagged}


# ---------------------------------------------------------------------------------------
# Preparing ids (no network): dedup per table, indices into the unique rows
# ---------------------------------------------------------------------------------------


def _np_ids(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise DtypeError(what, a.dtype, "int64")
    if a.ndim != 1:
        raise ShapeError(f"{what} must be 1-D, got shape {a.shape}")
    return a.astype(np.int64, copy=False)


def _normalize(source: str, x: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(values, offsets or None)`` of one input; offsets are checked."""
    if isinstance(x, JaggedIds):
        values, offsets = x.values, x.offsets
    elif isinstance(x, tuple):
        if len(x) != 2:
            raise ShapeError(f"jagged ids of {source!r} must be (values, offsets)")
        values, offsets = x
    else:
        return _np_ids(x, f"ids of {source!r}"), None
    v = _np_ids(values, f"values of {source!r}")
    o = _np_ids(offsets, f"offsets of {source!r}")
    if len(o) < 1 or o[0] != 0 or o[-1] != len(v) or (len(o) > 1 and np.any(np.diff(o) < 0)):
        raise ShapeError(
            f"offsets of {source!r} must start at 0, never decrease and end at "
            f"len(values)={len(v)}; got {len(o)} offsets ending at {o[-1] if len(o) else None}"
        )
    return v, o


@dataclass
class FusedIds:
    """Single-id features over tables of one dim, pooled by one gather and one reduction.

    The tables' unique rows are concatenated (``tables`` order, table ``i`` at rows
    ``row_offsets[i]:row_offsets[i + 1]``); output ``j`` (``features[j]``) of example ``b``
    is row ``gather[j * B + b]``. Backward sums each row's output gradients as one
    ``embedding_bag`` over ``order`` (output positions grouped by row) cut at ``starts``:
    one op for every table instead of an embedding backward per feature.
    """

    dim: int
    batch_size: int
    tables: tuple[str, ...]
    row_offsets: tuple[int, ...]  # len(tables) + 1
    features: tuple[str, ...]
    table_slots: tuple[tuple[int, ...], ...]  # per table: indices into features reading it
    gather: np.ndarray  # int64 [len(features) * B]
    order: np.ndarray  # int64 [len(features) * B]
    starts: np.ndarray  # int64 [row_offsets[-1]]


@dataclass
class PreparedIds:
    """Ids of one step, deduplicated per table; made by ``prepare``, no network involved."""

    batch_size: int
    ids: dict[str, np.ndarray]  # table -> sorted unique ids
    # feature -> (table, positions into ids[table] [N], offsets [B + 1] or None)
    index: dict[str, tuple[str, np.ndarray, np.ndarray | None]]
    # Tables read only by single-id features, grouped by dim (see FusedIds); the module
    # pools their features through these, ``index`` stays valid for every feature.
    fused: list[FusedIds] = field(default_factory=list)


def _dedup(cat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What ``np.unique(cat, return_inverse=True)`` computes (same cost), plus the sort it
    throws away: (unique ids, inverse, positions sorted by id, start of each id's run)."""
    order = np.argsort(cat)
    s = cat[order]
    first = np.empty(len(s), bool)
    if len(s):
        first[0] = True
        np.not_equal(s[1:], s[:-1], out=first[1:])
    inv = np.empty(len(cat), np.int64)
    inv[order] = np.cumsum(first) - 1
    return s[first], inv, order, np.flatnonzero(first)


def prepare_ids(
    config: EmbeddingCollectionConfig, ids: KeyedIds, *, fuse: bool = True
) -> PreparedIds:
    """Dedup the ids of every table across the features that read it; ``fuse=False`` skips
    building :class:`FusedIds` (for callers that pool table by table).

    Example:
        >>> cfg = EmbeddingCollectionConfig(
        ...     (FeatureSpec("a", "t"), FeatureSpec("b", "t")), (TableConfig("t", dim=2),))
        >>> p = prepare_ids(cfg, {"a": np.array([5, 3]), "b": np.array([3, 3])})
        >>> p.ids["t"].tolist(), p.index["b"][1].tolist()
        ([3, 5], [0, 0])
    """
    inputs: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    batch: int | None = None
    for src in config.inputs:
        if src not in ids:
            raise InvalidArgumentError(f"ids lack input {src!r}; got keys {sorted(ids)}")
        v, o = inputs[src] = _normalize(src, ids[src])
        b = len(v) if o is None else len(o) - 1
        if batch is None:
            batch = b
        elif b != batch:
            raise ShapeError(f"input {src!r} has {b} examples, an earlier one {batch}")
    assert batch is not None
    by_table: dict[str, list[FeatureSpec]] = {}
    for f in config.features:
        by_table.setdefault(f.table, []).append(f)
    uniq: dict[str, np.ndarray] = {}
    index: dict[str, tuple[str, np.ndarray, np.ndarray | None]] = {}
    runs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for table, feats in by_table.items():
        values = [inputs[f.source][0] for f in feats]
        cat = values[0] if len(values) == 1 else np.concatenate(values)
        uniq[table], inv, order, starts = _dedup(cat)
        runs[table] = (order, starts)
        start = 0
        for f, v in zip(feats, values):
            index[f.name] = (table, inv[start : start + len(v)], inputs[f.source][1])
            start += len(v)
    fused = _fuse(config, by_table, uniq, index, runs, batch) if fuse and batch else []
    return PreparedIds(batch, uniq, index, fused)


def _fuse(
    config: EmbeddingCollectionConfig,
    by_table: dict[str, list[FeatureSpec]],
    uniq: dict[str, np.ndarray],
    index: dict[str, tuple[str, np.ndarray, np.ndarray | None]],
    runs: dict[str, tuple[np.ndarray, np.ndarray]],
    batch: int,
) -> list[FusedIds]:
    """One :class:`FusedIds` per dim over the tables that only single-id features read."""
    dims = {t.name: t.dim for t in config.tables}
    tables_of: dict[int, list[str]] = {}
    for t, feats in by_table.items():
        if all(index[f.name][2] is None for f in feats):
            tables_of.setdefault(dims[t], []).append(t)
    out = []
    for dim, tables in tables_of.items():
        chosen = set(tables)
        feats = [f.name for f in config.features if f.table in chosen]
        slot = {f: j for j, f in enumerate(feats)}
        offsets = np.cumsum([0, *(len(uniq[t]) for t in tables)]).tolist()
        gather = np.empty(len(feats) * batch, np.int64)
        orders, starts, table_slots = [], [], []
        done = 0  # output positions of the tables before this one
        for i, t in enumerate(tables):
            slots = np.array([slot[f.name] for f in by_table[t]], np.int64)
            for f, j in zip(by_table[t], slots.tolist()):
                np.add(index[f.name][1], offsets[i], out=gather[j * batch : (j + 1) * batch])
            order, st = runs[t]
            # Position c of the table's concatenated ids is example c % B of its feature
            # c // B, which is output slots[c // B].
            if len(slots) == 1:
                orders.append(order + int(slots[0]) * batch)
            else:
                orders.append(slots[order // batch] * batch + order % batch)
            starts.append(st + done)
            done += len(order)
            table_slots.append(tuple(slots.tolist()))
        out.append(
            FusedIds(
                dim=dim,
                batch_size=batch,
                tables=tuple(tables),
                row_offsets=tuple(offsets),
                features=tuple(feats),
                table_slots=tuple(table_slots),
                gather=gather,
                order=np.concatenate(orders),
                starts=np.concatenate(starts),
            )
        )
    return out


# ---------------------------------------------------------------------------------------
# Pulled rows and the backward hook
# ---------------------------------------------------------------------------------------


@dataclass
class PulledBatch:
    """Rows of one step on the device, ready for ``forward``: what a prefetcher hands over.

    ``on_grads(step, {table: (ids, grads)})`` is called once by backward; ``ready`` (CUDA) is
    the event that marks the end of the host-to-device copies.
    """

    step: int
    batch_size: int
    ids: dict[str, np.ndarray]
    rows: dict[str, torch.Tensor]  # table -> [n_unique, dim], no grad
    index: dict[str, tuple[str, torch.Tensor, torch.Tensor | None]]
    on_grads: GradSink
    ready: Any = None  # torch.cuda.Event or None
    keep: list[Any] = field(default_factory=list)  # pinned host buffers of in-flight copies
    # Fused single-id groups (FusedIds on the device); rows[t] of their tables are views.
    fused: list[PulledGroup] = field(default_factory=list)

    def __len__(self) -> int:
        return self.batch_size


@dataclass
class PulledGroup:
    """A :class:`FusedIds` on the device: the concatenated rows and the index tensors."""

    ids: FusedIds
    rows: torch.Tensor  # [row_offsets[-1], dim], the tables' unique rows back to back
    gather: torch.Tensor
    order: torch.Tensor
    starts: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.rows, self.gather, self.order, self.starts)


class _PushOnBackward(torch.autograd.Function):
    """Identity on the unique-row tensors; its backward hands all their grads to ``sink``.

    One node for all tables, so one step makes one push. Rows whose output got no gradient
    (a feature the loss ignores) are not pushed. The grads are not accumulated anywhere.
    """

    @staticmethod
    def forward(ctx: Any, sink: Callable[[tuple[Any, ...]], None], *rows: torch.Tensor) -> Any:
        ctx.sink = sink
        ctx.set_materialize_grads(False)
        return tuple(r.view_as(r) for r in rows)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        ctx.sink(grads)
        return (None, *(None for _ in grads))


class _GatherRows(torch.autograd.Function):
    """Forward: the outputs of a fused group (``rows[gather]``, one ``[B, dim]`` tensor per
    feature). Backward: every row's gradient summed by one ``embedding_bag`` over the
    output positions grouped by row (``order`` cut at ``starts``), which is much cheaper
    than an embedding backward per feature (per-index axpy calls).

    Tables none of whose features got a gradient are recorded in ``idle`` (the push skips
    them, as it skips an unfused table without gradient).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, rows: torch.Tensor, group: PulledGroup, idle: set[str]
    ) -> Any:
        ctx.group, ctx.idle = group, idle
        ctx.set_materialize_grads(False)
        b = group.ids.batch_size
        g = group.gather
        # Separate outputs (not views of one buffer): callers may modify them in place.
        return tuple(
            rows.index_select(0, g[j * b : (j + 1) * b]) for j in range(len(group.ids.features))
        )

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        group: PulledGroup = ctx.group
        fused = group.ids
        have = [g is not None for g in grads]
        ctx.idle.clear()
        ctx.idle.update(
            t
            for t, slots in zip(fused.tables, fused.table_slots)
            if not any(have[j] for j in slots)
        )
        present = [g for g in grads if g is not None]
        if not present:
            return None, None, None
        zero = (
            present[0].new_zeros((fused.batch_size, fused.dim))
            if len(present) < len(grads)
            else None
        )
        flat = torch.cat([g if g is not None else zero for g in grads])
        rows = F.embedding_bag(group.order, flat, group.starts, mode="sum")
        return rows, None, None


def _to_device(a: np.ndarray, device: torch.device, keep: list[Any]) -> torch.Tensor:
    t = torch.from_numpy(a)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
        keep.append(t)
        return t.to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------


@dataclass
class EmbeddingStats:
    """Time the calling threads spent in the client (seconds), for benchmarks."""

    lookups: int = 0
    lookup_s: float = 0.0
    pushes: int = 0
    push_s: float = 0.0
    rows_pulled: int = 0
    rows_pushed: int = 0


class ShardedEmbeddingBagCollection(torch.nn.Module):
    """Pooled embeddings over a sharded parameter server; see the module docstring.

    ``create_tables`` creates every table on the servers (``if_not_exists``: a table that
    exists with another config raises ``TableExistsError``). The module has no parameters;
    ``.to(device)`` decides where rows land.

    Example:
        >>> from recps.worker.reference import LocalRowClient
        >>> cfg = EmbeddingCollectionConfig.one_table_per_feature(["C1"], dim=3)
        >>> ebc = ShardedEmbeddingBagCollection(cfg, LocalRowClient(cfg.tables))
        >>> pulled = ebc.pull(ebc.prepare({"C1": np.array([1, 1, 2])}))
        >>> ebc(pulled)["C1"].shape
        torch.Size([3, 3])
    """

    def __init__(
        self,
        config: EmbeddingCollectionConfig,
        client: RowClient,
        *,
        create_tables: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.client = client
        self.stats = EmbeddingStats()
        self._stats_lock = threading.Lock()
        self._dims = {t.name: t.dim for t in config.tables}
        self._steps = 0
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        if create_tables:
            create = getattr(client, "create_table", None)
            if create is not None:
                for t in config.tables:
                    create(t, if_not_exists=True)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dims(self) -> dict[str, int]:
        return self.config.dims

    # ---- fetching --------------------------------------------------------------------

    def prepare(self, ids: KeyedIds) -> PreparedIds:
        """Dedup and index the ids of one step (CPU only, no network)."""
        return prepare_ids(self.config, ids)

    def pull(
        self,
        prepared: PreparedIds,
        *,
        step: int | None = None,
        on_grads: GradSink | None = None,
        stream: Any = None,
        create_missing: bool = True,
    ) -> PulledBatch:
        """One lookup for every table, then the rows and indices onto the device.

        ``on_grads`` replaces the synchronous push; ``stream`` (CUDA) is the stream that
        carries the copies (a prefetch thread passes its own). ``create_missing=False``
        (evaluation) reads initial vectors of unknown ids without storing rows for them.
        """
        t0 = time.perf_counter()
        request = {t: ids for t, ids in prepared.ids.items() if len(ids)}
        got = self.client.lookup(request, create_missing=create_missing) if request else {}
        lookup_s = time.perf_counter() - t0
        rows_np: dict[str, np.ndarray] = {}
        for t, ids in prepared.ids.items():
            dim = self._dims[t]
            r = got.get(t)
            if r is None:
                r = np.zeros((0, dim), np.float32)
            if r.ndim != 2 or r.shape[1] != dim:
                raise DimensionMismatchError(
                    f"rows of table {t!r} from the server", dim, r.shape[-1]
                )
            if len(r) != len(ids):
                raise ShapeError(f"table {t!r}: asked for {len(ids)} rows, got {len(r)}")
            rows_np[t] = r
        device = self.device
        keep: list[Any] = []
        ready = None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            rows: dict[str, torch.Tensor] = {}
            groups = []
            for fz in prepared.fused:
                buf = np.empty((fz.row_offsets[-1], fz.dim), np.float32)
                for t, a, b in zip(fz.tables, fz.row_offsets, fz.row_offsets[1:]):
                    buf[a:b] = rows_np[t]
                g = PulledGroup(
                    fz,
                    _to_device(buf, device, keep),
                    _to_device(fz.gather, device, keep),
                    _to_device(fz.order, device, keep),
                    _to_device(fz.starts, device, keep),
                )
                groups.append(g)
                for t, a, b in zip(fz.tables, fz.row_offsets, fz.row_offsets[1:]):
                    rows[t] = g.rows[a:b]
            for t, r in rows_np.items():
                if t not in rows:
                    rows[t] = _to_device(r, device, keep)
            rows = {t: rows[t] for t in rows_np}  # prepared.ids order
            index = {
                name: (
                    t,
                    _to_device(idx, device, keep),
                    None if off is None else _to_device(off, device, keep),
                )
                for name, (t, idx, off) in prepared.index.items()
            }
            if device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
        with self._stats_lock:
            self.stats.lookups += 1
            self.stats.lookup_s += lookup_s
            self.stats.rows_pulled += sum(len(r) for r in rows_np.values())
            if step is None:
                step = self._steps
                self._steps += 1
        return PulledBatch(
            step=step,
            batch_size=prepared.batch_size,
            ids=prepared.ids,
            rows=rows,
            index=index,
            on_grads=on_grads or self._push_now,
            ready=ready,
            keep=keep,
            fused=groups,
        )

    def _push_now(self, step: int, grads: GradPayload) -> None:
        """The default sink: push in the backward thread and wait for the ack."""
        payload = {t: (ids, g.detach().cpu().numpy()) for t, (ids, g) in grads.items()}
        self.push(payload)

    def push(self, grads: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> int:
        """``client.push`` with timing; what the pipeline's pusher calls too."""
        t0 = time.perf_counter()
        n = self.client.push(grads)
        dt = time.perf_counter() - t0
        with self._stats_lock:
            self.stats.pushes += 1
            self.stats.push_s += dt
            self.stats.rows_pushed += sum(len(i) for i, _ in grads.values())
        return n

    # ---- forward ---------------------------------------------------------------------

    def forward(self, ids: KeyedIds | PulledBatch) -> dict[str, torch.Tensor]:
        """Pooled ``[B, dim]`` per feature; ``ids`` may be raw ids or a :class:`PulledBatch`."""
        if isinstance(ids, PulledBatch):
            pulled = ids
        else:
            training = self.training and torch.is_grad_enabled()
            pulled = self.pull(self.prepare(ids), create_missing=training)
        if pulled.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(pulled.ready)
            for t in (
                *pulled.rows.values(),
                *(x for v in pulled.index.values() for x in v[1:]),
                *(x for g in pulled.fused for x in g.tensors()),
            ):
                if isinstance(t, torch.Tensor):
                    t.record_stream(current)
        groups = pulled.fused
        in_groups = {t for g in groups for t in g.ids.tables}
        tables = [t for t in pulled.rows if t not in in_groups]
        grad = torch.is_grad_enabled()
        leaves = [g.rows.requires_grad_(grad) for g in groups]
        leaves += [pulled.rows[t].requires_grad_(grad) for t in tables]
        idle: list[set[str]] = [set() for _ in groups]  # filled by _GatherRows.backward
        if grad:

            def sink(grads: tuple[torch.Tensor | None, ...]) -> None:
                got: dict[str, torch.Tensor] = {}
                for g, gr, skip in zip(groups, grads, idle):
                    if gr is not None:
                        f = g.ids
                        for t, a, b in zip(f.tables, f.row_offsets, f.row_offsets[1:]):
                            if t not in skip:
                                got[t] = gr[a:b]
                got.update((t, gr) for t, gr in zip(tables, grads[len(groups) :]) if gr is not None)
                payload = {
                    t: (ids, got[t]) for t, ids in pulled.ids.items() if t in got and len(ids)
                }
                if payload:
                    pulled.on_grads(pulled.step, payload)

            outs = _PushOnBackward.apply(sink, *leaves)
        else:
            outs = tuple(leaves)
        pooled: dict[str, torch.Tensor] = {}
        for g, x, skip in zip(groups, outs, idle):
            pooled.update(zip(g.ids.features, _GatherRows.apply(x, g, skip)))
        rest = dict(zip(tables, outs[len(groups) :]))
        for f in self.config.features:
            if f.name not in pooled:
                pooled[f.name] = _pool_one(f, rest, pulled.index, pulled.batch_size, False)
        return {f.name: pooled[f.name] for f in self.config.features}


def pool(
    config: EmbeddingCollectionConfig,
    rows: Mapping[str, torch.Tensor],
    index: Mapping[str, tuple[str, torch.Tensor, torch.Tensor | None]],
    batch_size: int,
    sparse: bool = False,
) -> dict[str, torch.Tensor]:
    """Pool each feature from its table's row tensor (unique rows, or a full table).

    ``sparse`` asks for sparse gradients of ``rows`` (a full ``EmbeddingBag`` table).

    Example:
        >>> cfg = EmbeddingCollectionConfig(
        ...     (FeatureSpec("f", "t", "mean"),), (TableConfig("t", dim=1),))
        >>> w = torch.tensor([[1.0], [3.0]])
        >>> idx = {"f": ("t", torch.tensor([0, 1, 1]), torch.tensor([0, 2, 2, 3]))}
        >>> pool(cfg, {"t": w}, idx, 3)["f"].flatten().tolist()
        [2.0, 0.0, 3.0]
    """
    return {f.name: _pool_one(f, rows, index, batch_size, sparse) for f in config.features}


def _pool_one(
    f: FeatureSpec,
    rows: Mapping[str, torch.Tensor],
    index: Mapping[str, tuple[str, torch.Tensor, torch.Tensor | None]],
    batch_size: int,
    sparse: bool,
) -> torch.Tensor:
    table, idx, offsets = index[f.name]
    w = rows[table]
    if offsets is None:
        out = F.embedding(idx, w, sparse=sparse)
    else:
        out = F.embedding_bag(
            idx, w, offsets, mode=f.pooling, sparse=sparse, include_last_offset=True
        )
    assert out.shape[0] == batch_size
    return out
