"""Online ranking: raw features of one user context and N candidates in, N scores out.

A :class:`Ranker` holds one exported model version (``recps export``): the TorchScript
dense tower and the manifest. For a request it

1. builds N rows, each the context's features overlaid with one candidate's (a candidate's
   value wins over the context's for the same feature);
2. hashes categorical values exactly as training did (:mod:`recps.embedding.feature_ids`,
   the same scheme the manifest names) and applies training's dense transform;
3. looks the ids up, deduplicated per table over all N rows, through a ``lookup`` callable
   (a :class:`~recps.serving.client.ServingClient` over serving replicas, or anything with
   the same signature);
4. pools each feature (sum/mean; single-id or list features) with numpy and runs the tower.

The context's ids are the same in every row, so deduplication sends them once.

Example:
    >>> ranker = Ranker(RankerConfig("/models"), client.lookup)  # doctest: +SKIP
    >>> ranker.score({"user": "u1", "I1": 3}, [{"item": "a"}, {"item": "b"}])  # doctest: +SKIP
    array([0.31, 0.12], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recps.embedding.errors import ConfigError, InvalidArgumentError
from recps.embedding.feature_ids import HASH_SCHEME, dense_transform, hash_column
from recps.serving.model_format import (
    TOWER_FILE,
    ModelManifest,
    ModelNotFoundError,
    latest_version,
    version_dir,
)

LookupFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class RankerConfig:
    """What a :class:`Ranker` serves.

    ``model`` is a version directory, or a model root (its newest complete version).
    ``device`` "auto" runs the tower on CUDA when present, else CPU. ``threads`` caps torch's
    intra-op threads (0 = torch's default); small towers on many concurrent requests do
    better with 1.
    """

    model: str
    device: str = "auto"
    max_candidates: int = 10_000
    threads: int = 1
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        if self.max_candidates < 1:
            raise ConfigError("max_candidates must be >= 1")
        if self.threads < 0:
            raise ConfigError("threads must be >= 0")


def resolve_version_dir(model: str | Path) -> Path:
    """A version directory as given, or a model root's newest complete version."""
    p = Path(model)
    if (p / "manifest.json").is_file():
        return p
    v = latest_version(p)
    if v is None:
        raise ModelNotFoundError(p)
    return version_dir(p, v)


class Ranker:
    """Scores candidates with one model version; thread-safe (the tower runs concurrently)."""

    def __init__(self, config: RankerConfig, lookup: LookupFn) -> None:
        import torch  # serving processes that only hold embeddings never load torch

        self.config = config
        self._lookup = lookup
        vdir = resolve_version_dir(config.model)
        self.manifest = ModelManifest.load(vdir, verify=config.verify_checksums)
        scheme = self.manifest.hashing.get("scheme", HASH_SCHEME)
        if scheme != HASH_SCHEME:
            raise ConfigError(
                f"model {vdir} hashes features with {scheme!r}; this recps hashes with "
                f"{HASH_SCHEME!r}"
            )
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
        self._torch = torch
        self.tower = torch.jit.load(str(vdir / TOWER_FILE), map_location=self.device)
        self.tower.eval()
        self.version = self.manifest.version
        self._dims = {name: t.dim for name, t in self.manifest.tables.items()}

    # ---- features ------------------------------------------------------------------------

    def featurize(
        self, context: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray | None]]]:
        """``(dense float32 [N, n_dense], {feature: (ids, offsets or None)})``."""
        n = len(candidates)
        if n == 0:
            raise InvalidArgumentError("a request needs at least one candidate")
        if n > self.config.max_candidates:
            raise InvalidArgumentError(
                f"{n} candidates; this ranker takes at most {self.config.max_candidates}"
            )

        def column(name: str) -> list[Any]:
            base = context.get(name)
            return [c.get(name, base) for c in candidates]

        m = self.manifest
        dense = np.zeros((n, len(m.dense_features)), dtype=np.float32)
        for j, name in enumerate(m.dense_features):
            vals = column(name)
            try:
                x = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise InvalidArgumentError(f"dense feature {name!r}: {e}") from None
            dense[:, j] = dense_transform(x)
        ids: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for f in m.features:
            vals = column(f.input)
            if f.multi:
                lists = [[] if v is None else list(v) if _is_list(v) else [v] for v in vals]
                offsets = np.zeros(n + 1, dtype=np.int64)
                np.cumsum([len(x) for x in lists], out=offsets[1:])
                flat = [v for x in lists for v in x]
                ids[f.name] = (self._hash(flat, f.input), offsets)
            else:
                if any(_is_list(v) for v in vals):
                    raise InvalidArgumentError(f"feature {f.input!r} takes one value, got a list")
                ids[f.name] = (self._hash(vals, f.input), None)
        return dense, ids

    @staticmethod
    def _hash(values: list[Any], feature: str) -> np.ndarray:
        if not values:
            return np.zeros(0, dtype=np.int64)
        try:
            arr = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed ints and strings: hex strings and ints hash alike; anything else by text.
            arr = pa.array([None if v is None else str(v) for v in values])
        if pa.types.is_floating(arr.type):
            arr = arr.cast(pa.int64())  # 3.0 from JSON is the integer 3
        return hash_column(arr, feature)

    # ---- embeddings + tower --------------------------------------------------------------

    def pooled(
        self, ids: Mapping[str, tuple[np.ndarray, np.ndarray | None]], n: int
    ) -> list[np.ndarray]:
        """One float32 ``[N, dim]`` per manifest feature, from one deduplicated lookup."""
        m = self.manifest
        per_table: dict[str, list[np.ndarray]] = {}
        for f in m.features:
            per_table.setdefault(f.table, []).append(ids[f.name][0])
        uniq, inverse = {}, {}
        for table, parts in per_table.items():
            u, inv = np.unique(np.concatenate(parts), return_inverse=True)
            uniq[table], inverse[table] = u, inv
        rows = self._lookup(uniq)
        out, cursor = [], dict.fromkeys(per_table, 0)
        for f in m.features:
            vals, offsets = ids[f.name]
            start = cursor[f.table]
            cursor[f.table] += len(vals)
            table_rows = np.asarray(rows[f.table], dtype=np.float32)
            r = table_rows[inverse[f.table][start : start + len(vals)]]
            if offsets is None:
                out.append(r)
                continue
            pooled = np.zeros((n, self._dims[f.table]), dtype=np.float32)
            counts = np.diff(offsets)
            nonempty = counts > 0
            if len(vals):
                sums = np.add.reduceat(r, offsets[:-1][nonempty], axis=0)
                pooled[nonempty] = sums
            if f.pooling == "mean":
                pooled[nonempty] /= counts[nonempty, None]
            out.append(pooled)
        return out

    def score(
        self, context: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> np.ndarray:
        """Click probabilities, float32 ``[N]``, in the candidates' order."""
        dense, ids = self.featurize(context, candidates)
        pooled = self.pooled(ids, len(candidates))
        return self.score_arrays(dense, pooled)

    def score_arrays(self, dense: np.ndarray, pooled: Sequence[np.ndarray]) -> np.ndarray:
        """The tower on prepared inputs: sigmoid(tower(dense, pooled))."""
        torch = self._torch
        with torch.inference_mode():
            d = torch.from_numpy(np.ascontiguousarray(dense)).to(self.device)
            p = [torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for x in pooled]
            logits = self.tower(d, p)
            return torch.sigmoid(logits).float().cpu().numpy().reshape(-1)


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple, np.ndarray))
