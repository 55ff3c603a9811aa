"""`rq-reconciler sweep` vs the seed's cleanup script written the naive way.

20,000 active rows (status running, started_at 1 h ago), each with an RQ job id. RQ side,
created with RQ's own API (Job.create/save/set_status, Result.create_failure):
5,000 finished, 3,000 failed (exception text in the results stream), 2,000 missing (no
hash) and 10,000 queued (unchanged). Seeded shuffle, so which row is which is fixed.

(a) naive: for each running row Job.fetch(rq_id) (NoSuchJobError -> orphaned;
    latest_result() for a failed job's text) and one UPDATE committed per row, awaited one
    at a time: one round trip per job. Run as a subprocess of this script (`--naive`),
    so that both sides pay interpreter start-up.
(b) `python -m reconciler sweep --config X` as a subprocess, whole command timed.

Each run gets a fresh copy of the table (CREATE DATABASE run TEMPLATE tmpl). Redis is
only read by both sides (checked: DBSIZE and a digest of every status before/after).
Both must end with the same (id, status) table, and the same error texts.
Usage: python bench/sweep_vs_naive.py
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import redis  # noqa: E402
from rq.exceptions import NoSuchJobError  # noqa: E402
from rq.job import Job, JobStatus  # noqa: E402

from bench.common import (  # noqa: E402
    SEED,
    banner,
    bench_env,
    create_rq_jobs,
    env_info,
    footer,
    make_workdir,
    median,
    pg_copy_rows,
    pg_run,
    print_table,
    verdict,
)
from tests.harness import cleanup_all, harness_env  # noqa: E402

N_FINISHED, N_FAILED, N_MISSING, N_QUEUED = 5_000, 3_000, 2_000, 10_000
ROWS = N_FINISHED + N_FAILED + N_MISSING + N_QUEUED
RUNS = 5
GOAL_SPEEDUP = 10.0


# -- (a) the naive cleanup script -----------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


async def naive_cleanup(dsn: str, redis_url: str) -> tuple[int, int]:
    """What the seed's cleanup script does, written as it would be written.
    Returns (rows changed, network round trips made)."""
    r = redis.Redis.from_url(redis_url)
    pg = await asyncpg.connect(dsn)
    changed = 0
    rtt = 1
    try:
        rows = await pg.fetch("SELECT id, rq_job_id FROM training_jobs WHERE status = 'running'")
        for row in rows:
            job_id, rq_id = row["id"], row["rq_job_id"]
            new_status: str | None = None
            error = ""
            rtt += 1
            try:
                job = Job.fetch(rq_id, connection=r)
            except NoSuchJobError:
                new_status, error = "failed", "Orphaned: RQ job not found"
            else:
                status = job.get_status(refresh=False)
                if status == JobStatus.FINISHED:
                    new_status, error = "completed", "Synced: RQ finished"
                elif status == JobStatus.FAILED:
                    res = job.latest_result()
                    rtt += 1
                    exc = res.exc_string if res is not None and res.exc_string else ""
                    error = "Synced: RQ failed" + (f": {_last_line(exc)}" if exc else "")
                    new_status = "failed"
                elif status == JobStatus.STOPPED:
                    new_status, error = "failed", "Synced: RQ job stopped"
                elif status == JobStatus.CANCELED:
                    new_status, error = "failed", "Synced: RQ job canceled"
            if new_status is not None:
                await pg.execute(
                    "UPDATE training_jobs SET status = $2, error_message = $3, completed_at = now() "
                    "WHERE id = $1 AND status = 'running'", job_id, new_status, error)
                changed += 1
                rtt += 1
    finally:
        await pg.close()
        r.close()
    return changed, rtt


# -- the benchmark ----------------------------------------------------------------------------------


def _final_table(dsn: str) -> list[tuple[int, str, str]]:
    rows = pg_run(dsn, "SELECT id, status, coalesce(error_message, '') AS e FROM training_jobs ORDER BY id")
    return [(int(r["id"]), str(r["status"]), str(r["e"])) for r in rows]


@dataclass
class Run:
    run: int
    naive_s: float
    sweep_s: float
    sweep_internal_s: float
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
        n = int(pg_run(admin_dsn, "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
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
    rng = random.Random(SEED)
    kinds = (["finished"] * N_FINISHED + ["failed"] * N_FAILED + ["missing"] * N_MISSING
             + ["queued"] * N_QUEUED)
    rng.shuffle(kinds)
    specs = [(f"bench-{i:06d}", kind) for i, kind in enumerate(kinds)]
    with bench_env(work, dbname="tmpl") as env:
        t0 = time.monotonic()
        with env.redis_client() as r:
            create_rq_jobs(r, specs)
            before = _redis_digest(r)
        pg_copy_rows(env.dsn, [(rq_id, "running") for rq_id, _ in specs], ["rq_job_id", "status"])
        pg_run(env.dsn, "UPDATE training_jobs SET started_at = now() - interval '1 hour'")
        pg_run(env.dsn, "VACUUM ANALYZE training_jobs")
        print(f"setup: {ROWS:,} rows + RQ hashes in {time.monotonic() - t0:.1f} s "
              f"(redis keys {before[0]:,}, status digest {before[1]})")

        runs: list[Run] = []
        for run in range(1, RUNS + 1):
            dsn = {}
            for side in ("naive", "sweep"):
                name = f"run{run}_{side}"
                pg_run(env.pg.dsn("postgres"), f'CREATE DATABASE "{name}" TEMPLATE "tmpl"')
                dsn[side] = env.pg.dsn(name)
            # (a) naive, as a subprocess
            cmds0 = _redis_commands(env.redis_url)
            t = time.perf_counter()
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--naive",
                                dsn["naive"], env.redis_url], capture_output=True, text=True,
                               check=False, cwd=ROOT, env=harness_env())
            naive_s = time.perf_counter() - t
            naive_cmds = _redis_commands(env.redis_url) - cmds0 - 1
            if p.returncode != 0:
                raise RuntimeError(f"naive failed: {p.stderr[-3000:]}")
            naive_changed, naive_rtt = (int(x) for x in p.stdout.split())
            # (b) rq-reconciler sweep, as a subprocess
            cfg = env.write_config(dsn["sweep"], path=work / f"config-{run}.toml")
            cmds0 = _redis_commands(env.redis_url)
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "reconciler", "sweep", "--config", str(cfg)],
                               capture_output=True, text=True, check=False, cwd=ROOT,
                               env=harness_env())
            sweep_s = time.perf_counter() - t
            sweep_cmds = _redis_commands(env.redis_url) - cmds0 - 1
            if p.returncode != 0:
                raise RuntimeError(f"sweep failed ({p.returncode}): {p.stderr[-3000:]}")
            m = re.search(r"checked (\d+) active rows, changed (\d+) in ([\d.]+) s", p.stdout)
            a, b = _final_table(dsn["naive"]), _final_table(dsn["sweep"])
            runs.append(Run(
                run=run, naive_s=naive_s, sweep_s=sweep_s,
                sweep_internal_s=float(m.group(3)) if m else float("nan"),
                naive_changed=naive_changed, sweep_changed=int(m.group(2)) if m else -1,
                same_status=[(i, s) for i, s, _ in a] == [(i, s) for i, s, _ in b],
                same_error=a == b, naive_rtt=naive_rtt,
                naive_pg_xacts=_pg_xacts(env.pg.dsn("postgres"), f"run{run}_naive"),
                sweep_pg_xacts=_pg_xacts(env.pg.dsn("postgres"), f"run{run}_sweep"),
                naive_redis_cmds=naive_cmds, sweep_redis_cmds=sweep_cmds,
                sweep_stderr_lines=p.stderr.count("\n"),
            ))
            for side in ("naive", "sweep"):
                pg_run(env.pg.dsn("postgres"), f'DROP DATABASE "run{run}_{side}" WITH (FORCE)')

        with env.redis_client() as r:
            after = _redis_digest(r)

    print_table(
        ["run", "naive s", "sweep s (whole cmd)", "sweep s (in-process)", "speed-up",
         "naive changed", "sweep changed", "same (id,status)", "same error texts"],
        [(r.run, r.naive_s, r.sweep_s, r.sweep_internal_s, f"{r.naive_s / r.sweep_s:.1f}x",
          r.naive_changed, r.sweep_changed, "yes" if r.same_status else "NO",
          "yes" if r.same_error else "NO") for r in runs],
        title="per run (fresh copy of the table each time; Redis read-only)",
    )
    naive_med = median([r.naive_s for r in runs])
    sweep_med = median([r.sweep_s for r in runs])
    speedup = naive_med / sweep_med
    print_table(
        ["rows", "naive s (median)", "sweep s (median)", "speed-up", "goal", "result"],
        [(f"{ROWS:,}", naive_med, sweep_med, f"{speedup:.1f}x", f">= {GOAL_SPEEDUP:g}x",
          verdict(speedup, GOAL_SPEEDUP, higher_is_better=True))],
        title=f"summary (median of {RUNS})",
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--naive", nargs=2, metavar=("DSN", "REDIS_URL"),
                    help="internal: run the naive cleanup once and print the rows it changed")
    ns = ap.parse_args()
    if ns.naive:
        n_changed, n_rtt = asyncio.run(naive_cleanup(ns.naive[0], ns.naive[1]))
        print(n_changed, n_rtt)
        sys.exit(0)
    try:
        sys.exit(main())
    finally:
        cleanup_all()
