"""DLRM, DeepFM and Wide&Deep as plain torch modules over any embedding collection.

A model owns its collection as the ``embeddings`` submodule and only asks it for
``dims`` and ``forward(ids) -> {feature: [B, dim]}``, so the same class trains over the
sharded :class:`~recps.worker.embedding.ShardedEmbeddingBagCollection` or the in-process
:class:`~recps.worker.reference.LocalEmbeddingBagCollection`. ``model(dense, ids)`` returns
one logit per example; ``model.forward_pooled(dense, pooled)`` is the dense part alone.

Feature roles come from the collection: features of dim > 1 are embeddings, features of dim 1
are the linear ("wide", first-order) weights of DeepFM and Wide&Deep; a config may name them
explicitly instead. :func:`embedding_config` builds the matching collection config.

Example:
    >>> from recps.worker.reference import LocalEmbeddingBagCollection
    >>> cfg = embedding_config("deepfm", ["C1", "C2"], dim=4)
    >>> model = build_model("deepfm", LocalEmbeddingBagCollection(cfg), num_dense=3)
    >>> ids = {"C1": np.array([1, 2]), "C2": np.array([5, 5])}
    >>> model(torch.zeros(2, 3), ids).shape
    torch.Size([2])
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from recps.embedding.config import InitializerConfig, OptimizerConfig, TableConfig
from recps.embedding.errors import ConfigError, DimensionMismatchError
from recps.worker.embedding import EmbeddingCollectionConfig, FeatureSpec, Pooling

__all__ = [
    "DLRM",
    "MODELS",
    "DLRMConfig",
    "DeepFM",
    "DeepFMConfig",
    "WideDeep",
    "WideDeepConfig",
    "build_model",
    "embedding_config",
    "predict",
]

WIDE_SUFFIX = "_wide"  # dim-1 table and feature of a sparse input, for the linear terms


def _check_widths(name: str, widths: Sequence[int], allow_empty: bool = True) -> None:
    if not allow_empty and not widths:
        raise ConfigError(f"{name} needs at least one layer")
    if any(int(w) < 1 for w in widths):
        raise ConfigError(f"{name} widths must be >= 1, got {tuple(widths)}")


def mlp(widths: Sequence[int], final_relu: bool = True) -> nn.Sequential:
    """Linear layers ``widths[0] -> widths[1] -> ...`` with ReLU in between (and at the end).

    Example:
        >>> mlp([4, 8, 2])(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if final_relu or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _roles(
    dims: Mapping[str, int], deep: Sequence[str], linear: Sequence[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(embedding features, dim-1 linear features), defaulting by dim, checked."""
    deep_t = tuple(deep) or tuple(f for f, d in dims.items() if d > 1)
    lin_t: tuple[str, ...] = ()
    if linear is not None:
        lin_t = tuple(linear) or tuple(f for f, d in dims.items() if d == 1)
    for f in (*deep_t, *lin_t):
        if f not in dims:
            raise ConfigError(f"feature {f!r} is not in the embedding collection {sorted(dims)}")
    for f in lin_t:
        if dims[f] != 1:
            raise DimensionMismatchError(f"linear feature {f!r}", 1, dims[f])
    if not deep_t:
        raise ConfigError("the model needs at least one embedding feature (dim > 1)")
    return deep_t, lin_t


class _Model(nn.Module):
    """Shared plumbing: owns ``embeddings``; ``forward(dense, ids)``."""

    embeddings: nn.Module

    def forward(self, dense: torch.Tensor, ids: Any) -> torch.Tensor:
        """Logits ``[B]`` from dense ``[B, num_dense]`` and anything the collection takes."""
        return self.forward_pooled(dense, self.embeddings(ids))

    def forward_pooled(
        self, dense: torch.Tensor, pooled: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------
# DLRM
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DLRMConfig:
    """DLRM (Naumov et al. 2019) with dot interactions."""

    num_dense: int = 13
    bottom_mlp: tuple[int, ...] = (64, 16)  # its last width must equal the embedding dim
    top_mlp: tuple[int, ...] = (64, 32)  # followed by a linear layer to one logit
    features: tuple[str, ...] = ()  # features in the interaction; () = every one of dim > 1

    def __post_init__(self) -> None:
        if self.num_dense < 1:
            raise ConfigError("DLRM needs num_dense >= 1 (the bottom MLP's input)")
        _check_widths("bottom_mlp", self.bottom_mlp, allow_empty=False)
        _check_widths("top_mlp", self.top_mlp)


class DLRM(_Model):
    """Bottom MLP on dense -> pairwise dots of [bottom, embeddings...] -> top MLP -> logit.

    Every interacting embedding must have the bottom MLP's output width.

    Example:
        >>> from recps.worker.reference import LocalEmbeddingBagCollection
        >>> ebc = LocalEmbeddingBagCollection(embedding_config("dlrm", ["C1", "C2"], dim=8))
        >>> model = DLRM(ebc, DLRMConfig(num_dense=2, bottom_mlp=(8,)))
        >>> model(torch.ones(4, 2), {"C1": np.arange(4), "C2": np.arange(4)}).shape
        torch.Size([4])
    """

    def __init__(self, embeddings: nn.Module, config: DLRMConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or DLRMConfig()
        self.embeddings = embeddings
        dims = embeddings.dims
        self.features, _ = _roles(dims, c.features, None)
        d = c.bottom_mlp[-1]
        for f in self.features:
            if dims[f] != d:
                raise DimensionMismatchError(f"embedding {f!r} (dot interaction)", d, dims[f])
        self.bottom = mlp((c.num_dense, *c.bottom_mlp))
        n = len(self.features) + 1
        li, lj = torch.tril_indices(n, n, offset=-1)
        self.register_buffer("_li", li, persistent=False)
        self.register_buffer("_lj", lj, persistent=False)
        widths = (d + n * (n - 1) // 2, *c.top_mlp)
        self.top = nn.Sequential(mlp(widths), nn.Linear(widths[-1], 1))

    def forward_pooled(
        self, dense: torch.Tensor, pooled: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        x = self.bottom(dense)
        t = torch.stack([x, *(pooled[f] for f in self.features)], dim=1)  # [B, n, d]
        z = torch.bmm(t, t.transpose(1, 2))[:, self._li, self._lj]  # [B, n(n-1)/2]
        return self.top(torch.cat([x, z], dim=1)).squeeze(1)


# ---------------------------------------------------------------------------------------
# Wide & Deep, DeepFM
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WideDeepConfig:
    """Wide & Deep (Cheng et al. 2016): a linear model plus an MLP, logits summed."""

    num_dense: int = 13
    deep_mlp: tuple[int, ...] = (64, 32)  # followed by a linear layer to one logit
    features: tuple[str, ...] = ()  # deep embeddings; () = every feature of dim > 1
    wide_features: tuple[str, ...] = ()  # dim-1 weights; () = every feature of dim 1

    def __post_init__(self) -> None:
        if self.num_dense < 0:
            raise ConfigError("num_dense must be >= 0")
        _check_widths("deep_mlp", self.deep_mlp)


class WideDeep(_Model):
    """``wide(dense) + sum of dim-1 id weights + MLP([dense, embeddings])``.

    The wide part is linear over the dense features and over the sparse ids (each id's
    weight is a row of a dim-1 table, so the servers train it like any embedding).

    Example:
        >>> from recps.worker.reference import LocalEmbeddingBagCollection
        >>> ebc = LocalEmbeddingBagCollection(embedding_config("wide_deep", ["C1"], dim=4))
        >>> WideDeep(ebc, WideDeepConfig(num_dense=1))(torch.ones(2, 1), {"C1": [1, 2]}).shape
        torch.Size([2])
    """

    def __init__(self, embeddings: nn.Module, config: WideDeepConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or WideDeepConfig()
        self.embeddings = embeddings
        dims = embeddings.dims
        self.features, self.linear_features = _roles(dims, c.features, c.wide_features)
        self.dense_linear = nn.Linear(c.num_dense, 1) if c.num_dense else None
        self.bias = nn.Parameter(torch.zeros(()))
        widths = (c.num_dense + sum(dims[f] for f in self.features), *c.deep_mlp)
        self.deep = nn.Sequential(mlp(widths), nn.Linear(widths[-1], 1))

    def _linear(self, dense: torch.Tensor, pooled: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = self.bias.expand(dense.shape[0])
        if self.dense_linear is not None:
            out = out + self.dense_linear(dense).squeeze(1)
        for f in self.linear_features:
            out = out + pooled[f].squeeze(1)
        return out

    def _deep(self, dense: torch.Tensor, pooled: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([dense, *(pooled[f] for f in self.features)], dim=1)
        return self.deep(x).squeeze(1)

    def forward_pooled(
        self, dense: torch.Tensor, pooled: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return self._linear(dense, pooled) + self._deep(dense, pooled)


@dataclass(frozen=True)
class DeepFMConfig(WideDeepConfig):
    """DeepFM (Guo et al. 2017): first order + FM second order + MLP, sharing embeddings.

    ``wide_features`` are the first-order weights (dim-1 tables); the FM term needs every
    embedding in ``features`` to have the same dim.
    """


class DeepFM(WideDeep):
    """``first order + 0.5 * sum_k((sum_i e_ik)^2 - sum_i e_ik^2) + MLP([dense, embeddings])``.

    Example:
        >>> from recps.worker.reference import LocalEmbeddingBagCollection
        >>> ebc = LocalEmbeddingBagCollection(embedding_config("deepfm", ["C1", "C2"], dim=4))
        >>> DeepFM(ebc, DeepFMConfig(num_dense=0))(torch.ones(2, 0), {"C1": [1, 2],
        ...     "C2": [3, 3]}).shape
        torch.Size([2])
    """

    def __init__(self, embeddings: nn.Module, config: DeepFMConfig | None = None) -> None:
        super().__init__(embeddings, config or DeepFMConfig())
        dims = embeddings.dims
        k = {dims[f] for f in self.features}
        if len(k) != 1:
            raise ConfigError(f"the FM term needs one embedding dim, got {sorted(k)}")

    def forward_pooled(
        self, dense: torch.Tensor, pooled: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        e = torch.stack([pooled[f] for f in self.features], dim=1)  # [B, m, k]
        fm = 0.5 * (e.sum(1).square() - e.square().sum(1)).sum(1)
        return self._linear(dense, pooled) + fm + self._deep(dense, pooled)


# ---------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------

MODELS: dict[str, tuple[type[_Model], type[Any]]] = {
    "dlrm": (DLRM, DLRMConfig),
    "deepfm": (DeepFM, DeepFMConfig),
    "wide_deep": (WideDeep, WideDeepConfig),
}
_ALIASES = {"wide&deep": "wide_deep", "widedeep": "wide_deep", "wide-deep": "wide_deep"}


def _canonical(name: str) -> str:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return key


def embedding_config(
    model: str,
    sparse_features: Sequence[str],
    dim: int = 16,
    *,
    pooling: Pooling = "sum",
    optimizer: OptimizerConfig | None = None,
    initializer: InitializerConfig | None = None,
    wide_initializer: InitializerConfig | None = None,
    **table_kw: Any,
) -> EmbeddingCollectionConfig:
    """The collection a model expects: one ``dim`` table per sparse input, plus for
    DeepFM / Wide&Deep a dim-1 table ``<feature>_wide`` per input (zero-initialized).

    Example:
        >>> cfg = embedding_config("wide_deep", ["C1"], dim=8)
        >>> [(f.name, f.table, f.source) for f in cfg.features]
        [('C1', 'C1', 'C1'), ('C1_wide', 'C1_wide', 'C1')]
    """
    key = _canonical(model)
    opt = optimizer or OptimizerConfig("adagrad", lr=0.05)
    init = initializer or InitializerConfig("uniform", scale=0.05)
    features = [FeatureSpec(f, f, pooling) for f in sparse_features]
    tables = [
        TableConfig(f, dim=dim, optimizer=opt, initializer=init, **table_kw)
        for f in sparse_features
    ]
    if key != "dlrm":
        winit = wide_initializer or InitializerConfig("zeros")
        for f in sparse_features:
            w = f + WIDE_SUFFIX
            features.append(FeatureSpec(w, w, pooling, input=f))
            tables.append(TableConfig(w, dim=1, optimizer=opt, initializer=winit, **table_kw))
    return EmbeddingCollectionConfig(tuple(features), tuple(tables))


def build_model(name: str, embeddings: nn.Module, **config: Any) -> _Model:
    """``"dlrm"``, ``"deepfm"`` or ``"wide_deep"`` over ``embeddings``; ``config`` sets
    fields of the model's config dataclass (or pass ``config=<Config>``).

    Example:
        >>> from recps.worker.reference import LocalEmbeddingBagCollection
        >>> ebc = LocalEmbeddingBagCollection(embedding_config("dlrm", ["C1"], dim=16))
        >>> type(build_model("dlrm", ebc, top_mlp=(32,))).__name__
        'DLRM'
    """
    cls, cfg_cls = MODELS[_canonical(name)]
    cfg = config.pop("config", None) or cfg_cls()
    if not isinstance(cfg, cfg_cls):
        raise ConfigError(f"{name} takes a {cfg_cls.__name__}, got {type(cfg).__name__}")
    if config:
        try:
            cfg = replace(cfg, **config)
        except TypeError as e:
            raise ConfigError(f"{cfg_cls.__name__}: {e}") from None
    return cls(embeddings, cfg)


def predict(model: nn.Module, dense: torch.Tensor, ids: Any) -> np.ndarray:
    """Click probabilities of one batch as float64 numpy, in eval mode and without gradients
    (so a sharded collection reads unknown ids without creating rows for them).

    Example:
        >>> from recps.worker.reference import LocalEmbeddingBagCollection
        >>> ebc = LocalEmbeddingBagCollection(embedding_config("dlrm", ["C1"], dim=4))
        >>> model = build_model("dlrm", ebc, num_dense=1, bottom_mlp=(4,))
        >>> predict(model, torch.ones(3, 1), {"C1": [1, 2, 3]}).shape
        (3,)
    """
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.sigmoid(model(dense, ids)).double().cpu().numpy()
    finally:
        model.train(was)
