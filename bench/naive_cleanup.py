"""The seed's `cleanup_orphaned_training_jobs()` written the naive way: the baseline that
`bench/sweep_vs_naive.py` runs `rq-reconciler sweep` against.

For each running row: RQ's `Job.fetch` (NoSuchJobError -> orphaned; `latest_result()` for
a failed job's text; a row with no RQ id is failed without asking RQ), then one UPDATE
committed per row, awaited one at a time: one round trip per job. It imports only what
such a script would (redis, rq, asyncpg), so that its start-up costs what the real
script's would.

Usage: python bench/naive_cleanup.py DSN REDIS_URL
Prints: rows changed, network round trips made, seconds spent on the rows (connected to
done, imports and interpreter start-up excluded).
"""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg
import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


async def naive_cleanup(dsn: str, redis_url: str) -> tuple[int, int, float]:
    r = redis.Redis.from_url(redis_url)
    pg = await asyncpg.connect(dsn)
    t0 = time.perf_counter()
    changed = 0
    rtt = 1
    try:
        rows = await pg.fetch("SELECT id, rq_job_id FROM training_jobs WHERE status = 'running'")
        for row in rows:
            job_id, rq_id = row["id"], row["rq_job_id"]
            new_status: str | None = None
            error = ""
            job: Job | None = None
            if not rq_id:
                # The seed: "Jobs with no RQ ID -> marked as failed".
                new_status, error = "failed", "Orphaned: no RQ job id"
            else:
                rtt += 1
                try:
                    job = Job.fetch(rq_id, connection=r)
                except NoSuchJobError:
                    new_status, error = "failed", "Orphaned: RQ job not found"
            if job is not None:
                status = job.get_status(refresh=False)
                if status == JobStatus.FINISHED:
                    new_status, error = "completed", "Synced: RQ finished"
                elif status == JobStatus.FAILED:
                    res = job.latest_result()
                    rtt += 1
                    exc = res.exc_string if res is not None and res.exc_string else ""
                    error = "Synced: RQ failed" + (f": {_last_line(exc)}" if exc else "")
                    new_status = "failed"
                elif status == JobStatus.STOPPED:
                    new_status, error = "failed", "Synced: RQ job stopped"
                elif status == JobStatus.CANCELED:
                    new_status, error = "failed", "Synced: RQ job canceled"
            if new_status is not None:
                await pg.execute(
                    "UPDATE training_jobs SET status = $2, error_message = $3, completed_at = now() "
                    "WHERE id = $1 AND status = 'running'", job_id, new_status, error)
                changed += 1
                rtt += 1
        work = time.perf_counter() - t0
    finally:
        await pg.close()
        r.close()
    return changed, rtt, work


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    n_changed, n_rtt, work_s = asyncio.run(naive_cleanup(sys.argv[1], sys.argv[2]))
    print(n_changed, n_rtt, f"{work_s:.6f}")
