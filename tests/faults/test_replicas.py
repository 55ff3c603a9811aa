"""Two and three replicas against one Redis and one Postgres, under a storm of cancels and
completions: every request is done exactly once with one outcome, every row takes exactly
one terminal transition, nobody logs an error, and only one replica sweeps at a time."""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job

from reconciler.devstack import (
    DaemonProc,
    Pg,
    WorkerPool,
    metric_value,
    migrate,
    wait_until,
    write_config,
)
from tests.faults.common import (
    audit_problems,
    cancel_done_counts,
    error_lines,
    insert_requests,
    insert_rows,
    log_events,
    overlapping_sweeps,
    request_problems,
    row_rq_mismatches,
    rq_statuses,
    start_all,
    terminal_transitions,
)
from tests.faults.slow_worker import DELAY_ENV

PARKED = "parked"  # a queue no worker listens on: its jobs stay queued until cancelled


@dataclass
class Storm:
    rows: dict[str, int] = field(default_factory=dict)  # rq id -> row id
    kinds: dict[str, str] = field(default_factory=dict)  # rq id -> complete/hog/parked/racy
    requests: list[int] = field(default_factory=list)
    hog_markers: dict[str, Path] = field(default_factory=dict)  # rq id -> the hog's marker


def run_storm(tmp_path: Path, redis_url: str, pg: Pg, workers: WorkerPool, *,
              n_cancel: int, n_complete: int, n_workers: int, seed: int) -> Storm:
    """Enqueue completions and cancel targets interleaved, and insert the cancel requests
    in the middle of it (some of them twice or three times for one job)."""
    rng = random.Random(seed)
    storm = Storm()
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    with redis.Redis.from_url(redis_url) as conn:
        default, parked = Queue("default", connection=conn), Queue(PARKED, connection=conn)

        def enqueue(kind: str, queue: Queue, func: str, *args: Any) -> str:
            rq_id = uuid.uuid4().hex
            storm.rows[rq_id] = insert_rows(pg, [rq_id])[0]  # the app: row first, then RQ
            storm.kinds[rq_id] = kind
            queue.enqueue(func, *args, job_id=rq_id, job_timeout=300, result_ttl=3600)
            return rq_id

        # Hogs: running jobs that trap SIGTERM, so that the graceful path is exercised.
        hog_markers = storm.hog_markers
        for _ in range(max(1, n_workers - 1)):
            m = markers / f"hog-{uuid.uuid4().hex[:6]}"
            m.touch()
            hog_markers[enqueue("hog", default, "tests.jobs.trap_sigterm", 120, str(m))] = m
        wait_until(lambda: all("STARTED" in m.read_text() for m in hog_markers.values()), 30,
                   what="hog jobs running")
        n_rest = n_cancel - len(hog_markers)
        plan = (["complete"] * n_complete + ["parked"] * (n_rest // 2)
                + ["racy"] * (n_rest - n_rest // 2))
        rng.shuffle(plan)
        pending_cancels = list(hog_markers)
        for i, kind in enumerate(plan):
            if kind == "complete":
                enqueue(kind, default, "tests.jobs.sleep", rng.choice((0.0, 0.02, 0.1)))
                continue
            if kind == "parked":
                pending_cancels.append(enqueue(kind, parked, "tests.jobs.succeed", 1))
            else:
                pending_cancels.append(enqueue(kind, default, "tests.jobs.sleep",
                                               rng.choice((0.05, 0.2, 0.5))))
            # Requests go out in small bursts, interleaved with the enqueues.
            if len(pending_cancels) >= rng.randint(1, 4) or i == len(plan) - 1:
                ids: list[int] = []
                for rq_id in pending_cancels:
                    ids += [storm.rows[rq_id]] * rng.choice((1, 1, 1, 2, 3))
                storm.requests += insert_requests(pg, ids, reason=f"storm {seed}")
                pending_cancels.clear()
        if pending_cancels:
            storm.requests += insert_requests(pg, [storm.rows[r] for r in pending_cancels])
    return storm


def check_storm(tmp_path: Path, redis_url: str, pg: Pg, storm: Storm,
                daemons: list[DaemonProc], *, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    wait_until(lambda: pg.val("SELECT count(*) FROM rq_reconciler_cancel_requests "
                              "WHERE state <> 'done'") == 0, timeout, "every request done", interval=0.1)
    t_requests = time.monotonic() - t0
    wait_until(lambda: pg.val("SELECT count(*) FROM training_jobs WHERE status = ANY($1)",
                              ["queued", "running"]) == 0, timeout, "every row terminal", interval=0.1)
    t_rows = time.monotonic() - t0

    assert request_problems(pg) == []
    assert row_rq_mismatches(pg, redis_url) == []
    assert audit_problems(pg) == []
    # exactly one terminal transition per row (nobody else writes these rows)
    terminal = terminal_transitions(pg)
    assert {int(k) for k, n in terminal.items() if n == 1} == set(storm.rows.values())

    rq = rq_statuses(redis_url, storm.rows)
    status = {int(r["id"]): r["status"] for r in pg.fetch("SELECT id, status FROM training_jobs")}
    by_kind: Counter[str] = Counter()
    for rq_id, kind in storm.kinds.items():
        by_kind[f"{kind}:{status[storm.rows[rq_id]]}"] += 1
        if kind == "complete":
            assert status[storm.rows[rq_id]] == "completed" and rq[rq_id] == "finished"
        if kind in ("hog", "parked"):
            # never finishes by itself: the cancel must win
            assert status[storm.rows[rq_id]] == "cancelled", (kind, rq_id, rq[rq_id])
    outcomes = Counter(r["outcome"] for r in pg.fetch(
        "SELECT outcome FROM rq_reconciler_cancel_requests"))
    # The graceful path ran: hogs trap SIGTERM and were stopped by it. Checked on the hogs
    # themselves: with replicas, the one whose event path stops a horse for a pending
    # request need not be the one that claimed it, and the outcome then lists only what
    # the claimer sent.
    graceful = sum("SIGTERM" in m.read_text() for m in storm.hog_markers.values())
    assert graceful >= 1
    sigterms = pg.val("SELECT count(*) FROM rq_reconciler_cancel_requests "
                      "WHERE detail->'horse_signals' ? 'SIGTERM'")

    # Every request was finished by exactly one replica, once.
    scraped = [d.scrape() for d in daemons]
    finished = sum(metric_value(t, "rq_reconciler_cancel_requests_total") for t in scraped)
    assert finished == len(storm.requests)
    done = cancel_done_counts(d.log_path for d in daemons)
    assert {rid: n for rid, n in done.items() if n != 1} == {}
    assert set(done) == set(storm.requests)
    return {"t_requests": t_requests, "t_rows": t_rows, "outcomes": dict(outcomes),
            "by_kind": dict(sorted(by_kind.items())), "sigterm_outcomes": sigterms,
            "per_replica_finished": [metric_value(t, "rq_reconciler_cancel_requests_total")
                                     for t in scraped]}


def check_sweep_lock(pg: Pg, daemons: list[DaemonProc]) -> None:
    """While someone else holds the sweep lock, a requested sweep (SIGHUP) is skipped by
    every replica: none sweeps concurrently with the holder."""
    before = {d.name: sum(1 for e in d.log_events() if e.get("event") == "sweep_skipped")
              for d in daemons}
    # Blocks while a replica sweeps; that sweep has logged sweep_done by the time it lets go
    # of the lock, so it is counted here, not taken for one that ran while we held it.
    pg.fetch("SELECT pg_advisory_lock(hashtext('rq-reconciler:sweep:training_jobs'))")
    try:
        done_before = {d.name: sum(1 for e in d.log_events() if e.get("event") == "sweep_done")
                       for d in daemons}
        for d in daemons:
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: all(
            sum(1 for e in d.log_events() if e.get("event") == "sweep_skipped") > before[d.name]
            for d in daemons), 20, "every replica to skip its sweep", interval=0.1)
        assert {d.name: sum(1 for e in d.log_events() if e.get("event") == "sweep_done")
                for d in daemons} == done_before
    finally:
        pg.fetch("SELECT pg_advisory_unlock(hashtext('rq-reconciler:sweep:training_jobs'))")


def replicas_storm(tmp_path: Path, redis_url: str, pg_dsn: str, workers: WorkerPool, *,
                   replicas: int, n_cancel: int, n_complete: int, n_workers: int = 4,
                   timeout: float = 60) -> None:
    cfgs = [
        write_config(tmp_path / f"replica-{i}.toml", redis_url, pg_dsn,
                     instance={"name": f"replica-{i}"},
                     # rows are inserted before their RQ job: give enqueueing time
                     sweep={"min_age_seconds": 60.0},
                     cancel={"grace_seconds": 2.0, "lease_seconds": 10.0})
        for i in range(replicas)
    ]
    migrate(cfgs[0])
    daemons = [DaemonProc(c, tmp_path / f"replica-{i}.log", name=f"replica-{i}")
               for i, c in enumerate(cfgs)]
    pg = Pg(pg_dsn)
    try:
        for _ in range(n_workers):
            workers.start(wait=False)
        for w in workers.workers:
            w.wait_registered()
        start_all(daemons)
        t0 = time.monotonic()
        storm = run_storm(tmp_path, redis_url, pg, workers, n_cancel=n_cancel,
                          n_complete=n_complete, n_workers=n_workers, seed=replicas)
        t_storm = time.monotonic() - t0
        summary = check_storm(tmp_path, redis_url, pg, storm, daemons, timeout=timeout)
        check_sweep_lock(pg, daemons)
        rcs = [d.stop() for d in daemons]
        assert rcs == [0] * replicas
        logs = [d.log_path for d in daemons]
        assert error_lines(logs) == []
        assert overlapping_sweeps(logs) == []
        events = log_events(logs)
        sweeps = Counter(e["_log"] for e in events if e.get("event") == "sweep_done")
        skipped = Counter(e["_log"] for e in events if e.get("event") == "sweep_skipped")
        print(f"\n{replicas} replicas, {len(storm.rows)} jobs, {len(storm.requests)} requests: "
              f"enqueued in {t_storm:.1f} s, requests done after {summary['t_requests']:.1f} s, "
              f"rows after {summary['t_rows']:.1f} s")
        print(f"  outcomes {summary['outcomes']}; per replica {summary['per_replica_finished']}")
        print(f"  rows by kind {summary['by_kind']}")
        print(f"  sweeps done {dict(sweeps)}, skipped {dict(skipped)}")
    finally:
        for d in daemons:
            d.close()
        pg.close()


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_share_a_storm(replicas: int, tmp_path: Path, redis_url: str, pg_dsn: str,
                                workers: WorkerPool) -> None:
    replicas_storm(tmp_path, redis_url, pg_dsn, workers, replicas=replicas,
                   n_cancel=40, n_complete=40)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_share_a_big_storm(replicas: int, tmp_path: Path, redis_url: str, pg_dsn: str,
                                    workers: WorkerPool) -> None:
    replicas_storm(tmp_path, redis_url, pg_dsn, workers, replicas=replicas,
                   n_cancel=200, n_complete=200, timeout=240)


def test_cancel_racing_a_dequeue_does_not_lie(tmp_path: Path, redis_url: str, pg_dsn: str,
                                              workers: WorkerPool) -> None:
    """RQ's Job.cancel() on a job a worker has just dequeued sets "canceled", and the worker
    runs it anyway. The row must not say cancelled for a job that then completes."""
    cfgs = [write_config(tmp_path / f"r{i}.toml", redis_url, pg_dsn, instance={"name": f"r{i}"},
                         sweep={"min_age_seconds": 60.0}) for i in range(2)]
    migrate(cfgs[0])
    workers.start(extra_args=["--worker-class", "tests.faults.slow_worker.SlowStartWorker"],
                  extra_env={DELAY_ENV: "1.5"})
    daemons = [DaemonProc(c, tmp_path / f"r{i}.log", name=f"r{i}") for i, c in enumerate(cfgs)]
    pg = Pg(pg_dsn)
    marker = tmp_path / "marker"
    marker.touch()
    try:
        start_all(daemons)
        results = {}
        ids: dict[str, tuple[str, int]] = {}
        with redis.Redis.from_url(redis_url) as conn:
            q = Queue("default", connection=conn)
            for func, args in (("tests.jobs.succeed", (1,)),
                               ("tests.jobs.trap_sigterm", (60, str(marker)))):
                rq_id = uuid.uuid4().hex
                job_id = insert_rows(pg, [rq_id])[0]
                q.enqueue(func, *args, job_id=rq_id)
                # the worker holds it (BLMOVE), its horse has not started it yet
                wait_until(lambda rq_id=rq_id: conn.lpos("rq:queue:default:intermediate", rq_id)
                           is not None, 10, what="job dequeued")
                assert rq_statuses(redis_url, [rq_id])[rq_id] == "queued"
                rid = insert_requests(pg, [job_id], reason="race")[0]
                wait_until(lambda rid=rid: pg.val("SELECT state FROM rq_reconciler_cancel_requests "
                                                  "WHERE id = $1", rid) == "done", 30, "outcome",
                           interval=0.1)
                wait_until(lambda job_id=job_id: pg.val(
                    "SELECT status FROM training_jobs WHERE id = $1", job_id) not in
                    ("queued", "running"), 30, "row terminal", interval=0.1)
                results[func] = pg.fetch(
                    "SELECT r.outcome, r.detail, t.status FROM rq_reconciler_cancel_requests r "
                    "JOIN training_jobs t ON t.id = r.job_id WHERE r.id = $1", rid)[0]
                ids[func] = (rq_id, rid)
        assert row_rq_mismatches(pg, redis_url) == []
        assert request_problems(pg) == []
        assert audit_problems(pg) == []
        # The instant job either ran to completion before its horse could be stopped, or
        # was stopped as it started (which wins depends on the machine's load): the row,
        # the outcome and RQ (row_rq_mismatches above) must all say the same.
        instant = results["tests.jobs.succeed"]
        assert (instant["status"], instant["outcome"]) in (
            ("completed", "already_finished"), ("cancelled", "cancelled")), dict(instant)
        # the long one was stopped, gracefully: the daemons sent SIGTERM and never SIGKILL.
        # Its horse may be stopped before the job's own code ran (the worker's slow start, or
        # the few milliseconds between RQ's "started" and the job's SIGTERM handler); if the
        # job had started, it must have seen the SIGTERM.
        assert results["tests.jobs.trap_sigterm"]["status"] == "cancelled"
        assert results["tests.jobs.trap_sigterm"]["outcome"] == "cancelled"
        long_rq_id, long_rid = ids["tests.jobs.trap_sigterm"]
        sent = [sig for ev in log_events(d.log_path for d in daemons)
                if (ev.get("event") == "horse_stopped" and ev.get("rq_id") == long_rq_id)
                or (ev.get("event") == "cancel_done" and long_rid in (ev.get("requests") or []))
                for sig in (ev.get("signals") or ev.get("horse_signals") or [])]
        assert "SIGTERM" in sent and not any(sig.startswith("SIGKILL") for sig in sent), sent
        seen = marker.read_text()
        assert "STARTED" not in seen or "SIGTERM" in seen, seen
        assert [d.stop() for d in daemons] == [0, 0]
        assert error_lines([d.log_path for d in daemons]) == []
    finally:
        for d in daemons:
            d.close()
        pg.close()


def test_rq_cancel_of_a_running_job_is_not_believed(tmp_path: Path, redis_url: str, pg_dsn: str,
                                                    workers: WorkerPool) -> None:
    """RQ's Job.cancel() on a job whose horse already runs it writes "canceled" (and drops
    its execution record) but stops nothing: the job runs on and may finish. Whoever
    called it (the app, or the daemon losing the same race), the row must follow what the
    horse really does."""
    cfgs = [write_config(tmp_path / f"r{i}.toml", redis_url, pg_dsn, instance={"name": f"r{i}"},
                         sweep={"min_age_seconds": 60.0}, cancel={"grace_seconds": 2.0})
            for i in range(2)]
    migrate(cfgs[0])
    for _ in range(2):
        workers.start(wait=False)
    for w in workers.workers:
        w.wait_registered()
    daemons = [DaemonProc(c, tmp_path / f"r{i}.log", name=f"r{i}") for i, c in enumerate(cfgs)]
    marker = tmp_path / "marker"
    marker.touch()
    pg = Pg(pg_dsn)
    try:
        start_all(daemons)
        ids = {}
        with redis.Redis.from_url(redis_url) as conn:
            q = Queue("default", connection=conn)
            for name, func, args in (("stopped", "tests.jobs.trap_sigterm", (60, str(marker))),
                                     # long enough to be still running when the app
                                     # cancels it on a loaded machine: Job.cancel() of a
                                     # job that already finished overwrites "finished"
                                     ("finishes", "tests.jobs.sleep", (5.0,))):
                rq_id = uuid.uuid4().hex
                ids[name] = (insert_rows(pg, [rq_id])[0], rq_id)
                q.enqueue(func, *args, job_id=rq_id)
            wait_until(lambda: pg.val("SELECT count(*) FROM training_jobs WHERE status = "
                                      "'running'") == 2, 20, "both running", interval=0.1)
            for _, rq_id in ids.values():
                Job.fetch(rq_id, connection=conn).cancel()  # what an app might do
            assert set(rq_statuses(redis_url, [r for _, r in ids.values()]).values()) == {"canceled"}
        # the one the app only canceled in RQ runs to its end, and the row says so
        wait_until(lambda: pg.val("SELECT status FROM training_jobs WHERE id = $1",
                                  ids["finishes"][0]) == "completed", 15, "finished row", interval=0.1)
        # the other one gets a real cancel request: its horse is stopped, gracefully
        rid = insert_requests(pg, [ids["stopped"][0]], reason="really")[0]
        wait_until(lambda: pg.val("SELECT state FROM rq_reconciler_cancel_requests WHERE id = $1",
                                  rid) == "done", 30, "outcome", interval=0.1)
        out = pg.fetch("SELECT outcome, detail FROM rq_reconciler_cancel_requests")[0]
        assert out["outcome"] == "cancelled" and '"SIGTERM"' in out["detail"]
        assert "SIGTERM" in marker.read_text()
        wait_until(lambda: pg.val("SELECT status FROM training_jobs WHERE id = $1",
                                  ids["stopped"][0]) == "cancelled", 10, "cancelled row", interval=0.1)
        assert row_rq_mismatches(pg, redis_url) == []
        assert audit_problems(pg) == []
        assert [d.stop() for d in daemons] == [0, 0]
        assert error_lines([d.log_path for d in daemons]) == []
    finally:
        for d in daemons:
            d.close()
        pg.close()
