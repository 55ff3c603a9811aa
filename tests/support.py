"""Helpers for tests that drive rq-reconciler itself: config files, the CLI, the daemon as
a real subprocess (readiness over a real $NOTIFY_SOCKET), and the jobs table."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from tests.harness import free_port, harness_env

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


class DaemonProc:
    """`rq-reconciler run` as a real subprocess; ready = it sent READY=1 to our socket."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None,
                 name: str = "d") -> None:
        self.config = config
        self.log_path = log_path
        self.env = env or {}
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="rqr-notify-")
        self.sock_path = os.path.join(self._dir, "notify.sock")
        self.sock: socket.socket | None = None
        self.messages: list[str] = []

    def start(self, wait_ready: bool = True, timeout: float = 30) -> DaemonProc:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(self.sock_path)
        env = {**harness_env(), **self.env, "NOTIFY_SOCKET": self.sock_path,
               "WATCHDOG_USEC": "2000000", "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        if wait_ready:
            self.wait_message("READY=1", timeout)
        return self

    def wait_message(self, text: str, timeout: float = 30) -> None:
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in m for m in self.messages):
                return
            self.sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
            assert self.proc is not None
            if self.proc.poll() is not None and not any(text in m for m in self.messages):
                raise AssertionError(f"daemon exited {self.proc.returncode} before {text}:\n"
                                     + self.log_text()[-4000:])
        raise AssertionError(f"daemon did not send {text} within {timeout} s:\n"
                             + self.log_text()[-4000:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def stop(self, timeout: float = 40) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self._log.close()
        return int(rc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self._log.close()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with_suppress_unlink(self.sock_path)

    def metrics_url(self) -> str:
        for line in self.config.read_text().splitlines():
            if line.startswith("listen"):
                return f"http://{json.loads(line.split('=', 1)[1].strip())}/metrics"
        raise AssertionError("no metrics.listen in config")

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url(), timeout=5) as r:  # noqa: S310
            return str(r.read().decode())


def with_suppress_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
    rows = q(dsn, f"INSERT INTO {table} (rq_job_id, status, started_at) VALUES "  # noqa: S608
                  f"($1, $2, {started or 'NULL'}) RETURNING id", rq_id, status)
    return int(rows[0]["id"])


def row(dsn: str, job_id: int, table: str = "training_jobs") -> dict[str, Any]:
    rows = q(dsn, f"SELECT * FROM {table} WHERE id = $1", job_id)  # noqa: S608
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
