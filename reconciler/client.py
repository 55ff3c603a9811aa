"""The application's side of a cancel: insert a request, optionally wait for its outcome.

    from reconciler.client import cancel, cancel_async

    out = cancel(dbapi_conn, job_id, reason="clicked Cancel", requested_by="web:alice", wait=30)
    out = await cancel_async(asyncpg_pool, job_id, reason="clicked Cancel", wait=30)
    return out.as_dict()        # {"success": true, "message": "Job 123 cancelled successfully", ...}

`cancel` takes any DB-API connection the app already has (psycopg 3, psycopg2, SQLAlchemy's
`engine.raw_connection()`); `cancel_async` an asyncpg connection or pool.

Where rq-reconciler's config names another requests table or channel than the defaults
(`cancel.requests_table`, `cancel.channel`), say so once, at start-up, and every call uses
it (a call's own `requests_table=` / `channel=` still wins):

    from reconciler import client
    client.configure(requests_table="app.rq_reconciler_cancel_requests")
    # or from the daemon's own config file:
    client.configure_from(reconciler.config.load("/etc/rq-reconciler/config.toml"))
    # or, to keep several apart, a Client of one's own:
    cancels = client.Client(requests_table="app.rq_reconciler_cancel_requests")
    out = cancels.cancel(conn, job_id, reason="...", wait=30) Nothing here adds
a dependency: it speaks SQL through the app's own driver, with the privileges that
`rq-reconciler migrate --print-grants` prints (INSERT of job_id, requested_by, reason; SELECT
of the outcome columns), and nothing more.

Must never touch RQ or the jobs table: the daemon does the cancelling; this only writes
the request and reads its outcome.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from reconciler.config import _IDENT, derived_ident, quote_ident
from reconciler.errors import InvalidJobId, ReconcilerError, UnknownJob
from reconciler.model import clean_text, storable

if TYPE_CHECKING:
    from reconciler.config import Config

__all__ = [
    "DEFAULT_CHANNEL",
    "DEFAULT_REQUESTS_TABLE",
    "CancelOutcome",
    "CancelTimeout",
    "Client",
    "InvalidJobId",
    "UnknownJob",
    "cancel",
    "cancel_async",
    "configure",
    "configure_from",
]

DEFAULT_REQUESTS_TABLE = "rq_reconciler_cancel_requests"
DEFAULT_CHANNEL = "rq_reconciler_cancel"

# Waiting polls the request row even where a NOTIFY wakes us: a NOTIFY is lost when the
# LISTEN connection goes through a transaction-mode pooler, and a sync DB-API connection
# has no portable way to receive one at all. A primary-key read costs nothing.
RECHECK_SECONDS = 1.0
POLL_FIRST, POLL_MAX = 0.02, 0.25
# SQLSTATEs: foreign_key_violation (no such job), and the ones a job id that is not a value
# of the id column's type raises (invalid_text_representation, numeric_value_out_of_range,
# invalid_datetime_format, string_data_right_truncation, datetime_field_overflow).
_FK_VIOLATION = "23503"
_BAD_VALUE = frozenset({"22P02", "22003", "22007", "22001", "22008", "22021"})
# libpq's transaction states, the same numbers in psycopg2's and psycopg 3's conn.info.
_TX_IDLE, _TX_INTRANS, _TX_INERROR = 0, 2, 3


class CancelTimeout(ReconcilerError, TimeoutError):
    """No outcome within `wait` seconds. The request stays in the table and is carried out
    once a daemon runs; `request_id` names it for a later look."""

    def __init__(self, job_id: str, request_id: int, wait: float, state: str) -> None:
        super().__init__(f"no outcome for the cancel of job {job_id!r} (request {request_id}, "
                         f"still {state}) within {wait:g} s: is rq-reconciler running? The "
                         "request stays and is carried out when it is.")
        self.job_id, self.request_id, self.wait, self.state = job_id, request_id, wait, state


@dataclass(frozen=True)
class CancelOutcome:
    """What became of a cancel request (or that it is still pending, without `wait`).

    `outcome`: "cancelled", "already_finished" or "failed"; None until `state` is "done".
    `detail`: the daemon's JSON (at least `success` and `message`; `rq_cancelled`,
    `horse_signals`, `status`, `path`, `graceful` where they apply)."""

    request_id: int
    job_id: str
    state: str
    outcome: str | None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def success(self) -> bool:
        return self.outcome == "cancelled"

    @property
    def graceful(self) -> bool | None:
        """True if the job got SIGTERM first; False if it was stopped without (RQ's
        stop-job is an immediate SIGKILL); None if no running job was signalled."""
        g = self.detail.get("graceful")
        return g if isinstance(g, bool) else None

    @property
    def message(self) -> str:
        msg = self.detail.get("message")
        if isinstance(msg, str):
            return msg
        if not self.done:
            return f"Cancel of job {self.job_id} requested (request {self.request_id})"
        return f"Job {self.job_id}: {self.outcome}"

    def as_dict(self) -> dict[str, Any]:
        """The detail as the seed's endpoint answered it (`success`, `message`, ...), plus
        `outcome`, `request_id` and `job_id`."""
        return {**self.detail, "success": self.success, "message": self.message,
                "outcome": self.outcome, "state": self.state, "request_id": self.request_id,
                "job_id": self.job_id}


class DBAPIConnection(Protocol):
    """The part of PEP 249 used here."""

    def cursor(self) -> Any: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...


def _names(requests_table: str, channel: str) -> tuple[str, str]:
    """(quoted table, done channel), by the same identifier rules as the config's."""
    parts = requests_table.split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise ValueError(f"requests_table {requests_table!r} is not a plain (schema.)table name")
    if not _IDENT.match(channel):
        raise ValueError(f"channel {channel!r} is not a plain identifier")
    return quote_ident(requests_table), derived_ident(channel, "_done")


def _check_wait(wait: float | None) -> float | None:
    """`wait` as seconds: None (do not wait) or a finite number >= 0. A NaN would make the
    deadline never come (every comparison with it is false), an infinity never end."""
    if wait is None:
        return None
    if isinstance(wait, bool) or not isinstance(wait, int | float):
        raise TypeError(f"wait must be a number of seconds or None, got {type(wait).__name__}")
    if not math.isfinite(wait) or wait < 0:
        raise ValueError(f"wait must be a finite number of seconds >= 0 (or None), got {wait!r}")
    return float(wait)


@dataclass(frozen=True)
class Client:
    """Where cancel requests go: the requests table and the channel whose `_done` the
    outcome is NOTIFYed on, as `cancel.requests_table` and `cancel.channel` in
    rq-reconciler's config. Checked when made (ValueError for a name that is not a plain
    identifier)."""

    requests_table: str = DEFAULT_REQUESTS_TABLE
    channel: str = DEFAULT_CHANNEL

    def __post_init__(self) -> None:
        _names(self.requests_table, self.channel)

    @classmethod
    def from_config(cls, cfg: Config) -> Client:
        """The names a loaded rq-reconciler config gives (reconciler.config.load)."""
        return cls(requests_table=cfg.cancel.requests_table, channel=cfg.cancel.channel)

    def cancel(self, conn: DBAPIConnection, job_id: Any, *, reason: str,
               requested_by: str | None = None, wait: float | None = None) -> CancelOutcome:
        """`cancel()` on this client's table and channel."""
        return cancel(conn, job_id, reason=reason, requested_by=requested_by, wait=wait,
                      requests_table=self.requests_table, channel=self.channel)

    async def cancel_async(self, db: Any, job_id: Any, *, reason: str,
                           requested_by: str | None = None,
                           wait: float | None = None) -> CancelOutcome:
        """`cancel_async()` on this client's table and channel."""
        return await cancel_async(db, job_id, reason=reason, requested_by=requested_by,
                                  wait=wait, requests_table=self.requests_table,
                                  channel=self.channel)


_configured = Client()


def configure(*, requests_table: str | None = None, channel: str | None = None) -> Client:
    """Set the requests table and/or channel that `cancel` and `cancel_async` use when a call
    names none (once, at the app's start-up); returns the Client now in use. What is not
    given keeps its current value."""
    global _configured
    _configured = Client(
        requests_table=_configured.requests_table if requests_table is None else requests_table,
        channel=_configured.channel if channel is None else channel)
    return _configured


def configure_from(cfg: Config) -> Client:
    """`configure()` from a loaded rq-reconciler config (reconciler.config.load)."""
    return configure(requests_table=cfg.cancel.requests_table, channel=cfg.cancel.channel)


def _resolved(requests_table: str | None, channel: str | None) -> tuple[str, str]:
    return (_configured.requests_table if requests_table is None else requests_table,
            _configured.channel if channel is None else channel)


# -- SQL: the same statements for both drivers; {p1}.. are the driver's placeholders ----------

# The id goes in as text and is cast to what job_id is (bigint, uuid, text, a domain...), so
# that "123" from a URL works for a bigint column and a uuid object for a uuid one. The type
# comes from the catalog, never from input.
_ID_TYPE = ("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass({p1}) AND attname = 'job_id' AND NOT attisdropped")
# Named only on the error path, to say which job table refused the id.
_FK_TARGET = ("SELECT c.confrelid::regclass::text, a.attname::text FROM pg_constraint c "
              "JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = c.confkey[1] "
              "WHERE c.conrelid = to_regclass({p1}) AND c.contype = 'f' LIMIT 1")
# requested_by is left out when not given: the column defaults to current_user.
_INSERT = "INSERT INTO {table} (job_id, reason{by_col}) VALUES ({p1}::text::{id_type}, {p2}{by}) RETURNING id"
_OUTCOME = "SELECT state, outcome, detail::text FROM {table} WHERE id = {p1}"


def _insert_sql(table: str, id_type: str, with_by: bool, ph: Sequence[str]) -> str:
    return _INSERT.format(table=table, id_type=id_type, p1=ph[0], p2=ph[1],
                          by_col=", requested_by" if with_by else "",
                          by=f", {ph[2]}" if with_by else "")


def _texts(job_id: Any, reason: str, requested_by: str | None) -> tuple[str, str, str | None]:
    """The id as text (refused if no column type could hold it) and the free texts made fit
    for a text column (a NUL byte or a lone surrogate would fail the INSERT)."""
    jid = str(job_id)
    if not storable(jid):
        raise InvalidJobId(f"{jid!r} is not a valid job id (NUL byte or undecodable text)")
    return jid, clean_text(reason), None if requested_by is None else clean_text(requested_by)


def _outcome(job_id: str, rid: int, rec: Sequence[Any] | None) -> CancelOutcome:
    if rec is None:
        # Deleted under us: ON DELETE CASCADE from the job row.
        raise UnknownJob(f"job {job_id!r} was deleted (cancel request {rid} went with it)")
    state, outcome, raw = rec[0], rec[1], rec[2]
    detail = json.loads(raw) if raw else {}
    return CancelOutcome(rid, job_id, str(state), outcome, detail if isinstance(detail, dict) else {})


def _unknown(job_id: str, target: Sequence[Any] | None) -> UnknownJob:
    where = f" in {target[0]}" if target else ""
    column = target[1] if target else "id"
    return UnknownJob(f"no job with {column} = {job_id!r}{where}: the cancel request was "
                      "refused (foreign key)", sqlstate=_FK_VIOLATION)


def _invalid(job_id: str, id_type: str, sqlstate: str) -> InvalidJobId:
    return InvalidJobId(f"{job_id!r} is not a valid {id_type} id", sqlstate=sqlstate)


def _no_table(requests_table: str) -> ReconcilerError:
    return ReconcilerError(f"{requests_table} not found (or this role may not see it): run "
                           "`rq-reconciler migrate`, and check cancel.requests_table / the "
                           "search_path (a schema-qualified name avoids the question)")


# -- async: asyncpg -------------------------------------------------------------------------


async def cancel_async(db: Any, job_id: Any, *, reason: str, requested_by: str | None = None,
                       wait: float | None = None,
                       requests_table: str | None = None,
                       channel: str | None = None) -> CancelOutcome:
    """Request the cancel of `job_id` (the jobs table's id: int, str, UUID...) on an asyncpg
    connection or pool. Without `wait`, return at once (state "pending"); with it, wait up
    to `wait` seconds (finite, >= 0; else ValueError) for the outcome, else raise
    CancelTimeout. `requests_table` and `channel`: those `configure()` set (by default
    rq-reconciler's defaults) unless given here.

    UnknownJob: no such job. InvalidJobId: not a value of the id column's type. A
    transaction of the caller's own is kept: the INSERT runs in a savepoint, and commits
    with it; waiting inside one is refused (the daemon could not see the request)."""
    wait = _check_wait(wait)
    requests_table, channel = _resolved(requests_table, channel)
    table, done_channel = _names(requests_table, channel)
    jid, reason, requested_by = _texts(job_id, reason, requested_by)
    if hasattr(db, "acquire"):  # a pool: one connection for the LISTEN, the INSERT and reads
        async with db.acquire() as conn:
            return await _cancel_on(conn, table, requests_table, done_channel, jid, reason,
                                    requested_by, wait)
    return await _cancel_on(db, table, requests_table, done_channel, jid, reason, requested_by,
                            wait)


async def _cancel_on(conn: Any, table: str, requests_table: str, done_channel: str, jid: str,
                     reason: str, requested_by: str | None, wait: float | None) -> CancelOutcome:
    import asyncpg

    in_tx = bool(conn.is_in_transaction())
    if wait is not None and in_tx:
        raise ReconcilerError("cancel_async(wait=...) inside a transaction: the daemon cannot "
                              "see the request before it commits; commit first, or omit wait")
    id_type = await conn.fetchval(_ID_TYPE.format(p1="$1"), table)
    if id_type is None:
        raise _no_table(requests_table)
    args: list[Any] = [jid, reason] + ([requested_by] if requested_by is not None else [])
    sql = _insert_sql(table, str(id_type), requested_by is not None, ("$1", "$2", "$3"))
    got = asyncio.Event()

    def wake(*_a: Any) -> None:
        got.set()

    if wait is not None:
        # Before the INSERT, or its NOTIFY could come and go unheard.
        await conn.add_listener(done_channel, wake)
    try:
        try:
            if in_tx:
                async with conn.transaction():  # a savepoint: a refusal keeps the caller's tx
                    rid = int(await conn.fetchval(sql, *args))
            else:
                rid = int(await conn.fetchval(sql, *args))
        except asyncpg.ForeignKeyViolationError as exc:
            target = await conn.fetchrow(_FK_TARGET.format(p1="$1"), table)
            raise _unknown(jid, target) from exc
        except asyncpg.PostgresError as exc:
            state = str(getattr(exc, "sqlstate", "") or "")
            if state in _BAD_VALUE:
                raise _invalid(jid, str(id_type), state) from exc
            raise
        read = _OUTCOME.format(table=table, p1="$1")
        out = _outcome(jid, rid, await conn.fetchrow(read, rid))
        if wait is None or out.done:
            return out
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CancelTimeout(jid, rid, wait, out.state)
            got.clear()
            try:
                async with asyncio.timeout(min(left, RECHECK_SECONDS)):
                    await got.wait()
            except TimeoutError:
                pass
            out = _outcome(jid, rid, await conn.fetchrow(read, rid))
            if out.done:
                return out
    finally:
        if wait is not None:
            await conn.remove_listener(done_channel, wake)


# -- sync: any DB-API connection ------------------------------------------------------------


def _placeholders(conn: Any) -> tuple[str, str, str]:
    """The driver module's paramstyle (PEP 249 puts it on the module, not the connection)."""
    raw = _driver_connection(conn)
    module = sys.modules.get(type(raw).__module__.partition(".")[0])
    style = getattr(module, "paramstyle", "pyformat")
    if style == "qmark":
        return ("?", "?", "?")
    if style in ("numeric", "numeric_dollar"):
        mark = ":" if style == "numeric" else "$"
        return (f"{mark}1", f"{mark}2", f"{mark}3")
    if style == "named":
        return (":p1", ":p2", ":p3")
    return ("%s", "%s", "%s")  # format / pyformat: psycopg 3, psycopg2, pg8000


def _params(conn: Any, values: Sequence[Any]) -> Any:
    raw = _driver_connection(conn)
    module = sys.modules.get(type(raw).__module__.partition(".")[0])
    if getattr(module, "paramstyle", "") == "named":
        return {f"p{i}": v for i, v in enumerate(values, 1)}
    return tuple(values)


def _driver_connection(conn: Any) -> Any:
    """The driver's own connection behind SQLAlchemy's pool proxy (its `.info` is a dict of
    SQLAlchemy's, not the driver's)."""
    return getattr(conn, "dbapi_connection", None) or conn


def _tx_status(conn: Any) -> int | None:
    """libpq's transaction status where the driver tells it (psycopg2, psycopg 3)."""
    info = getattr(_driver_connection(conn), "info", None)
    status = getattr(info, "transaction_status", None)
    try:
        return int(status) if status is not None else None
    except (TypeError, ValueError):
        return None


def _sqlstate(exc: BaseException) -> str:
    for attr in ("sqlstate", "pgcode"):  # psycopg 3, psycopg2
        value = getattr(exc, attr, None)
        if value:
            return str(value)
    arg = exc.args[0] if exc.args else None
    if isinstance(arg, dict):  # pg8000
        return str(arg.get("C", ""))
    return ""


@contextmanager
def _cursor(conn: Any) -> Iterator[Any]:
    cur = conn.cursor()
    try:
        yield cur
    finally:
        cur.close()


def _one(conn: Any, sql: str, params: Any) -> Sequence[Any] | None:
    with _cursor(conn) as cur:
        cur.execute(sql, params)
        row: Sequence[Any] | None = cur.fetchone()
        return row


def cancel(conn: DBAPIConnection, job_id: Any, *, reason: str, requested_by: str | None = None,
           wait: float | None = None, requests_table: str | None = None,
           channel: str | None = None) -> CancelOutcome:
    """`cancel_async` for a DB-API connection (psycopg 3, psycopg2, SQLAlchemy's raw
    connection). Called outside a transaction, it commits its INSERT (the daemon sees the
    request at once). Called inside one, it leaves the commit to the caller and runs the
    INSERT in a savepoint (a refusal keeps the caller's transaction); `wait` is then
    refused. A driver that does not say whether a transaction is open is taken to have none.
    Waiting polls the request row (a few ms at first, then every 250 ms)."""
    wait = _check_wait(wait)
    requests_table, channel = _resolved(requests_table, channel)
    table, _done = _names(requests_table, channel)  # channel unused: the sync side polls
    jid, reason, requested_by = _texts(job_id, reason, requested_by)
    status = _tx_status(conn)
    in_tx = status in (_TX_INTRANS, _TX_INERROR)
    if wait is not None and in_tx:
        raise ReconcilerError("cancel(wait=...) inside a transaction: the daemon cannot see the "
                              "request before it commits; commit first, or omit wait")
    ph = _placeholders(conn)
    id_type = _one(conn, _ID_TYPE.format(p1=ph[0]), _params(conn, [table]))
    if id_type is None or id_type[0] is None:
        if not in_tx:
            conn.rollback()
        raise _no_table(requests_table)
    values: list[Any] = [jid, reason] + ([requested_by] if requested_by is not None else [])
    sql = _insert_sql(table, str(id_type[0]), requested_by is not None, ph)
    if in_tx:
        _one_statement(conn, "SAVEPOINT rq_reconciler_cancel")
    try:
        rec = _one(conn, sql, _params(conn, values))
    except Exception as exc:
        state = _sqlstate(exc)
        if state not in _BAD_VALUE and state != _FK_VIOLATION:
            raise
        if in_tx:
            _one_statement(conn, "ROLLBACK TO SAVEPOINT rq_reconciler_cancel")
        else:
            conn.rollback()
        if state in _BAD_VALUE:
            raise _invalid(jid, str(id_type[0]), state) from exc
        target = _one(conn, _FK_TARGET.format(p1=ph[0]), _params(conn, [table]))
        if not in_tx:
            conn.rollback()
        raise _unknown(jid, target) from exc
    assert rec is not None  # INSERT ... RETURNING gives one row
    rid = int(rec[0])
    if in_tx:
        _one_statement(conn, "RELEASE SAVEPOINT rq_reconciler_cancel")
        return CancelOutcome(rid, jid, "pending", None)
    conn.commit()
    read = _OUTCOME.format(table=table, p1=ph[0])
    out = _read_outcome(conn, read, jid, rid)
    if wait is None or out.done:
        return out
    deadline = time.monotonic() + wait
    pause = POLL_FIRST
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CancelTimeout(jid, rid, wait, out.state)
        time.sleep(min(pause, left))
        pause = min(pause * 2, POLL_MAX)
        out = _read_outcome(conn, read, jid, rid)
        if out.done:
            return out


def _read_outcome(conn: Any, sql: str, jid: str, rid: int) -> CancelOutcome:
    rec = _one(conn, sql, _params(conn, [rid]))
    # End the read's own transaction (no-op under autocommit): a connection left "idle in
    # transaction" while we sleep would hold a snapshot and a pooled server connection.
    conn.rollback()
    return _outcome(jid, rid, rec)


def _one_statement(conn: Any, sql: str) -> None:
    with _cursor(conn) as cur:
        cur.execute(sql)
