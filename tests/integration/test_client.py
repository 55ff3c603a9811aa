"""`reconciler.client`: the app's side of a cancel, on each driver an app already has
(asyncpg connection and pool, psycopg 3, psycopg2, SQLAlchemy's raw connection), against
real PostgreSQL; outcomes come from the real daemon stopping a job on a real rq worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg2
import pytest
import sqlalchemy

from reconciler import client
from reconciler.client import CancelTimeout, Client, cancel, cancel_async
from reconciler.devstack import (
    DaemonProc,
    Pg,
    WorkerPool,
    enqueue,
    insert_job,
    migrate,
    rq_status,
    wait_until,
    write_config,
)
from reconciler.errors import InvalidJobId, ReconcilerError, UnknownJob

REQ = "rq_reconciler_cancel_requests"


def migrated(tmp_path: Path, redis_url: str, dsn: str, **sections: dict[str, Any]) -> Path:
    cfg = write_config(tmp_path / "config.toml", redis_url, dsn, **sections)
    migrate(cfg)
    return cfg


# -- one way per driver to run `cancel` from sync test code ------------------------------------

Cancel = Callable[..., Any]


@contextmanager
def via_psycopg(dsn: str) -> Iterator[Cancel]:
    with psycopg.connect(dsn) as conn:
        yield lambda job_id, **kw: cancel(conn, job_id, **kw)


@contextmanager
def via_psycopg2(dsn: str) -> Iterator[Cancel]:
    conn = psycopg2.connect(dsn)
    try:
        yield lambda job_id, **kw: cancel(conn, job_id, **kw)
    finally:
        conn.close()


@contextmanager
def via_sqlalchemy(dsn: str) -> Iterator[Cancel]:
    engine = sqlalchemy.create_engine(dsn.replace("postgresql://", "postgresql+psycopg://"))
    raw = engine.raw_connection()
    try:
        yield lambda job_id, **kw: cancel(raw, job_id, **kw)
    finally:
        raw.close()
        engine.dispose()


@contextmanager
def via_asyncpg(dsn: str, *, pool: bool) -> Iterator[Cancel]:
    async def connect() -> Any:  # a pool must be made inside its event loop
        return await (asyncpg.create_pool(dsn, min_size=1, max_size=2) if pool
                      else asyncpg.connect(dsn))

    runner = asyncio.Runner()
    db = runner.run(connect())
    try:
        yield lambda job_id, **kw: runner.run(cancel_async(db, job_id, **kw))
    finally:
        runner.run(db.close())
        runner.close()


DRIVERS: dict[str, Callable[[str], AbstractContextManager[Cancel]]] = {
    "asyncpg": lambda dsn: via_asyncpg(dsn, pool=False),
    "asyncpg-pool": lambda dsn: via_asyncpg(dsn, pool=True),
    "psycopg3": via_psycopg,
    "psycopg2": via_psycopg2,
    "sqlalchemy-raw": via_sqlalchemy,
}


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_each_driver_requests_a_cancel_and_names_a_job_that_does_not_exist(
        tmp_path: Path, redis_url: str, pg_dsn: str, driver: str) -> None:
    migrated(tmp_path, redis_url, pg_dsn)
    job = insert_job(pg_dsn, "rq-1")
    with DRIVERS[driver](pg_dsn) as do_cancel:
        with pytest.raises(UnknownJob, match=r"no job with id = '424242' in training_jobs"):
            do_cancel(424242, reason="x")
        with pytest.raises(InvalidJobId, match=r"'not-a-number' is not a valid bigint id"):
            do_cancel("not-a-number", reason="x")
        # The refusals left the connection usable, and nothing behind.
        out = do_cancel(job, reason="clicked\x00 Cancel")
        given = do_cancel(str(job), reason="again", requested_by="web:alice")
    assert (out.state, out.outcome, out.success, out.done) == ("pending", None, False, False)
    assert out.job_id == str(job) and given.request_id > out.request_id
    with Pg(pg_dsn) as pg:
        rows = [dict(r) for r in pg.fetch(f"SELECT job_id, requested_by, reason, state FROM {REQ} "
                                          "ORDER BY id")]
    # requested_by defaults to the role (current_user); a NUL cannot go into text
    assert rows == [
        {"job_id": job, "requested_by": "postgres", "reason": "clicked\ufffd Cancel", "state": "pending"},
        {"job_id": job, "requested_by": "web:alice", "reason": "again", "state": "pending"},
    ]


def test_inside_the_callers_transaction_the_caller_commits(tmp_path: Path, redis_url: str,
                                                          pg_dsn: str) -> None:
    migrated(tmp_path, redis_url, pg_dsn)
    job = insert_job(pg_dsn, "rq-1")
    with psycopg.connect(pg_dsn) as conn, Pg(pg_dsn) as other:
        conn.execute("UPDATE training_jobs SET name = 'cancelling' WHERE id = %s", (job,))
        out = cancel(conn, job, reason="in a transaction")
        # A refused id costs only its savepoint: the caller's transaction goes on.
        with pytest.raises(UnknownJob):
            cancel(conn, 99999, reason="x")
        with pytest.raises(ReconcilerError, match="inside a transaction"):
            cancel(conn, job, reason="x", wait=1)
        assert other.val(f"SELECT count(*) FROM {REQ}") == 0  # not committed by cancel()
        conn.commit()
        assert other.fetch(f"SELECT id, state FROM {REQ}") == [(out.request_id, "pending")]
        assert other.val("SELECT name FROM training_jobs WHERE id = $1", job) == "cancelling"

    async def in_asyncpg_tx() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            async with conn.transaction():
                await cancel_async(conn, job, reason="async tx")
                with pytest.raises(UnknownJob):
                    await cancel_async(conn, 99999, reason="x")
                with pytest.raises(ReconcilerError, match="inside a transaction"):
                    await cancel_async(conn, job, reason="x", wait=1)
        finally:
            await conn.close()

    asyncio.run(in_asyncpg_tx())
    with Pg(pg_dsn) as pg:
        assert pg.val(f"SELECT count(*) FROM {REQ} WHERE reason = 'async tx'") == 1


@pytest.mark.parametrize("driver", ["asyncpg-pool", "psycopg3"])
def test_uuid_ids_in_a_schema_qualified_table(tmp_path: Path, redis_url: str, pg_dsn: str,
                                              driver: str) -> None:
    with Pg(pg_dsn) as pg:
        pg.execute("CREATE SCHEMA app; CREATE TABLE app.ml_runs (run_id uuid PRIMARY KEY, "
                   "rq_job_id text, state text NOT NULL, error_message text)")
        ids = [uuid.uuid4(), uuid.uuid4()]
        for i in ids:
            pg.execute("INSERT INTO app.ml_runs VALUES ($1, NULL, 'waiting')", i)
    req = "app.rq_reconciler_cancel_requests"
    migrated(tmp_path, redis_url, pg_dsn,
             jobs={"table": "app.ml_runs", "id_column": "run_id", "started_at_column": "",
                   "completed_at_column": "", "status_column": "state"},
             cancel={"requests_table": req})
    with DRIVERS[driver](pg_dsn) as do_cancel:
        first = do_cancel(ids[0], reason="a UUID object", requests_table=req)
        second = do_cancel(str(ids[1]).upper(), reason="its text", requests_table=req)
        with pytest.raises(InvalidJobId, match="'123' is not a valid uuid id"):
            do_cancel(123, reason="x", requests_table=req)
        with pytest.raises(UnknownJob, match=r"no job with run_id = '[0-9a-f-]{36}' in app.ml_runs"):
            do_cancel(uuid.uuid4(), reason="x", requests_table=req)
        with pytest.raises(ReconcilerError, match="rq_reconciler_cancel_requests not found"):
            do_cancel(ids[0], reason="x")  # the default table is not in this search_path
    assert (first.job_id, second.job_id) == (str(ids[0]), str(ids[1]).upper())
    with Pg(pg_dsn) as pg:
        assert [r["job_id"] for r in pg.fetch(f"SELECT job_id FROM {req} ORDER BY id")] == ids


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_the_requests_table_is_configured_once(tmp_path: Path, redis_url: str, pg_dsn: str,
                                               driver: str) -> None:
    """An app whose requests table is not the default says so once; no call repeats it."""
    req = "app.rq_reconciler_cancel_requests"
    with Pg(pg_dsn) as pg:
        pg.execute("CREATE SCHEMA app")
    migrated(tmp_path, redis_url, pg_dsn, cancel={"requests_table": req})
    job = insert_job(pg_dsn, "rq-1")
    saved = client._configured
    try:
        client.configure(requests_table=req)
        with DRIVERS[driver](pg_dsn) as do_cancel:
            out = do_cancel(job, reason="configured once")
            # A wait that would never end is refused before anything is written.
            with pytest.raises(ValueError, match="finite number of seconds"):
                do_cancel(job, reason="nan", wait=float("nan"))
            # A call's own table still wins (the default one does not exist here).
            with pytest.raises(ReconcilerError, match="rq_reconciler_cancel_requests not found"):
                do_cancel(job, reason="x", requests_table="rq_reconciler_cancel_requests")
    finally:
        client._configured = saved
    with Pg(pg_dsn) as pg:
        assert pg.fetch(f"SELECT id, reason FROM {req}") == [(out.request_id, "configured once")]


def test_a_client_object_keeps_its_own_names(tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    req = "app.rq_reconciler_cancel_requests"
    with Pg(pg_dsn) as pg:
        pg.execute("CREATE SCHEMA app")
    cfg = migrated(tmp_path, redis_url, pg_dsn, cancel={"requests_table": req})
    job = insert_job(pg_dsn, "rq-1")
    from reconciler.config import load

    cancels = Client.from_config(load(str(cfg)))
    with psycopg.connect(pg_dsn) as conn:
        first = cancels.cancel(conn, job, reason="sync")

    async def via_pool() -> int:
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
        try:
            return (await cancels.cancel_async(pool, job, reason="async")).request_id
        finally:
            await pool.close()

    second = asyncio.run(via_pool())
    with Pg(pg_dsn) as pg:
        assert [tuple(r) for r in pg.fetch(f"SELECT id, reason FROM {req} ORDER BY id")] == [
            (first.request_id, "sync"), (second, "async")]


# -- outcomes, from the real daemon -------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path, redis_url: str, pg_dsn: str) -> Iterator[DaemonProc]:
    cfg = migrated(tmp_path, redis_url, pg_dsn, cancel={"grace_seconds": 5.0})
    d = DaemonProc(cfg, tmp_path / "daemon.log")
    try:
        yield d.start()
    finally:
        d.close()


def test_wait_gives_each_outcome_from_the_daemon_or_a_clear_timeout(
        tmp_path: Path, redis_url: str, pg_dsn: str, daemon: DaemonProc) -> None:
    pool = WorkerPool(redis_url, log_dir=tmp_path)
    try:
        pool.start()
        running: dict[str, int] = {}
        for driver in DRIVERS:
            rq_id = enqueue(redis_url, "tests.jobs.sleep", 60)
            running[driver] = insert_job(pg_dsn, rq_id, status="queued", started_ago=None)
            wait_until(lambda r=rq_id: rq_status(redis_url, r) == "started", 20, f"{driver}'s job")
            with DRIVERS[driver](pg_dsn) as do_cancel:
                out = do_cancel(running[driver], reason="clicked Cancel", requested_by="web:bob",
                                wait=30)
            assert (out.outcome, out.state, out.success) == ("cancelled", "done", True), driver
            assert out.message == f"Job {running[driver]} cancelled successfully"
            assert out.as_dict()["horse_signals"] == ["SIGTERM"]
            assert out.graceful is True
            assert out.as_dict()["rq_cancelled"] is True
        finished = insert_job(pg_dsn, "rq-done", status="completed")
        with via_psycopg2(pg_dsn) as do_cancel:
            late = do_cancel(finished, reason="too late", wait=30)
        assert (late.outcome, late.success) == ("already_finished", False)
        assert late.as_dict()["status"] == "completed" and late.as_dict()["success"] is False
    finally:
        pool.stop_all()
    with Pg(pg_dsn) as pg:
        assert {r["status"] for r in pg.fetch("SELECT status FROM training_jobs WHERE id = ANY($1)",
                                              list(running.values()))} == {"cancelled"}
    assert daemon.stop() == 0
    # No daemon: the request stays pending and the wait ends with a timeout naming it.
    job = insert_job(pg_dsn, "rq-2")
    for driver in ("asyncpg", "psycopg3"):
        with DRIVERS[driver](pg_dsn) as do_cancel, pytest.raises(CancelTimeout) as info:
            do_cancel(job, reason="nobody home", wait=0.3)
        assert info.value.state == "pending" and "is rq-reconciler running?" in str(info.value)
        with Pg(pg_dsn) as pg:
            assert pg.val(f"SELECT state FROM {REQ} WHERE id = $1", info.value.request_id) == "pending"
