"""Binary-classification metrics in numpy alone: ROC AUC (rank-based, ties averaged), logloss.

Example:
    >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> round(logloss([1, 0], [0.9, 0.2]), 4)
    0.1643
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from recps.embedding.errors import InvalidArgumentError, ShapeError


def _pair(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(y) != len(s):
        raise ShapeError(f"{len(y)} labels but {len(s)} scores; they must match")
    if len(y) and not np.all((y == 0) | (y == 1)):
        raise InvalidArgumentError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise InvalidArgumentError("scores contain NaN")
    return y.astype(bool), s


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

    Mann-Whitney U from average ranks, exact in integers; O(n log n). Raises
    :class:`InvalidArgumentError` when only one class is present (AUC is undefined).

    >>> auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5])
    0.5
    """
    y, s = _pair(labels, scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InvalidArgumentError(
            f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives"
        )
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    # Tie groups: [first, last] positions (0-based) of each run of equal scores.
    new_group = np.empty(len(s), dtype=bool)
    new_group[0] = True
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], len(s)) - 1
    group = np.cumsum(new_group) - 1
    # Twice the average 1-based rank of each element: first + last + 2 (an integer).
    twice_rank = (starts + ends + 2)[group]
    twice_rank_sum = int(twice_rank[y[order]].sum())
    u2 = twice_rank_sum - n_pos * (n_pos + 1)  # 2 * Mann-Whitney U
    return u2 / (2.0 * n_pos * n_neg)


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy in nats; probabilities are clipped to [eps, 1 - eps].

    >>> round(logloss([0, 1], [0.5, 0.5]), 6)  # ln 2
    0.693147
    """
    y, p = _pair(labels, probs)
    if len(y) == 0:
        raise InvalidArgumentError("logloss of zero examples is undefined")
    if np.any((p < 0) | (p > 1)):
        raise InvalidArgumentError("probabilities must lie in [0, 1]")
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))
