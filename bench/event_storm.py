"""Event storm: 5,000 RQ status changes per second for 60 s against the running daemon.

150,000 RQ jobs are created up front with RQ's API (queued), each with a queued row. This
process registers as an RQ worker (RQ's Worker API; subscribed to its command channel; it
heartbeats once a second like a busy worker) and, every 10 ms, marks 25 jobs `started`
(Job.prepare_for_execution) and finishes the 25 it started 10 ms earlier
(Job._handle_success, ended_at = now): 2,500 jobs/s, 5,000 status changes/s, each change
being several keyspace events. The daemon (subprocess, sweep every 300 s) follows on
events alone.

Table lag per job = rq_reconciler_events.at of its `completed` transition - ended_at.
Daemon RSS is sampled every 100 ms: at the start of the storm, peak, at its end and after
the backlog has drained; its CPU share is its CPU seconds over the storm's wall seconds.
Usage (from the repo root): python -m bench.event_storm   (about 2 minutes)
"""

from __future__ import annotations

import time
from datetime import datetime

import psutil
from rq.job import Job

from bench.procs import ProcSampler, cpu_seconds
from bench.report import banner, env_info, footer, print_table, run, verdict
from bench.rq_data import DriverWorker, pace
from bench.stack import bench_env, make_workdir, pg_copy_rows
from bench.stats import mb, ms, percentile
from reconciler.devstack import DaemonProc, Pg, metric_value, pg_fetch

CHANGES_PER_S = 5000
SECONDS = 60
TICK = 0.010
PER_TICK = int(CHANGES_PER_S * TICK / 2)  # jobs started (and finished) per tick
TICKS = int(SECONDS / TICK)
N_JOBS = PER_TICK * TICKS
GOAL_P99_S = 0.25
DRAIN_TIMEOUT = 90.0


def main() -> int:
    banner(f"event_storm: {CHANGES_PER_S:,} RQ status changes/s for {SECONDS} s "
           f"({N_JOBS:,} jobs started+finished), daemon on events only")
    print(env_info())
    work = make_workdir("bench-storm-")
    with bench_env(work, sweep={"interval_seconds": 300.0, "min_age_seconds": 60.0}) as env:
        daemon = DaemonProc(env.config, work / "daemon.log")
        rq_ids = [f"storm-{i:06d}" for i in range(N_JOBS)]
        with env.redis_client() as r:
            t0 = time.monotonic()
            jobs: list[Job] = []
            pipe = r.pipeline(transaction=False)
            for n, rq_id in enumerate(rq_ids, 1):
                job = Job.create("tests.jobs.succeed", args=(1,), id=rq_id, connection=r)
                job.save(pipeline=pipe)
                job.set_status("queued", pipeline=pipe)  # type: ignore[arg-type]
                jobs.append(job)
                if n % 1000 == 0:
                    pipe.execute()
            pipe.execute()
            pg_copy_rows(env.dsn, [(rq_id, "queued") for rq_id in rq_ids], ["rq_job_id", "status"])
            print(f"setup: {N_JOBS:,} RQ jobs + rows in {time.monotonic() - t0:.1f} s")
            daemon.start(timeout=120)
            assert daemon.proc is not None
            pid = daemon.proc.pid
            driver = DriverWorker(r, "storm-driver")
            try:
                time.sleep(1.0)  # the daemon learns the driver worker from its keyspace event
                sampler = ProcSampler(pid, 0.1).start()
                before = daemon.scrape()
                cpu0 = cpu_seconds(pid)
                psutil.cpu_percent(None)
                ended: dict[str, datetime] = {}
                behind_max = 0.0
                t_start = time.perf_counter()
                m_start = time.monotonic()
                last_hb = t_start
                for k in range(TICKS + 1):
                    pace(t_start, k, 1 / TICK)
                    behind_max = max(behind_max, time.perf_counter() - (t_start + k * TICK))
                    with r.pipeline(transaction=False) as p:
                        if k >= 1:
                            for job in jobs[(k - 1) * PER_TICK:k * PER_TICK]:
                                ended[job.id] = driver.finish_job(job, p)
                        if k < TICKS:
                            for job in jobs[k * PER_TICK:(k + 1) * PER_TICK]:
                                driver.start_job(job, p)
                        p.execute()
                    if time.perf_counter() - last_hb >= 1.0:
                        driver.heartbeat()
                        last_hb = time.perf_counter()
                t_end = time.perf_counter()
                m_end = time.monotonic()
                storm_s = t_end - t_start
                storm_cpu = (cpu_seconds(pid) - cpu0) / storm_s
                host_cpu = psutil.cpu_percent(None)
                with Pg(env.dsn) as pg:
                    done_at_end = int(pg.val(
                        "SELECT count(*) FROM training_jobs WHERE status = 'completed'"))
                    deadline = time.perf_counter() + DRAIN_TIMEOUT
                    done = done_at_end
                    while done < N_JOBS and time.perf_counter() < deadline:
                        time.sleep(0.1)
                        done = int(pg.val(
                            "SELECT count(*) FROM training_jobs WHERE status = 'completed'"))
                t_drained = time.perf_counter()
                time.sleep(5.0)
                m_after = time.monotonic()
                sampler.stop()
                after = daemon.scrape()
            finally:
                driver.close()
                daemon.stop()
                daemon.close()
        recs = pg_fetch(env.dsn, "SELECT t.rq_job_id, e.at FROM rq_reconciler_events e "
                                 "JOIN training_jobs t ON t.id::text = e.job_id "
                                 "WHERE e.to_status = 'completed'")
        n_running = int(pg_fetch(env.dsn, "SELECT count(*) AS n FROM rq_reconciler_events "
                                          "WHERE to_status = 'running'")[0]["n"])

    lags = [(r["at"] - ended[str(r["rq_job_id"])]).total_seconds() for r in recs
            if str(r["rq_job_id"]) in ended]
    p50, p99 = percentile(lags, 50), percentile(lags, 99)
    achieved = 2 * len(ended) / storm_s
    print_table(
        ["offered changes/s", "achieved changes/s", "driver max behind ms", "rows completed at storm end",
         "rows completed", "drain s after storm", "queued->running transitions"],
        [(CHANGES_PER_S, achieved, ms(behind_max), f"{done_at_end:,}/{N_JOBS:,}", f"{done:,}/{N_JOBS:,}",
          t_drained - t_end, f"{n_running:,}")],
        title="load",
    )
    print_table(
        ["metric", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "goal", "result"],
        [("table lag: events.at - ended_at", len(lags), ms(p50), ms(percentile(lags, 90)), ms(p99),
          ms(max(lags, default=float("nan"))), f"p99 <= {GOAL_P99_S * 1000:g} ms",
          verdict(p99, GOAL_P99_S))],
        title="lag",
    )

    def rss_at(t: float) -> float:
        best: tuple[float, int] | None = None
        for ts, rss in sampler.samples:
            if best is None or abs(ts - t) < abs(best[0] - t):
                best = (ts, rss)
        return mb(best[1]) if best else float("nan")

    storm_rss = [s for ts, s in sampler.samples if m_start <= ts <= m_end]
    print_table(
        ["RSS at storm start MB", "peak during storm MB", "peak overall MB", "at storm end MB",
         "after drain + 5 s MB", "daemon CPU % during storm (1 core = 100)", "host CPU % (all cores)"],
        [(rss_at(m_start), mb(max(storm_rss, default=0)), mb(sampler.peak),
          rss_at(m_end), rss_at(m_after),
          100 * storm_cpu, host_cpu)],
        title="daemon memory and CPU (psutil, every 100 ms)",
    )
    name = "rq_reconciler_events_total"
    wake = metric_value(after, name, source="keyspace") - metric_value(before, name, source="keyspace")
    print(f"\nkeyspace wake-ups counted by the daemon: {wake:,.0f} ({wake / max(1, len(ended)):.1f} per job)")
    footer()
    return 0


if __name__ == "__main__":
    run(main)
