"""Cancel latency on the job's own host vs. handed over from another host's replica.

Two "hosts" (UTS + PID namespaces; needs root and unshare): host-b runs 2 real forking
`rq worker`s and replica B; host-a runs replica A. Each cancel is of a running
tests.jobs.trap_sigterm job (it exits on SIGTERM), one after the other.

- local: only B runs; B claims the request and stops the horse itself.
- handed over: A and B run; B is paused (SIGSTOP) while the request is inserted, so A
  claims it and hands it to B; B is resumed the moment the hand-over is seen (polled
  every 1 ms, so up to ~1-2 ms of that pause is in the number), and B stops the horse.

Latency = done_at - requested_at of the request row (Postgres's clock).
Usage (from the repo root, as root): python -m bench.handover_latency
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from bench.report import banner, env_info, footer, print_table, run
from bench.stack import bench_env, make_workdir
from bench.stats import ms, percentile
from reconciler.devstack import (
    Host,
    Pg,
    enqueue,
    insert_job,
    request_cancel,
    wait_request,
    wait_until,
)

N = 12


def _job(env_redis: str, dsn: str, markers: Path, name: str) -> int:
    marker = markers / f"{name}.txt"
    marker.touch()
    rq_id = enqueue(env_redis, "tests.jobs.trap_sigterm", 300, str(marker), job_timeout=600)
    jid = insert_job(dsn, rq_id, status="running", started_ago=10)
    wait_until(lambda: "STARTED" in marker.read_text(), 30, interval=0.005, what=f"{name} running")
    return jid


def main() -> int:
    if os.geteuid() != 0:
        print("handover_latency needs root (unshare for a UTS + PID namespace per host)")
        return 2
    banner(f"handover_latency: {N} cancels on the job's host vs {N} handed over from another")
    print(env_info())
    work = make_workdir("bench-handover-")
    markers = work / "markers"
    markers.mkdir()
    cancel = {"grace_seconds": 10.0, "lease_seconds": 30.0, "handover_seconds": 2.0}
    with bench_env(work, cancel=cancel, sweep={"min_age_seconds": 60.0}) as env:
        cfg_a = env.write_config(path=work / "a.toml", instance={"name": "replica-a"})
        cfg_b = env.write_config(path=work / "b.toml", instance={"name": "replica-b"})
        hosts: list[Host] = []
        local: list[float] = []
        handed: list[float] = []
        paths: dict[str, int] = {}
        try:
            b = Host(work, "host-b", env.redis_url, workers=2, config=cfg_b)
            hosts.append(b)
            b.wait_ready()
            for i in range(N):
                jid = _job(env.redis_url, env.dsn, markers, f"local-{i}")
                done = wait_request(env.dsn, request_cancel(env.dsn, jid), timeout=60)
                local.append((done["done_at"] - done["requested_at"]).total_seconds())
                paths[f"local run: {done['detail']['path']}"] = paths.get(
                    f"local run: {done['detail']['path']}", 0) + 1
            a = Host(work, "host-a", env.redis_url, config=cfg_a)
            hosts.append(a)
            a.wait_ready()
            b_pid = b.daemon_pid()
            with Pg(env.dsn) as pg:
                for i in range(N):
                    jid = _job(env.redis_url, env.dsn, markers, f"handed-{i}")
                    os.kill(b_pid, signal.SIGSTOP)
                    try:
                        rid = request_cancel(pg, jid)
                        wait_until(lambda rid=rid: pg.val(
                            "SELECT handed_to FROM rq_reconciler_cancel_requests WHERE id = $1",
                            rid) is not None, 10, interval=0.001, what="A to hand it over")
                    finally:
                        os.kill(b_pid, signal.SIGCONT)
                    done = wait_request(pg, rid, timeout=60)
                    handed.append((done["done_at"] - done["requested_at"]).total_seconds())
                    key = f"handed run: {done['detail']['path']}"
                    paths[key] = paths.get(key, 0) + 1
        finally:
            for h in hosts:
                h.stop()
    print_table(["path", "n", "p50 ms", "p95 ms", "max ms"], [
        ("cancel on the job's host (replica B claims)", len(local), ms(percentile(local, 50)),
         ms(percentile(local, 95)), ms(max(local))),
        ("handed over (A claims, hands to B, B stops it)", len(handed),
         ms(percentile(handed, 50)), ms(percentile(handed, 95)), ms(max(handed))),
    ])
    print(f"\npaths the outcomes report: {paths}")
    footer()
    return 0


if __name__ == "__main__":
    run(main)
