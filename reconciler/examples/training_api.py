"""The seed's training API on rq-reconciler: `DELETE /api/training/{job_id}` is one call.

    DATABASE_URL=postgresql://app@db/app REDIS_URL=redis://redis:6379/0 \\
        uvicorn examples.training_api:app

Its table and columns come from the environment, and must be the ones rq-reconciler's
config names (defaults: the seed's `training_jobs` and rq-reconciler's defaults):

    JOBS_TABLE             [jobs] table              training_jobs (may be schema.table)
    JOBS_ID_COLUMN         [jobs] id_column          id (any type: bigint, uuid, text)
    JOBS_STATUS_COLUMN     [jobs] status_column      status
    JOBS_RQ_ID_COLUMN      [jobs] rq_id_column       rq_job_id
    JOBS_ERROR_COLUMN      [jobs] error_column       error_message
    JOBS_NAME_COLUMN       a column for POST's "name"  name ("" if the table has none)
    CANCEL_REQUESTS_TABLE  [cancel] requests_table   rq_reconciler_cancel_requests
    CANCEL_CHANNEL         [cancel] channel          rq_reconciler_cancel

Give CANCEL_REQUESTS_TABLE schema-qualified when it is not in the role's search_path (as
`migrate` says when it creates it beside a schema-qualified jobs table).

What the application writes, and what it leaves to the daemon:

- `POST /api/training` inserts the row as `queued` with the RQ job id it is about to use,
  then enqueues the job under that id. (The id is stored first so that the row never
  lacks it; if the enqueue fails the row is failed here. The daemon gives a row whose job
  is not in RQ yet `sweep.min_age_seconds` before calling it orphaned.)
- The daemon sets `running` (and `started_at`), `completed` / `failed` (and
  `completed_at`, `error_message`: "Synced: ...", "Orphaned: ...") as RQ moves.
- `GET /api/training/{job_id}` answers the row, every column.
- `DELETE /api/training/{job_id}` asks for the cancel and waits for the outcome: the daemon
  stops the job (SIGTERM to the work-horse first, so `training_jobs.train` saves a
  checkpoint), marks the row `cancelled` and answers; the JSON is the seed's:
  `{"success": true, "message": "Job 123 cancelled successfully", "rq_cancelled": true}`.

Status codes: 200 cancelled; 409 the job had already finished (`outcome:
already_finished`); 404 no such job; 500 the daemon could not stop it (`outcome: failed`,
`message` says why), or the request could not be made (`message` says why: e.g. the
requests table is not where CANCEL_REQUESTS_TABLE says); 202 no outcome within
CANCEL_WAIT_SECONDS (the request is durable: the daemon carries it out when it runs;
`request_id` names it).
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import redis
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from rq import Queue

from reconciler import client
from reconciler.client import CancelTimeout, InvalidJobId, UnknownJob
from reconciler.config import quote_ident
from reconciler.errors import ReconcilerError

from . import training_jobs

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CANCEL_WAIT_SECONDS = float(os.environ.get("CANCEL_WAIT_SECONDS", "30"))
# Where the example job writes its checkpoint when stopped ("" = nowhere).
CHECKPOINT_DIR = os.environ.get("CHECKPOINT_DIR", "")
STATUS_CODE = {"cancelled": 200, "already_finished": 409, "failed": 500}


# What rq-reconciler's config accepts as a column or table name (schema.table for tables).
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")


def _name(var: str, default: str, *, qualified: bool = False) -> str:
    """A table or column name from the environment, checked (it goes into SQL)."""
    value = os.environ.get(var, default)
    parts = value.split(".") if qualified else [value]
    if len(parts) > 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise SystemExit(f"training_api: ${var}={value!r} is not a plain "
                         f"{'(schema.)table' if qualified else 'column'} name")
    return value


TABLE_NAME = _name("JOBS_TABLE", "training_jobs", qualified=True)
ID_NAME = _name("JOBS_ID_COLUMN", "id")
TABLE = quote_ident(TABLE_NAME)
ID = quote_ident(ID_NAME)
STATUS = quote_ident(_name("JOBS_STATUS_COLUMN", "status"))
RQ_ID = quote_ident(_name("JOBS_RQ_ID_COLUMN", "rq_job_id"))
ERROR = quote_ident(_name("JOBS_ERROR_COLUMN", "error_message"))
NAME = quote_ident(_name("JOBS_NAME_COLUMN", "name")) if os.environ.get("JOBS_NAME_COLUMN", "name") else ""
try:
    client.configure(
        requests_table=os.environ.get("CANCEL_REQUESTS_TABLE", client.DEFAULT_REQUESTS_TABLE),
        channel=os.environ.get("CANCEL_CHANNEL", client.DEFAULT_CHANNEL))
except ValueError as exc:
    raise SystemExit(f"training_api: $CANCEL_REQUESTS_TABLE / $CANCEL_CHANNEL: {exc}") from None

# The id column's type, read at start-up: a path's text is cast to it in SQL, so that
# bigint, uuid and text ids all work, and a text that cannot be one is a 404.
_ID_TYPE = ("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped")
_NOT_AN_ID = (asyncpg.DataError,)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.db = await asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=5)
    app.state.redis = redis.Redis.from_url(REDIS_URL)
    try:
        id_type = await app.state.db.fetchval(_ID_TYPE, TABLE, ID_NAME)
        if id_type is None:
            raise RuntimeError(f"training_api: no column {ID_NAME!r} in table {TABLE_NAME!r} "
                               "($JOBS_TABLE / $JOBS_ID_COLUMN, and the search_path)")
        app.state.id_type = str(id_type)
        yield
    finally:
        await app.state.db.close()
        app.state.redis.close()


app = FastAPI(title="training API (rq-reconciler example)", lifespan=lifespan)


class NewJob(BaseModel):
    name: str = "train"
    seconds: float = 60.0


def _not_found(job_id: object) -> JSONResponse:
    return JSONResponse({"success": False, "message": f"Job {job_id} not found"}, 404)


@app.post("/api/training", status_code=201)
async def start_training(job: NewJob) -> Any:
    rq_id = str(uuid.uuid4())
    columns, values = f"{STATUS}, {RQ_ID}", "'queued', $1"
    args: list[Any] = [rq_id]
    if NAME:
        columns, values = f"{columns}, {NAME}", f"{values}, $2"
        args.append(job.name)
    job_id = await app.state.db.fetchval(
        f"INSERT INTO {TABLE} ({columns}) VALUES ({values}) RETURNING {ID}", *args)
    checkpoint = os.path.join(CHECKPOINT_DIR, f"{job_id}.txt") if CHECKPOINT_DIR else None
    queue = Queue("default", connection=app.state.redis)
    try:
        await asyncio.to_thread(queue.enqueue, training_jobs.train, job.seconds,
                                checkpoint, job_id=rq_id, job_timeout=-1)
    except redis.RedisError as exc:
        await app.state.db.execute(
            f"UPDATE {TABLE} SET {STATUS} = 'failed', {ERROR} = $2 WHERE {ID} = $1",
            job_id, f"enqueue failed: {exc}")
        return JSONResponse({"success": False, "message": f"could not enqueue: {exc}"}, 503)
    return {"id": str(job_id) if isinstance(job_id, uuid.UUID) else job_id,
            "rq_job_id": rq_id, "status": "queued"}


@app.get("/api/training/{job_id}")
async def get_training(job_id: str) -> Any:
    try:
        rec = await app.state.db.fetchrow(
            f"SELECT * FROM {TABLE} WHERE {ID} = $1::text::{app.state.id_type}", job_id)
    except _NOT_AN_ID:
        return _not_found(job_id)
    if rec is None:
        return _not_found(job_id)
    return dict(rec)


@app.delete("/api/training/{job_id}")
async def cancel_training(job_id: str) -> JSONResponse:
    try:
        out = await client.cancel_async(app.state.db, job_id, reason="cancelled from the API",
                                        requested_by="api", wait=CANCEL_WAIT_SECONDS)
    except (UnknownJob, InvalidJobId):
        return _not_found(job_id)
    except CancelTimeout as exc:
        return JSONResponse({"success": False, "request_id": exc.request_id, "state": exc.state,
                             "message": f"Cancel of job {job_id} requested; not confirmed within "
                                        f"{CANCEL_WAIT_SECONDS:g} s"}, 202)
    except ReconcilerError as exc:  # e.g. the requests table is not where it was said to be
        return JSONResponse({"success": False, "message": f"Cancel of job {job_id} could not be "
                                                          f"requested: {exc}"}, 500)
    assert out.outcome is not None  # done: waiting returns only a finished request
    return JSONResponse(out.as_dict(), STATUS_CODE[out.outcome])
