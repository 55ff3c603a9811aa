"""`rq-reconciler sweep` against real RQ state made by real workers: every row of the
reconcile table, the breaker, dry-run, Redis failing mid-sweep, and garbage in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import asyncpg
import redis
from rq.command import send_stop_job_command
from rq.job import Job

from reconciler.config import load
from reconciler.devstack import (
    enqueue,
    insert_job,
    migrate,
    pg_fetch,
    row,
    rq_status,
    run_cli,
    statuses,
    transitions,
    wait_until,
    write_config,
)
from reconciler.errors import BackendUnavailable, RedisUnavailable
from reconciler.jobs_table import RowChange, Store
from reconciler.metrics import Metrics
from reconciler.processes import Processes
from reconciler.reconcile import PassReport, Reconciler
from reconciler.rq_state import RqState
from reconciler.sweep import Sweeper
from reconciler.workers import Workers
from tests.support import sweep_json


def migrated(tmp_path: Path, redis_url: str, pg_dsn: str, **sections: dict[str, Any]) -> Path:
    cfg = write_config(tmp_path / "config.toml", redis_url, pg_dsn, **sections)
    migrate(cfg)
    return cfg


def test_every_row_of_the_reconcile_table(tmp_path: Path, redis_url: str, pg_dsn: str,
                                          workers: Any, tmp_marker: Path) -> None:
    cfg = migrated(tmp_path, redis_url, pg_dsn, sweep={"min_age_seconds": 60.0})
    w1 = workers()
    w2 = workers()
    r = redis.Redis.from_url(redis_url)
    try:
        finished = enqueue(redis_url, "tests.jobs.succeed", 21)
        failed = enqueue(redis_url, "tests.jobs.fail", "disk on fire")
        wait_until(lambda: rq_status(redis_url, finished) == "finished", 20, what="finished")
        wait_until(lambda: rq_status(redis_url, failed) == "failed", 20, what="failed")

        stopped = enqueue(redis_url, "tests.jobs.sleep", 60)
        wait_until(lambda: rq_status(redis_url, stopped) == "started", 20, what="started")
        send_stop_job_command(r, stopped)
        wait_until(lambda: rq_status(redis_url, stopped) == "stopped", 20, what="stopped")

        # a queued job RQ cancels itself (no worker listens on this queue)
        canceled = enqueue(redis_url, "tests.jobs.succeed", queue="nobody-listens")
        Job.fetch(canceled, connection=r).cancel()
        assert rq_status(redis_url, canceled) == "canceled"
        queued = enqueue(redis_url, "tests.jobs.succeed", queue="nobody-listens")

        # a worker SIGKILLed mid-job: its horse lives on, its hash lives on
        orphan = enqueue(redis_url, "tests.jobs.touch_and_sleep", 60, str(tmp_marker))
        wait_until(lambda: rq_status(redis_url, orphan) == "started", 20, what="orphan started")
        victim = w1 if w1.current_job_id() == orphan else w2
        survivor = w2 if victim is w1 else w1
        horse_pids = victim.horse_pids()
        victim.kill(signal.SIGKILL)

        running_ok = enqueue(redis_url, "tests.jobs.sleep", 30)
        wait_until(lambda: rq_status(redis_url, running_ok) == "started", 20, what="running")
        assert survivor.current_job_id() == running_ok

        ids = {
            "finished": insert_job(pg_dsn, finished),
            "failed": insert_job(pg_dsn, failed, status="queued"),
            "stopped": insert_job(pg_dsn, stopped),
            "canceled": insert_job(pg_dsn, canceled),
            "queued": insert_job(pg_dsn, queued, status="queued", started_ago=None),
            "orphan": insert_job(pg_dsn, orphan),
            "running_ok": insert_job(pg_dsn, running_ok, status="queued", started_ago=None),
            "missing": insert_job(pg_dsn, "no-such-job"),
            "no_rq_id": insert_job(pg_dsn, None),
            "empty_rq_id": insert_job(pg_dsn, ""),
            "young_missing": insert_job(pg_dsn, "not-yet-enqueued", started_ago=1),
            "young_no_id": insert_job(pg_dsn, None, status="queued", started_ago=None),
            "done_already": insert_job(pg_dsn, finished, status="failed"),
        }
        dry = sweep_json(cfg, "--dry-run")
        assert dry["_rc"] == 0
        assert statuses(pg_dsn, list(ids.values()))[ids["finished"]] == "running"  # unchanged

        out = sweep_json(cfg)
        assert out["_rc"] == 0, out["_stderr"]
        assert {c["job_id"] for c in out["changes"]} == {c["job_id"] for c in dry["changes"]}
        got = statuses(pg_dsn, list(ids.values()))
        want = {
            "finished": "completed", "failed": "failed", "stopped": "failed",
            # A one-shot sweep never saw the SIGKILLed worker alive: its pid, dead here,
            # cannot be told from a worker's in another PID namespace (a container with our
            # hostname), which must never be failed. The daemon, which watched that pid, fails
            # it at once (test_daemon); without one, the server expires its hash in time.
            "canceled": "failed", "queued": "queued", "orphan": "running",
            "running_ok": "running", "missing": "failed", "no_rq_id": "failed",
            "empty_rq_id": "failed", "young_missing": "running", "young_no_id": "queued",
            "done_already": "failed",
        }
        assert {k: got[v] for k, v in ids.items()} == want

        err = {k: row(pg_dsn, v)["error_message"] for k, v in ids.items()}
        assert err["finished"] == "Synced: RQ finished"
        assert err["failed"] == "Synced: RQ failed: RuntimeError: disk on fire"
        assert err["stopped"] == "Synced: RQ job stopped"
        assert err["canceled"] == "Synced: RQ job canceled"
        assert err["missing"] == "Orphaned: RQ job not found"
        assert err["no_rq_id"] == "Orphaned: no RQ job id"
        assert err["running_ok"] is None and err["done_already"] is None
        assert row(pg_dsn, ids["running_ok"])["started_at"] is not None
        assert row(pg_dsn, ids["finished"])["completed_at"] is not None

        # the sweep never signals: the SIGKILLed worker's horse is left to the daemon
        assert out["horse_stops"] == []
        assert all(_alive(p) for p in horse_pids)

        # audit rows: one per transition, with the actor
        for name in ("finished", "no_rq_id"):
            t = transitions(pg_dsn, ids[name])
            assert len(t) == 1 and t[0]["actor"]
        # a second sweep changes nothing: idempotent
        again = sweep_json(cfg)
        assert again["changed"] == 0
        # the young rows become old enough from the daemon's first sighting (persisted)
        seen = pg_fetch(pg_dsn, "SELECT job_id FROM rq_reconciler_first_seen")
        assert str(ids["young_no_id"]) in {r["job_id"] for r in seen}
    finally:
        r.close()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_breaker_refuses_mass_not_found_and_force_overrides(tmp_path: Path, redis_url: str,
                                                            pg_dsn: str) -> None:
    cfg = migrated(tmp_path, redis_url, pg_dsn, sweep={"max_orphan_min": 20})
    r = redis.Redis.from_url(redis_url)
    ids = [insert_job(pg_dsn, f"job-{i}") for i in range(30)]
    live = []
    for _ in range(5):
        jid = enqueue(redis_url, "tests.jobs.succeed", queue="nobody-listens")
        live.append(insert_job(pg_dsn, jid, status="queued"))
    out = sweep_json(cfg)
    assert out["_rc"] == 1
    assert out["breaker_open"] is True
    assert "breaker" in out["_stderr"]
    assert set(statuses(pg_dsn, ids).values()) == {"running"}
    forced = sweep_json(cfg, "--force")
    assert forced["_rc"] == 0
    assert set(statuses(pg_dsn, ids).values()) == {"failed"}
    assert set(statuses(pg_dsn, live).values()) == {"queued"}
    r.close()


def test_redis_down_mid_sweep_fails_nothing(tmp_path: Path, own_redis: Any, pg_dsn: str) -> None:
    cfg = migrated(tmp_path, own_redis.url, pg_dsn, sweep={"page_size": 50})
    ids = [insert_job(pg_dsn, f"gone-{i}") for i in range(5)]
    own_redis.stop()
    p = run_cli(cfg, "sweep")
    assert p.returncode == 1
    assert "redis" in p.stderr.lower()
    assert set(statuses(pg_dsn, ids).values()) == {"running"}
    assert transitions(pg_dsn, ids[0]) == []


def test_a_sweep_cut_off_midway_hands_over_exactly_what_it_applied(
        tmp_path: Path, own_redis: Any, pg_dsn: str) -> None:
    """Pages are read, decided and written three at a time. When Redis dies mid-sweep, the
    sweep must stop with RedisUnavailable, fail nothing because of it, and have reported
    (to its page-by-page sink, which the CLI prints) every transition it committed: no
    more, no fewer."""
    cfg_path = migrated(tmp_path, own_redis.url, pg_dsn, sweep={"page_size": 5})
    with redis.Redis.from_url(own_redis.url) as r:
        for i in range(60):
            r.hset(f"rq:job:done-{i}", mapping={"status": "finished"})
    ids = [insert_job(pg_dsn, f"done-{i}") for i in range(60)]
    handed: list[str] = []

    async def sweep_until_redis_dies() -> BaseException | None:
        cfg = load(str(cfg_path))
        store = Store(cfg)
        rq = RqState(cfg.redis.url, socket_timeout=2.0)
        await store.connect()
        rec = Reconciler(cfg, store, rq, Workers(rq, Processes()), Metrics())

        async def sink(page: PassReport) -> None:
            handed.extend(str(c.job_id) for c in page.changes)
            if page.changes and own_redis.is_running():
                own_redis.stop()  # right after the first page is written

        try:
            await Sweeper(rec).sweep(on_page=sink)
        except BackendUnavailable as exc:
            return exc
        finally:
            await rq.close()
            await store.close()
        return None

    err = asyncio.run(sweep_until_redis_dies())
    assert isinstance(err, RedisUnavailable), err
    got = statuses(pg_dsn, ids)
    completed = sorted(str(i) for i, s in got.items() if s == "completed")
    assert set(got.values()) <= {"completed", "running"}
    assert 5 <= len(completed) < 60
    assert sorted(handed) == completed
    audited = pg_fetch(pg_dsn, "SELECT job_id FROM rq_reconciler_events")
    assert sorted(str(r["job_id"]) for r in audited) == completed


def test_a_sweep_with_a_page_sink_keeps_no_lists(tmp_path: Path, redis_url: str,
                                                 pg_dsn: str) -> None:
    """Every page's report goes to the sink and nothing is gathered: the sweep's own report
    holds counters only, the rows held for the breaker (failed at the end, read afresh)
    included. A million-row sweep then needs the memory of a page."""
    cfg_path = migrated(tmp_path, redis_url, pg_dsn, sweep={"page_size": 5})
    with redis.Redis.from_url(redis_url) as r:
        for i in range(10):
            r.hset(f"rq:job:done-{i}", mapping={"status": "finished"})
            r.hset(f"rq:job:wait-{i}", mapping={"status": "queued"})
    ids = [insert_job(pg_dsn, f"{kind}-{i}") for i in range(10)
           for kind in ("done", "gone", "wait")]
    pages: list[list[RowChange]] = []

    async def sweep() -> PassReport:
        cfg = load(str(cfg_path))
        store = Store(cfg)
        rq = RqState(cfg.redis.url)
        await store.connect()
        try:
            async def sink(page: PassReport) -> None:
                pages.append(list(page.changes))

            rec = Reconciler(cfg, store, rq, Workers(rq, Processes()), None)
            return await Sweeper(rec).sweep(on_page=sink)
        finally:
            await rq.close()
            await store.close()

    report = asyncio.run(sweep())
    assert (report.checked, report.changed, report.not_found_held) == (30, 20, 10)
    assert (report.changes, report.horse_stops, report.rq_cancels, report.retry_now,
            report.retry_later) == ([], [], [], [], [])
    assert max(len(p) for p in pages) <= 5
    handed = {str(c.job_id): c.error for p in pages for c in p}
    got = statuses(pg_dsn, ids)
    assert handed.keys() == {str(i) for i, s in got.items() if s != "running"}
    assert sorted(handed.values()) == ["Orphaned: RQ job not found"] * 10 + ["Synced: RQ finished"] * 10
    assert report.counts == {"queued": 0, "running": 10}


def test_cancel_intents_are_asked_after_rq_answers(tmp_path: Path, redis_url: str,
                                                   pg_dsn: str) -> None:
    """A cancel changes a job in RQ only after its request is inserted. Asked after RQ's
    answer, the intents cannot miss the cancel that ended a job the pass reads as ended;
    asked before, a pass could sync such a row `failed` instead of `cancelled`. Held for the
    event path's pass and for a sweep's pages."""
    cfg_path = migrated(tmp_path, redis_url, pg_dsn, sweep={"page_size": 2})
    with redis.Redis.from_url(redis_url) as r:
        for i in range(4):
            r.hset(f"rq:job:ended-{i}", mapping={"status": "canceled"})
    ids = [insert_job(pg_dsn, f"ended-{i}") for i in range(4)]
    calls: list[str] = []

    async def go() -> None:
        cfg = load(str(cfg_path))
        store, rq = Store(cfg), RqState(cfg.redis.url)
        real_jobs, real_ids, real_range = rq.read_jobs, store.cancel_intents, \
            store.cancel_intents_between

        async def read_jobs(*a: Any) -> Any:
            calls.append("jobs asked")
            out = await real_jobs(*a)
            calls.append("jobs read")
            return out

        async def intents(*a: Any) -> Any:
            calls.append("intents asked")
            return await real_ids(*a)

        async def intents_between(*a: Any) -> Any:
            calls.append("intents asked")
            return await real_range(*a)

        rq.read_jobs = read_jobs  # type: ignore[method-assign]
        store.cancel_intents = intents  # type: ignore[method-assign]
        store.cancel_intents_between = intents_between  # type: ignore[method-assign]
        await store.connect()
        try:
            rec = Reconciler(cfg, store, rq, Workers(rq, Processes()), None)
            await rec.reconcile_job_ids(ids[:1])
            await Sweeper(rec).sweep(dry_run=True)
        finally:
            await rq.close()
            await store.close()

    asyncio.run(go())
    passes = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(passes) >= 3, calls  # the event pass and two sweep pages at least
    assert all(p == ["jobs asked", "jobs read", "intents asked"] for p in passes), calls


def test_a_cancel_request_being_inserted_does_not_hold_its_row_from_a_batch(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    """An app transaction that inserted a cancel request and has not committed holds KEY
    SHARE on the job's row (the request's foreign key). A batch write must not skip the
    row for it (the UPDATE changes no key column); a transaction that locks the row itself
    (FOR UPDATE) still makes the batch skip it, and say so."""
    cfg = load(str(migrated(tmp_path, redis_url, pg_dsn)))
    shared, held = insert_job(pg_dsn, "rq-shared", "running"), insert_job(pg_dsn, "rq-held", "running")

    def change(jid: int, rq_id: str) -> RowChange:
        return RowChange(jid, "running", "failed", "Synced: RQ failed", "synced", "failed",
                         None, None, False, True, {"rq_id": rq_id})

    async def go() -> tuple[list[Any], list[Any]]:
        store = Store(cfg)
        app = await asyncpg.connect(pg_dsn)
        await store.connect()
        try:
            async with app.transaction():
                await app.execute("INSERT INTO rq_reconciler_cancel_requests (job_id, reason) "
                                  "VALUES ($1, 'in an open transaction')", shared)
                await app.execute("SELECT 1 FROM training_jobs WHERE id = $1 FOR UPDATE", held)
                result = await store.apply([change(shared, "rq-shared"), change(held, "rq-held")])
            return [c.job_id for c in result.applied], [c.job_id for c in result.locked]
        finally:
            await store.close()
            await app.close()

    applied, locked = asyncio.run(go())
    assert applied == [shared]
    assert locked == [held]
    assert statuses(pg_dsn, [shared, held]) == {shared: "failed", held: "running"}


def test_the_sweep_lock_never_outlives_its_sweep(tmp_path: Path, redis_url: str,
                                                  pg_dsn: str) -> None:
    """Pool connections are not reset on release (no RESET ALL / advisory unlock round trip
    after every query), so the session-level sweep lock must be let go explicitly: after a
    normal end, an error in the body, and a cancellation, no advisory lock may remain."""
    cfg = load(str(migrated(tmp_path, redis_url, pg_dsn)))

    def advisory_locks() -> int:
        return int(pg_fetch(pg_dsn, "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'")[0]["n"])

    async def scenarios() -> list[int]:
        store = Store(cfg)
        await store.connect()
        seen: list[int] = []
        try:
            async with store.sweep_lock() as got:
                assert got
            seen.append(await _locks(store))
            with contextlib.suppress(RuntimeError):
                async with store.sweep_lock() as got:
                    assert got
                    raise RuntimeError("the sweep failed")
            seen.append(await _locks(store))

            async def hold_forever() -> None:
                async with store.sweep_lock():
                    await asyncio.Event().wait()

            task = asyncio.create_task(hold_forever())
            await asyncio.sleep(0.2)
            seen.append(await _locks(store))  # held now
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with store.sweep_lock() as got:  # and takeable again at once
                seen.append(int(got))
        finally:
            await store.close()
        return seen

    assert asyncio.run(scenarios()) == [0, 0, 1, 1]
    wait_until(lambda: advisory_locks() == 0, 5, what="no advisory lock left")


def test_no_statement_makes_asyncpg_look_a_type_up(
        tmp_path: Path, redis_url: str, pg_dsn: str, monkeypatch: Any) -> None:
    """asyncpg has no codec of its own for int8[] (nor int4[], uuid[]): the first time a
    connection binds one it looks the type up in the catalog, three round trips and about
    10 ms of server time, at start-up or in the middle of a write or a cancel. Every
    statement that takes a list of ids takes it as text[] (cast by the server), so no
    connection ever does, the ones the pool adds later included."""
    cfg = load(str(migrated(tmp_path, redis_url, pg_dsn, postgres={"pool_size": 3})))
    lookups: list[Any] = []
    real_lookup = asyncpg.connection.Connection._introspect_types

    async def counted(self: Any, typeoids: Any, timeout: Any) -> Any:
        lookups.append(typeoids)
        return await real_lookup(self, typeoids, timeout)

    monkeypatch.setattr(asyncpg.connection.Connection, "_introspect_types", counted)
    jid = insert_job(pg_dsn, "some-rq-id", "running")

    async def go() -> None:
        store = Store(cfg)
        await store.connect(min_size=1)  # the other two are made as the pool grows
        try:
            pages = await asyncio.gather(*(store.rows_by_ids([jid]) for _ in range(3)))
            assert [len(p) for p in pages] == [1, 1, 1]
            assert await store.cancel_intents([jid]) == {}
            req = store.requests
            claimed = await req.claim(5.0, job_ids=[jid])
            assert claimed == []
            await req.extend_lease([1, 2], 5.0)
            assert await req.hand_over([1, 2], "nobody") == 0
            assert await req.finish([1, 2], "cancelled", {}) == []
            done = await store.apply([RowChange(jid, "running", "failed", "boom", "synced")])
            assert [c.job_id for c in done.applied] == [jid]
        finally:
            await store.close()

    asyncio.run(go())
    assert lookups == []
    assert row(pg_dsn, jid)["status"] == "failed"


async def _locks(store: Store) -> int:
    assert store.pool is not None
    return int(await store.pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"))


def test_garbage_in_redis_is_skipped_not_fatal(tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    cfg = migrated(tmp_path, redis_url, pg_dsn)
    r = redis.Redis.from_url(redis_url)
    r.hset("rq:job:weird-status", mapping={"status": "exploded", "worker_name": "w"})
    r.hset("rq:job:no-status", mapping={"origin": "default"})
    r.hset("rq:job:binary", mapping={"status": b"\xff\xfe\x00", "started_at": b"\x80garbage"})
    r.hset("rq:job:bad-exc", mapping={"status": "failed", "exc_info": b"not zlib"})
    r.xadd("rq:results:bad-exc", {"type": "2", "exc_string": "!!not base64!!"})
    r.hset("rq:job:started-no-worker", mapping={"status": "started"})
    r.hset("rq:job:started-ghost", mapping={"status": "started", "worker_name": "ghost",
                                            "started_at": "yesterday"})
    ids = {k: insert_job(pg_dsn, k) for k in
           ("weird-status", "no-status", "binary", "bad-exc", "started-no-worker", "started-ghost")}
    ids["odd id ✓ '; --"] = insert_job(pg_dsn, "odd id ✓ '; --")
    # Ids travel to Redis joined by newlines: one holding a newline must not be read as
    # the two jobs its halves name (both finished here). RQ cannot make such an id.
    r.hset("rq:job:split", mapping={"status": "finished"})
    r.hset("rq:job:me", mapping={"status": "finished"})
    ids["split\nme"] = insert_job(pg_dsn, "split\nme")
    ids["finished-neighbour"] = insert_job(pg_dsn, "me")
    out = sweep_json(cfg)
    assert out["_rc"] == 0, out["_stderr"]
    got = statuses(pg_dsn, list(ids.values()))
    assert got[ids["weird-status"]] == "running"
    assert got[ids["no-status"]] == "running"
    assert got[ids["binary"]] == "running"
    assert got[ids["bad-exc"]] == "failed"
    assert row(pg_dsn, ids["bad-exc"])["error_message"] == "Synced: RQ failed"
    # started, but no live worker anywhere: orphaned
    assert got[ids["started-no-worker"]] == "failed"
    assert got[ids["started-ghost"]] == "failed"
    assert "ghost" in row(pg_dsn, ids["started-ghost"])["error_message"]
    assert got[ids["odd id ✓ '; --"]] == "failed"
    assert row(pg_dsn, ids["split\nme"])["error_message"] == "Orphaned: RQ job not found"
    assert got[ids["finished-neighbour"]] == "completed"
    r.close()


def test_unknown_table_or_column_is_a_clear_error(tmp_path: Path, redis_url: str,
                                                  pg_dsn: str) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, jobs={"table": "nope"})
    p = run_cli(cfg, "sweep")
    assert p.returncode == 1 and "'nope'" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(cfg, "migrate")
    assert p.returncode == 1 and "nope" in p.stderr and "Traceback" not in p.stderr
    cfg = migrated(tmp_path, redis_url, pg_dsn)
    cfg2 = write_config(tmp_path / "c2.toml", redis_url, pg_dsn, jobs={"status_column": "state"})
    p = run_cli(cfg2, "sweep")
    assert p.returncode == 1 and "state" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(cfg2, "check")
    assert p.returncode == 1
    assert any(ln.startswith("FAIL jobs.status_column") for ln in p.stdout.splitlines())
    assert cfg.exists()


def test_check_reports_each_line(tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    p = run_cli(cfg, "check")
    assert p.returncode == 1  # not migrated yet
    assert "FAIL schema" in p.stdout and "rq-reconciler migrate" in p.stdout
    assert run_cli(cfg, "migrate").returncode == 0
    p = run_cli(cfg, "check")
    assert p.returncode == 0, p.stdout
    for what in ("config", "redis", "postgres", "jobs table", "rq id index", "schema",
                 "keyspace events"):
        assert any(what in ln for ln in p.stdout.splitlines()), what
    pg_fetch(pg_dsn, "DROP INDEX training_jobs_rq_job_id_idx")
    p = run_cli(cfg, "check")
    assert p.returncode == 0
    assert any(ln.startswith("WARN rq id index") and "CREATE INDEX" in ln
               for ln in p.stdout.splitlines())
    bad = write_config(tmp_path / "bad.toml", "redis://:hunter2@127.0.0.1:1/0",
                       "postgresql://u:hunter2@127.0.0.1:1/db")
    p = run_cli(bad, "check")
    assert p.returncode == 1
    assert "hunter2" not in p.stdout + p.stderr
    assert "FAIL redis" in p.stdout and "FAIL postgres" in p.stdout


def test_migrate_is_idempotent_and_fk_refuses_unknown_job(tmp_path: Path, redis_url: str,
                                                          pg_dsn: str) -> None:
    cfg = migrated(tmp_path, redis_url, pg_dsn)
    assert run_cli(cfg, "migrate").returncode == 0
    sql = run_cli(cfg, "migrate", "--print-sql")
    assert sql.returncode == 0 and "REFERENCES \"training_jobs\" (\"id\")" in sql.stdout
    p = run_cli(cfg, "cancel", "999999")
    assert p.returncode == 1 and "no job with id = '999999'" in p.stderr


def test_a_locked_row_is_skipped_not_waited_for(tmp_path: Path, redis_url: str,
                                                pg_dsn: str) -> None:
    """An app transaction (or another replica) holding one row's lock must not stall a
    batch: that row comes back as locked at once, the rest are applied, and no lock cycle
    (which PostgreSQL would break by failing one statement whole) can form. The locked row
    is applied when it is tried again."""
    cfg = load(str(migrated(tmp_path, redis_url, pg_dsn)))
    a, b = insert_job(pg_dsn, "dl-a"), insert_job(pg_dsn, "dl-b")

    def change(i: int) -> RowChange:
        return RowChange(i, "running", "completed", "Synced: RQ finished", "synced", "finished")

    async def held() -> tuple[list[int], list[int], list[int]]:
        store = Store(cfg)
        await store.connect()
        other = await asyncpg.connect(pg_dsn)
        try:
            tx = other.transaction()
            await tx.start()
            await other.execute("UPDATE training_jobs SET error_message = 'x' WHERE id = $1", b)
            first = await asyncio.wait_for(store.apply([change(a), change(b)]), 5)
            # the other session may now take a as well: ours holds nothing any more
            await asyncio.wait_for(other.execute(
                "UPDATE training_jobs SET error_message = 'y' WHERE id = $1", a), 5)
            await tx.commit()
            again = await store.apply(first.locked)
            return ([c.job_id for c in first.applied], [c.job_id for c in first.locked],
                    [c.job_id for c in again.applied])
        finally:
            await other.close()
            await store.close()

    assert asyncio.run(held()) == ([a], [b], [b])
    assert statuses(pg_dsn, [a, b]) == {a: "completed", b: "completed"}
    assert len(transitions(pg_dsn, a)) == len(transitions(pg_dsn, b)) == 1
