"""Sync lag on events alone: RQ ended_at -> the row's update (audit row `at`).

The daemon runs as a subprocess with sweep.interval_seconds = 300, so rows follow RQ
through keyspace events only. Lag per job = rq_reconciler_events.at (Postgres now() in the
UPDATE that completed the row) - RQ's ended_at read back from the job hash.

A. real work: 4 real forking `rq worker`s; trivially short jobs (tests.jobs.succeed)
   enqueued at 50 jobs/s for 20 s (1,000 jobs, each with a queued row). Reports the rate
   the workers sustained.
B. the daemon alone: 1,000 RQ jobs created with RQ's API; this process registers as an
   RQ worker (RQ's Worker API, subscribed to its command channel, so the daemon sees a
   live local worker) and drives each job queued -> started -> finished with RQ's Job API
   (prepare_for_execution, then _handle_success 20 ms later) at 50 jobs/s for 20 s.

Also prints the daemon's own rq_reconciler_sync_lag_seconds histogram (per phase) and its
CPU use. Usage (from the repo root): python -m bench.sync_lag
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import psutil
import redis
from rq import Queue
from rq.job import Job

from bench.procs import cpu_seconds
from bench.report import banner, env_info, footer, print_table, run, verdict
from bench.rq_data import DriverWorker, pace
from bench.stack import Env, bench_env, make_workdir, pg_copy_rows
from bench.stats import bucket_summary, histogram_quantile, ms, percentile
from reconciler.devstack import (
    DaemonProc,
    WorkerPool,
    histogram,
    metric_value,
    pg_fetch,
)

RATE = 50.0
SECONDS = 20.0
N_JOBS = int(RATE * SECONDS)
N_WORKERS = 4
GOAL_P99_MS = 100.0
LAG_METRIC = "rq_reconciler_sync_lag_seconds"


def _ended_at(conn: redis.Redis, rq_ids: list[str]) -> dict[str, tuple[Any, Any, Any]]:
    """rq_id -> (enqueued_at, started_at, ended_at) read back from the job hashes."""
    out: dict[str, tuple[Any, Any, Any]] = {}
    for i in range(0, len(rq_ids), 500):
        for job in Job.fetch_many(rq_ids[i:i + 500], connection=conn):
            if job is not None:
                out[job.id] = (job.enqueued_at, job.started_at, job.ended_at)
    return out


def _lags(env: Env, prefix: str, ended: dict[str, tuple[Any, Any, Any]]) -> tuple[list[float], int]:
    recs = pg_fetch(env.dsn, "SELECT t.rq_job_id, e.at FROM rq_reconciler_events e "
                             "JOIN training_jobs t ON t.id::text = e.job_id "
                             "WHERE e.to_status = 'completed' AND t.rq_job_id LIKE $1", prefix + "%")
    lags: list[float] = []
    for r in recs:
        end = ended.get(str(r["rq_job_id"]), (None, None, None))[2]
        if end is not None:
            lags.append((r["at"] - end).total_seconds())
    return lags, len(recs)


def _wait_completed(env: Env, prefix: str, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        done = int(pg_fetch(env.dsn, "SELECT count(*) AS n FROM training_jobs WHERE status = 'completed' "
                                     "AND rq_job_id LIKE $1", prefix + "%")[0]["n"])
        if done >= n:
            break
        time.sleep(0.2)
    return done


def _insert_rows(env: Env, rq_ids: list[str]) -> None:
    pg_copy_rows(env.dsn, [(rq_id, "queued") for rq_id in rq_ids], ["rq_job_id", "status"])


def _hist_delta(before: str, after: str) -> tuple[list[tuple[float, float]], float, float]:
    h0, h1 = histogram(before, LAG_METRIC), histogram(after, LAG_METRIC)
    prev = dict(h0.buckets)
    return [(le, c - prev.get(le, 0.0)) for le, c in h1.buckets], h1.count - h0.count, h1.sum - h0.sum


def _wakeups(before: str, after: str) -> float:
    name = "rq_reconciler_events_total"
    return metric_value(after, name, source="keyspace") - metric_value(before, name, source="keyspace")


def phase_real(env: Env, daemon: DaemonProc, pool: WorkerPool) -> dict[str, Any]:
    rq_ids = [f"sync-a-{i:05d}" for i in range(N_JOBS)]
    _insert_rows(env, rq_ids)
    for _ in range(N_WORKERS):
        pool.start()
    assert daemon.proc is not None
    before = daemon.scrape()
    cpu0, w0 = cpu_seconds(daemon.proc.pid), time.perf_counter()
    psutil.cpu_percent(None)
    with env.redis_client() as r:
        q = Queue("default", connection=r)
        t0 = time.perf_counter()
        for i, rq_id in enumerate(rq_ids):
            pace(t0, i, RATE)
            q.enqueue("tests.jobs.succeed", i, job_id=rq_id, result_ttl=3600)
        enqueue_s = time.perf_counter() - t0
        done = _wait_completed(env, "sync-a-", N_JOBS, 90)
        cpu = (cpu_seconds(daemon.proc.pid) - cpu0) / (time.perf_counter() - w0)
        host = psutil.cpu_percent(None)
        after = daemon.scrape()
        ended = _ended_at(r, rq_ids)
    lags, n_events = _lags(env, "sync-a-", ended)
    enq = [v[0] for v in ended.values() if v[0] is not None]
    ends = [v[2] for v in ended.values() if v[2] is not None]
    waits = [(v[1] - v[0]).total_seconds() for v in ended.values() if v[0] and v[1]]
    span = (max(ends) - min(enq)).total_seconds() if ends and enq else float("nan")
    pool.stop_all()
    return {"name": f"A: {N_WORKERS} real workers", "lags": lags, "done": done, "events": n_events,
            "offered": N_JOBS / enqueue_s, "sustained": len(ends) / span if span else float("nan"),
            "queue_wait_p50": percentile(waits, 50), "queue_wait_max": max(waits, default=float("nan")),
            "cpu": cpu, "host": host, "wakeups": _wakeups(before, after),
            "hist": _hist_delta(before, after)}


def phase_driven(env: Env, daemon: DaemonProc) -> dict[str, Any]:
    rq_ids = [f"sync-b-{i:05d}" for i in range(N_JOBS)]
    with env.redis_client() as r:
        jobs: list[Job] = []
        pipe = r.pipeline(transaction=False)
        for rq_id in rq_ids:
            job = Job.create("tests.jobs.succeed", args=(1,), id=rq_id, connection=r)
            job.save(pipeline=pipe)
            job.set_status("queued", pipeline=pipe)  # type: ignore[arg-type]
            jobs.append(job)
        pipe.execute()
        _insert_rows(env, rq_ids)
        driver = DriverWorker(r, "bench-driver")
        assert daemon.proc is not None
        try:
            time.sleep(1.0)  # let the daemon learn the new worker from its keyspace event
            before = daemon.scrape()
            cpu0, w0 = cpu_seconds(daemon.proc.pid), time.perf_counter()
            psutil.cpu_percent(None)
            ended_by_us: dict[str, datetime] = {}
            t0 = time.perf_counter()
            for i in range(N_JOBS + 1):
                pace(t0, i, RATE)
                with r.pipeline(transaction=True) as p:
                    if i >= 1:
                        ended_by_us[jobs[i - 1].id] = driver.finish_job(jobs[i - 1], p)
                    if i < N_JOBS:
                        driver.start_job(jobs[i], p)
                    p.execute()
            drive_s = time.perf_counter() - t0
            done = _wait_completed(env, "sync-b-", N_JOBS, 60)
            cpu = (cpu_seconds(daemon.proc.pid) - cpu0) / (time.perf_counter() - w0)
            host = psutil.cpu_percent(None)
            after = daemon.scrape()
            ended = _ended_at(r, rq_ids)
        finally:
            driver.close()
    lags, n_events = _lags(env, "sync-b-", ended)
    return {"name": "B: driven via RQ's Job API", "lags": lags, "done": done, "events": n_events,
            "offered": N_JOBS / drive_s, "sustained": float("nan"), "queue_wait_p50": float("nan"),
            "queue_wait_max": float("nan"), "cpu": cpu, "host": host,
            "wakeups": _wakeups(before, after), "hist": _hist_delta(before, after)}


def main() -> int:
    banner(f"sync_lag: RQ ended_at -> row updated, events only, {RATE:g} jobs/s for {SECONDS:g} s")
    print(env_info())
    work = make_workdir("bench-sync-lag-")
    results: list[dict[str, Any]] = []
    with bench_env(work, sweep={"interval_seconds": 300.0, "min_age_seconds": 60.0}) as env:
        pool = WorkerPool(env.redis_url, log_dir=work)
        daemon = DaemonProc(env.config, work / "daemon.log")
        try:
            daemon.start(timeout=60)
            results.append(phase_real(env, daemon, pool))
            results.append(phase_driven(env, daemon))
        finally:
            daemon.stop()
            daemon.close()
            pool.stop_all()

    rows = []
    for res in results:
        lags = res["lags"]
        p99 = ms(percentile(lags, 99))
        rows.append((res["name"], f"{res['done']}/{N_JOBS}", len(lags), ms(percentile(lags, 50)),
                     ms(percentile(lags, 90)), p99, ms(max(lags, default=float("nan"))),
                     f"<= {GOAL_P99_MS:g} ms", verdict(p99, GOAL_P99_MS)))
    print_table(["phase", "rows completed", "n lags", "p50 ms", "p90 ms", "p99 ms", "max ms",
                 "goal p99", "result"], rows,
                title="lag = rq_reconciler_events.at - RQ ended_at (per job, PG clock vs worker clock, "
                      "same host)")
    print_table(
        ["phase", "offered jobs/s", "sustained jobs/s", "queue wait p50 ms", "queue wait max ms",
         "keyspace events/job", "daemon CPU % (of 1 core)", "host CPU % (all cores)"],
        [(r["name"], r["offered"], r["sustained"], ms(r["queue_wait_p50"]), ms(r["queue_wait_max"]),
          r["wakeups"] / N_JOBS, 100 * r["cpu"], r["host"]) for r in results],
        title="throughput (sustained = jobs ended / (last ended_at - first enqueued_at))",
    )
    hrows = []
    for r in results:
        buckets, count, total = r["hist"]
        hrows.append((r["name"], int(count), ms(total / count) if count else float("nan"),
                      ms(histogram_quantile(0.5, buckets)), ms(histogram_quantile(0.99, buckets)),
                      bucket_summary(buckets)))
    print_table(["phase", "count", "mean ms", "p50 ms (hist)", "p99 ms (hist)", "buckets (cumulative)"],
                hrows, title=f"daemon's {LAG_METRIC} (delta over the phase)")
    footer()
    return 0


if __name__ == "__main__":
    run(main)
