"""The daemon at rest: RSS and CPU over 60 s of idling.

The daemon runs as a subprocess (DaemonProc: READY=1 over NOTIFY_SOCKET, WATCHDOG_USEC=2 s
so it pets the watchdog every second), keyspace events on (auto), sweep every 300 s,
with 2 idle real `rq worker`s on the same Redis (they heartbeat, which the daemon hears)
and 1,000 terminal rows in the table. After READY (and 2 s to settle) it is left alone
for 60 s; RSS is sampled every second, CPU% = psutil cpu_times delta / wall.
Usage (from the repo root): python -m bench.idle
"""

from __future__ import annotations

import time

import psutil

from bench.procs import cpu_seconds
from bench.report import banner, env_info, footer, print_table, run, verdict
from bench.stack import bench_env, make_workdir, pg_copy_rows
from bench.stats import mb
from reconciler.devstack import DaemonProc, WorkerPool

IDLE_SECONDS = 60.0
GOAL_RSS_MB = 60.0
GOAL_CPU_PCT = 1.0


def main() -> int:
    banner(f"idle: the daemon at rest for {IDLE_SECONDS:g} s (keyspace events on, sweep every 300 s)")
    print(env_info())
    work = make_workdir("bench-idle-")
    with bench_env(work, sweep={"interval_seconds": 300.0}) as env:
        pg_copy_rows(env.dsn, [(f"done-{i}", "completed") for i in range(1000)], ["rq_job_id", "status"])
        pool = WorkerPool(env.redis_url, log_dir=work)
        daemon = DaemonProc(env.config, work / "daemon.log")
        try:
            pool.start(name="idle-w1")
            pool.start(name="idle-w2")
            daemon.start(timeout=60)
            assert daemon.proc is not None
            pid = daemon.proc.pid
            time.sleep(2.0)
            proc = psutil.Process(pid)
            rss: list[int] = [proc.memory_info().rss]
            cpu0, t0 = cpu_seconds(pid), time.perf_counter()
            ctx0 = proc.num_ctx_switches()
            while time.perf_counter() - t0 < IDLE_SECONDS:
                time.sleep(1.0)
                rss.append(proc.memory_info().rss)
            wall = time.perf_counter() - t0
            cpu = cpu_seconds(pid) - cpu0
            ctx1 = proc.num_ctx_switches()
            uss = proc.memory_full_info().uss
            threads = proc.num_threads()
        finally:
            daemon.stop()
            daemon.close()
            pool.stop_all()

    cpu_pct = 100.0 * cpu / wall
    rss_max = mb(max(rss))
    print_table(
        ["metric", "value", "goal", "result"],
        [
            ("RSS at start of idle (MB)", mb(rss[0]), "", ""),
            ("RSS max over the idle period (MB)", rss_max, f"<= {GOAL_RSS_MB:g} MB",
             verdict(rss_max, GOAL_RSS_MB)),
            ("RSS at end (MB)", mb(rss[-1]), "", ""),
            ("USS at end (MB, private memory)", mb(uss), "", ""),
            ("CPU % over the idle period", cpu_pct, f"<= {GOAL_CPU_PCT:g} %", verdict(cpu_pct, GOAL_CPU_PCT)),
            ("CPU seconds used", cpu, "", ""),
            ("voluntary context switches / s", (ctx1.voluntary - ctx0.voluntary) / wall, "", ""),
            ("threads", threads, "", ""),
        ],
        title=f"daemon pid {pid}, idle {wall:.1f} s",
    )
    footer()
    return 0


if __name__ == "__main__":
    run(main)
