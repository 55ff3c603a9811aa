"""The daemon and the app behind a real PgBouncer in transaction mode (Debian's package,
started here on a free port): what it breaks, what `check` says of it, and the daemon
working with postgres.pooler = "transaction" and listen_dsn."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from reconciler.client import cancel_async
from reconciler.config import load
from reconciler.devstack import (
    DaemonProc,
    Pg,
    PostgresServer,
    WorkerPool,
    enqueue,
    insert_job,
    migrate,
    rq_status,
    run_cli,
    wait_status,
    wait_until,
    write_config,
)
from reconciler.devstack.pgbouncer import PgBouncer, pgbouncer_bin
from reconciler.jobs_table import Store

pytestmark = pytest.mark.skipif(pgbouncer_bin() is None,
                                reason="pgbouncer not installed (scripts/install-ci-tools.sh)")


@pytest.fixture
def bouncer(pg_server: PostgresServer) -> Iterator[PgBouncer]:
    with PgBouncer(pg_server.port, pool_mode="transaction", pool_size=2) as b:
        yield b


def via(bouncer: PgBouncer, dsn: str) -> str:
    """`dsn`'s database, through the bouncer."""
    return bouncer.dsn(dsn.rsplit("/", 1)[1])


def lines(out: str, what: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln[5:].startswith(what + ":")]


def test_check_names_what_a_transaction_pooler_breaks(tmp_path: Path, redis_url: str,
                                                      pg_dsn: str, bouncer: PgBouncer) -> None:
    pooled = via(bouncer, pg_dsn)
    # As if the pooler were not there: the pool's startup parameters are refused.
    cfg = write_config(tmp_path / "naive.toml", redis_url, pooled)
    p = run_cli(cfg, "check")
    assert p.returncode == 1
    (line,) = lines(p.stdout, "postgres pooler")
    assert line.startswith("FAIL") and "unsupported startup parameter" in line
    assert 'postgres.pooler = "transaction"' in line

    # pooler = "transaction" but LISTEN still through the pooler: a config error, before
    # any connection.
    cfg = write_config(tmp_path / "half.toml", redis_url, pooled, postgres={"pooler": "transaction"})
    p = run_cli(cfg, "check")
    assert p.returncode == 2 and "postgres.listen_dsn: required with pooler" in p.stderr

    # A listen_dsn that is the pooler too: the NOTIFY never arrives, and check says so.
    cfg = write_config(tmp_path / "wrong.toml", redis_url, pooled,
                       postgres={"pooler": "transaction", "listen_dsn": pooled})
    p = run_cli(cfg, "check")
    (line,) = lines(p.stdout, "postgres listen") or [p.stdout + p.stderr]
    assert p.returncode == 1 and line.startswith("FAIL") and "did not reach a LISTEN" in line

    # Right: LISTEN direct. The role has no timeouts yet: a warning with the fix.
    cfg = write_config(tmp_path / "right.toml", redis_url, pooled,
                       postgres={"pooler": "transaction", "listen_dsn": pg_dsn})
    migrate(cfg)
    p = run_cli(cfg, "check")
    assert lines(p.stdout, "postgres listen")[0].startswith("OK")
    (line,) = lines(p.stdout, "postgres pooler")
    assert line.startswith("WARN") and "ALTER ROLE \"postgres\" SET lock_timeout = '2s'" in line
    dbname = pg_dsn.rsplit("/", 1)[1]
    with Pg(pg_dsn) as pg:  # per database: the session cluster is shared by the suite
        pg.execute(f"ALTER ROLE postgres IN DATABASE \"{dbname}\" SET lock_timeout = '2s'")
        pg.execute(f"ALTER ROLE postgres IN DATABASE \"{dbname}\" SET statement_timeout = '30s'")
    with PgBouncer(bouncer.pg_port) as fresh:  # new server connections see the settings
        cfg = write_config(tmp_path / "right.toml", redis_url, via(fresh, pg_dsn),
                           postgres={"pooler": "transaction", "listen_dsn": pg_dsn})
        p = run_cli(cfg, "check")
    (line,) = lines(p.stdout, "postgres pooler")
    assert line.startswith("OK") and "lock_timeout=2s" in line, p.stdout


def test_the_daemon_and_the_app_behind_pgbouncer(tmp_path: Path, redis_url: str, pg_dsn: str,
                                                 bouncer: PgBouncer) -> None:
    pooled = via(bouncer, pg_dsn)
    cfg = write_config(tmp_path / "config.toml", redis_url, pooled,
                       postgres={"pooler": "transaction", "listen_dsn": pg_dsn, "pool_size": 4},
                       cancel={"grace_seconds": 5.0})
    migrate(cfg)
    daemon = DaemonProc(cfg, tmp_path / "daemon.log")
    pool = WorkerPool(redis_url, log_dir=tmp_path)
    try:
        daemon.start()
        pool.start()
        # Events: a job that finishes is synced through the pooled connections.
        # The row first, then the job under the id it names (as an app does): a job that
        # ended before its row existed would wait for a sweep.
        done_rq = str(uuid.uuid4())
        done = insert_job(pg_dsn, done_rq, status="queued", started_ago=None)
        enqueue(redis_url, "tests.jobs.succeed", 1, job_id=done_rq)
        wait_status(pg_dsn, done, "completed")
        # A cancel from an app that also goes through the pooler (asyncpg without a statement
        # cache, as PgBouncer needs): the NOTIFY of its INSERT reaches the daemon's direct
        # LISTEN, and the app's own wait (whose NOTIFY the pooler loses) polls.
        run_rq = enqueue(redis_url, "tests.jobs.sleep", 60)
        job = insert_job(pg_dsn, run_rq, status="queued", started_ago=None)
        wait_until(lambda: rq_status(redis_url, run_rq) == "started", 20, "started")

        async def app_cancels() -> Any:
            app = await asyncpg.create_pool(pooled, min_size=1, max_size=2, statement_cache_size=0)
            try:
                return await cancel_async(app, job, reason="through pgbouncer", wait=30)
            finally:
                await app.close()

        out = asyncio.run(app_cancels())
        assert (out.outcome, out.as_dict()["horse_signals"]) == ("cancelled", ["SIGTERM"])
        assert wait_status(pg_dsn, job, "cancelled")
        # A sweep from the CLI, through the pooler, with its lock on a session of its own.
        p = run_cli(cfg, "sweep")
        assert p.returncode == 0, p.stdout + p.stderr
        assert daemon.stop() == 0
    finally:
        pool.stop_all()
        daemon.close()
    errors = [e for e in daemon.log_events() if e.get("level") == "error"]
    assert errors == [] and "prepared statement" not in daemon.log_text()


def test_the_sweep_lock_excludes_across_pooled_stores(tmp_path: Path, redis_url: str,
                                                      pg_dsn: str, bouncer: PgBouncer) -> None:
    """Two replicas behind one pooler: one sweeps at a time. (Through the pooler itself the
    session lock would stay on a server connection the next client gets: with 2 server
    connections, holding it once let a second taker in, or locked everyone out.)"""
    path = write_config(tmp_path / "config.toml", redis_url, via(bouncer, pg_dsn),
                        postgres={"pooler": "transaction", "listen_dsn": pg_dsn})
    migrate(path)
    cfg = load(str(path))

    async def two_replicas() -> list[bool]:
        a, b = Store(cfg), Store(cfg)
        await a.connect()
        await b.connect()
        try:
            seen = []
            async with a.sweep_lock() as got_a:
                seen.append(got_a)
                for _ in range(4):  # whichever server connection the pooler hands out
                    async with b.sweep_lock() as got_b:
                        seen.append(got_b)
            async with b.sweep_lock() as got_b:
                seen.append(got_b)
            return seen
        finally:
            await a.close()
            await b.close()

    assert asyncio.run(two_replicas()) == [True, False, False, False, False, True]
