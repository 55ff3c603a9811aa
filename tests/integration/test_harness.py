"""The harness itself, exercised with real redis-server, PostgreSQL and rq workers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Literal

import pytest
import redis
from rq.command import send_stop_job_command
from rq.job import Job

from reconciler.devstack import (
    PostgresServer,
    RedisServer,
    WorkerPool,
    create_jobs_table,
    enqueue,
    pg_fetch,
    pid_alive,
    rq_status,
    wait_until,
)


def _latest_exc(redis_url: str, job_id: str) -> str:
    with redis.Redis.from_url(redis_url) as conn:
        result = Job.fetch(job_id, connection=conn).latest_result()
        return (result.exc_string or "") if result is not None else ""


def _wait_status(redis_url: str, job_id: str, status: str, timeout: float = 20) -> None:
    wait_until(lambda: rq_status(redis_url, job_id) == status, timeout,
               lambda: f"job {job_id} to reach {status!r} (is {rq_status(redis_url, job_id)!r})")


def _started_pid(marker: Path) -> int:
    wait_until(lambda: "STARTED" in marker.read_text(), what=f"STARTED in {marker}")
    line = next(ln for ln in marker.read_text().splitlines() if ln.startswith("STARTED"))
    return int(line.split()[1])


def test_succeed_job_finishes(redis_url: str, workers: WorkerPool) -> None:
    w = workers()
    job_id = enqueue(redis_url, "tests.jobs.succeed", 21)
    _wait_status(redis_url, job_id, "finished")
    with redis.Redis.from_url(redis_url) as conn:
        assert Job.fetch(job_id, connection=conn).return_value() == 42
    assert w.current_job_id() is None
    # RQ records the job finished a moment before its horse process has exited.
    wait_until(lambda: w.horse_pids() == [], 10, "the horse to exit")


def test_fail_job_failed(redis_url: str, workers: WorkerPool) -> None:
    workers()
    job_id = enqueue(redis_url, "tests.jobs.fail", "kaput")
    _wait_status(redis_url, job_id, "failed")
    assert "RuntimeError: kaput" in _latest_exc(redis_url, job_id)


def test_missing_job_status_is_none(redis_url: str) -> None:
    assert rq_status(redis_url, "no-such-job") is None


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_sigterm_to_horse_group_fails_job(
    redis_url: str, workers: WorkerPool, tmp_marker: Path, how: Literal["raise", "exit"]
) -> None:
    w = workers()
    job_id = enqueue(redis_url, "tests.jobs.trap_sigterm", 60, str(tmp_marker), how=how)
    started_pid = _started_pid(tmp_marker)
    horse = w.wait_horse()
    assert horse == started_pid
    assert w.current_job_id() == job_id
    assert rq_status(redis_url, job_id) == "started"

    os.killpg(horse, signal.SIGTERM)

    wait_until(lambda: "SIGTERM" in tmp_marker.read_text(), what="SIGTERM written to marker")
    _wait_status(redis_url, job_id, "failed")
    wait_until(lambda: not pid_alive(horse), what="horse gone")
    exc = _latest_exc(redis_url, job_id)
    if how == "raise":
        assert "SystemExit: 143" in exc
    else:
        assert "Work-horse terminated unexpectedly" in exc
    # The worker survives its horse and goes back to idle.
    assert w.is_alive()
    wait_until(lambda: w.current_job_id() is None, what="worker idle")
    assert w.horse_pids() == []


def test_untrapped_sigterm_fails_job(redis_url: str, workers: WorkerPool) -> None:
    w = workers()
    job_id = enqueue(redis_url, "tests.jobs.sleep", 60)
    horse = w.wait_horse()
    _wait_status(redis_url, job_id, "started")
    os.killpg(horse, signal.SIGTERM)
    _wait_status(redis_url, job_id, "failed")
    assert "(signal 15)" in _latest_exc(redis_url, job_id)


def test_ignore_sigterm_needs_sigkill(
    redis_url: str, workers: WorkerPool, tmp_marker: Path
) -> None:
    w = workers()
    job_id = enqueue(redis_url, "tests.jobs.ignore_sigterm", 60, str(tmp_marker))
    horse = _started_pid(tmp_marker)
    assert w.wait_horse() == horse
    os.killpg(horse, signal.SIGTERM)
    wait_until(lambda: "SIGTERM-IGNORED" in tmp_marker.read_text(), what="SIGTERM ignored")
    time.sleep(0.3)
    assert pid_alive(horse)
    assert rq_status(redis_url, job_id) == "started"
    assert w.kill_horses(signal.SIGKILL) == [horse]
    _wait_status(redis_url, job_id, "failed")
    assert "(signal 9)" in _latest_exc(redis_url, job_id)


def test_stop_job_command_gives_stopped(redis_url: str, workers: WorkerPool) -> None:
    w = workers()
    job_id = enqueue(redis_url, "tests.jobs.sleep", 30)
    horse = w.wait_horse()
    _wait_status(redis_url, job_id, "started")
    t0 = time.monotonic()
    with redis.Redis.from_url(redis_url) as conn:
        send_stop_job_command(conn, job_id)
    _wait_status(redis_url, job_id, "stopped", timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 5, f"stop-job took {elapsed:.2f}s"
    wait_until(lambda: not pid_alive(horse), what="horse gone")
    with redis.Redis.from_url(redis_url) as conn:
        job = Job.fetch(job_id, connection=conn)
        assert job_id in job.failed_job_registry
    assert w.is_alive()


def test_worker_stop_kills_orphaned_horse(
    redis_url: str, workers: WorkerPool, tmp_marker: Path
) -> None:
    w = workers()
    enqueue(redis_url, "tests.jobs.touch_and_sleep", 60, str(tmp_marker))
    horse = _started_pid(tmp_marker)
    w.kill(signal.SIGKILL)  # main process only: the horse keeps running, orphaned
    w.proc.wait(timeout=10)
    time.sleep(0.2)
    assert pid_alive(horse)
    assert w.horse_pids() == []
    assert horse in w.tagged_pids()
    w.stop()
    assert not pid_alive(horse)
    assert w.tagged_pids() == []


def test_worker_terminate_when_idle(workers: WorkerPool) -> None:
    w = workers()
    assert w.terminate(timeout=20) == 0
    with redis.Redis.from_url(w.redis_url) as conn:
        assert conn.hexists(w.key, "death")


def test_redis_restart_keeps_port(own_redis: RedisServer) -> None:
    port = own_redis.port
    assert own_redis.url == f"redis://127.0.0.1:{port}/0"
    with own_redis.client() as r:
        r.set("k", "v")
        r.config_set("notify-keyspace-events", "KEA")
    old_pid = own_redis.pid
    own_redis.restart()
    assert own_redis.port == port
    assert own_redis.pid != old_pid
    with own_redis.client() as r:
        assert r.ping()
        assert r.get("k") is None  # no persistence
        assert r.config_get("notify-keyspace-events")["notify-keyspace-events"] == ""
    own_redis.kill()
    assert not own_redis.is_running()
    with pytest.raises(redis.ConnectionError), own_redis.client() as r:
        r.ping()
    own_redis.start()
    with own_redis.client() as r:
        assert r.ping()


@pytest.mark.parametrize("postmaster_only", [False, True])
def test_postgres_kill_then_start(own_pg: PostgresServer, postmaster_only: bool) -> None:
    dsn = own_pg.create_database("before_kill")
    create_jobs_table(dsn)
    pg_fetch(dsn, "INSERT INTO training_jobs (name, rq_job_id) VALUES ('a', 'j1')")
    postmaster = own_pg.pid
    assert postmaster is not None
    own_pg.kill(postmaster_only=postmaster_only)
    assert not own_pg.is_running()
    assert not pid_alive(postmaster)
    with pytest.raises(OSError):
        pg_fetch(dsn, "SELECT 1")
    own_pg.start()
    # Committed data survives the crash (crash recovery ran).
    assert [tuple(r) for r in pg_fetch(dsn, "SELECT name, rq_job_id, status FROM training_jobs")] \
        == [("a", "j1", "queued")]
    dsn2 = own_pg.create_database("after_kill")
    create_jobs_table(dsn2)
    assert pg_fetch(dsn2, "SELECT count(*) FROM training_jobs")[0][0] == 0
    port = own_pg.port
    own_pg.restart()
    assert own_pg.port == port
    own_pg.drop_database("after_kill")
    assert pg_fetch(own_pg.dsn(), "SELECT 1 FROM pg_database WHERE datname='after_kill'") == []


def test_pg_dsn_fixture(pg_dsn: str, pg_server: PostgresServer) -> None:
    assert pg_dsn.startswith(f"postgresql://postgres@127.0.0.1:{pg_server.port}/t_")
    assert pg_fetch(pg_dsn, "SELECT count(*) FROM training_jobs")[0][0] == 0
    cols = [r[0] for r in pg_fetch(
        pg_dsn,
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name='training_jobs' ORDER BY ordinal_position",
    )]
    assert cols == [
        "id", "name", "rq_job_id", "status", "error_message",
        "created_at", "started_at", "completed_at",
    ]  # fmt: skip
    settings = pg_fetch(pg_dsn, "SELECT current_setting('fsync'), current_setting('max_connections'), "
                                "current_setting('listen_addresses')")
    assert tuple(settings[0]) == ("off", "200", "127.0.0.1")


def test_redis_url_fixture_is_clean(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as r:
        assert r.dbsize() == 0
        assert r.config_get("notify-keyspace-events")["notify-keyspace-events"] == ""
        r.set("dirty", "1")
        r.config_set("notify-keyspace-events", "KEA")


def test_redis_url_fixture_is_clean_again(redis_url: str) -> None:
    test_redis_url_fixture_is_clean(redis_url)
