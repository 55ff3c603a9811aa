"""Cancel latency and worker-death latency in each pod layout (tests/faults/pods.py): the
daemon in a PID namespace of its own beside the worker (same hostname: a pod without
shareProcessNamespace), as a sidecar sharing the worker's PID namespace, and on the node
(DaemonSet, hostPID) while the worker runs in its pod's namespaces: with host-PID mode
(reconciler.hostpid, `[instance] host_pid = "auto"`, root here) and without it
("daemonset-off", host_pid = "off"). Needs root.

Per layout: one pod with a real forking `rq worker` (RQ 2 from the shared worker venvs
when present), the daemon placed as the layout says (sweep every 300 s); CANCELS cancels
of a running tests.jobs.trap_sigterm job, one after the other (latency = done_at -
requested_at of the request row, Postgres's clock; the path and whether the job got
SIGTERM first); then DEATHS times a fresh worker in the pod runs a job and is SIGKILLed
(latency = SIGKILL -> row `failed`, polled every 5 ms, given up after DEATH_CAP_S: then
only the worker's Redis TTL, minutes, or a sweep would fail it).
Usage (from the repo root, as root): python -m bench.layouts
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.report import banner, env_info, footer, print_table, run
from bench.stack import bench_env, make_workdir
from bench.stats import ms, percentile
from reconciler.devstack import Pg, enqueue, insert_job, request_cancel, wait_request
from tests.faults import pods

CANCELS = 5
DEATHS = 3
DEATH_CAP_S = 10.0


def _running(env_redis: str, dsn: str, markers: Path, name: str) -> tuple[int, str]:
    marker = markers / f"{name}.txt"
    marker.touch()
    rq_id = enqueue(env_redis, "tests.jobs.trap_sigterm", 300, str(marker), job_timeout=600)
    jid = insert_job(dsn, rq_id, status="running", started_ago=0)
    pods.wait_file_line(marker, "STARTED")
    return jid, rq_id


def main() -> int:
    why = pods.available()
    if why:
        print(f"layouts: {why}")
        return 2
    banner(f"layouts: {CANCELS} cancels and {DEATHS} worker SIGKILLs per pod layout")
    print(env_info())
    work = make_workdir("bench-layouts-")
    markers = work / "markers"
    markers.mkdir()
    rq_version = "2" if os.environ.get("RQ_RECONCILER_WORKER_VENVS") else None
    rows = []
    with bench_env(work, cancel={"grace_seconds": 10.0, "lease_seconds": 30.0, "handover_seconds": 1.0},
                   sweep={"interval_seconds": 300.0, "min_age_seconds": 60.0}) as env:
        for layout in ("separate", "sidecar", "daemonset", "daemonset-off"):
            place = layout.removesuffix("-off")
            cfg = env.write_config(path=work / f"{layout}.toml", instance={
                "name": f"rqr-{layout}", "host_pid": "off" if layout.endswith("-off") else "auto"})
            pod = pods.Pod(work, f"pod-{layout}", env.redis_url)
            workers = [pods.PodWorker(pod, env.redis_url, work, rq_version)]
            workers[0].wait_registered()
            daemon = pods.start_daemon(place, pod, cfg, work / f"daemon-{layout}.log")
            cancel_s: list[float] = []
            paths: set[str] = set()
            graceful = 0
            deaths: list[float] = []
            try:
                with Pg(env.dsn) as pg:
                    for i in range(CANCELS):
                        jid, _rq_id = _running(env.redis_url, env.dsn, markers, f"{layout}-c{i}")
                        req = wait_request(pg, request_cancel(pg, jid), timeout=60)
                        cancel_s.append((req["done_at"] - req["requested_at"]).total_seconds())
                        paths.add(str(req["detail"].get("path")))
                        graceful += (req["detail"].get("horse_signals") or [""])[0] == "SIGTERM"
                    for i in range(DEATHS):
                        w = pods.PodWorker(pod, env.redis_url, work, rq_version)
                        workers.append(w)
                        w.wait_registered()
                        time.sleep(0.3)  # the daemon learns the new worker from its keyspace event
                        jid, rq_id = _running(env.redis_url, env.dsn, markers, f"{layout}-k{i}")
                        # Whichever live worker of the pod took the job is the one killed.
                        with env.redis_client() as r:
                            name = r.hget(f"rq:job:{rq_id}", "worker_name")
                        owner = next(x for x in workers if x.name.encode() == name)
                        t0 = time.perf_counter()
                        owner.kill()
                        took = float("nan")
                        while time.perf_counter() - t0 < DEATH_CAP_S:
                            if pg.val("SELECT status FROM training_jobs WHERE id = $1", jid) == "failed":
                                took = time.perf_counter() - t0
                                break
                            time.sleep(0.005)
                        deaths.append(took)
                        owner.close()
            finally:
                pods.stop_daemon(daemon)
                pod.stop()
                for w in workers:
                    w.close()
            seen = [d for d in deaths if d == d]
            rows.append((layout, ms(percentile(cancel_s, 50)), ms(max(cancel_s)),
                         f"{graceful}/{CANCELS}", ",".join(sorted(paths)),
                         ms(percentile(seen, 50)) if seen else f"> {DEATH_CAP_S:g} s",
                         f"{len(seen)}/{DEATHS}"))
    print_table(["layout", "cancel p50 ms", "cancel max ms", "SIGTERM first", "path",
                 "SIGKILL->row failed p50 ms", "deaths seen"], rows)
    footer()
    return 0


if __name__ == "__main__":
    run(main)
