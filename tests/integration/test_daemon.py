"""`rq-reconciler run` as a real subprocess against real Redis, Postgres and rq workers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.command import send_stop_job_command

from reconciler.aio import TaskSet
from reconciler.cancel import CancelProcessor
from reconciler.config import load
from reconciler.devstack import (
    DaemonProc,
    WorkerPool,
    create_jobs_table,
    enqueue,
    insert_job,
    metric_value,
    migrate,
    pid_alive,
    request_cancel,
    row,
    rq_status,
    run_cli,
    transitions,
    wait_request,
    wait_status,
    wait_until,
    write_config,
)
from reconciler.jobs_table import Store
from reconciler.metrics import Metrics
from reconciler.model import RqStatus
from reconciler.processes import Processes
from reconciler.reconcile import Reconciler
from reconciler.rq_state import RqState
from reconciler.stop import Stopper
from reconciler.workers import Workers

EVENTS_ONLY = {"interval_seconds": 300.0, "fallback_interval_seconds": 300.0,
               "min_age_seconds": 0.0}


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[DaemonProc] = []

    def make(cfg: Path, name: str = "d", start: bool = True, **kw: Any) -> DaemonProc:
        d = DaemonProc(cfg, tmp_path / f"{name}-{len(made)}.log", name=name, **kw)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        d.close()


def setup(tmp_path: Path, redis_url: str, pg_dsn: str, **sections: dict[str, Any]) -> Path:
    sections.setdefault("sweep", EVENTS_ONLY)
    cfg = write_config(tmp_path / "config.toml", redis_url, pg_dsn, **sections)
    migrate(cfg)
    return cfg


def test_events_alone_sync_finished_failed_stopped(tmp_path: Path, redis_url: str, pg_dsn: str,
                                                   workers: Any, daemon_factory: Any) -> None:
    cfg = setup(tmp_path, redis_url, pg_dsn)
    d = daemon_factory(cfg)
    workers()
    # rows first, as an app would do, then the RQ jobs: only events can move them now
    ok, bad, long = (uuid.uuid4().hex for _ in range(3))
    ids = {k: insert_job(pg_dsn, v, status="queued", started_ago=None)
           for k, v in (("ok", ok), ("bad", bad), ("long", long))}
    enqueue(redis_url, "tests.jobs.sleep", 0.3, job_id=ok)
    enqueue(redis_url, "tests.jobs.fail", "no GPU left", job_id=bad)
    enqueue(redis_url, "tests.jobs.sleep", 60, job_id=long)
    wait_status(pg_dsn, ids["ok"], "completed")
    r = wait_status(pg_dsn, ids["bad"], "failed")
    assert r["error_message"] == "Synced: RQ failed: RuntimeError: no GPU left"
    wait_status(pg_dsn, ids["long"], "running")
    assert row(pg_dsn, ids["long"])["started_at"] is not None
    with redis.Redis.from_url(redis_url) as rc:
        send_stop_job_command(rc, long)
    r = wait_status(pg_dsn, ids["long"], "failed")
    assert r["error_message"] == "Synced: RQ job stopped"
    # the start-up sweep ran once; everything else was events
    text = d.scrape()
    assert metric_value(text, "rq_reconciler_sweeps_total") == 1
    assert metric_value(text, "rq_reconciler_events_total", source="keyspace") > 0
    assert metric_value(text, "rq_reconciler_transitions_total", reason="synced") == 3
    # RQ 2.x writes no ended_at for a stopped job, so only two lags can be measured
    assert metric_value(text, "rq_reconciler_sync_lag_seconds_count") == 2
    assert d.stop() == 0
    events = [e["event"] for e in d.log_events()]
    assert "ready" in events and "stopped" in events


def test_cancel_running_job_gets_sigterm_first_and_worker_is_ready(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: Any, daemon_factory: Any,
        tmp_marker: Path) -> None:
    cfg = setup(tmp_path, redis_url, pg_dsn, cancel={"grace_seconds": 10.0})
    daemon_factory(cfg)
    w = workers()
    rq_id = uuid.uuid4().hex  # the row first, then RQ (see the SIGKILL test below)
    jid = insert_job(pg_dsn, rq_id, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.trap_sigterm", 120, str(tmp_marker), job_id=rq_id)
    wait_status(pg_dsn, jid, "running")
    horse = w.wait_horse()
    t0 = time.monotonic()
    rid = request_cancel(pg_dsn, jid, by="web:alice", reason="clicked Cancel")
    req = wait_request(pg_dsn, rid)
    took = time.monotonic() - t0
    assert req["outcome"] == "cancelled", req
    detail = req["detail"]
    assert detail["success"] is True
    assert detail["message"] == f"Job {jid} cancelled successfully"
    assert detail["rq_cancelled"] is True
    assert detail["horse_signals"] == ["SIGTERM"]
    assert took < 5  # SIGTERM was enough: no grace period waited out
    assert "SIGTERM" in tmp_marker.read_text()
    assert not pid_alive(horse)
    r = row(pg_dsn, jid)
    assert r["status"] == "cancelled"
    assert r["error_message"] == "Cancelled: web:alice / clicked Cancel"
    assert r["completed_at"] is not None
    assert rq_status(redis_url, rq_id) == "canceled"
    assert [t["to_status"] for t in transitions(pg_dsn, jid)] == ["running", "cancelled"]
    # the worker takes the next job at once
    nxt = enqueue(redis_url, "tests.jobs.succeed", 2)
    wait_until(lambda: rq_status(redis_url, nxt) == "finished", 5, what="next job ran")


def test_cancel_escalates_to_stop_job_then_sigkill(tmp_path: Path, redis_url: str, pg_dsn: str,
                                                   workers: Any, daemon_factory: Any,
                                                   tmp_marker: Path, rq_version: str) -> None:
    cfg = setup(tmp_path, redis_url, pg_dsn, cancel={"grace_seconds": 1.0})
    d = daemon_factory(cfg)
    w = workers()
    rq_id = enqueue(redis_url, "tests.jobs.ignore_sigterm", 120, str(tmp_marker))
    jid = insert_job(pg_dsn, rq_id)
    wait_until(lambda: rq_status(redis_url, rq_id) == "started", 20, what="started")
    horse = w.wait_horse()
    req = wait_request(pg_dsn, request_cancel(pg_dsn, jid))
    assert req["outcome"] == "cancelled", req
    # SIGTERM was ignored; RQ's command (the worker's SIGKILL) finished it: an RQ 3 worker
    # is told which execution to stop
    command = "stop-execution" if rq_version == "3" else "stop-job"
    assert req["detail"]["horse_signals"][:2] == ["SIGTERM", command]
    assert "SIGTERM-IGNORED" in tmp_marker.read_text()
    assert not pid_alive(horse)
    assert row(pg_dsn, jid)["status"] == "cancelled"
    assert metric_value(d.scrape(), "rq_reconciler_process_signals_total", signal="SIGTERM") == 1


def test_cancel_queued_job_never_runs(tmp_path: Path, redis_url: str, pg_dsn: str,
                                      workers: Any, daemon_factory: Any, tmp_marker: Path) -> None:
    cfg = setup(tmp_path, redis_url, pg_dsn)
    daemon_factory(cfg)
    rq_id = enqueue(redis_url, "tests.jobs.touch_and_sleep", 1, str(tmp_marker))
    jid = insert_job(pg_dsn, rq_id, status="queued", started_ago=None)
    req = wait_request(pg_dsn, request_cancel(pg_dsn, jid))
    assert req["outcome"] == "cancelled"
    assert req["detail"]["rq_cancelled"] is True and req["detail"]["horse_signals"] == []
    assert rq_status(redis_url, rq_id) == "canceled"
    workers()  # a worker arrives later: the job must not run
    marker = enqueue(redis_url, "tests.jobs.succeed")
    wait_until(lambda: rq_status(redis_url, marker) == "finished", 20, what="worker alive")
    assert "STARTED" not in tmp_marker.read_text()
    assert row(pg_dsn, jid)["status"] == "cancelled"


def test_cancel_completed_row_and_duplicates(tmp_path: Path, redis_url: str, pg_dsn: str,
                                             daemon_factory: Any) -> None:
    cfg = setup(tmp_path, redis_url, pg_dsn)
    daemon_factory(cfg)
    jid = insert_job(pg_dsn, "whatever", status="completed")
    req = wait_request(pg_dsn, request_cancel(pg_dsn, jid))
    assert req["outcome"] == "already_finished"
    assert req["detail"]["success"] is False and req["detail"]["status"] == "completed"
    assert row(pg_dsn, jid)["status"] == "completed"
    # many requests for one job: one cancellation, the same outcome
    q_id = enqueue(redis_url, "tests.jobs.succeed", queue="nobody-listens")
    jid2 = insert_job(pg_dsn, q_id, status="queued", started_ago=None)
    rids = [request_cancel(pg_dsn, jid2, by=f"user{i}") for i in range(5)]
    outs = [wait_request(pg_dsn, r) for r in rids]
    assert {o["outcome"] for o in outs} == {"cancelled"}
    assert [t["to_status"] for t in transitions(pg_dsn, jid2)] == ["cancelled"]
    late = wait_request(pg_dsn, request_cancel(pg_dsn, jid2))
    assert late["outcome"] == "cancelled" and late["detail"]["success"] is True


def test_cancel_cli_waits_and_fk_refuses_unknown_job(tmp_path: Path, redis_url: str, pg_dsn: str,
                                                     workers: Any, daemon_factory: Any) -> None:
    cfg = setup(tmp_path, redis_url, pg_dsn)
    d = daemon_factory(cfg)
    workers()
    rq_id = enqueue(redis_url, "tests.jobs.sleep", 60)
    jid = insert_job(pg_dsn, rq_id)
    wait_until(lambda: rq_status(redis_url, rq_id) == "started", 20, what="started")
    p = run_cli(cfg, "cancel", str(jid), "--reason", "from the CLI", "--wait", "20")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f'"message": "Job {jid} cancelled successfully"' in p.stdout
    p = run_cli(cfg, "cancel", "424242", "--wait", "5")
    assert p.returncode == 1 and "no job with id = '424242'" in p.stderr
    assert d.proc is not None and d.proc.poll() is None  # the daemon is unaffected
    p = run_cli(cfg, "cancel", "not-a-number")
    assert p.returncode == 1 and "not a valid bigint id" in p.stderr


def test_cancel_while_daemon_down_then_sigkill_mid_cancel(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: Any, daemon_factory: Any,
        tmp_marker: Path) -> None:
    # The grace outlasts the moment between the SIGTERM and the SIGKILL of the daemon (a
    # few ms), and is waited out again by the second daemon: long enough, no longer.
    cfg = setup(tmp_path, redis_url, pg_dsn, cancel={"grace_seconds": 8.0, "lease_seconds": 5.0})
    workers()
    # 1. inserted while no daemon runs: done once it starts
    q_id = enqueue(redis_url, "tests.jobs.succeed", queue="nobody-listens")
    jid = insert_job(pg_dsn, q_id, status="queued", started_ago=None)
    rid = request_cancel(pg_dsn, jid)
    d = daemon_factory(cfg)
    assert wait_request(pg_dsn, rid)["outcome"] == "cancelled"
    # 2. SIGKILL the daemon while it waits out the grace period of a SIGTERM-ignoring job
    rq_id = enqueue(redis_url, "tests.jobs.ignore_sigterm", 120, str(tmp_marker))
    jid2 = insert_job(pg_dsn, rq_id)
    wait_until(lambda: rq_status(redis_url, rq_id) == "started", 20, what="started")
    rid2 = request_cancel(pg_dsn, jid2)
    wait_until(lambda: "SIGTERM-IGNORED" in tmp_marker.read_text(), 10, what="SIGTERM sent")
    d.kill()
    d2 = daemon_factory(cfg, name="again")
    req = wait_request(pg_dsn, rid2, timeout=60)
    assert req["outcome"] == "cancelled", req
    assert [t["to_status"] for t in transitions(pg_dsn, jid2)] == ["cancelled"]
    assert d2.stop() == 0


def test_local_worker_sigkilled_mid_job_is_orphaned_and_horse_stopped(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: Any, daemon_factory: Any,
        tmp_marker: Path) -> None:
    cfg = setup(tmp_path, redis_url, pg_dsn, cancel={"grace_seconds": 1.0})
    d = daemon_factory(cfg)
    w = workers()
    # The app's order: the row first, then RQ. (Enqueued first, the job can start, and its
    # keyspace events pass, before the row exists: then nothing says "running" until the
    # job ends or a sweep runs.)
    rq_id = uuid.uuid4().hex
    jid = insert_job(pg_dsn, rq_id, status="queued", started_ago=None)
    enqueue(redis_url, "tests.jobs.touch_and_sleep", 120, str(tmp_marker), job_id=rq_id)
    wait_status(pg_dsn, jid, "running")
    horse = w.wait_horse()
    t0 = time.monotonic()
    w.kill(signal.SIGKILL)
    r = wait_status(pg_dsn, jid, "failed", timeout=10)
    took = time.monotonic() - t0
    assert r["error_message"].startswith(f"Orphaned: worker {w.name} is gone")
    assert took < 5
    wait_until(lambda: not pid_alive(horse), 10, what="orphaned horse stopped")
    text = d.scrape()
    assert metric_value(text, "rq_reconciler_events_total", source="local_worker") >= 1
    assert metric_value(text, "rq_reconciler_transitions_total", reason="orphaned") == 1


def test_redis_restart_events_resume(tmp_path: Path, own_redis: Any, pg_dsn: str,
                                     daemon_factory: Any) -> None:
    cfg = setup(tmp_path, own_redis.url, pg_dsn)
    d = daemon_factory(cfg)
    pool = WorkerPool(own_redis.url, log_dir=tmp_path)
    try:
        pool.start()
        a = enqueue(own_redis.url, "tests.jobs.sleep", 0.2)
        ja = insert_job(pg_dsn, a, status="queued", started_ago=None)
        wait_status(pg_dsn, ja, "completed")
        pool.stop_all()
        own_redis.restart()  # runtime CONFIG (notify-keyspace-events) is gone
        with own_redis.client() as rc:
            wait_until(lambda: "K" in rc.config_get("notify-keyspace-events")
                       ["notify-keyspace-events"], 20, what="keyspace flags restored")
        pool.start()
        b = enqueue(own_redis.url, "tests.jobs.sleep", 0.2)
        jb = insert_job(pg_dsn, b, status="queued", started_ago=None)
        wait_status(pg_dsn, jb, "completed", timeout=20)
        text = d.scrape()
        assert metric_value(text, "rq_reconciler_backend_up", backend="redis") == 1
    finally:
        pool.stop_all()


def test_postgres_restart_listen_resumes(tmp_path: Path, redis_url: str, own_pg: Any,
                                         daemon_factory: Any) -> None:
    dsn = own_pg.create_database("app")
    create_jobs_table(dsn)
    cfg = setup(tmp_path, redis_url, dsn)
    d = daemon_factory(cfg)
    own_pg.restart()
    q_id = enqueue(redis_url, "tests.jobs.succeed", queue="nobody-listens")
    jid = insert_job(dsn, q_id, status="queued", started_ago=None)
    rid = request_cancel(dsn, jid)
    assert wait_request(dsn, rid, timeout=60)["outcome"] == "cancelled"
    wait_until(lambda: metric_value(d.scrape(), "rq_reconciler_backend_up", backend="postgres") == 1,
               20, what="postgres up again")
    assert any(e["event"] == "listen_lost" for e in d.log_events())


def test_metrics_pass_promtool_and_healthz(tmp_path: Path, redis_url: str, pg_dsn: str,
                                           daemon_factory: Any) -> None:
    import os
    import urllib.request

    cfg = setup(tmp_path, redis_url, pg_dsn)
    d = daemon_factory(cfg)
    jid = insert_job(pg_dsn, None)
    wait_request(pg_dsn, request_cancel(pg_dsn, jid))
    text = d.scrape()
    for name in ("cancel_requests_total", "cancel_duration_seconds_bucket", "transitions_total",
                 "sweeps_total", "sweep_duration_seconds_bucket",
                 "last_sweep_success_timestamp_seconds", "jobs_active", "jobs_stuck",
                 "oldest_active_job_age_seconds", "events_total", "sync_lag_seconds_bucket",
                 "process_signals_total", "backend_up", "orphan_breaker_open", "build_info"):
        assert f"rq_reconciler_{name}" in text, name
    health = d.metrics_url().replace("/metrics", "/healthz")
    with urllib.request.urlopen(health, timeout=5) as r:
        assert r.status == 200
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool missing in CI (scripts/install-ci-tools.sh installs it)")
        pytest.skip("promtool not installed")
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr


def test_systemd_protocol_and_sighup_reload(tmp_path: Path, redis_url: str, pg_dsn: str,
                                            daemon_factory: Any) -> None:
    cfg = setup(tmp_path, redis_url, pg_dsn)
    d = daemon_factory(cfg)
    d.wait_message("WATCHDOG=1", timeout=5)  # WATCHDOG_USEC=2 s -> a ping every second
    assert d.proc is not None
    text = cfg.read_text().replace('level = "info"', 'level = "debug"')
    text = text.replace("interval_seconds = 300.0", "interval_seconds = 1.0")
    cfg.write_text(text)
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any(e["event"] == "reloaded" for e in d.log_events()), 10, what="reload")
    reloaded = next(e for e in d.log_events() if e["event"] == "reloaded")
    assert reloaded["log_level"] == "debug" and reloaded["sweep_interval"] == 1.0
    # the new interval is in force: sweeps now come every second
    wait_until(lambda: metric_value(d.scrape(), "rq_reconciler_sweeps_total", result="ok") >= 4,
               10, what="sweeps at the reloaded interval")
    assert d.stop() == 0
    d.wait_message("STOPPING=1", timeout=5)


def test_daemon_without_its_tables_exits_2_once(tmp_path: Path, redis_url: str,
                                                pg_dsn: str) -> None:
    cfg = write_config(tmp_path / "config.toml", redis_url, pg_dsn)  # no migrate
    p = run_cli(cfg, "run", timeout=60)
    assert p.returncode == 2
    assert "rq-reconciler migrate" in p.stdout
    assert "Traceback" not in p.stdout + p.stderr


@dataclass
class CancelParts:
    """The cancel flow and the event path's stops, in this process, on the test's servers."""

    store: Store
    rq: RqState
    procs: Processes
    rec: Reconciler
    stopper: Stopper
    cancels: CancelProcessor


@contextlib.asynccontextmanager
async def cancel_parts(cfg_path: Path) -> AsyncIterator[CancelParts]:
    cfg = load(str(cfg_path))
    store, rq, procs = Store(cfg), RqState(cfg.redis.url), Processes()
    await store.connect()
    try:
        metrics = Metrics()
        workers = Workers(rq, procs)
        rec = Reconciler(cfg, store, rq, workers, metrics)
        stopper = Stopper(cfg, rq, procs, workers, TaskSet("test"))
        yield CancelParts(store, rq, procs, rec, stopper,
                          CancelProcessor(cfg, store, rq, stopper, rec, metrics))
    finally:
        await rq.close()
        await store.close()


@pytest.mark.parametrize("stop_ended", [True, False], ids=["stop-ended", "stop-under-way"])
def test_cancel_reports_signals_the_event_path_sent_first(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: Any, tmp_marker: Path,
        stop_ended: bool) -> None:
    """A cancel request is also an intent the event path acts on: it may stop the horse a
    moment before the request's own flow runs (and tell RQ the job was canceled), which then
    finds the job ended. The outcome must still say which signals stopped it, and that RQ
    was told: RQ says canceled.

    The event path's stop may even be under way still (the horse has exited, RQ says
    failed, the stop has yet to see the worker record it) when the flow reads the job: the
    flow takes that stop's result too, rather than report a cancel that sent no signal (or,
    had the row moved meanwhile, one that "could not be stopped")."""
    cfg_path = setup(tmp_path, redis_url, pg_dsn, cancel={"grace_seconds": 5.0})
    w = workers()
    rq_id = enqueue(redis_url, "tests.jobs.trap_sigterm", 120, str(tmp_marker))
    jid = insert_job(pg_dsn, rq_id)
    horse = w.wait_horse()
    # A horse exists a moment before RQ says started: the event pass must see it running.
    wait_until(lambda: rq_status(redis_url, rq_id) == "started", 20, "RQ to say started")
    rid = request_cancel(pg_dsn, jid, by="web:alice", reason="clicked Cancel")

    async def event_path_first() -> None:
        async with cancel_parts(cfg_path) as p:
            real_wait_exit = p.procs.wait_exit

            async def slow_wait_exit(ident: Any, timeout: float) -> bool:
                # The horse is gone when this returns True; the stop notices half a second
                # later (what a loaded host does to the window).
                exited = await real_wait_exit(ident, timeout)
                await asyncio.sleep(0.5)
                return exited

            if not stop_ended:
                p.procs.wait_exit = slow_wait_exit  # type: ignore[method-assign]
            report = await p.rec.reconcile_rq_ids([rq_id])  # what a keyspace event triggers
            assert [h.rq_id for h in report.horse_stops] == [rq_id]
            p.stopper.stop_for_reconcile(report.horse_stops)
            if stop_ended:
                assert await p.stopper.tasks.drain(30)
            while (await p.rq.read_jobs([rq_id]))[rq_id].status is RqStatus.STARTED:
                await asyncio.sleep(0.01)
            assert p.stopper.stopping(rq_id) is not stop_ended
            assert await p.cancels.process_pending() == 1  # now the request's own flow
            assert await p.cancels.drain(30)
            assert await p.stopper.tasks.drain(30)

    asyncio.run(event_path_first())
    req = wait_request(pg_dsn, rid, timeout=5)
    assert req["outcome"] == "cancelled", req
    assert req["detail"]["horse_signals"] == ["SIGTERM"]
    assert req["detail"]["rq_cancelled"] is True
    assert rq_status(redis_url, rq_id) == "canceled"
    assert "SIGTERM" in tmp_marker.read_text() and not pid_alive(horse)
    assert row(pg_dsn, jid)["status"] == "cancelled"


def test_cancel_decides_again_when_its_change_loses_a_race(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    """An event pass that read the job before the request existed can move the row (queued
    to running) between the cancel pass's read and its write: that write then loses the
    race. The flow decides again on a fresh read instead of reporting the row as it found
    it afterwards ("could not be stopped, row is running")."""
    cfg_path = setup(tmp_path, redis_url, pg_dsn)
    rq_id = enqueue(redis_url, "tests.jobs.sleep", 60)  # no worker: it waits in its queue
    jid = insert_job(pg_dsn, rq_id, status="queued", started_ago=None)
    rid = request_cancel(pg_dsn, jid)
    moved: list[str] = []

    async def a_pass_moves_the_row_first() -> None:
        async with cancel_parts(cfg_path) as p:
            store, real_apply = p.store, p.store.apply

            async def apply_after_another_pass(changes: Any) -> Any:
                if not moved and any(c.job_id == jid for c in changes):
                    assert store.pool is not None
                    async with store.pool.acquire() as conn:
                        moved.append(await conn.execute(
                            "UPDATE training_jobs SET status = 'running' WHERE id = $1", jid))
                return await real_apply(changes)

            store.apply = apply_after_another_pass  # type: ignore[method-assign]
            assert await p.cancels.process_pending() == 1
            assert await p.cancels.drain(30)

    asyncio.run(a_pass_moves_the_row_first())
    assert moved == ["UPDATE 1"]
    req = wait_request(pg_dsn, rid, timeout=5)
    assert req["outcome"] == "cancelled", req
    assert req["detail"]["rq_cancelled"] is True
    assert rq_status(redis_url, rq_id) == "canceled"
    assert row(pg_dsn, jid)["status"] == "cancelled"
