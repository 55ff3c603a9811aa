"""`migrate --print-sql` from the config alone: no connection is made (the database named
does not exist), and what it prints, run by a DBA, gives the schema `migrate` would make;
a guard stops it when the id column is not of the type it was printed for."""

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
    assert "made from" in sql and "(no connection)" in sql
    assert 'job_id        bigint NOT NULL REFERENCES "training_jobs" ("id")' in sql
    assert '-- CREATE INDEX CONCURRENTLY IF NOT EXISTS "training_jobs_rq_job_id_idx"' in sql
    with Pg(pg_dsn) as pg:
        pg.execute(sql)  # one simple-protocol script: one transaction, as psql -1 runs it
    # `migrate` against what the DBA made: nothing left to do.
    cfg = write_config(tmp_path / "c.toml", NOWHERE_REDIS, pg_dsn)
    p = run_cli(cfg, "migrate")
    assert p.returncode == 0, p.stderr
    assert "were up to date (v3); nothing changed" in p.stderr


def test_the_guard_stops_a_script_printed_for_another_id_type(tmp_path: Path, pg_dsn: str) -> None:
    with Pg(pg_dsn) as pg:
        pg.execute("CREATE TABLE runs (run_id uuid PRIMARY KEY, rq_job_id text, status text, "
                   "error_message text, started_at timestamptz, completed_at timestamptz)")
    jobs = {"table": "runs", "id_column": "run_id"}
    wrong = printed(tmp_path, jobs=jobs)
    with Pg(pg_dsn) as pg:
        with pytest.raises(asyncpg.RaiseError,
                           match=r"runs\.run_id is uuid, not bigint: print the SQL again with "
                                 r"--id-type 'uuid'"):
            pg.execute(wrong)
        assert pg.val("SELECT to_regclass('rq_reconciler_cancel_requests')") is None  # nothing made
        pg.execute(printed(tmp_path, "--id-type", "uuid", jobs=jobs))
        assert pg.val("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                      "attrelid = 'rq_reconciler_cancel_requests'::regclass AND attname = 'job_id'"
                      ) == "uuid"


def test_id_type_is_checked_and_goes_only_with_print_sql(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", NOWHERE_REDIS, "postgresql://postgres@127.0.0.1:1/x")
    p = run_cli(cfg, "migrate", "--print-sql", "--id-type", "uuid; DROP TABLE x")
    assert p.returncode == 2 and "is not a type name" in p.stderr
    p = run_cli(cfg, "migrate", "--id-type", "uuid")
    assert p.returncode == 2 and "--id-type goes with --print-sql" in p.stderr
    assert "character varying(64)" in printed(tmp_path, "--id-type", "character varying(64)")
