"""The daemon's role holds exactly what it uses (issue 24): USAGE on the jobs table's schema,
SELECT on the table, UPDATE of the columns it writes, REFERENCES on the id (the request
table's foreign key) and its own tables, which it owns. `migrate --print-grants` prints
that; `migrate`, `check` and `run` say in one line which GRANT is missing; a privilege
revoked, a column renamed or retyped while the daemon runs ends it with exit 2 and one
line. Real PostgreSQL, real login roles (not superusers) holding only the printed grants.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from reconciler.devstack import (
    DaemonProc,
    Pg,
    WorkerPool,
    enqueue,
    insert_job,
    pid_alive,
    request_cancel,
    row,
    run_cli,
    wait_request,
    wait_status,
    wait_until,
    write_config,
)

JOBS = "ml.training_jobs"
QJOBS = '"ml"."training_jobs"'
REQ = "ml.rq_reconciler_cancel_requests"


def as_role(dsn: str, role: str) -> str:
    u = urlsplit(dsn)
    return urlunsplit(u._replace(netloc=f"{role}@{u.hostname}:{u.port}"))


def in_ml(dsn: str) -> str:
    """`dsn` with schema ml first on its search_path: the devstack helpers' unqualified
    names (training_jobs, rq_reconciler_cancel_requests) are then the ones in ml."""
    return f"{dsn}?search_path=ml"


def new_role(pg_dsn: str, prefix: str) -> str:
    role = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with Pg(pg_dsn) as pg:
        pg.execute(f'CREATE ROLE "{role}" LOGIN')
    return role


def drop_role(pg_dsn: str, role: str) -> None:
    with Pg(pg_dsn) as pg:
        pg.execute(f'DROP OWNED BY "{role}" CASCADE; DROP ROLE "{role}"')


@pytest.fixture
def daemon_role(pg_dsn: str) -> Iterator[str]:
    """A login role with no privileges at all; the app's jobs table in schema ml, owned by
    the superuser (the app's owner here)."""
    with Pg(pg_dsn) as pg:
        pg.execute("CREATE SCHEMA ml")
        pg.execute("CREATE TABLE ml.training_jobs (id bigserial PRIMARY KEY, "
                   "name text NOT NULL DEFAULT 'job', rq_job_id text, "
                   "status text NOT NULL DEFAULT 'queued', error_message text, "
                   "created_at timestamptz NOT NULL DEFAULT now(), started_at timestamptz, "
                   "completed_at timestamptz)")
        pg.execute("CREATE INDEX ON ml.training_jobs (rq_job_id)")
    role = new_role(pg_dsn, "rqr_daemon")
    yield role
    drop_role(pg_dsn, role)


def config(tmp_path: Path, redis_url: str, dsn: str, name: str = "d.toml", **extra: Any) -> Path:
    sections: dict[str, Any] = {"jobs": {"table": JOBS}, **extra}
    sections["cancel"] = {"requests_table": REQ, **extra.get("cancel", {})}
    return write_config(tmp_path / name, redis_url, dsn, **sections)


def grant_printed(cfg: Path, pg_dsn: str, *app_role: str) -> str:
    p = run_cli(cfg, "migrate", "--print-grants", *app_role)
    assert p.returncode == 0, p.stderr
    with Pg(pg_dsn) as pg:
        pg.execute(p.stdout)
    return p.stdout


def migrated_as(tmp_path: Path, redis_url: str, pg_dsn: str, role: str, **extra: Any) -> Path:
    cfg = config(tmp_path, redis_url, as_role(pg_dsn, role), **extra)
    grant_printed(cfg, pg_dsn)
    p = run_cli(cfg, "migrate")
    assert p.returncode == 0, p.stderr
    return cfg


def schema_error_lines(log: str) -> list[str]:
    out = []
    for line in log.splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "schema_error":
            out.append(json.loads(line)["error"])
    return out


def run_until_exit(cfg: Path, timeout: float = 60) -> tuple[int, str]:
    p = run_cli(cfg, "run", timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def test_print_grants_needs_no_connection_and_names_both_roles(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", "redis://127.0.0.1:1/0",
                       "postgresql://rq_reconciler@127.0.0.1:1/app",
                       jobs={"table": JOBS, "completed_at_column": ""},
                       cancel={"requests_table": REQ})
    p = run_cli(cfg, "migrate", "--print-grants", "web_app")
    assert p.returncode == 0, p.stderr
    stmts = [ln for ln in p.stdout.splitlines() if not ln.startswith("--")]
    assert stmts == [
        'GRANT USAGE, CREATE ON SCHEMA "ml" TO "rq_reconciler";',
        'GRANT SELECT, UPDATE ("status", "error_message", "started_at"), REFERENCES ("id") '
        f'ON {QJOBS} TO "rq_reconciler";',
        "",
        'GRANT USAGE ON SCHEMA "ml" TO "web_app";',
        'GRANT INSERT (job_id, requested_by, reason) ON "ml"."rq_reconciler_cancel_requests" '
        'TO "web_app";',
        'GRANT USAGE ON SEQUENCE "ml"."rq_reconciler_cancel_requests_id_seq" TO "web_app";',
        "GRANT SELECT (id, job_id, requested_at, requested_by, reason, state, outcome, detail, "
        'done_at) ON "ml"."rq_reconciler_cancel_requests" TO "web_app";',
    ]
    p = run_cli(cfg, "migrate", "--print-sql")
    assert p.returncode == 0, p.stderr
    assert 'REFERENCES "ml"."training_jobs" ("id")' in p.stdout


def test_migrate_as_a_role_without_usage_or_references_names_the_grants(
        tmp_path: Path, redis_url: str, pg_dsn: str, daemon_role: str) -> None:
    r = f'"{daemon_role}"'
    cfg = config(tmp_path, redis_url, as_role(pg_dsn, daemon_role))
    p = run_cli(cfg, "migrate")
    assert p.returncode == 1
    [line] = p.stderr.splitlines()
    assert line.startswith(f"rq-reconciler: migrate as role {r}: it lacks USAGE on schema ml"), line
    assert line.endswith(f'GRANT USAGE ON SCHEMA "ml" TO {r}; GRANT CREATE ON SCHEMA "ml" TO {r}; '
                         f'GRANT REFERENCES ("id") ON {QJOBS} TO {r};'), line

    with Pg(pg_dsn) as pg:
        pg.execute(f'GRANT USAGE, CREATE ON SCHEMA ml TO {r}; GRANT SELECT ON {JOBS} TO {r}')
    p = run_cli(cfg, "migrate")
    assert p.returncode == 1
    [line] = p.stderr.splitlines()
    assert "USAGE" not in line and line.endswith(f'GRANT REFERENCES ("id") ON {QJOBS} TO {r};')

    grant_printed(cfg, pg_dsn)
    p = run_cli(cfg, "migrate")
    assert p.returncode == 0, p.stderr
    with Pg(pg_dsn) as pg:
        owners = {rec["tableowner"] for rec in pg.fetch(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'ml' "
            "AND tablename LIKE 'rq_reconciler_%'")}
    assert owners == {daemon_role}


# What is taken away, and the GRANT `check` and `run` must name for it.
REVOKED = {
    "usage": ("REVOKE USAGE ON SCHEMA ml FROM {r}", 'GRANT USAGE ON SCHEMA "ml" TO {r};'),
    "select": ("REVOKE SELECT ON ml.training_jobs FROM {r}", f"GRANT SELECT ON {QJOBS} TO {{r}};"),
    **{col: (f"REVOKE UPDATE ({col}) ON ml.training_jobs FROM {{r}}",
             f'GRANT UPDATE ("{col}") ON {QJOBS} TO {{r}};')
       for col in ("status", "error_message", "started_at", "completed_at")},
}


@pytest.mark.parametrize("lacking", list(REVOKED))
def test_each_missing_privilege_is_named_by_check_and_run(
        tmp_path: Path, redis_url: str, pg_dsn: str, daemon_role: str, lacking: str) -> None:
    r = f'"{daemon_role}"'
    cfg = migrated_as(tmp_path, redis_url, pg_dsn, daemon_role)
    p = run_cli(cfg, "check")
    assert p.returncode == 0, p.stdout
    assert f"OK   privileges: role {r} holds what the daemon uses" in p.stdout

    revoke, grant = (s.format(r=r) for s in REVOKED[lacking])
    with Pg(pg_dsn) as pg:
        pg.execute(revoke)
    p = run_cli(cfg, "check")
    assert p.returncode == 1, p.stdout
    assert "Traceback" not in p.stdout + p.stderr
    fails = [ln for ln in p.stdout.splitlines() if ln.startswith("FAIL")]
    assert fails and all(ln.startswith("FAIL privileges: ") for ln in fails), p.stdout
    assert fails[0].endswith(f"Fix: {grant}"), fails
    assert "OK   redis" in p.stdout  # the other checks still ran and said so

    rc, out = run_until_exit(cfg)
    assert rc == 2, out
    assert "Traceback" not in out
    [said] = schema_error_lines(out)
    assert said.startswith(f"privileges: role {r} lacks ") and said.endswith(f"Fix: {grant}"), said

    with Pg(pg_dsn) as pg:
        pg.execute(grant)  # what check printed, as the DBA runs it
    assert run_cli(cfg, "check").returncode == 0


def test_check_without_usage_on_the_schema_prints_every_line_and_no_traceback(
        tmp_path: Path, redis_url: str, pg_dsn: str, daemon_role: str) -> None:
    cfg = config(tmp_path, redis_url, as_role(pg_dsn, daemon_role))
    p = run_cli(cfg, "check")
    assert p.returncode == 1
    assert "Traceback" not in p.stdout + p.stderr and not p.stderr.strip(), p.stderr
    r = f'"{daemon_role}"'
    assert f'FAIL privileges: role {r} lacks USAGE on schema ml (to find ml.training_jobs). ' \
           f'Fix: GRANT USAGE ON SCHEMA "ml" TO {r};' in p.stdout
    for what in ("OK   config", "OK   redis", "OK   postgres", "postgres listen", "metrics"):
        assert what in p.stdout, (what, p.stdout)


def _daemon(tmp_path: Path, cfg: Path, name: str = "d") -> DaemonProc:
    return DaemonProc(cfg, tmp_path / f"{name}.log", name=name).start(timeout=60)


def _exits(d: DaemonProc, timeout: float = 30) -> int:
    assert d.proc is not None
    try:
        return d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running:\n{d.log_text()[-3000:]}") from None


MID_RUN = {
    # what changes under the running daemon, and what its one line says
    "renamed": ("ALTER TABLE ml.training_jobs RENAME COLUMN status TO state",
                "jobs.status_column: column 'status' not found in ml.training_jobs"),
    "enum": ("CREATE TYPE ml.job_state AS ENUM ('queued', 'running', 'completed', 'failed', "
             "'cancelled'); ALTER TABLE ml.training_jobs ALTER COLUMN status DROP DEFAULT, "
             "ALTER COLUMN status TYPE ml.job_state USING status::ml.job_state",
             "jobs.status_column: column 'status' is an enum ml.job_state; expected one of "),
    "revoked": ("REVOKE UPDATE (status) ON ml.training_jobs FROM {r}",
                "privileges: role {r} lacks UPDATE of status on ml.training_jobs"),
}


@pytest.mark.parametrize("change", list(MID_RUN))
def test_a_schema_changed_under_the_running_daemon_ends_it_with_exit_2_in_one_line(
        tmp_path: Path, redis_url: str, pg_dsn: str, daemon_role: str, change: str) -> None:
    r = f'"{daemon_role}"'
    cfg = migrated_as(tmp_path, redis_url, pg_dsn, daemon_role,
                      sweep={"min_age_seconds": 0.0, "interval_seconds": 300.0})
    d = _daemon(tmp_path, cfg)
    try:
        jid = insert_job(pg_dsn, uuid.uuid4().hex, status="running", table=JOBS)
        with Pg(pg_dsn) as pg:
            before = pg.val("SELECT count(*) FROM ml.rq_reconciler_events")
        alter, said = (s.format(r=r) for s in MID_RUN[change])
        with Pg(pg_dsn) as pg:
            pg.execute(alter)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)  # a sweep now: it reads the row and fails it
        assert _exits(d) == 2
        log = d.log_text()
        assert "Traceback" not in log, log[-3000:]
        lines = schema_error_lines(log)
        assert len(lines) == 1 and lines[0].startswith(said), lines
        with Pg(pg_dsn) as pg:  # nothing was written
            assert pg.val("SELECT count(*) FROM ml.rq_reconciler_events") == before
            assert pg.val(f"SELECT error_message FROM {JOBS} WHERE id = $1", jid) is None
    finally:
        d.close()


def test_the_whole_story_with_only_the_printed_grants(
        tmp_path: Path, redis_url: str, pg_dsn: str, daemon_role: str) -> None:
    """Two roles, each holding only what `--print-grants` gives it: the daemon syncs a job
    that finished, carries out the app's cancel of a running one, and fails the job of a
    worker that was killed."""
    app = new_role(pg_dsn, "web_app")
    pool = WorkerPool(redis_url, log_dir=tmp_path)
    d = None
    try:
        cfg = migrated_as(tmp_path, redis_url, pg_dsn, daemon_role,
                          cancel={"grace_seconds": 1.0})
        grant_printed(cfg, pg_dsn, app)
        p = run_cli(cfg, "check")
        assert p.returncode == 0 and "FAIL" not in p.stdout, p.stdout
        d = _daemon(tmp_path, cfg)
        w1, w2 = pool.start(), pool.start()
        rq = {k: uuid.uuid4().hex for k in ("short", "cancel", "orphan")}
        ids = {k: insert_job(pg_dsn, v, status="queued", started_ago=None, table=JOBS)
               for k, v in rq.items()}
        enqueue(redis_url, "tests.jobs.sleep", 0.2, job_id=rq["short"])
        ml = in_ml(pg_dsn)
        assert wait_status(ml, ids["short"], "completed")["error_message"] == "Synced: RQ finished"
        enqueue(redis_url, "tests.jobs.sleep", 120, job_id=rq["cancel"])
        enqueue(redis_url, "tests.jobs.sleep", 120, job_id=rq["orphan"])
        wait_status(ml, ids["cancel"], "running")
        wait_status(ml, ids["orphan"], "running")

        rid = request_cancel(in_ml(as_role(pg_dsn, app)), ids["cancel"], by="web:alice",
                             reason="clicked Cancel")
        assert wait_request(ml, rid)["outcome"] == "cancelled"
        assert row(ml, ids["cancel"])["status"] == "cancelled"

        victim = w1 if w1.current_job_id() == rq["orphan"] else w2
        horse = victim.wait_horse()
        victim.kill(signal.SIGKILL)
        r = wait_status(ml, ids["orphan"], "failed")
        assert r["error_message"].startswith(f"Orphaned: worker {victim.name} is gone")
        wait_until(lambda: not pid_alive(horse), 15, what="the orphaned horse stopped")
        assert d.stop() == 0
        assert "Traceback" not in d.log_text()
    finally:
        if d is not None:
            d.close()
        pool.stop_all()
        drop_role(pg_dsn, app)
