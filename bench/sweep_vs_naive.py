"""`rq-reconciler sweep` vs the seed's cleanup script written the naive way.

20,000 active rows (status running, started_at 1 h ago), in issue 13's mix (SWEEP_MIX in
bench/rq_data.py): 50% started on one live, idle local `rq worker` (they stay running),
20% finished, 10% failed (exception text in RQ's results stream), 5% stopped or
canceled, 10% whose RQ job is missing, 5% with no RQ id. RQ hashes are made with RQ's
own API (Job.create/save/set_status, Result.create_failure). Seeded shuffle, so which
row is which is fixed.

(a) naive: `bench/naive_cleanup.py` (Job.fetch and one committed UPDATE per row, one
    round trip at a time; it imports only redis, rq and asyncpg), as a subprocess.
(b) `python -m reconciler sweep --config X`, as a subprocess.

Both are timed as whole commands (interpreter start-up, imports and connecting
included: the line the goal is judged on, since operators run both as commands) and by
the time each reports for its work on the rows alone. The package's bytecode is
compiled first, as `pip install` does: otherwise a shell that exports
PYTHONDONTWRITEBYTECODE recompiles it on every run (about 0.1 s here), which no installed
copy pays.

Each run gets a fresh copy of the table (CREATE DATABASE run TEMPLATE tmpl). Redis is
only read by both sides (checked: DBSIZE and a digest of every job status before/after).
Both must end with the same (id, status) table, and the same error texts.
Usage (from the repo root): python -m bench.sweep_vs_naive
"""

from __future__ import annotations

import compileall
import hashlib
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.report import banner, env_info, footer, print_table, run, verdict
from bench.rq_data import SEED, mixed_kinds, seed_mixed
from bench.stack import bench_env, make_workdir
from bench.stats import median
from reconciler.devstack import REPO_ROOT, WorkerPool, harness_env, pg_fetch

ROWS = 20_000
NAIVE = Path(__file__).resolve().parent / "naive_cleanup.py"
RUNS = 5
GOAL_SPEEDUP = 12.0


# -- the benchmark ----------------------------------------------------------------------------------


def _final_table(dsn: str) -> list[tuple[int, str, str]]:
    rows = pg_fetch(dsn, "SELECT id, status, coalesce(error_message, '') AS e FROM training_jobs ORDER BY id")
    return [(int(r["id"]), str(r["status"]), str(r["e"])) for r in rows]


@dataclass
class Run:
    run: int
    naive_s: float
    naive_work_s: float
    sweep_s: float
    sweep_work_s: float
    naive_changed: int
    sweep_changed: int
    same_status: bool
    same_error: bool
    naive_rtt: int
    naive_pg_xacts: int
    sweep_pg_xacts: int
    naive_redis_cmds: int
    sweep_redis_cmds: int
    sweep_stderr_lines: int


def _redis_commands(url: str) -> int:
    with redis.Redis.from_url(url) as r:
        return int(r.info("stats")["total_commands_processed"])


def _pg_xacts(admin_dsn: str, dbname: str) -> int:
    """Committed transactions in `dbname` (each autocommitted statement is one); the
    backends that made them have exited, so their counts are flushed."""
    deadline = time.monotonic() + 5
    last = -1
    while time.monotonic() < deadline:
        n = int(pg_fetch(admin_dsn, "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
                         dbname)[0]["xact_commit"])
        if n == last:
            return n
        last = n
        time.sleep(0.3)
    return last


def _redis_digest(r: redis.Redis) -> tuple[int, str]:
    h = hashlib.sha256()
    for key in sorted(r.scan_iter("rq:job:*", count=5000)):
        status = r.hget(key, "status") or b""
        h.update(key if isinstance(key, bytes) else str(key).encode())
        h.update(status if isinstance(status, bytes) else str(status).encode())
    return int(r.dbsize()), h.hexdigest()[:16]


def main() -> int:
    banner(f"sweep_vs_naive: {ROWS:,} active rows, naive per-row cleanup vs `rq-reconciler sweep`")
    print(env_info())
    work = make_workdir("bench-sweep-naive-")
    kinds = mixed_kinds(ROWS, random.Random(SEED))
    with bench_env(work, dbname="tmpl") as env:
        pool = WorkerPool(env.redis_url, log_dir=work)
        t0 = time.monotonic()
        # A live local worker that runs nothing (its queue stays empty): the started jobs
        # name it, so they stay running.
        idle = pool.start(name="bench-idle", queues=("bench-idle",))
        seed_mixed(env, kinds, prefix="bench", worker_name=idle.name)
        with env.redis_client() as r:
            before = _redis_digest(r)
        pg_fetch(env.dsn, "VACUUM ANALYZE training_jobs")
        print(f"setup: {ROWS:,} rows + RQ hashes in {time.monotonic() - t0:.1f} s "
              f"(redis keys {before[0]:,}, status digest {before[1]}); mix: "
              + ", ".join(f"{k} {kinds.count(k):,}" for k in dict.fromkeys(kinds)))

        # What `pip install` does; a no-op where the bytecode is already there and fresh.
        compileall.compile_dir(REPO_ROOT / "reconciler", quiet=1)
        runs: list[Run] = []
        for run in range(1, RUNS + 1):
            dsn = {}
            for side in ("naive", "sweep"):
                name = f"run{run}_{side}"
                pg_fetch(env.pg.dsn("postgres"), f'CREATE DATABASE "{name}" TEMPLATE "tmpl"')
                dsn[side] = env.pg.dsn(name)
            # (a) naive, as a subprocess
            cmds0 = _redis_commands(env.redis_url)
            t = time.perf_counter()
            p = subprocess.run([sys.executable, str(NAIVE), dsn["naive"], env.redis_url],
                               capture_output=True, text=True, check=False, cwd=REPO_ROOT,
                               env=harness_env())
            naive_s = time.perf_counter() - t
            naive_cmds = _redis_commands(env.redis_url) - cmds0 - 1
            if p.returncode != 0:
                raise RuntimeError(f"naive failed: {p.stderr[-3000:]}")
            changed_s, rtt_s, work_s = p.stdout.split()
            naive_changed, naive_rtt, naive_work_s = int(changed_s), int(rtt_s), float(work_s)
            # (b) rq-reconciler sweep, as a subprocess
            cfg = env.write_config(dsn["sweep"], path=work / f"config-{run}.toml")
            cmds0 = _redis_commands(env.redis_url)
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "reconciler", "sweep", "--config", str(cfg)],
                               capture_output=True, text=True, check=False, cwd=REPO_ROOT,
                               env=harness_env())
            sweep_s = time.perf_counter() - t
            sweep_cmds = _redis_commands(env.redis_url) - cmds0 - 1
            if p.returncode != 0:
                raise RuntimeError(f"sweep failed ({p.returncode}): {p.stderr[-3000:]}")
            m = re.search(r"checked (\d+) active rows, changed (\d+) in ([\d.]+) s", p.stdout)
            a, b = _final_table(dsn["naive"]), _final_table(dsn["sweep"])
            runs.append(Run(
                run=run, naive_s=naive_s, naive_work_s=naive_work_s, sweep_s=sweep_s,
                sweep_work_s=float(m.group(3)) if m else float("nan"),
                naive_changed=naive_changed, sweep_changed=int(m.group(2)) if m else -1,
                same_status=[(i, s) for i, s, _ in a] == [(i, s) for i, s, _ in b],
                same_error=a == b, naive_rtt=naive_rtt,
                naive_pg_xacts=_pg_xacts(env.pg.dsn("postgres"), f"run{run}_naive"),
                sweep_pg_xacts=_pg_xacts(env.pg.dsn("postgres"), f"run{run}_sweep"),
                naive_redis_cmds=naive_cmds, sweep_redis_cmds=sweep_cmds,
                sweep_stderr_lines=p.stderr.count("\n"),
            ))
            for side in ("naive", "sweep"):
                pg_fetch(env.pg.dsn("postgres"), f'DROP DATABASE "run{run}_{side}" WITH (FORCE)')

        with env.redis_client() as r:
            after = _redis_digest(r)
        pool.stop_all()

    print_table(
        ["run", "naive s", "sweep s", "speed-up", "naive s (rows)", "sweep s (rows)",
         "speed-up (rows)", "naive changed", "sweep changed", "same (id,status)",
         "same error texts"],
        [(r.run, r.naive_s, r.sweep_s, f"{r.naive_s / r.sweep_s:.1f}x", r.naive_work_s,
          r.sweep_work_s, f"{r.naive_work_s / r.sweep_work_s:.1f}x", r.naive_changed,
          r.sweep_changed, "yes" if r.same_status else "NO",
          "yes" if r.same_error else "NO") for r in runs],
        title="per run (fresh copy of the table each time; Redis read-only). Whole commands, "
              "and (rows) the work on the rows as each side reports it",
    )
    naive_med = median([r.naive_s for r in runs])
    sweep_med = median([r.sweep_s for r in runs])
    speedup = naive_med / sweep_med
    naive_work = median([r.naive_work_s for r in runs])
    sweep_work = median([r.sweep_work_s for r in runs])
    print_table(
        ["rows", "timed", "naive s (median)", "sweep s (median)", "speed-up", "goal", "result"],
        [(f"{ROWS:,}", "whole command", naive_med, sweep_med, f"{speedup:.1f}x",
          f">= {GOAL_SPEEDUP:g}x", verdict(speedup, GOAL_SPEEDUP, higher_is_better=True)),
         (f"{ROWS:,}", "work on the rows", naive_work, sweep_work,
          f"{naive_work / sweep_work:.1f}x", f">= {GOAL_SPEEDUP:g}x",
          verdict(naive_work / sweep_work, GOAL_SPEEDUP, higher_is_better=True))],
        title=f"summary (median of {RUNS}; whole command = start-up, imports and connecting "
              "included, as an operator running it pays)",
    )
    print(f"\nfinal (id, status) tables identical in every run: "
          f"{'yes' if all(r.same_status for r in runs) else 'NO'}; "
          f"error texts identical: {'yes' if all(r.same_error for r in runs) else 'NO'}")
    print(f"redis untouched by both: {'yes' if before == after else 'NO'} "
          f"(keys {before[0]:,} -> {after[0]:,}, digest {before[1]} -> {after[1]})")

    # Where the time goes, and what a real network would add (localhost RTT is ~0.05 ms).
    r1 = runs[-1]
    pages = -(-ROWS // 1000)
    sweep_rtt = r1.sweep_pg_xacts + 3 * pages  # + <= 3 Redis calls a page (upper bound)
    print_table(
        ["side", "network round trips", "PG transactions", "Redis commands", "log lines (stderr)"],
        [("naive", f"{r1.naive_rtt:,} (counted)", f"{r1.naive_pg_xacts:,}", f"{r1.naive_redis_cmds:,}", 0),
         ("sweep", f"~{sweep_rtt:,} (PG xacts + <= 3 Redis calls/page)", f"{r1.sweep_pg_xacts:,}",
          f"{r1.sweep_redis_cmds:,}", f"{r1.sweep_stderr_lines:,}")],
        title=f"round trips (run {r1.run})",
    )
    rows = []
    for rtt_ms in (0.2, 0.5, 1.0):
        n = naive_med + r1.naive_rtt * rtt_ms / 1000
        sw = sweep_med + sweep_rtt * rtt_ms / 1000
        rows.append((f"{rtt_ms:g} ms", n, sw, f"{n / sw:.1f}x"))
    print_table(["modelled RTT", "naive s", "sweep s", "speed-up"], rows,
                title="model (not measured): the medians above + round trips x RTT")
    footer()
    return 0


if __name__ == "__main__":
    run(main)
