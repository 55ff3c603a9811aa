"""examples/training_api.py, the seed's endpoint on the client, driven over HTTP: uvicorn,
real rq workers and the real daemon as subprocesses, real Redis and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.devstack import (
    REPO_ROOT,
    DaemonProc,
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


@pytest.fixture
def api(tmp_path: Path, redis_url: str, pg_dsn: str) -> Iterator[str]:
    """The example app under uvicorn, the daemon and two rq workers; yields the base URL."""
    cfg = write_config(tmp_path / "config.toml", redis_url, pg_dsn,
                       cancel={"grace_seconds": 10.0})
    migrate(cfg)
    daemon = DaemonProc(cfg, tmp_path / "daemon.log")
    pool = WorkerPool(redis_url, log_dir=tmp_path)
    port = free_port()
    (tmp_path / "checkpoints").mkdir()
    env = harness_env({"DATABASE_URL": pg_dsn, "REDIS_URL": redis_url,
                       "CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
                       "CANCEL_WAIT_SECONDS": "30"})
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
