"""Cancel latency: request row inserted -> outcome written, through the real daemon.

The daemon runs as a subprocess (DaemonProc, READY=1 over NOTIFY_SOCKET) with 2 real
forking `rq worker`s. 40 times, one after the other: a job (tests.jobs.trap_sigterm:
exits on SIGTERM) is enqueued, its row inserted (running), and once the job's code is
running in its horse a cancel request is INSERTed by the "app", on one kept connection as
an app's pool would. Latency = done_at - requested_at of the request row (both
Postgres's clock). Then 12 more with the app's INSERT on a new connection each time, for
reference: a fresh backend's first INSERT compiles the notify trigger's function and
plans the foreign key's check (about 2 ms) before its NOTIFY goes out. Beside it, RQ's
own stop-job (rq.command.send_stop_job_command) -> job status `stopped`, polling the
status every 2 ms, for 24 more jobs (no rows: the daemon ignores them).
Usage (from the repo root): python -m bench.cancel_latency
"""

from __future__ import annotations

import time
from pathlib import Path

from rq.command import send_stop_job_command
from rq.job import Job

from bench.report import banner, env_info, footer, print_table, run, verdict
from bench.stack import bench_env, make_workdir
from bench.stats import bucket_summary, histogram_quantile, ms, percentile
from reconciler.devstack import (
    DaemonProc,
    Pg,
    WorkerPool,
    enqueue,
    histogram,
    insert_job,
    request_cancel,
    wait_request,
    wait_until,
)

N_CANCELS = 40
N_FRESH = 12
N_STOPS = 24
GOAL_P50_MS = 25.0
GOAL_P99_MS = 100.0


def _wait_started(marker: Path, timeout: float = 20) -> None:
    wait_until(lambda: marker.exists() and "STARTED" in marker.read_text(), timeout=timeout,
               interval=0.005, what=f"job code running ({marker.name})")


def main() -> int:
    banner(f"cancel_latency: {N_CANCELS} cancels of running jobs through the daemon, "
           f"vs RQ's stop-job for {N_STOPS}")
    print(env_info())
    work = make_workdir("bench-cancel-")
    (work / "markers").mkdir()
    with bench_env(work, sweep={"interval_seconds": 300.0}) as env:
        pool = WorkerPool(env.redis_url, log_dir=work)
        daemon = DaemonProc(env.config, work / "daemon.log")
        try:
            pool.start(name="bench-w1")
            pool.start(name="bench-w2")
            daemon.start(timeout=60)
            outcomes: dict[str, int] = {}
            signals: dict[str, int] = {}

            def cancels(n: int, tag: str, app: Pg, *, fresh: bool = False
                        ) -> tuple[list[float], list[float]]:
                """n cancels of running jobs; the app's INSERT on `app` (one kept
                connection, as an app's pool) or, `fresh`, on a new connection each time;
                the outcome is polled for on `app`."""
                lat: list[float] = []
                wall: list[float] = []
                for i in range(n):
                    marker = work / "markers" / f"{tag}-{i}.txt"
                    rq_id = f"{tag}-{i:03d}"
                    # RQ job first, then its row: a row that says it has run for an hour
                    # with no RQ job behind it is an orphan, which a sweep (rightly) fails,
                    # leaving its horse to run.
                    enqueue(env.redis_url, "tests.jobs.trap_sigterm", 300, str(marker),
                            job_id=rq_id, job_timeout=600)
                    job_row = insert_job(env.dsn, rq_id, status="running", started_ago=3600)
                    _wait_started(marker)
                    t = time.perf_counter()
                    req = request_cancel(env.dsn if fresh else app, job_row, by="bench",
                                         reason="cancel_latency")
                    done = wait_request(app, req, timeout=30)
                    wall.append(time.perf_counter() - t)
                    lat.append((done["done_at"] - done["requested_at"]).total_seconds())
                    outcomes[str(done["outcome"])] = outcomes.get(str(done["outcome"]), 0) + 1
                    sig = ",".join((done["detail"] or {}).get("horse_signals") or []) or "-"
                    signals[sig] = signals.get(sig, 0) + 1
                return lat, wall

            with Pg(env.dsn) as app:
                app.connect()
                lat, wall = cancels(N_CANCELS, "cancel", app)
                fresh, _ = cancels(N_FRESH, "fresh", app, fresh=True)
            metrics_text = daemon.scrape()

            # RQ's own stop-job, for comparison (no rows: the daemon is not involved)
            stop_lat: list[float] = []
            with env.redis_client() as r:
                for i in range(N_STOPS):
                    marker = work / "markers" / f"stop-{i}.txt"
                    rq_id = f"stop-{i:03d}"
                    enqueue(env.redis_url, "tests.jobs.touch_and_sleep", 300, str(marker),
                            job_id=rq_id, job_timeout=600)
                    _wait_started(marker)
                    job = Job.fetch(rq_id, connection=r)
                    t = time.perf_counter()
                    send_stop_job_command(r, rq_id)
                    while True:
                        if job.get_status(refresh=True) == "stopped":
                            break
                        if time.perf_counter() - t > 30:
                            raise RuntimeError(f"{rq_id} not stopped after 30 s")
                        time.sleep(0.002)
                    stop_lat.append(time.perf_counter() - t)
                    # let the worker reap and go idle before the next one
                    wait_until(lambda: all(w.current_job_id() is None for w in pool.workers),
                               timeout=20, interval=0.005, what="workers idle")
        finally:
            daemon.stop()
            daemon.close()
            pool.stop_all()

    def row(name: str, xs: list[float], goal: str, result: str) -> tuple[object, ...]:
        return (name, len(xs), ms(percentile(xs, 50)), ms(percentile(xs, 95)),
                ms(percentile(xs, 99)), ms(max(xs)), goal, result)

    p50, p99 = ms(percentile(lat, 50)), ms(percentile(lat, 99))
    ok = "PASS" if verdict(p50, GOAL_P50_MS) == "PASS" and verdict(p99, GOAL_P99_MS) == "PASS" \
        else "MISS"
    print_table(
        ["path", "n", "p50 ms", "p95 ms", "p99 ms", "max ms", "goal", "result"],
        [
            row("daemon cancel: requested_at -> done_at (PG clock)", lat,
                f"p50 <= {GOAL_P50_MS:g}, p99 <= {GOAL_P99_MS:g}", ok),
            row("  same, seen by the inserting client (insert -> poll sees done)", wall, "", ""),
            row("  same, the app's INSERT on a new connection each time", fresh, "(reference)", ""),
            row("RQ send_stop_job_command -> status stopped (2 ms poll)", stop_lat, "(reference)", ""),
        ],
    )
    print(f"\noutcomes: {outcomes}; horse_signals: {signals}")
    h = histogram(metrics_text, "rq_reconciler_cancel_duration_seconds")
    if h.count:
        print(f"daemon's rq_reconciler_cancel_duration_seconds: count {int(h.count)}, "
              f"mean {ms(h.sum / h.count):.1f} ms, histogram_quantile p50 "
              f"{ms(histogram_quantile(0.5, h.buckets)):.1f} ms, p99 "
              f"{ms(histogram_quantile(0.99, h.buckets)):.1f} ms; buckets {bucket_summary(h.buckets)}")
    footer()
    return 0


if __name__ == "__main__":
    run(main)
