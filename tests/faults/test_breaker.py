"""The mass-orphan breaker: a flushed Redis or a wrong db number must not fail a fleet.

A running daemon refuses to fail the rows, says so at error level and in
rq_reconciler_orphan_breaker_open; `rq-reconciler sweep --force` overrides it once. The
worker breaker does the same for worker hashes that vanish at once."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import redis
from rq import Queue

from reconciler.devstack import (
    DaemonProc,
    Pg,
    metric_value,
    migrate,
    run_cli,
    wait_until,
    write_config,
)
from tests.faults.common import log_events
from tests.support import sweep_json

BREAKER = "rq_reconciler_orphan_breaker_open"


def running_rows(pg: Pg, redis_url: str, n: int) -> list[int]:
    """n rows that say running, each with a real RQ job (parked in a queue nobody serves,
    so RQ says queued and the daemon leaves them be)."""
    rq_ids = [uuid.uuid4().hex for _ in range(n)]
    with redis.Redis.from_url(redis_url) as conn:
        q = Queue("parked", connection=conn)
        for rq_id in rq_ids:
            q.enqueue("tests.jobs.succeed", 1, job_id=rq_id)
    rows = pg.fetch(
        "INSERT INTO training_jobs (rq_job_id, status, started_at) "
        "SELECT u, 'running', now() - interval '1 hour' FROM unnest($1::text[]) AS u "
        "RETURNING id", rq_ids)
    return [int(r["id"]) for r in rows]


def statuses(pg: Pg, ids: list[int]) -> set[str]:
    return {r["status"] for r in pg.fetch(
        "SELECT status FROM training_jobs WHERE id = ANY($1::bigint[])", ids)}


def breaker_logged(d: DaemonProc) -> list[dict[str, object]]:
    return [e for e in log_events([d.log_path]) if e.get("event") == "orphan_breaker_open"]


def test_flushdb_under_a_running_daemon_fails_nothing(tmp_path: Path, redis_url: str,
                                                      pg_dsn: str) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, sweep={"min_age_seconds": 60.0})
    migrate(cfg)
    with Pg(pg_dsn) as pg:
        ids = running_rows(pg, redis_url, 40)
        d = DaemonProc(cfg, tmp_path / "d.log")
        try:
            d.start()
            assert metric_value(d.scrape(), BREAKER) == 0
            with redis.Redis.from_url(redis_url) as r:
                r.flushdb()
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)  # a sweep now (it would come within 5 min)
            wait_until(lambda: metric_value(d.scrape(), BREAKER) == 1, 20, "breaker open", interval=0.1)
            text = d.scrape()
            assert metric_value(text, "rq_reconciler_sweeps_total", result="breaker") >= 1
            assert statuses(pg, ids) == {"running"}
            assert pg.val("SELECT count(*) FROM rq_reconciler_events") == 0
            (ev,) = breaker_logged(d)[:1]
            assert ev["level"] == "error" and ev["not_found"] == 40 and ev["checked"] == 40
            assert d.proc.poll() is None

            # The operator looked and the jobs really are gone: --force, once.
            out = _sweep_until_lock(cfg, "--force")
            assert out["_rc"] == 0 and out["changed"] == 40
            assert statuses(pg, ids) == {"failed"}
            assert {r["error_message"] for r in pg.fetch(
                "SELECT error_message FROM training_jobs")} == {"Orphaned: RQ job not found"}
            assert d.stop() == 0
        finally:
            d.close()


def test_wrong_db_number_trips_the_breaker_and_force_overrides_once(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    assert redis_url.endswith("/0")
    wrong = write_config(tmp_path / "wrong.toml", redis_url[:-1] + "7", pg_dsn,
                         sweep={"min_age_seconds": 60.0})
    migrate(wrong)
    with Pg(pg_dsn) as pg:
        ids = running_rows(pg, redis_url, 25)
        d = DaemonProc(wrong, tmp_path / "d.log")
        try:
            d.start()  # READY comes after the start-up sweep: the breaker already spoke
            assert metric_value(d.scrape(), BREAKER) == 1
            (ev,) = breaker_logged(d)
            assert ev["level"] == "error" and ev["not_found"] == 25
            assert "db" in str(ev["hint"])
            assert statuses(pg, ids) == {"running"}
            assert d.stop() == 0
        finally:
            d.close()

        dry = sweep_json(wrong, "--dry-run")
        assert dry["breaker_open"] is True and dry["changed"] == 0
        forced = sweep_json(wrong, "--force")
        assert forced["_rc"] == 0 and forced["changed"] == 25
        assert statuses(pg, ids) == {"failed"}
        # once: the next sweep without --force is guarded again
        more = running_rows(pg, redis_url, 25)
        again = sweep_json(wrong)
        assert again["_rc"] == 1 and again["breaker_open"] is True
        assert "breaker" in again["_stderr"] and "--force" in again["_stderr"]
        assert statuses(pg, more) == {"running"}
        # and against the right db the same rows are fine: their jobs are queued
        right = write_config(tmp_path / "right.toml", redis_url, pg_dsn,
                             sweep={"min_age_seconds": 60.0})
        ok = sweep_json(right)
        assert ok["_rc"] == 0 and ok["changed"] == 0 and not ok["breaker_open"]
        assert statuses(pg, more) == {"running"}


def _sweep_until_lock(cfg: Path, *extra: str) -> dict[str, object]:
    """The CLI sweep refuses while a daemon replica holds the sweep lock: retry briefly."""
    out: dict[str, object] = {}

    def attempt() -> bool:
        nonlocal out
        p = run_cli(cfg, "sweep", "--json", *extra)
        if p.returncode == 1 and "holds the lock" in p.stderr:
            return False
        out = json.loads(p.stdout)
        out["_rc"] = p.returncode
        out["_stderr"] = p.stderr
        return True

    wait_until(attempt, 30, "the sweep lock", interval=0.1)
    return out


def _remote_workers_running(pg: Pg, redis_url: str, names: list[str]) -> dict[str, int]:
    """Per worker name: a row whose RQ job that worker (on another host, whose replica is
    not running) runs. Its hash has the TTL an RQ heartbeat sets; nobody listens on its
    command channel, which alone proves nothing."""
    out = {}
    with redis.Redis.from_url(redis_url) as conn:
        q = Queue("parked", connection=conn)
        for name in names:
            key = f"rq:worker:{name}"
            conn.hset(key, mapping={"birth": "2030-01-01T00:00:00.000000Z",
                                    "last_heartbeat": "2030-01-01T00:00:00.000000Z",
                                    "pid": "4242", "hostname": "elsewhere",
                                    "version": "2.12.0", "current_job": ""})
            conn.expire(key, 90)  # RQ: job_monitoring_interval + 60
            conn.sadd("rq:workers", key)
            rq_id = q.enqueue("tests.jobs.succeed", 1).id
            conn.hset(f"rq:job:{rq_id}", mapping={"status": "started", "worker_name": name})
            conn.hset(key, "current_job", rq_id)
            (r,) = pg.fetch("INSERT INTO training_jobs (rq_job_id, status, started_at) "
                            "VALUES ($1, 'running', now()) RETURNING id", rq_id)
            out[name] = int(r["id"])
    return out


def test_worker_hashes_vanishing_at_once_trip_the_worker_breaker(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    """A failover to a replica that lost them, or the server's clock jumping past their
    TTLs, drops every worker hash at once: their jobs are not orphaned on Redis' word
    alone (`sweep --force` overrides once). One worker gone among live ones is."""
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, sweep={"min_age_seconds": 0.0})
    migrate(cfg)
    names = [f"remote-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    with Pg(pg_dsn) as pg, redis.Redis.from_url(redis_url) as conn:
        rows = _remote_workers_running(pg, redis_url, names)
        ok = sweep_json(cfg)
        assert ok["_rc"] == 0 and ok["changed"] == 0 and not ok["worker_breaker_open"], ok
        assert statuses(pg, list(rows.values())) == {"running"}

        conn.delete(*(f"rq:worker:{n}" for n in names))
        held = sweep_json(cfg)
        assert held["_rc"] == 1 and held["worker_breaker_open"] is True, held
        assert held["changed"] == 0 and held["worker_gone"] == 4
        assert "worker breaker" in held["_stderr"] and "--force" in held["_stderr"]
        assert statuses(pg, list(rows.values())) == {"running"}

        forced = sweep_json(cfg, "--force")
        assert forced["_rc"] == 0 and forced["changed"] == 4, forced
        assert statuses(pg, list(rows.values())) == {"failed"}
        for r in pg.fetch("SELECT error_message FROM training_jobs WHERE id = ANY($1::bigint[])",
                          list(rows.values())):
            assert r["error_message"].startswith("Orphaned: worker remote-")
            assert r["error_message"].endswith(" is missing)")

        # One of four gone: a worker's death, not a breaker's business.
        fleet = [f"remote-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
        rows = _remote_workers_running(pg, redis_url, fleet)
        conn.delete(f"rq:worker:{fleet[0]}")
        one = sweep_json(cfg)
        assert one["_rc"] == 0 and one["changed"] == 1 and not one["worker_breaker_open"], one
        assert statuses(pg, [rows[fleet[0]]]) == {"failed"}
        assert statuses(pg, [rows[n] for n in fleet[1:]]) == {"running"}
