"""Per-slot request rates: an exponentially weighted moving mean of ids per second.

A shard counts the ids it serves per hash slot on every request (a cumulative int64
counter, one entry per slot). A count since start is a poor input for balancing by load:
a slot that was hot an hour ago and is idle now still looks hot, and a slot that just
arrived by a move looks idle. :class:`SlotRates` turns the counter into rates that follow
the traffic of the last ``window_s`` seconds (the time constant of the decay).

Folding reads the counter's growth since the last fold, so the request path pays nothing
beyond its existing count; the shard folds at most every ``fold_interval_s`` while
traffic flows, and on every read. Growth between two folds is taken as spread evenly
over the interval, so an estimate is exact for steady traffic whatever the folding
cadence. A slot that starts counting (at start-up, or when it arrives or leaves through a
move) has seen less than a window: its rate is divided by the weight the kernel has
covered so far, ``1 - exp(-age / window_s)``, so it reads right from its first fold
instead of creeping up from zero.

Example:
    >>> import numpy as np
    >>> counts = np.zeros(4, dtype=np.int64)
    >>> t = [0.0]
    >>> rates = SlotRates(counts, window_s=60.0, clock=lambda: t[0])
    >>> counts[2] += 500; t[0] = 10.0
    >>> rates.rates().round(1).tolist()
    [0.0, 0.0, 50.0, 0.0]
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np

from recps.embedding.errors import ConfigError


class SlotRates:
    """Ids per second per slot, over about the last ``window_s`` seconds. Thread-safe.

    ``counts`` is the shard's own cumulative counter: read, never written, except that
    :meth:`restart` is told when the owner zeroes entries of it.
    """

    def __init__(
        self,
        counts: np.ndarray,
        window_s: float = 60.0,
        fold_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not window_s > 0 or not fold_interval_s >= 0:
            raise ConfigError("slot rate window_s must be > 0 and fold_interval_s >= 0")
        self.window_s = float(window_s)
        self.fold_interval_s = float(fold_interval_s)
        self._clock = clock
        self._counts = counts
        now = clock()
        self._seen = counts.copy()
        self._rate = np.zeros(len(counts), dtype=np.float64)
        self._since = np.full(len(counts), now, dtype=np.float64)  # when each started
        self._at = now
        self._lock = threading.Lock()

    def _fold(self, now: float) -> None:
        dt = now - self._at
        if dt <= 0:
            return
        counts = self._counts.copy()  # one read: growth after it goes to the next fold
        grew = counts - self._seen
        np.maximum(grew, 0, out=grew)  # an entry zeroed before restart() is told of it
        self._seen = counts
        keep = math.exp(-dt / self.window_s)
        # Growth spread evenly over dt, weighted by the kernel: exact for steady traffic.
        self._rate *= keep
        self._rate += grew * ((1.0 - keep) / dt)
        self._at = now

    def maybe_fold(self) -> None:
        """Fold if the last fold is ``fold_interval_s`` old; the request path calls this
        (one clock read when it is not due; never waits for another thread's fold)."""
        now = self._clock()
        if now - self._at < self.fold_interval_s or not self._lock.acquire(blocking=False):
            return
        try:
            self._fold(now)
        finally:
            self._lock.release()

    def restart(self, slots: np.ndarray) -> None:
        """``slots`` start counting afresh (their owner just zeroed their counters)."""
        with self._lock:
            now = self._clock()
            self._fold(now)
            self._seen[slots] = self._counts[slots]
            self._rate[slots] = 0.0
            self._since[slots] = now

    def rates(self) -> np.ndarray:
        """Ids per second of every slot, float64; 0 for a slot that started this instant."""
        with self._lock:
            now = self._clock()
            self._fold(now)
            age = now - self._since
            covered = -np.expm1(-age / self.window_s)  # 1 - exp(-age / window)
            out = np.zeros_like(self._rate)
            np.divide(self._rate, covered, out=out, where=covered > 0)
            return out
