"""README's "Integrating it", run as written: its shell steps (the site's values and the
`systemctl` line aside) install the package with pip into a fresh venv under /opt, write
/etc/rq-reconciler, grant, migrate, grant, check and install the unit; then the daemon starts as
the unit would start it, and the README's SQL and Python cancel runs of the app's own
table: schema-qualified, uuid ids, status words of its own. The daemon and the app each
connect as a role of their own that is no superuser and holds only what `--print-grants`
gave it.

The steps run as root in a mount namespace of their own, with overlays on /etc, /opt and
/usr/local: they write where the README says, and the machine keeps none of it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from reconciler import client
from reconciler.devstack import (
    REPO_ROOT,
    DaemonProc,
    Pg,
    WorkerPool,
    enqueue,
    tmp_base,
    wait_until,
)

README = REPO_ROOT / "README.md"
OVERLAID = ("/etc", "/opt", "/usr/local")
NOT_RUN = "# not run by the test"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("psql") is None,
    reason="needs root (mount namespace, overlays), unshare(1) and psql")


def blocks(lang: str) -> list[str]:
    """The fenced `lang` blocks of README's "Integrating it" section, in order."""
    text = README.read_text()
    section = text[text.index("\n## Integrating it"):text.index("\n## Commands")]
    return re.findall(rf"^```{lang}\n(.*?)^```$", section, flags=re.S | re.M)


@pytest.fixture
def app_role(pg_dsn: str) -> Iterator[str]:
    role = f"web_app_{uuid.uuid4().hex[:8]}"
    with Pg(pg_dsn) as pg:
        pg.execute(f'CREATE ROLE "{role}" LOGIN')
    yield role
    with Pg(pg_dsn) as pg:
        pg.execute(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')


@pytest.fixture
def daemon_role(pg_dsn: str) -> Iterator[str]:
    """The daemon's login role: no superuser, nothing granted but what the README grants."""
    role = f"rq_reconciler_{uuid.uuid4().hex[:8]}"
    with Pg(pg_dsn) as pg:
        pg.execute(f'CREATE ROLE "{role}" LOGIN')
    yield role
    with Pg(pg_dsn) as pg:
        pg.execute(f'DROP OWNED BY "{role}" CASCADE; DROP ROLE "{role}"')


def as_role(dsn: str, role: str) -> str:
    return dsn.replace("postgresql://postgres@", f"postgresql://{role}@")


def test_readme_integration_steps_as_written(tmp_path: Path, redis_url: str, pg_dsn: str,
                                            app_role: str, daemon_role: str) -> None:
    sh, sql, python = blocks("sh"), blocks("sql"), blocks("python")
    assert len(sh) >= 5 and len(sql) == 2 and len(python) == 1
    site, steps = sh[0], sh[1:]
    # the block the test replaces
    assert all(f"{v}=" in site for v in ("RQR_PACKAGE", "PG_DSN", "DBA_DSN", "APP_ROLE"))
    # The app's table, created by the README's own statement.
    with Pg(pg_dsn) as pg:
        pg.execute("CREATE SCHEMA app")
        pg.execute(sql[0])

    # The script: the README's steps, run in a namespace where they cannot touch the host.
    work = Path(tempfile.mkdtemp(prefix="readme-", dir=tmp_base()))  # tmpfs: overlay upper dirs
    shim = work / "shim"
    shim.mkdir()
    (shim / "sudo").write_text('#!/bin/sh\nexec "$@"\n')  # root already; no sudo installed
    (shim / "sudo").chmod(0o755)
    mounts = "\n".join(
        f"mkdir -p {work}/up{d} {work}/work{d}\n"
        f"mount -t overlay overlay -o lowerdir={d},upperdir={work}/up{d},workdir={work}/work{d} {d}"
        for d in OVERLAID)
    readme = "\n".join(
        "\n".join(line for line in block.splitlines() if NOT_RUN not in line) for block in steps)
    script = f"""set -euo pipefail
{mounts}
export PATH={shim}:$PATH
# As an operator's shell: not in the repo, no repo on the import path (the test harness
# puts it there); what runs must be what pip installed.
cd /
unset PYTHONPATH
RQR_PACKAGE={shlex.quote(str(REPO_ROOT))}
PG_DSN={shlex.quote(as_role(pg_dsn, daemon_role))}
DBA_DSN={shlex.quote(pg_dsn)}
REDIS_URL={shlex.quote(redis_url)}
APP_ROLE={shlex.quote(app_role)}
RQ_USER=root
echo "== README steps"
{readme}
echo "== after the README: what the test looks at, then the daemon as the unit starts it"
rq-reconciler migrate --print-sql > {work}/print-sql.sql
systemd-analyze verify /etc/systemd/system/rq-reconciler.service
test "$(readlink -f /usr/local/bin/rq-reconciler)" = /opt/rq-reconciler/bin/rq-reconciler
/opt/rq-reconciler/bin/python -c 'import reconciler as r, sys; sys.exit("/site-packages/" not in r.__file__)'
set -a; . /etc/rq-reconciler/env; set +a
exec $(sed -n 's/^ExecStart=//p' /etc/systemd/system/rq-reconciler.service)
"""
    (work / "steps.sh").write_text(script)
    daemon = DaemonProc(tmp_path / "unused.toml", tmp_path / "steps.log",
                        argv=["unshare", "--mount", "--propagation", "private", "bash",
                              str(work / "steps.sh")])
    pool = WorkerPool(redis_url, log_dir=tmp_path)
    try:
        daemon.start(timeout=600)  # pip builds and installs the package first
        out = daemon.log_text()
        assert re.search(r'migrate: created rq-reconciler\'s tables in schema "app" \(v\d+\): '
                         r"app\.rq_reconciler_cancel_requests, .*app\.rq_reconciler_schema", out), out
        assert "migrate: note:" not in out  # nothing landed away from the app's table
        checks = [ln for ln in out.splitlines() if re.match(r"(OK|WARN|FAIL) ", ln)]
        assert checks and not [ln for ln in checks if ln.startswith("FAIL")], out
        # Every index `check` asks for is in the SQL a DBA gets.
        print_sql = (work / "print-sql.sql").read_text()
        asked = re.findall(r'CREATE INDEX CONCURRENTLY IF NOT EXISTS ("[^"]+")', out)
        assert all(name in print_sql for name in asked), (asked, print_sql[-2000:])
        with Pg(pg_dsn) as pg:
            schemas = {r["schemaname"] for r in pg.fetch(
                "SELECT schemaname FROM pg_tables WHERE tablename LIKE 'rq_reconciler_%'")}
            owners = {r["tableowner"] for r in pg.fetch(
                "SELECT tableowner FROM pg_tables WHERE tablename LIKE 'rq_reconciler_%'")}
        assert schemas == {"app"}
        assert owners == {daemon_role}  # the daemon's role owns its tables, and no more

        # The app, as README's "what your app writes" says: the row first, then the job.
        pool.start(), pool.start()  # the two long runs at once
        runs = {}
        for name, seconds in (("short", 0.2), ("by-sql", 120.0), ("by-client", 120.0)):
            run_id, rq_id = uuid.uuid4(), str(uuid.uuid4())
            with Pg(pg_dsn) as pg:
                pg.execute("INSERT INTO app.ml_runs (run_id, name, state, rq_job_id) "
                           "VALUES ($1, $2, 'waiting', $3)", run_id, name, rq_id)
            enqueue(redis_url, "tests.jobs.sleep", seconds, job_id=rq_id)
            runs[name] = run_id

        def state(name: str) -> dict[str, Any]:
            with Pg(pg_dsn) as pg:
                return dict(pg.fetch("SELECT * FROM app.ml_runs WHERE run_id = $1", runs[name])[0])

        wait_until(lambda: state("short")["state"] == "done", 30, "the short run done")
        done = state("short")
        assert done["note"] == "Synced: RQ finished" and done["finished_at"] is not None
        for name in ("by-sql", "by-client"):
            wait_until(lambda n=name: state(n)["state"] == "training", 30, f"{name} training")
            assert state(name)["started_at"] is not None

        # README's SQL, as the app's role (with the running job's id for the example's).
        literal = re.search(r"'([0-9a-f-]{36})'", sql[1])
        assert literal is not None
        insert = sql[1].replace(literal.group(1), str(runs["by-sql"]))

        async def app_inserts() -> None:
            conn = await asyncpg.connect(as_role(pg_dsn, app_role))
            try:
                await conn.execute(insert)
            finally:
                await conn.close()

        asyncio.run(app_inserts())
        with Pg(pg_dsn) as pg:
            rid = pg.val("SELECT id FROM app.rq_reconciler_cancel_requests WHERE job_id = $1",
                         runs["by-sql"])
        with Pg(pg_dsn) as pg:
            wait_until(lambda: pg.val("SELECT state FROM app.rq_reconciler_cancel_requests "
                                      "WHERE id = $1", rid) == "done", 30, "the SQL cancel done")
            outcome = pg.val("SELECT outcome FROM app.rq_reconciler_cancel_requests WHERE id = $1", rid)
        assert outcome == "cancelled" and state("by-sql")["state"] == "stopped"
        assert state("by-sql")["note"] == "Cancelled: web:alice / clicked Cancel"

        # README's Python, as the app (psycopg 3, the app's role).
        with psycopg.connect(as_role(pg_dsn, app_role)) as conn:
            scope: dict[str, Any] = {"conn": conn, "run_id": runs["by-client"]}
            before = client.configure()
            try:
                exec(python[0], scope)  # README's snippet, run as written
            finally:  # it configures the client once, for the process: put it back
                client.configure(requests_table=before.requests_table, channel=before.channel)
        assert scope["out"].outcome == "cancelled" and scope["out"].success
        assert state("by-client")["state"] == "stopped"
        assert daemon.stop() == 0
    finally:
        pool.stop_all()
        daemon.close()
        shutil.rmtree(work, ignore_errors=True)
