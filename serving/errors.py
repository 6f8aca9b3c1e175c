"""Errors of the serving replica, under the one root :class:`RecpsError`.

Each carries the gRPC status name the replica answers with (``recps.ps.errors`` maps the
name to the code). Errors of the model files themselves (missing, incomplete, corrupt)
live with the format, in :mod:`recps.serving.model_format`.

Example:
    >>> e = ShardNotHeldError("user", [3], held=[0, 1], epoch=2)
    >>> e.status, e.shards
    ('FAILED_PRECONDITION', [3])
    >>> ReadOnlyReplicaError("Push").status
    'PERMISSION_DENIED'
"""

from __future__ import annotations

from collections.abc import Sequence

from recps.embedding.errors import PermissionDeniedError, RecpsError, StaleShardMapError


class ShardNotHeldError(StaleShardMapError):
    """Ids of serving shards this replica does not hold.

    A subclass of :class:`StaleShardMapError` (FAILED_PRECONDITION with the map's epoch):
    to a client it means the same thing, "this address is not where those ids live".
    """

    def __init__(self, table: str, shards: Sequence[int], held: Sequence[int], epoch: int) -> None:
        self.table = table
        self.shards = sorted(int(s) for s in shards)
        self.held = sorted(int(s) for s in held)
        super().__init__(
            f"table {table!r}: ids of serving shard(s) {self.shards} were sent to a replica "
            f"that holds shard(s) {self.held}; route them by the shard map of the model "
            "(GetShardMap) or start a replica with --shards covering them",
            epoch,
        )


class ReadOnlyReplicaError(PermissionDeniedError):
    """A mutating RPC (Push, CreateTable, ...) sent to a read-only serving replica."""

    def __init__(self, rpc: str) -> None:
        self.rpc = rpc
        super().__init__(
            f"{rpc} refused: this is a read-only serving replica; send training traffic to "
            "the parameter servers, and publish new rows with `recps export`"
        )


class NoModelVersionError(RecpsError):
    """The replica has no model version loaded (yet): nothing to answer from."""

    status = "UNAVAILABLE"

    def __init__(self, root: str) -> None:
        self.root = root
        super().__init__(
            f"no model version loaded: {root} holds no complete version yet; export one "
            "(`recps export`) and the watching replica picks it up, or call LoadVersion"
        )


class VersionNotHeldError(RecpsError):
    """A lookup pinned to a model version this replica neither serves nor keeps for
    rollback (it has not loaded it yet, or has moved two versions on)."""

    status = "FAILED_PRECONDITION"

    def __init__(self, version: int, held: Sequence[int]) -> None:
        self.version = int(version)
        self.held = sorted(int(v) for v in held)
        super().__init__(
            f"model version {self.version} is not held here (held: {self.held or 'none'}); "
            "ask a replica that serves it, or look up without a version"
        )


class NoPreviousVersionError(RecpsError):
    """Rollback with no previous version kept."""

    status = "FAILED_PRECONDITION"

    def __init__(self, current: int | None) -> None:
        self.current = current
        super().__init__(
            f"nothing to roll back to: serving version {current} and no previous one is "
            "kept; LoadVersion a specific version instead"
        )


class ModelLoadError(RecpsError):
    """Ingesting a model version failed (disk full, RocksDB error); nothing was swapped."""

    status = "INTERNAL"


def wire_error_classes() -> tuple[type[RecpsError], ...]:
    """The serving errors a replica sends by name (``recps.ps.errors.abort``), for
    ``recps.ps.errors.register_error_classes`` on the client side."""
    from recps.serving import model_format as mf

    return (
        ShardNotHeldError,
        ReadOnlyReplicaError,
        NoModelVersionError,
        VersionNotHeldError,
        NoPreviousVersionError,
        ModelLoadError,
        mf.ModelFormatError,
        mf.ModelNotFoundError,
        mf.IncompleteModelError,
        mf.ChecksumMismatchError,
    )
