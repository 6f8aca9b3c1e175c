"""Bounded-memory admission counting: a count-min sketch of 16-bit counters.

Example:
    >>> import numpy as np
    >>> from recps.embedding.config import AdmissionConfig
    >>> adm = Admission(AdmissionConfig(min_count=2, sketch_width=1024))
    >>> ids = np.array([10, 11], dtype=np.int64)
    >>> adm.observe(ids).tolist(), adm.observe(ids).tolist()
    ([False, False], [True, True])
"""

from __future__ import annotations

import io

import numpy as np

from recps.embedding.config import AdmissionConfig
from recps.embedding.hashing import as_u64, mix64, seed_key

_MAX = np.iinfo(np.uint16).max


class Admission:
    """Decides whether an unseen id deserves a stored row yet.

    ``observe`` counts one sighting per unique id in the batch (callers dedupe), so the
    count means "lookup batches that asked for this id", whatever the client's batching.
    A sketch collision can only over-count: an id may be admitted early, never late.
    """

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._counters: np.ndarray | None = None
        self._salts = np.array(
            [seed_key("recps.admission", d) for d in range(config.sketch_depth)], dtype=np.uint64
        )

    def _buckets(self, ids: np.ndarray) -> np.ndarray:
        mask = np.uint64(self.config.sketch_width - 1)
        return (mix64(as_u64(ids)[None, :] ^ self._salts[:, None]) & mask).astype(np.intp)

    def _sketch(self) -> np.ndarray:
        if self._counters is None:
            cfg = self.config
            self._counters = np.zeros((cfg.sketch_depth, cfg.sketch_width), dtype=np.uint16)
        return self._counters

    def estimate(self, ids: np.ndarray) -> np.ndarray:
        if not self.config.enabled or self._counters is None:
            return np.full(len(ids), _MAX if not self.config.enabled else 0, dtype=np.int64)
        b = self._buckets(ids)
        rows = np.arange(self.config.sketch_depth)[:, None]
        return self._counters[rows, b].min(axis=0).astype(np.int64)

    def observe(self, unique_ids: np.ndarray) -> np.ndarray:
        """Count one sighting of each (unique) id; return which ids are now admitted."""
        if not self.config.enabled:
            return np.ones(len(unique_ids), dtype=bool)
        sketch = self._sketch()
        b = self._buckets(unique_ids)
        cap = self.config.min_count  # counting past min_count buys nothing and risks overflow
        for d in range(self.config.sketch_depth):
            # add.at: two ids may share a bucket in one batch, and both must count.
            np.add.at(sketch[d], b[d][sketch[d][b[d]] < cap], 1)
        return self.estimate(unique_ids) >= self.config.min_count

    def admitted(self, unique_ids: np.ndarray) -> np.ndarray:
        """Whether each id has already been seen ``min_count`` times (counts nothing)."""
        return self.estimate(unique_ids) >= self.config.min_count

    def reconfigure(self, config: AdmissionConfig) -> None:
        """Change min_count at runtime; the sketch is kept unless its shape changes."""
        same_shape = (config.sketch_width, config.sketch_depth) == (
            self.config.sketch_width,
            self.config.sketch_depth,
        )
        counters = self._counters if same_shape else None
        self.__init__(config)  # type: ignore[misc]
        self._counters = counters

    @property
    def memory_bytes(self) -> int:
        return 0 if self._counters is None else self._counters.nbytes

    def to_bytes(self) -> bytes:
        if self._counters is None:
            return b""
        buf = io.BytesIO()
        np.save(buf, self._counters, allow_pickle=False)
        return buf.getvalue()

    def load_bytes(self, data: bytes) -> None:
        if not data:
            self._counters = None
            return
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.shape == (self.config.sketch_depth, self.config.sketch_width):
            self._counters = arr.astype(np.uint16)
