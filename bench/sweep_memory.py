"""Peak memory of one `rq-reconciler sweep` over 100,000 active rows.

100,000 rows (status running, started_at 1 h ago), RQ hashes made with RQ's API in the
same proportions as sweep_vs_naive (25% finished, 15% failed with an exception in the
results stream, 10% missing, 50% queued; seeded shuffle). One `python -m reconciler sweep`
subprocess; its peak RSS is read exactly from the kernel when it is reaped
(os.wait4 -> ru_maxrss of that one child), and cross-checked by polling psutil every 20 ms.
Usage (from the repo root): python -m bench.sweep_memory
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time

from bench.common import (
    SEED,
    ProcSampler,
    banner,
    bench_env,
    create_rq_jobs,
    env_info,
    footer,
    make_workdir,
    mb,
    pg_copy_rows,
    print_table,
    verdict,
)
from reconciler.devstack import REPO_ROOT, cleanup_all, harness_env, pg_fetch

ROWS = 100_000
SHARES = {"finished": 0.25, "failed": 0.15, "missing": 0.10, "queued": 0.50}
GOAL_MB = 150.0


def main() -> int:
    banner(f"sweep_memory: peak RSS of `rq-reconciler sweep` over {ROWS:,} active rows")
    print(env_info())
    work = make_workdir("bench-sweep-mem-")
    rng = random.Random(SEED)
    kinds: list[str] = []
    for kind, share in SHARES.items():
        kinds += [kind] * int(ROWS * share)
    rng.shuffle(kinds)
    specs = [(f"mem-{i:06d}", kind) for i, kind in enumerate(kinds)]
    with bench_env(work) as env:
        t0 = time.monotonic()
        with env.redis_client() as r:
            create_rq_jobs(r, specs)
        pg_copy_rows(env.dsn, [(rq_id, "running") for rq_id, _ in specs], ["rq_job_id", "status"])
        pg_fetch(env.dsn, "UPDATE training_jobs SET started_at = now() - interval '1 hour'")
        pg_fetch(env.dsn, "VACUUM ANALYZE training_jobs")
        print(f"setup: {ROWS:,} rows + RQ hashes in {time.monotonic() - t0:.1f} s")

        out_path, err_path = work / "sweep.out", work / "sweep.err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            t = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "sweep", "--config", str(env.config)],
                stdout=out, stderr=err, cwd=REPO_ROOT, env=harness_env())
            sampler = ProcSampler(proc.pid, 0.02).start()
            _pid, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t
            proc.returncode = os.waitstatus_to_exitcode(status)
            sampler.stop()
        rc = proc.returncode
        stdout = out_path.read_text(errors="replace")
        m = re.search(r"checked (\d+) active rows, changed (\d+) in ([\d.]+) s", stdout)
        checked = int(m.group(1)) if m else -1
        changed = int(m.group(2)) if m else -1
        internal = float(m.group(3)) if m else float("nan")
        counts = {str(r["status"]): int(r["n"]) for r in pg_fetch(
            env.dsn, "SELECT status, count(*) AS n FROM training_jobs GROUP BY status")}
        if rc != 0:
            print(f"sweep exited {rc}:\n{err_path.read_text(errors='replace')[-3000:]}")

    # Linux reports ru_maxrss in KiB.
    peak_exact = usage.ru_maxrss * 1024
    print_table(
        ["rows", "exit", "checked", "changed", "wall s", "rows/s", "in-process s",
         "peak RSS MB (wait4)", "peak RSS MB (psutil 20 ms)", "goal", "result"],
        [(f"{ROWS:,}", rc, checked, changed, wall, f"{ROWS / wall:,.0f}", internal,
          mb(peak_exact), mb(sampler.peak), f"<= {GOAL_MB:g} MB",
          verdict(mb(peak_exact), GOAL_MB))],
    )
    print(f"\nCPU of the sweep process: user {usage.ru_utime:.2f} s, sys {usage.ru_stime:.2f} s; "
          f"stdout {len(stdout.splitlines()):,} lines (its change table), "
          f"stderr {err_path.stat().st_size / 1e6:.1f} MB of logs")
    print("table after the sweep: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    if sampler.samples:
        t_first = sampler.samples[0][0]
        n = len(sampler.samples)
        step = max(1, n // 10)
        print("RSS timeline (psutil): " + "  ".join(
            f"{s[0] - t_first:.1f}s:{mb(s[1]):.0f}MB" for s in sampler.samples[::step]))
    footer()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        cleanup_all()
