"""Peak memory with poison in the data: a 300 MB cancel reason and a compression bomb in a
failed job's exception text (an 800 MiB zlib stream, about 800 KB compressed).

Two databases on one Redis: a clean one (1,000 running rows: 500 whose RQ jobs finished,
500 failed with a normal traceback) and the same plus the poison (a row whose job failed
with the bomb, a pending cancel request with the 300 MB reason). Measured:

- `rq-reconciler sweep` as a whole command, peak RSS from wait4() (ru_maxrss), clean
  vs. poisoned;
- the daemon started on the poisoned database: its start-up sweep meets the bomb and its
  cancel processor the reason; peak RSS (VmHWM) once the request has its outcome.

Usage (from the repo root): python -m bench.poison_memory
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import redis

from bench.report import banner, env_info, footer, print_table, run, verdict
from bench.rq_data import create_rq_jobs
from bench.stack import bench_env, make_workdir
from reconciler.devstack import (
    DaemonProc,
    Pg,
    create_jobs_table,
    harness_env,
    insert_job,
    migrate,
    wait_request,
)

GOAL_MB = 80.0
ROWS = 1000
REASON_MB = 300
BOMB_MIB = 800


def _bomb(mib: int) -> bytes:
    z = zlib.compressobj(9)
    zeros = b"\0" * (1 << 20)
    return b"".join(z.compress(zeros) for _ in range(mib)) + z.compress(
        b"\nValueError: the real last line\n") + z.flush()


def _fill(dsn: str, r: redis.Redis, tag: str) -> None:
    specs = [(f"{tag}-{i}", "finished" if i % 2 else "failed") for i in range(ROWS)]
    create_rq_jobs(r, specs)
    with Pg(dsn) as pg:
        pg.execute("INSERT INTO training_jobs (rq_job_id, status, started_at) "
                   "SELECT u, 'running', now() - interval '1 hour' FROM unnest($1::text[]) u",
                   [s for s, _ in specs])


def _sweep_peak_mb(config: Path) -> tuple[float, int]:
    p = subprocess.Popen([sys.executable, "-m", "reconciler", "sweep", "--config", str(config)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=harness_env())
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.stderr is not None
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return usage.ru_maxrss / 1024, p.returncode


def _vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    banner(f"poison_memory: a {REASON_MB} MB cancel reason and a {BOMB_MIB} MiB zlib bomb, "
           f"peak RSS of the sweep command and the daemon")
    print(env_info())
    work = make_workdir("bench-poison-")
    rows: list[tuple[object, ...]] = []
    with bench_env(work, dbname="clean", sweep={"min_age_seconds": 0.0}) as env:
        r = env.redis_client()
        _fill(env.dsn, r, "clean")
        clean_mb, rc = _sweep_peak_mb(env.config)
        rows.append(("rq-reconciler sweep, clean data", f"{clean_mb:.0f}", rc, "(baseline)", ""))

        for name in ("poison_cli", "poison_daemon"):
            dsn = env.pg.create_database(name)
            create_jobs_table(dsn)
            cfg = env.write_config(dsn=dsn, path=work / f"{name}.toml")
            migrate(cfg)
            _fill(dsn, r, name)
            bomb_id = f"{name}-bomb"
            create_rq_jobs(r, [(bomb_id, "failed")])
            r.delete(f"rq:results:{bomb_id}")
            r.xadd(f"rq:results:{bomb_id}", {"type": "2",
                                              "exc_string": base64.b64encode(_bomb(BOMB_MIB))})
            insert_job(dsn, bomb_id, status="running")
            victim = insert_job(dsn, f"{name}-0", status="running")
            with Pg(dsn) as pg:
                rid = int(pg.val(
                    "INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
                    "VALUES ($1, 'bench', repeat('x', $2)) RETURNING id",
                    victim, REASON_MB * 1024 * 1024))
            if name == "poison_cli":
                mb, rc = _sweep_peak_mb(cfg)
                rows.append(("rq-reconciler sweep, with the poison", f"{mb:.0f}", rc,
                             f"<= {GOAL_MB:g} MB", verdict(mb, GOAL_MB)))
            else:
                d = DaemonProc(cfg, work / "daemon.log")
                try:
                    t0 = time.monotonic()
                    d.start(timeout=120)
                    req = wait_request(dsn, rid, timeout=120)
                    elapsed = time.monotonic() - t0
                    assert d.proc is not None
                    mb = _vm_hwm_mb(d.proc.pid)
                    alive = d.proc.poll() is None
                finally:
                    d.stop()
                    d.close()
                rows.append((f"daemon: start-up sweep + the cancel ({req['outcome']}, "
                             f"{elapsed:.1f} s), alive={alive}", f"{mb:.0f}", "-",
                             f"<= {GOAL_MB:g} MB", verdict(mb, GOAL_MB)))
        r.close()
    print_table(["run", "peak RSS MB", "exit", "goal", "result"], rows)
    footer()
    return 0


if __name__ == "__main__":
    run(main)
