"""A worker SIGKILLed mid-job: how long until the job's second run starts elsewhere?

Real `rq worker`s of each RQ series (the shared worker venvs: RQ_RECONCILER_WORKER_VENVS).
A job with Retry(max=1) (tests.jobs.mark_runs: it records each run's start in a marker
file, with how many earlier runs' horses still ran then) runs on a victim worker; another
worker serves the queue; the victim is SIGKILLed. Measured: SIGKILL -> the second run's
recorded start (marker polled every 5 ms).

- with rq-reconciler (orphans.requeue = "retries", the default; sweep every 300 s: the
  local pid watch sees the death): the horse is stopped, the job retried at once;
- RQ alone: RQ's own rule (StartedJobRegistry.cleanup, run by a worker's maintenance:
  retried once the run's started-registry entry expired: 60 s past the worker's last
  heartbeat, RQ's heartbeat TTL). There the worker's horse is SIGKILLed with it (a lost
  node): a horse left running would finish the job itself, with nothing to retry. This process runs RQ's
  Worker.clean_registries() every MAINTENANCE_S seconds, the way a worker does (RQ's
  default is 600 s). The jobs use job_timeout = JOB_TIMEOUT_S (RQ's default is 180 s).
  All RQ-alone jobs die at once, on a queue each.

Usage (from the repo root): python -m bench.requeue [RUNS] [RQ_ALONE_RUNS] [MAINTENANCE_S]
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from rq import Queue, Retry

from bench.report import banner, env_info, footer, print_table, run
from bench.stack import bench_env, make_workdir
from bench.stats import ms, percentile
from reconciler.devstack import DaemonProc, WorkerPool, insert_job, wait_until

RUNS = 20
RQ_ALONE_RUNS = 5
MAINTENANCE_S = 15.0
JOB_TIMEOUT_S = 10
# How long each run of the job lasts (longer than any requeue takes).
JOB_S = 5.0
DEADLINE_S = 30.0
SERIES = ("2", "3")


def _runs(marker: Path) -> list[tuple[int, float, int]]:
    if not marker.exists():
        return []
    out = []
    for ln in marker.read_text().splitlines():
        if ln.startswith("RUN "):
            _, pid, at, alive = ln.split()
            out.append((int(pid), float(at), int(alive)))
    return out


def _enqueue(conn: redis.Redis, queue: str, marker: Path, seconds: float) -> str:
    jid = uuid.uuid4().hex
    Queue(queue, connection=conn).enqueue("tests.jobs.mark_runs", seconds, str(marker),
                                          job_id=jid, retry=Retry(max=1),
                                          job_timeout=JOB_TIMEOUT_S)
    return jid


def with_daemon(work: Path, series: str, runs: int) -> tuple[list[float], int, dict[str, int]]:
    """SIGKILL -> second run started, how many second runs overlapped a first, and the
    daemon's orphan verdicts (with why, for those that were not requeues)."""
    times: list[float] = []
    overlaps = 0
    verdicts: dict[str, int] = {}
    with bench_env(work / f"d{series}", sweep={"interval_seconds": 300.0,
                                                "min_age_seconds": 60.0}) as env:
        pool = WorkerPool(env.redis_url, log_dir=work, rq_version=series)
        daemon = DaemonProc(env.config, work / f"daemon-{series}.log")
        conn = env.redis_client()
        try:
            daemon.start(timeout=60)
            for i in range(runs):
                queue, marker = f"q{series}-{i}", work / f"d{series}-{i}.txt"
                victim = pool.start(name=f"victim-{series}-{i}", queues=(queue,))
                jid = _enqueue(conn, queue, marker, JOB_S)
                insert_job(env.dsn, jid, status="queued", started_ago=None)
                wait_until(lambda m=marker: _runs(m), timeout=20, what="the first run")
                other = pool.start(name=f"other-{series}-{i}", queues=(queue,))
                time.sleep(0.3)  # the daemon proves the horse and learns the new worker
                t0 = time.time()
                victim.kill(signal.SIGKILL)
                while len(_runs(marker)) < 2 and time.time() - t0 < DEADLINE_S:
                    time.sleep(0.005)
                got = _runs(marker)
                if len(got) >= 2:
                    times.append(got[1][1] - t0)
                    overlaps += got[1][2] != 0
                victim.stop()
                other.stop()
            for e in daemon.log_events():
                if e.get("event") == "orphan_verdict":
                    key = str(e.get("verdict")) + (f" ({e['why']})" if e.get("why") else "")
                    verdicts[key] = verdicts.get(key, 0) + 1
        finally:
            daemon.stop()
            daemon.close()
            pool.stop_all()
            conn.close()
    return times, overlaps, verdicts


def rq_alone(work: Path, series: str, runs: int, interval: float) -> list[float]:
    from rq.worker import Worker as RqWorker

    times: list[float] = []
    with bench_env(work / f"rq{series}") as env:
        pool = WorkerPool(env.redis_url, log_dir=work, rq_version=series)
        conn = env.redis_client()
        try:
            queues = [f"alone{series}-{i}" for i in range(runs)]
            markers = [work / f"rq{series}-{i}.txt" for i in range(runs)]
            victims = [pool.start(name=f"lone-{series}-{i}", queues=(q,))
                       for i, q in enumerate(queues)]
            for q, m in zip(queues, markers, strict=True):
                _enqueue(conn, q, m, JOB_S)
            wait_until(lambda: all(_runs(m) for m in markers), timeout=60, what="first runs")
            killed = time.time()
            for v in victims:
                # The worker and its horse die together (a lost node, an OOM kill of the
                # pod): a horse left running would finish the job itself, and RQ alone
                # would have nothing to retry.
                v.kill_horses(signal.SIGKILL)
                v.kill(signal.SIGKILL)
            pool.start(name=f"other-{series}", queues=tuple(queues))
            maint = RqWorker(queues, connection=conn, name=f"maintenance-{uuid.uuid4().hex[:6]}")
            next_pass = time.perf_counter() + interval
            deadline = time.perf_counter() + 300.0 + interval
            while time.perf_counter() < deadline and not all(len(_runs(m)) >= 2 for m in markers):
                if time.perf_counter() >= next_pass:
                    maint.clean_registries()  # takes the maintenance lock, as a worker does
                    next_pass = time.perf_counter() + interval
                time.sleep(0.05)
            times = sorted(r[1][1] - killed for m in markers if len(r := _runs(m)) >= 2)
            for v in victims:
                v.stop()
        finally:
            pool.stop_all()
            conn.close()
    return times


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else RUNS
    alone = int(sys.argv[2]) if len(sys.argv) > 2 else RQ_ALONE_RUNS
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else MAINTENANCE_S
    banner(f"requeue: SIGKILL a worker mid-job, {runs} times per RQ series "
           f"({alone} for RQ alone)")
    print(env_info())
    print(f"worker venvs: {os.environ.get('RQ_RECONCILER_WORKER_VENVS', '(this venv)')}")
    work = make_workdir("bench-requeue-")
    rows: list[tuple[Any, ...]] = []
    overlaps_all = 0

    def row(what: str, t: list[float], n: int) -> tuple[Any, ...]:
        return (what, f"{len(t)}/{n}", ms(percentile(t, 50)) if t else "-",
                ms(percentile(t, 99)) if t else "-", ms(max(t)) if t else "-")

    for series in SERIES:
        d_times, overlaps, verdicts = with_daemon(work, series, runs)
        overlaps_all += overlaps
        print(f"RQ {series}: the daemon's orphan verdicts: {verdicts}")
        rows.append(row(f"RQ {series}: rq-reconciler (retries: at once)", d_times, runs))
        r_times = rq_alone(work, series, alone, interval)
        rows.append(row(f"RQ {series}: RQ alone (job_timeout {JOB_TIMEOUT_S} s, maintenance "
                        f"every {interval:g} s)", r_times, alone))
    print_table(["path", "ran again", "p50 ms", "p99 ms", "max ms"], rows,
                title="SIGKILL -> the job's second run starts on another worker")
    print(f"\nsecond runs that started while a first run's horse still ran: {overlaps_all}")
    footer()
    return 0


if __name__ == "__main__":
    run(main)
