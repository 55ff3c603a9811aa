"""A worker SIGKILLed between dequeue and start: how long until its job runs elsewhere?

A real `rq worker` of class tests.faults.slow_worker.SlowStartWorker takes the job into
`rq:queue:<q>:intermediate` (BLMOVE) and then sleeps before recording an execution, so the
job is stranded there, `queued`, when the worker is SIGKILLed. Another real worker serves
the queue. Measured: SIGKILL -> the job's code started on the other worker (marker file
polled every 5 ms), RUNS times each way:

- with rq-reconciler (sweep every 300 s: only the worker's death, seen by the local pid
  watch, can be fast): one strand at a time;
- RQ alone: RQ's own rule (IntermediateQueue.cleanup, run by a worker's maintenance: a job
  there for over a minute is failed, and with Retry(max=1) RQ's failure path enqueues it
  again). The other worker is started after the kills (its start-up maintenance is the
  first look), then this process runs RQ's Worker.clean_registries() the way a worker does,
  every MAINTENANCE_S seconds (RQ's default is 600 s: expect 1 to 20 minutes there). All
  RUNS strands at once, on a queue each.

Both enqueue with Retry(max=1), so that RQ alone can run the job again at all.
Usage (from the repo root): python -m bench.stranded [RUNS] [MAINTENANCE_S]
"""

from __future__ import annotations

import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from rq import Queue, Retry
from rq.worker import Worker as RqWorker

from bench.report import banner, env_info, footer, print_table, run
from bench.stack import bench_env, make_workdir
from bench.stats import ms, percentile
from reconciler.devstack import DaemonProc, WorkerPool, insert_job, wait_until
from tests.faults.slow_worker import DELAY_ENV

RUNS = 20
MAINTENANCE_S = 15.0
SLOW = "tests.faults.slow_worker.SlowStartWorker"
DEADLINE_S = 30.0


def _started(marker: Path) -> bool:
    return marker.exists() and "STARTED" in marker.read_text()


def _strand(pool: WorkerPool, conn: redis.Redis, queue: str, marker: Path, name: str) -> Any:
    slow = pool.start(name=name, queues=(queue,), extra_env={DELAY_ENV: "600"},
                      worker_class=SLOW)
    jid = uuid.uuid4().hex
    Queue(queue, connection=conn).enqueue("tests.jobs.touch_and_sleep", 0, str(marker),
                                          job_id=jid, retry=Retry(max=1))
    wait_until(lambda: conn.lpos(f"rq:queue:{queue}:intermediate", jid) is not None,
               timeout=20, what="the slow worker took the job")
    return slow, jid


def with_daemon(work: Path, runs: int) -> tuple[list[float], int]:
    times: list[float] = []
    requeued = 0
    with bench_env(work / "d", sweep={"interval_seconds": 300.0, "min_age_seconds": 60.0}) as env:
        pool = WorkerPool(env.redis_url, log_dir=work)
        daemon = DaemonProc(env.config, work / "daemon.log")
        conn = env.redis_client()
        try:
            daemon.start(timeout=60)
            for i in range(runs):
                queue, marker = f"strand-{i}", work / f"d-{i}.txt"
                slow, jid = _strand(pool, conn, queue, marker, f"slow-{i}")
                insert_job(env.dsn, jid, status="queued", started_ago=None)
                other = pool.start(name=f"other-{i}", queues=(queue,))
                time.sleep(0.3)  # the daemon learns the new workers from their events
                t0 = time.perf_counter()
                slow.kill(signal.SIGKILL)
                while not _started(marker) and time.perf_counter() - t0 < DEADLINE_S:
                    time.sleep(0.005)
                if _started(marker):
                    times.append(time.perf_counter() - t0)
                slow.stop()
                other.stop()
            requeued = sum(1 for e in daemon.log_events()
                           if e.get("event") == "stranded_job" and e.get("outcome") == "requeued")
        finally:
            daemon.stop()
            daemon.close()
            pool.stop_all()
            conn.close()
    return times, requeued


def rq_alone(work: Path, runs: int, interval: float) -> list[float]:
    times: list[float] = []
    with bench_env(work / "rq") as env:
        pool = WorkerPool(env.redis_url, log_dir=work)
        conn = env.redis_client()
        try:
            queues = [f"alone-{i}" for i in range(runs)]
            stranded = [_strand(pool, conn, q, work / f"rq-{i}.txt", f"lone-{i}")
                        for i, q in enumerate(queues)]
            killed: list[float] = []
            for slow, _jid in stranded:
                killed.append(time.perf_counter())
                slow.kill(signal.SIGKILL)
            pool.start(name="other", queues=tuple(queues))  # its start-up maintenance looks
            maint = RqWorker(queues, connection=conn, name=f"maintenance-{uuid.uuid4().hex[:6]}")
            markers = [work / f"rq-{i}.txt" for i in range(runs)]
            seen: dict[int, float] = {}
            next_pass = time.perf_counter() + interval
            deadline = time.perf_counter() + 120.0 + interval
            while len(seen) < runs and time.perf_counter() < deadline:
                now = time.perf_counter()
                for i, m in enumerate(markers):
                    if i not in seen and _started(m):
                        seen[i] = now - killed[i]
                if now >= next_pass:
                    maint.clean_registries()  # takes the maintenance lock, as a worker does
                    next_pass = now + interval
                time.sleep(0.005)
            times = sorted(seen.values())
            for slow, _ in stranded:
                slow.stop()
        finally:
            pool.stop_all()
            conn.close()
    return times


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else RUNS
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else MAINTENANCE_S
    banner(f"stranded: SIGKILL a worker between dequeue and start, {runs} times each way")
    print(env_info())
    work = make_workdir("bench-stranded-")
    d_times, requeued = with_daemon(work, runs)
    r_times = rq_alone(work, runs, interval)

    def row(what: str, t: list[float]) -> tuple[Any, ...]:
        return (what, f"{len(t)}/{runs}", ms(percentile(t, 50)) if t else "-",
                ms(percentile(t, 99)) if t else "-", ms(max(t)) if t else "-")

    print_table(["path", "ran again", "p50 ms", "p99 ms", "max ms"], [
        row("rq-reconciler (worker death -> requeued -> running elsewhere)", d_times),
        row(f"RQ alone (maintenance every {interval:g} s; RQ's default is 600 s)", r_times),
    ], title="SIGKILL -> the stranded job's code starts on another worker")
    print(f"\ndaemon log: stranded_job requeued x{requeued}")
    footer()
    return 0


if __name__ == "__main__":
    run(main)
