"""In-process references for the sharded embedding path: the baselines it is tested against.

* :class:`LocalEmbeddingBagCollection` - the plain module: one ``torch.nn.EmbeddingBag``
  (``sparse=True``) per table, same interface as
  :class:`~recps.worker.embedding.ShardedEmbeddingBagCollection`, trained in one process.
* :class:`LocalRowClient` - ``PSClient``'s ``lookup``/``push`` over one ``MemoryStore`` per
  table, so the *sharded* module (and the pipeline) can run without a server.

**Design of the local collection.** Server rows are created lazily by id and ids are 64-bit
hashes, so a table cannot be indexed by id. Each table keeps an exact id -> slot map (no
hashing into buckets, hence no collisions) over a preallocated ``EmbeddingBag`` weight; a slot
is born with the server's deterministic initial vector
(:class:`~recps.embedding.initializers.RowInitializer` of the same ``TableConfig``), so both
start from the same bits. The sparse optimizer is the table's ``OptimizerConfig``, applied in
one of two ways (``LocalCollectionConfig.sparse_update``):

* ``"recps"`` (default): during ``loss.backward()`` a post-accumulate-grad hook coalesces the
  sparse gradient and applies :func:`recps.embedding.optimizers.make_optimizer` to the touched
  rows with per-row state and step counts - exactly what a server shard does, for every
  optimizer (SGD, Adagrad, Adam, FTRL). Like the sharded module, nothing is called by hand.
* ``"torch"``: gradients stay on the weights and :meth:`~LocalEmbeddingBagCollection.
  sparse_optimizer` returns ``torch.optim.SGD`` or ``torch.optim.Adagrad`` with the server's
  hyperparameters (the classic baseline; the unit tests check that it matches ``"recps"``).
  Only SGD and Adagrad without weight decay have sparse torch twins; the capacity is fixed.

Gradients are summed in a different order than on the servers (torch coalesces, the sharded
path sums per unique row), so the two agree to float rounding, not bit for bit. Admission
and expiry are not modeled (every id gets a row at once, rows never expire).

Example:
    >>> from recps.worker.embedding import EmbeddingCollectionConfig
    >>> cfg = EmbeddingCollectionConfig.one_table_per_feature(["C1"], dim=4)
    >>> ebc = LocalEmbeddingBagCollection(cfg)
    >>> out = ebc({"C1": np.array([3, 3, 8])})
    >>> out["C1"].shape
    torch.Size([3, 4])
    >>> out["C1"].sum().backward()  # the Adagrad step is applied here
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from recps.embedding import errors as E
from recps.embedding.config import TableConfig
from recps.embedding.initializers import RowInitializer
from recps.embedding.memory_store import MemoryStore
from recps.embedding.optimizers import make_optimizer
from recps.worker.embedding import (
    EmbeddingCollectionConfig,
    KeyedIds,
    pool,
    prepare_ids,
)

__all__ = ["LocalCollectionConfig", "LocalEmbeddingBagCollection", "LocalRowClient"]


class LocalRowClient:
    """``PSClient``'s data plane in process: one :class:`MemoryStore` per table. Thread-safe.

    Example:
        >>> c = LocalRowClient([TableConfig("t", dim=2)])
        >>> c.push({"t": (np.array([1]), np.ones((1, 2), np.float32))})
        1
        >>> c.lookup({"t": np.array([1, 5])})["t"].shape
        (2, 2)
    """

    def __init__(self, tables: Iterable[TableConfig] = ()) -> None:
        self.stores: dict[str, MemoryStore] = {}
        self._lock = threading.Lock()
        for t in tables:
            self.create_table(t)

    def create_table(self, config: TableConfig, if_not_exists: bool = True) -> None:
        with self._lock:
            old = self.stores.get(config.name)
            if old is not None:
                if if_not_exists and old.config == config:
                    return
                raise E.TableExistsError(config.name)
            self.stores[config.name] = MemoryStore(config)

    def _store(self, table: str) -> MemoryStore:
        try:
            return self.stores[table]
        except KeyError:
            raise E.UnknownTableError(table) from None

    def lookup(
        self, batch: Mapping[str, Any], create_missing: bool = True
    ) -> dict[str, np.ndarray]:
        stores = {t: self._store(t) for t in batch}  # all or nothing, like a server
        return {
            t: stores[t].lookup(np.asarray(ids, dtype=np.int64), create_missing)
            for t, ids in batch.items()
        }

    def push(self, grads: Mapping[str, tuple[Any, Any]], wait_durable: bool = False) -> int:
        stores = {t: self._store(t) for t in grads}
        return sum(
            stores[t].apply_gradients(np.asarray(i, dtype=np.int64), np.asarray(g))
            for t, (i, g) in grads.items()
        )

    def close(self) -> None:
        for s in self.stores.values():
            s.close()


@dataclass(frozen=True)
class LocalCollectionConfig:
    """Knobs of the in-process reference that the sharded module does not have."""

    sparse_update: Literal["recps", "torch"] = "recps"
    # Rows preallocated per table. "recps" doubles it when full; "torch" cannot (the torch
    # optimizer's state has the old shape) and raises CapacityError instead.
    capacity_rows: int = 4096

    def __post_init__(self) -> None:
        if self.sparse_update not in ("recps", "torch"):
            raise E.ConfigError("sparse_update must be 'recps' or 'torch'")
        if self.capacity_rows < 1:
            raise E.ConfigError("capacity_rows must be >= 1")


class _Table:
    """Exact id -> slot map of one table, plus the optimizer state of its slots (numpy)."""

    def __init__(self, config: TableConfig, capacity: int) -> None:
        self.config = config
        self.capacity = capacity
        self.init = RowInitializer(config.name, config.dim, config.initializer)
        self.optimizer = make_optimizer(config.optimizer)
        self.ids = np.zeros(0, np.int64)  # sorted known ids
        self.slot_of = np.zeros(0, np.int64)  # slot of each sorted id
        self.n = 0
        self.state = self.optimizer.init_state(capacity, config.dim)
        self.count = np.zeros(capacity, np.int64)

    def slots(self, uids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slots of sorted unique ``uids``: (slots, new ids, their fresh slots)."""
        pos = np.searchsorted(self.ids, uids)
        hit = pos < len(self.ids)
        hit[hit] = self.ids[pos[hit]] == uids[hit]
        out = np.empty(len(uids), np.int64)
        out[hit] = self.slot_of[pos[hit]]
        new = uids[~hit]
        new_slots = np.arange(self.n, self.n + len(new), dtype=np.int64)
        out[~hit] = new_slots
        if len(new):
            at = pos[~hit]
            self.ids = np.insert(self.ids, at, new)
            self.slot_of = np.insert(self.slot_of, at, new_slots)
            self.n += len(new)
        return out, new, new_slots

    def grow(self, capacity: int) -> None:
        state = self.optimizer.init_state(capacity, self.config.dim)
        state[: self.capacity] = self.state
        count = np.zeros(capacity, np.int64)
        count[: self.capacity] = self.count
        self.state, self.count, self.capacity = state, count, capacity

    def initial(self, ids: np.ndarray) -> np.ndarray:
        rows = self.init(ids)
        if self.config.dtype == "float16":  # the server stores (and returns) rounded rows
            rows = rows.astype(np.float16).astype(np.float32)
        return rows

    def apply(self, weight: torch.Tensor, slots: np.ndarray, grads: np.ndarray) -> None:
        """One optimizer step on ``slots`` (unique) of ``weight``, as ``MemoryStore._apply``."""
        idx = torch.from_numpy(slots).to(weight.device)
        w = weight.index_select(0, idx).cpu().numpy().copy()
        st = self.state[slots]
        steps = self.count[slots] + 1
        self.optimizer.update(w, st, np.ascontiguousarray(grads, np.float32), steps)
        if self.config.dtype == "float16":
            w = w.astype(np.float16).astype(np.float32)
        weight.index_copy_(0, idx, torch.from_numpy(w).to(weight.device))
        self.state[slots] = st
        self.count[slots] = steps


def _module_key(table: str) -> str:
    return table.replace(".", "__dot__")  # module names may not contain "."


class LocalEmbeddingBagCollection(torch.nn.Module):
    """The in-process reference; see the module docstring for the design.

    ``config`` is the same :class:`EmbeddingCollectionConfig` the sharded module takes.

    Example:
        >>> from recps.embedding import OptimizerConfig
        >>> from recps.worker.embedding import EmbeddingCollectionConfig
        >>> cfg = EmbeddingCollectionConfig.one_table_per_feature(
        ...     ["C1"], dim=2, optimizer=OptimizerConfig("sgd", lr=0.1))
        >>> ebc = LocalEmbeddingBagCollection(cfg, LocalCollectionConfig("torch", 16))
        >>> opt = ebc.sparse_optimizer()
        >>> ebc({"C1": np.array([5])})["C1"].sum().backward(); opt.step()
    """

    def __init__(
        self,
        config: EmbeddingCollectionConfig,
        local: LocalCollectionConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.local = local or LocalCollectionConfig()
        self._tables = {t.name: _Table(t, self.local.capacity_rows) for t in config.tables}
        self.bags = torch.nn.ModuleDict()
        for t in config.tables:
            # An explicit weight: no draw from torch's global RNG, so a model built after the
            # collection gets the same dense init as over the sharded one (it has no params).
            bag = torch.nn.EmbeddingBag(
                self.local.capacity_rows,
                t.dim,
                mode="sum",
                sparse=True,
                _weight=torch.zeros(self.local.capacity_rows, t.dim),
            )
            self.bags[_module_key(t.name)] = bag
            if self.local.sparse_update == "recps":
                bag.weight.register_post_accumulate_grad_hook(self._hook(t.name))

    def _set_weight(self, table: str, data: torch.Tensor) -> torch.nn.Parameter:
        bag = self.bags[_module_key(table)]
        bag.weight = torch.nn.Parameter(data)
        bag.num_embeddings = data.shape[0]
        if self.local.sparse_update == "recps":
            bag.weight.register_post_accumulate_grad_hook(self._hook(table))
        return bag.weight

    @property
    def dims(self) -> dict[str, int]:
        return self.config.dims

    def weight(self, table: str) -> torch.Tensor:
        return self.bags[_module_key(table)].weight

    def rows(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Current rows of ``ids`` (initial vectors for unseen ids), like a server lookup."""
        ids = np.asarray(ids, dtype=np.int64)
        t = self._tables[table]
        out = t.initial(ids)
        pos = np.searchsorted(t.ids, ids)
        hit = pos < len(t.ids)
        hit[hit] = t.ids[pos[hit]] == ids[hit]
        if hit.any():
            slots = torch.from_numpy(t.slot_of[pos[hit]])
            w = self.weight(table).detach()
            out[hit] = w.index_select(0, slots.to(w.device)).cpu().numpy()
        return out

    def _slots(self, table: str, uids: np.ndarray) -> np.ndarray:
        t = self._tables[table]
        slots, new, new_slots = t.slots(uids)
        if not len(new):
            return slots
        weight = self.weight(table)
        if t.n > t.capacity:
            if self.local.sparse_update == "torch":
                raise E.CapacityError(
                    f"table {table!r} needs {t.n} rows, capacity_rows is {t.capacity}; "
                    "raise LocalCollectionConfig.capacity_rows (torch optimizers cannot grow)"
                )
            cap = max(t.n, 2 * t.capacity)
            with torch.no_grad():
                bigger = weight.new_zeros((cap, weight.shape[1]))
                bigger[: t.capacity] = weight
            # A new Parameter, not ``weight.data = bigger``: autograd caches the leaf's
            # gradient accumulator with the old shape, and backward would then reject the
            # grown gradient. No torch optimizer holds this weight in "recps" mode.
            weight = self._set_weight(table, bigger)
            t.grow(cap)
        with torch.no_grad():
            idx = torch.from_numpy(new_slots).to(weight.device)
            weight.index_copy_(0, idx, torch.from_numpy(t.initial(new)).to(weight.device))
        return slots

    def forward(self, ids: KeyedIds) -> dict[str, torch.Tensor]:
        """Pooled ``[B, dim]`` per feature, on the weights' device."""
        prepared = prepare_ids(self.config, ids, fuse=False)
        slots = {t: self._slots(t, u) for t, u in prepared.ids.items()}
        weights = {t: self.weight(t) for t in prepared.ids}
        device = next(iter(weights.values())).device
        index = {}
        for name, (t, inv, off) in prepared.index.items():
            idx = torch.from_numpy(slots[t][inv]).to(device)
            index[name] = (t, idx, None if off is None else torch.from_numpy(off).to(device))
        return pool(self.config, weights, index, prepared.batch_size, sparse=True)

    def _hook(self, table: str) -> Any:
        def hook(param: torch.Tensor) -> None:
            g = param.grad
            param.grad = None
            if g is None:
                return
            if not g.is_sparse:
                g = g.to_sparse(1)
            g = g.coalesce()
            slots = g.indices()[0].cpu().numpy()
            if len(slots):
                with torch.no_grad():
                    self._tables[table].apply(param.data, slots, g.values().cpu().numpy())

        return hook

    def sparse_optimizer(self) -> torch.optim.Optimizer:
        """``sparse_update="torch"``: a torch optimizer equal to the servers' (SGD or Adagrad).

        One param group per table, each with its table's hyperparameters.
        """
        if self.local.sparse_update != "torch":
            raise E.ConfigError(
                "sparse_optimizer() needs LocalCollectionConfig(sparse_update='torch'); "
                "with 'recps' the backward pass applies the updates itself"
            )
        kinds = {t.optimizer.kind for t in self.config.tables}
        if len(kinds) != 1 or kinds & {"adam", "ftrl"}:
            raise E.ConfigError(
                f"torch sparse twins exist for one of sgd/adagrad at a time, got {sorted(kinds)};"
                " use sparse_update='recps'"
            )
        groups = []
        for t in self.config.tables:
            o = t.optimizer
            if o.weight_decay:
                raise E.ConfigError(
                    f"table {t.name!r}: torch sparse optimizers reject weight_decay; "
                    "use sparse_update='recps'"
                )
            g: dict[str, Any] = {"params": [self.weight(t.name)], "lr": o.lr}
            if o.kind == "adagrad":
                g.update(eps=o.eps, initial_accumulator_value=o.initial_accumulator)
            groups.append(g)
        if kinds == {"sgd"}:
            return torch.optim.SGD(groups, lr=groups[0]["lr"])
        opt = torch.optim.Adagrad(groups, lr=groups[0]["lr"])
        # torch fills every "sum" with the constructor's initial_accumulator_value, not the
        # group's: set each table's own starting value.
        for g in opt.param_groups:
            for p in g["params"]:
                opt.state[p]["sum"].fill_(g["initial_accumulator_value"])
        return opt
