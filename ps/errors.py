"""One mapping between recps errors and gRPC status codes, used by server and client.

The server aborts with the error's status code and message, plus trailing metadata naming
the error class (``recps-error``) and, for stale maps, the current epoch
(``recps-epoch``). The client rebuilds the same :class:`RecpsError` subclass from that.

Example:
    >>> import grpc
    >>> from recps.embedding.errors import UnknownTableError
    >>> code_of(UnknownTableError("ads")) is grpc.StatusCode.NOT_FOUND
    True
"""

from __future__ import annotations

import grpc

from recps.embedding import errors as E


class SlotFrozenError(E.ShardUnavailableError):
    """A write hit a slot frozen for its handover to another shard. Retryable: the
    client backs off and retries (then the new owner answers, after a map refresh)."""

    def __init__(self, message: str, slots: int = 0) -> None:
        self.slots = slots
        super().__init__(message)


class MigrationError(E.RecpsError):
    """A slot-move step was refused: rows for slots the shard does not expect, a finish
    for slots it still owns, or a plan that no longer fits the cluster."""

    status = "FAILED_PRECONDITION"


ERROR_TYPE_KEY = "recps-error"
EPOCH_KEY = "recps-epoch"

# Status name (as RecpsError.status carries it) -> gRPC code. Both directions use it.
STATUS_CODES: dict[str, grpc.StatusCode] = {c.name: c for c in grpc.StatusCode}

# Error classes the client can rebuild by name. Extra constructor arguments are not
# transported; the rebuilt error carries the server's message.
_CLASSES: dict[str, type[E.RecpsError]] = {
    c.__name__: c
    for c in (
        E.RecpsError,
        E.InvalidArgumentError,
        E.ConfigError,
        E.DtypeError,
        E.ShapeError,
        E.DimensionMismatchError,
        E.LengthMismatchError,
        E.NonFiniteGradientError,
        E.UnknownTableError,
        E.TableExistsError,
        E.CapacityError,
        E.BackPressureError,
        E.StaleShardMapError,
        E.ShardUnavailableError,
        E.StorageError,
        E.StoreClosedError,
        E.CheckpointError,
        E.CheckpointNotFoundError,
        E.CheckpointMismatchError,
        E.PermissionDeniedError,
        E.UnauthenticatedError,
        SlotFrozenError,
        MigrationError,
    )
}


def register_error_classes(*classes: type[E.RecpsError]) -> None:
    """Let :func:`from_rpc_error` rebuild these by name too: error classes of layers
    above ``recps.ps`` (the serving replica's), which this module cannot import."""
    for c in classes:
        _CLASSES[c.__name__] = c


# gRPC codes that arrive without a recps error class (from gRPC itself or a proxy).
_FALLBACK: dict[grpc.StatusCode, type[E.RecpsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: E.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: E.UnknownTableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: E.BackPressureError,
    grpc.StatusCode.FAILED_PRECONDITION: E.StaleShardMapError,
    grpc.StatusCode.UNAVAILABLE: E.ShardUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: E.ShardUnavailableError,
    grpc.StatusCode.PERMISSION_DENIED: E.PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: E.UnauthenticatedError,
}


def code_of(err: E.RecpsError) -> grpc.StatusCode:
    return STATUS_CODES.get(err.status, grpc.StatusCode.INTERNAL)


def abort(context: grpc.ServicerContext, err: E.RecpsError) -> None:
    """Abort the RPC with ``err``'s status; never returns."""
    md: list[tuple[str, str]] = [(ERROR_TYPE_KEY, type(err).__name__)]
    epoch = getattr(err, "epoch", None)
    if epoch is not None:
        md.append((EPOCH_KEY, str(epoch)))
    context.set_trailing_metadata(tuple(md))
    context.abort(code_of(err), str(err))


def from_rpc_error(e: grpc.RpcError, where: str = "") -> E.RecpsError:
    """The RecpsError a failed call stands for (its class, message and epoch)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    md = dict(e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else {}
    cls = _CLASSES.get(md.get(ERROR_TYPE_KEY, "")) or _FALLBACK.get(code, E.RecpsError)
    if cls is E.BackPressureError and "larger than max" in details:
        # gRPC's own refusal of a message past either side's max_message_bytes: the
        # request is too big (retrying cannot help), not a busy server.
        cls, details = E.CapacityError, f"{details}; split the batch"
    msg = f"{where}: {details}" if where else details
    err = cls.__new__(cls)
    Exception.__init__(err, msg)
    if cls is E.UnknownTableError:
        err.table = ""  # type: ignore[attr-defined]
    if EPOCH_KEY in md or cls is E.StaleShardMapError:
        err.epoch = int(md.get(EPOCH_KEY, 0))  # type: ignore[attr-defined]
    err.grpc_code = code  # type: ignore[attr-defined]
    return err
