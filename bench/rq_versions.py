"""RQ 2.12 and RQ 3.x workers side by side: cancel latency, sync lag, local-orphan time.

One daemon (a subprocess, sweep every 300 s: events only), one redis-server and one
PostgreSQL; for each RQ series in turn, fresh real forking `rq worker`s from a venv of
that series (reconciler/devstack/rqvenv.py), and the same three measurements:

- cancel: 2 workers; 12 times, a running tests.jobs.trap_sigterm job (row `running`) is
  cancelled by inserting a request row; latency = done_at - requested_at (PG clock).
  Also counts the outcomes whose horse_signals start with SIGTERM.
- sync: 2 workers; 300 trivial jobs (tests.jobs.succeed, a `queued` row each) enqueued at
  30 jobs/s; lag = the audit row's `at` - RQ's ended_at from the job hash.
- orphan: 4 times, a fresh worker running a long job is SIGKILLed; SIGKILL -> row
  `failed`, and SIGKILL -> its orphaned horse's pid gone (5 ms polls).

Usage (from the repo root): python -m bench.rq_versions
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.report import banner, env_info, footer, print_table, run
from bench.rq_data import pace
from bench.stack import Env, bench_env, make_workdir, pg_copy_rows
from bench.stats import ms, percentile
from reconciler.devstack import (
    DaemonProc,
    Pg,
    WorkerPool,
    enqueue,
    insert_job,
    pg_fetch,
    pid_alive,
    request_cancel,
    wait_request,
    wait_until,
)
from reconciler.devstack.rqvenv import rq_version_of, worker_python
from reconciler.rq_layout import parse_time

SERIES = ("2", "3")
N_CANCELS = 12
N_SYNC = 300
SYNC_RATE = 30.0
N_ORPHANS = 4
DEADLINE_S = 15.0


def _started(marker: Path) -> bool:
    return marker.exists() and "STARTED" in marker.read_text()


def measure_cancels(env: Env, pool: WorkerPool, tag: str, work: Path) -> dict[str, Any]:
    lat: list[float] = []
    sigterm_first = 0
    for i in range(N_CANCELS):
        marker = work / f"cancel-{tag}-{i}.txt"
        rq_id = f"cancel-{tag}-{i:03d}"
        enqueue(env.redis_url, "tests.jobs.trap_sigterm", 300, str(marker), job_id=rq_id,
                job_timeout=600)
        row = insert_job(env.dsn, rq_id, status="running", started_ago=3600)
        wait_until(lambda m=marker: _started(m), 20, interval=0.005, what="job running")
        done = wait_request(env.dsn, request_cancel(env.dsn, row, by="bench"), timeout=30)
        lat.append((done["done_at"] - done["requested_at"]).total_seconds())
        signals = (done["detail"] or {}).get("horse_signals") or []
        sigterm_first += signals[:1] == ["SIGTERM"] and "SIGTERM" in marker.read_text()
        wait_until(lambda: all(w.current_job_id() is None for w in pool.workers), 20,
                   interval=0.005, what="workers idle")
    return {"cancel": lat, "sigterm_first": sigterm_first}


def measure_sync(env: Env, tag: str) -> dict[str, Any]:
    rq_ids = [f"sync-{tag}-{i:05d}" for i in range(N_SYNC)]
    pg_copy_rows(env.dsn, [(rid, "queued") for rid in rq_ids], ["rq_job_id", "status"])
    t0 = time.perf_counter()
    for i, rid in enumerate(rq_ids):
        pace(t0, i, SYNC_RATE)
        enqueue(env.redis_url, "tests.jobs.succeed", i, job_id=rid, result_ttl=3600)
    pg = Pg(env.dsn).connect()
    try:
        wait_until(lambda: pg.val("SELECT count(*) FROM training_jobs WHERE rq_job_id LIKE $1 "
                                  "AND status = 'completed'", f"sync-{tag}-%") == N_SYNC, 120,
                   interval=0.1, what="every row completed")
    finally:
        pg.close()
    with env.redis_client() as r:
        ended = {rid: parse_time(r.hget(f"rq:job:{rid}", "ended_at")) for rid in rq_ids}
    at = {str(x["rq_job_id"]): x["at"] for x in pg_fetch(
        env.dsn, "SELECT t.rq_job_id, e.at FROM rq_reconciler_events e JOIN training_jobs t "
                 "ON e.job_id = t.id::text WHERE t.rq_job_id LIKE $1 AND e.to_status = 'completed'",
        f"sync-{tag}-%")}
    lags = [(at[rid] - end).total_seconds() for rid, end in ended.items()
            if isinstance(end, datetime) and rid in at]
    return {"sync": lags}


def measure_orphans(env: Env, pool: WorkerPool, tag: str, work: Path) -> dict[str, Any]:
    rows_s: list[float] = []
    horses_s: list[float] = []
    for i in range(N_ORPHANS):
        w = pool.start(name=f"orphan-{tag}-{i}")
        time.sleep(0.3)  # the daemon learns the new worker from its keyspace event
        marker = work / f"orphan-{tag}-{i}.txt"
        rq_id = f"orphan-{tag}-{i:02d}"
        row = insert_job(env.dsn, rq_id, status="running", started_ago=0)
        enqueue(env.redis_url, "tests.jobs.touch_and_sleep", 300, str(marker), job_id=rq_id,
                job_timeout=600)
        wait_until(lambda m=marker: _started(m), 20, interval=0.005, what="job running")
        horse = int(marker.read_text().split()[1])
        time.sleep(0.5)  # the horse is proven while its worker lives
        pg = Pg(env.dsn).connect()
        t0 = time.perf_counter()
        w.kill(signal.SIGKILL)
        t_row = t_horse = None
        while time.perf_counter() - t0 < DEADLINE_S and (t_row is None or t_horse is None):
            if t_row is None and pg.val("SELECT status FROM training_jobs WHERE id = $1",
                                        row) == "failed":
                t_row = time.perf_counter() - t0
            if t_horse is None and not pid_alive(horse):
                t_horse = time.perf_counter() - t0
            time.sleep(0.005)
        pg.close()
        rows_s.append(t_row if t_row is not None else float("nan"))
        horses_s.append(t_horse if t_horse is not None else float("nan"))
        w.stop()
    return {"orphan_row": rows_s, "orphan_horse": horses_s}


def run_series(env: Env, series: str, work: Path) -> dict[str, Any]:
    tag = f"rq{series}"
    pool = WorkerPool(env.redis_url, log_dir=work, rq_version=series)
    try:
        for n in range(2):
            pool.start(name=f"{tag}-w{n}")
        out = {"version": rq_version_of(worker_python(series))}
        out.update(measure_cancels(env, pool, tag, work))
        out.update(measure_sync(env, tag))
        pool.stop_all()
        out.update(measure_orphans(env, pool, tag, work))
        return out
    finally:
        pool.stop_all()


def main() -> int:
    banner("rq_versions: the same cancel, sync and orphan measurements on RQ 2 and RQ 3 workers")
    print(env_info())
    work = make_workdir("bench-rq-versions-")
    results: dict[str, dict[str, Any]] = {}
    with bench_env(work, sweep={"interval_seconds": 300.0, "min_age_seconds": 60.0}) as env:
        for series in SERIES:
            worker_python(series)  # build the venv before anything is timed
        daemon = DaemonProc(env.config, work / "daemon.log")
        try:
            daemon.start(timeout=60)
            for series in SERIES:
                results[series] = run_series(env, series, work)
            time.sleep(6.0)  # let the last post-stop waits finish and log
            errors = [e for e in daemon.log_events() if e.get("level") == "error"
                      and e.get("event") != "worker_wedged"]
            wrongtype = "WRONGTYPE" in daemon.log_text()
        finally:
            daemon.stop()
            daemon.close()

    def stats(key: str, series: str) -> tuple[float, float]:
        xs = [x for x in results[series][key] if x == x]  # NaN: never happened
        return ms(percentile(xs, 50)), ms(max(xs, default=float("nan")))

    head = ["measure"]
    for s in SERIES:
        v = results[s]["version"]
        head += [f"RQ {v} p50 ms", f"RQ {v} max ms"]
    rows: list[list[Any]] = []
    for key, name in (("cancel", f"cancel: requested_at -> done_at ({N_CANCELS} running jobs)"),
                      ("sync", f"sync lag: RQ ended_at -> audit at ({N_SYNC} jobs at "
                               f"{SYNC_RATE:g}/s)"),
                      ("orphan_row", f"local orphan: SIGKILL -> row failed ({N_ORPHANS} runs)"),
                      ("orphan_horse", "local orphan: SIGKILL -> orphaned horse gone")):
        rows.append([name, *[c for s in SERIES for c in stats(key, s)]])
    print_table(head, rows, title="side by side (same daemon, Redis and PostgreSQL; workers of "
                                  "each series in turn)")
    print_table(["series", "rq", "cancels starting with SIGTERM (handler ran)", "lags measured",
                 "orphaned horses stopped"],
                [(s, results[s]["version"], f"{results[s]['sigterm_first']}/{N_CANCELS}",
                  f"{len(results[s]['sync'])}/{N_SYNC}",
                  f"{sum(x == x for x in results[s]['orphan_horse'])}/{N_ORPHANS}")
                 for s in SERIES])
    print(f"\ndaemon log: {len(errors)} error lines (worker_wedged aside), "
          f"WRONGTYPE {'seen' if wrongtype else 'never seen'}")
    footer()
    return 0


if __name__ == "__main__":
    run(main)
