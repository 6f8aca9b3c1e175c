"""One exception root for recps, with typed subclasses.

Every error carries a ``status`` name (a gRPC status code name, as a plain string so
that ``recps.embedding`` never imports gRPC). ``recps.ps`` maps these names to
``grpc.StatusCode`` in both directions through one table.

Example:
    >>> try:
    ...     raise DimensionMismatchError("grads", expected=16, got=8)
    ... except RecpsError as e:
    ...     print(e.status, e)
    INVALID_ARGUMENT grads has dim 8, table expects 16
"""

from __future__ import annotations


class RecpsError(Exception):
    """Root of every error recps raises on purpose."""

    status: str = "INTERNAL"


class InvalidArgumentError(RecpsError, ValueError):
    """The caller sent something malformed; nothing was changed."""

    status = "INVALID_ARGUMENT"


class ConfigError(InvalidArgumentError):
    """A config value is out of range or inconsistent."""


class DtypeError(InvalidArgumentError):
    def __init__(self, what: str, got: object, expected: str) -> None:
        self.what, self.got, self.expected = what, got, expected
        super().__init__(f"{what} has dtype {got}, expected {expected}")


class ShapeError(InvalidArgumentError):
    def __init__(self, message: str) -> None:
        super().__init__(message)


class DimensionMismatchError(ShapeError):
    def __init__(self, what: str, expected: int, got: int) -> None:
        self.what, self.expected, self.got = what, expected, got
        super().__init__(f"{what} has dim {got}, table expects {expected}")


class LengthMismatchError(ShapeError):
    def __init__(self, ids: int, rows: int) -> None:
        self.ids, self.rows = ids, rows
        super().__init__(f"{ids} ids but {rows} gradient rows; they must match")


class NonFiniteGradientError(InvalidArgumentError):
    """A gradient batch holds NaN or Inf; the whole batch was rejected."""

    def __init__(self, table: str, bad_rows: int) -> None:
        self.table, self.bad_rows = table, bad_rows
        super().__init__(
            f"table {table!r}: {bad_rows} gradient row(s) contain NaN or Inf; batch rejected "
            "(set TableConfig(nonfinite='skip') to drop such rows and count them instead)"
        )


class UnknownTableError(RecpsError, KeyError):
    status = "NOT_FOUND"

    def __init__(self, table: str) -> None:
        self.table = table
        super().__init__(f"unknown table {table!r}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class TableExistsError(RecpsError):
    status = "ALREADY_EXISTS"

    def __init__(self, table: str) -> None:
        self.table = table
        super().__init__(f"table {table!r} already exists with a different config")


class CapacityError(RecpsError):
    """A single batch is too big: for the hot tier's memory budget, a server's
    ``max_ids_per_request``, or a gRPC message size limit. Split it."""

    status = "RESOURCE_EXHAUSTED"


class BackPressureError(RecpsError):
    status = "RESOURCE_EXHAUSTED"

    def __init__(self, queued: int, limit: int) -> None:
        self.queued, self.limit = queued, limit
        super().__init__(f"server busy: {queued} requests queued, limit {limit}; retry later")


class StaleShardMapError(RecpsError):
    status = "FAILED_PRECONDITION"

    def __init__(self, message: str, epoch: int) -> None:
        self.epoch = epoch
        super().__init__(f"{message} (current shard-map epoch {epoch})")


class ShardUnavailableError(RecpsError):
    status = "UNAVAILABLE"


class StorageError(RecpsError):
    """RocksDB or the filesystem failed underneath a store."""

    status = "INTERNAL"


class StoreClosedError(StorageError):
    status = "FAILED_PRECONDITION"

    def __init__(self, table: str) -> None:
        self.table = table
        super().__init__(f"store for table {table!r} is closed")


class CheckpointError(StorageError):
    pass


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint where one was named."""

    status = "NOT_FOUND"


class CheckpointMismatchError(CheckpointError):
    """The checkpoint exists but does not fit: another shard's, or slots moved since."""

    status = "FAILED_PRECONDITION"


class PermissionDeniedError(RecpsError):
    status = "PERMISSION_DENIED"


class UnauthenticatedError(RecpsError):
    status = "UNAUTHENTICATED"
