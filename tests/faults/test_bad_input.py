"""Bad input from every side: garbage in RQ's hashes, a 1 MB reason, odd job ids, SQL in
config identifiers, backends that are down at start, a Redis that forbids CONFIG."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue

from reconciler.devstack import (
    DaemonProc,
    Pg,
    PostgresServer,
    RedisServer,
    WorkerPool,
    create_jobs_table,
    enqueue,
    free_port,
    metric_value,
    migrate,
    run_cli,
    wait_until,
    write_config,
)
from reconciler.rq_state import PUBSUB_SETTLE_SECONDS
from tests.faults.common import error_lines, insert_requests, log_events


def _events(d: DaemonProc, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events([d.log_path]) if e.get("event") == name]


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[DaemonProc]]:
    made: list[DaemonProc] = []
    yield made
    for d in made:
        d.close()


# -- garbage in RQ's hashes ------------------------------------------------------------------


def test_garbage_in_rq_hashes_under_a_running_daemon(tmp_path: Path, redis_url: str, pg_dsn: str,
                                                     daemons: list[DaemonProc]) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, sweep={"min_age_seconds": 60.0})
    migrate(cfg)
    # A Redis that has just started cannot tell a worker nobody listens for from one that
    # has not resubscribed yet (rq_state.PUBSUB_SETTLE_SECONDS): let the session's settle,
    # so that "nobody subscribed" below means what it says.
    with redis.Redis.from_url(redis_url) as r:
        wait_until(lambda: r.info("server")["uptime_in_seconds"] >= PUBSUB_SETTLE_SECONDS,
                   PUBSUB_SETTLE_SECONDS + 5, "the session's Redis to settle")
    d = DaemonProc(cfg, tmp_path / "d.log")
    daemons.append(d)
    d.start()
    garbage: dict[str, dict[str, Any]] = {
        "weird-status": {"status": "exploded", "worker_name": "w"},
        "no-status": {"origin": "default"},
        "binary": {"status": b"\xff\xfe\x00", "started_at": b"\x80garbage",
                   "worker_name": b"\xc3\x28"},
        "bad-times": {"status": "finished", "ended_at": "yesterday", "started_at": "soon"},
        "bad-exc": {"status": "failed", "exc_info": b"not zlib"},
        "ghost-worker": {"status": "started", "worker_name": "gw", "started_at": "nope"},
        "queued-garbage": {"status": "queued", "origin": b"\xff", "data": b"\x00\x01garbage",
                           "created_at": "never"},
        "started-garbage": {"status": "started", "worker_name": "gw2", "data": b"\xff"},
        "started-string-worker": {"status": "started", "worker_name": "sw"},
    }
    # keys of the wrong type: HMGET on them is a WRONGTYPE error, not "missing"
    wrong_type = ["string-key", "list-key"]
    with Pg(pg_dsn) as pg, redis.Redis.from_url(redis_url) as r:
        ids = {k: int(pg.val("INSERT INTO training_jobs (rq_job_id, status, started_at) VALUES "
                             "($1, 'running', now() - interval '1 hour') RETURNING id", k))
               for k in [*garbage, *wrong_type]}
        r.set("rq:job:string-key", "I am not a hash")
        r.rpush("rq:job:list-key", "nor", "am", "I")
        r.set("rq:worker:sw", "a worker key that is a string")
        # a worker hash that is garbage too, and on this host (so the pid checks run on it)
        r.hset("rq:worker:gw", mapping={"pid": "not-a-pid", "birth": b"\xff\xfe",
                                        "hostname": socket.gethostname(),
                                        "last_heartbeat": "later", "current_job": b"\xff"})
        r.hset("rq:worker:gw2", mapping={"pid": "-7", "birth": "2020-13-45T99:99:99Z",
                                         "hostname": socket.gethostname(), "death": ""})
        r.xadd("rq:results:bad-exc", {"type": "2", "exc_string": "!!not base64!!"})
        for k, fields in garbage.items():
            r.hset(f"rq:job:{k}", mapping=fields)
        # a key whose name is not UTF-8, and side keys RQ would own
        r.hset(b"rq:job:\xff\xfe", mapping={"status": "finished"})
        r.hset("rq:job:weird-status:dependents", mapping={"x": "y"})
        # cancel requests for the garbage ones too: the cancel flow reads and writes them
        rids = insert_requests(pg, [ids["weird-status"], ids["binary"], ids["queued-garbage"],
                                    ids["started-garbage"]], reason="garbage")
        wait_until(lambda: pg.val("SELECT count(*) FROM rq_reconciler_cancel_requests "
                                  "WHERE state = 'done'") == len(rids), 30, "outcomes", interval=0.1)
        # it keeps working (no pass is poisoned by the keys it cannot read): the daemon is up,
        # a job with a real status syncs, and so does a sweep
        r.hset("rq:job:weird-status", "status", "finished")
        finished_later = int(pg.val(
            "INSERT INTO training_jobs (rq_job_id, status) VALUES ('later', 'running') RETURNING id"))
        r.hset("rq:job:later", mapping={"status": "finished"})
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)  # a sweep now
        wait_until(lambda: pg.val("SELECT status FROM training_jobs WHERE id = $1",
                                  finished_later) == "completed", 15, "the sweep to sync 'later'",
                   interval=0.1)
        wait_until(lambda: pg.val("SELECT status FROM training_jobs WHERE id = $1",
                                  ids["weird-status"]) != "running", 15, "weird-status synced",
                   interval=0.1)
        assert d.proc is not None and d.proc.poll() is None
        # gw's hash is garbage and never expires: nothing says that worker is gone (its
        # heartbeat is never read against our clock) until the hash goes; then its job is
        # an orphan.
        ghost = ids["ghost-worker"]
        assert pg.val("SELECT status FROM training_jobs WHERE id = $1", ghost) == "running"
        r.delete("rq:worker:gw")
        wait_until(lambda: pg.val("SELECT status FROM training_jobs WHERE id = $1",
                                  ghost) == "failed", 20, "ghost-worker orphaned", interval=0.1)
        got = {k: pg.val("SELECT status FROM training_jobs WHERE id = $1", v) for k, v in ids.items()}
        outcomes = {r["job_id"]: (r["outcome"], json.loads(r["detail"])) for r in pg.fetch(
            "SELECT job_id, outcome, detail FROM rq_reconciler_cancel_requests")}
    print("\n", got, "\n", {k: outcomes.get(v) for k, v in ids.items()})
    # unknown / unreadable statuses are skipped, never read as "gone"
    assert got["no-status"] == "running"
    assert got["string-key"] == "running" and got["list-key"] == "running"
    # a worker key we cannot read says nothing about the worker: its job is left alone
    assert got["started-string-worker"] == "running"
    # the job of a worker whose hash is gone is an orphan
    assert got["ghost-worker"] == "failed"
    assert got["bad-times"] == "completed"
    assert got["bad-exc"] == "failed"
    # cancel requests for garbage got an outcome each
    # (started-garbage names a worker nobody listens for: an event may fail it as an
    # orphan before its request is claimed; then the outcome is already_finished)
    for k in ("binary", "queued-garbage", "started-garbage"):
        outcome, detail = outcomes[ids[k]]
        assert outcome in ("cancelled", "failed", "already_finished"), (k, outcome)
        assert detail["message"]
        assert (outcome == "cancelled") == (got[k] == "cancelled"), (k, outcome, got[k])
    assert got["weird-status"] in ("cancelled", "completed")
    assert d.stop() == 0
    # failed outcomes are error lines by design; nothing else is
    assert error_lines([d.log_path], allow={"cancel_done"}) == []


# -- a 1 MB reason ---------------------------------------------------------------------------


def test_a_one_megabyte_reason(tmp_path: Path, redis_url: str, pg_dsn: str,
                               daemons: list[DaemonProc], workers: WorkerPool) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, sweep={"min_age_seconds": 60.0})
    migrate(cfg)
    d = DaemonProc(cfg, tmp_path / "d.log")
    daemons.append(d)
    d.start()
    workers()
    big = "why? " * 200_000 + "the end"
    who = "web:" + "ü" * 100_000
    with Pg(pg_dsn) as pg:
        # the app's order: rows first, then the RQ jobs (a job that started before its row
        # existed would wait for the next sweep)
        parked, running = uuid.uuid4().hex, uuid.uuid4().hex
        ids = [int(pg.val("INSERT INTO training_jobs (rq_job_id, status) VALUES ($1, 'queued') "
                          "RETURNING id", x)) for x in (parked, running)]
        enqueue(redis_url, "tests.jobs.succeed", queue="parked", job_id=parked)
        enqueue(redis_url, "tests.jobs.sleep", 60, job_id=running)
        wait_until(lambda: pg.val("SELECT status FROM training_jobs WHERE id = $1", ids[1])
                   == "running", 20, "running", interval=0.1)
        rids = [int(pg.val("INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, "
                           "reason) VALUES ($1, $2, $3) RETURNING id", i, who, big)) for i in ids]
        wait_until(lambda: pg.val("SELECT count(*) FROM rq_reconciler_cancel_requests "
                                  "WHERE state = 'done'") == 2, 30, "outcomes", interval=0.1)
        rows = pg.fetch("SELECT r.outcome, t.status, t.error_message, r.detail FROM "
                        "rq_reconciler_cancel_requests r JOIN training_jobs t ON t.id = r.job_id "
                        "WHERE r.id = ANY($1::bigint[])", rids)
        events = pg.fetch("SELECT length(reason) AS n, length(detail::text) AS m "
                          "FROM rq_reconciler_events")
    assert [r["outcome"] for r in rows] == ["cancelled", "cancelled"]
    assert [r["status"] for r in rows] == ["cancelled", "cancelled"]
    for r in rows:
        # the app's error column and the logs get a readable line, not a megabyte
        assert r["error_message"].startswith("Cancelled: web:ü")
        assert len(r["error_message"]) <= 2000
    assert all(e["m"] < 10_000 for e in events)
    longest = max(len(ln) for ln in d.log_text().splitlines())
    assert longest < 20_000, longest
    assert d.proc is not None and d.proc.poll() is None
    assert d.stop() == 0
    assert error_lines([d.log_path]) == []


# -- odd job ids ---------------------------------------------------------------------------------

ODD_IDS = ["it's", 'say "hi"', "日本語 ✓", "a,b{c}\\", "  spaces  ", "NULL", "-- x; DROP TABLE t",
           "😀", "$1", "%s"]


@pytest.mark.parametrize("id_type", ["text", "uuid"])
def test_odd_job_ids(id_type: str, tmp_path: Path, redis_url: str, pg_dsn: str,
                     daemons: list[DaemonProc], workers: WorkerPool) -> None:
    table = f"{id_type}_jobs"
    with Pg(pg_dsn) as pg:
        default = "gen_random_uuid()" if id_type == "uuid" else "md5(random()::text)"
        pg.fetch(f"CREATE TABLE {table} (id {id_type} PRIMARY KEY DEFAULT {default}, "
                 "rq_job_id text, status text NOT NULL, error_message text, "
                 "started_at timestamptz, completed_at timestamptz)")
        cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, jobs={"table": table},
                           sweep={"min_age_seconds": 60.0})
        migrate(cfg)
        d = DaemonProc(cfg, tmp_path / "d.log")
        daemons.append(d)
        d.start()
        workers()
        ids = ODD_IDS if id_type == "text" else [str(uuid.uuid4()) for _ in ODD_IDS]
        done_ids, cancel_ids = ids[::2], ids[1::2]
        with redis.Redis.from_url(redis_url) as conn:
            for i in ids:
                rq_id = uuid.uuid4().hex
                pg.fetch(f"INSERT INTO {table} (id, rq_job_id, status) "
                         f"VALUES ($1::text::{id_type}, $2, 'queued')", i, rq_id)
                q = Queue("default" if i in done_ids else "parked", connection=conn)
                q.enqueue("tests.jobs.succeed", 1, job_id=rq_id)
        pg.fetch("INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
                 f"SELECT u::{id_type}, 'odd', 'odd' FROM unnest($1::text[]) AS u",
                 cancel_ids[1:])
        # and one through the CLI, which takes the id as text
        p = run_cli(cfg, "cancel", cancel_ids[0], "--reason", "cli", "--wait", "30")
        assert p.returncode == 0, p.stdout + p.stderr
        assert json.loads(p.stdout)["outcome"] == "cancelled"
        wait_until(lambda: pg.val(f"SELECT count(*) FROM {table} WHERE status = ANY($1)",
                                  ["queued", "running"]) == 0, 30, "every row terminal", interval=0.1)
        status = {str(r["id"]): r["status"] for r in pg.fetch(f"SELECT id, status FROM {table}")}
        audit = {r["job_id"] for r in pg.fetch("SELECT job_id FROM rq_reconciler_events")}
        outcomes = {str(r["job_id"]): r["outcome"] for r in pg.fetch(
            "SELECT job_id, outcome FROM rq_reconciler_cancel_requests")}
    assert {i: status[i] for i in done_ids} == dict.fromkeys(done_ids, "completed")
    assert {i: status[i] for i in cancel_ids} == dict.fromkeys(cancel_ids, "cancelled")
    assert outcomes == dict.fromkeys(cancel_ids, "cancelled")
    assert audit == set(ids)  # the audit table spells every id exactly
    assert d.stop() == 0
    assert error_lines([d.log_path]) == []
    # an id that is not one of this type is refused clearly by the CLI
    if id_type == "uuid":
        p = run_cli(cfg, "cancel", "not-a-uuid")
        assert p.returncode == 1 and "not a valid uuid" in p.stderr and "Traceback" not in p.stderr


# -- SQL in config identifiers ---------------------------------------------------------------

INJECTIONS = [
    ("jobs", "table", "training_jobs; DROP TABLE training_jobs; --"),
    ("jobs", "table", 'public."training_jobs"'),
    ("jobs", "table", "a.b.c"),
    ("jobs", "id_column", 'id" OR 1=1 --'),
    ("jobs", "rq_id_column", "rq_job_id)::text; SELECT pg_sleep(10); --"),
    ("jobs", "status_column", "status'"),
    ("jobs", "error_column", "error_message = 'x'"),
    ("jobs", "started_at_column", "started_at/*"),
    ("cancel", "requests_table", "rq_reconciler_cancel_requests'); NOTIFY x; --"),
    ("cancel", "channel", "rq_reconciler_cancel'; SELECT 1; --"),
    ("cancel", "channel", "x" * 80),
]


@pytest.mark.parametrize(("section", "key", "value"), INJECTIONS)
def test_sql_in_config_identifiers_is_a_config_error(section: str, key: str, value: str,
                                                     tmp_path: Path, pg_dsn: str) -> None:
    # Unreachable backends: exit 2 must come before any connection is tried.
    cfg = write_config(tmp_path / "c.toml", "redis://127.0.0.1:1/0", pg_dsn,
                       **{section: {key: value}})
    for cmd in ("run", "check", "sweep", "migrate"):
        t0 = time.monotonic()
        p = run_cli(cfg, cmd)
        assert p.returncode == 2, (cmd, p.stdout, p.stderr)
        assert f"{section}.{key}" in p.stderr and "Traceback" not in p.stderr
        assert time.monotonic() - t0 < 10
    with Pg(pg_dsn) as pg:
        assert pg.val("SELECT to_regclass('training_jobs') IS NOT NULL")
        assert pg.val("SELECT to_regclass('rq_reconciler_cancel_requests') IS NULL")


# -- backends down at start ------------------------------------------------------------------


def _scrape_or_none(d: DaemonProc) -> str | None:
    try:
        return d.scrape()
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


def _healthz(d: DaemonProc) -> int:
    url = d.metrics_url().replace("/metrics", "/healthz")
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_backends_down_at_start(tmp_path: Path, own_redis: RedisServer, own_pg: PostgresServer,
                                daemons: list[DaemonProc]) -> None:
    dsn = own_pg.create_database("app")
    create_jobs_table(dsn)
    cfg = write_config(tmp_path / "c.toml", own_redis.url, dsn, sweep={"min_age_seconds": 60.0})
    migrate(cfg)
    with Pg(dsn) as pg:
        job = int(pg.val("INSERT INTO training_jobs (rq_job_id, status) VALUES (NULL, 'queued') "
                         "RETURNING id"))
    own_redis.stop()
    own_pg.stop()
    d = DaemonProc(cfg, tmp_path / "d.log")
    daemons.append(d)
    d.start(wait_ready=False)
    wait_until(lambda: _scrape_or_none(d) is not None, 15, "/metrics while backends are down", interval=0.1)
    text = d.scrape()
    assert metric_value(text, "rq_reconciler_backend_up", backend="redis") == 0
    assert metric_value(text, "rq_reconciler_backend_up", backend="postgres") == 0
    assert _healthz(d) == 503
    time.sleep(3)
    assert d.proc is not None and d.proc.poll() is None  # it waits, it does not exit
    assert not any("READY=1" in m for m in d.messages)
    retries = _events(d, "connect_retry")
    assert len(retries) >= 3
    delays = [float(e["retry_in"]) for e in retries]
    assert max(delays[-2:]) > min(delays[:2])  # backing off

    own_pg.start()
    wait_until(lambda: metric_value(d.scrape(), "rq_reconciler_backend_up", backend="postgres")
               == 1, 30, "postgres up", interval=0.1)
    assert metric_value(d.scrape(), "rq_reconciler_backend_up", backend="redis") == 0
    assert not any("READY=1" in m for m in d.messages)
    # a cancel inserted while Redis is still down is carried out once it is up
    with Pg(dsn) as pg:
        rid = insert_requests(pg, [job], reason="while down")[0]
    own_redis.start()
    d.wait_message("READY=1", 40)
    text = d.scrape()
    assert metric_value(text, "rq_reconciler_backend_up", backend="redis") == 1
    assert _healthz(d) == 200
    with Pg(dsn) as pg:
        wait_until(lambda: pg.val("SELECT state FROM rq_reconciler_cancel_requests WHERE id = $1",
                                  rid) == "done", 20, "the request", interval=0.1)
        assert pg.val("SELECT status FROM training_jobs WHERE id = $1", job) == "cancelled"
    assert d.stop() == 0
    assert error_lines([d.log_path]) == []


def test_sigterm_while_waiting_for_backends_exits_0(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    dead_redis = f"redis://127.0.0.1:{_dead_port()}/0"
    dead_pg = f"postgresql://postgres@127.0.0.1:{_dead_port()}/app"
    cfg = write_config(tmp_path / "c.toml", dead_redis, dead_pg)
    d = DaemonProc(cfg, tmp_path / "d.log")
    daemons.append(d)
    d.start(wait_ready=False)
    wait_until(lambda: len(_events(d, "connect_retry")) >= 2, 15, "retrying", interval=0.1)
    assert d.proc is not None
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    assert d.stop() == 0  # (already exited: this closes its log)
    assert _events(d, "stopped")


def _dead_port() -> int:
    return free_port()  # nothing listens there


# -- a Redis that forbids CONFIG -------------------------------------------------------------


@pytest.fixture
def managed_redis() -> Iterator[RedisServer]:
    srv = RedisServer(extra_args=["--rename-command", "CONFIG", ""]).start()
    yield srv
    srv.cleanup()


def test_config_forbidden_falls_back_to_sweeps(tmp_path: Path, managed_redis: RedisServer,
                                               pg_dsn: str, daemons: list[DaemonProc]) -> None:
    with managed_redis.client() as r, pytest.raises(redis.ResponseError):
        r.config_get("notify-keyspace-events")
    cfg = write_config(tmp_path / "c.toml", managed_redis.url, pg_dsn,
                       sweep={"min_age_seconds": 60.0, "interval_seconds": 300.0,
                              "fallback_interval_seconds": 1.0})
    migrate(cfg)
    pool = WorkerPool(managed_redis.url, log_dir=tmp_path)
    try:
        pool.start()
        d = DaemonProc(cfg, tmp_path / "d.log")
        daemons.append(d)
        d.start()
        with Pg(pg_dsn) as pg:
            rq_id = enqueue(managed_redis.url, "tests.jobs.sleep", 0.2)
            job = int(pg.val("INSERT INTO training_jobs (rq_job_id, status) VALUES ($1, 'queued') "
                             "RETURNING id", rq_id))
            t0 = time.monotonic()
            wait_until(lambda: pg.val("SELECT status FROM training_jobs WHERE id = $1", job)
                       == "completed", 10, "synced by a fallback sweep", interval=0.1)
            lag = time.monotonic() - t0
            time.sleep(3)
            # a Redis restart: reconnects, still reported only once
            managed_redis.restart()
            pool.stop_all()
            pool.start()
            rq_id = enqueue(managed_redis.url, "tests.jobs.sleep", 0.1)
            job2 = int(pg.val("INSERT INTO training_jobs (rq_job_id, status) VALUES ($1, 'queued') "
                              "RETURNING id", rq_id))
            wait_until(lambda: pg.val("SELECT status FROM training_jobs WHERE id = $1", job2)
                       == "completed", 15, "synced after the restart", interval=0.1)
        forbidden = _events(d, "keyspace_config_forbidden")
        assert len(forbidden) == 1, forbidden
        assert forbidden[0]["fallback_interval"] == 1.0
        sweeps = _events(d, "sweep_done")
        assert len(sweeps) >= 4
        assert lag < 3
        assert d.stop() == 0
        assert error_lines([d.log_path], allow={"keyspace_config_forbidden"}) == []
    finally:
        pool.stop_all()


def test_keyspace_require_with_config_forbidden_exits_1(tmp_path: Path, managed_redis: RedisServer,
                                                        pg_dsn: str, daemons: list[DaemonProc]) -> None:
    cfg = write_config(tmp_path / "c.toml", managed_redis.url, pg_dsn,
                       redis={"keyspace_events": "require"})
    migrate(cfg)
    d = DaemonProc(cfg, tmp_path / "d.log")
    daemons.append(d)
    d.start(wait_ready=False)
    assert d.proc is not None
    try:
        assert d.proc.wait(30) == 1
    except subprocess.TimeoutExpired:
        raise AssertionError("did not exit:\n" + d.log_text()[-5000:]) from None
    assert d.stop() == 1
    assert not any("READY=1" in m for m in d.messages)
    (ev,) = _events(d, "keyspace_events_required")
    assert ev["level"] == "error"
    assert "notify-keyspace-events" in ev["error"] and "CONFIG" in ev["error"]
    assert "Traceback" not in d.log_text()
