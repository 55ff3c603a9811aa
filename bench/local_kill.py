"""A local worker SIGKILLed mid-job: how fast does its row fail, and is the horse stopped?

The daemon runs as a subprocess (sweep every 300 s, so only the local pid watch can be
fast). 5 times: a fresh real `rq worker` runs a long job (tests.jobs.touch_and_sleep, row
`running`); 0.5 s after the job's code started, the worker's main process is SIGKILLed
(its horse lives on, reparented, still holding the worker's pub/sub socket). Measured:
SIGKILL -> row `failed` (row polled every 5 ms; also the audit row's `at`, PG clock),
and SIGKILL -> the orphaned horse's pid gone (polled every 5 ms; a zombie counts as gone).
Usage (from the repo root): python -m bench.local_kill
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import banner, env_info, footer, print_table, run, verdict
from bench.stack import bench_env, make_workdir
from bench.stats import ms, percentile
from reconciler.devstack import (
    DaemonProc,
    Pg,
    WorkerPool,
    enqueue,
    insert_job,
    pg_fetch,
    pid_alive,
    wait_until,
)

REPEATS = 5
GOAL_S = 2.0
HORSE_DEADLINE_S = 15.0


def _started(marker: Path) -> Callable[[], bool]:
    return lambda: marker.exists() and "STARTED" in marker.read_text()


def main() -> int:
    banner(f"local_kill: SIGKILL a local worker mid-job, {REPEATS} times")
    print(env_info())
    work = make_workdir("bench-local-kill-")
    (work / "markers").mkdir()
    results: list[dict[str, Any]] = []
    with bench_env(work, sweep={"interval_seconds": 300.0, "min_age_seconds": 60.0}) as env:
        pool = WorkerPool(env.redis_url, log_dir=work)
        daemon = DaemonProc(env.config, work / "daemon.log")
        try:
            daemon.start(timeout=60)
            for i in range(REPEATS):
                w = pool.start(name=f"kill-{i}")
                time.sleep(0.3)  # the daemon learns the new worker from its keyspace event
                marker = work / "markers" / f"kill-{i}.txt"
                rq_id = f"kill-{i:02d}"
                job_row = insert_job(env.dsn, rq_id, status="running", started_ago=0)
                enqueue(env.redis_url, "tests.jobs.touch_and_sleep", 300, str(marker),
                        job_id=rq_id, job_timeout=600)
                wait_until(_started(marker), timeout=20, interval=0.005, what="job running")
                horse_pid = int(marker.read_text().split()[1])
                time.sleep(0.5)
                pg = Pg(env.dsn).connect()
                kill_wall = time.time()
                t0 = time.perf_counter()
                w.kill(signal.SIGKILL)
                t_row: float | None = None
                t_horse: float | None = None
                status = ""
                while time.perf_counter() - t0 < HORSE_DEADLINE_S:
                    if t_row is None:
                        status = str(pg.val("SELECT status FROM training_jobs WHERE id = $1",
                                                 job_row))
                        if status == "failed":
                            t_row = time.perf_counter() - t0
                    if t_horse is None and not pid_alive(horse_pid):
                        t_horse = time.perf_counter() - t0
                    if t_row is not None and t_horse is not None:
                        break
                    time.sleep(0.005)
                pg.close()
                audit = pg_fetch(env.dsn, "SELECT at, reason, detail::text AS d FROM rq_reconciler_events "
                                          "WHERE job_id = $1 AND to_status = 'failed'", str(job_row))
                err = pg_fetch(env.dsn, "SELECT error_message FROM training_jobs WHERE id = $1",
                               job_row)[0]["error_message"]
                results.append({
                    "i": i, "rq_id": rq_id, "row_s": t_row, "horse_s": t_horse,
                    "audit_s": (audit[0]["at"].timestamp() - kill_wall) if audit else None,
                    "error": err or "", "status": status,
                })
                w.stop()  # reaps the worker, kills a surviving horse
            time.sleep(6.0)  # the daemon's post-stop wait is 5 s: let it finish and log
            events = daemon.log_events()
        finally:
            daemon.stop()
            daemon.close()
            pool.stop_all()

    def fmt(x: float | None) -> str:
        return "never" if x is None else f"{ms(x):.0f}"

    rows = []
    for r in results:
        rows.append((r["i"] + 1, fmt(r["row_s"]), fmt(r["audit_s"]), fmt(r["horse_s"]),
                     verdict(r["row_s"] if r["row_s"] is not None else float("nan"), GOAL_S),
                     r["error"][:70]))
    print_table(["run", "SIGKILL->row failed ms (5 ms poll)", "SIGKILL->audit at ms",
                 "SIGKILL->horse pid gone ms", f"goal row <= {GOAL_S:g} s", "error_message"], rows)
    row_s = [r["row_s"] for r in results if r["row_s"] is not None]
    horse_s = [r["horse_s"] for r in results if r["horse_s"] is not None]
    worst = max(row_s) if len(row_s) == len(results) else float("nan")
    print_table(["metric", "n", "p50 ms", "max ms", "goal", "result"], [
        ("SIGKILL -> row failed", len(row_s), ms(percentile(row_s, 50)), ms(worst),
         f"<= {GOAL_S * 1000:g} ms (every run)", verdict(worst, GOAL_S)),
        ("SIGKILL -> orphaned horse gone", len(horse_s), ms(percentile(horse_s, 50)),
         ms(max(horse_s, default=float("nan"))), "(stopped at all?)",
         f"{len(horse_s)}/{len(results)} stopped"),
    ], title="summary")
    ids = {r["rq_id"] for r in results}
    stops = [e for e in events if e.get("event") == "horse_stopped" and e.get("rq_id") in ids]
    wedged = [e for e in events if e.get("event") == "worker_wedged" and e.get("rq_id") in ids]
    exited = [e for e in events if e.get("event") == "local_worker_exited"]
    print(f"\ndaemon log: local_worker_exited x{len(exited)}, horse_stopped x{len(stops)} "
          f"(signals: {sorted({','.join(e.get('signals') or []) for e in stops})}), "
          f"worker_wedged x{len(wedged)} for these jobs")
    for e in wedged[:1]:
        print(f"  e.g. worker_wedged: rq_id={e.get('rq_id')} worker={e.get('worker')} "
              f"horse_stopped={e.get('horse_stopped')} level={e.get('level')}")
    footer()
    return 0


if __name__ == "__main__":
    run(main)
