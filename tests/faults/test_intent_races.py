"""A cancel is an intent that holds whatever the order: the app's user may click Cancel a
few milliseconds before the app's enqueue reaches Redis, or before the app has stored the
RQ id on its row. Every such request ends `cancelled`, the row too, and the job never
runs on (RQ ends canceled, or stopped with its horse gone)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from reconciler.devstack import (
    DaemonProc,
    Pg,
    Worker,
    enqueue,
    migrate,
    rq_status,
    wait_until,
    write_config,
)
from tests.support import request_cancel, wait_request

JOB = "tests.jobs.trap_sigterm"
RUN_SECONDS = 60


def _settled(redis_url: str, rq_id: str, workers: list[Worker]) -> bool:
    """RQ has ended the job as canceled or stopped (or failed by our SIGTERM, then made
    canceled) and no worker runs a horse for it any more."""
    if rq_status(redis_url, rq_id) not in ("canceled", "stopped"):
        return False
    return all(w.current_job_id() != rq_id for w in workers)


def _no_horse_left(marker: Path) -> bool:
    for line in marker.read_text().splitlines():
        if line.startswith("STARTED "):
            pid = int(line.split()[1])
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
    return True


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, pg_dsn: str, workers: Any) -> Any:
    # min_age keeps a row without an RQ id from being failed as an orphan while the app
    # is still between its INSERT and its enqueue.
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, sweep={"min_age_seconds": 60.0},
                       cancel={"grace_seconds": 2.0})
    migrate(cfg)
    pool = [workers(), workers()]
    d = DaemonProc(cfg, tmp_path / "d.log")
    d.start()
    with Pg(pg_dsn) as pg:
        yield pg, pool
    d.stop()
    d.close()


def _check(pg: Pg, redis_url: str, pool: list[Worker], rid: int, jid: int, rq_id: str,
           marker: Path, what: str) -> None:
    req = wait_request(pg, rid, timeout=30)
    assert req["outcome"] == "cancelled", (what, req)
    assert pg.val("SELECT status FROM training_jobs WHERE id = $1", jid) == "cancelled", what
    wait_until(lambda: _settled(redis_url, rq_id, pool), 15,
               lambda: f"{what}: RQ to end the job (is {rq_status(redis_url, rq_id)!r})")
    time.sleep(1.0)
    assert _no_horse_left(marker), f"{what}: a horse still runs"
    assert rq_status(redis_url, rq_id) in ("canceled", "stopped"), what


@pytest.mark.parametrize("gap_ms", [0, 1, 3, 5, 8, 12, 20, 50])
def test_cancel_first_then_enqueue(stack: Any, redis_url: str, tmp_path: Path, gap_ms: int) -> None:
    pg, pool = stack
    for attempt in range(3):
        marker = tmp_path / f"m-{gap_ms}-{attempt}.txt"
        marker.touch()
        rq_id = str(uuid.uuid4())
        jid = int(pg.val("INSERT INTO training_jobs (rq_job_id, status) VALUES ($1, 'queued') "
                         "RETURNING id", rq_id))
        rid = request_cancel(pg, jid, by="web:alice", reason="clicked Cancel")
        time.sleep(gap_ms / 1000)
        enqueue(redis_url, JOB, RUN_SECONDS, str(marker), job_id=rq_id)
        _check(pg, redis_url, pool, rid, jid, rq_id, marker, f"gap {gap_ms} ms #{attempt}")


@pytest.mark.parametrize("gap_ms", [0, 5, 20, 100])
def test_cancel_before_the_app_stores_the_rq_id(stack: Any, redis_url: str, tmp_path: Path,
                                                gap_ms: int) -> None:
    """The app inserts its row, enqueues (a worker may start the job at once), and stores
    the RQ id on the row `gap_ms` later; its user's Cancel came in between."""
    pg, pool = stack
    for attempt in range(3):
        marker = tmp_path / f"m-{gap_ms}-{attempt}.txt"
        marker.touch()
        jid = int(pg.val("INSERT INTO training_jobs (status) VALUES ('queued') RETURNING id"))
        rq_id = enqueue(redis_url, JOB, RUN_SECONDS, str(marker))
        rid = request_cancel(pg, jid, by="web:alice", reason="clicked Cancel")
        time.sleep(gap_ms / 1000)
        pg.execute("UPDATE training_jobs SET rq_job_id = $1 WHERE id = $2", rq_id, jid)
        _check(pg, redis_url, pool, rid, jid, rq_id, marker, f"gap {gap_ms} ms #{attempt}")


def test_a_child_that_ignores_sigterm_does_not_outlive_the_cancel(stack: Any, redis_url: str,
                                                                   tmp_path: Path) -> None:
    pg, _pool = stack
    marker = tmp_path / "stubborn.txt"
    marker.touch()
    rq_id = enqueue(redis_url, "tests.jobs.stubborn_child", RUN_SECONDS, str(marker))
    jid = int(pg.val("INSERT INTO training_jobs (rq_job_id, status) VALUES ($1, 'running') "
                     "RETURNING id", rq_id))
    wait_until(lambda: "STARTED" in marker.read_text(), 20, "the job to start")
    child = int(next(ln.split()[1] for ln in marker.read_text().splitlines()
                     if ln.startswith("CHILD")))
    rid = request_cancel(pg, jid)
    req = wait_request(pg, rid, timeout=30)
    assert req["outcome"] == "cancelled", req
    assert req["detail"]["horse_signals"][0] == "SIGTERM"
    assert "SIGKILL:leftovers" in req["detail"]["horse_signals"]
    assert "SIGTERM" in marker.read_text()  # the job's own handler ran first
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
