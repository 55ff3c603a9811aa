"""Chaos: jobs complete, fail and get cancelled while a chaos loop SIGKILLs daemons,
restarts Redis and restarts (or crashes) Postgres under them. Seeded; prints a summary.

At the end: every request is done, every row matches RQ, no row that was seen terminal
was ever seen otherwise, no transition was applied twice, no daemon died on its own, no
row was failed as an orphan of a worker that was alive, and no daemon printed a
traceback. Redis runs with appendfsync=always, as a production Redis that survives a
restart would: a restart loses connections and pub/sub subscriptions, not data.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue

from reconciler.devstack import (
    DaemonProc,
    Pg,
    PostgresServer,
    RedisServer,
    WorkerPool,
    create_jobs_table,
    migrate,
    pid_alive,
    write_config,
)
from reconciler.devstack import wait_until as wait_until_
from tests.faults.common import (
    ACTIVE,
    audit_problems,
    error_lines,
    log_events,
    request_problems,
    row_rq_mismatches,
    rq_statuses,
    terminal_transitions,
)

# Error-level events a daemon may log while backends die under it.
CHAOS_ERRORS_OK: set[str] = set()
# Seconds of calm after which a job a dead worker left behind is failed by RQ's own
# maintenance, run by the test (run_rq_maintenance); and how often it is run again after
# that (an abandoned execution is failed only once its heartbeat has expired).
MAINTENANCE_AFTER = 30.0
MAINTENANCE_EVERY = 10.0

KINDS = {  # kind -> weight
    "complete": 30, "fail": 10, "parked": 20, "hog": 10, "racy": 30,
}


@dataclass(frozen=True)
class Plan:
    jobs: int
    daemon_kills: int
    redis_restarts: int
    pg_restarts: int
    feed_seconds: float
    converge_seconds: float
    replicas: int = 2
    workers: int = 3
    seed: int = 20261129


@dataclass
class World:
    tmp: Path
    redis: RedisServer
    pg: PostgresServer
    dsn: str
    daemons: list[DaemonProc]
    pool: WorkerPool
    t0: float = field(default_factory=time.monotonic)
    log: list[tuple[float, str, float]] = field(default_factory=list)  # (at, what, seconds)
    problems: list[str] = field(default_factory=list)
    dead_workers: set[str] = field(default_factory=set)
    restarts: Counter[str] = field(default_factory=Counter)
    killed: set[str] = field(default_factory=set)  # daemons we SIGKILLed, until restarted
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str, seconds: float = 0.0) -> None:
        with self.lock:
            self.log.append((time.monotonic() - self.t0, what, seconds))

    def supervise(self) -> None:
        """What systemd would do: restart a daemon or worker that died by itself (and
        remember that it did: for a daemon that is a failure of the test)."""
        for d in self.daemons:
            if d.name in self.killed or d.proc is None or d.proc.poll() is None:
                continue
            rc = d.proc.returncode
            self.problems.append(f"daemon {d.name} exited by itself with {rc}")
            d.stop()
            d.start(wait_ready=False)
            self.restarts[f"{d.name} (self-exit)"] += 1
        for w in list(self.pool.workers):
            if not w.is_alive():
                self.dead_workers.add(w.name)
                self.pool.workers.remove(w)
                w.stop()  # reap it and any horse it left
                self.pool.start(wait=False)
                self.note(f"worker {w.name} died; replaced")


def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2,
                                socket_timeout=5)


def run_rq_maintenance(redis_url: str, queue: str) -> list[str]:
    """RQ's own maintenance of `queue`, run now, with RQ's own calls: what a worker's
    maintenance pass does every ten minutes, longer than this test waits. The ids it failed.

    Two ways a job is left behind by a worker that died (here: when Redis went down under
    it) and that only this maintenance ends; until then the row says `queued`, as RQ does:
    - the worker dequeued it (BLMOVE into the intermediate list) and died before it made an
      execution: RQ fails it once it has sat there a while, if it is in no started
      registry ("Job was stuck in intermediate queue");
    - the worker made an execution (the job is in the started registry) and died before its
      horse marked the job started: RQ fails it as abandoned once that execution's
      heartbeat has expired (StartedJobRegistry.cleanup). The intermediate-list pass skips
      such a job, as RQ's own does."""
    from rq.intermediate_queue import IntermediateQueue
    from rq.job import Job, JobStatus
    from rq.registry import FailedJobRegistry
    from rq.worker import Worker

    failed: list[str] = []
    with _redis(redis_url) as conn:
        q = Queue(queue, connection=conn)
        before = set(FailedJobRegistry(queue=q).get_job_ids())
        q.started_job_registry.cleanup()
        failed += [j for j in FailedJobRegistry(queue=q).get_job_ids() if j not in before]
        iq = IntermediateQueue(q.key, connection=conn)
        worker = Worker([q], connection=conn)
        for job_id in iq.get_job_ids():
            if job_id in q.started_job_registry:
                continue
            job = Job.fetch(job_id, connection=conn)
            if job.get_status() != JobStatus.QUEUED:
                continue
            worker.handle_job_failure(job, q, exc_string="Job was stuck in intermediate queue.")
            iq.remove(job_id)
            failed.append(job_id)
        conn.delete(worker.key)  # the counters handle_job_failure kept for this stand-in
    return failed


def where_in_rq(redis_url: str, queue: str, rq_ids: list[str]) -> dict[str, str]:
    """Where each job sits in RQ, for a failure's message: its queue, the intermediate
    list, the started registry (and when its execution's heartbeat expires), its worker."""
    from rq.intermediate_queue import IntermediateQueue

    out: dict[str, str] = {}
    with _redis(redis_url) as conn:
        q = Queue(queue, connection=conn)
        queued = set(q.get_job_ids())
        intermediate = set(IntermediateQueue(q.key, connection=conn).get_job_ids())
        started = {m.decode(): score for m, score in
                   conn.zrange(q.started_job_registry.key, 0, -1, withscores=True)}
        for i in rq_ids:
            places = [p for p, ids in (("queue", queued), ("intermediate", intermediate))
                      if i in ids]
            places += [f"started registry {m} (expires in {score - time.time():.0f} s)"
                       for m, score in started.items() if m.split(":")[0] == i]
            worker = conn.hget(f"rq:job:{i}", "worker_name")
            if worker:
                places.append(f"worker {worker.decode()}")
            out[i] = ", ".join(places) or "nowhere"
    return out


def retry_redis(fn: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def chaos_loop(world: World, plan: Plan, rng: random.Random, stop: threading.Event) -> None:
    try:
        _chaos_loop(world, plan, rng, stop)
    except BaseException as exc:  # the test must hear of it, not a thread hook
        world.problems.append("chaos loop crashed: " + "".join(traceback.format_exception(exc)))


def _chaos_loop(world: World, plan: Plan, rng: random.Random, stop: threading.Event) -> None:
    events = (["kill_daemon"] * plan.daemon_kills + ["redis"] * plan.redis_restarts
              + ["pg"] * plan.pg_restarts)
    rng.shuffle(events)
    gap = plan.feed_seconds / (len(events) + 1)
    redis_n = pg_n = 0
    for ev in events:
        if stop.wait(rng.uniform(0.5 * gap, 1.5 * gap)):
            return
        t = time.monotonic()
        if ev == "kill_daemon":
            d = rng.choice(world.daemons)
            world.killed.add(d.name)
            assert d.proc is not None
            if d.proc.poll() is None:
                d.kill()
            else:
                d.stop()
            time.sleep(rng.uniform(0.1, 1.5))
            d.start(wait_ready=False)
            world.killed.discard(d.name)
            world.restarts[d.name] += 1
            world.note(f"SIGKILL {d.name}, restarted", time.monotonic() - t)
        elif ev == "redis":
            redis_n += 1
            if redis_n % 2:
                world.redis.stop()
                how = "SHUTDOWN"
            else:
                world.redis.kill()
                how = "SIGKILL"
            time.sleep(rng.uniform(0.5, 2.0))
            world.redis.start()
            world.note(f"redis {how} + start", time.monotonic() - t)
        else:
            pg_n += 1
            if pg_n % 2:
                world.pg.stop()
                how = "fast shutdown"
            else:
                world.pg.kill()
                how = "SIGKILL (crash recovery)"
            time.sleep(rng.uniform(0.5, 2.0))
            world.pg.start()
            world.note(f"postgres {how} + start", time.monotonic() - t)
        world.supervise()


@dataclass
class Fed:
    kinds: dict[str, str] = field(default_factory=dict)  # rq id -> kind
    rows: dict[str, int] = field(default_factory=dict)  # rq id -> row id
    requests: int = 0


def feed(world: World, plan: Plan, rng: random.Random, pg: Pg, fed: Fed,
         sample: Callable[[], None]) -> None:
    """The application: row first, then the RQ job; cancel requests a little later."""
    kinds = [k for k, w in KINDS.items() for _ in range(w)]
    pace = plan.feed_seconds / plan.jobs
    due: list[tuple[float, int]] = []  # (when, row id) cancel requests to make
    markers = world.tmp / "markers"
    markers.mkdir(exist_ok=True)
    next_sample = time.monotonic()
    for i in range(plan.jobs):
        kind = rng.choice(kinds)
        rq_id = uuid.uuid4().hex
        row_id = int(pg.val("INSERT INTO training_jobs (rq_job_id, status) VALUES ($1, 'queued') "
                            "RETURNING id", rq_id, retry_for=60))
        fed.rows[rq_id], fed.kinds[rq_id] = row_id, kind
        queue = "parked" if kind == "parked" else "default"
        func: tuple[Any, ...]
        if kind == "complete":
            func = ("tests.jobs.sleep", rng.choice((0.0, 0.05, 0.3, 1.0)))
        elif kind == "fail":
            func = ("tests.jobs.fail", f"chaos {i}")
        elif kind == "hog":
            m = markers / rq_id
            m.touch()
            func = ("tests.jobs.trap_sigterm", 300, str(m))
        elif kind == "racy":
            func = ("tests.jobs.sleep", rng.choice((0.05, 0.3, 1.0, 3.0)))
        else:
            func = ("tests.jobs.succeed", 1)

        def enqueue(rq_id: str = rq_id, queue: str = queue, func: tuple[Any, ...] = func) -> None:
            with _redis(world.redis.url) as conn:
                Queue(queue, connection=conn).enqueue(*func, job_id=rq_id, job_timeout=600,
                                                      result_ttl=3600, failure_ttl=3600)

        retry_redis(enqueue)
        if kind in ("parked", "hog", "racy"):
            when = time.monotonic() + (rng.uniform(0.5, 3.0) if kind == "hog"
                                       else rng.uniform(0.0, 1.0))
            for _ in range(rng.choice((1, 1, 1, 2))):
                due.append((when + rng.uniform(0, 0.3), row_id))
        deadline = time.monotonic() + pace
        while True:
            now = time.monotonic()
            ready = sorted(rid for when, rid in due if when <= now)
            if ready:
                due = [(w, r) for w, r in due if w > now]
                pg.fetch("INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
                         "SELECT j, 'chaos', 'chaos' FROM unnest($1::bigint[]) AS j", ready,
                         retry_for=60)
                fed.requests += len(ready)
            if now >= next_sample:
                sample()
                next_sample = now + 0.5
            if now >= deadline:
                break
            time.sleep(min(0.05, max(0.0, deadline - now)))
    for when, rid in sorted(due):
        time.sleep(max(0.0, when - time.monotonic()))
        pg.fetch("INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
                 "VALUES ($1, 'chaos', 'chaos')", rid, retry_for=60)
        fed.requests += 1


def run_chaos(tmp_path: Path, durable_redis: RedisServer, own_pg: PostgresServer,
              plan: Plan) -> None:
    rng = random.Random(plan.seed)
    dsn = own_pg.create_database("app")
    create_jobs_table(dsn)
    cfgs = [write_config(tmp_path / f"chaos-{i}.toml", durable_redis.url, dsn,
                         instance={"name": f"chaos-{i}"},
                         sweep={"min_age_seconds": 60.0, "interval_seconds": 15.0,
                                "fallback_interval_seconds": 5.0},
                         cancel={"grace_seconds": 1.0, "lease_seconds": 5.0})
            for i in range(plan.replicas)]
    migrate(cfgs[0])
    daemons = [DaemonProc(c, tmp_path / f"chaos-{i}.log", name=f"chaos-{i}")
               for i, c in enumerate(cfgs)]
    pool = WorkerPool(durable_redis.url, log_dir=tmp_path)
    world = World(tmp_path, durable_redis, own_pg, dsn, daemons, pool)
    pg = Pg(dsn)
    stop = threading.Event()
    seen_terminal: dict[int, str] = {}
    regressions: list[str] = []

    def sample() -> None:
        try:
            rows = pg.fetch("SELECT id, status FROM training_jobs")
        except Exception:  # Postgres is being restarted: sample next time
            return
        for r in rows:
            was = seen_terminal.get(r["id"])
            if was is not None and r["status"] != was:
                regressions.append(f"job {r['id']}: {was} -> {r['status']}")
            elif r["status"] not in ACTIVE:
                seen_terminal[r["id"]] = r["status"]

    chaos = threading.Thread(target=chaos_loop, args=(world, plan, rng, stop), daemon=True)
    fed = Fed()
    try:
        for _ in range(plan.workers):
            pool.start(wait=False)
        for w in pool.workers:
            w.wait_registered()
        for d in daemons:
            d.start(wait_ready=False)
        for d in daemons:
            d.wait_message("READY=1", 60)
        world.t0 = time.monotonic()
        chaos.start()
        feed(world, plan, random.Random(plan.seed + 1), pg, fed, sample)
        t_fed = time.monotonic() - world.t0
        chaos.join(timeout=plan.feed_seconds * 3 + 60)
        assert not chaos.is_alive(), "the chaos loop hung"
        world.supervise()
        # Convergence: every request done, every row terminal.
        t_calm = time.monotonic()
        deadline = t_calm + plan.converge_seconds
        stuck_in_rq: list[str] = []
        maintenance_at = t_calm + MAINTENANCE_AFTER
        while True:
            sample()
            world.supervise()
            open_requests = pg.val("SELECT count(*) FROM rq_reconciler_cancel_requests "
                                   "WHERE state <> 'done'", retry_for=30)
            active = pg.val("SELECT count(*) FROM training_jobs WHERE status = ANY($1)",
                            list(ACTIVE), retry_for=30)
            if open_requests == 0 and active == 0:
                break
            if time.monotonic() > maintenance_at:
                # By now every live worker has started what it dequeued.
                stuck_in_rq += retry_redis(
                    lambda: run_rq_maintenance(durable_redis.url, "default"))
                maintenance_at = time.monotonic() + MAINTENANCE_EVERY
            if time.monotonic() > deadline:
                stuck = pg.fetch("SELECT id, rq_job_id, status FROM training_jobs WHERE "
                                 "status = ANY($1) LIMIT 10", list(ACTIVE))
                rq = rq_statuses(durable_redis.url, [r["rq_job_id"] for r in stuck])
                where = where_in_rq(durable_redis.url, "default", [r["rq_job_id"] for r in stuck])
                eg = [(r["id"], r["status"], fed.kinds.get(r["rq_job_id"]), rq[r["rq_job_id"]],
                       where[r["rq_job_id"]]) for r in stuck]
                raise AssertionError(
                    f"no convergence after {plan.converge_seconds:g} s: {open_requests} open "
                    f"requests, {active} active rows, e.g. (id, row, kind, rq, where in rq) {eg}")
            time.sleep(0.25)
        t_converged = time.monotonic() - t_calm
        sample()
        rcs = {d.name: d.stop() for d in daemons}

        # -- the summary ---------------------------------------------------------------------
        status = {int(r["id"]): r["status"] for r in pg.fetch("SELECT id, status FROM training_jobs")}
        errors = {int(r["id"]): r["error_message"] or "" for r in pg.fetch(
            "SELECT id, error_message FROM training_jobs")}
        by_kind: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
        for rq_id, kind in fed.kinds.items():
            by_kind[kind][status[fed.rows[rq_id]]] += 1
        outcomes = Counter(r["outcome"] for r in pg.fetch(
            "SELECT outcome FROM rq_reconciler_cancel_requests"))
        transitions = Counter((r["reason"], r["to_status"]) for r in pg.fetch(
            "SELECT reason, to_status FROM rq_reconciler_events"))
        events = log_events(d.log_path for d in daemons)
        noisy = Counter(f"{e.get('level')}:{e.get('event')}" for e in events
                        if e.get("level") in ("warning", "error"))
        print(f"\n=== chaos seed {plan.seed}: {plan.jobs} jobs, {fed.requests} cancel requests, "
              f"{plan.replicas} daemons, {plan.workers} workers ===")
        print(f"{'t (s)':>7}  {'event':<40} {'took (s)':>8}")
        for at, what, secs in world.log:
            print(f"{at:7.1f}  {what:<40} {secs:8.2f}")
        print(f"fed in {t_fed:.1f} s; converged {t_converged:.1f} s after the chaos ended")
        print(f"{'kind':<10}" + "".join(f"{s:>11}" for s in ("completed", "failed", "cancelled")))
        for kind, c in by_kind.items():
            print(f"{kind:<10}" + "".join(f"{c[s]:>11}" for s in ("completed", "failed", "cancelled")))
        print(f"outcomes: {dict(outcomes)}")
        print(f"transitions: {dict(sorted(transitions.items()))}")
        print(f"daemon restarts: {dict(world.restarts)}; workers that died: {sorted(world.dead_workers)}")
        print(f"jobs dead workers left behind, failed by RQ's maintenance run here: "
              f"{stuck_in_rq}")
        print(f"warnings/errors logged: {dict(sorted(noisy.items()))}")
        print(f"exit codes at the end: {rcs}")

        # -- the promises ----------------------------------------------------------------------
        assert world.problems == []
        assert regressions == []
        assert rcs == dict.fromkeys(rcs, 0)
        assert request_problems(pg) == []
        assert row_rq_mismatches(pg, durable_redis.url, world.dead_workers) == []
        assert audit_problems(pg) == []
        assert {int(k) for k, n in terminal_transitions(pg).items() if n == 1} == set(status)
        for rq_id, kind in fed.kinds.items():
            st = status[fed.rows[rq_id]]
            if kind in ("parked", "hog"):
                assert st == "cancelled", (kind, rq_id, st, errors[fed.rows[rq_id]])
        # Only a worker that really died orphans its jobs (Redis never lost data here).
        wrong = [(i, e) for i, e in errors.items() if e.startswith("Orphaned")
                 and not any(w in e for w in world.dead_workers)]
        assert wrong == []
        assert error_lines([d.log_path for d in daemons], allow=CHAOS_ERRORS_OK) == []
    finally:
        stop.set()
        chaos.join(timeout=60)
        for d in daemons:
            d.close()
        pool.stop_all()
        pg.close()


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    srv = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
    yield srv
    srv.cleanup()


@pytest.mark.timeout(150)
def test_chaos_small(tmp_path: Path, durable_redis: RedisServer, own_pg: PostgresServer) -> None:
    run_chaos(tmp_path, durable_redis, own_pg, Plan(
        jobs=30, daemon_kills=2, redis_restarts=1, pg_restarts=1, feed_seconds=12.0,
        converge_seconds=45.0))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos(tmp_path: Path, durable_redis: RedisServer, own_pg: PostgresServer) -> None:
    run_chaos(tmp_path, durable_redis, own_pg, Plan(
        jobs=200, daemon_kills=10, redis_restarts=2, pg_restarts=2, feed_seconds=90.0,
        converge_seconds=180.0, workers=4))


def test_redis_restart_does_not_orphan_running_jobs(tmp_path: Path, durable_redis: RedisServer,
                                                    pg_dsn: str) -> None:
    """A restarted Redis has no pub/sub subscribers until every worker has resubscribed
    (RQ retries after 2 s): PUBSUB NUMSUB = 0 then says nothing about the workers. The
    sweep that follows the daemon's reconnect must not fail their jobs or kill horses."""
    cfg = write_config(tmp_path / "c.toml", durable_redis.url, pg_dsn,
                       sweep={"min_age_seconds": 60.0})
    migrate(cfg)
    pool = WorkerPool(durable_redis.url, log_dir=tmp_path)
    d = DaemonProc(cfg, tmp_path / "d.log")
    try:
        ws = [pool.start(wait=False) for _ in range(2)]
        for w in ws:
            w.wait_registered()
        d.start()
        markers = [tmp_path / f"m{i}" for i in range(2)]
        with Pg(pg_dsn) as pg:
            for m in markers:
                m.touch()
                rq_id = uuid.uuid4().hex
                pg.fetch("INSERT INTO training_jobs (rq_job_id, status) VALUES ($1, 'queued')",
                         rq_id)
                with _redis(durable_redis.url) as conn:
                    Queue("default", connection=conn).enqueue(
                        "tests.jobs.trap_sigterm", 60, str(m), job_id=rq_id)
            wait_until_(lambda: pg.val("SELECT count(*) FROM training_jobs WHERE status = "
                                       "'running'") == 2, 20, "both running", interval=0.1)
            horses = [w.wait_horse() for w in ws]
            sweeps_before = sum(1 for e in log_events([d.log_path]) if e.get("event") == "sweep_done")
            durable_redis.restart()
            # the daemon notices, reconnects, re-enables keyspace events and sweeps
            wait_until_(lambda: sum(1 for e in log_events([d.log_path])
                                    if e.get("event") == "sweep_done") > sweeps_before, 20,
                        "the sweep after the reconnect", interval=0.1)
            time.sleep(3)  # and whatever it decided has been carried out
            assert [r["status"] for r in pg.fetch("SELECT status FROM training_jobs")] == \
                ["running", "running"], pg.fetch("SELECT error_message FROM training_jobs")
            assert pg.val("SELECT count(*) FROM rq_reconciler_events WHERE reason = 'orphaned'") == 0
        assert all(w.is_alive() for w in ws)
        assert [h for h in horses if not pid_alive(h)] == []
        assert not any("SIGTERM" in m.read_text() for m in markers)
        assert d.stop() == 0
    finally:
        d.close()
        pool.stop_all()
