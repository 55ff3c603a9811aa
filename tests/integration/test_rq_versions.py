"""RQ 2 and RQ 3 workers, side by side: what the daemon reads of each, how it proves their
horses and how it stops them. Real redis-server, PostgreSQL and `rq worker` processes of
both series (tests that take the `workers` fixture run once per series)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import rq.defaults

from reconciler.devstack import (
    SPAWN_WORKER,
    DaemonProc,
    WorkerPool,
    enqueue,
    insert_job,
    metric_value,
    migrate,
    pid_alive,
    request_cancel,
    row,
    rq_status,
    run_cli,
    wait_request,
    wait_status,
    wait_until,
    write_config,
)
from reconciler.model import RqStatus
from reconciler.processes import HORSE_SLACK_SECONDS, Processes
from reconciler.rq_layout import Layout, worker_gone_reason
from reconciler.rq_state import RqState
from reconciler.workers import Candidate, Workers
from tests.decoy_worker import MARKER_ENV

RQ3_IMPORTED = hasattr(rq.defaults, "RQ_KEY_PREFIX")
EVENTS_ONLY = {"interval_seconds": 3600.0, "fallback_interval_seconds": 3600.0,
               "min_age_seconds": 60.0}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Any]:
    made: list[DaemonProc] = []

    def make(cfg: Path, name: str = "d") -> DaemonProc:
        d = DaemonProc(cfg, tmp_path / f"{name}-{len(made)}.log", name=name)
        made.append(d)
        d.start()
        return d

    yield make
    for d in made:
        d.close()


def config(tmp_path: Path, redis_url: str, pg_dsn: str, name: str = "config",
           **sections: dict[str, Any]) -> Path:
    sections.setdefault("sweep", EVENTS_ONLY)
    sections.setdefault("cancel", {"grace_seconds": 5.0})
    cfg = write_config(tmp_path / f"{name}.toml", redis_url, pg_dsn, **sections)
    migrate(cfg)
    return cfg


def started(marker: Path) -> bool:
    return "STARTED" in marker.read_text()


def assert_graceful(req: dict[str, Any], marker: Path) -> None:
    """The cancel ended `cancelled` and the job's own SIGTERM handler ran: nothing harder
    came first (RQ's stop commands and SIGKILL end a horse without running its Python).
    Which stop the outcome lists is not judged here: the event path may stop the horse for
    a pending request a moment before the request's own flow gets to it."""
    assert req["outcome"] == "cancelled", req
    assert "SIGTERM" in marker.read_text(), (marker.read_text(), req)


def in_redis(redis_url: str, fn: Any) -> Any:
    async def go() -> Any:
        rq = RqState(redis_url)
        try:
            return await fn(rq)
        finally:
            await rq.close()
    return asyncio.run(go())


# -- reading ---------------------------------------------------------------------------------


def test_each_workers_layout_is_read_from_redis(redis_url: str, workers: WorkerPool,
                                                 rq_version: str, tmp_marker: Path) -> None:
    w = workers()
    rq_id = enqueue(redis_url, "tests.jobs.touch_and_sleep", 30, str(tmp_marker))
    wait_until(lambda: started(tmp_marker), 20, what="job running")
    horse = psutil.Process(w.wait_horse())
    rec = in_redis(redis_url, lambda rq: rq.read_workers([w.name]))[w.name]
    assert rec.version.startswith(f"{rq_version}.")
    assert rec.layout is (Layout.RQ3 if rq_version == "3" else Layout.RQ2)
    assert rec.current_job == rq_id and rec.executions == 1 and rec.provable
    # a busy worker's heartbeat gives its hash job_monitoring_interval + 60 s (90 s)
    assert not rec.persistent and rec.expires_in is not None and 60 < rec.expires_in <= 90
    assert not rec.heartbeat_late
    # both versions keep an execution record; RQ 3 also names it in the worker's set
    job, execution = w.current_execution()
    assert job == rq_id
    if rq_version == "3":
        assert rec.execution_id == execution
    assert rec.execution_id
    # the execution is written before the horse is forked: it bounds the horse's age (a
    # process's create time is known to about a second: the proof allows the same slack)
    assert rec.execution_created_at is not None
    assert rec.execution_created_at.timestamp() <= horse.create_time() + HORSE_SLACK_SECONDS
    w.kill_horses()
    wait_until(lambda: rq_status(redis_url, rq_id) == "failed", 20, what="job failed")
    idle = in_redis(redis_url, lambda rq: rq.read_workers([w.name]))[w.name]
    assert idle.current_job is None and idle.execution_id is None


def test_a_worker_name_the_read_cannot_carry_is_unreadable_not_gone(redis_url: str) -> None:
    """Names travel to the read script joined by newlines: one holding a newline is not
    asked about, and that must never read as a missing (dead) worker."""
    recs = in_redis(redis_url, lambda rq: rq.read_workers(["bad\nname", "absent"]))
    assert recs["bad\nname"].unreadable
    assert worker_gone_reason(recs["bad\nname"], "bad\nname") == ""
    assert not recs["absent"].exists
    assert worker_gone_reason(recs["absent"], "absent") != ""


def test_executions_key_events_wake_their_worker(redis_url: str) -> None:
    """RQ 3 touches `rq:worker:<name>:executions` on every heartbeat; that is an event about
    worker <name>, not about a worker called `<name>:executions` (whose hash would be
    read with HMGET and answer WRONGTYPE)."""
    with redis.Redis.from_url(redis_url) as r:
        r.config_set("notify-keyspace-events", "Kghx")

    async def go() -> list[tuple[str, str, str]]:
        rq = RqState(redis_url)
        got: list[tuple[str, str, str]] = []
        gen = rq.keyspace_events()
        try:
            async for kind, ident, event in gen:
                if kind == "subscribed":
                    with redis.Redis.from_url(redis_url) as r:
                        r.sadd("rq:worker:w1:executions", "job1:ex1")
                        r.expire("rq:worker:w1:executions", 60)
                        r.delete("rq:worker:w1:executions")
                        r.hset("rq:worker:w2", "last_heartbeat", "x")
                    continue
                got.append((kind, ident, event))
                if ident == "w2":
                    return got
        finally:
            await gen.aclose()
            await rq.close()
        return got

    got = asyncio.run(asyncio.wait_for(go(), 10))
    assert got == [("worker", "w1", "expire"), ("worker", "w1", "del"),
                   ("worker", "w2", "hset")]


# -- proving a horse -------------------------------------------------------------------------


def test_a_rerun_of_the_same_job_id_is_not_the_horse_proven_before(
        redis_url: str, tmp_path: Path) -> None:
    """A candidate found while the worker ran execution E1 is not proven once the worker
    names E2, a new run of the same job id; the job id alone cannot tell them apart."""
    pool = WorkerPool(redis_url, log_dir=tmp_path, rq_version="3")
    try:
        w = pool.start()
        marker = tmp_path / "m"
        marker.touch()
        rq_id = enqueue(redis_url, "tests.jobs.sleep", 0.3, job_id="rerun-1")
        wait_until(lambda: w.current_job_id() == rq_id, 10, what="first run")
        first = w.current_execution()[1]
        wait_until(lambda: rq_status(redis_url, rq_id) == "finished", 20, what="first run ended")
        enqueue(redis_url, "tests.jobs.touch_and_sleep", 30, str(marker), job_id=rq_id)
        wait_until(lambda: started(marker), 20, what="second run")
        second = w.current_execution()[1]
        assert first and second and first != second
        horse = w.wait_horse()

        async def confirm(execution: str) -> bool:
            rq = RqState(redis_url)
            try:
                procs = Processes()
                rec = (await rq.read_workers([w.name]))[w.name]
                ident = procs.find_horse(rec, rq_id, None)
                assert ident is not None and ident.pid == horse
                ws = Workers(rq, procs)
                await ws.confirm_horses({rq_id: Candidate(w.name, ident, execution)})
                return procs.horses.get(rq_id) is not None
            finally:
                await rq.close()

        assert asyncio.run(confirm(first)) is False
        assert asyncio.run(confirm(second)) is True
    finally:
        pool.stop_all()


def test_stop_execution_spares_a_rerun_of_the_same_job_id(redis_url: str, tmp_path: Path) -> None:
    """A stop meant for a run that has ended never stops the next run of the same job id:
    RQ 3 workers are told which execution to stop."""
    pool = WorkerPool(redis_url, log_dir=tmp_path, rq_version="3")
    try:
        w = pool.start()
        marker = tmp_path / "m"
        marker.touch()
        rq_id = enqueue(redis_url, "tests.jobs.touch_and_sleep", 1, str(marker), job_id="rerun-2")
        wait_until(lambda: started(marker), 20, what="first run")
        stale = in_redis(redis_url, lambda rq: rq.read_workers([w.name]))[w.name]
        assert stale.current_job == rq_id and stale.execution_id
        wait_until(lambda: rq_status(redis_url, rq_id) == "finished", 20, what="first run ended")
        marker.write_text("")
        enqueue(redis_url, "tests.jobs.touch_and_sleep", 30, str(marker), job_id=rq_id)
        wait_until(lambda: started(marker), 20, what="second run")
        horse = w.wait_horse()
        # sent with what was read during the first run: the worker hears it, and ignores it
        assert in_redis(redis_url, lambda rq: rq.send_stop_job(w.name, rq_id, stale)) == 1
        time.sleep(1.5)
        assert pid_alive(horse) and rq_status(redis_url, rq_id) == "started"
        fresh = in_redis(redis_url, lambda rq: rq.read_workers([w.name]))[w.name]
        assert in_redis(redis_url, lambda rq: rq.send_stop_job(w.name, rq_id, fresh)) == 1
        wait_until(lambda: rq_status(redis_url, rq_id) == "stopped", 20, what="second run stopped")
        assert not pid_alive(horse)
    finally:
        pool.stop_all()


def test_spawn_worker_horse_gets_sigterm_first(tmp_path: Path, redis_url: str, pg_dsn: str,
                                               workers: WorkerPool, daemons: Any,
                                               tmp_marker: Path) -> None:
    """A SpawnWorker's horse is a new interpreter, not a fork; it is proven (its
    environment names the job's execution) and stopped gracefully like any other."""
    daemons(config(tmp_path, redis_url, pg_dsn))
    workers(worker_class=SPAWN_WORKER)
    rq_id = enqueue(redis_url, "tests.jobs.trap_sigterm", 60, str(tmp_marker))
    jid = insert_job(pg_dsn, rq_id)
    wait_until(lambda: started(tmp_marker), 30, what="job running")
    req = wait_request(pg_dsn, request_cancel(pg_dsn, jid))
    assert req["outcome"] == "cancelled", req
    assert_graceful(req, tmp_marker)


def test_a_worker_whose_layout_cannot_be_told_never_has_a_horse_signalled(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: WorkerPool, daemons: Any,
        tmp_marker: Path) -> None:
    """A worker hash whose version is one no RQ this package knows wrote: what it says
    about its job proves nothing, so its horse gets no signal from the daemon; RQ's own
    stop-job (which every RQ version obeys) stops the job instead."""
    d = daemons(config(tmp_path, redis_url, pg_dsn, cancel={"grace_seconds": 1.0}))
    w = workers()
    with redis.Redis.from_url(redis_url) as r:
        r.hset(w.key, "version", "9.0.0")
    rq_id = enqueue(redis_url, "tests.jobs.trap_sigterm", 60, str(tmp_marker))
    jid = insert_job(pg_dsn, rq_id)
    wait_until(lambda: started(tmp_marker), 30, what="job running")
    rec = in_redis(redis_url, lambda rq: rq.read_workers([w.name]))[w.name]
    assert rec.layout is Layout.UNKNOWN and not rec.provable
    req = wait_request(pg_dsn, request_cancel(pg_dsn, jid))
    assert req["outcome"] == "cancelled", req
    assert req["detail"]["horse_signals"] == ["stop-job"], req
    assert "SIGTERM" not in tmp_marker.read_text()
    text = d.scrape()
    assert metric_value(text, "rq_reconciler_process_signals_total", signal="SIGTERM") == 0
    assert metric_value(text, "rq_reconciler_process_signals_total", signal="SIGKILL") == 0


@pytest.mark.parametrize("worker_class", ["tests.decoy_worker.DecoyWorker",
                                          "tests.decoy_worker.DecoySpawnWorker"])
def test_a_decoy_naming_another_execution_is_never_signalled(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: WorkerPool, daemons: Any,
        tmp_marker: Path, worker_class: str) -> None:
    """Beside the horse, the worker has a second child that passes every structural test
    (its child, group leader, same interpreter, young enough) but whose environment names
    another execution. It is never signalled; the horse is still proven and gets SIGTERM
    (without the environment, the two would be indistinguishable and neither signalled)."""
    decoy_marker = tmp_path / "decoy"
    decoy_marker.touch()
    daemons(config(tmp_path, redis_url, pg_dsn))
    workers(worker_class=worker_class, extra_env={MARKER_ENV: str(decoy_marker)})
    rq_id = enqueue(redis_url, "tests.jobs.trap_sigterm", 60, str(tmp_marker))
    jid = insert_job(pg_dsn, rq_id)
    wait_until(lambda: started(tmp_marker), 30, what="job running")
    decoy_pid = int(wait_until(lambda: decoy_marker.read_text().split(), 10,
                               what="decoy running")[1])
    req = wait_request(pg_dsn, request_cancel(pg_dsn, jid))
    assert req["outcome"] == "cancelled", req
    assert_graceful(req, tmp_marker)
    assert "DECOY-SIGNAL" not in decoy_marker.read_text()
    assert pid_alive(decoy_pid)


# -- a key prefix ------------------------------------------------------------------------------


def test_a_custom_key_prefix(tmp_path: Path, redis_url: str, pg_dsn: str, daemons: Any) -> None:
    """RQ 3 workers under RQ_KEY_PREFIX=myapp, and redis.key_prefix = "myapp": every key
    the daemon reads, every event it hears and every command it sends is under that
    prefix. RQ fixes its prefix when it is imported and RQ 2 has none: a daemon whose rq
    cannot write under the prefix refuses to start, saying so."""
    cfg = write_config(tmp_path / "config.toml", redis_url, pg_dsn, sweep=EVENTS_ONLY,
                       redis={"key_prefix": "myapp"})
    pool = WorkerPool(redis_url, log_dir=tmp_path, rq_version="3", key_prefix="myapp")
    try:
        w = pool.start()
        marker = tmp_path / "m"
        marker.touch()
        long = enqueue(redis_url, "tests.jobs.trap_sigterm", 60, str(marker), key_prefix="myapp")
        wait_until(lambda: started(marker), 30, what="job running")

        async def read(rq: RqState) -> Any:
            return (await rq.read_jobs([long]))[long], (await rq.read_workers([w.name]))[w.name]

        job, rec = in_redis_prefixed(redis_url, "myapp", read)
        assert job.status is RqStatus.STARTED and job.worker_name == w.name
        assert rec.layout is Layout.RQ3 and rec.current_job == long and rec.subscribers == 1
        with redis.Redis.from_url(redis_url) as r:
            assert r.keys("rq:*") == []
        if not RQ3_IMPORTED:
            # every command that talks to RQ, before it connects anywhere (migrate never
            # touches Redis, so it has nothing to refuse)
            for command in ("sweep", "run"):
                p = run_cli(cfg, command)
                assert p.returncode == 2 and "install rq>=3" in p.stderr, (command, p.stderr)
            return
        migrate(cfg)
        d = daemons(cfg)
        pool.start()  # the first one is busy with the long job
        # the app's order: its row first, then the RQ job
        ok = insert_job(pg_dsn, "prefixed-ok", status="queued", started_ago=None)
        enqueue(redis_url, "tests.jobs.succeed", 2, job_id="prefixed-ok", key_prefix="myapp")
        wait_status(pg_dsn, ok, "completed")
        req = wait_request(pg_dsn, request_cancel(pg_dsn, insert_job(pg_dsn, long)))
        assert req["outcome"] == "cancelled", req
        assert_graceful(req, marker)
        assert rq_status(redis_url, long, key_prefix="myapp") == "canceled"
        queued = enqueue(redis_url, "tests.jobs.succeed", 1, queue="nobody", key_prefix="myapp")
        req = wait_request(pg_dsn, request_cancel(pg_dsn, insert_job(pg_dsn, queued)))
        assert req["outcome"] == "cancelled" and req["detail"]["rq_cancelled"] is True, req
        assert rq_status(redis_url, queued, key_prefix="myapp") == "canceled"
        with redis.Redis.from_url(redis_url) as r:
            assert r.keys("rq:*") == []
        assert [e for e in d.log_events() if e.get("level") == "error"] == []
    finally:
        pool.stop_all()


def in_redis_prefixed(redis_url: str, prefix: str, fn: Any) -> Any:
    async def go() -> Any:
        rq = RqState(redis_url, key_prefix=prefix)
        try:
            return await fn(rq)
        finally:
            await rq.close()
    return asyncio.run(go())


# -- fleets ------------------------------------------------------------------------------------


def test_a_mixed_fleet_on_one_redis(tmp_path: Path, redis_url: str, pg_dsn: str,
                                    daemons: Any) -> None:
    """RQ 2 and RQ 3 workers at once: each is read in its own layout, each running job is
    stopped gracefully, each finished or failed job is synced."""
    d = daemons(config(tmp_path, redis_url, pg_dsn))
    pool = WorkerPool(redis_url, log_dir=tmp_path)
    try:
        fleet = {v: pool.start(queues=(f"q{v}",), rq_version=v) for v in ("2", "3")}
        markers = {v: tmp_path / f"m{v}" for v in fleet}
        rows: dict[str, dict[str, int]] = {}
        for v, m in markers.items():
            m.touch()
            q = f"q{v}"
            # the app's order: its row first, then the RQ job
            rows[v] = {kind: insert_job(pg_dsn, f"{kind}-{v}", status="queued", started_ago=None)
                       for kind in ("ok", "bad", "long")}
            enqueue(redis_url, "tests.jobs.succeed", 2, queue=q, job_id=f"ok-{v}")
            enqueue(redis_url, "tests.jobs.fail", f"boom {v}", queue=q, job_id=f"bad-{v}")
            enqueue(redis_url, "tests.jobs.trap_sigterm", 60, str(m), queue=q, job_id=f"long-{v}")
        for v in fleet:
            wait_status(pg_dsn, rows[v]["ok"], "completed")
            r = wait_status(pg_dsn, rows[v]["bad"], "failed")
            assert r["error_message"] == f"Synced: RQ failed: RuntimeError: boom {v}"
            wait_until(lambda m=markers[v]: started(m), 20, what=f"RQ {v} job running")
        layouts = in_redis(redis_url, lambda rq: rq.read_workers([w.name for w in fleet.values()]))
        assert layouts[fleet["2"].name].layout is Layout.RQ2
        assert layouts[fleet["3"].name].layout is Layout.RQ3
        reqs = {v: request_cancel(pg_dsn, rows[v]["long"]) for v in fleet}
        for v, rid in reqs.items():
            req = wait_request(pg_dsn, rid)
            assert req["outcome"] == "cancelled", (v, req)
            assert_graceful(req, markers[v])
        assert "WRONGTYPE" not in d.log_text()
        assert [e for e in d.log_events() if e.get("level") == "error"] == []
    finally:
        pool.stop_all()


def test_twenty_cancels_across_two_replicas_all_start_with_sigterm(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: WorkerPool, daemons: Any) -> None:
    """Four rounds of five running jobs, each cancelled through one of two replicas: every
    job's own SIGTERM handler runs (no stop command or SIGKILL came first)."""
    cfgs = [config(tmp_path, redis_url, pg_dsn, name=f"r{i}", instance={"name": f"r{i}"},
                   cancel={"grace_seconds": 5.0}) for i in range(2)]
    replicas = [daemons(c, name=f"r{i}") for i, c in enumerate(cfgs)]
    for _ in range(5):
        workers.start(wait=False)
    for w in workers.workers:
        w.wait_registered()
    markers: list[Path] = []
    for rnd in range(4):
        batch: list[tuple[int, Path]] = []
        for i in range(5):
            m = tmp_path / f"m{rnd}-{i}"
            m.touch()
            markers.append(m)
            batch.append((insert_job(pg_dsn, enqueue(redis_url, "tests.jobs.trap_sigterm", 60,
                                                     str(m))), m))
        wait_until(lambda batch=batch: all(started(m) for _, m in batch), 30,
                   what=f"round {rnd} running")
        reqs = [request_cancel(pg_dsn, jid, by=f"r{i % 2}") for i, (jid, _) in enumerate(batch)]
        for rid in reqs:
            assert wait_request(pg_dsn, rid)["outcome"] == "cancelled"
    assert [m.name for m in markers if "SIGTERM" not in m.read_text()] == []
    for d in replicas:
        assert "WRONGTYPE" not in d.log_text()


def test_rq_cancel_never_overwrites_what_a_worker_wrote_after_the_look(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """RQ's Job.cancel() sets "canceled" whatever the job's status by then. A worker that
    finishes the job between our look and the cancel must keep its "finished": the look
    and the cancel are one WATCHed transaction, and the changed job is looked at again."""
    from rq import Queue

    from reconciler import rq_api

    with redis.Redis.from_url(redis_url) as r:
        rq_id = Queue("default", connection=r).enqueue("tests.jobs.succeed", 1).id
    looks: list[str] = []
    real_fetch = rq_api._fetch

    def fetch_then_worker_finishes(client: Any, job_id: str) -> Any:
        job = real_fetch(client, job_id)
        looks.append(str(job.get_status(refresh=False)) if not isinstance(job, str) else job)
        if len(looks) == 1:  # the worker writes, from its own connection, right after
            with redis.Redis.from_url(redis_url) as w:
                w.hset(f"rq:job:{job_id}", "status", "finished")
        return job

    monkeypatch.setattr(rq_api, "_fetch", fetch_then_worker_finishes)
    got = in_redis(redis_url, lambda rq: rq.cancel_job(rq_id, only_from=(RqStatus.QUEUED,)))
    assert len(looks) == 2, looks  # EXEC refused the first attempt: looked at again
    assert got == "not_canceled (finished)"
    assert rq_status(redis_url, rq_id) == "finished"


def test_rq_cancel_survives_an_execution_ending_under_it(redis_url: str, workers: WorkerPool,
                                                         tmp_marker: Path) -> None:
    """RQ's Job.cancel() on a started job reads every execution in the job's execution
    registry; one whose hash is gone (it ended; the registry entry outlives it by a
    minute) makes RQ raise ValueError('Execution ... not found'). That is an answer
    ("not canceled"), never an error that ends the cancel."""
    workers()
    rq_id = enqueue(redis_url, "tests.jobs.touch_and_sleep", 30, str(tmp_marker))
    wait_until(lambda: started(tmp_marker), 20, what="job running")
    with redis.Redis.from_url(redis_url) as r:
        r.zadd(f"rq:executions:{rq_id}", {"ended-execution": time.time() + 3600})
    got = in_redis(redis_url, lambda rq: rq.cancel_job(rq_id, only_from=(RqStatus.STARTED,)))
    assert got.startswith("not_canceled") and "Execution" in got
    assert rq_status(redis_url, rq_id) == "started"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_minute_of_four_busy_rq3_workers_logs_no_error(tmp_path: Path, redis_url: str,
                                                         pg_dsn: str, daemons: Any) -> None:
    """Heartbeats of RQ 3 workers (their executions sets included), jobs that finish, fail
    and are cancelled, for 60 s: the daemon logs no WRONGTYPE and no error."""
    d = daemons(config(tmp_path, redis_url, pg_dsn, cancel={"grace_seconds": 1.0}))
    pool = WorkerPool(redis_url, log_dir=tmp_path, rq_version="3")
    try:
        for _ in range(4):
            # heartbeats every second instead of every 30 s
            pool.start(wait=False, extra_args=["--job-monitoring-interval", "1"])
        for w in pool.workers:
            w.wait_registered()
        rows: list[int] = []
        t_end = time.monotonic() + 60
        n = 0
        while time.monotonic() < t_end:
            n += 1
            rq_id = str(uuid.uuid4())  # the row first, as an app writes it
            rows.append(insert_job(pg_dsn, rq_id, status="queued", started_ago=None))
            if n % 7 == 0:
                enqueue(redis_url, "tests.jobs.fail", "expected", job_id=rq_id)
            elif n % 5 == 0:
                m = tmp_path / f"m{n}"
                m.touch()
                enqueue(redis_url, "tests.jobs.trap_sigterm", 3, str(m), job_id=rq_id)
            else:
                enqueue(redis_url, "tests.jobs.sleep", 0.5 + (n % 3), job_id=rq_id)
            if n % 5 == 0:
                wait_until(lambda m=m: started(m), 30, what="job to cancel running")
                request_cancel(pg_dsn, rows[-1])
            time.sleep(0.4)
        wait_until(lambda: all(s not in ("queued", "running") for s in
                               _statuses(pg_dsn, rows)), 60, what="every row terminal",
                   interval=0.2)
        log = d.log_text()
        assert "WRONGTYPE" not in log
        assert [e for e in d.log_events() if e.get("level") in ("error", "critical")] == []
        assert [e for e in d.log_events() if str(e.get("event", "")).startswith("poison")] == []
        assert n > 100
    finally:
        pool.stop_all()


def _statuses(pg_dsn: str, ids: list[int]) -> list[str]:
    from reconciler.devstack import statuses

    return list(statuses(pg_dsn, ids).values())


def test_a_cancel_in_the_wrong_redis_db_fails_and_leaves_the_job_running(
        tmp_path: Path, redis_url: str, pg_dsn: str, workers: WorkerPool, daemons: Any,
        tmp_marker: Path) -> None:
    """A daemon pointed at db 1 while the workers use db 0 cannot see the job: "not found"
    there, with no worker registered there either, is no proof that it ended. The outcome
    is `failed` (success false, the db and prefix named, the RQ status seen), the row stays
    `running`, and the job runs on untouched. In the right db, a job whose hash is gone is
    cancelled as before, and its outcome says what RQ said."""
    wrong = redis_url.rsplit("/", 1)[0] + "/1"
    cfg = config(tmp_path, wrong, pg_dsn, name="wrong-db")
    daemon = daemons(cfg, name="wrong-db")
    workers()
    rq_id = enqueue(redis_url, "tests.jobs.trap_sigterm", 6, str(tmp_marker))
    wait_until(lambda: started(tmp_marker), 30, what="job running")
    jid = insert_job(pg_dsn, rq_id)
    req = wait_request(pg_dsn, request_cancel(pg_dsn, jid))
    assert req["outcome"] == "failed", req
    detail = req["detail"]
    assert detail["success"] is False and detail["rq_status"] == "missing", detail
    assert "db 1, key prefix 'rq'" in detail["message"], detail
    assert "rq:workers is empty" in detail["message"], detail
    assert "the row is left running" in detail["message"], detail
    assert row(pg_dsn, jid)["status"] == "running"
    wait_until(lambda: rq_status(redis_url, rq_id) == "finished", 30, what="the job to finish")
    assert "SIGTERM" not in tmp_marker.read_text()
    assert "cancel_done" in daemon.log_text()
    assert daemon.stop() == 0

    # The right db: a job whose hash is gone (deleted, expired) is cancelled, as before.
    cfg_ok = config(tmp_path, redis_url, pg_dsn, name="right-db")
    daemons(cfg_ok, name="right-db")
    gone = insert_job(pg_dsn, "no-such-rq-job")
    req = wait_request(pg_dsn, request_cancel(pg_dsn, gone))
    assert req["outcome"] == "cancelled" and req["detail"]["rq_status"] == "missing", req
