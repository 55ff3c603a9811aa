"""Nothing the data does stops the sweep (issue 15), against real Redis, PostgreSQL and RQ
workers: a NUL in a real exception text, a varchar(255) error column, one row the database
refuses among fifty good ones, odd and wrong-type keys, a read-only database, a zlib bomb.
Each one costs its own row or key, never the run or its neighbours."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import redis
from rq import Queue
from rq.job import Job
from structlog.testing import capture_logs

from reconciler.config import Config, load
from reconciler.errors import PostgresUnavailable
from reconciler.jobs_table import Store
from reconciler.metrics import Metrics
from reconciler.processes import Processes
from reconciler.reconcile import Reconciler
from reconciler.rq_layout import EXC_NOT_READ
from reconciler.rq_state import RqState
from reconciler.sweep import Sweeper
from reconciler.workers import Workers
from tests.support import insert_job, metric_value, row, run_cli, statuses, sweep_json, write_config

REPLACEMENT = "\ufffd"


def _config(tmp_path: Path, redis_url: str, pg_dsn: str, **sections: dict[str, Any]) -> Path:
    cfg = write_config(tmp_path / "config.toml", redis_url, pg_dsn, **sections)
    p = run_cli(cfg, "migrate")
    assert p.returncode == 0, p.stderr
    return cfg


def _sql(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _rq_failed(r: redis.Redis, job_id: str) -> bool:
    return Job.fetch(job_id, connection=r).get_status(refresh=True) == "failed"


def _poison_lines(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and str(ev.get("event", "")).startswith("poison_"):
            out.append(ev)
    return out


# -- (a) a NUL byte in a real exception text ----------------------------------------------------


def test_a_real_failure_whose_text_holds_nul_is_synced(tmp_path: Path, redis_url: str,
                                                       pg_dsn: str, workers: Any) -> None:
    cfg = _config(tmp_path, redis_url, pg_dsn)
    workers()
    r = redis.Redis.from_url(redis_url)
    try:
        job = Queue("default", connection=r).enqueue("tests.jobs.fail", "bad\x00byte here")
        fine = Queue("default", connection=r).enqueue("tests.jobs.fail", "plain failure")
        _wait(lambda: _rq_failed(r, job.id) and _rq_failed(r, fine.id), 30, "both jobs to fail")
    finally:
        r.close()
    jid = insert_job(pg_dsn, job.id)
    fid = insert_job(pg_dsn, fine.id)
    out = sweep_json(cfg)
    assert out["_rc"] == 0, out["_stderr"]
    assert out["changed"] == 2
    got = row(pg_dsn, jid)
    assert got["status"] == "failed"
    assert got["error_message"] == f"Synced: RQ failed: RuntimeError: bad{REPLACEMENT}byte here"
    assert row(pg_dsn, fid)["error_message"] == "Synced: RQ failed: RuntimeError: plain failure"
    # the audit row went in with its transition
    assert _sql(pg_dsn, "SELECT count(*) FROM rq_reconciler_events WHERE job_id = $1",
                str(jid))[0][0] == 1


# -- (b) a varchar(255) error column and texts longer than that ---------------------------------


def test_texts_are_clipped_to_a_varchar_error_column(tmp_path: Path, redis_url: str, pg_dsn: str,
                                                     workers: Any) -> None:
    cfg = _config(tmp_path, redis_url, pg_dsn)
    _sql(pg_dsn, "ALTER TABLE training_jobs ALTER COLUMN error_message TYPE varchar(255)")
    workers()
    r = redis.Redis.from_url(redis_url)
    try:
        job = Queue("default", connection=r).enqueue("tests.jobs.fail", "x" * 320)
        _wait(lambda: _rq_failed(r, job.id), 30, "the job to fail")
    finally:
        r.close()
    failed = insert_job(pg_dsn, job.id)
    # a cancel with a 320-character reason, for a job RQ does not have: cancelled
    cancelled = insert_job(pg_dsn, "never-enqueued")
    _sql(pg_dsn, "INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
                 "VALUES ($1, 'web:alice', $2)", cancelled, "r" * 320)
    out = sweep_json(cfg)
    assert out["_rc"] == 0, out["_stderr"]
    assert statuses(pg_dsn, [failed, cancelled]) == {failed: "failed", cancelled: "cancelled"}
    f_err = row(pg_dsn, failed)["error_message"]
    c_err = row(pg_dsn, cancelled)["error_message"]
    assert len(f_err) == 255 and f_err.startswith("Synced: RQ failed: RuntimeError: xxx")
    assert f_err.endswith("…")
    assert len(c_err) == 255 and c_err.startswith("Cancelled: web:alice / rrr")
    assert _poison_lines(out["_stderr"]) == []  # clipped, not refused


# -- (c) one row the database refuses among fifty good ones -------------------------------------


def _sweep_in_process(cfg: Config, metrics: Metrics) -> tuple[int, int, list[dict[str, Any]]]:
    """A sweep with the daemon's wiring (metrics passed in as the poison callback);
    returns (changed, lost_races, poison log events)."""

    async def go() -> tuple[int, int]:
        store = Store(cfg, on_poison=metrics.count_poison)
        rq = RqState(cfg.redis.url, socket_timeout=2.0, on_poison=metrics.count_poison)
        await store.connect()
        try:
            rec = Reconciler(cfg, store, rq, Workers(rq, Processes()), metrics)
            first = await Sweeper(rec).sweep()
            second = await Sweeper(rec).sweep()
            return first.changed + second.changed, first.lost_races + second.lost_races
        finally:
            await rq.close()
            await store.close()

    with capture_logs() as logs:
        changed, lost = asyncio.run(go())
    return changed, lost, [dict(e) for e in logs if str(e.get("event", "")).startswith("poison_")]


def test_one_refused_row_costs_only_itself(tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    path = _config(tmp_path, redis_url, pg_dsn)
    good = [insert_job(pg_dsn, None) for _ in range(25)]
    bad = insert_job(pg_dsn, None)
    good += [insert_job(pg_dsn, None) for _ in range(25)]
    # The app's own rule refuses the one transition: the batch UPDATE fails as a whole.
    _sql(pg_dsn, f"ALTER TABLE training_jobs ADD CONSTRAINT not_that_one "
                 f"CHECK (id <> {bad} OR status IN ('queued', 'running'))")
    out = sweep_json(path)
    assert out["_rc"] == 0, out["_stderr"]
    assert out["changed"] == 50 and out["lost_races"] == 0
    after = statuses(pg_dsn, [*good, bad])
    assert after.pop(bad) == "running"
    assert set(after.values()) == {"failed"}
    events = _poison_lines(out["_stderr"])
    assert [(e["event"], e["job_id"], e["sqlstate"]) for e in events] == [
        ("poison_row", str(bad), "23514")]
    assert "not_that_one" in events[0]["error"]

    # The daemon's view: two sweeps in one process, metrics wired in. The row is logged and
    # counted once; the second sweep skips it without asking the database again.
    for i in good:
        _sql(pg_dsn, "UPDATE training_jobs SET status = 'running' WHERE id = $1", i)
    metrics = Metrics()
    changed, lost, logged = _sweep_in_process(load(str(path)), metrics)
    assert (changed, lost) == (50, 0)
    assert [(e["event"], e["job_id"]) for e in logged] == [("poison_row", str(bad))]
    text = metrics.render().decode()
    assert metric_value(text, "rq_reconciler_poison_total", kind="row") == 1
    assert metric_value(text, "rq_reconciler_poison_total", kind="key") == 0
    assert statuses(pg_dsn, [bad]) == {bad: "running"}
    # once the row no longer breaks the rule, it is applied like any other
    _sql(pg_dsn, "ALTER TABLE training_jobs DROP CONSTRAINT not_that_one")
    out = sweep_json(path)
    assert out["_rc"] == 0 and out["changed"] == 1
    assert statuses(pg_dsn, [bad]) == {bad: "failed"}


# -- (d) odd key names and keys of the wrong type -----------------------------------------------


def test_odd_and_wrong_type_keys_cost_only_themselves(tmp_path: Path, redis_url: str,
                                                      pg_dsn: str) -> None:
    path = _config(tmp_path, redis_url, pg_dsn)
    r = redis.Redis.from_url(redis_url)
    try:
        r.hset(b"rq:job:a\x00b", mapping={"status": "finished"})
        r.hset(b"rq:job:\xff\xfe", mapping={"status": "finished"})
        r.set("rq:job:string-key", "I am not a hash")
        r.rpush("rq:job:list-key", "nor", "am", "I")
        r.hset("rq:job:long-status", mapping={"status": "x" * 5000})
        r.hset("rq:job:done", mapping={"status": "finished"})
        r.hset("rq:job:gone-worker", mapping={"status": "started", "worker_name": "nobody"})
    finally:
        r.close()
    ids = {k: insert_job(pg_dsn, k) for k in
           ("string-key", "list-key", "long-status", "done", "gone-worker")}
    out = sweep_json(path)
    assert out["_rc"] == 0, out["_stderr"]
    got = statuses(pg_dsn, list(ids.values()))
    # unreadable: left alone, never read as "not found"
    assert got[ids["string-key"]] == got[ids["list-key"]] == "running"
    assert got[ids["long-status"]] == "running"
    # their neighbours in the same Redis read and the same batch are synced
    assert got[ids["done"]] == "completed"
    assert got[ids["gone-worker"]] == "failed"
    logged = {(e["event"], e["key"]) for e in _poison_lines(out["_stderr"])}
    assert logged == {("poison_job_hash", "string-key"), ("poison_job_hash", "list-key"),
                      ("poison_job_hash", "long-status")}


def test_odd_key_names_from_events_and_scans_are_skipped_once(redis_url: str) -> None:
    """The daemon's inputs that carry key names: keyspace events and rq:workers."""
    seen: list[tuple[str, str]] = []

    async def go() -> tuple[list[str], list[str]]:
        rq = RqState(redis_url, socket_timeout=2.0,
                     on_poison=lambda kind, name, _err: seen.append((kind, name)))
        admin = redis.asyncio.Redis.from_url(redis_url)
        jobs: list[str] = []
        try:
            await admin.config_set("notify-keyspace-events", "Kghx")
            await admin.sadd("rq:workers", "rq:worker:ok", b"rq:worker:a\x00b",
                             b"rq:worker:\xff", "rq:worker:nl\nname")
            names = await rq.worker_names()
            events = rq.keyspace_events()
            try:
                async with asyncio.timeout(10):
                    async for kind, ident, _ev in events:
                        if kind == "subscribed":
                            for key in (b"rq:job:a\x00b", b"rq:job:\xff\xfe", b"rq:job:a\x00b",
                                        b"rq:job:good"):
                                await admin.hset(key, "status", "finished")
                            continue
                        if kind == "job":
                            jobs.append(ident)
                            if ident == "good":
                                break
            finally:
                await events.aclose()
            return names, jobs
        finally:
            await admin.aclose()
            await rq.close()

    names, jobs = asyncio.run(go())
    assert names == ["ok"]
    assert jobs == ["good"]
    kinds = [k for k, _ in seen]
    assert kinds == ["key"] * len(seen)
    shown = [n for _, n in seen]
    # each odd name once, though the NUL job key changed twice
    assert len(shown) == len(set(shown)) == 5
    assert all(n.isascii() and "\x00" not in n for n in shown)


# -- (e) a read-only database -------------------------------------------------------------------


def test_a_read_only_database_is_an_outage_not_a_schema_error(tmp_path: Path, redis_url: str,
                                                              pg_dsn: str) -> None:
    path = _config(tmp_path, redis_url, pg_dsn)
    insert_job(pg_dsn, None)
    db = _sql(pg_dsn, "SELECT current_database()")[0][0]
    _sql(pg_dsn, f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
    p = run_cli(path, "sweep")
    assert p.returncode == 1, p.stderr
    assert re.search(r"postgres at 127\.0\.0\.1:\d+: ReadOnlySQLTransactionError", p.stderr), p.stderr

    async def start_up() -> None:
        # What the daemon does at start-up: it must pass (and then retry its writes).
        store = Store(load(str(path)))
        await store.connect()
        try:
            await store.verify_schema()
            try:
                await store.requests.release_claims()
            except PostgresUnavailable as exc:
                assert "read-only" in str(exc)
            else:
                raise AssertionError("a write to a read-only database went through")
        finally:
            await store.close()

    asyncio.run(start_up())


# -- (f) a zlib bomb as the exception text ------------------------------------------------------


def _bomb(mib: int) -> bytes:
    z = zlib.compressobj(9)
    zeros = b"\0" * (1 << 20)
    return b"".join(z.compress(zeros) for _ in range(mib)) + z.compress(
        b"\nValueError: the real last line\n") + z.flush()


def test_a_zlib_bomb_in_the_results_stream_is_not_inflated(tmp_path: Path, redis_url: str,
                                                           pg_dsn: str) -> None:
    path = _config(tmp_path, redis_url, pg_dsn)
    small, large = _bomb(128), _bomb(800)  # ~130 KB and ~800 KB; 128 MiB and 800 MiB inflated
    r = redis.Redis.from_url(redis_url)
    try:
        for rq_id, data in (("bomb-small", small), ("bomb-large", large)):
            r.hset(f"rq:job:{rq_id}", mapping={"status": "failed", "origin": "default"})
            r.xadd(f"rq:results:{rq_id}", {"type": "2", "exc_string": base64.b64encode(data)})
        r.hset("rq:job:honest", mapping={"status": "failed", "origin": "default"})
        r.xadd("rq:results:honest", {"type": "2", "exc_string": base64.b64encode(
            zlib.compress(b"Traceback (most recent call last):\nKeyError: 'k'\n"))})
    finally:
        r.close()
    ids = {k: insert_job(pg_dsn, k) for k in ("bomb-small", "bomb-large", "honest")}
    out = sweep_json(path)
    assert out["_rc"] == 0, out["_stderr"]
    errors = {k: row(pg_dsn, v)["error_message"] for k, v in ids.items()}
    # failed, and honest about it: the end of the text was never reached
    assert errors["bomb-small"] == f"Synced: RQ failed: {EXC_NOT_READ}"
    assert errors["bomb-large"] == f"Synced: RQ failed: {EXC_NOT_READ}"
    assert errors["honest"] == "Synced: RQ failed: KeyError: 'k'"
