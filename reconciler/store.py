"""Postgres (asyncpg): the jobs table, our audit/cancel tables, migrations.

`Store` owns the pool, checks the schema and runs the jobs table's statements; its
`requests` (our cancel-request table) and `replicas` (the replica registry) run theirs on
the same pool, through the same translation of driver errors.

Every UPDATE of a job row is guarded by the status it was read with (compare-and-set),
batched, and writes its audit rows in the same statement; rows another transaction holds
locked are skipped, not waited for. Identifiers come from the config through
quote_ident(); values are always bind parameters, and every text bound to SQL is cleaned
(NUL, lone surrogates) and clipped to what its column holds. A batch the database refuses
for the sake of one row is split to find that row, which is skipped until it changes.
asyncpg errors are translated here (see errors.py): outages into PostgresUnavailable,
values one row carried into DataRejected, configurations that cannot work into
SchemaError. Nothing here holds a transaction open while the caller talks to Redis.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn

import asyncpg
import structlog

from reconciler.config import Config, quote_ident
from reconciler.errors import (
    DataRejected,
    InvalidJobId,
    PostgresUnavailable,
    SchemaError,
    UnknownJob,
)
from reconciler.model import (
    DETAIL_TEXT_CAP,
    NO_DETAIL,
    TEXT_CAP,
    BoundedMemory,
    CancelIntent,
    JobRow,
    PoisonCallback,
    clean_text,
    sql_json,
    sql_text,
    storable,
)

_OUTAGE = (
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

log = structlog.get_logger("reconciler.store")

# Attempts of one guarded batch UPDATE that PostgreSQL failed to break a deadlock.
APPLY_ATTEMPTS = 5
# Set on every pool connection: one application transaction holding one row's lock, or a
# statement gone astray, must not stall the daemon (both errors are outages: retried).
LOCK_TIMEOUT_MS = 2000
STATEMENT_TIMEOUT_MS = 30000
# Free text read from the cancel-request table (who, why): the error column gets a few
# hundred characters of it; a 300 MB reason is never read whole.
REQUEST_TEXT_MAX = 1000
# A replica whose heartbeat is older than this is not alive (it beats every third of it).
REPLICA_STALE_SECONDS = 15.0


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
    if isinstance(exc, _OUTAGE):
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
    except (*_OUTAGE, asyncpg.PostgresError) as exc:
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


def _string_constant(text: str) -> str:
    """An SQL string constant for `text` that reads the same whatever
    standard_conforming_strings says (a backslash is an escape only in E'' form)."""
    quoted = text.replace("'", "''")
    if "\\" in text:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


def active_predicate(cfg: Config, alias: str = "t") -> str:
    """`<alias>.status IN ('queued', 'running')` with the configured words as constants:
    the sweep's page condition, and the predicate of the partial index `check`
    recommends (the planner matches the two)."""
    words = ", ".join(_string_constant(w) for w in cfg.jobs.statuses.active)
    col = quote_ident(cfg.jobs.status_column)
    return f"{alias}.{col} IN ({words})" if alias else f"{col} IN ({words})"


class RowChange(NamedTuple):
    """One guarded transition to apply. It travels to PostgreSQL as it is, a JSON array
    (see `_json_default` and the apply statement): its field order is the wire format."""

    job_id: Any
    from_status: str
    to_status: str
    error: str
    reason: str
    rq_status: str = ""
    set_started_at: datetime | None = None
    set_completed_at: datetime | None = None
    mark_started: bool = False
    mark_completed: bool = False
    detail: Mapping[str, Any] = NO_DETAIL


_JOB_ID = itemgetter(0)


def _texts(ids: Iterable[Any]) -> list[str]:
    """Ids as the statements take them: `$1::text[]::<id type>[]`, cast by the server.
    asyncpg has a codec of its own for text[] but not for int8[], int4[] or uuid[]: it
    would look each up in the catalog on every new connection (a recursive query with
    jit switched off and on around it: three round trips and about 10 ms of the server's
    CPU), at start-up or in the middle of a cancel."""
    return [i if type(i) is str else str(i) for i in ids]


def _json_default(value: Any) -> Any:
    """What JSON cannot hold as it is, in a RowChange: times, a read-only detail mapping,
    ids of other types (uuid)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)


def _fingerprint(change: RowChange) -> int:
    """Identifies one transition as decided: the same row decided the same way again
    (nothing changed in RQ or in the row) has the same fingerprint."""
    return hash(json.dumps(change, default=_json_default, check_circular=False))


class ApplyResult(NamedTuple):
    """What `Store.apply` did with a batch. A change in none of the lists lost its race:
    the row was no longer in the status it was read with."""

    # Took effect, as written (texts cleaned and clipped).
    applied: list[RowChange]
    # Not tried: another transaction held the row locked (or changed it a moment ago).
    # Nothing is known about them; decide them again later.
    locked: list[RowChange]
    # Refused by the database for a value of their own (poison), now or earlier with the
    # same change: skipped until the decision for the row changes.
    rejected: list[RowChange]


def _plain_json(value: Mapping[str, Any]) -> bool:
    """True if no string in a (flat) detail mapping needs cleaning or clipping."""
    for k, v in value.items():
        if not (isinstance(k, str) and k.isascii() and "\x00" not in k):
            return False
        if isinstance(v, str):
            if len(v) > DETAIL_TEXT_CAP or not v.isascii() or "\x00" in v:
                return False
        elif not (v is None or isinstance(v, (bool, int, float))):
            return False  # nested: let sql_json walk it
    return True


class ActiveRow(NamedTuple):
    row: JobRow
    age_seconds: float


@dataclass(frozen=True, slots=True)
class CancelRequest:
    id: int
    job_id: Any
    requested_at: datetime
    requested_by: str
    reason: str
    # The replica this request was handed to by another, if any.
    handed_to: str | None = None
    # The job's row when the request was claimed (None: not read, or no such row).
    row: ActiveRow | None = None


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
        )


def _active(rec: asyncpg.Record) -> ActiveRow:
    # By position (id, rq_id, status, started_at, first_seen, age: the SELECT's order of
    # _row_select): once per active row in a sweep.
    return ActiveRow(
        JobRow(rec[0], rec[1] or None, rec[2], rec[3], rec[4]),
        float(rec[5] or 0.0),
    )


# -- the jobs table's statements --------------------------------------------------------------


def _started(n: Names) -> str:
    return f"t.{n.started}" if n.started else "NULL::timestamptz"


def _row_select(n: Names) -> str:
    """A job row as `_active` reads it, up to its WHERE (the jobs table is `t`)."""
    t, cid, crq, cst, started = n.jobs, n.id, n.rq_id, n.status, _started(n)
    return (
        f"SELECT t.{cid} AS id, t.{crq}::text AS rq_id, t.{cst} AS status, "
        f"{started} AS started_at, f.first_seen, "
        f"extract(epoch FROM now() - coalesce({started}, f.first_seen, now()))::float8 AS age "
        f"FROM {t} t LEFT JOIN {n.first_seen} f ON f.job_id = t.{cid}::text "
    )


def _read_queries(n: Names, id_type: str, active: str, select: str) -> dict[str, str]:
    """The sweep's pages and the lookups of rows by id, by RQ id and by recent cancel.

    The active statuses are written into the statement (`active`), not bound: a jobs table
    holds years of finished rows, and only a partial index on the active ones (the one
    `check` recommends) keeps a page from reading them. The planner can use a partial
    index only if it can prove the query's condition implies the index's, which it cannot
    do for a parameter once asyncpg's prepared statement switches to a generic plan (after
    five runs). The words come from the config, as quoted literals."""
    t, cid, crq, cst, started = n.jobs, n.id, n.rq_id, n.status, _started(n)
    # A page is limited first and joined after: with the join inside, the planner may
    # hash the (small) first-seen table and then sort every active row after the
    # cursor to take 1,000 of them, for each page: quadratic in the active rows.
    page = (
        f"SELECT p.id, p.rq_id, p.status, p.started_at, f.first_seen, "
        f"extract(epoch FROM now() - coalesce(p.started_at, f.first_seen, now()))::float8 AS age "
        f"FROM (SELECT t.{cid} AS id, t.{crq}::text AS rq_id, t.{cst} AS status, "
        f"{started} AS started_at FROM {t} t WHERE {{where}} ORDER BY t.{cid} LIMIT $1) p "
        f"LEFT JOIN {n.first_seen} f ON f.job_id = p.id::text ORDER BY p.id"
    )
    return {
        "page_first": page.format(where=active),
        "page_next": page.format(where=f"{active} AND t.{cid} > $2::{id_type}"),
        "by_rq_ids": select + f"WHERE t.{crq} = ANY($1::text[]) AND t.{cst} = ANY($2::text[])",
        "by_ids": select + f"WHERE t.{cid} = ANY($1::text[]::{id_type}[])",
        "recently_cancelled": select + (
            f"WHERE t.{cid} IN (SELECT r.job_id FROM {n.requests} r WHERE r.outcome = 'cancelled' "
            f"AND r.done_at > now() - make_interval(secs => $1)) AND t.{cst} = $2 "
            f"AND t.{crq} IS NOT NULL ORDER BY t.{cid} LIMIT $3"
        ),
    }


def _apply_query(n: Names, id_type: str) -> str:
    """The guarded batch UPDATE with its audit rows (Store.apply)."""
    t, cid, cst = n.jobs, n.id, n.status
    sets = [
        f"{cst} = u.to_s",
        f"{n.error} = CASE WHEN u.err = '' THEN t.{n.error} ELSE u.err END",
    ]
    if n.started:
        sets.append(
            f"{n.started} = CASE WHEN u.mark_started "
            f"THEN coalesce(t.{n.started}, u.started_ts, now()) ELSE t.{n.started} END"
        )
    if n.completed:
        sets.append(
            f"{n.completed} = CASE WHEN u.mark_completed "
            f"THEN coalesce(u.completed_ts, now()) ELSE t.{n.completed} END"
        )
    # The batch travels as one JSON document ($2), each change as the array its
    # RowChange tuple is: encoding eleven parallel arrays, or a dict per change, cost
    # more client CPU than the statement costs the server.
    # `t.id = ANY($1)` as well as the join: without it the planner hashes the whole jobs
    # table for every batch when the table is small enough to look cheap to scan (9 of
    # 19 ms for 500 rows in a 20,000-row table); with it, each batch costs index
    # lookups only, however the table grows.
    # `lk` locks the rows to change first, skipping those another transaction holds:
    # one app transaction sitting on one row must not stall a whole batch (nor the
    # daemon) until lock_timeout; those rows come back as locked (false, id) and are
    # decided again later. Rows still in their read status that `lk` did not get are
    # the locked ones; the rest lost their race. The UPDATE finds its rows by the
    # array of locked ids (`got`: one index scan, as before), and the locked ones are
    # looked for only when `lk` got fewer rows than the batch has (a one-time filter):
    # joined to `lk` directly, the UPDATE ran one index probe per row and the lookup a
    # nested-loop anti join, 15 ms against 5 for 500 rows; this way it costs 6.
    # The lock is the one the UPDATE itself takes (NO KEY UPDATE: no key column changes),
    # not FOR UPDATE: an open transaction that inserted a cancel request for the row holds
    # KEY SHARE on it (its foreign key), which FOR UPDATE would skip the row for.
    return f"""
WITH u AS (
    SELECT (b->>0)::{id_type} AS id, b->>1 AS from_s, b->>2 AS to_s, b->>3 AS err,
           b->>4 AS reason, b->>5 AS rq_status, (b->>6)::timestamptz AS started_ts,
           (b->>7)::timestamptz AS completed_ts, (b->>8)::bool AS mark_started,
           (b->>9)::bool AS mark_completed, b->10 AS detail
    FROM jsonb_array_elements($2::jsonb) AS b
), lk AS (
    SELECT t.{cid} AS id FROM {t} t JOIN u ON t.{cid} = u.id AND t.{cst} = u.from_s
    WHERE t.{cid} = ANY($1::text[]::{id_type}[])
    FOR NO KEY UPDATE OF t SKIP LOCKED
), got AS (
    SELECT coalesce(array_agg(id), '{{}}') AS ids, count(*) AS n FROM lk
), upd AS (
    UPDATE {t} t SET {', '.join(sets)}
    FROM u
    WHERE t.{cid} = ANY((SELECT ids FROM got)::{id_type}[]) AND t.{cid} = u.id
      AND t.{cst} = u.from_s
    RETURNING t.{cid} AS id, u.from_s, u.to_s, u.reason, u.rq_status, u.detail
), gone AS (
    DELETE FROM {n.first_seen} f USING upd
    WHERE f.job_id = upd.id::text AND upd.to_s <> ALL($4::text[])
), ev AS (
    INSERT INTO {n.events} (job_id, from_status, to_status, reason, rq_status, detail, actor)
    SELECT upd.id::text, upd.from_s, upd.to_s, upd.reason, nullif(upd.rq_status, ''),
           upd.detail, $3
    FROM upd
    RETURNING job_id
)
SELECT true AS applied, job_id FROM ev
UNION ALL
SELECT false, u.id::text FROM u JOIN {t} t ON t.{cid} = u.id AND t.{cst} = u.from_s
WHERE (SELECT n FROM got) < cardinality($1::text[])
  AND t.{cid} = ANY($1::text[]::{id_type}[]) AND u.id NOT IN (SELECT id FROM lk)
"""


def _first_seen_queries(n: Names, id_type: str, active: str) -> dict[str, str]:
    return {
        "first_seen": (
            f"INSERT INTO {n.first_seen} (job_id) SELECT unnest($1::text[]) "
            "ON CONFLICT (job_id) DO NOTHING"
        ),
        # The ids compared in the id column's own type, so that each lookup is one probe of
        # the jobs table's primary key (or of the partial index on its active rows):
        # `t.id::text = f.job_id` read the whole table. Only ids we wrote are in there.
        "prune_first_seen": (
            f"DELETE FROM {n.first_seen} f WHERE NOT EXISTS (SELECT 1 FROM {n.jobs} t "
            f"WHERE t.{n.id} = f.job_id::{id_type} AND {active})"
        ),
    }


def _intent_queries(n: Names, id_type: str) -> dict[str, str]:
    """The open cancel requests of a page's rows (Store.cancel_intents*)."""
    return {
        # A sweep page's rows are a range of ids: its intents are looked up by the range's
        # bounds, not by sending its thousand ids.
        "intents_between": (
            f"SELECT DISTINCT ON (job_id) job_id, "
            f"left(coalesce(requested_by, ''), {REQUEST_TEXT_MAX}) AS who, "
            f"left(coalesce(reason, ''), {REQUEST_TEXT_MAX}) AS why FROM {n.requests} "
            f"WHERE state <> 'done' AND job_id BETWEEN $1::{id_type} AND $2::{id_type} "
            f"ORDER BY job_id, id"
        ),
        "intents": (
            f"SELECT DISTINCT ON (job_id) job_id, "
            f"left(coalesce(requested_by, ''), {REQUEST_TEXT_MAX}) AS who, "
            f"left(coalesce(reason, ''), {REQUEST_TEXT_MAX}) AS why FROM {n.requests} "
            f"WHERE state <> 'done' AND job_id = ANY($1::text[]::{id_type}[]) ORDER BY job_id, id"
        ),
    }


class Store:
    """The pool, the schema it works on, and the jobs table's statements; our cancel-request
    table (`requests`) and the replica registry (`replicas`) run theirs on the same pool."""

    def __init__(self, cfg: Config, *, on_poison: PoisonCallback | None = None) -> None:
        """`on_poison(kind, job_id, error)`: called once for each row change the database
        refused ("row"); the daemon counts them. Nothing here imports prometheus_client."""
        self.cfg = cfg
        self.pool: asyncpg.Pool | None = None
        self.id_type = "bigint"
        # What the error column holds (characters): its varchar(n)/char(n) length, read at
        # connect; an unbounded text column still gets no more than TEXT_CAP.
        self.error_max = TEXT_CAP
        self._on_poison = on_poison
        # job id (text) -> fingerprint of the change the database refused for it.
        self._poison = BoundedMemory()
        self.names = Names.of(cfg)
        self._sql: dict[str, str] = {}
        self.requests = CancelRequestTable(self)
        self.replicas = ReplicaTable(self)

    # -- connection ---------------------------------------------------------------------

    async def connect(self, *, min_size: int = 1) -> None:
        # A transaction-mode pooler (PgBouncer) refuses startup parameters and loses named
        # prepared statements between transactions: then neither is used, and the timeouts
        # are the role's (README, "Behind PgBouncer"; `check` says if they are not set).
        pooled = self.cfg.postgres.pooler == "transaction"
        async with translated(self.pool):
            self.pool = await asyncpg.create_pool(
                self.cfg.postgres.dsn,
                min_size=min(min_size, self.cfg.postgres.pool_size),
                max_size=self.cfg.postgres.pool_size,
                command_timeout=60,
                timeout=10,
                reset=_keep_session,
                statement_cache_size=0 if pooled else 100,
                server_settings={} if pooled else {
                    "lock_timeout": str(LOCK_TIMEOUT_MS),
                    "statement_timeout": str(STATEMENT_TIMEOUT_MS),
                },
            )
            await self._introspect()

    async def close(self) -> None:
        if self.pool is not None:
            try:
                await self.pool.close()
            except _OUTAGE:
                self.pool.terminate()
            self.pool = None

    def _p(self) -> asyncpg.Pool:
        if self.pool is None:
            raise PostgresUnavailable("not connected")
        return self.pool

    async def _introspect(self) -> None:
        row = await self._p().fetchrow(
            "SELECT format_type(a.atttypid, a.atttypmod) AS t FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
            self.names.jobs, self.cfg.jobs.id_column,
        )
        if row is None:
            raise SchemaError(
                f"jobs table {self.cfg.jobs.table!r} or its id column "
                f"{self.cfg.jobs.id_column!r} does not exist (jobs.table / jobs.id_column)"
            )
        # format_type() output comes from the catalog, not from user input.
        self.id_type = str(row["t"])
        self.error_max = await self._text_capacity(self.cfg.jobs.error_column)
        self._build_sql()

    async def _text_capacity(self, column: str) -> int:
        """How many characters a jobs-table column holds: n for varchar(n) / char(n) (also
        behind a domain), else TEXT_CAP. What information_schema calls
        character_maximum_length, without its privilege filter and name matching."""
        rec = await self._p().fetchrow(
            "SELECT CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END "
            "  IN ('varchar'::regtype, 'bpchar'::regtype) AS chars, "
            "CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END AS typmod "
            "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
            self.names.jobs, column,
        )
        if rec is None or not rec["chars"] or rec["typmod"] is None or rec["typmod"] < 5:
            return TEXT_CAP  # unbounded (or missing: verify_schema says so)
        return min(int(rec["typmod"]) - 4, TEXT_CAP)  # typmod of (n) is n + 4

    async def verify_schema(self) -> None:
        """Our own tables and the mapped columns exist: a daemon that cannot work says so
        once, at start-up, instead of failing every query. It only reads: a read-only
        server (a standby, default_transaction_read_only) passes, and its refused writes
        are outages later, retried."""
        n = self.names
        missing = [
            name for name, reg in [
                (self.cfg.cancel.requests_table, n.requests),
                (self.cfg.events_table, n.events),
                (self.cfg.first_seen_table, n.first_seen),
                (self.cfg.replicas_table, n.replicas),
            ]
            if await self._p().fetchval("SELECT to_regclass($1)", reg) is None
        ]
        if missing:
            raise SchemaError(f"{', '.join(missing)} missing: run `rq-reconciler migrate`")
        version = self.cfg.cancel.requests_table.rpartition(".")[0]
        version = f"{version}.rq_reconciler_schema" if version else "rq_reconciler_schema"
        have = 0
        if await self._p().fetchval("SELECT to_regclass($1)", quote_ident(version)) is not None:
            have = int(await self._p().fetchval(
                f"SELECT coalesce(max(version), 0) FROM {quote_ident(version)}") or 0)
        from reconciler.migrations import SCHEMA_VERSION

        if have < SCHEMA_VERSION:
            raise SchemaError(f"our tables are at schema v{have}, this version needs "
                              f"v{SCHEMA_VERSION}: run `rq-reconciler migrate`")
        j = self.cfg.jobs
        cols = {r["attname"] for r in await self._p().fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 "
            "AND NOT attisdropped", n.jobs)}
        for key in ("rq_id_column", "status_column", "error_column", "started_at_column",
                    "completed_at_column"):
            col = getattr(j, key)
            if col and col not in cols:
                raise SchemaError(f"jobs.{key}: column {col!r} not found in {j.table}")

    def build_queries(self, id_type: str) -> Mapping[str, str]:
        """Every statement on the jobs table this store runs, by name, for an id column of
        `id_type` (`check` and the tests EXPLAIN them)."""
        self.id_type = id_type
        self._build_sql()
        return MappingProxyType(self._sql)

    def active_predicate(self, alias: str = "t") -> str:
        """`status IN ('queued', 'running')`, the words written out: see _read_queries."""
        return active_predicate(self.cfg, alias)

    def _build_sql(self) -> None:
        n, id_type, active = self.names, self.id_type, self.active_predicate()
        select = _row_select(n)
        # The claims are built by the request table, which runs them; they are here too
        # because they read the jobs table, and build_queries hands out every statement
        # that does.
        self._sql.update({
            **_read_queries(n, id_type, active, select),
            "apply": _apply_query(n, id_type),
            **_first_seen_queries(n, id_type, active),
            "job_status": f"SELECT {n.status} FROM {n.jobs} WHERE {n.id} = $1::{id_type}",
            **self.requests.build_sql(select),
            **_intent_queries(n, id_type),
        })

    # -- reads ----------------------------------------------------------------------------

    async def active_page(self, after: Any, limit: int) -> list[ActiveRow]:
        async with translated(self.pool):
            if after is None:
                recs = await self._p().fetch(self._sql["page_first"], limit)
            else:
                recs = await self._p().fetch(self._sql["page_next"], limit, after)
        return [_active(r) for r in recs]

    async def rows_by_rq_ids(self, rq_ids: Sequence[str]) -> list[ActiveRow]:
        """Active rows, and cancelled ones (a cancel holds until RQ agrees)."""
        s = self.cfg.jobs.statuses
        # An id PostgreSQL cannot even hold (NUL, a lone surrogate) matches no row; sent,
        # it would fail the whole lookup for its neighbours.
        ids = [i for i in rq_ids if storable(i)]
        if not ids:
            return []
        async with translated(self.pool):
            recs = await self._p().fetch(self._sql["by_rq_ids"], ids, [*s.active, s.cancelled])
        return [_active(r) for r in recs]

    async def rows_by_ids(self, ids: Sequence[Any]) -> list[ActiveRow]:
        async with translated(self.pool):
            recs = await self._p().fetch(self._sql["by_ids"], _texts(ids))
        return [_active(r) for r in recs]

    async def remember_first_seen(self, job_ids: Sequence[Any]) -> None:
        if not job_ids:
            return
        async with translated(self.pool):
            await self._p().execute(self._sql["first_seen"], _texts(job_ids))

    async def prune_first_seen(self) -> None:
        async with translated(self.pool):
            await self._p().execute(self._sql["prune_first_seen"])

    async def cancel_intents(self, job_ids: Sequence[Any]) -> dict[Any, CancelIntent]:
        if not job_ids:
            return {}
        async with translated(self.pool):
            recs = await self._p().fetch(self._sql["intents"], _texts(job_ids))
        return {r["job_id"]: CancelIntent(r["who"], r["why"]) for r in recs}

    @property
    def id_ranges_are_exact(self) -> bool:
        """Whether a range of ids means the same on our request table as in the jobs
        table's order: not for text ids, which a collation may order differently there."""
        return not any(w in self.id_type for w in ("char", "text", "citext", "name"))

    async def cancel_intents_between(self, first: Any, last: Any) -> dict[Any, CancelIntent]:
        """The open cancel requests of rows whose id lies in [first, last]."""
        async with translated(self.pool):
            recs = await self._p().fetch(self._sql["intents_between"], first, last)
        return {r["job_id"]: CancelIntent(r["who"], r["why"]) for r in recs}

    async def recently_cancelled(self, within: float, limit: int = 10_000) -> list[ActiveRow]:
        """Rows a cancel request cancelled in the last `within` seconds (still cancelled):
        a job enqueued after its cancel is looked for there by each sweep."""
        async with translated(self.pool):
            recs = await self._p().fetch(self._sql["recently_cancelled"], within,
                                         self.cfg.jobs.statuses.cancelled, limit)
        return [_active(r) for r in recs]

    async def job_status(self, job_id: Any) -> str | None:
        async with translated(self.pool):
            return await self._p().fetchval(  # type: ignore[no-any-return]
                self._sql["job_status"], job_id)


    # -- writes ---------------------------------------------------------------------------

    async def apply(self, changes: Sequence[RowChange]) -> ApplyResult:
        """Apply guarded transitions, as few statements as the data allows.

        Texts are cleaned and clipped first. Rows another transaction holds locked are
        not waited for (ApplyResult.locked). If the database refuses the batch for a value
        one row carried, the batch is split until that row is found; it is logged once
        (`poison_row`), reported to `on_poison`, and skipped while its change stays the
        same (ApplyResult.rejected); the rest are applied. An outage raises
        PostgresUnavailable: what an earlier part of a split batch applied stays applied.
        """
        if not changes:
            return ApplyResult([], [], [])
        memory = self._poison
        todo: list[RowChange] = []
        rejected: list[RowChange] = []
        for c in changes:
            c = self._storable(c)
            if memory and memory.get(str(c.job_id)) == _fingerprint(c):
                rejected.append(c)  # refused before, and nothing changed since
            else:
                todo.append(c)
        # One lock order for every writer (replicas apply overlapping batches), so that
        # lock cycles are rare; the retry in _apply_batch handles the rest.
        with suppress(TypeError):
            todo.sort(key=_JOB_ID)
        applied: list[RowChange] = []
        locked: list[RowChange] = []
        async with translated(self.pool):
            await self._apply_split(todo, applied, locked, rejected)
        if memory:
            for c in applied:
                memory.discard(str(c.job_id))
        return ApplyResult(applied, locked, rejected)

    def _storable(self, c: RowChange) -> RowChange:
        """`c` with its error text clipped to the error column and its detail's strings
        made fit for jsonb (runs per change: the usual texts pass after one scan)."""
        error = sql_text(c.error, self.error_max) if c.error else c.error
        detail = c.detail
        if detail and not _plain_json(detail):
            detail = sql_json(detail)
        if error is c.error and detail is c.detail:
            return c
        return c._replace(error=error, detail=detail)

    async def _apply_split(self, batch: list[RowChange], applied: list[RowChange],
                           locked: list[RowChange], rejected: list[RowChange]) -> None:
        """Apply `batch`; if the database refuses it for one row's sake, halve it until
        the rows at fault are alone (log2(n) statements per such row)."""
        if not batch:
            return
        try:
            recs = await self._apply_batch(batch)
        except asyncpg.PostgresError as exc:
            err = translate(exc)
            if not isinstance(err, DataRejected):
                raise
            if len(batch) == 1:
                self._poisoned(batch[0], err)
                rejected.append(batch[0])
                return
            mid = len(batch) // 2
            await self._apply_split(batch[:mid], applied, locked, rejected)
            await self._apply_split(batch[mid:], applied, locked, rejected)
            return
        done = {r[1] for r in recs if r[0]}
        if len(done) == len(batch):  # one event row per updated row: all took effect
            applied += batch
            return
        held = {r[1] for r in recs if not r[0]}
        for c in batch:
            key = str(c.job_id)
            if key in done:
                applied.append(c)
            elif key in held:
                locked.append(c)

    async def _apply_batch(self, batch: list[RowChange]) -> list[asyncpg.Record]:
        """One guarded statement for `batch`, run again if PostgreSQL broke a lock cycle
        with it. Raises asyncpg's errors untranslated: the caller decides what they cost."""
        body = json.dumps(batch, default=_json_default, check_circular=False)
        args = (_texts(c.job_id for c in batch), body, self.cfg.instance.name,
                list(self.cfg.jobs.statuses.active))
        for attempt in range(1, APPLY_ATTEMPTS + 1):
            try:
                return list(await self._p().fetch(self._sql["apply"], *args))
            except asyncpg.exceptions.TransactionRollbackError as exc:
                # Replicas apply overlapping batches from the same events; PostgreSQL
                # breaks a lock cycle by failing one statement whole. It is guarded, so
                # running it again is safe: rows another replica changed meanwhile are
                # simply skipped. After the last attempt it is an outage (retried later,
                # nothing lost), never a schema error that stops the daemon.
                if attempt == APPLY_ATTEMPTS:
                    raise
                log.info("apply_retried", attempt=attempt, error=type(exc).__name__)
                await asyncio.sleep(random.uniform(0.005, 0.02) * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _poisoned(self, change: RowChange, err: DataRejected) -> None:
        key = str(change.job_id)
        fingerprint = _fingerprint(change)
        if self._poison.get(key) == fingerprint:
            return
        self._poison.put(key, fingerprint)
        log.warning("poison_row", job_id=key, error=str(err), pg_error=err.pg_error,
                    sqlstate=err.sqlstate, from_status=change.from_status,
                    to_status=change.to_status)
        if self._on_poison is not None:
            self._on_poison("row", key, str(err))

    # -- sweep lock -----------------------------------------------------------------------

    @asynccontextmanager
    async def sweep_lock(self) -> AsyncIterator[bool]:
        """Session advisory lock: one sweeper per jobs table across replicas."""
        key = f"rq-reconciler:sweep:{self.cfg.jobs.table}"
        # Behind a transaction pooler a session lock would stay on whichever server
        # connection took it, for the next client to hold: a session of its own instead.
        own = self.cfg.postgres.pooler == "transaction"
        async with translated(self.pool):
            conn = await (asyncpg.connect(self.cfg.postgres.session_dsn, timeout=10) if own
                          else self._p().acquire())
        unlocked = False
        try:
            async with translated(self.pool):
                got = bool(await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key))
            unlocked = not got
            try:
                yield got
            finally:
                if got:
                    # If the session is gone, the lock went with it.
                    with suppress(*_OUTAGE):
                        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
                        unlocked = True
        finally:
            if not unlocked:
                # Pool connections are not reset on release (see connect): a session that
                # may still hold the lock must not go back to the pool.
                conn.terminate()
            with suppress(*_OUTAGE):
                await (conn.close() if own else self._p().release(conn))


class _OnStorePool:
    """Statements on one of our own tables, run on the Store's pool (which the Store
    connects, introspects and closes) through the same translation of driver errors."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.cfg = store.cfg

    @property
    def pool(self) -> asyncpg.Pool | None:
        return self._store.pool

    def _p(self) -> asyncpg.Pool:
        return self._store._p()


# -- our cancel-request table -----------------------------------------------------------------


class CancelRequestTable(_OnStorePool):
    """`store.requests`: claiming requests under a lease, handing them to another replica,
    writing their outcomes; and the app's side, inserting one and reading its outcome."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.table = store.names.requests
        self._sql: dict[str, str] = {}

    @property
    def id_type(self) -> str:
        return self._store.id_type

    def build_sql(self, select: str) -> Mapping[str, str]:
        """The claims, for the id column's type the store read; `select` is the job row as
        the store reads it (`_row_select`)."""
        cid = self._store.names.id
        # A claim returns each request's job row as well, as rows_by_ids reads it: the
        # cancel starts from it without a round trip of its own.
        claimable = ("(state = 'pending' OR (state = 'claimed' AND claimed_until < now())) "
                     "AND (handed_to IS NULL OR handed_to = $1 "
                     "OR handed_at < now() - make_interval(secs => $4))")
        for_jobs = f"{claimable} AND job_id = ANY($5::text[]::{self.id_type}[])"
        for name, where in (("claim", claimable), ("claim_for_jobs", for_jobs)):
            self._sql[name] = (
                f"WITH c AS (UPDATE {self.table} r SET state = 'claimed', claimed_by = $1, "
                f"claimed_until = now() + make_interval(secs => $2) "
                f"WHERE r.id IN (SELECT id FROM {self.table} WHERE {where} "
                f"ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) "
                f"RETURNING r.id, r.job_id, r.requested_at, "
                f"left(coalesce(r.requested_by, ''), {REQUEST_TEXT_MAX}) AS who, "
                f"left(coalesce(r.reason, ''), {REQUEST_TEXT_MAX}) AS why, r.handed_to) "
                f"SELECT c.id AS request_id, c.job_id, c.requested_at, c.who, c.why, c.handed_to, "
                f"j.id, j.rq_id, j.status, j.started_at, j.first_seen, j.age "
                f"FROM c LEFT JOIN LATERAL ({select}WHERE t.{cid} = c.job_id) j ON true "
                f"ORDER BY c.id"
            )
        return self._sql

    async def claim(self, lease: float, limit: int = 100,
                    job_ids: Sequence[Any] | None = None) -> list[CancelRequest]:
        """Claim pending (or lease-expired) requests, each with its job's row as it is now;
        SKIP LOCKED lets replicas share. A request handed to a replica is that replica's
        until the hand-over times out."""
        params: list[Any] = [self.cfg.instance.name, lease, limit,
                             self.cfg.cancel.handover_seconds]
        if job_ids is not None:
            params.append(_texts(job_ids))
        sql = self._sql["claim" if job_ids is None else "claim_for_jobs"]
        async with translated(self.pool):
            recs = await self._p().fetch(sql, *params)
        return [CancelRequest(r["request_id"], r["job_id"], r["requested_at"], r["who"], r["why"],
                              r["handed_to"], None if r["id"] is None else _active(r[6:]))
                for r in recs]

    async def hand_over(self, ids: Sequence[int], to: str) -> int:
        """Give our claimed requests to the replica `to` and wake it (NOTIFY): it alone may
        claim them for cancel.handover_seconds."""
        sql = (
            f"WITH u AS (UPDATE {self.table} SET state = 'pending', claimed_by = NULL, "
            f"claimed_until = NULL, handed_to = $3, handed_at = now() "
            f"WHERE id = ANY($1::text[]::bigint[]) AND state = 'claimed' AND claimed_by = $2 "
            f"RETURNING id) SELECT count(*) FROM (SELECT pg_notify($4, u.id::text) FROM u) n"
        )
        async with translated(self.pool):
            n = await self._p().fetchval(sql, _texts(ids), self.cfg.instance.name, to,
                                         self.cfg.cancel.channel)
        return int(n or 0)

    async def extend_lease(self, ids: Sequence[int], lease: float) -> None:
        async with translated(self.pool):
            await self._p().execute(
                f"UPDATE {self.table} SET claimed_until = now() + make_interval(secs => $3) "
                f"WHERE id = ANY($1::text[]::bigint[]) AND state = 'claimed' AND claimed_by = $2",
                _texts(ids), self.cfg.instance.name, lease,
            )

    async def finish(self, ids: Sequence[int], outcome: str,
                     detail: dict[str, Any]) -> list[tuple[int, datetime]]:
        """Write the outcome on our claimed requests and NOTIFY <channel>_done for each.
        Returns (id, requested_at) of the requests finished (a lost lease finishes none)."""
        sql = (
            f"WITH u AS (UPDATE {self.table} SET state = 'done', outcome = $3, detail = $4::jsonb, "
            f"done_at = now(), claimed_until = NULL "
            f"WHERE id = ANY($1::text[]::bigint[]) AND state = 'claimed' AND claimed_by = $2 "
            f"RETURNING id, requested_at) "
            f"SELECT u.id, u.requested_at, pg_notify($5, u.id::text) FROM u"
        )
        # The detail carries texts from Redis and the app (worker names, messages): made
        # fit for jsonb, or one odd name would keep the request from ever finishing.
        body = json.dumps(sql_json(detail), default=str)
        async with translated(self.pool):
            recs = await self._p().fetch(sql, _texts(ids), self.cfg.instance.name, outcome,
                                         body, self.cfg.done_channel)
        return [(r["id"], r["requested_at"]) for r in recs]

    async def release_claims(self) -> int:
        async with translated(self.pool):
            status = await self._p().execute(
                f"UPDATE {self.table} SET state = 'pending', claimed_by = NULL, "
                f"claimed_until = NULL WHERE state = 'claimed' AND claimed_by = $1",
                self.cfg.instance.name,
            )
        return int(status.split()[-1])

    async def previous_cancel_detail(self, job_id: Any) -> dict[str, Any] | None:
        """The detail of this job's last successful cancel, so that late duplicates of a
        request get the same outcome."""
        async with translated(self.pool):
            raw = await self._p().fetchval(
                f"SELECT detail FROM {self.table} WHERE job_id = $1 AND state = 'done' "
                f"AND outcome = 'cancelled' ORDER BY id DESC LIMIT 1", job_id)
        return dict(json.loads(raw)) if raw else None

    async def insert(self, job_id: Any, requested_by: str, reason: str) -> int:
        """Insert a cancel request. UnknownJob if the jobs table has no such row,
        InvalidJobId if `job_id` is not a value of the id column's type."""
        jid = str(job_id)
        invalid = f"{jid!r} is not a valid {self.id_type} id"
        if not storable(jid):
            raise InvalidJobId(invalid)
        try:
            async with translated(self.pool):
                return int(await self._p().fetchval(
                    f"INSERT INTO {self.table} (job_id, requested_by, reason) "
                    f"VALUES ($1::text::{self.id_type}, $2, $3) RETURNING id",
                    jid, clean_text(requested_by), clean_text(reason),
                ))
        except UnknownJob as exc:
            raise UnknownJob(f"no job with {self.cfg.jobs.id_column} = {jid!r} in "
                             f"{self.cfg.jobs.table}", pg_error=exc.pg_error,
                             sqlstate=exc.sqlstate) from exc
        except DataRejected as exc:
            # The id is the one value cast here (the texts are cleaned, text columns).
            raise InvalidJobId(f"{invalid} ({exc.pg_error})", pg_error=exc.pg_error,
                               sqlstate=exc.sqlstate) from exc

    async def outcome(self, request_id: int) -> tuple[str, str | None, Any]:
        async with translated(self.pool):
            rec = await self._p().fetchrow(
                f"SELECT state, outcome, detail FROM {self.table} WHERE id = $1", request_id
            )
        if rec is None:
            raise SchemaError(f"cancel request {request_id} does not exist")
        detail = json.loads(rec["detail"]) if rec["detail"] else None
        return rec["state"], rec["outcome"], detail


# -- the replica registry ---------------------------------------------------------------------


class ReplicaTable(_OnStorePool):
    """`store.replicas`: each replica's heartbeat and the local workers it can see
    (reconciler.replicas runs the beat and asks who can see a worker)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.table = store.names.replicas

    async def register(self, *, hostname: str, host_id: str, pid: int,
                       workers: Sequence[str]) -> int:
        """Our heartbeat (and the local workers we can see); returns how many replicas,
        us included, are alive."""
        sql = (
            f"WITH up AS (INSERT INTO {self.table} "
            f"(instance, hostname, host_id, pid, workers) VALUES ($1, $2, $3, $4, $5::text[]) "
            f"ON CONFLICT (instance) DO UPDATE SET hostname = EXCLUDED.hostname, "
            f"host_id = EXCLUDED.host_id, pid = EXCLUDED.pid, workers = EXCLUDED.workers, "
            f"heartbeat_at = now(), started_at = CASE WHEN {self.table}.pid = EXCLUDED.pid "
            f"THEN {self.table}.started_at ELSE now() END RETURNING 1) "
            f"SELECT count(*) + 1 FROM {self.table} "
            f"WHERE heartbeat_at > now() - make_interval(secs => $6) AND instance <> $1"
        )
        async with translated(self.pool):
            n = await self._p().fetchval(sql, self.cfg.instance.name, hostname, host_id, pid,
                                         list(workers), REPLICA_STALE_SECONDS)
        return int(n or 1)

    async def unregister(self) -> None:
        async with translated(self.pool):
            await self._p().execute(f"DELETE FROM {self.table} WHERE instance = $1",
                                    self.cfg.instance.name)

    async def for_worker(self, worker_name: str) -> str | None:
        """The live replica (not us) that lists `worker_name` among its local workers."""
        async with translated(self.pool):
            found = await self._p().fetchval(
                f"SELECT instance FROM {self.table} WHERE $1 = ANY(workers) "
                f"AND instance <> $2 AND heartbeat_at > now() - make_interval(secs => $3) "
                f"ORDER BY heartbeat_at DESC LIMIT 1",
                worker_name, self.cfg.instance.name, REPLICA_STALE_SECONDS)
        return None if found is None else str(found)


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
