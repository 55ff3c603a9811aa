"""The seed's training API on rq-reconciler: `DELETE /api/training/{job_id}` is one call.

    DATABASE_URL=postgresql://app@db/app REDIS_URL=redis://redis:6379/0 \\
        uvicorn examples.training_api:app

What the application writes, and what it leaves to the daemon:

- `POST /api/training` inserts the row as `queued` with the RQ job id it is about to use,
  then enqueues the job under that id. (The id is stored first so that the row never
  lacks it; if the enqueue fails the row is failed here. The daemon gives a row whose job
  is not in RQ yet `sweep.min_age_seconds` before calling it orphaned.)
- The daemon sets `running` (and `started_at`), `completed` / `failed` (and
  `completed_at`, `error_message`: "Synced: ...", "Orphaned: ...") as RQ moves.
- `DELETE /api/training/{job_id}` asks for the cancel and waits for the outcome: the daemon
  stops the job (SIGTERM to the work-horse first, so `training_jobs.train` saves a
  checkpoint), marks the row `cancelled` and answers; the JSON is the seed's:
  `{"success": true, "message": "Job 123 cancelled successfully", "rq_cancelled": true}`.

Status codes: 200 cancelled; 409 the job had already finished (`outcome:
already_finished`); 404 no such job; 500 the daemon could not stop it (`outcome: failed`,
`message` says why); 202 no outcome within CANCEL_WAIT_SECONDS (the request is durable:
the daemon carries it out when it runs; `request_id` names it).
"""

from __future__ import annotations

import asyncio
import os
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

from reconciler.client import CancelTimeout, InvalidJobId, UnknownJob, cancel_async

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CANCEL_WAIT_SECONDS = float(os.environ.get("CANCEL_WAIT_SECONDS", "30"))
# Where the example job writes its checkpoint when stopped ("" = nowhere).
CHECKPOINT_DIR = os.environ.get("CHECKPOINT_DIR", "")
STATUS_CODE = {"cancelled": 200, "already_finished": 409, "failed": 500}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.db = await asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=5)
    app.state.redis = redis.Redis.from_url(REDIS_URL)
    try:
        yield
    finally:
        await app.state.db.close()
        app.state.redis.close()


app = FastAPI(title="training API (rq-reconciler example)", lifespan=lifespan)


class NewJob(BaseModel):
    name: str = "train"
    seconds: float = 60.0


@app.post("/api/training", status_code=201)
async def start_training(job: NewJob) -> Any:
    rq_id = str(uuid.uuid4())
    job_id = await app.state.db.fetchval(
        "INSERT INTO training_jobs (name, status, rq_job_id) VALUES ($1, 'queued', $2) "
        "RETURNING id", job.name, rq_id)
    checkpoint = os.path.join(CHECKPOINT_DIR, f"{job_id}.txt") if CHECKPOINT_DIR else None
    queue = Queue("default", connection=app.state.redis)
    try:
        await asyncio.to_thread(queue.enqueue, "examples.training_jobs.train", job.seconds,
                                checkpoint, job_id=rq_id, job_timeout=-1)
    except redis.RedisError as exc:
        await app.state.db.execute(
            "UPDATE training_jobs SET status = 'failed', error_message = $2 WHERE id = $1",
            job_id, f"enqueue failed: {exc}")
        return JSONResponse({"success": False, "message": f"could not enqueue: {exc}"}, 503)
    return {"id": job_id, "rq_job_id": rq_id, "status": "queued"}


@app.get("/api/training/{job_id}")
async def get_training(job_id: int) -> Any:
    rec = await app.state.db.fetchrow(
        "SELECT id, name, status, error_message, started_at, completed_at FROM training_jobs "
        "WHERE id = $1", job_id)
    if rec is None:
        return JSONResponse({"success": False, "message": f"Job {job_id} not found"}, 404)
    return dict(rec)


@app.delete("/api/training/{job_id}")
async def cancel_training(job_id: str) -> JSONResponse:
    try:
        out = await cancel_async(app.state.db, job_id, reason="cancelled from the API",
                                 requested_by="api", wait=CANCEL_WAIT_SECONDS)
    except (UnknownJob, InvalidJobId):
        return JSONResponse({"success": False, "message": f"Job {job_id} not found"}, 404)
    except CancelTimeout as exc:
        return JSONResponse({"success": False, "request_id": exc.request_id, "state": exc.state,
                             "message": f"Cancel of job {job_id} requested; not confirmed within "
                                        f"{CANCEL_WAIT_SECONDS:g} s"}, 202)
    assert out.outcome is not None  # done: waiting returns only a finished request
    return JSONResponse(out.as_dict(), STATUS_CODE[out.outcome])
