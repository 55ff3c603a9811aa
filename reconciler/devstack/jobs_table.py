"""The application's side of Postgres, as the demo, tests and bench/ play it: the
seed-shaped jobs table, rows in it, cancel requests, and waiting for outcomes.

Every helper takes a ``Pg`` (one connection, for loops) or a DSN (a connection for
that one call).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import asyncpg

from reconciler.devstack.sync_pg import Pg, pg_fetch
from reconciler.devstack.wait import wait_until

JOBS_TABLE_DDL = """\
CREATE TABLE {table} (
  id bigserial PRIMARY KEY,
  name text NOT NULL DEFAULT 'job',
  rq_job_id text,
  status text NOT NULL DEFAULT 'queued',
  error_message text,
  created_at timestamptz NOT NULL DEFAULT now(),
  started_at timestamptz,
  completed_at timestamptz
);
CREATE INDEX ON {table} (rq_job_id);
"""

_QUALIFIED_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")

Db = Pg | str


def _fetch(db: Db, sql: str, *args: Any) -> list[asyncpg.Record]:
    return db.fetch(sql, *args) if isinstance(db, Pg) else pg_fetch(db, sql, *args)


def create_jobs_table(dsn: str, table: str = "training_jobs") -> None:
    """Create the application's seed-shaped jobs table (``JOBS_TABLE_DDL``) in ``dsn``."""
    if not _QUALIFIED_IDENT_RE.match(table):
        raise ValueError(f"bad table name {table!r}")
    with Pg(dsn) as pg:
        pg.execute(JOBS_TABLE_DDL.format(table=table))


def insert_job(db: Db, rq_id: str | None, status: str = "running",
               started_ago: float | None = 3600.0, table: str = "training_jobs") -> int:
    started = None if started_ago is None else f"now() - make_interval(secs => {started_ago})"
    rows = _fetch(db, f"INSERT INTO {table} (rq_job_id, status, started_at) VALUES "
                      f"($1, $2, {started or 'NULL'}) RETURNING id", rq_id, status)
    return int(rows[0]["id"])


def row(db: Db, job_id: int, table: str = "training_jobs") -> dict[str, Any]:
    return dict(_fetch(db, f"SELECT * FROM {table} WHERE id = $1", job_id)[0])


def statuses(db: Db, ids: Sequence[int]) -> dict[int, str]:
    rows = _fetch(db, "SELECT id, status FROM training_jobs WHERE id = ANY($1::bigint[])", list(ids))
    return {int(r["id"]): str(r["status"]) for r in rows}


def transitions(db: Db, job_id: int) -> list[dict[str, Any]]:
    """The audit rows of ``job_id``, oldest first."""
    return [dict(r) for r in _fetch(db, "SELECT * FROM rq_reconciler_events WHERE job_id = $1 "
                                        "ORDER BY id", str(job_id))]


def wait_status(db: Db, job_id: int, want: str, timeout: float = 15) -> dict[str, Any]:
    """Wait until the row's status is ``want``; return the row."""
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        last.update(row(db, job_id))
        return dict(last) if last["status"] == want else None

    found = wait_until(reached, timeout, lambda: f"job {job_id} to be {want!r} (is {last})")
    assert found is not None
    return found


def request_cancel(db: Db, job_id: int, by: str = "test", reason: str = "test") -> int:
    """INSERT a cancel request, as the app does; return its id."""
    rows = _fetch(db, "INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
                      "VALUES ($1, $2, $3) RETURNING id", job_id, by, reason)
    return int(rows[0]["id"])


def wait_request(db: Db, request_id: int, timeout: float = 30) -> dict[str, Any]:
    """Wait until the request is done; return it, its ``detail`` parsed."""
    last: dict[str, Any] = {}

    def done() -> dict[str, Any] | None:
        last.update(_fetch(db, "SELECT * FROM rq_reconciler_cancel_requests WHERE id = $1",
                           request_id)[0])
        if last["state"] != "done":
            return None
        return {**last, "detail": json.loads(last["detail"]) if last["detail"] else None}

    found = wait_until(done, timeout, lambda: f"request {request_id} to be done (is {last})")
    assert found is not None
    return found
