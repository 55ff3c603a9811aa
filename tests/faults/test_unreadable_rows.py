"""Odd values on the read paths (issue 21 item 3): a `started_at` of '-infinity' or
'infinity' (valid timestamptz values) once failed every statement that computes a row's
age ("cannot subtract infinite timestamps"): the sweep's pages, the event path's lookups,
the cancel claims. Now '-infinity' is "very old" and 'infinity' "just now", and a row the
database cannot hand over for any other reason is found, logged once, counted as poison
and skipped, as writes do."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from reconciler.config import load
from reconciler.devstack import (
    DaemonProc,
    Pg,
    WorkerPool,
    enqueue,
    insert_job,
    migrate,
    pid_alive,
    request_cancel,
    row,
    rq_status,
    run_cli,
    wait_request,
    wait_status,
    wait_until,
    write_config,
)
from reconciler.errors import DataRejected
from reconciler.jobs_table import Store


def odd_row(pg_dsn: str, when: str, rq_id: str | None = None) -> int:
    with Pg(pg_dsn) as pg:
        return int(pg.val("INSERT INTO training_jobs (rq_job_id, status, started_at) "
                          "VALUES ($1, 'running', $2::text::timestamptz) RETURNING id",
                          rq_id or uuid.uuid4().hex, when))


def test_sweep_with_infinite_started_at_beside_healthy_rows(tmp_path: Path, redis_url: str,
                                                            pg_dsn: str) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, sweep={"min_age_seconds": 60.0})
    migrate(cfg)
    pool = WorkerPool(redis_url, log_dir=tmp_path)
    try:
        pool.start()
        done = enqueue(redis_url, "tests.jobs.succeed", 1)
        wait_until(lambda: rq_status(redis_url, done) == "finished", 20, what="job finished")
        healthy = insert_job(pg_dsn, done, status="running")
        long_ago = odd_row(pg_dsn, "-infinity")
        some_day = odd_row(pg_dsn, "infinity")
        p = run_cli(cfg, "sweep", "--json")
        assert p.returncode == 0, p.stdout + p.stderr
        out = json.loads(p.stdout)
        changed = {int(c["job_id"]): c for c in out["changes"]}
        assert changed[healthy]["error"] == "Synced: RQ finished"
        # '-infinity' is very old: min_age has passed, its job is not in RQ.
        assert changed[long_ago]["error"] == "Orphaned: RQ job not found"
        # 'infinity' is just now: min_age has not passed yet.
        assert some_day not in changed
        assert row(pg_dsn, some_day)["status"] == "running"
        assert out["active"] == {"queued": 0, "running": 1}
    finally:
        pool.stop_all()


def test_the_daemon_starts_syncs_and_cancels_beside_an_infinite_row(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, sweep={"min_age_seconds": 60.0},
                       cancel={"grace_seconds": 1.0})
    migrate(cfg)
    pool = WorkerPool(redis_url, log_dir=tmp_path)
    d = DaemonProc(cfg, tmp_path / "d.log")
    try:
        w = pool.start()
        odd = odd_row(pg_dsn, "-infinity")
        d.start(timeout=60)  # its start-up sweep reads the odd row with the rest
        rq_short, rq_long = uuid.uuid4().hex, uuid.uuid4().hex
        short = insert_job(pg_dsn, rq_short, status="queued", started_ago=None)
        long = insert_job(pg_dsn, rq_long, status="queued", started_ago=None)
        enqueue(redis_url, "tests.jobs.sleep", 0.2, job_id=rq_short)
        assert wait_status(pg_dsn, short, "completed")["error_message"] == "Synced: RQ finished"
        enqueue(redis_url, "tests.jobs.sleep", 120, job_id=rq_long)
        wait_status(pg_dsn, long, "running")
        horse = w.wait_horse()
        rid = request_cancel(pg_dsn, long, by="web:alice", reason="clicked Cancel")
        assert wait_request(pg_dsn, rid)["outcome"] == "cancelled"
        wait_until(lambda: not pid_alive(horse), 15, what="the horse stopped")
        # The odd row itself: very old, its RQ job unknown: orphaned, once.
        r = wait_status(pg_dsn, odd, "failed")
        assert r["error_message"] == "Orphaned: RQ job not found"
        assert d.stop() == 0
        assert "Traceback" not in d.log_text()
    finally:
        d.close()
        pool.stop_all()


def test_a_row_no_read_can_hand_over_is_skipped_logged_once_and_counted(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    """A jobs "table" that is a view whose rq id cannot be computed for one row (a value
    no statement of ours foresaw: here a division by zero): pages and lookups by id read
    the other rows; the odd one is counted once, and read again once it can be."""
    with Pg(pg_dsn) as pg:
        pg.execute("CREATE VIEW jobs_view AS SELECT id, name, status, error_message, "
                   "started_at, completed_at, CASE WHEN name = 'odd' THEN (1 / (id - id))::text "
                   "ELSE rq_job_id END AS rq_job_id FROM training_jobs")
    migrate(write_config(tmp_path / "m.toml", redis_url, pg_dsn))  # (a key cannot point at a view)
    cfg_path = write_config(tmp_path / "c.toml", redis_url, pg_dsn, jobs={"table": "jobs_view"})
    ids = [insert_job(pg_dsn, f"rq-{i}") for i in range(5)]
    with Pg(pg_dsn) as pg:
        pg.execute("UPDATE training_jobs SET name = 'odd' WHERE id = $1", ids[2])
    poisoned: list[tuple[str, str]] = []

    async def reads() -> None:
        store = Store(load(str(cfg_path)),
                      on_poison=lambda kind, key, _err: poisoned.append((kind, key)))
        await store.connect()
        try:
            page = await store.active_page(None, 3)
            assert [r.row.id for r in page] == ids[:2]
            assert page.read == 3 and page.last_id == ids[2]  # the next page starts after it
            page = await store.active_page(page.last_id, 3)
            assert [r.row.id for r in page] == ids[3:]
            assert sorted(r.row.id for r in await store.rows_by_ids(ids)) == [*ids[:2], *ids[3:]]
            assert poisoned == [("row", str(ids[2]))]  # once, however often it was met
            # Asked for alone (a cancel), it is not "no such row": the caller is told.
            with pytest.raises(DataRejected):
                await store.rows_by_ids([ids[2]])
            assert poisoned == [("row", str(ids[2]))]
            assert store.pool is not None
            await store.pool.execute("UPDATE training_jobs SET name = 'fine' WHERE id = $1",
                                     ids[2])
            assert sorted(r.row.id for r in await store.rows_by_ids(ids)) == ids
            assert poisoned == [("row", str(ids[2]))]
        finally:
            await store.close()

    asyncio.run(reads())
