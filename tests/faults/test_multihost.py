"""Several hosts on one machine: each "host" is a UTS + PID namespace of its own (root and
`unshare` needed; CI runs as root). Replica A runs on host-a; replica B runs on host-b
beside the workers. A cancel gets the graceful stop on the worker's own host whichever
replica claims it; without B it still ends, by stop-job; and a replica that shares the
workers' hostname but not their PID namespace never takes their jobs for orphans."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.devstack import (
    REPO_ROOT,
    Host,
    Pg,
    enqueue,
    migrate,
    rq_status,
    wait_until,
    write_config,
)
from reconciler.processes import BIRTH_SLACK_SECONDS
from tests.faults.common import log_events
from tests.support import wait_request

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a UTS + PID namespace per host")

JOB = "tests.jobs.trap_sigterm"
# RQ's command that stops a job: stop-execution for an RQ 3 worker, stop-job otherwise.
STOP_COMMANDS = {"stop-job", "stop-execution"}


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[Host]]:
    started: list[Host] = []
    yield started
    for h in started:
        h.stop()


def _config(tmp: Path, name: str, redis_url: str, pg_dsn: str, **extra: Any) -> Path:
    return write_config(tmp / f"{name}.toml", redis_url, pg_dsn, instance={"name": name},
                        cancel={"grace_seconds": 5.0, "lease_seconds": 20.0,
                                "handover_seconds": 2.0, **extra.pop("cancel", {})},
                        sweep={"min_age_seconds": 60.0, **extra.pop("sweep", {})}, **extra)


def _running_jobs(pg: Pg, redis_url: str, tmp: Path, n: int, job: str = JOB,
                  *extra: Any) -> list[tuple[int, str, Path]]:
    out = []
    for i in range(n):
        marker = tmp / f"job-{i}-{time.monotonic_ns()}.txt"
        marker.touch()
        rq_id = enqueue(redis_url, job, 120, str(marker), *extra)
        jid = int(pg.val("INSERT INTO training_jobs (rq_job_id, status, started_at) "
                         "VALUES ($1, 'running', now()) RETURNING id", rq_id))
        out.append((jid, rq_id, marker))
    wait_until(lambda: all("STARTED" in m.read_text() for _, _, m in out), 120,
               "every job to run in its horse")
    return out


def _cancel_all(pg: Pg, jobs: list[tuple[int, str, Path]]) -> list[int]:
    rows = pg.fetch("INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
                    "SELECT u, 'web:alice', 'clicked Cancel' FROM unnest($1::bigint[]) AS u "
                    "RETURNING id", [j for j, _, _ in jobs])
    return [int(r["id"]) for r in rows]


def test_cancels_across_hosts_all_start_with_sigterm(tmp_path: Path, redis_url: str,
                                                     pg_dsn: str, hosts: list[Host]) -> None:
    cfg_a = _config(tmp_path, "replica-a", redis_url, pg_dsn)
    cfg_b = _config(tmp_path, "replica-b", redis_url, pg_dsn)
    migrate(cfg_a)
    b = Host(tmp_path, "host-b", redis_url, workers=20, config=cfg_b)
    a = Host(tmp_path, "host-a", redis_url, config=cfg_a)
    hosts += [a, b]
    b.wait_ready()
    a.wait_ready()
    with Pg(pg_dsn) as pg:
        # B lists its workers in the registry: A can hand over to it.
        wait_until(lambda: pg.val("SELECT cardinality(workers) FROM rq_reconciler_replicas "
                                  "WHERE instance = 'replica-b'") == 20, 60, "B's registry row")
        jobs = _running_jobs(pg, redis_url, tmp_path, 20)
        # Round 1: both replicas hear every NOTIFY; whichever claims first.
        # Round 2: B is paused while the requests arrive, so A claims them all and must
        # hand each to B, which takes them once it runs again (within handover_seconds).
        first, second = jobs[:10], jobs[10:]
        rids = _cancel_all(pg, first)
        b_pid = b.daemon_pid()
        os.kill(b_pid, signal.SIGSTOP)
        try:
            rids += _cancel_all(pg, second)
            wait_until(lambda: pg.val(
                "SELECT count(*) FROM rq_reconciler_cancel_requests WHERE id = ANY($1::bigint[]) "
                "AND handed_to = 'replica-b'", rids[10:]) == 10, 20, "A to hand round 2 to B")
        finally:
            os.kill(b_pid, signal.SIGCONT)
        reqs = [wait_request(pg, rid, timeout=60) for rid in rids]
        assert [r["detail"]["path"] for r in reqs[10:]] == ["handed-over"] * 10
        for req, (jid, rq_id, marker) in zip(reqs, jobs, strict=True):
            assert req["outcome"] == "cancelled", req
            detail = req["detail"]
            assert detail["horse_signals"][0] == "SIGTERM", detail
            assert detail["instance"] == "replica-b", detail
            assert detail["path"] in ("local", "handed-over"), detail
            assert "SIGTERM" in marker.read_text(), f"job {jid}: its handler never ran"
            assert not STOP_COMMANDS & set(detail["horse_signals"]), detail
            assert rq_status(redis_url, rq_id) == "canceled"
            assert pg.val("SELECT status FROM training_jobs WHERE id = $1", jid) == "cancelled"
        events_a = log_events([a.daemon_log()])
        handed = [e for e in events_a if e.get("event") == "cancel_handed_over"]
        assert len(handed) >= 10  # each request A claimed went to B
        assert not [e for e in events_a if e.get("event") == "stop_job_sent"]
        assert not [c for c in STOP_COMMANDS if c in a.daemon_log().read_text()]


def test_without_the_hosts_replica_cancels_fall_back_to_stop_job(
        tmp_path: Path, redis_url: str, pg_dsn: str, hosts: list[Host]) -> None:
    cfg_a = _config(tmp_path, "replica-a", redis_url, pg_dsn)
    cfg_b = _config(tmp_path, "replica-b", redis_url, pg_dsn)
    migrate(cfg_a)
    b = Host(tmp_path, "host-b", redis_url, workers=3, config=cfg_b)
    a = Host(tmp_path, "host-a", redis_url, config=cfg_a)
    hosts += [a, b]
    b.wait_ready()
    a.wait_ready()
    with Pg(pg_dsn) as pg:
        wait_until(lambda: pg.val("SELECT cardinality(workers) FROM rq_reconciler_replicas "
                                  "WHERE instance = 'replica-b'") == 3, 60, "B's registry row")
        jobs = _running_jobs(pg, redis_url, tmp_path, 3)
        b.kill_daemon()  # B's heartbeat is fresh for a while yet: A will hand over to it
        time.sleep(0.5)
        t0 = time.monotonic()
        rids = _cancel_all(pg, jobs)
        reqs = [wait_request(pg, rid, timeout=60) for rid in rids]
        elapsed = time.monotonic() - t0
        for req, (jid, rq_id, _marker) in zip(reqs, jobs, strict=True):
            assert req["outcome"] == "cancelled", req
            detail = req["detail"]
            assert detail["instance"] == "replica-a" and detail["path"] == "stop-job", detail
            assert "replica-b" in detail["handover"], detail
            assert STOP_COMMANDS & set(detail["horse_signals"]), detail
            assert rq_status(redis_url, rq_id) in ("canceled", "stopped")
            assert pg.val("SELECT status FROM training_jobs WHERE id = $1", jid) == "cancelled"
        assert elapsed >= 2.0  # not before the hand-over had its chance


def test_a_replica_in_another_pid_namespace_never_fails_a_live_workers_job(
        tmp_path: Path, redis_url: str, pg_dsn: str, hosts: list[Host]) -> None:
    """Same hostname as the workers, another PID namespace (a container): the workers'
    pids mean nothing there. Their jobs must stay running, not fail as orphaned."""
    cfg_c = _config(tmp_path, "replica-c", redis_url, pg_dsn, sweep={"min_age_seconds": 0.0})
    migrate(cfg_c)
    workers_host = Host(tmp_path, "host-b", redis_url, workers=3)
    hosts.append(workers_host)
    workers_host.wait_ready()
    with Pg(pg_dsn) as pg:
        jobs = _running_jobs(pg, redis_url, tmp_path, 3)
        c = Host(tmp_path, "host-b", redis_url, config=cfg_c)  # the same hostname
        hosts.append(c)
        c.wait_ready()  # READY=1 comes after its first sweep
        time.sleep(3.0)  # worker heartbeats and keyspace events come and go meanwhile
        statuses = {r["status"] for r in pg.fetch(
            "SELECT status FROM training_jobs WHERE id = ANY($1::bigint[])",
            [j for j, _, _ in jobs])}
        assert statuses == {"running"}
        assert pg.val("SELECT count(*) FROM rq_reconciler_events") == 0
        assert all("SIGTERM" not in m.read_text() for _, _, m in jobs)
        text = c.daemon_log().read_text()
        assert "local_worker_exited" not in text and "Orphaned:" not in text


def test_a_burst_beyond_the_owners_slots_waits_for_it_and_gets_sigterm(
        tmp_path: Path, redis_url: str, pg_dsn: str, hosts: list[Host], rq_version: str) -> None:
    """B, on the workers' host, carries out two cancels at once; each job takes 3 s to
    clean up after its SIGTERM. A burst of six, all claimed by A and handed to B, waits at
    B (its claims kept, past handover_seconds and past one lease) rather than fall back to
    A's stop-job: B is alive. Every job gets SIGTERM first."""
    quick = {"lease_seconds": 6.0, "grace_seconds": 8.0}
    cfg_a = _config(tmp_path, "replica-a", redis_url, pg_dsn, cancel=quick)
    cfg_b = _config(tmp_path, "replica-b", redis_url, pg_dsn, cancel={**quick, "concurrency": 2})
    migrate(cfg_a)
    b = Host(tmp_path, "host-b", redis_url, workers=6, config=cfg_b, rq_version=rq_version)
    a = Host(tmp_path, "host-a", redis_url, config=cfg_a)
    hosts += [a, b]
    b.wait_ready()
    a.wait_ready()
    with Pg(pg_dsn) as pg:
        wait_until(lambda: pg.val("SELECT cardinality(workers) FROM rq_reconciler_replicas "
                                  "WHERE instance = 'replica-b'") == 6, 60, "B's registry row")
        jobs = _running_jobs(pg, redis_url, tmp_path, 6, "tests.jobs.linger_on_sigterm", 3.0)
        b_pid = b.daemon_pid()
        os.kill(b_pid, signal.SIGSTOP)  # A claims the whole burst and hands it to B
        try:
            rids = _cancel_all(pg, jobs)
            wait_until(lambda: pg.val(
                "SELECT count(*) FROM rq_reconciler_cancel_requests WHERE id = ANY($1::bigint[]) "
                "AND handed_to = 'replica-b'", rids) == 6, 20, "A to hand the burst to B")
        finally:
            os.kill(b_pid, signal.SIGCONT)
        reqs = [wait_request(pg, rid, timeout=90) for rid in rids]
        for req, (jid, rq_id, marker) in zip(reqs, jobs, strict=True):
            detail = req["detail"]
            assert req["outcome"] == "cancelled", req
            assert detail["instance"] == "replica-b" and detail["path"] == "handed-over", detail
            assert detail["horse_signals"][0] == "SIGTERM", detail
            assert "SIGTERM" in marker.read_text(), f"job {jid}: its handler never ran"
            assert pg.val("SELECT status FROM training_jobs WHERE id = $1", jid) == "cancelled"
            assert rq_status(redis_url, rq_id) == "canceled"
        events_b = log_events([b.daemon_log()])
        assert [e for e in events_b if e.get("event") == "cancel_handovers_queued"]
        events_a = log_events([a.daemon_log()])
        assert not [e for e in events_a if e.get("event") == "cancel_handover_expired"]
        assert not [c for c in STOP_COMMANDS if c in a.daemon_log().read_text()]


def test_two_hosts_named_alike_get_names_of_their_own_and_hand_over(
        tmp_path: Path, redis_url: str, pg_dsn: str, hosts: list[Host], rq_version: str) -> None:
    """Two hosts both named `node`, replicas with the default instance.name: two registry
    rows, and a cancel claimed on the one without workers is handed to the other (SIGTERM
    first), not sent as stop-job. A third replica told to use a name a live replica holds
    refuses to start: exit 2, one line saying why."""
    common = {"cancel": {"grace_seconds": 5.0, "lease_seconds": 20.0, "handover_seconds": 2.0},
              "sweep": {"min_age_seconds": 60.0}}
    cfg_a = write_config(tmp_path / "a.toml", redis_url, pg_dsn, **common)
    cfg_b = write_config(tmp_path / "b.toml", redis_url, pg_dsn, **common)
    migrate(cfg_a)
    b = Host(tmp_path, "node", redis_url, workers=3, config=cfg_b, rq_version=rq_version)
    b.wait_ready()
    # A's replica is pid 2 in its namespace, as B's first worker is in B's: started within
    # BIRTH_SLACK_SECONDS of that worker's birth it would pass for it (same hostname, a
    # live pid of the right age). Later, it is a recycled pid to A, as it should be.
    time.sleep(BIRTH_SLACK_SECONDS + 1.0)
    a = Host(tmp_path, "node", redis_url, config=cfg_a)
    hosts += [a, b]
    a.wait_ready()
    with Pg(pg_dsn) as pg:
        wait_until(lambda: pg.val("SELECT count(*) FROM rq_reconciler_replicas "
                                  "WHERE hostname = 'node'") == 2, 30, "two registry rows")
        rows = pg.fetch("SELECT instance, cardinality(workers) AS n FROM rq_reconciler_replicas")
        names = {r["instance"]: r["n"] for r in rows}
        assert all(n.startswith("node-") for n in names), names
        b_name = next(n for n, count in names.items() if count == 3)
        jobs = _running_jobs(pg, redis_url, tmp_path, 3)
        b_pid = b.daemon_pid()
        os.kill(b_pid, signal.SIGSTOP)  # A claims them all and must hand them to B
        try:
            rids = _cancel_all(pg, jobs)
            wait_until(lambda: pg.val(
                "SELECT count(*) FROM rq_reconciler_cancel_requests WHERE id = ANY($1::bigint[]) "
                "AND handed_to = $2", rids, b_name) == 3, 20, "A to hand the cancels to B")
        finally:
            os.kill(b_pid, signal.SIGCONT)
        for rid, (jid, _rq_id, marker) in zip(rids, jobs, strict=True):
            req = wait_request(pg, rid, timeout=60)
            assert req["outcome"] == "cancelled", req
            detail = req["detail"]
            assert detail["instance"] == b_name and detail["path"] == "handed-over", detail
            assert detail["horse_signals"][0] == "SIGTERM", detail
            assert "SIGTERM" in marker.read_text(), f"job {jid}: its handler never ran"

    cfg_c = write_config(tmp_path / "c.toml", redis_url, pg_dsn, instance={"name": b_name},
                         **common)
    p = subprocess.run([sys.executable, "-m", "reconciler", "run", "--config", str(cfg_c)],
                       capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert p.returncode == 2, (p.stdout, p.stderr)
    said = [ln for ln in (p.stdout + p.stderr).splitlines() if "instance_name_taken" in ln]
    assert len(said) == 1, (p.stdout, p.stderr)
    assert f"instance.name '{b_name}' is taken by a live replica on another host" in said[0]
    assert "hostname node" in said[0]


def test_a_lost_hosts_job_is_requeued_on_another_host(
        tmp_path: Path, redis_url: str, pg_dsn: str, hosts: list[Host]) -> None:
    """Host B, with its worker, horse and no replica of its own, is lost whole (its PID
    namespace killed). Once Redis expires the worker's hash (deleted here, as the TTL
    would), replica A's sweep judges the worker gone and, the job having a Retry left,
    queues it again: it runs on A's worker, once, its row never failed on the way."""
    from rq import Retry

    from reconciler.devstack import insert_job, transitions, wait_status

    cfg_a = _config(tmp_path, "replica-a", redis_url, pg_dsn,
                    sweep={"interval_seconds": 2.0, "fallback_interval_seconds": 2.0})
    migrate(cfg_a)
    b = Host(tmp_path, "host-b", redis_url, workers=1)
    hosts.append(b)
    [b_worker] = b.wait_ready()
    marker = tmp_path / "runs.txt"
    marker.touch()
    rq_id = f"lost-{time.monotonic_ns()}"
    jid = insert_job(pg_dsn, rq_id, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.mark_runs", 30, str(marker), job_id=rq_id,
            retry=Retry(max=1))
    wait_until(lambda: marker.read_text().count("RUN ") == 1, 60, "the job to run on host-b")
    a = Host(tmp_path, "host-a", redis_url, workers=1, config=cfg_a)
    hosts.append(a)
    a.wait_ready()
    wait_status(pg_dsn, jid, "running", timeout=30)
    b.proc.send_signal(signal.SIGKILL)  # unshare --kill-child: the whole namespace goes
    b.proc.wait(30)
    lost_at = time.time()
    import redis

    with redis.Redis.from_url(redis_url) as r:
        assert r.delete(f"rq:worker:{b_worker}") == 1
    wait_until(lambda: marker.read_text().count("RUN ") == 2, 60, "the second run, on host-a")
    # (The runs' own count of live earlier horses means nothing across PID namespaces.)
    second_at = float([ln for ln in marker.read_text().splitlines()
                       if ln.startswith("RUN ")][1].split()[2])
    assert second_at > lost_at  # after host-b, its horse included, was gone
    def requeued() -> list[dict[str, Any]]:
        return [e for e in transitions(pg_dsn, jid) if e["reason"] == "requeued"]

    wait_until(requeued, 30, "the requeue's audit row")  # Redis is requeued first
    wait_status(pg_dsn, jid, "running", timeout=30)  # again, on host-a
    assert len(requeued()) == 1
    assert "failed" not in [e["to_status"] for e in transitions(pg_dsn, jid)]
