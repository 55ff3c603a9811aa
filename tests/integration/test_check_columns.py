"""`check` on a jobs table whose text columns have a length limit: it says so."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

from tests.support import run_cli, write_config


async def alter(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def lines(out: str, what: str) -> list[str]:
    return [ln for ln in out.splitlines() if f" {what}: " in ln]


async def test_varchar_error_column_is_reported_as_clipped_not_failed(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    assert run_cli(cfg, "migrate").returncode == 0
    p = run_cli(cfg, "check")
    assert lines(p.stdout, "jobs.error_column") == ["OK   jobs.error_column: error_message (text)"]

    await alter(pg_dsn, "ALTER TABLE training_jobs ALTER COLUMN error_message TYPE varchar(200)")
    p = run_cli(cfg, "check")
    assert p.returncode == 0, p.stdout
    [line] = lines(p.stdout, "jobs.error_column")
    assert line.startswith("OK   jobs.error_column: error_message (character varying(200)): ")
    assert "clipped to 200" in line


async def test_status_column_too_short_for_a_status_word_fails(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    assert run_cli(cfg, "migrate").returncode == 0
    await alter(pg_dsn, "ALTER TABLE training_jobs ALTER COLUMN status TYPE varchar(8)")
    p = run_cli(cfg, "check")
    assert p.returncode == 1, p.stdout
    [line] = lines(p.stdout, "jobs.status_column")
    assert line.startswith("FAIL jobs.status_column: status (character varying(8)) cannot hold "
                           "'completed', 'cancelled'")
    await alter(pg_dsn, "ALTER TABLE training_jobs ALTER COLUMN status TYPE varchar(9)")
    p = run_cli(cfg, "check")
    assert p.returncode == 0, p.stdout
    assert lines(p.stdout, "jobs.status_column") == [
        "OK   jobs.status_column: status (character varying(9))"]


async def test_a_domain_over_varchar_is_judged_by_its_base_type(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    assert run_cli(cfg, "migrate").returncode == 0
    await alter(pg_dsn, "CREATE DOMAIN short_text AS varchar(120); "
                        "ALTER TABLE training_jobs ALTER COLUMN error_message TYPE short_text")
    p = run_cli(cfg, "check")
    assert p.returncode == 0, p.stdout
    [line] = lines(p.stdout, "jobs.error_column")
    assert "(character varying(120))" in line and "clipped to 120" in line


async def test_an_enum_status_column_fails_check_and_run_refuses_to_start(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    """The daemon compares and writes its status words as text: an enum column fails its
    statements (`operator does not exist: job_state = text`). `check` says so, and `run`
    exits 2 at start-up with the same line, not a traceback at the first event."""
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    assert run_cli(cfg, "migrate").returncode == 0
    await alter(pg_dsn, "CREATE TYPE job_state AS ENUM ('queued', 'running', 'completed', "
                        "'failed', 'cancelled'); ALTER TABLE training_jobs ALTER COLUMN status "
                        "DROP DEFAULT, ALTER COLUMN status TYPE job_state USING status::job_state")
    p = run_cli(cfg, "check")
    assert p.returncode == 1, p.stdout
    [line] = lines(p.stdout, "jobs.status_column")
    assert line.startswith("FAIL jobs.status_column: column 'status' is an enum job_state; "
                           "expected one of "), line
    p = run_cli(cfg, "run", timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    said = [json.loads(ln)["error"] for ln in p.stdout.splitlines()
            if ln.startswith("{") and json.loads(ln).get("event") == "schema_error"]
    assert said == [line.removeprefix("FAIL ")], said
