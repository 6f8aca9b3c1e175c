"""Which rows of a table a slot-move source has sent, so that it can drop exactly those.

After a handover the source deletes its old copy of the moved slots (``FINISH``). Row
keys are ids, not slot-prefixed, so finding a slot's rows takes a scan of the whole
table: seconds a million rows, and a full pass over a table far larger than memory. But
the source has just sent every one of those rows, in the move's full copy and its delta
rounds, so it can remember their ids instead and delete by id.

That is exact only when this process saw the whole copy: the full copy's first page
(``begin``) and its last (``complete``), and every delta round after it (rows that were
written or created while the copy ran are tracked and sent then; once the slots freeze
no row can appear there). A source restarted mid-move, or one whose record outgrew
``max_ids``, does not cover the slots and falls back to the scan.

Example:
    >>> import numpy as np
    >>> sent = SentRows(lambda ids: ids % 4, num_slots=4)
    >>> mask = np.array([True, False, False, False])
    >>> sent.begin(mask); sent.add(np.array([0, 4, 8])); sent.complete(mask)
    >>> sent.covers(mask), sent.ids_in(mask).tolist()
    (True, [0, 4, 8])
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

# Ids remembered per table before giving up (then FINISH scans): 16 M ids, 128 MB.
DEFAULT_MAX_IDS = 1 << 24


class SentRows:
    """Ids of one table sent by slot moves from this process, and the slots they cover.

    ``slot_of`` maps ids to their slots (the table's routing hash). Thread-safe.
    """

    def __init__(
        self,
        slot_of: Callable[[np.ndarray], np.ndarray],
        num_slots: int,
        max_ids: int = DEFAULT_MAX_IDS,
    ) -> None:
        self._slot_of = slot_of
        self.max_ids = max_ids
        self._began = np.zeros(num_slots, dtype=bool)  # a full copy's first page went out
        self._covered = np.zeros(num_slots, dtype=bool)  # ... and its last one too
        self._ids: list[np.ndarray] = []
        self._count = 0
        self._overflow = False
        self._lock = threading.Lock()

    def begin(self, mask: np.ndarray) -> None:
        """A full copy of the slots of ``mask`` starts (its first page is being sent)."""
        with self._lock:
            self._began |= mask

    def add(self, ids: np.ndarray) -> None:
        """Rows of these ids were sent (a copy page or a delta page)."""
        if not len(ids):
            return
        with self._lock:
            if self._overflow:
                return
            if self._count + len(ids) > self.max_ids:
                self._overflow = True  # too many to keep: FINISH scans instead
                self._ids, self._count = [], 0
                return
            self._ids.append(np.array(ids, dtype=np.int64, copy=True))
            self._count += len(ids)

    def complete(self, mask: np.ndarray) -> None:
        """The full copy of ``mask``'s slots sent its last page."""
        with self._lock:
            self._covered |= mask & self._began

    def covers(self, mask: np.ndarray) -> bool:
        """Whether every row of ``mask``'s slots is among the ids sent."""
        with self._lock:
            return not self._overflow and bool(self._covered[mask].all())

    def ids_in(self, mask: np.ndarray) -> np.ndarray:
        """The sorted unique ids sent whose slots are in ``mask``."""
        with self._lock:
            ids = np.unique(np.concatenate(self._ids)) if self._ids else np.empty(0, np.int64)
        return ids[mask[self._slot_of(ids)]] if len(ids) else ids

    def forget(self, mask: np.ndarray) -> None:
        """Drop what was recorded for ``mask``'s slots (their move is over)."""
        with self._lock:
            self._began &= ~mask
            self._covered &= ~mask
            if self._ids:
                ids = np.concatenate(self._ids)
                keep = ids[~mask[self._slot_of(ids)]]
                self._ids = [keep] if len(keep) else []
                self._count = len(keep)
            if not self._began.any():  # no move left in flight: start afresh
                self._overflow = False
                self._ids, self._count = [], 0

    @property
    def count(self) -> int:
        """Ids held (with repeats)."""
        return self._count
