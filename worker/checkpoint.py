"""Coordinated training checkpoints on disk: layout, listing, completion marker, retention.

A checkpoint of a training job is one directory per global step under
``training.checkpoint_dir``; both halves of the model are taken at the same step::

    <checkpoint_dir>/step-00001000/
        shard-0/ ... shard-<k>/    the parameter servers' part (the Checkpoint RPC writes it)
        dense.pt                   torch.save: dense weights, dense optimizer, RNG, position
        meta.json                  step, epoch, position, world size, config fingerprint, history
        COMPLETE                   written last (atomic rename): the checkpoint is usable

A directory without ``COMPLETE`` is an interrupted checkpoint and is ignored by
:func:`list_checkpoints` / :func:`latest_checkpoint`; the trainer deletes it when it writes
that step again, or when pruning. :mod:`recps.worker.trainer` drives the protocol (drain
pushes, barrier, PS checkpoint, dense state, marker, barrier); this module only knows files.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> slot = new_checkpoint_dir(d, checkpoint_tag(200))
    >>> _ = finish_checkpoint(slot, {"step": 200, "epoch": 1, "step_in_epoch": 50})
    >>> _ = new_checkpoint_dir(d, checkpoint_tag(300))  # never completed: ignored
    >>> [(c.tag, c.step) for c in list_checkpoints(d)]
    [('step-00000200', 200)]
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recps.embedding.errors import CheckpointError, CheckpointNotFoundError

__all__ = [
    "COMPLETE",
    "DENSE_FILE",
    "FORMAT",
    "META_FILE",
    "CheckpointInfo",
    "checkpoint_tag",
    "finish_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_dense",
    "new_checkpoint_dir",
    "prune_checkpoints",
    "read_checkpoint",
    "read_dense_bytes",
    "write_dense",
]

log = logging.getLogger(__name__)

FORMAT = "recps-train-ckpt-v1"
COMPLETE = "COMPLETE"
DENSE_FILE = "dense.pt"
META_FILE = "meta.json"
_TAG = re.compile(r"^step-(\d{8,})$")


def checkpoint_tag(step: int) -> str:
    """The tag (directory name) of the checkpoint taken after ``step`` global steps.

    >>> checkpoint_tag(42)
    'step-00000042'
    """
    return f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: where it is and what ``meta.json`` says about it."""

    tag: str
    step: int  # global steps done when it was taken
    path: str  # <checkpoint_dir>/<tag>
    epoch: int = 0  # epoch of the next step
    step_in_epoch: int = 0  # batches of that epoch already consumed
    world_size: int = 1
    config_hash: str = ""
    created_at: float = 0.0
    meta: dict[str, Any] | None = None  # the whole meta.json

    @property
    def root(self) -> str:
        """The checkpoint directory holding it (what ``PSClient.restore`` takes)."""
        return str(Path(self.path).parent)


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of one checkpoint directory; raises
    :class:`CheckpointNotFoundError` when it is missing or incomplete."""
    p = Path(path)
    if not (p / COMPLETE).is_file():
        why = "does not exist" if not p.exists() else f"is incomplete (no {COMPLETE} marker)"
        raise CheckpointNotFoundError(f"checkpoint {p} {why}")
    try:
        meta = json.loads((p / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {p}: unreadable {META_FILE}: {e}") from e
    return CheckpointInfo(
        tag=p.name,
        step=int(meta.get("step", -1)),
        path=str(p),
        epoch=int(meta.get("epoch", 0)),
        step_in_epoch=int(meta.get("step_in_epoch", 0)),
        world_size=int(meta.get("world_size", 1)),
        config_hash=str(meta.get("config_hash", "")),
        created_at=float(meta.get("created_at", 0.0)),
        meta=meta,
    )


def list_checkpoints(checkpoint_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``checkpoint_dir``, oldest step first (none: ``[]``).

    Directories that are not ``step-NNNNNNNN``, lack the ``COMPLETE`` marker or have an
    unreadable ``meta.json`` are skipped (the latter with a warning).
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if not _TAG.match(p.name) or not (p / COMPLETE).is_file():
            continue
        try:
            out.append(read_checkpoint(p))
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", p, e)
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(checkpoint_dir: str | Path) -> CheckpointInfo | None:
    """The complete checkpoint with the highest step, or None.

    >>> latest_checkpoint("/no/such/dir") is None
    True
    """
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: rename it away first, so a crash halfway through
    leaves a name that no listing mistakes for a checkpoint."""
    if not path.exists():
        return
    trash = path.with_name(f".deleting-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def new_checkpoint_dir(checkpoint_dir: str | Path, tag: str) -> Path:
    """Make room for checkpoint ``tag``: an older directory of that name (an interrupted
    attempt, or a checkpoint of a run that was rolled back past it) is deleted, since the
    Checkpoint RPC refuses to write into an existing one. Returns ``<checkpoint_dir>/<tag>``
    (not created: the shards create it)."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / tag
    if path.exists():
        log.info("replacing the existing checkpoint directory %s", path)
        _remove(path)
    return path


def write_dense(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``<path>/dense.pt`` through a temporary file."""
    import torch  # only here: listing checkpoints needs no torch

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tmp = p / f".{DENSE_FILE}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p / DENSE_FILE)


def read_dense_bytes(path: str | Path) -> bytes:
    """The raw ``dense.pt`` of a checkpoint (rank 0 reads it and broadcasts the bytes)."""
    p = Path(path) / DENSE_FILE
    try:
        return p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {p}: {e}") from e


def load_dense(data: bytes, map_location: Any = None) -> dict[str, Any]:
    """``dense.pt`` bytes back into the state dict written by :func:`write_dense`."""
    import torch

    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finish_checkpoint(path: str | Path, meta: dict[str, Any]) -> CheckpointInfo:
    """Write ``meta.json`` and then the ``COMPLETE`` marker: from here on the checkpoint
    counts. Call it only once every other part (shards, ``dense.pt``) is on disk."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "tag": p.name, "created_at": time.time(), **meta}
    _write_atomic(p / META_FILE, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    _write_atomic(p / COMPLETE, p.name + "\n")
    with contextlib.suppress(OSError):  # make the rename durable where directories sync
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return read_checkpoint(p)


def prune_checkpoints(checkpoint_dir: str | Path, keep: int, current_step: int) -> list[str]:
    """Keep the ``keep`` newest complete checkpoints; delete older ones, and interrupted
    ones of steps below ``current_step``. Returns the deleted tags."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(checkpoint_dir)
    complete = list_checkpoints(root)
    deleted = []
    for c in complete[:-keep]:
        _remove(Path(c.path))
        deleted.append(c.tag)
    done = {c.tag for c in complete}
    for p in root.iterdir() if root.is_dir() else ():
        m = _TAG.match(p.name)
        if m and p.name not in done and int(m.group(1)) < current_step:
            _remove(p)
            deleted.append(p.name)
    return deleted
