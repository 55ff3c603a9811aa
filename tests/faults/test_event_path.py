"""The event path under bad conditions: a flushed Redis, a Redis that cannot be believed
about missing jobs, rows the app holds locked, and updates that lose a race."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from reconciler.config import load
from reconciler.devstack import (
    DaemonProc,
    Pg,
    RedisServer,
    enqueue,
    metric_value,
    migrate,
    pid_alive,
    rq_status,
    run_cli,
    wait_until,
    write_config,
)
from reconciler.jobs_table import Store
from reconciler.metrics import Metrics
from reconciler.processes import Processes
from reconciler.reconcile import Reconciler
from reconciler.rq_state import RqState
from reconciler.workers import Workers
from tests.faults.common import log_events
from tests.support import insert_job, row, wait_status

BREAKER = "rq_reconciler_orphan_breaker_open"


def parked_running_rows(pg: Pg, redis_url: str, n: int) -> list[int]:
    """n rows that say running, each with a real RQ job parked in a queue nobody serves."""
    ids = []
    for _ in range(n):
        rq_id = enqueue(redis_url, "tests.jobs.succeed", 1, queue="parked")
        ids.append(insert_job(pg.dsn, rq_id, "running"))
    return ids


def test_flushdb_with_running_jobs_fails_nothing_and_opens_the_breaker(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: Any, tmp_marker: Path) -> None:
    """After a FLUSHDB every worker heartbeat wakes the jobs it runs, and each is "not
    found". The event path must hold those for the breaker, not fail them one by one."""
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, sweep={"min_age_seconds": 0.0})
    migrate(cfg)
    with Pg(pg_dsn) as pg:
        running, started = [], []
        for _ in range(2):  # one job each: the second worker starts once the first is busy
            w = workers()
            rq_id = enqueue(redis_url, "tests.jobs.touch_and_sleep", 60, str(tmp_marker))
            running.append(insert_job(pg_dsn, rq_id, "running"))
            w.wait_horse()
            started.append(w)
        w1, w2 = started
        parked = parked_running_rows(pg, redis_url, 22)
        horses = [w1.horse_pids()[0], w2.horse_pids()[0]]
        d = DaemonProc(cfg, tmp_path / "d.log")
        try:
            d.start()
            assert metric_value(d.scrape(), BREAKER) == 0
            with redis.Redis.from_url(redis_url) as r:
                r.flushdb()
                # What each worker's next heartbeat does: it writes its hash again.
                for w in (w1, w2):
                    r.hset(w.key, "last_heartbeat", datetime.now(UTC).isoformat())
            wait_until(lambda: metric_value(d.scrape(), BREAKER) == 1, 20, "breaker open",
                       interval=0.1)
            time.sleep(2.0)  # room for any wrong write to land
            statuses = {r["status"] for r in pg.fetch(
                "SELECT status FROM training_jobs WHERE id = ANY($1::bigint[])", running + parked)}
            assert statuses == {"running"}
            assert pg.val("SELECT count(*) FROM rq_reconciler_events") == 0
            assert all(pid_alive(p) for p in horses)
            held = [e for e in log_events([d.log_path]) if e.get("event") == "not_found_held"]
            assert held, "the event path never saw the vanished jobs"
            assert d.proc is not None and d.proc.poll() is None
        finally:
            d.stop()
            d.close()


def test_a_replica_that_lost_its_master_is_not_believed_about_missing_jobs(
        tmp_path: Path, pg_dsn: str) -> None:
    """A replica whose master is gone (or that is still in its first sync) may hold an
    empty or stale keyspace: "not found" from it is an outage, never an orphan."""
    dead_master_port = RedisServer().port  # a free port nothing listens on
    replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(dead_master_port)]).start()
    try:
        cfg = write_config(tmp_path / "c.toml", replica.url, pg_dsn)
        migrate(cfg)
        jid = insert_job(pg_dsn, "never-enqueued", "running")
        p = run_cli(cfg, "sweep")
        assert p.returncode == 1, p.stdout + p.stderr
        assert "replica" in p.stderr and "not believed" in p.stderr
        assert row(pg_dsn, jid)["status"] == "running"
    finally:
        replica.cleanup()


def test_only_a_believed_answer_is_reused_and_only_when_asked(redis_url: str) -> None:
    """A sweep page takes "this Redis can be believed about missing keys" from an answer
    up to a second old; a "cannot" is asked again every time, whatever the caller allows."""
    def info_calls(url: str) -> int:
        with redis.Redis.from_url(url) as r:
            return int(r.info("commandstats").get("cmdstat_info", {}).get("calls", 0))

    dead_master_port = RedisServer().port
    replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(dead_master_port)]).start()

    async def go() -> tuple[list[str], list[str], int, int]:
        master, lost = RqState(redis_url), RqState(replica.url)
        try:
            n0 = info_calls(redis_url)
            believed = [await master.not_authoritative(max_age=60.0) for _ in range(3)]
            reused = info_calls(redis_url) - n0 - 1  # (the count's own INFO)
            n1 = info_calls(redis_url)
            await master.not_authoritative()  # max_age 0: always asked
            fresh = info_calls(redis_url) - n1 - 1
            refused = [await lost.not_authoritative(max_age=60.0) for _ in range(2)]
            return believed, refused, reused, fresh
        finally:
            await master.close()
            await lost.close()

    try:
        believed, refused, reused, fresh = asyncio.run(go())
    finally:
        replica.cleanup()
    assert believed == ["", "", ""]
    assert reused == 2, "INFO persistence + replication once, in one round trip, for three asks"
    assert fresh == 2
    assert refused == ["redis is a replica that lost its master"] * 2


@pytest.mark.slow
def test_a_row_the_app_holds_locked_stalls_nothing_else(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: Any) -> None:
    """An app transaction holds one job row's lock for 60 s. The other rows still sync
    within a second of RQ finishing them; the locked one follows once it is released."""
    hold_seconds = 60.0
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    migrate(cfg)
    rq_locked = enqueue(redis_url, "tests.jobs.succeed", 1)  # waits: no worker yet
    locked = insert_job(pg_dsn, rq_locked, "running")
    d = DaemonProc(cfg, tmp_path / "d.log")
    d.start()
    released = threading.Event()
    holding = threading.Event()

    def app_transaction() -> None:
        with Pg(pg_dsn) as app:
            app.execute("BEGIN")
            app.execute("SELECT 1 FROM training_jobs WHERE id = $1 FOR UPDATE", locked)
            holding.set()
            time.sleep(hold_seconds)
            app.execute("COMMIT")
            released.set()

    t = threading.Thread(target=app_transaction, daemon=True)
    try:
        t.start()
        assert holding.wait(10)
        workers()
        lags = []
        for _ in range(5):
            rq_id = str(uuid.uuid4())  # the row first, as an app writes it: a worker is running
            jid = insert_job(pg_dsn, rq_id, "running")
            enqueue(redis_url, "tests.jobs.succeed", 1, job_id=rq_id)
            t0 = time.monotonic()
            wait_status(pg_dsn, jid, "completed", timeout=10)
            lags.append(time.monotonic() - t0)
        assert max(lags) < 2.0, lags  # includes RQ's own pick-up and run
        assert row(pg_dsn, locked)["status"] == "running"  # still locked by the app
        assert released.wait(hold_seconds + 10)
        t_release = time.monotonic()
        wait_status(pg_dsn, locked, "completed", timeout=5)
        assert time.monotonic() - t_release < 2.0
        assert d.proc is not None and d.proc.poll() is None
        assert metric_value(d.scrape(), "rq_reconciler_backend_up", backend="postgres") == 1
    finally:
        t.join(hold_seconds + 15)
        d.stop()
        d.close()


def test_a_cancel_waits_out_an_app_transaction_on_its_row(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    """An app transaction sits on the row of a job being cancelled. The cancel gives no
    outcome while it cannot write the row (never "could not be stopped" for a job it has
    cancelled in RQ); once the app lets go, the row is cancelled and so is the request."""
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, cancel={"lease_seconds": 3.0})
    migrate(cfg)
    rq_id = enqueue(redis_url, "tests.jobs.succeed", 1, queue="parked")  # no worker: waits
    jid = insert_job(pg_dsn, rq_id, "queued")
    d = DaemonProc(cfg, tmp_path / "d.log")
    d.start()
    try:
        with Pg(pg_dsn) as app, Pg(pg_dsn) as other:
            app.execute("BEGIN")
            # What an app's UPDATE of the row takes (FOR UPDATE would also hold off the
            # request's INSERT: its foreign key's KEY SHARE).
            app.execute("SELECT 1 FROM training_jobs WHERE id = $1 FOR NO KEY UPDATE", jid)
            rid = int(other.val("INSERT INTO rq_reconciler_cancel_requests (job_id, reason) "
                                "VALUES ($1, 'locked') RETURNING id", jid))
            wait_until(lambda: any(e.get("event") == "cancel_row_locked"
                                   for e in log_events([d.log_path])), 15,
                       "the cancel to find the row held")
            req = other.fetch("SELECT state, outcome FROM rq_reconciler_cancel_requests "
                              "WHERE id = $1", rid)[0]
            assert req["outcome"] is None, dict(req)
            assert rq_status(redis_url, rq_id) == "canceled"  # RQ's side was done
            app.execute("COMMIT")
            wait_until(lambda: other.val("SELECT outcome FROM rq_reconciler_cancel_requests "
                                         "WHERE id = $1", rid) is not None, 20, "an outcome")
            assert other.val("SELECT outcome FROM rq_reconciler_cancel_requests "
                             "WHERE id = $1", rid) == "cancelled"
        assert row(pg_dsn, jid)["status"] == "cancelled"
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.stop()
        d.close()


def test_a_lost_race_asks_for_a_fresh_read_at_once(tmp_path: Path, redis_url: str,
                                                   pg_dsn: str) -> None:
    """A guarded UPDATE that changes nothing means the row moved under us: the pass names
    its RQ id for a fresh read instead of leaving it to the next sweep."""
    cfg_path = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    migrate(cfg_path)
    rq_id = enqueue(redis_url, "tests.jobs.succeed", 1, queue="parked")
    jid = insert_job(pg_dsn, rq_id, "queued")
    with redis.Redis.from_url(redis_url) as r:
        r.hset(f"rq:job:{rq_id}", mapping={"status": "finished",
                                           "ended_at": datetime.now(UTC).isoformat()})

    async def go() -> tuple[list[str], int]:
        cfg = load(str(cfg_path))
        store, rq = Store(cfg), RqState(cfg.redis.url)
        await store.connect()
        try:
            rec = Reconciler(cfg, store, rq, Workers(rq, Processes()), Metrics())
            rows = await store.rows_by_ids([jid])
            evaluated = await rec.evaluate(rows)  # decided on "queued" -> completed
            app = await asyncpg.connect(pg_dsn)  # ... and the app moves the row meanwhile
            await app.execute("UPDATE training_jobs SET status = 'running' WHERE id = $1", jid)
            await app.close()
            report, _ = await rec.apply(evaluated)
            return report.retry_now, report.lost_races
        finally:
            await rq.close()
            await store.close()

    retry_now, lost = asyncio.run(go())
    assert lost == 1 and retry_now == [rq_id]
    assert row(pg_dsn, jid)["status"] == "running"


def test_a_cancel_is_not_completed_on_a_replica_that_lost_its_master(
        tmp_path: Path, pg_dsn: str) -> None:
    """Pointed at a replica that cannot vouch for its keyspace, a pending cancel of a job
    it does not show must wait (its claim expires and is retried), not end `cancelled`
    on a "missing" job with nothing stopped."""
    dead_master_port = RedisServer().port
    replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(dead_master_port)]).start()
    try:
        cfg = write_config(tmp_path / "c.toml", replica.url, pg_dsn,
                           cancel={"lease_seconds": 2.0})
        migrate(cfg)
        jid = insert_job(pg_dsn, "runs-on-the-real-master", "running")
        with Pg(pg_dsn) as pg:
            rid = int(pg.val("INSERT INTO rq_reconciler_cancel_requests (job_id, reason) "
                             "VALUES ($1, 'test') RETURNING id", jid))
            d = DaemonProc(cfg, tmp_path / "d.log")
            try:
                d.start(wait_ready=False)
                wait_until(lambda: any(e.get("event") == "cancel_interrupted"
                                       for e in log_events([d.log_path])), 20,
                           "the cancel to be interrupted")
                time.sleep(3.0)  # a lease period: it is tried again, and again waits
                req = pg.fetch("SELECT state, outcome FROM rq_reconciler_cancel_requests "
                               "WHERE id = $1", rid)[0]
                assert req["outcome"] is None and req["state"] != "done", dict(req)
                assert row(pg_dsn, jid)["status"] == "running"
                assert d.proc is not None and d.proc.poll() is None
            finally:
                d.stop()
                d.close()
    finally:
        replica.cleanup()
