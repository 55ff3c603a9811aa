"""Bad data and a read-only database under a running daemon: it keeps running, counts
and logs the bad key once, keeps syncing everything else, and resumes when it can write."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import redis

from reconciler.devstack import (
    DaemonProc,
    Pg,
    enqueue,
    metric_value,
    migrate,
    wait_until,
    write_config,
)
from tests.faults.common import log_events
from tests.support import insert_job, wait_status

POISON = "rq_reconciler_poison_total"


def _dbname(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1].split("?", 1)[0]


def test_a_nul_in_a_job_key_costs_only_that_key(tmp_path: Path, redis_url: str, pg_dsn: str,
                                                workers: Any) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    migrate(cfg)
    d = DaemonProc(cfg, tmp_path / "d.log")
    try:
        d.start()
        with redis.Redis.from_url(redis_url) as r:
            r.hset(b"rq:job:a\x00b", mapping={"status": "finished"})
            r.hset(b"rq:job:a\x00b", mapping={"status": "failed"})  # a second event, same key
        workers()
        rq_id = str(uuid.uuid4())  # the row first, as an app writes it: a worker is running
        jid = insert_job(pg_dsn, rq_id, "running")
        enqueue(redis_url, "tests.jobs.succeed", 1, job_id=rq_id)
        wait_status(pg_dsn, jid, "completed", timeout=10)
        wait_until(lambda: metric_value(d.scrape(), POISON, kind="key") >= 1, 10, "poison counted")
        assert metric_value(d.scrape(), POISON, kind="key") == 1
        logged = [e for e in log_events([d.log_path]) if e.get("event") == "poison_key"]
        assert len(logged) == 1, logged
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.stop()
        d.close()


def test_a_read_only_database_is_waited_out_at_start_up_and_mid_run(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: Any) -> None:
    """A failover or a read-only pooler: never exit 2 (systemd would not restart it);
    retry, show postgres down, and carry on once the database takes writes again."""
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    migrate(cfg)
    db = _dbname(pg_dsn)
    d = DaemonProc(cfg, tmp_path / "d.log")
    with Pg(pg_dsn) as admin:
        admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
        try:
            d.start(wait_ready=False)
            wait_until(lambda: any(e.get("event") == "connect_retry"
                                   for e in log_events([d.log_path])), 20, "a connect retry")
            assert d.proc is not None and d.proc.poll() is None
            admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = off')
            d.wait_message("READY=1", 60)

            # Mid-run: the database turns read-only and its sessions are cut (a failover),
            # then a job finishes.
            rq_id = enqueue(redis_url, "tests.jobs.succeed", 1)  # no worker yet
            jid = insert_job(pg_dsn, rq_id, "running")
            admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = $1 AND pid <> pg_backend_pid()", db)
            workers()
            wait_until(lambda: metric_value(d.scrape(), "rq_reconciler_backend_up",
                                            backend="postgres") == 0, 20, "postgres down")
            time.sleep(2)
            assert d.proc.poll() is None, d.log_text()[-2000:]
            assert admin.val("SELECT status FROM training_jobs WHERE id = $1", jid) == "running"
            admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = off')
            wait_status(pg_dsn, jid, "completed", timeout=30)
            wait_until(lambda: metric_value(d.scrape(), "rq_reconciler_backend_up",
                                            backend="postgres") == 1, 30, "postgres up again")
            assert d.proc.poll() is None
        finally:
            admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = off')
            d.stop()
            d.close()


def test_a_nul_in_a_real_exception_text_does_not_stop_the_daemon_starting(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: Any) -> None:
    """It used to exit 1 at start-up, and again at every restart: the start-up sweep met
    the row and PostgreSQL refused the text."""
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    migrate(cfg)
    workers()
    bad = enqueue(redis_url, "tests.jobs.fail", "bad\x00byte here")
    wait_until(lambda: redis.Redis.from_url(redis_url).hget(f"rq:job:{bad}", "status")
               == b"failed", 20, "the job to fail in RQ")
    jid = insert_job(pg_dsn, bad, "running")
    d = DaemonProc(cfg, tmp_path / "d.log")
    try:
        d.start()  # READY=1 comes after the start-up sweep
        got = wait_status(pg_dsn, jid, "failed", timeout=10)
        assert "\x00" not in got["error_message"] and "byte here" in got["error_message"]
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.stop()
        d.close()
