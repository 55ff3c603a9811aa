"""Redis behind Sentinel, with real redis-server processes as master, replica and three
sentinels: the daemon (and RQ's workers) find the master through the sentinels, and a
failover under a running daemon loses nothing and fails nothing wrongly."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from rq import Worker

from reconciler import rq_state
from reconciler.devstack import (
    DaemonProc,
    Pg,
    WorkerPool,
    enqueue,
    insert_job,
    migrate,
    request_cancel,
    row,
    rq_status,
    run_cli,
    wait_request,
    wait_status,
    wait_until,
    write_config,
)
from reconciler.devstack.sentinel import SentinelSet
from reconciler.errors import RedisUnavailable
from reconciler.rq_layout import missing_keyspace_flags
from reconciler.rq_state import RqState

# Workers take the same URL as the daemon through this connection class.
SENTINEL_WORKER = ("--connection-class", "reconciler.redisconn.SentinelAwareRedis")
ROW_FOR = {"finished": "completed", "failed": "failed"}


def test_a_failover_under_a_running_daemon(tmp_path: Path, pg_dsn: str) -> None:
    with SentinelSet(replicas=1, sentinels=3) as ss:
        cfg = write_config(tmp_path / "config.toml", ss.url, pg_dsn,
                           sweep={"interval_seconds": 300.0, "min_age_seconds": 0.0},
                           cancel={"grace_seconds": 5.0})
        migrate(cfg)
        p = run_cli(cfg, "check")
        assert f"OK   redis sentinel: 3 of 3 sentinels name 127.0.0.1:{ss.master_port()} as master " \
               "'mymaster'" in p.stdout, p.stdout
        daemon = DaemonProc(cfg, tmp_path / "daemon.log")
        pool = WorkerPool(ss.url, log_dir=tmp_path)
        try:
            daemon.start()
            for _ in range(3):
                pool.start(extra_args=SENTINEL_WORKER)
            # Jobs that end before, during and after the failover, and one to cancel in it.
            jobs = {}
            for seconds in (0.2, 2.0, 4.0, 8.0):
                # The row first, then the job under its id, as an app does.
                rq_id = str(uuid.uuid4())
                jobs[rq_id] = insert_job(pg_dsn, rq_id, status="queued", started_ago=None)
                enqueue(ss.url, "tests.jobs.sleep", seconds, job_id=rq_id)
            victim_rq = enqueue(ss.url, "tests.jobs.sleep", 120)
            victim = insert_job(pg_dsn, victim_rq, status="queued", started_ago=None)
            wait_until(lambda: rq_status(ss.url, victim_rq) == "started", 20, "the victim started")
            old = ss.master_port()
            with ss.client() as r:
                assert r.execute_command("WAIT", 1, 2000) == 1  # the replica has it all
            # The master's host is lost.
            ss.node(old).kill()
            lost_at = time.monotonic()
            request = request_cancel(pg_dsn, victim, by="web:alice", reason="during the failover")
            wait_until(lambda: ss.master_port() != old, 30, "the sentinels to promote the replica")
            failed_over = time.monotonic() - lost_at
            # A job after the failover is synced by events on the new master: the sweep
            # interval is 5 minutes, and the sweep after the reconnect has long run.
            time.sleep(1.0)
            after_rq = str(uuid.uuid4())
            after = insert_job(pg_dsn, after_rq, status="queued", started_ago=None)
            enqueue(ss.url, "tests.jobs.sleep", 0.2, job_id=after_rq)
            wait_status(pg_dsn, after, "completed", timeout=20)

            req = wait_request(pg_dsn, request, timeout=60)
            assert req["outcome"] == "cancelled", req
            assert row(pg_dsn, victim)["status"] == "cancelled"
            for job in jobs.values():
                wait_until(lambda j=job: row(pg_dsn, j)["status"] in ROW_FOR.values(), 60,
                           f"job {job} to end")
        finally:
            pool.stop_all()
            daemon.close()
        # Every row says what RQ says (read on the new master), and none was failed by the
        # daemon for a worker or a job the failover merely hid for a moment.
        with ss.client() as r:
            flags = r.config_get("notify-keyspace-events")["notify-keyspace-events"]
        assert missing_keyspace_flags(flags) == "", flags  # re-armed on the new master
        with Pg(pg_dsn) as pg:
            rows = {r["rq_job_id"]: dict(r) for r in pg.fetch("SELECT * FROM training_jobs")}
        want = {i: ROW_FOR.get(rq_status(ss.url, i) or "", "?") for i in jobs}
        have = {i: rows[i]["status"] for i in jobs}
        assert have == want, rows
        assert not [r for r in rows.values() if (r["error_message"] or "").startswith("Orphaned")]
        assert failed_over < 30
        # The outage was retried (warnings), never taken for a verdict.
        assert [e for e in daemon.log_events() if e.get("level") == "error"] == []
        assert any(e.get("event") == "keyspace_lost" for e in daemon.log_events())


@pytest.mark.parametrize("url, error", [
    ("redis+sentinel://127.0.0.1:1,127.0.0.1:2", "no master name"),
    ("redis+sentinel://127.0.0.1:x/m/0", "sentinel address '127.0.0.1:x'"),
    ("redis+sentinel://:hunter2@127.0.0.1:1/m/zero", "path '/m/zero'"),
])
def test_a_bad_sentinel_url_is_a_config_error(tmp_path: Path, pg_dsn: str, url: str,
                                              error: str) -> None:
    cfg = write_config(tmp_path / "config.toml", url, pg_dsn)
    p = run_cli(cfg, "check")
    assert p.returncode == 2 and "redis.url" in p.stderr and error in p.stderr, p.stderr
    assert "hunter2" not in p.stderr


def test_check_says_when_no_sentinel_knows_the_master(tmp_path: Path, pg_dsn: str) -> None:
    with SentinelSet(replicas=0, sentinels=1) as ss:
        url = ss.url.replace("/mymaster/", "/othermaster/")
        cfg = write_config(tmp_path / "config.toml", url, pg_dsn)
        p = run_cli(cfg, "check")
    assert p.returncode == 1
    assert "FAIL redis sentinel: no sentinel names a master 'othermaster'" in p.stdout, p.stdout


def test_after_a_failover_a_silent_command_channel_proves_no_death_for_a_while(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A promoted replica has a long uptime, but none of the workers' subscriptions yet
    (RQ re-subscribes within seconds): PUBSUB NUMSUB = 0 there must read as "cannot tell"
    (-1), not as "nobody listens" (a death), until the settle time has passed."""
    monkeypatch.setattr(rq_state, "PUBSUB_SETTLE_SECONDS", 2)
    with SentinelSet(replicas=1, sentinels=3) as ss:
        with ss.client() as conn:
            # A worker registered by RQ itself, whose command channel has no subscriber.
            worker = Worker(["default"], connection=conn, name="quiet")
            worker.register_birth()
            assert conn.execute_command("WAIT", 1, 2000) == 1
        rq = RqState(ss.url, socket_timeout=2.0)

        async def subscribers() -> int:
            while True:
                try:
                    return (await rq.read_workers(["quiet"]))["quiet"].subscribers
                except RedisUnavailable:
                    await asyncio.sleep(0.1)  # the failover is under way

        async def story() -> list[int]:
            try:
                seen = [await subscribers()]  # the servers are older than the settle time
                old = ss.master_port()
                ss.node(old).kill()
                await asyncio.to_thread(wait_until, lambda: ss.master_port() != old, 30, "promotion")
                seen.append(await subscribers())
                await asyncio.sleep(2.2)
                seen.append(await subscribers())
                return seen
            finally:
                await rq.close()

        assert asyncio.run(story()) == [0, -1, 0]
