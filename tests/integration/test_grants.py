"""Who may cancel is a database privilege: `migrate` makes our tables owner-only and
`migrate --print-grants ROLE` prints exactly what an application role needs. Real
PostgreSQL, a real login role given exactly the printed grants."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from reconciler import migrations
from reconciler.config import from_mapping
from reconciler.migrations import SCHEMA_VERSION
from tests.support import run_cli, write_config

DUMMY_REDIS = "redis://127.0.0.1:1/0"  # migrate and cancel never talk to Redis
REQ = "rq_reconciler_cancel_requests"


def as_role(dsn: str, role: str) -> str:
    u = urlsplit(dsn)
    return urlunsplit(u._replace(netloc=f"{role}@{u.hostname}:{u.port}"))


@pytest.fixture
async def app_role(pg_dsn: str) -> AsyncIterator[str]:
    """A fresh login role with no privileges at all; dropped afterwards."""
    role = f"rqr_app_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE ROLE "{role}" LOGIN')
        yield role
        await conn.execute(f'DROP OWNED BY "{role}"')
        await conn.execute(f'DROP ROLE "{role}"')
    finally:
        await conn.close()


async def new_job(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "INSERT INTO training_jobs (status) VALUES ('running') RETURNING id"))
    finally:
        await conn.close()


def migrate_and_grant(tmp_path: Path, pg_dsn: str, role: str) -> str:
    cfg = write_config(tmp_path / "config.toml", DUMMY_REDIS, pg_dsn)
    p = run_cli(cfg, "migrate")
    assert p.returncode == 0, p.stderr
    p = run_cli(cfg, "migrate", "--print-grants", role)
    assert p.returncode == 0, p.stderr
    return p.stdout


async def test_printed_grants_let_an_app_request_a_cancel_and_nothing_more(
        tmp_path: Path, pg_dsn: str, app_role: str) -> None:
    grants = await asyncio.to_thread(migrate_and_grant, tmp_path, pg_dsn, app_role)
    assert f"GRANT INSERT (job_id, requested_by, reason) ON \"{REQ}\" TO \"{app_role}\";" in grants
    assert f"GRANT USAGE ON SEQUENCE \"{REQ}_id_seq\" TO \"{app_role}\";" in grants
    owner = await asyncpg.connect(pg_dsn)
    app = None
    try:
        # Before the grants the app can do nothing at all.
        app = await asyncpg.connect(as_role(pg_dsn, app_role))
        job = await new_job(pg_dsn)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute(f"INSERT INTO {REQ} (job_id) VALUES ($1)", job)

        await owner.execute(grants)
        heard: asyncio.Queue[str] = asyncio.Queue()
        await owner.add_listener("rq_reconciler_cancel", lambda *a: heard.put_nowait(a[3]))

        # The app's whole integration is one statement.
        rid = await app.fetchval(
            f"INSERT INTO {REQ} (job_id, reason) VALUES ($1, 'clicked Cancel') RETURNING id", job)
        rec = await owner.fetchrow(f"SELECT * FROM {REQ} WHERE id = $1", rid)
        assert rec["requested_by"] == app_role  # defaults to current_user
        assert rec["state"] == "pending" and rec["reason"] == "clicked Cancel"
        # The trigger fired under the app's role: no SECURITY DEFINER needed.
        assert await asyncio.wait_for(heard.get(), 5) == str(rid)
        # Saying who clicked is allowed.
        rid2 = await app.fetchval(
            f"INSERT INTO {REQ} (job_id, requested_by) VALUES ($1, 'web:alice') RETURNING id", job)
        assert await owner.fetchval(f"SELECT requested_by FROM {REQ} WHERE id = $1", rid2) == "web:alice"
        # It reads its outcome.
        await owner.execute(f"UPDATE {REQ} SET state = 'done', outcome = 'cancelled', "
                            "detail = '{\"success\": true}', done_at = now() WHERE id = $1", rid)
        got = await app.fetchrow(f"SELECT id, job_id, requested_at, requested_by, reason, state, "
                                 f"outcome, detail, done_at FROM {REQ} WHERE id = $1", rid)
        assert got["outcome"] == "cancelled" and got["state"] == "done"

        # ... and writes nothing the daemon owns.
        for col, value in (("state", "done"), ("outcome", "cancelled"), ("claimed_by", "me")):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute(f"INSERT INTO {REQ} (job_id, {col}) VALUES ($1, $2)", job, value)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute(f"UPDATE {REQ} SET {col} = $1 WHERE id = $2", value, rid)
        for stmt in (f"DELETE FROM {REQ}",
                     f"SELECT claimed_by FROM {REQ}",
                     "SELECT * FROM rq_reconciler_events",
                     "INSERT INTO rq_reconciler_events (job_id, from_status, to_status, reason, "
                     "actor) VALUES ('1', 'a', 'b', 'c', 'd')",
                     "SELECT * FROM rq_reconciler_first_seen",
                     "SELECT * FROM rq_reconciler_schema"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute(stmt)

        # Running migrate again (an upgrade) keeps the grants a DBA made.
        p = await asyncio.to_thread(run_cli, tmp_path / "config.toml", "migrate")
        assert p.returncode == 0, p.stderr
        await app.fetchval(f"INSERT INTO {REQ} (job_id) VALUES ($1) RETURNING id", job)
    finally:
        if app is not None:
            await app.close()
        await owner.close()


async def test_the_cancel_cli_works_with_only_the_printed_grants(
        tmp_path: Path, pg_dsn: str, app_role: str) -> None:
    """`rq-reconciler cancel` is the app's side: it must need no more than the grants."""
    grants = await asyncio.to_thread(migrate_and_grant, tmp_path, pg_dsn, app_role)
    owner = await asyncpg.connect(pg_dsn)
    try:
        await owner.execute(grants)
        job = await new_job(pg_dsn)
        app_cfg = write_config(tmp_path / "app.toml", DUMMY_REDIS, as_role(pg_dsn, app_role))
        p = await asyncio.to_thread(run_cli, app_cfg, "cancel", str(job), "--reason", "from the app")
        assert p.returncode == 0, p.stdout + p.stderr
        rec = await owner.fetchrow(f"SELECT job_id, reason, state FROM {REQ}")
        assert (rec["job_id"], rec["reason"], rec["state"]) == (job, "from the app", "pending")
    finally:
        await owner.close()


async def test_tables_are_owner_only_even_where_public_had_default_privileges(
        pg_dsn: str, app_role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An install made by v1 (requested_by without a default) in a database whose
    default privileges gave PUBLIC everything: `migrate` takes PUBLIC's grants back."""
    cfg = from_mapping({"postgres": {"dsn": pg_dsn}}, environ={})
    owner = await asyncpg.connect(pg_dsn)
    try:
        await owner.execute("ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO PUBLIC")
        await owner.execute("ALTER DEFAULT PRIVILEGES GRANT ALL ON SEQUENCES TO PUBLIC")
        with monkeypatch.context() as m:
            m.setattr(migrations, "MIGRATIONS", ("001_initial.sql",))
            m.setattr(migrations, "SCHEMA_VERSION", 1)
            await migrations.migrate(cfg)
        assert await owner.fetchval(
            "SELECT column_default FROM information_schema.columns "
            "WHERE table_name = $1 AND column_name = 'requested_by'", REQ) is None
        assert await owner.fetchval("SELECT has_table_privilege($1, $2, 'INSERT')",
                                    app_role, REQ) is True  # through PUBLIC

        await migrations.migrate(cfg)  # the upgrade to v2

        for table in (REQ, "rq_reconciler_events", "rq_reconciler_first_seen",
                      "rq_reconciler_schema"):
            for priv in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                assert await owner.fetchval("SELECT has_table_privilege($1, $2, $3)",
                                            app_role, table, priv) is False, (table, priv)
        for table in (REQ, "rq_reconciler_events"):
            seq = await owner.fetchval("SELECT pg_get_serial_sequence($1, 'id')", table)
            assert await owner.fetchval("SELECT has_sequence_privilege($1, $2, 'USAGE')",
                                        app_role, seq) is False
        assert await owner.fetchval(
            "SELECT column_default FROM information_schema.columns "
            "WHERE table_name = $1 AND column_name = 'requested_by'", REQ) == "CURRENT_USER"
        assert [r["version"] for r in await owner.fetch(
            "SELECT version FROM rq_reconciler_schema ORDER BY version")] == list(
                range(1, SCHEMA_VERSION + 1))
    finally:
        await owner.close()


def test_print_grants_needs_no_tables_nor_server(tmp_path: Path) -> None:
    """Written from the config alone: a DBA gets them before anything exists."""
    cfg = write_config(tmp_path / "config.toml", DUMMY_REDIS, "postgresql://rqr@127.0.0.1:1/x")
    p = run_cli(cfg, "migrate", "--print-grants", "web_app")
    assert p.returncode == 0, p.stderr
    assert f'GRANT INSERT (job_id, requested_by, reason) ON "{REQ}" TO "web_app";' in p.stdout
    assert 'REFERENCES ("id") ON "training_jobs" TO "rqr";' in p.stdout
