"""RQ's own lifecycle paths, followed by the daemon with real workers (RQ 2 and RQ 3):
dependents that can never run, jobs stranded in an intermediate list, Retry, and cancels
of scheduled jobs and of jobs waiting between retries."""

from __future__ import annotations

import json
import signal
import time
import uuid
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, Retry
from rq.job import Dependency, Job

from reconciler.devstack import (
    enqueue,
    insert_job,
    metric_value,
    request_cancel,
    row,
    rq_status,
    run_cli,
    transitions,
    wait_request,
    wait_status,
    wait_until,
)
from tests.faults.slow_worker import DELAY_ENV


def lines(marker: Path) -> list[str]:
    return [ln for ln in marker.read_text().splitlines() if ln]


def chain(redis_url: str, root: str, marker: Path, *, allow_failure_last: bool = False,
          ) -> list[str]:
    """B <- C <- D behind `root` (each runs touch_and_sleep(0, marker) if it ever runs)."""
    ids: list[str] = []
    parent = root
    with redis.Redis.from_url(redis_url) as conn:
        q = Queue("default", connection=conn)
        for i in range(3):
            jid = uuid.uuid4().hex
            dep: Any = parent
            if allow_failure_last and i == 2:
                dep = Dependency(jobs=[parent], allow_failure=True)
            q.enqueue("tests.jobs.touch_and_sleep", 0, str(marker), job_id=jid, depends_on=dep)
            ids.append(jid)
            parent = jid
    return ids


@pytest.mark.parametrize("root_end", ["cancelled", "failed"])
def test_chain_behind_an_ended_root_ends_at_once(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path,
        root_end: str) -> None:
    d = daemon()
    a = uuid.uuid4().hex
    a_row = insert_job(pg_dsn, a, status="queued", started_ago=None)
    if root_end == "cancelled":
        enqueue(redis_url, "tests.jobs.sleep", 60, job_id=a)
    else:
        enqueue(redis_url, "tests.jobs.fail", "root broke", job_id=a)
    b, c, dd = chain(redis_url, a, tmp_marker)
    # Rows for B and D; C has none: the chain runs through it all the same.
    b_row = insert_job(pg_dsn, b, status="queued", started_ago=None)
    d_row = insert_job(pg_dsn, dd, status="queued", started_ago=None)
    w = workers()
    if root_end == "cancelled":
        wait_status(pg_dsn, a_row, "running")
        req = request_cancel(pg_dsn, a_row, by="web:alice", reason="clicked Cancel")
        assert wait_request(pg_dsn, req)["outcome"] == "cancelled"
        rb = wait_status(pg_dsn, b_row, "cancelled", timeout=10)
        rd = wait_status(pg_dsn, d_row, "cancelled", timeout=10)
        assert rb["error_message"] == f"Cancelled: dependency {a} was cancelled (web:alice / clicked Cancel)"
        assert rd["error_message"] == (f"Cancelled: dependency {c} was cancelled "
                                       f"(web:alice / clicked Cancel) via {a}")
    else:
        rb = wait_status(pg_dsn, b_row, "failed", timeout=10)
        rd = wait_status(pg_dsn, d_row, "failed", timeout=10)
        assert rb["error_message"] == f"Orphaned: dependency {a} ended failed"
        assert rd["error_message"] == (f"Orphaned: dependency {c} ended canceled "
                                       f"(its dependency {a} ended failed)")
    a_end = row(pg_dsn, a_row)["completed_at"]
    for r in (rb, rd):
        assert r["completed_at"] is not None and a_end is not None
        # (measured in bench; here only that it did not wait for a sweep)
        assert r["completed_at"] - a_end < timedelta(seconds=30)
    # Every RQ job of the chain, the row-less one too, left the deferred registry canceled.
    wait_until(lambda: all(rq_status(redis_url, j) == "canceled" for j in (b, c, dd)),
               timeout=10, what="the chain canceled in RQ")
    with redis.Redis.from_url(redis_url) as conn:
        assert conn.zcard("rq:deferred:default") == 0
    # No dependent's code ever ran.
    time.sleep(0.5)
    assert lines(tmp_marker) == []
    assert w.is_alive()
    assert [t["reason"] for t in transitions(pg_dsn, d_row)] == [
        "cancelled" if root_end == "cancelled" else "orphaned"]
    d.stop()


def test_enqueue_mode_lets_the_dependents_of_a_cancelled_job_run(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path) -> None:
    daemon(cancel={"dependents": "enqueue", "grace_seconds": 2.0, "lease_seconds": 10.0})
    a = uuid.uuid4().hex
    a_row = insert_job(pg_dsn, a, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.sleep", 60, job_id=a)
    b, c, dd = chain(redis_url, a, tmp_marker)
    rows = [insert_job(pg_dsn, j, status="queued", started_ago=None) for j in (b, c, dd)]
    with redis.Redis.from_url(redis_url) as conn:
        job_b = Job.fetch(b, connection=conn)
        job_b.meta["owner"] = "alice"
        job_b.save_meta()
        raw = conn.hmget(f"rq:job:{b}", "meta", "data")
    workers()
    wait_status(pg_dsn, a_row, "running")
    req = request_cancel(pg_dsn, a_row)
    assert wait_request(pg_dsn, req)["outcome"] == "cancelled"
    with redis.Redis.from_url(redis_url) as conn:
        # enqueued by RQ's enqueue_dependents, its pickles carried through unread
        wait_until(lambda: rq_status(redis_url, b) != "deferred", timeout=10)
        after = conn.hmget(f"rq:job:{b}", "meta", "data")
        assert after[0] == raw[0]
        assert zlib.decompress(after[1]) == zlib.decompress(raw[1])
    for r in rows:
        assert wait_status(pg_dsn, r, "completed", timeout=20)["error_message"] == \
            "Synced: RQ finished"
    assert len(lines(tmp_marker)) == 3


def test_allow_failure_dependent_runs_and_its_row_follows(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path) -> None:
    daemon()
    a = uuid.uuid4().hex
    enqueue(redis_url, "tests.jobs.fail", "root broke", job_id=a)
    jid = uuid.uuid4().hex
    with redis.Redis.from_url(redis_url) as conn:
        Queue("default", connection=conn).enqueue(
            "tests.jobs.touch_and_sleep", 0, str(tmp_marker), job_id=jid,
            depends_on=Dependency(jobs=[a], allow_failure=True))
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    workers()
    r = wait_status(pg_dsn, r_id, "completed", timeout=20)
    assert r["error_message"] == "Synced: RQ finished"
    assert len(lines(tmp_marker)) == 1


def test_stranded_job_runs_once_elsewhere(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path) -> None:
    d = daemon()
    slow = workers.start(name=f"slow-{uuid.uuid4().hex[:6]}",
                         extra_env={DELAY_ENV: "120"},
                         worker_class="tests.faults.slow_worker.SlowStartWorker")
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.touch_and_sleep", 0, str(tmp_marker), job_id=jid)
    with redis.Redis.from_url(redis_url) as conn:
        wait_until(lambda: conn.lpos("rq:queue:default:intermediate", jid) is not None,
                   timeout=20, what="the slow worker took the job")
        # Alive and holding it: nobody touches it (it is that worker's to start).
        time.sleep(1.5)
        assert conn.lpos("rq:queue:default:intermediate", jid) is not None
        other = workers.start(name=f"other-{uuid.uuid4().hex[:6]}")
        slow.kill(signal.SIGKILL)
        r = wait_status(pg_dsn, r_id, "completed", timeout=20)
    assert r["error_message"] == "Synced: RQ finished"
    marks = lines(tmp_marker)
    assert len(marks) == 1, marks
    assert other.is_alive()
    events = transitions(pg_dsn, r_id)
    requeued = [e for e in events if e["reason"] == "requeued"]
    assert len(requeued) == 1
    assert requeued[0]["from_status"] == requeued[0]["to_status"] == "queued"
    detail = json.loads(requeued[0]["detail"])
    assert detail["cause"] == "stranded"
    assert detail["worker"] == slow.name
    assert detail["rq_id"] == jid
    assert "failed" not in [e["to_status"] for e in events]
    text = d.scrape()
    assert metric_value(text, "rq_reconciler_requeues_total", cause="stranded") == 1


def test_stranded_job_fails_at_once_under_never(
        redis_url: str, pg_dsn: str, workers: Any, daemon: Any, tmp_marker: Path) -> None:
    daemon(orphans={"requeue": "never"})
    slow = workers.start(name=f"slow-{uuid.uuid4().hex[:6]}", extra_env={DELAY_ENV: "120"},
                         worker_class="tests.faults.slow_worker.SlowStartWorker")
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.touch_and_sleep", 0, str(tmp_marker), job_id=jid)
    with redis.Redis.from_url(redis_url) as conn:
        wait_until(lambda: conn.lpos("rq:queue:default:intermediate", jid) is not None,
                   timeout=20, what="the slow worker took the job")
    slow.kill(signal.SIGKILL)
    r = wait_status(pg_dsn, r_id, "failed", timeout=10)
    assert r["error_message"] == f"Orphaned: worker {slow.name} is gone"
    assert lines(tmp_marker) == []


def test_retry_is_not_the_end(redis_url: str, pg_dsn: str, workers: Any, daemon: Any,
                              tmp_marker: Path) -> None:
    daemon()
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.fail_times", 2, str(tmp_marker), job_id=jid, retry=Retry(max=3))
    workers()
    seen: set[str] = set()

    def done() -> bool:
        seen.add(row(pg_dsn, r_id)["status"])
        return row(pg_dsn, r_id)["status"] == "completed"

    wait_until(done, timeout=30, interval=0.005, what="the retried job completed")
    assert "failed" not in seen
    assert len([ln for ln in lines(tmp_marker) if ln.startswith("ATTEMPT")]) == 3
    assert "failed" not in [e["to_status"] for e in transitions(pg_dsn, r_id)]


def test_retry_gives_up_with_the_last_error(redis_url: str, pg_dsn: str, workers: Any,
                                            daemon: Any, tmp_marker: Path) -> None:
    daemon()
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.fail_times", 5, str(tmp_marker), job_id=jid, retry=Retry(max=1))
    workers()
    r = wait_status(pg_dsn, r_id, "failed", timeout=30)
    assert r["error_message"] == "Synced: RQ failed: RuntimeError: attempt 2 fails"


def test_cancel_of_a_scheduled_job(redis_url: str, pg_dsn: str, workers: Any, daemon: Any,
                                   tmp_marker: Path) -> None:
    daemon()
    workers()
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    with redis.Redis.from_url(redis_url) as conn:
        Queue("default", connection=conn).enqueue_in(
            timedelta(seconds=2), "tests.jobs.touch_and_sleep", 0, str(tmp_marker), job_id=jid)
    assert rq_status(redis_url, jid) == "scheduled"
    req = request_cancel(pg_dsn, r_id)
    assert wait_request(pg_dsn, req)["outcome"] == "cancelled"
    assert row(pg_dsn, r_id)["status"] == "cancelled"
    assert rq_status(redis_url, jid) == "canceled"
    time.sleep(3.5)  # past its time: the scheduler must not run it
    assert lines(tmp_marker) == []
    assert rq_status(redis_url, jid) == "canceled"


def test_cancel_between_retries(redis_url: str, pg_dsn: str, workers: Any, daemon: Any,
                                tmp_marker: Path) -> None:
    daemon()
    jid = uuid.uuid4().hex
    r_id = insert_job(pg_dsn, jid, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.fail_times", 5, str(tmp_marker), job_id=jid,
            retry=Retry(max=3, interval=2))
    workers()
    wait_until(lambda: rq_status(redis_url, jid) == "scheduled", timeout=20,
               what="the job waits between retries")
    assert len(lines(tmp_marker)) == 1
    assert row(pg_dsn, r_id)["status"] in ("queued", "running")
    req = request_cancel(pg_dsn, r_id)
    assert wait_request(pg_dsn, req)["outcome"] == "cancelled"
    assert row(pg_dsn, r_id)["status"] == "cancelled"
    time.sleep(3.5)  # past the retry interval
    assert len(lines(tmp_marker)) == 1
    assert rq_status(redis_url, jid) == "canceled"


def test_queues_no_worker_serves_are_listed_not_failed(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: Any, daemon: Any) -> None:
    workers()  # serves "default" only
    lonely = f"lonely-{uuid.uuid4().hex[:6]}"
    ids = []
    for _ in range(2):
        jid = uuid.uuid4().hex
        enqueue(redis_url, "tests.jobs.succeed", queue=lonely, job_id=jid)
        ids.append(insert_job(pg_dsn, jid, status="queued", started_ago=None))
    served = uuid.uuid4().hex
    enqueue(redis_url, "tests.jobs.sleep", 30, job_id=served)
    wait_until(lambda: rq_status(redis_url, served) == "started", timeout=20)
    d = daemon()  # events only: the start-up sweep counts the queues
    wait_until(lambda: metric_value(d.scrape(), "rq_reconciler_sweeps_total", result="ok") >= 1,
               timeout=20, what="the start-up sweep")
    assert metric_value(d.scrape(), "rq_reconciler_queues_unserved") == 1
    p = run_cli(d.config, "check")
    line = [ln for ln in p.stdout.splitlines() if "unserved queues" in ln]
    assert line == [f"WARN unserved queues: no live worker listens to {lonely} (2 rows): those "
                    "rows wait (never failed for it) until a worker serves the queue"], p.stdout
    assert {row(pg_dsn, i)["status"] for i in ids} == {"queued"}
