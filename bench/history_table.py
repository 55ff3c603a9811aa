"""`rq-reconciler sweep` on a jobs table with years of history: 10M rows, 20,000 active.

9,980,000 finished rows (completed, failed, cancelled over three years; loaded by one
INSERT ... SELECT generate_series, indexes built afterwards) and, after them, 20,000
active rows in issue 13's mix (SWEEP_MIX in bench/rq_data.py: half started on one live,
idle local `rq worker`, the rest finished, failed, stopped/canceled, missing in Redis or
without an RQ id), RQ hashes made with RQ's API. The table has what the seed's has: a
primary key and an index on rq_job_id.

A. As it is: `rq-reconciler check`'s index lines, EXPLAIN of every statement the daemon
   sends to the jobs table (custom and generic plans: reconciler/devstack/explain.py),
   and the whole `python -m reconciler sweep` command, timed.
B. After running the CREATE INDEX CONCURRENTLY that `check` printed: the same.

Between sweeps the 10,000 rows a sweep changes are put back (UPDATE by id range, audit
and first-seen rows truncated, VACUUM ANALYZE). Usage (from the repo root):
python -m bench.history_table   (about 3 minutes)
"""

from __future__ import annotations

import compileall
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.report import banner, env_info, footer, print_table, run, verdict
from bench.rq_data import SEED, load_history, mixed_kinds, seed_mixed
from bench.stack import bench_env, make_workdir
from bench.stats import median
from reconciler.config import load
from reconciler.devstack import REPO_ROOT, Pg, WorkerPool, harness_env, run_cli
from reconciler.devstack.explain import explain_store_queries

HISTORY = 9_980_000
ACTIVE = 20_000
RUNS = 5
GOAL_S = 1.0


def _reset(dsn: str) -> None:
    with Pg(dsn) as pg:
        pg.execute("UPDATE training_jobs SET status = 'running', error_message = NULL, "
                   f"completed_at = NULL WHERE id > {HISTORY} AND status <> 'running'")
        pg.execute("TRUNCATE rq_reconciler_events, rq_reconciler_first_seen")
        pg.execute("VACUUM ANALYZE training_jobs")


def _sweeps(cfg_path: Path, dsn: str, runs: int) -> list[tuple[float, float, int]]:
    """(whole command s, in-process s, rows changed) per run, the table put back before each."""
    out = []
    for _ in range(runs):
        _reset(dsn)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "reconciler", "sweep", "--config", str(cfg_path)],
                           capture_output=True, text=True, check=False, cwd=REPO_ROOT,
                           env=harness_env())
        wall = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError(f"sweep failed ({p.returncode}): {p.stderr[-2000:]}")
        m = re.search(r"checked (\d+) active rows, changed (\d+) in ([\d.]+) s", p.stdout)
        out.append((wall, float(m.group(3)) if m else float("nan"), int(m.group(2)) if m else -1))
    return out


def _index_lines(cfg_path: Path) -> list[str]:
    p = run_cli(cfg_path, "check")
    return [ln for ln in p.stdout.splitlines() if "index:" in ln]


def _plans(title: str, dsn: str, cfg_path: Path) -> int:
    cfg = load(str(cfg_path))
    rows = []
    seq = 0
    t0 = time.perf_counter()
    for e in explain_store_queries(dsn, cfg, analyze=True):
        scans = e.seq_scans("training_jobs")
        seq += bool(scans)
        took = f"{e.plan.get('Actual Total Time', 0):.2f}"
        rows.append((e.name, e.mode, "SEQ SCAN" if scans else "no",
                     f"{e.rows_discarded('training_jobs'):,}", took, e.summary("training_jobs")[:90]))
    print_table(["statement", "plan", "seq scan of jobs", "jobs rows read and discarded",
                 "EXPLAIN ANALYZE ms", "how the jobs table is read"],
                rows, title=f"{title} (EXPLAIN ANALYZE, rolled back; {time.perf_counter() - t0:.1f} s)")
    return seq


def main() -> int:
    banner(f"history_table: `rq-reconciler sweep` on {HISTORY + ACTIVE:,} rows, {ACTIVE:,} active")
    print(env_info())
    work = make_workdir("bench-history-")
    t0 = time.monotonic()
    with bench_env(work, dbname="big", prepare=lambda dsn: load_history(dsn, HISTORY)) as env:
        print(f"history: {HISTORY:,} finished rows loaded and indexed in {time.monotonic() - t0:.1f} s")
        pool = WorkerPool(env.redis_url, log_dir=work)
        idle = pool.start(name="bench-idle", queues=("bench-idle",))
        seed_mixed(env, mixed_kinds(ACTIVE, random.Random(SEED)), prefix="hist-active",
                   worker_name=idle.name)
        with Pg(env.dsn) as pg:
            pg.execute("VACUUM ANALYZE training_jobs")
            size = pg.val("SELECT pg_size_pretty(pg_total_relation_size('training_jobs'))")
        print(f"setup: {time.monotonic() - t0:.1f} s; training_jobs with its indexes: {size}")
        compileall.compile_dir(REPO_ROOT / "reconciler", quiet=1)

        results: dict[str, tuple[list[tuple[float, float, int]], int, list[str]]] = {}
        lines: list[str] = []
        for phase in ("without", "with"):
            if phase == "with":
                statement = next(ln.split("Fix: ", 1)[1] for ln in lines if "Fix: CREATE INDEX" in ln
                                 and "active rows index" in ln)
                t = time.perf_counter()
                with Pg(env.dsn) as pg:
                    pg.execute(statement)
                    pg.execute("ANALYZE training_jobs")
                print(f"\nran what check printed, in {time.perf_counter() - t:.1f} s: {statement}")
            lines = _index_lines(env.config)
            print(f"\ncheck, {phase} the recommended index:\n  " + "\n  ".join(lines))
            _reset(env.dsn)
            seq = _plans(f"{phase} the recommended index", env.dsn, env.config)
            runs = _sweeps(env.config, env.dsn, RUNS if phase == "with" else 3)
            results[phase] = (runs, seq, lines)
        pool.stop_all()

    rows = []
    for phase, (runs, seq, _lines) in results.items():
        whole = median([r[0] for r in runs])
        rows.append((f"{phase} index", len(runs), whole, median([r[1] for r in runs]),
                     min(r[0] for r in runs), max(r[0] for r in runs),
                     ",".join(str(r[2]) for r in runs), seq,
                     f"<= {GOAL_S:g} s, no seq scan" if phase == "with" else "(comparison)",
                     ("PASS" if verdict(whole, GOAL_S) == "PASS" and seq == 0 else "MISS")
                     if phase == "with" else ""))
    print_table(["table", "runs", "whole command s (median)", "in-process s (median)", "min s", "max s",
                 "rows changed per run", "statements with a seq scan of jobs", "goal", "result"],
                rows, title=f"`rq-reconciler sweep` on {HISTORY + ACTIVE:,} rows, {ACTIVE:,} active "
                            "(whole command: start-up, imports and connecting included)")
    footer()
    return 0


if __name__ == "__main__":
    run(main)
