"""Helpers for tests that drive rq-reconciler itself: config files, the CLI, the daemon as
a real subprocess (readiness over a real $NOTIFY_SOCKET), and the jobs table."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from tests.harness import DaemonProc, free_port

__all__ = ["DaemonProc"]

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, redis_url: str, pg_dsn: str, **sections: dict[str, Any]) -> Path:
    """A config file; `sections` override/extend e.g. sweep={"min_age_seconds": 0}."""
    base: dict[str, dict[str, Any]] = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": pg_dsn, "pool_size": 4},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"format": "json", "level": "info"},
        "cancel": {"grace_seconds": 2.0, "lease_seconds": 10.0},
        "sweep": {"min_age_seconds": 0.0},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def run_cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args[:1], "--config", str(config), *args[1:]],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def sweep_json(config: Path, *extra: str) -> dict[str, Any]:
    p = run_cli(config, "sweep", "--json", *extra)
    assert p.returncode in (0, 1), p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    out["_rc"] = p.returncode
    out["_stderr"] = p.stderr
    return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, lbl = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in lbl for k, v in labels.items()):
            total += float(value)
    return total


# -- the jobs table ---------------------------------------------------------------------------

def q(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def insert_job(dsn: str, rq_id: str | None, status: str = "running",
               started_ago: float | None = 3600.0, table: str = "training_jobs") -> int:
    started = None if started_ago is None else f"now() - make_interval(secs => {started_ago})"
    rows = q(dsn, f"INSERT INTO {table} (rq_job_id, status, started_at) VALUES "
                  f"($1, $2, {started or 'NULL'}) RETURNING id", rq_id, status)
    return int(rows[0]["id"])


def row(dsn: str, job_id: int, table: str = "training_jobs") -> dict[str, Any]:
    rows = q(dsn, f"SELECT * FROM {table} WHERE id = $1", job_id)
    return dict(rows[0])


def statuses(dsn: str, ids: Sequence[int]) -> dict[int, str]:
    rows = q(dsn, "SELECT id, status FROM training_jobs WHERE id = ANY($1::bigint[])", list(ids))
    return {int(r["id"]): str(r["status"]) for r in rows}


def transitions(dsn: str, job_id: int) -> list[dict[str, Any]]:
    return [dict(r) for r in q(dsn, "SELECT * FROM rq_reconciler_events WHERE job_id = $1 "
                                    "ORDER BY id", str(job_id))]


def wait_status(dsn: str, job_id: int, want: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    r = row(dsn, job_id)
    while time.monotonic() < deadline:
        r = row(dsn, job_id)
        if r["status"] == want:
            return r
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} is {r['status']!r}, not {want!r} after {timeout} s: {r}")


def request_cancel(dsn: str, job_id: int, by: str = "test", reason: str = "test") -> int:
    rows = q(dsn, "INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
                  "VALUES ($1, $2, $3) RETURNING id", job_id, by, reason)
    return int(rows[0]["id"])


def wait_request(dsn: str, request_id: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = dict(q(dsn, "SELECT * FROM rq_reconciler_cancel_requests WHERE id = $1", request_id)[0])
        if r["state"] == "done":
            r["detail"] = json.loads(r["detail"]) if r["detail"] else None
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"request {request_id} not done after {timeout} s: {r}")
        time.sleep(0.02)
