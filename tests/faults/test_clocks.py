"""A worker is gone only on facts that cannot lie across hosts (liveness.py): a worker
host's clock ten minutes behind, our own clock stepped ten minutes and back, and a live
worker nobody listens for on its command channel all leave its jobs alone. Each job
completes with its row `completed`, and no signal is ever sent to its horse."""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from reconciler.devstack import (
    DaemonProc,
    WorkerPool,
    enqueue,
    insert_job,
    metric_value,
    migrate,
    request_cancel,
    row,
    transitions,
    wait_request,
    wait_status,
    wait_until,
    write_config,
)
from reconciler.rq_state import PUBSUB_SETTLE_SECONDS

LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"),
                   Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"))
# CI installs it (scripts/install-ci-tools.sh): there a missing library fails, never skips.
NO_FAKETIME = not LIBFAKETIME.exists() and not os.environ.get("CI")
BEHIND_WORKER = "tests.faults.clock_workers.BehindWorker"
DEAF_WORKER = "tests.faults.clock_workers.DeafWorker"
# Busy workers heartbeat every second (RQ's default is every 30 s): a job of a few seconds
# spans several heartbeats, each of which wakes its job on the event path.
FAST_HEARTBEATS = ("--job-monitoring-interval", "1")
# ... and a sweep every second judges every running job's worker too.
SWEEPS = {"interval_seconds": 1.0, "fallback_interval_seconds": 1.0, "min_age_seconds": 0.0}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[DaemonProc]]:
    made: list[DaemonProc] = []
    yield made
    for d in made:
        d.close()


def _config(tmp_path: Path, redis_url: str, pg_dsn: str) -> Path:
    cfg = write_config(tmp_path / "config.toml", redis_url, pg_dsn, sweep=SWEEPS,
                       cancel={"grace_seconds": 10.0})
    migrate(cfg)
    return cfg


def _run_job(redis_url: str, pg_dsn: str, func: str, *args: Any) -> int:
    rq_id = uuid.uuid4().hex
    jid = insert_job(pg_dsn, rq_id, status="queued", started_ago=None)
    enqueue(redis_url, func, *args, job_id=rq_id)
    return jid


def _log_events(d: DaemonProc) -> list[dict[str, Any]]:
    out = []
    for line in d.log_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _ahead(event: dict[str, Any]) -> bool:
    """Was this log line written by a clock about ten minutes ahead of ours?"""
    if "timestamp" not in event:
        return False
    stamp = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
    return (stamp - datetime.now(UTC)).total_seconds() > 500


def _sweeps(d: DaemonProc) -> int:
    return sum(1 for e in _log_events(d) if e.get("event") == "sweep_done")


def _assert_untouched(d: DaemonProc, pg_dsn: str, jids: list[int]) -> None:
    """Each job ran to its end, its row went running -> completed only, and the daemon
    never stopped, signalled or orphaned anything."""
    for jid in jids:
        r = row(pg_dsn, jid)
        assert (r["status"], r["error_message"]) == ("completed", "Synced: RQ finished"), r
        assert [t["to_status"] for t in transitions(pg_dsn, jid)] == ["running", "completed"]
    events = {e.get("event") for e in _log_events(d)}
    assert not events & {"horse_stopped", "horse_survived", "horse_leftovers_killed",
                         "orphan_horse_unknown", "stop_job_sent", "worker_gone_held",
                         "worker_breaker_open"}, events
    assert "Orphaned" not in d.log_text()
    with urllib.request.urlopen(d.metrics_url(), timeout=5) as resp:
        assert metric_value(resp.read().decode(), "rq_reconciler_process_signals_total") == 0


def test_a_worker_ten_minutes_behind_keeps_its_jobs(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: WorkerPool,
        daemons: list[DaemonProc]) -> None:
    cfg = _config(tmp_path, redis_url, pg_dsn)
    d = DaemonProc(cfg, tmp_path / "d.log").start()
    daemons.append(d)
    w = workers.start(worker_class=BEHIND_WORKER, extra_args=FAST_HEARTBEATS)
    jids = [_run_job(redis_url, pg_dsn, "tests.jobs.sleep", 2.0) for _ in range(3)]
    for jid in jids:
        wait_status(pg_dsn, jid, "completed", timeout=30)
    with redis.Redis.from_url(redis_url) as r:
        hb = r.hget(f"rq:worker:{w.name}", "last_heartbeat")
    assert hb is not None
    behind = (datetime.now(UTC) - datetime.fromisoformat(hb.decode())).total_seconds()
    assert 590 < behind < 620  # the worker's clock really is ten minutes behind
    assert _sweeps(d) >= 2
    _assert_untouched(d, pg_dsn, jids)


@pytest.mark.skipif(NO_FAKETIME, reason="needs libfaketime (apt-get install faketime)")
def test_the_daemons_clock_stepped_ten_minutes_and_back_changes_nothing(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: WorkerPool,
        daemons: list[DaemonProc]) -> None:
    """libfaketime moves the daemon's wall clock only (DONT_FAKE_MONOTONIC), by the offset
    in a file it reads again every second: an NTP step, or a resumed VM."""
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    cfg = _config(tmp_path, redis_url, pg_dsn)
    d = DaemonProc(cfg, tmp_path / "d.log", env={
        "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_CACHE_DURATION": "1", "DONT_FAKE_MONOTONIC": "1"}).start()
    daemons.append(d)
    workers.start(extra_args=FAST_HEARTBEATS)
    jid = _run_job(redis_url, pg_dsn, "tests.jobs.sleep", 8.0)
    wait_status(pg_dsn, jid, "running")
    for step, ahead in (("+600", True), ("+0", False)):
        offset.write_text(step + "\n")
        # libfaketime reads the file again within a second: wait until a sweep logs under
        # the new clock, then for two more sweeps under it.
        seen = len(_log_events(d))
        wait_until(lambda n=seen, a=ahead: any(
            e.get("event") == "sweep_done" and _ahead(e) is a for e in _log_events(d)[n:]),
            20, what=f"a sweep under the clock stepped {step} s")
        swept = _sweeps(d)
        wait_until(lambda n=swept: _sweeps(d) >= n + 2, 20, what="two sweeps after the step")
    wait_status(pg_dsn, jid, "completed", timeout=30)
    _assert_untouched(d, pg_dsn, [jid])


def test_a_live_worker_nobody_listens_for_keeps_its_job_and_a_cancel_stays_graceful(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: WorkerPool,
        daemons: list[DaemonProc], tmp_marker: Path) -> None:
    """RQ's pub/sub thread died (here: never started): PUBSUB NUMSUB says 0 for the
    whole life of a worker that heartbeats every second."""
    with redis.Redis.from_url(redis_url) as r:
        # A Redis up for less than this reads NUMSUB 0 as "cannot tell" anyway.
        wait_until(lambda: r.info("server")["uptime_in_seconds"] > PUBSUB_SETTLE_SECONDS,
                   PUBSUB_SETTLE_SECONDS + 5, what="a settled Redis")
        cfg = _config(tmp_path, redis_url, pg_dsn)
        d = DaemonProc(cfg, tmp_path / "d.log").start()
        daemons.append(d)
        w = workers.start(worker_class=DEAF_WORKER, extra_args=FAST_HEARTBEATS)
        jid = _run_job(redis_url, pg_dsn, "tests.jobs.sleep", 5.0)
        wait_status(pg_dsn, jid, "running")
        assert r.pubsub_numsub(f"rq:pubsub:{w.name}") == [(f"rq:pubsub:{w.name}".encode(), 0)]
        wait_status(pg_dsn, jid, "completed", timeout=30)
        assert _sweeps(d) >= 3
        _assert_untouched(d, pg_dsn, [jid])

        cancelled = _run_job(redis_url, pg_dsn, "tests.jobs.trap_sigterm", 120, str(tmp_marker))
        wait_status(pg_dsn, cancelled, "running")
        w.wait_horse()
        req = wait_request(pg_dsn, request_cancel(pg_dsn, cancelled))
        assert req["outcome"] == "cancelled", req
        assert req["detail"]["horse_signals"] == ["SIGTERM"]
        assert "SIGTERM" in tmp_marker.read_text()
        assert row(pg_dsn, cancelled)["status"] == "cancelled"
