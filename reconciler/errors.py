"""The package's exceptions: one root, and one class per kind of outage.

Driver exceptions are translated into these at the module boundary (`raise ... from exc`)
so that callers decide on retry vs. crash without knowing redis-py or asyncpg.
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


class KeyspaceConfigError(ReconcilerError):
    """redis.keyspace_events = "require" and the server does not emit what we need."""
