"""`migrate --print-sql` from the config alone: no connection is made (the database named
does not exist), and what it prints, run by a DBA, gives the schema `migrate` would make,
with job_id of whatever type the jobs table's id has when the script runs."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from reconciler.devstack import Pg, run_cli, write_config

NOWHERE_REDIS = "redis://127.0.0.1:1/0"


def printed(tmp_path: Path, *extra: str, **sections: dict[str, str]) -> str:
    # Nothing listens on port 1: the SQL comes from the config alone.
    cfg = write_config(tmp_path / "offline.toml", NOWHERE_REDIS,
                       "postgresql://postgres@127.0.0.1:1/nowhere", **sections)
    p = run_cli(cfg, "migrate", "--print-sql", *extra)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    return p.stdout


def test_printed_sql_needs_no_connection_and_makes_what_migrate_makes(
        tmp_path: Path, pg_dsn: str) -> None:
    sql = printed(tmp_path)
    assert "needs no connection" in sql
    assert 'job_id        %s NOT NULL REFERENCES "training_jobs" ("id")' in sql
    assert '-- CREATE INDEX CONCURRENTLY IF NOT EXISTS "training_jobs_rq_job_id_idx"' in sql
    with Pg(pg_dsn) as pg:
        pg.execute(sql)  # one simple-protocol script: one transaction, as psql -1 runs it
    # `migrate` against what the DBA made: nothing left to do.
    cfg = write_config(tmp_path / "c.toml", NOWHERE_REDIS, pg_dsn)
    p = run_cli(cfg, "migrate")
    assert p.returncode == 0, p.stderr
    assert "were up to date (v4); nothing changed" in p.stderr


def test_the_printed_sql_takes_the_id_type_from_the_table(tmp_path: Path, pg_dsn: str) -> None:
    with Pg(pg_dsn) as pg:
        pg.execute("CREATE TABLE runs (run_id uuid PRIMARY KEY, rq_job_id text, status text, "
                   "error_message text, started_at timestamptz, completed_at timestamptz)")
        pg.execute(printed(tmp_path, jobs={"table": "runs", "id_column": "run_id"}))
        assert pg.val("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                      "attrelid = 'rq_reconciler_cancel_requests'::regclass AND attname = 'job_id'"
                      ) == "uuid"


def test_a_script_for_a_table_without_the_id_column_stops_and_makes_nothing(
        tmp_path: Path, pg_dsn: str) -> None:
    with Pg(pg_dsn) as pg:
        with pytest.raises(asyncpg.RaiseError, match=r"jobs table .* has no column"):
            pg.execute(printed(tmp_path, jobs={"table": "training_jobs", "id_column": "nope"}))
        assert pg.val("SELECT to_regclass('rq_reconciler_cancel_requests')") is None


def test_migrate_never_stalls_the_app_behind_a_transaction_on_its_table(
        tmp_path: Path, pg_dsn: str) -> None:
    """The first migrate adds a foreign key to the app's table: waiting behind an app
    transaction there would queue every app write behind it. It gives up and says so."""
    import threading
    import time

    cfg = write_config(tmp_path / "c.toml", NOWHERE_REDIS, pg_dsn)
    holding, release = threading.Event(), threading.Event()

    def app_transaction() -> None:
        with Pg(pg_dsn) as app:
            app.execute("BEGIN")
            app.execute("LOCK TABLE training_jobs IN ROW EXCLUSIVE MODE")  # as an UPDATE takes
            holding.set()
            release.wait(30)
            app.execute("COMMIT")

    t = threading.Thread(target=app_transaction, daemon=True)
    t.start()
    try:
        assert holding.wait(10)
        t0 = time.monotonic()
        p = run_cli(cfg, "migrate")
        assert p.returncode == 1, p.stderr
        assert time.monotonic() - t0 < 20
        assert "waited 5 s for a lock on training_jobs" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        with Pg(pg_dsn) as pg:
            assert pg.val("SELECT to_regclass('rq_reconciler_cancel_requests')") is None
    finally:
        release.set()
        t.join(30)
    p = run_cli(cfg, "migrate")
    assert p.returncode == 0, p.stderr
