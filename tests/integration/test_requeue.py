"""Orphans queued again ([orphans] requeue), with real workers of RQ 2 and RQ 3: a dead
worker's work goes on, one copy at a time, once per run, never past the policy, and a
cancel always wins.

Every job here records each run's start in a marker file (tests.jobs._mark_run) with the
number of earlier runs' horses still running at that moment: it must be 0 every time."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from rq import Queue, Retry
from rq.registry import StartedJobRegistry

from reconciler.devstack import (
    enqueue,
    insert_job,
    metric_value,
    request_cancel,
    row,
    rq_status,
    transitions,
    wait_request,
    wait_status,
    wait_until,
)


def runs(marker: Path) -> list[tuple[int, float, int]]:
    """(pid, start time, earlier horses still running) of each run."""
    out = []
    for ln in marker.read_text().splitlines():
        if ln.startswith("RUN "):
            _, pid, at, alive = ln.split()
            out.append((int(pid), float(at), int(alive)))
    return out


def done_lines(marker: Path) -> list[str]:
    return [ln for ln in marker.read_text().splitlines() if ln.startswith("DONE ")]


def requeued(pg_dsn: str, r_id: int) -> list[dict[str, Any]]:
    return [{**e, "detail": json.loads(e["detail"])} for e in transitions(pg_dsn, r_id)
            if e["reason"] == "requeued"]


def one_copy_at_a_time(marker: Path) -> None:
    for pid, _, alive in runs(marker):
        assert alive == 0, f"run {pid} started while {alive} earlier horse(s) still ran"


def wait_runs(marker: Path, n: int, timeout: float = 20) -> list[tuple[int, float, int]]:
    wait_until(lambda: len(runs(marker)) >= n, timeout=timeout, interval=0.01,
               what=f"{n} run(s) of the job")
    return runs(marker)


def test_retry_job_of_a_killed_worker_runs_again_at_once(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path) -> None:
    d = daemon()
    first = workers()
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.mark_runs", 3, str(tmp_marker), job_id=jid,
            retry=Retry(max=1))
    wait_runs(tmp_marker, 1)
    wait_status(pg_dsn, r_id, "running")
    second = workers()
    time.sleep(0.3)  # the daemon has proven the horse
    killed_at = time.time()
    first.kill(signal.SIGKILL)
    got = wait_runs(tmp_marker, 2)
    print(f"second run started {got[1][1] - killed_at:.3f} s after the SIGKILL")
    assert got[1][1] - killed_at < 5.0
    r = wait_status(pg_dsn, r_id, "completed", timeout=20)
    assert r["error_message"] == "Synced: RQ finished"
    one_copy_at_a_time(tmp_marker)
    assert len(runs(tmp_marker)) == 2 and len(done_lines(tmp_marker)) == 1
    events = transitions(pg_dsn, r_id)
    assert "failed" not in [e["to_status"] for e in events]
    rq_events = requeued(pg_dsn, r_id)
    assert len(rq_events) == 1
    assert rq_events[0]["from_status"] == "running" and rq_events[0]["to_status"] == "queued"
    detail = rq_events[0]["detail"]
    assert detail["cause"] == "worker_died" and detail["count"] == 1
    assert detail["worker"] == first.name and detail["retry_spent"] is True
    assert detail["retries_left"] == 0
    assert metric_value(d.scrape(), "rq_reconciler_requeues_total", cause="worker_died") == 1
    with redis.Redis.from_url(redis_url) as conn:
        assert conn.hget(f"rq:job:{jid}", "retries_left") == b"0"
        # RQ's own maintenance, run afterwards as a worker would (and as if every entry
        # had expired), finds nothing of the run we requeued.
        StartedJobRegistry("default", connection=conn).cleanup(timestamp=time.time() + 10 ** 6)
        assert conn.hget(f"rq:job:{jid}", "status") == b"finished"
        assert conn.llen("rq:queue:default") == 0
    time.sleep(1.0)
    assert len(runs(tmp_marker)) == 2
    assert row(pg_dsn, r_id)["status"] == "completed"
    assert second.is_alive()


def test_always_stops_a_poison_pill_after_max_requeues(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path) -> None:
    d = daemon(orphans={"requeue": "always", "max_requeues": 1})
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.kill_own_worker", str(tmp_marker), job_id=jid)
    w1 = workers()
    wait_runs(tmp_marker, 1)
    w2 = workers()
    r = wait_status(pg_dsn, r_id, "failed", timeout=30)
    assert r["error_message"].startswith("Orphaned: worker ")
    assert r["error_message"].endswith(" is gone (requeued 1 times)")
    time.sleep(1.0)
    got = runs(tmp_marker)
    assert len(got) == 2, got
    one_copy_at_a_time(tmp_marker)
    assert not w1.is_alive() and not w2.is_alive()
    rq_events = requeued(pg_dsn, r_id)
    assert [e["detail"]["count"] for e in rq_events] == [1]
    assert rq_events[0]["detail"]["cause"] == "worker_died"
    assert rq_events[0]["detail"]["retry_spent"] is False
    assert metric_value(d.scrape(), "rq_reconciler_requeues_total", cause="worker_died") == 1


def test_a_drained_worker_killed_mid_job_is_a_disruption(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path) -> None:
    d = daemon()
    first = workers()
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    # No Retry: under "retries" a plain crash would fail it.
    enqueue(redis_url, "tests.jobs.mark_runs", 4, str(tmp_marker), job_id=jid)
    wait_runs(tmp_marker, 1)
    wait_status(pg_dsn, r_id, "running")
    time.sleep(0.3)
    first.kill(signal.SIGTERM)  # warm shutdown: RQ records shutdown_requested_date
    with redis.Redis.from_url(redis_url) as conn:
        wait_until(lambda: conn.hget(f"rq:worker:{first.name}", "shutdown_requested_date"),
                   timeout=10, what="the worker recorded its shutdown request")
    first.kill(signal.SIGKILL)  # ... and is killed before its job ends (a drain's deadline)
    second = workers()
    wait_runs(tmp_marker, 2)
    r = wait_status(pg_dsn, r_id, "completed", timeout=30)
    assert r["error_message"] == "Synced: RQ finished"
    one_copy_at_a_time(tmp_marker)
    assert len(runs(tmp_marker)) == 2
    rq_events = requeued(pg_dsn, r_id)
    assert len(rq_events) == 1
    assert rq_events[0]["detail"]["cause"] == "disruption"
    assert rq_events[0]["detail"]["retry_spent"] is False
    assert "failed" not in [e["to_status"] for e in transitions(pg_dsn, r_id)]
    assert metric_value(d.scrape(), "rq_reconciler_requeues_total", cause="disruption") == 1
    assert second.is_alive()


def test_a_horse_that_retries_its_own_failure_spends_one_retry_not_two(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path) -> None:
    """The orphan's horse traps the SIGTERM we send it and fails: RQ's own horse records
    that failure and retries the job itself (Retry left). The daemon, reading the job after
    the stop, finds the run moved on and requeues nothing: one retry spent, one more run,
    never two copies, and the row ends with RQ's final answer."""
    daemon()
    first = workers()
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.mark_runs_trap_sigterm", 30, str(tmp_marker), job_id=jid,
            retry=Retry(max=2))
    wait_runs(tmp_marker, 1)
    wait_status(pg_dsn, r_id, "running")
    workers()
    time.sleep(0.3)  # the daemon has proven the horse
    first.kill(signal.SIGKILL)
    wait_runs(tmp_marker, 2)
    assert "SIGTERM" in tmp_marker.read_text()  # the first run got (and trapped) SIGTERM
    with redis.Redis.from_url(redis_url) as conn:
        assert conn.hget(f"rq:job:{jid}", "retries_left") == b"1"  # one spent, by RQ
    assert requeued(pg_dsn, r_id) == []
    time.sleep(1.0)
    assert len(runs(tmp_marker)) == 2
    one_copy_at_a_time(tmp_marker)
    assert row(pg_dsn, r_id)["status"] == "running"
    assert "failed" not in [e["to_status"] for e in transitions(pg_dsn, r_id)]


def test_a_cancel_while_a_requeued_job_waits_wins(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path) -> None:
    daemon(orphans={"requeue": "always", "requeue_delay_seconds": 3.0})
    first = workers()
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.mark_runs", 30, str(tmp_marker), job_id=jid)
    wait_runs(tmp_marker, 1)
    wait_status(pg_dsn, r_id, "running")
    workers(extra_args=["--with-scheduler"])
    time.sleep(0.3)
    first.kill(signal.SIGKILL)
    wait_until(lambda: rq_status(redis_url, jid) == "scheduled", timeout=10,
               what="the orphan waits in the scheduled registry")
    # Redis is requeued first, the row follows in the same step: wait for it.
    wait_status(pg_dsn, r_id, "queued")
    assert row(pg_dsn, r_id)["started_at"] is not None  # kept while it waits
    req = request_cancel(pg_dsn, r_id)
    assert wait_request(pg_dsn, req)["outcome"] == "cancelled"
    assert row(pg_dsn, r_id)["status"] == "cancelled"
    time.sleep(4.5)  # past the delay: the scheduler must not run it
    assert len(runs(tmp_marker)) == 1
    assert rq_status(redis_url, jid) == "canceled"
    assert len(requeued(pg_dsn, r_id)) == 1


def test_two_replicas_requeue_once(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path) -> None:
    d0 = daemon()
    d1 = daemon()
    first = workers()
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.mark_runs", 2, str(tmp_marker), job_id=jid,
            retry=Retry(max=3))
    wait_runs(tmp_marker, 1)
    wait_status(pg_dsn, r_id, "running")
    workers()
    time.sleep(0.3)
    first.kill(signal.SIGKILL)
    wait_status(pg_dsn, r_id, "completed", timeout=30)
    time.sleep(1.0)
    one_copy_at_a_time(tmp_marker)
    assert len(runs(tmp_marker)) == 2
    rq_events = requeued(pg_dsn, r_id)
    assert len(rq_events) == 1, rq_events
    with redis.Redis.from_url(redis_url) as conn:
        # One retry spent, not two.
        assert conn.hget(f"rq:job:{jid}", "retries_left") == b"2"
        assert Queue("default", connection=conn).count == 0
    total = sum(metric_value(d.scrape(), "rq_reconciler_requeues_total", cause="worker_died")
                for d in (d0, d1))
    assert total == 1
