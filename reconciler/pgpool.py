"""The PostgreSQL pool the three tables share, and what asyncpg's errors mean to us.

Opens and closes the pool (timeouts set on every connection), translates driver errors
into the package's (errors.py: outages into PostgresUnavailable, values one row carried
into DataRejected, configurations that cannot work into SchemaError), quotes the
configured names once (`Names`), and holds the LISTEN loop. It must never know a table's
statements: those belong to jobs_table, requests_table and replicas_table.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import asyncpg

from reconciler.config import Config, quote_ident
from reconciler.errors import (
    DataRejected,
    PostgresUnavailable,
    SchemaError,
    UnknownJob,
)

OUTAGE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    # A connection left mid-protocol by a server restart ("cannot switch to state ...").
    asyncpg.exceptions.InternalClientError,
    TimeoutError,
)
# Server errors by SQLSTATE class (its first two characters); see errors.py for why.
# Not able to do our work right now: connection (08), rollback: deadlock/serialization
# (40), resources: disk/memory/connections (53), operator: shutdown, statement_timeout
# (57), system/I/O (58), snapshot too old (72), internal (XX).
_OUTAGE_CLASSES = frozenset({"08", "40", "53", "57", "58", "72", "XX"})
# read-only transaction (a standby, default_transaction_read_only), idle-in-transaction
# timeout, lock_timeout, object in use.
_OUTAGE_STATES = frozenset({"25006", "25P02", "25P03", "55P03", "55006"})
# A value one row carried: triggered action (09), cardinality (21), data (22), integrity
# (23), triggered data change (27), routine errors (2F, 38, 39), check option (44),
# program limit such as a too-large value (54), a PL/pgSQL RAISE (P0).
_DATA_CLASSES = frozenset({"09", "21", "22", "23", "27", "2F", "38", "39", "44", "54", "P0"})
# Cannot work as configured: undefined table/column/function, datatype mismatch,
# insufficient privilege (42), no such database (3D) or schema (3F), login refused (28).
_SCHEMA_CLASSES = frozenset({"42", "3D", "3F", "28"})

# Set on every pool connection: one application transaction holding one row's lock, or a
# statement gone astray, must not stall the daemon (both errors are outages: retried).
LOCK_TIMEOUT_MS = 2000
STATEMENT_TIMEOUT_MS = 30000


def translate(exc: BaseException) -> Exception:
    """The package's exception for a driver error (errors.py says what each means)."""
    if isinstance(exc, asyncpg.PostgresError):
        name = type(exc).__name__
        state = str(getattr(exc, "sqlstate", "") or "")
        cls = state[:2]
        if state in _OUTAGE_STATES or cls in _OUTAGE_CLASSES:
            return PostgresUnavailable(f"{name}: {exc}")
        if isinstance(exc, asyncpg.exceptions.ForeignKeyViolationError):
            return UnknownJob(f"{name}: {exc}", pg_error=name, sqlstate=state)
        if cls in _DATA_CLASSES:
            return DataRejected(f"{name}: {exc}", pg_error=name, sqlstate=state)
        if cls in _SCHEMA_CLASSES:
            return SchemaError(str(exc))
        # A class this list does not know: retried and visible beats a daemon that stops.
        return PostgresUnavailable(f"{name}: {exc}")
    if isinstance(exc, OUTAGE):
        return PostgresUnavailable(str(exc) or type(exc).__name__)
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections need no reset query on release: asyncpg still rolls back an open
    transaction and drops listeners, our queries set no session state, LISTEN has its own
    connections, and the one session lock (the sweep's) is released explicitly, or its
    connection closed. The default reset (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL)
    cost a round trip and a statement after every query."""


@asynccontextmanager
async def translated(pool: asyncpg.Pool | None = None) -> AsyncIterator[None]:
    try:
        yield
    except (*OUTAGE, asyncpg.PostgresError) as exc:
        err = translate(exc)
        if pool is not None and isinstance(err, PostgresUnavailable) and _connection_lost(exc):
            # Connections that saw the outage may be unusable: replace them all on the next
            # acquire instead of handing a broken one to the next query.
            with suppress(Exception):
                await pool.expire_connections()
        raise err from exc


def _connection_lost(exc: BaseException) -> bool:
    """Whether the pool's connections are suspect after `exc`: a lost connection or a
    server going away, and a read-only server (after a failover, new connections may reach
    the new primary). A timeout, a lock wait or a deadlock leaves them as good as before."""
    if not isinstance(exc, asyncpg.PostgresError):
        return True
    state = str(getattr(exc, "sqlstate", "") or "")
    return (state[:2] in ("08", "57") and state != "57014") or state == "25006"



async def open_pool(cfg: Config, *, min_size: int = 1) -> asyncpg.Pool:
    """The pool every table's statements run on. Raises asyncpg's errors untranslated (the
    caller translates, as it does for what it runs next)."""
    # A transaction-mode pooler (PgBouncer) refuses startup parameters and loses named
    # prepared statements between transactions: then neither is used, and the timeouts
    # are the role's (README, "Behind PgBouncer"; `check` says if they are not set).
    pooled = cfg.postgres.pooler == "transaction"
    return await asyncpg.create_pool(
        cfg.postgres.dsn,
        min_size=min(min_size, cfg.postgres.pool_size),
        max_size=cfg.postgres.pool_size,
        command_timeout=60,
        timeout=10,
        reset=_keep_session,
        statement_cache_size=0 if pooled else 100,
        server_settings={} if pooled else {
            "lock_timeout": str(LOCK_TIMEOUT_MS),
            "statement_timeout": str(STATEMENT_TIMEOUT_MS),
        },
    )


async def close_pool(pool: asyncpg.Pool) -> None:
    try:
        await pool.close()
    except OUTAGE:
        pool.terminate()


def need_pool(pool: asyncpg.Pool | None) -> asyncpg.Pool:
    if pool is None:
        raise PostgresUnavailable("not connected")
    return pool


def id_texts(ids: Iterable[Any]) -> list[str]:
    """Ids as the statements take them: `$1::text[]::<id type>[]`, cast by the server.
    asyncpg has a codec of its own for text[] but not for int8[], int4[] or uuid[]: it
    would look each up in the catalog on every new connection (a recursive query with
    jit switched off and on around it: three round trips and about 10 ms of the server's
    CPU), at start-up or in the middle of a cancel."""
    return [i if type(i) is str else str(i) for i in ids]


@dataclass(frozen=True, slots=True)
class Names:
    """The configured tables and columns, each through quote_ident(): all that the
    statements here take from the config by name."""

    jobs: str
    id: str
    rq_id: str
    status: str
    error: str
    started: str | None
    completed: str | None
    requests: str
    events: str
    first_seen: str
    replicas: str
    requeues: str

    @classmethod
    def of(cls, cfg: Config) -> Names:
        j = cfg.jobs
        return cls(
            jobs=quote_ident(j.table),
            id=quote_ident(j.id_column),
            rq_id=quote_ident(j.rq_id_column),
            status=quote_ident(j.status_column),
            error=quote_ident(j.error_column),
            started=quote_ident(j.started_at_column) if j.started_at_column else None,
            completed=quote_ident(j.completed_at_column) if j.completed_at_column else None,
            requests=quote_ident(cfg.cancel.requests_table),
            events=quote_ident(cfg.events_table),
            first_seen=quote_ident(cfg.first_seen_table),
            replicas=quote_ident(cfg.replicas_table),
            requeues=quote_ident(cfg.requeues_table),
        )



class PoolOwner(Protocol):
    """What a table's statements need of the object that connects the pool: the jobs
    table's `Store`, which also reads the id column's type."""

    cfg: Config
    names: Names
    id_type: str
    pool: asyncpg.Pool | None


class OnPool:
    """Statements on one of our own tables, run on the owner's pool (which the owner
    connects, introspects and closes) through the same translation of driver errors."""

    def __init__(self, owner: PoolOwner) -> None:
        self._owner = owner
        self.cfg = owner.cfg

    @property
    def pool(self) -> asyncpg.Pool | None:
        return self._owner.pool

    def _p(self) -> asyncpg.Pool:
        return need_pool(self._owner.pool)


# -- LISTEN ---------------------------------------------------------------------------------

LISTEN_LIVENESS_SECONDS = 30.0


async def listen(dsn: str, channel: str, on_notify: Callable[[str], None], *,
                 on_listening: Callable[[], None],
                 liveness: float = LISTEN_LIVENESS_SECONDS) -> NoReturn:
    """LISTEN on `channel` on a connection of its own (never a pool's: a pooled connection
    would carry the LISTEN to whoever acquires it next) until that connection is lost, then
    raise PostgresUnavailable. `on_listening` runs once the LISTEN is in place; silence is
    checked with a liveness query every `liveness` seconds."""
    conn: asyncpg.Connection | None = None
    lost = asyncio.Event()
    try:
        async with translated():
            conn = await asyncpg.connect(dsn, timeout=10)
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(channel, lambda _c, _pid, _ch, payload: on_notify(payload))
        on_listening()
        while True:
            try:
                async with asyncio.timeout(liveness):
                    await lost.wait()
            except TimeoutError:
                async with translated(), asyncio.timeout(10):
                    await conn.fetchval("SELECT 1")
                continue
            raise PostgresUnavailable("LISTEN connection terminated")
    except TimeoutError as exc:
        raise PostgresUnavailable("LISTEN connection did not answer") from exc
    finally:
        if conn is not None:
            with suppress(Exception):
                conn.terminate()
