"""The package's exceptions: one root, and one class per kind of trouble.

Driver exceptions are translated into these at the module boundary (`raise ... from exc`)
so that callers decide on retry vs. crash vs. skip-the-row without knowing redis-py or
asyncpg. What each kind means, and what a caller does with it (decided for issue 15,
"nothing the data does stops the daemon"):

- `BackendUnavailable` (`PostgresUnavailable`, `RedisUnavailable`): an outage. Nothing was
  decided from it; retry later with backoff; `backend_up` shows it. For PostgreSQL this is
  a lost or refused connection, and also everything the server says while it is not able
  to do our work *right now*: statement_timeout (QueryCanceled) and lock_timeout
  (LockNotAvailable), a read-only or failed-over server (ReadOnlySQLTransaction), a full
  disk or memory (class 53), a deadlock or serialization failure (class 40), a shutdown
  or restart (class 57: AdminShutdown, CannotConnectNow), an I/O or internal error
  (classes 58, XX). An error class this list does not know is an outage too: retried and
  visible is better than a daemon that stops and is never restarted.
- `DataRejected`: the database refused a value that one row carried (class 22 data
  exceptions such as StringDataRightTruncation, CharacterNotInRepertoire,
  UntranslatableCharacter, InvalidTextRepresentation, NumericValueOutOfRange; class 23
  integrity violations; a trigger's RAISE; a program limit such as a too-large value).
  It costs that row: the batch is split to find it, it is skipped until it changes, and
  the rest are applied. It keeps the driver's class name and SQLSTATE. Two subclasses
  are meant to be caught by type: `UnknownJob` (a foreign key violation: in this
  package's schema the one foreign key is a cancel request's job_id, so the job does not
  exist) and `InvalidJobId` (a job id that is not a value of the id column's type).
- `SchemaError`: this configuration cannot work, and restarting will not fix it (the
  daemon exits 2 and systemd does not restart it): an undefined table, column, function
  or schema, a datatype mismatch, insufficient privilege on our own or the jobs table
  (class 42), a database that does not exist (3D000), authentication refused (class 28).
- `KeyspaceConfigError`: redis.keyspace_events = "require" and Redis will not comply.
"""


class ReconcilerError(Exception):
    """Root of every error this package raises on purpose."""


class BackendUnavailable(ReconcilerError):
    """A backend could not be reached or failed mid-call; retry later, decide nothing."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend


class RedisUnavailable(BackendUnavailable):
    def __init__(self, message: str) -> None:
        super().__init__("redis", message)


class PostgresUnavailable(BackendUnavailable):
    def __init__(self, message: str) -> None:
        super().__init__("postgres", message)


class SchemaError(ReconcilerError):
    """The jobs table or our own tables are not what the config says (not retryable)."""


class InstanceNameTaken(SchemaError):
    """Another live replica runs under this instance.name (exit 2, not restarted)."""


class DataRejected(ReconcilerError):
    """PostgreSQL refused a value one row carried; the row is at fault, not the backend.

    `pg_error` is the driver's exception class name (e.g. "StringDataRightTruncationError"),
    `sqlstate` its SQLSTATE (e.g. "22001"); both empty when not raised by the driver.
    """

    def __init__(self, message: str, *, pg_error: str = "", sqlstate: str = "") -> None:
        super().__init__(message)
        self.pg_error = pg_error
        self.sqlstate = sqlstate


class UnknownJob(DataRejected):
    """A cancel request names a job id the jobs table does not have (foreign key)."""


class InvalidJobId(DataRejected):
    """A job id that is not a valid value of the jobs table's id column type."""


class KeyspaceConfigError(ReconcilerError):
    """redis.keyspace_events = "require" and the server does not emit what we need."""
