"""One sweep over 1,000,000 active rows: time and peak memory, CLI and daemon.

1,000,000 rows (status running, started_at 1 h ago) in issue 13's mix (SWEEP_MIX in
bench/rq_data.py: half started on one live, idle local `rq worker`, 20% finished, 10%
failed, 5% stopped/canceled, 10% missing in Redis, 5% with no RQ id): 500,000 change.
Each status's RQ keys are made once with RQ's API and copied to every id (DUMP/RESTORE:
clone_rq_jobs), which is what makes a million of them quick to set up.

Three runs, the table put back between them (UPDATE, audit and first-seen rows
truncated, VACUUM ANALYZE):
1. `python -m reconciler sweep` (the change table on stdout, to a file);
2. `python -m reconciler sweep --json`;
3. the daemon, `python -m reconciler run`: its start-up sweep (READY=1 once it is done;
   the seconds come from its `sweep_done` log line).
Peak RSS is the kernel's own high-water mark: ru_maxrss from os.wait4() for the CLI (by a
small launcher process forked before the data is built: a child forked from this
process would count this process's size), VmHWM from /proc/<pid>/status for the daemon
(read before it is stopped); a 20 ms psutil poll cross-checks both.
Usage (from the repo root): python -m bench.sweep_memory   (about 3 minutes)
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path

from bench.procs import Launcher, ProcSampler
from bench.report import banner, env_info, footer, print_table, run, verdict
from bench.rq_data import SEED, mixed_kinds, seed_mixed
from bench.stack import bench_env, make_workdir
from bench.stats import mb
from reconciler.devstack import REPO_ROOT, DaemonProc, Pg, WorkerPool, harness_env

ROWS = 1_000_000
GOAL_MB = 150.0
GOAL_S = 30.0


def _reset(dsn: str) -> None:
    with Pg(dsn) as pg:
        pg.execute("UPDATE training_jobs SET status = 'running', error_message = NULL, "
                   "completed_at = NULL WHERE status <> 'running'")
        pg.execute("TRUNCATE rq_reconciler_events, rq_reconciler_first_seen")
        pg.execute("VACUUM ANALYZE training_jobs")


def _counts(dsn: str) -> str:
    with Pg(dsn) as pg:
        recs = pg.fetch("SELECT status, count(*) AS n FROM training_jobs GROUP BY status ORDER BY 1")
    return ", ".join(f"{r['status']} {r['n']:,}" for r in recs)


def _vm_hwm(pid: int) -> int:
    """The process's peak RSS so far (bytes), as the kernel keeps it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _cli(launcher: Launcher, config: Path, work: Path, *args: str) -> tuple[object, ...]:
    name = "json" if args else "table"
    out_path, err_path = work / f"sweep-{name}.out", work / f"sweep-{name}.err"
    pid = launcher.start([sys.executable, "-m", "reconciler", "sweep", "--config", str(config), *args],
                         out_path, err_path, cwd=REPO_ROOT, env=harness_env())
    sampler = ProcSampler(pid, 0.02).start()
    done = launcher.wait()
    sampler.stop()
    rc, wall = int(done["rc"]), float(done["wall"])
    if rc != 0:
        print(f"sweep {' '.join(args)} exited {rc}:\n{err_path.read_text(errors='replace')[-3000:]}")
    if args:
        with out_path.open() as f:
            doc = json.load(f)  # one valid document, however long
        checked, changed, internal = doc["checked"], doc["changed"], doc["duration_seconds"]
        listed = len(doc["changes"])
    else:
        text = out_path.read_text(errors="replace")
        m = re.search(r"checked (\d+) active rows, changed (\d+) in ([\d.]+) s", text)
        checked, changed, internal = (int(m.group(1)), int(m.group(2)), float(m.group(3))) if m \
            else (-1, -1, float("nan"))
        listed = sum(1 for ln in text.splitlines() if ln[:1].isdigit())  # one line per change
    return (f"CLI sweep{' ' + ' '.join(args) if args else ''}", rc, checked, changed, listed,
            wall, internal, mb(float(done["maxrss"])), mb(sampler.peak),
            f"{float(done['cpu']):.1f}", out_path.stat().st_size / 1e6)


def _daemon(config: Path, work: Path) -> tuple[object, ...]:
    daemon = DaemonProc(config, work / "daemon.log")
    t = time.perf_counter()
    try:
        daemon.start(wait_ready=False)
        assert daemon.proc is not None
        sampler = ProcSampler(daemon.proc.pid, 0.02).start()
        daemon.wait_message("READY=1", timeout=300)
        ready = time.perf_counter() - t
        time.sleep(1.0)
        peak = _vm_hwm(daemon.proc.pid)
        sampler.stop()
        done = [e for e in daemon.log_events() if e.get("event") == "sweep_done"]
    finally:
        daemon.stop()
        daemon.close()
    sweep = done[0] if done else {}
    return ("daemon start-up sweep", 0 if done else 1, sweep.get("checked", -1),
            sweep.get("changed", -1), "-", ready, float(sweep.get("seconds", float("nan"))),
            mb(peak), mb(sampler.peak), "-", "-")


def _verdict(r: tuple[object, ...]) -> str:
    wall, peak = float(str(r[5])), float(str(r[7]))
    ok = r[1] == 0 and verdict(wall, GOAL_S) == "PASS" and verdict(peak, GOAL_MB) == "PASS"
    return "PASS" if ok else "MISS"


def main() -> int:
    banner(f"sweep_memory: one sweep over {ROWS:,} active rows, CLI (table, JSON) and daemon")
    print(env_info())
    work = make_workdir("bench-sweep-mem-")
    launcher = Launcher()  # forked now, while this process is small (see Launcher)
    # The daemon's sweep must not be disturbed by a timer or by events during the run.
    with bench_env(work, sweep={"interval_seconds": 3600.0},
                   redis={"keyspace_events": "off"}) as env:
        t0 = time.monotonic()
        pool = WorkerPool(env.redis_url, log_dir=work)
        idle = pool.start(name="bench-idle", queues=("bench-idle",))
        kinds = mixed_kinds(ROWS, random.Random(SEED))
        seed_mixed(env, kinds, prefix="mem", worker_name=idle.name, clone=True)
        with Pg(env.dsn) as pg:
            pg.execute("VACUUM ANALYZE training_jobs")
        print(f"setup: {ROWS:,} rows + RQ keys in {time.monotonic() - t0:.1f} s; mix: "
              + ", ".join(f"{k} {kinds.count(k):,}" for k in dict.fromkeys(kinds)))
        rows = []
        after = []
        for run in ("table", "json", "daemon"):
            if run != "table":
                t = time.monotonic()
                _reset(env.dsn)
                print(f"table put back in {time.monotonic() - t:.1f} s")
            if run == "daemon":
                rows.append(_daemon(env.config, work))
            else:
                rows.append(_cli(launcher, env.config, work,
                                 *(("--json",) if run == "json" else ())))
            after.append(f"{run}: {_counts(env.dsn)}")
        pool.stop_all()
    launcher.close()

    print_table(
        ["run", "exit", "checked", "changed", "changes listed", "wall s", "sweep s (its own)",
         "peak RSS MB (kernel)", "peak RSS MB (psutil 20 ms)", "CPU s", "stdout MB", "goal",
         "result"],
        [(*r, f"<= {GOAL_S:g} s (wall), <= {GOAL_MB:g} MB", _verdict(r)) for r in rows],
        title=f"one sweep over {ROWS:,} active rows (wall s: the whole command, or the daemon's "
              "start to READY=1)",
    )
    print("\ntable after each run: \n  " + "\n  ".join(after))
    footer()
    return 0


if __name__ == "__main__":
    run(main)
