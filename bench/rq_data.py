"""RQ state and job rows for a benchmark, made through RQ's own API (or cloned from what it
writes): a mix of job kinds, years of finished history, and this process posing as an
RQ worker to drive jobs. Writes only to the benchmark's own servers.

SEED: the benchmarks' random seed, so that runs compare."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis
from rq.job import Job, JobStatus
from rq.results import Result

from bench.stack import Env
from reconciler.devstack import (
    Pg,
)

SEED = 20240611


EXC_TEXT = (
    "Traceback (most recent call last):\n"
    '  File "/srv/app/train.py", line 42, in train\n'
    "    raise RuntimeError(msg)\n"
    "RuntimeError: CUDA out of memory (job {i})\n"
)


def create_rq_jobs(conn: redis.Redis, specs: Sequence[tuple[str, str]], *,
                   func: str = "tests.jobs.succeed", batch: int = 1000,
                   worker_name: str = "") -> None:
    """Create RQ job hashes with RQ's API: Job.create + job.save, then set_status; failed ones
    get a failure Result (exc_string) in rq:results:<id>. `specs` is [(rq_id, status)] with
    status one of queued/finished/failed/started/...; status "missing" (or "no_rq_id")
    creates nothing. A started job names `worker_name` as its worker."""
    pipe = conn.pipeline(transaction=False)
    pending = 0
    for rq_id, status in specs:
        if status in ("missing", "no_rq_id"):
            continue
        job = Job.create(func, args=(1,), id=rq_id, connection=conn, result_ttl=-1)
        if status in ("finished", "failed", "stopped", "canceled", "started"):
            job.started_at = datetime.now(UTC)
        if status == "started":
            job.worker_name = worker_name
        elif status in ("finished", "failed", "stopped", "canceled"):
            job.ended_at = datetime.now(UTC)
        job.save(pipeline=pipe)
        job.set_status(JobStatus(status), pipeline=pipe)
        if status == "failed":
            Result.create_failure(job, 86400, exc_string=EXC_TEXT.format(i=rq_id), pipeline=pipe)
        pending += 1
        if pending >= batch:
            pipe.execute()
            pending = 0
    pipe.execute()


# The active rows of issue 13's sweep fixture, by what RQ says of their job: started on a
# live, idle local worker (they stay running), finished, failed (an exception in RQ's
# results stream), stopped or canceled, gone from Redis, and rows that never got an RQ id.
SWEEP_MIX = (("started", 0.50), ("finished", 0.20), ("failed", 0.10), ("stopped", 0.025),
             ("canceled", 0.025), ("missing", 0.10), ("no_rq_id", 0.05))


def mixed_kinds(n: int, rng: Any) -> list[str]:
    """`n` kinds in SWEEP_MIX's shares (any remainder goes to "started"), shuffled by `rng`."""
    kinds: list[str] = []
    for kind, share in SWEEP_MIX:
        kinds += [kind] * int(n * share)
    kinds += ["started"] * (n - len(kinds))
    rng.shuffle(kinds)
    return kinds


def clone_rq_jobs(conn: redis.Redis, specs: Sequence[tuple[str, str]], *,
                  worker_name: str = "", batch: int = 2000) -> None:
    """What create_rq_jobs makes, for many jobs quickly: one job of each status is made
    with RQ's API, and its keys (the job hash; a failed job's results stream) are copied
    to every other id with DUMP / RESTORE. RQ keeps no job id inside these keys, so each
    copy is the job RQ would have written under that id."""
    templates: dict[str, list[tuple[str, bytes]]] = {}
    for status in sorted({st for _, st in specs} - {"missing", "no_rq_id"}):
        tid = f"template-{status}"
        create_rq_jobs(conn, [(tid, status)], worker_name=worker_name)
        keys = [f"rq:job:{tid}", f"rq:results:{tid}"]
        templates[status] = []
        for key in keys:
            dumped = conn.dump(key)
            if dumped is not None:
                templates[status].append((key.rsplit(tid, 1)[0], cast(bytes, dumped)))
        conn.delete(*keys)
    pipe = conn.pipeline(transaction=False)
    for n, (rq_id, status) in enumerate(specs, 1):
        for prefix, dumped in templates.get(status, ()):
            pipe.restore(prefix + rq_id, 0, dumped, replace=True)
        if n % batch == 0:
            pipe.execute()
    pipe.execute()


def seed_mixed(env: Env, kinds: Sequence[str], *, prefix: str, worker_name: str,
               table: str = "training_jobs", clone: bool = False) -> list[tuple[str | None, str]]:
    """RQ jobs (RQ's API; `clone`: clone_rq_jobs) for `kinds` and one `running` row each,
    started an hour ago, appended to `table` by COPY. Returns the rows' (rq_job_id, kind)
    in id order."""
    specs = [(f"{prefix}-{i:07d}", kind) for i, kind in enumerate(kinds)]
    with env.redis_client() as r:
        (clone_rq_jobs if clone else create_rq_jobs)(r, specs, worker_name=worker_name)
    rows = [(None if kind == "no_rq_id" else rq_id, kind) for rq_id, kind in specs]
    with Pg(env.dsn) as pg:
        pg.copy_records(table, [(rq_id, "running", datetime.now(UTC) - timedelta(hours=1))
                                for rq_id, _ in rows], ["rq_job_id", "status", "started_at"])
    return rows


def load_history(dsn: str, n: int, table: str = "training_jobs") -> None:
    """`n` finished rows (completed, failed, cancelled; RQ ids of jobs long gone from Redis)
    as ids 1..n of the seed-shaped table, the way years of history look: loaded by one
    INSERT ... SELECT generate_series with the table's indexes dropped and built again
    afterwards (an order of magnitude faster than inserting into them), then VACUUM
    ANALYZE. The id sequence continues after them: rows added later are the newest."""
    with Pg(dsn) as pg:
        pg.execute("SET maintenance_work_mem = '512MB'")
        pg.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey CASCADE")
        pg.execute(f"DROP INDEX IF EXISTS {table}_rq_job_id_idx")
        pg.execute(
            f"INSERT INTO {table} (id, name, rq_job_id, status, error_message, created_at, "
            "started_at, completed_at) "
            "SELECT g, 'train', 'hist-' || g, "
            "(ARRAY['completed', 'completed', 'completed', 'failed', 'cancelled'])[g % 5 + 1], "
            "CASE g % 5 WHEN 3 THEN 'Synced: RQ failed: RuntimeError: CUDA out of memory' "
            "WHEN 4 THEN 'Cancelled: web:alice / clicked Cancel' END, "
            "ts, ts + interval '1 minute', ts + interval '30 minutes' "
            f"FROM generate_series(1, {int(n)}) g, "
            f"LATERAL (SELECT now() - interval '3 years' + g * (interval '3 years' / {int(n)})) AS x(ts)")
        pg.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id)")
        pg.execute(f"CREATE INDEX {table}_rq_job_id_idx ON {table} (rq_job_id)")
        pg.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {int(n)})")


class DriverWorker:
    """This process registered as an RQ worker (RQ's Worker API: register_birth, heartbeat,
    register_death) and subscribed to its command channel, so that the daemon sees a live
    local worker for the jobs the driver marks `started` (hash present, fresh heartbeat,
    NUMSUB 1, pid alive and older than its birth). Job transitions use RQ's Job API the
    way a real worker does: prepare_for_execution (started), _handle_success (finished)."""

    def __init__(self, conn: redis.Redis, name: str) -> None:
        from rq.command import PUBSUB_CHANNEL_TEMPLATE
        from rq.worker import Worker

        self.conn = conn
        self.name = name
        self.worker = Worker(["default"], connection=conn, name=name)
        self.worker.register_birth()  # type: ignore[no-untyped-call]
        self._pubsub = conn.pubsub()  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(PUBSUB_CHANNEL_TEMPLATE % name)
        self._pubsub.get_message(timeout=1)  # the subscribe confirmation

    def heartbeat(self) -> None:
        self.worker.heartbeat()

    def start_job(self, job: Job, pipe: Any) -> None:
        job.prepare_for_execution(self.name, pipe)

    def finish_job(self, job: Job, pipe: Any) -> datetime:
        from rq.utils import now

        job.ended_at = now()
        job._result = 1
        job._handle_success(-1, pipeline=pipe, worker_name=self.name)
        return job.ended_at

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._pubsub.close()
            self.worker.register_death()  # type: ignore[no-untyped-call]


def pace(t0: float, i: int, rate: float) -> None:
    """Sleep until slot i of a fixed-rate schedule starting at perf_counter() == t0."""
    delay = t0 + i / rate - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
