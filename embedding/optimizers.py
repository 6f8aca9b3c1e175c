"""Server-side sparse optimizers: one vectorized update over a batch of unique rows.

A store gathers the touched rows (weights and optimizer state, both float32), sums the
gradients of duplicate ids, calls :meth:`SparseOptimizer.update` once and scatters the rows
back. State is stored with its row, so it is evicted, persisted and checkpointed with it.

Optimizers hold only their config, so one instance may be shared by many threads.

Example:
    >>> import numpy as np
    >>> opt = make_optimizer(OptimizerConfig("adagrad", lr=0.1))
    >>> w = np.ones((2, 4), np.float32)
    >>> state = opt.init_state(2, 4)
    >>> opt.update(w, state, np.ones((2, 4), np.float32), np.ones(2, np.int64))
    >>> w[0]
    array([0.9, 0.9, 0.9, 0.9], dtype=float32)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from recps.embedding.config import OptimizerConfig
from recps.embedding.errors import ConfigError, DtypeError, InvalidArgumentError, ShapeError

__all__ = [
    "AdagradOptimizer",
    "AdamOptimizer",
    "FtrlOptimizer",
    "SgdOptimizer",
    "SparseOptimizer",
    "make_optimizer",
]

# Floor for denominators that can be exactly 0 only when eps (or ftrl's beta and l2) is 0 and a
# coordinate has never seen a non-zero gradient; its numerator is then 0 too, so 0/TINY = 0
# keeps the row finite where 0/0 would poison it with NaN forever.
_TINY = float(np.finfo(np.float32).tiny)


class SparseOptimizer(ABC):
    """Updates a batch of unique rows in place: ``update(weights, state, grads, steps)``.

    ``weights``, ``state`` and ``grads`` are float32 ``[n, dim]``, ``[n, state_width(dim)]``
    and ``[n, dim]``; ``steps`` is int64 ``[n]``, each row's update count including this one
    (so at least 1). ``weights`` and ``state`` are modified in place; ``grads`` is only read.

    Example:
        >>> import numpy as np
        >>> opt = make_optimizer(OptimizerConfig("sgd", lr=0.5))
        >>> w = np.zeros((1, 2), np.float32)
        >>> opt.update(w, opt.init_state(1, 2), np.ones((1, 2), np.float32), np.ones(1, np.int64))
        >>> w
        array([[-0.5, -0.5]], dtype=float32)
    """

    kind: ClassVar[str]

    def __init__(self, config: OptimizerConfig) -> None:
        if config.kind != self.kind:
            raise ConfigError(
                f"{type(self).__name__} needs an OptimizerConfig of kind {self.kind!r}, "
                f"got {config.kind!r}"
            )
        self.config = config
        self._lr = float(config.lr)
        self._eps = float(config.eps or 0.0)
        self._wd = float(config.weight_decay)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @abstractmethod
    def state_width(self, dim: int) -> int:
        """Float32 slots of optimizer state stored per row of width ``dim``."""

    def init_state(self, n: int, dim: int) -> np.ndarray:
        """State for ``n`` fresh rows: float32 ``[n, state_width(dim)]``."""
        return np.zeros((n, self.state_width(dim)), dtype=np.float32)

    def update(
        self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, steps: np.ndarray
    ) -> None:
        """Apply one step to every row; ``weights`` and ``state`` are updated in place."""
        self._check(weights, state, grads, steps)
        if weights.size:
            self._apply(weights, state, grads, steps)

    @abstractmethod
    def _apply(
        self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, steps: np.ndarray
    ) -> None:
        """The update itself, on validated non-empty arrays."""

    def _check(
        self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, steps: np.ndarray
    ) -> None:
        # Only O(1) checks plus one pass over the [n] steps: the [n, dim] data is never scanned.
        for what, a in (("weights", weights), ("state", state), ("grads", grads)):
            if a.dtype != np.float32:
                raise DtypeError(what, a.dtype, "float32")
        if weights.ndim != 2:
            raise ShapeError(f"weights must be 2-D [n, dim], got shape {weights.shape}")
        n, dim = weights.shape
        if grads.shape != (n, dim):
            raise ShapeError(f"grads has shape {grads.shape}, weights {weights.shape}")
        width = self.state_width(dim)
        if state.shape != (n, width):
            raise ShapeError(f"{self.kind} state must have shape {(n, width)}, got {state.shape}")
        if steps.dtype.kind not in "iu":
            raise DtypeError("steps", steps.dtype, "int64")
        if steps.shape != (n,):
            raise ShapeError(f"steps must have shape {(n,)}, got {steps.shape}")
        if n and steps.min() < 1:
            raise InvalidArgumentError("steps count this update too, so each must be >= 1")

    def _decayed(self, weights: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """``grads + weight_decay * weights`` as torch adds it; ``grads`` itself (no copy) if 0."""
        if not self._wd:
            return grads
        g = np.multiply(weights, self._wd)
        g += grads
        return g


class SgdOptimizer(SparseOptimizer):
    """Plain SGD, as ``torch.optim.SGD`` without momentum: ``w -= lr * (g + wd * w)``.

    Stateless: ``state_width`` is 0, so ``state`` is an ``[n, 0]`` array.

    Example:
        >>> import numpy as np
        >>> opt = SgdOptimizer(OptimizerConfig("sgd", lr=0.1))
        >>> opt.state_width(8), opt.init_state(3, 8).shape
        (0, (3, 0))
    """

    kind = "sgd"

    def state_width(self, dim: int) -> int:
        return 0

    def _apply(
        self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, steps: np.ndarray
    ) -> None:
        g = self._decayed(weights, grads)
        if g is grads:
            step = np.multiply(grads, self._lr)
        else:
            step = g  # a temporary we own: scale it in place
            step *= self._lr
        weights -= step


class AdagradOptimizer(SparseOptimizer):
    """Adagrad, as ``torch.optim.Adagrad`` with ``lr_decay=0``.

    ``acc += g * g; w -= lr * g / (sqrt(acc) + eps)`` with ``g = grad + wd * w``.
    State is ``acc`` (``dim`` slots), starting at ``config.initial_accumulator``.

    Example:
        >>> import numpy as np
        >>> opt = AdagradOptimizer(OptimizerConfig("adagrad", lr=0.1, initial_accumulator=0.5))
        >>> opt.init_state(1, 3)
        array([[0.5, 0.5, 0.5]], dtype=float32)
    """

    kind = "adagrad"

    def state_width(self, dim: int) -> int:
        return dim

    def init_state(self, n: int, dim: int) -> np.ndarray:
        return np.full((n, dim), self.config.initial_accumulator, dtype=np.float32)

    def _apply(
        self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, steps: np.ndarray
    ) -> None:
        g = self._decayed(weights, grads)
        # One scratch array carries g*g, then the denominator, then the step.
        tmp = np.multiply(g, g)
        state += tmp
        np.sqrt(state, out=tmp)
        if self._eps:
            tmp += self._eps
        else:
            np.maximum(tmp, _TINY, out=tmp)
        np.divide(g, tmp, out=tmp)
        tmp *= self._lr
        weights -= tmp


class AdamOptimizer(SparseOptimizer):
    """Adam, as ``torch.optim.Adam`` (not AMSGrad), with a bias correction per row.

    Each row is corrected with its own step count ``t`` (the ``steps`` argument), so a row
    updated rarely gets the same update as a dense torch Adam that steps only that row.
    ``m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
    w -= lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)`` with ``g = grad + wd * w``
    (L2 as torch's Adam adds it, not AdamW's decoupled decay).
    State is ``[m | v]`` (``2 * dim`` slots), starting at zeros.

    Example:
        >>> import numpy as np
        >>> opt = AdamOptimizer(OptimizerConfig("adam", lr=0.01))
        >>> w = np.zeros((2, 4), np.float32)
        >>> state = opt.init_state(2, 4)
        >>> opt.update(w, state, np.ones((2, 4), np.float32), np.array([1, 7]))
        >>> state.shape, round(float(w[0, 0]), 6)
        ((2, 8), -0.01)
    """

    kind = "adam"

    def __init__(self, config: OptimizerConfig) -> None:
        super().__init__(config)
        self._b1 = float(config.beta1)
        self._b2 = float(config.beta2)

    def state_width(self, dim: int) -> int:
        return 2 * dim

    def _apply(
        self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, steps: np.ndarray
    ) -> None:
        dim = weights.shape[1]
        m, v = state[:, :dim], state[:, dim:]
        g = self._decayed(weights, grads)
        tmp = np.empty(weights.shape, dtype=np.float32)
        # m += (1-b1) * (g - m): torch's lerp_, which rounds differently from b1*m + (1-b1)*g.
        np.subtract(g, m, out=tmp)
        tmp *= 1.0 - self._b1
        m += tmp
        v *= self._b2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - self._b2
        v += tmp
        # Per-row scalars in float64, then folded into the denominator so the [n, dim] work is
        # w -= m / (sqrt(v) * scale + shift), with scale = 1/(sqrt(bc2) * step_size) and
        # shift = eps/step_size: one full pass fewer than multiplying by step_size afterwards.
        step_size = self._lr / (1.0 - np.power(self._b1, steps))
        scale = (1.0 / (np.sqrt(1.0 - np.power(self._b2, steps)) * step_size)).astype(np.float32)
        shift = (self._eps / step_size).astype(np.float32)
        np.sqrt(v, out=tmp)
        if scale.min() == scale.max() and shift.min() == shift.max():
            # All rows share one correction (same step, or steps past where b**t rounds to 0 in
            # float32): scalar operands run about 3x faster than a broadcast [n, 1] column.
            tmp *= float(scale[0])
            tmp += float(shift[0])
        else:
            tmp *= scale[:, None]
            tmp += shift[:, None]
        if not self._eps:
            np.maximum(tmp, _TINY, out=tmp)
        np.divide(m, tmp, out=tmp)
        weights -= tmp


class FtrlOptimizer(SparseOptimizer):
    """FTRL-Proximal (McMahan et al. 2013), per coordinate, with ``alpha = config.lr``.

    ``n' = n + g*g; sigma = (sqrt(n') - sqrt(n)) / alpha; z += g - sigma * w; n = n'``, then
    ``w = 0`` if ``|z| <= l1`` else ``-(z - sign(z)*l1) / ((beta + sqrt(n))/alpha + l2)``.
    ``sigma * w`` uses the current weights, so a randomly initialised row is pulled from its
    starting point like any other. This is TensorFlow's ``ApplyFtrl`` with ``lr_power=-0.5``
    except that ``l2`` is the paper's lambda2 (TensorFlow's ``l2_regularization_strength``
    is half of it) and ``beta`` appears as in the paper. State is ``[z | n]`` (``2 * dim``
    slots), both starting at 0: ``n`` starts at 0, not at TensorFlow's 0.1, since ``beta``
    already keeps the first step finite. ``weight_decay`` is ignored (``l2`` plays its role);
    ``l1 > 0`` yields exact zeros, which is the point of FTRL for sparse features.

    Example:
        >>> import numpy as np
        >>> opt = FtrlOptimizer(OptimizerConfig("ftrl", lr=0.1, l1=1.0))
        >>> w = np.zeros((1, 2), np.float32)
        >>> g = np.array([[0.5, 3.0]], np.float32)
        >>> opt.update(w, opt.init_state(1, 2), g, np.ones(1, np.int64))
        >>> w  # |z| = 0.5 <= l1 is clipped to exactly 0
        array([[ 0.  , -0.05]], dtype=float32)
    """

    kind = "ftrl"

    def __init__(self, config: OptimizerConfig) -> None:
        super().__init__(config)
        self._inv_alpha = 1.0 / self._lr
        self._l1 = float(config.l1)
        self._denom_shift = float(config.ftrl_beta) / self._lr + float(config.l2)

    def state_width(self, dim: int) -> int:
        return 2 * dim

    def _apply(
        self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, steps: np.ndarray
    ) -> None:
        dim = weights.shape[1]
        z, n = state[:, :dim], state[:, dim:]
        a = np.sqrt(n)
        b = np.multiply(grads, grads)
        n += b
        np.sqrt(n, out=b)
        # a = -sigma * w = (sqrt(n) - sqrt(n')) * w / alpha
        np.subtract(a, b, out=a)
        a *= weights
        a *= self._inv_alpha
        a += grads  # into the contiguous scratch, not z: a strided half of state is slower
        z += a
        # b = (beta + sqrt(n')) / alpha + l2, with the constant part folded into one addition.
        b *= self._inv_alpha
        if self._denom_shift:
            b += self._denom_shift
        else:
            np.maximum(b, _TINY, out=b)
        # a = clip(z, -l1, l1) - z = -(z - sign(z)*l1) where |z| > l1, else exactly +0.
        if self._l1:
            np.clip(z, -self._l1, self._l1, out=a)
            np.subtract(a, z, out=a)
        else:
            np.subtract(0.0, z, out=a)
        np.divide(a, b, out=weights)


_OPTIMIZERS: dict[str, type[SparseOptimizer]] = {
    cls.kind: cls for cls in (SgdOptimizer, AdagradOptimizer, AdamOptimizer, FtrlOptimizer)
}


def make_optimizer(config: OptimizerConfig) -> SparseOptimizer:
    """The optimizer ``config.kind`` names, configured by ``config``.

    Example:
        >>> make_optimizer(OptimizerConfig("ftrl", lr=0.05, l1=0.01)).kind
        'ftrl'
    """
    try:
        cls = _OPTIMIZERS[config.kind]
    except KeyError:
        raise ConfigError(f"unknown optimizer {config.kind!r}") from None
    return cls(config)
