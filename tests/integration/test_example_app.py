"""examples/training_api.py, the seed's endpoint on the client, driven over HTTP: uvicorn,
real rq workers and the real daemon as subprocesses, real Redis and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from reconciler.devstack import (
    REPO_ROOT,
    DaemonProc,
    Pg,
    WorkerPool,
    free_port,
    harness_env,
    migrate,
    rq_status,
    wait_until,
    write_config,
)


def call(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextmanager
def serving(tmp_path: Path, redis_url: str, pg_dsn: str, app_env: dict[str, str] | None = None,
            **sections: dict[str, Any]) -> Iterator[str]:
    """The example app under uvicorn (its environment plus `app_env`), the daemon (config
    `sections`) and two rq workers; yields the base URL."""
    cfg = write_config(tmp_path / "config.toml", redis_url, pg_dsn,
                       cancel={"grace_seconds": 10.0, **sections.pop("cancel", {})}, **sections)
    migrate(cfg)
    daemon = DaemonProc(cfg, tmp_path / "daemon.log")
    pool = WorkerPool(redis_url, log_dir=tmp_path)
    port = free_port()
    (tmp_path / "checkpoints").mkdir()
    env = harness_env({"DATABASE_URL": pg_dsn, "REDIS_URL": redis_url,
                       "CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
                       "CANCEL_WAIT_SECONDS": "30", **(app_env or {})})
    with (tmp_path / "uvicorn.log").open("wb") as log:
        web = subprocess.Popen([sys.executable, "-m", "uvicorn", "examples.training_api:app",
                                "--host", "127.0.0.1", "--port", str(port)],
                               cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        daemon.start()
        pool.start(), pool.start()

        def up() -> bool:
            assert web.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                return call("GET", f"{base}/api/training/0")[0] == 404
            except OSError:
                return False

        wait_until(up, 30, "the example app to answer")
        yield base
    finally:
        web.terminate()
        web.wait(10)
        pool.stop_all()
        daemon.close()


@pytest.fixture
def api(tmp_path: Path, redis_url: str, pg_dsn: str) -> Iterator[str]:
    with serving(tmp_path, redis_url, pg_dsn) as base:
        yield base


def test_the_seeds_delete_endpoint_over_http(api: str, redis_url: str, tmp_path: Path) -> None:
    # A running job: stopped gracefully (its SIGTERM handler saved a checkpoint).
    status, started = call("POST", f"{api}/api/training", {"name": "resnet", "seconds": 120})
    assert status == 201 and started["status"] == "queued"
    job = started["id"]
    wait_until(lambda: call("GET", f"{api}/api/training/{job}")[1]["status"] == "running", 20,
               "the daemon to mark the job running")
    status, body = call("DELETE", f"{api}/api/training/{job}")
    assert status == 200, body
    assert body["success"] is True and body["message"] == f"Job {job} cancelled successfully"
    assert body["rq_cancelled"] is True and body["horse_signals"] == ["SIGTERM"]
    assert body["graceful"] is True and body["path"] == "local"
    assert body["outcome"] == "cancelled"
    assert (tmp_path / "checkpoints" / f"{job}.txt").read_text().startswith("stopped after")
    row = call("GET", f"{api}/api/training/{job}")[1]
    assert row["status"] == "cancelled" and row["error_message"].startswith("Cancelled: api")
    assert rq_status(redis_url, started["rq_job_id"]) == "canceled"

    # A job that finished: already_finished, and nothing changes.
    status, short = call("POST", f"{api}/api/training", {"name": "tiny", "seconds": 0.1})
    wait_until(lambda: call("GET", f"{api}/api/training/{short['id']}")[1]["status"] == "completed",
               20, "the short job to complete")
    status, body = call("DELETE", f"{api}/api/training/{short['id']}")
    assert status == 409, body
    assert (body["success"], body["outcome"], body["status"]) == (False, "already_finished",
                                                                  "completed")
    assert call("GET", f"{api}/api/training/{short['id']}")[1]["status"] == "completed"

    # No such job, and an id that cannot be one: 404 with the seed's JSON shape.
    assert call("DELETE", f"{api}/api/training/987654") == (
        404, {"success": False, "message": "Job 987654 not found"})
    assert call("DELETE", f"{api}/api/training/abc")[0] == 404


def test_another_table_in_a_schema_configured_from_the_environment(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    """Not the seed's table: uuid ids, other column names, no name column, and everything
    in schema ml (the requests table too, which is in no search_path): GET, POST and DELETE
    all work from the app's environment alone."""
    with Pg(pg_dsn) as pg:
        pg.execute("CREATE SCHEMA ml; CREATE TABLE ml.runs (run_id uuid PRIMARY KEY DEFAULT "
                   "gen_random_uuid(), job_rq text, state text NOT NULL, err text, "
                   "began timestamptz, ended timestamptz)")
    jobs = {"table": "ml.runs", "id_column": "run_id", "rq_id_column": "job_rq",
            "status_column": "state", "error_column": "err", "started_at_column": "began",
            "completed_at_column": "ended"}
    app_env = {"JOBS_TABLE": "ml.runs", "JOBS_ID_COLUMN": "run_id", "JOBS_STATUS_COLUMN": "state",
               "JOBS_RQ_ID_COLUMN": "job_rq", "JOBS_ERROR_COLUMN": "err", "JOBS_NAME_COLUMN": "",
               "CANCEL_REQUESTS_TABLE": "ml.rq_reconciler_cancel_requests"}
    with serving(tmp_path, redis_url, pg_dsn, app_env, jobs=jobs,
                 cancel={"requests_table": "ml.rq_reconciler_cancel_requests"}) as api:
        status, started = call("POST", f"{api}/api/training", {"name": "vit", "seconds": 120})
        assert status == 201, started
        job = started["id"]
        wait_until(lambda: call("GET", f"{api}/api/training/{job}")[1]["state"] == "running", 20,
                   "the daemon to mark the run running")
        status, body = call("DELETE", f"{api}/api/training/{job}")
        assert status == 200, body
        assert body["outcome"] == "cancelled" and body["message"] == f"Job {job} cancelled successfully"
        assert (tmp_path / "checkpoints" / f"{job}.txt").read_text().startswith("stopped after")
        row = call("GET", f"{api}/api/training/{job}")[1]
        assert row["state"] == "cancelled" and row["err"].startswith("Cancelled: api"), row
        assert rq_status(redis_url, started["rq_job_id"]) == "canceled"
        missing = "00000000-0000-0000-0000-000000000000"
        assert call("DELETE", f"{api}/api/training/{missing}") == (
            404, {"success": False, "message": f"Job {missing} not found"})
        assert call("DELETE", f"{api}/api/training/42")[0] == 404  # not a uuid
        assert call("GET", f"{api}/api/training/42")[0] == 404
    with Pg(pg_dsn) as pg:
        assert pg.val("SELECT count(*) FROM ml.rq_reconciler_cancel_requests") == 1
