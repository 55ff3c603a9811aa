"""The application's jobs table: the sweep's pages, lookups of rows, first-seen times,
open cancel intents, the guarded apply of transitions, and the sweep's lock.

`Store` connects the pool (pgpool), checks the schema, and runs the statements jobs_sql
builds; its `requests` (requests_table) and `replicas` (replicas_table) run theirs on the
same pool. Every UPDATE of a job row is guarded by the status it was read with
(compare-and-set), batched, and writes its audit rows in the same statement; rows another
transaction holds locked are skipped, not waited for. Every text bound to SQL is cleaned
(NUL, lone surrogates) and clipped to what its column holds. A batch the database refuses
for the sake of one row is split to find that row, which is skipped until it changes.
It must never hold a transaction open while the caller talks to Redis, and never change
a row whose status is not the one it was read with.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from operator import itemgetter
from types import MappingProxyType
from typing import Any, NamedTuple

import asyncpg
import structlog

from reconciler.config import Config, quote_ident
from reconciler.errors import DataRejected, SchemaError
from reconciler.jobs_sql import (
    active_predicate,
    active_row,
    apply_query,
    first_seen_queries,
    read_queries,
    row_select,
)
from reconciler.migrations import SCHEMA_VERSION
from reconciler.model import (
    DETAIL_TEXT_CAP,
    NO_DETAIL,
    TEXT_CAP,
    ActiveRow,
    BoundedMemory,
    CancelIntent,
    Page,
    PoisonCallback,
    sql_json,
    sql_text,
    storable,
)
from reconciler.pgpool import (
    OUTAGE,
    Names,
    close_pool,
    id_texts,
    need_pool,
    open_pool,
    translate,
    translated,
)
from reconciler.replicas_table import ReplicaTable
from reconciler.requests_table import CancelRequestTable, intent_queries
from reconciler.requeues_table import RequeueTable
from reconciler.schema_needs import Table, find_table, one_line, startup_problems

log = structlog.get_logger("reconciler.jobs_table")

# Attempts of one guarded batch UPDATE that PostgreSQL failed to break a deadlock.
APPLY_ATTEMPTS = 5


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
        # Job ids or RQ ids (text) of rows the database could not hand over to a read.
        self._poison_reads = BoundedMemory()
        self.names = Names.of(cfg)
        self._sql: dict[str, str] = {}
        self.requests = CancelRequestTable(self)
        self.replicas = ReplicaTable(self)
        self.requeues = RequeueTable(self)

    # -- connection ---------------------------------------------------------------------

    async def connect(self, *, min_size: int = 1) -> None:
        async with translated(self.pool):
            self.pool = await open_pool(self.cfg, min_size=min_size)
            await self._introspect()

    async def close(self) -> None:
        if self.pool is not None:
            await close_pool(self.pool)
            self.pool = None

    def _p(self) -> asyncpg.Pool:
        return need_pool(self.pool)

    async def _introspect(self) -> None:
        # Found through the catalog: to_regclass() fails without USAGE on the schema, and
        # then startup_problems says which GRANT is missing.
        table = await self._jobs_table()
        row = None if table is None else await self._p().fetchrow(
            "SELECT format_type(a.atttypid, a.atttypmod) AS t FROM pg_attribute a "
            "WHERE a.attrelid = $1 AND a.attname = $2 AND NOT a.attisdropped",
            table.oid, self.cfg.jobs.id_column,
        )
        if row is None:
            await self._refuse_if_unworkable()
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
        table = await self._jobs_table()
        rec = None if table is None else await self._p().fetchrow(
            "SELECT CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END "
            "  IN ('varchar'::regtype, 'bpchar'::regtype) AS chars, "
            "CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END AS typmod "
            "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = $1 AND a.attname = $2 AND NOT a.attisdropped",
            table.oid, column,
        )
        if rec is None or not rec["chars"] or rec["typmod"] is None or rec["typmod"] < 5:
            return TEXT_CAP  # unbounded (or missing: verify_schema says so)
        return min(int(rec["typmod"]) - 4, TEXT_CAP)  # typmod of (n) is n + 4

    async def _jobs_table(self) -> Table | None:
        async with self._p().acquire() as conn:
            return await find_table(conn, self.cfg.jobs.table)

    async def _refuse_if_unworkable(self) -> None:
        """Raise SchemaError, in one line, if what `check` says of the jobs table, its
        columns and the role's privileges fails (the first such line, and how many more)."""
        async with self._p().acquire() as conn:
            fails = await startup_problems(conn, self.cfg)
        if fails:
            raise SchemaError(one_line(fails))

    async def explain_refusal(self) -> str | None:
        """After a statement was refused as a schema error: the line `check` would print
        for it (a column renamed or retyped, a privilege revoked), or None if it finds
        nothing wrong now."""
        try:
            async with asyncio.timeout(10):
                await self._refuse_if_unworkable()
        except SchemaError as exc:
            return str(exc)
        except Exception:  # (the server's own words are said instead)
            return None
        return None

    async def verify_schema(self) -> None:
        """Our own tables and the mapped columns exist, of types the statements work with,
        and the role holds every privilege the daemon uses: a daemon that cannot work says
        so once, at start-up, instead of failing every query. It only reads: a read-only
        server (a standby, default_transaction_read_only) passes, and its refused writes
        are outages later, retried."""
        await self._refuse_if_unworkable()
        n = self.names
        missing = [
            name for name, reg in [
                (self.cfg.cancel.requests_table, n.requests),
                (self.cfg.events_table, n.events),
                (self.cfg.first_seen_table, n.first_seen),
                (self.cfg.replicas_table, n.replicas),
                (self.cfg.requeues_table, n.requeues),
            ]
            if await self._p().fetchval("SELECT to_regclass($1)", reg) is None
        ]
        if missing:
            raise SchemaError(f"{', '.join(missing)} missing: run `rq-reconciler migrate`")
        version = self.cfg.version_table
        have = 0
        if await self._p().fetchval("SELECT to_regclass($1)", quote_ident(version)) is not None:
            have = int(await self._p().fetchval(
                f"SELECT coalesce(max(version), 0) FROM {quote_ident(version)}") or 0)
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
        """`status IN ('queued', 'running')`, the words written out: see jobs_sql.read_queries."""
        return active_predicate(self.cfg, alias)

    def _build_sql(self) -> None:
        n, id_type, active = self.names, self.id_type, self.active_predicate()
        select = row_select(n)
        # The claims are built by the request table, which runs them; they are here too
        # because they read the jobs table, and build_queries hands out every statement
        # that does.
        self._sql.update({
            **read_queries(n, id_type, active, select),
            "apply": apply_query(n, id_type),
            **first_seen_queries(n, id_type, active),
            "job_status": f"SELECT {n.status} FROM {n.jobs} WHERE {n.id} = $1::{id_type}",
            **self.requests.build_sql(select),
            **intent_queries(n, id_type),
        })

    # -- reads ----------------------------------------------------------------------------

    async def active_page(self, after: Any, limit: int) -> Page:
        """Up to `limit` active rows after id `after`. A row the database cannot hand over
        (a value no statement of ours foresaw) is found, logged once, counted as poison and
        left out; the page still ends where it would have."""
        try:
            async with translated(self.pool):
                if after is None:
                    recs = await self._p().fetch(self._sql["page_first"], limit)
                else:
                    recs = await self._p().fetch(self._sql["page_next"], limit, after)
        except DataRejected:
            async with translated(self.pool):
                ids = [r[0] for r in await (
                    self._p().fetch(self._sql["page_ids_first"], limit) if after is None else
                    self._p().fetch(self._sql["page_ids_next"], limit, after))]
            rows = await self._read_isolating(self._by_ids, ids)
            return Page(rows, ids[-1] if ids else after, len(ids))
        rows = [active_row(r) for r in recs]
        self._readable(rows)
        return Page(rows, rows[-1].row.id if rows else after, len(rows))

    async def rows_by_rq_ids(self, rq_ids: Sequence[str]) -> list[ActiveRow]:
        """Active rows, and cancelled ones (a cancel holds until RQ agrees). A row that
        cannot be read is left out (logged once, counted as poison)."""
        # An id PostgreSQL cannot even hold (NUL, a lone surrogate) matches no row; sent,
        # it would fail the whole lookup for its neighbours.
        ids = [i for i in rq_ids if storable(i)]
        if not ids:
            return []
        return await self._read_isolating(self._by_rq_ids, ids)

    async def rows_by_ids(self, ids: Sequence[Any]) -> list[ActiveRow]:
        """The rows of `ids`; one that cannot be read is left out (logged once, counted).
        A single id that cannot be read raises DataRejected (logged once, counted): "no
        such row" would be a lie, and the caller (a cancel) says what happened instead."""
        if not ids:
            return []
        return await self._read_isolating(self._by_ids, list(ids), alone_raises=len(ids) == 1)

    async def _by_rq_ids(self, rq_ids: list[Any]) -> list[ActiveRow]:
        s = self.cfg.jobs.statuses
        async with translated(self.pool):
            recs = await self._p().fetch(self._sql["by_rq_ids"], rq_ids, [*s.active, s.cancelled])
        return [active_row(r) for r in recs]

    async def _by_ids(self, ids: list[Any]) -> list[ActiveRow]:
        async with translated(self.pool):
            recs = await self._p().fetch(self._sql["by_ids"], id_texts(ids))
        return [active_row(r) for r in recs]

    async def _read_isolating(self, read: Callable[[list[Any]], Awaitable[list[ActiveRow]]],
                              keys: list[Any], *, alone_raises: bool = False) -> list[ActiveRow]:
        """`read(keys)`; if the database refuses it for one row's sake, halve the keys until
        the row at fault is alone, as `apply` does for writes: it is logged once, reported
        to `on_poison`, and left out (or, `alone_raises`, raised); the others are read."""
        try:
            rows = await read(keys)
        except DataRejected as err:
            if len(keys) == 1:
                self._unreadable(keys[0], err)
                if alone_raises:
                    raise
                return []
            mid = len(keys) // 2
            return (await self._read_isolating(read, keys[:mid])
                    + await self._read_isolating(read, keys[mid:]))
        self._readable(rows)
        return rows

    def _unreadable(self, key: Any, err: DataRejected) -> None:
        shown = str(key)
        if shown in self._poison_reads:
            return
        self._poison_reads.put(shown)
        log.warning("poison_row_read", key=shown, error=str(err), pg_error=err.pg_error,
                    sqlstate=err.sqlstate, hint="the row is skipped until it can be read")
        if self._on_poison is not None:
            self._on_poison("row", shown, str(err))

    def _readable(self, rows: list[ActiveRow]) -> None:
        """Rows read again (changed since, or the statement fixed): poison no more."""
        if self._poison_reads:
            for r in rows:
                self._poison_reads.discard(str(r.row.id))
                if r.row.rq_id:
                    self._poison_reads.discard(r.row.rq_id)

    async def remember_first_seen(self, job_ids: Sequence[Any]) -> None:
        if not job_ids:
            return
        async with translated(self.pool):
            await self._p().execute(self._sql["first_seen"], id_texts(job_ids))

    async def prune_first_seen(self) -> None:
        async with translated(self.pool):
            await self._p().execute(self._sql["prune_first_seen"])

    async def cancel_intents(self, job_ids: Sequence[Any]) -> dict[Any, CancelIntent]:
        if not job_ids:
            return {}
        async with translated(self.pool):
            recs = await self._p().fetch(self._sql["intents"], id_texts(job_ids))
        return {r["job_id"]: CancelIntent(r["who"], r["why"]) for r in recs}

    async def cancel_intents_by_rq_ids(self, rq_ids: Sequence[str]) -> dict[str, CancelIntent]:
        """The latest cancel request (any state) on the row of each of these RQ jobs."""
        ids = [i for i in rq_ids if storable(i)]
        if not ids:
            return {}
        async with translated(self.pool):
            recs = await self._p().fetch(self._sql["intents_by_rq_ids"], ids)
        return {r["rq_id"]: CancelIntent(r["who"], r["why"]) for r in recs}

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
        a job enqueued after its cancel is looked for there by each sweep. A row that
        cannot be read is left out (logged once, counted as poison)."""
        args = (within, self.cfg.jobs.statuses.cancelled, limit)
        try:
            async with translated(self.pool):
                recs = await self._p().fetch(self._sql["recently_cancelled"], *args)
        except DataRejected:
            async with translated(self.pool):
                ids = [r[0] for r in await self._p().fetch(
                    self._sql["recently_cancelled_ids"], *args)]
            return await self._read_isolating(self._by_ids, ids)
        return [active_row(r) for r in recs]

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
        args = (id_texts(c.job_id for c in batch), body, self.cfg.instance.name,
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
                    with suppress(*OUTAGE):
                        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
                        unlocked = True
        finally:
            if not unlocked:
                # Pool connections are not reset on release (see connect): a session that
                # may still hold the lock must not go back to the pool.
                conn.terminate()
            with suppress(*OUTAGE):
                await (conn.close() if own else self._p().release(conn))
