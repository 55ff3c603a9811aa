"""Soak: real jobs through real workers for 10 minutes under the daemon.

50 jobs a second, each a row inserted `queued` and an RQ job enqueued: 80% succeed at
once, 10% fail, 10% sleep 2-5 s (and 5% of those are cancelled by a request a second
after their enqueue). 24 forking `rq worker`s (what this 2-core machine takes). The
daemon runs on events, with its usual 5-minute sweep.

Checked all along (every 0.5 s): for every active row whose RQ job has ended, how long
ago RQ ended it; the worst is reported (goal: no row differs from RQ for more than 1 s
after RQ ended it). At the end: every cancel request has an outcome. Daemon RSS is
sampled every 5 s; its slope (least squares, after a 2-minute warm-up) is reported in
MB/min (goal < 0.2).

Usage (from the repo root): python -m bench.soak [--seconds 600]
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid
from datetime import UTC, datetime

from rq import Queue

from bench.procs import ProcSampler, cpu_seconds
from bench.report import banner, env_info, footer, print_table, run, verdict
from bench.rq_data import pace
from bench.stack import bench_env, make_workdir
from bench.stats import mb
from reconciler.devstack import DaemonProc, Pg, WorkerPool
from reconciler.rq_layout import parse_time as parse_rq_time

RATE = 50.0
WORKERS = 24
GOAL_LAG_S = 1.0
GOAL_SLOPE_MB_MIN = 0.2
WARM_UP_S = 120.0


def _slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 3:
        return float("nan")
    t0 = samples[0][0]
    xs = [(t - t0) / 60 for t, _ in samples]
    ys = [rss / 2**20 for _, rss in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


class LagWatch(threading.Thread):
    """Every 0.5 s: active rows vs. RQ; the longest any row stayed active after RQ ended
    its job."""

    def __init__(self, dsn: str, conn: object) -> None:
        super().__init__(daemon=True)
        self.dsn, self.conn = dsn, conn
        self.stop = threading.Event()
        self.worst = 0.0
        self.worst_job = ""
        self.checks = 0
        self.over: set[str] = set()

    def run(self) -> None:
        with Pg(self.dsn) as pg:
            while not self.stop.wait(0.5):
                rows = pg.fetch("SELECT rq_job_id FROM training_jobs "
                                "WHERE status IN ('queued', 'running') AND rq_job_id IS NOT NULL")
                ids = [r["rq_job_id"] for r in rows]
                if not ids:
                    continue
                pipe = self.conn.pipeline(transaction=False)  # type: ignore[attr-defined]
                for rid in ids:
                    pipe.hmget(f"rq:job:{rid}", ["status", "ended_at"])
                now = datetime.now(UTC)
                self.checks += 1
                for rid, (status, ended) in zip(ids, pipe.execute(), strict=True):
                    if status in (b"finished", b"failed", b"stopped", b"canceled") and ended:
                        end = parse_rq_time(ended)
                        if end is None:
                            continue
                        lag = (now - end).total_seconds()
                        if lag > GOAL_LAG_S:
                            self.over.add(rid)
                        if lag > self.worst:
                            self.worst, self.worst_job = lag, rid


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=600.0)
    args = ap.parse_args()
    seconds = args.seconds
    banner(f"soak: {RATE:g} jobs/s for {seconds:g} s through {WORKERS} real workers "
           "(10% failing, 10% sleeping 2-5 s, 5% of those cancelled)")
    print(env_info())
    work = make_workdir("bench-soak-")
    rng = random.Random(7)
    counts = {"succeed": 0, "fail": 0, "sleep": 0, "cancel": 0}
    with bench_env(work, sweep={"min_age_seconds": 60.0}) as env:
        pool = WorkerPool(env.redis_url, log_dir=work)
        daemon = DaemonProc(env.config, work / "daemon.log")
        r = env.redis_client()
        q = Queue("default", connection=r)
        try:
            for i in range(WORKERS):
                pool.start(name=f"soak-{i}", wait=False)
            for w in pool.workers:
                w.wait_registered(120)
            daemon.start(timeout=120)
            assert daemon.proc is not None
            sampler = ProcSampler(daemon.proc.pid, interval=5.0).start()
            cpu0 = cpu_seconds(daemon.proc.pid)
            watch = LagWatch(env.dsn, r)
            watch.start()
            to_cancel: list[tuple[float, int]] = []
            requests: list[int] = []
            with Pg(env.dsn) as pg:
                t0 = time.perf_counter()
                n = int(seconds * RATE)
                for i in range(n):
                    pace(t0, i, RATE)
                    rq_id = str(uuid.uuid4())
                    jid = int(pg.val("INSERT INTO training_jobs (rq_job_id, status) "
                                     "VALUES ($1, 'queued') RETURNING id", rq_id))
                    roll = rng.random()
                    if roll < 0.8:
                        q.enqueue("tests.jobs.succeed", 1, job_id=rq_id, result_ttl=600)
                        counts["succeed"] += 1
                    elif roll < 0.9:
                        q.enqueue("tests.jobs.fail", "soak", job_id=rq_id, result_ttl=600,
                                  failure_ttl=600)
                        counts["fail"] += 1
                    else:
                        q.enqueue("tests.jobs.sleep", rng.uniform(2, 5), job_id=rq_id,
                                  result_ttl=600, failure_ttl=600)
                        counts["sleep"] += 1
                        if rng.random() < 0.05:
                            to_cancel.append((time.perf_counter() + 1.0, jid))
                    now = time.perf_counter()
                    while to_cancel and to_cancel[0][0] <= now:
                        _, cj = to_cancel.pop(0)
                        requests.append(int(pg.val(
                            "INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
                            "VALUES ($1, 'soak', 'cancel') RETURNING id", cj)))
                        counts["cancel"] += 1
                elapsed = time.perf_counter() - t0
                # Let the last jobs end and the table follow.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    left = pg.val("SELECT count(*) FROM training_jobs "
                                  "WHERE status IN ('queued', 'running')")
                    pending = pg.val("SELECT count(*) FROM rq_reconciler_cancel_requests "
                                     "WHERE state <> 'done'")
                    if left == 0 and pending == 0:
                        break
                    time.sleep(0.5)
                watch.stop.set()
                watch.join(10)
                cpu = cpu_seconds(daemon.proc.pid) - cpu0
                outcomes = {row["outcome"]: int(row["n"]) for row in pg.fetch(
                    "SELECT coalesce(outcome, state) AS outcome, count(*) AS n "
                    "FROM rq_reconciler_cancel_requests GROUP BY 1")}
                final = {row["status"]: int(row["n"]) for row in pg.fetch(
                    "SELECT status, count(*) AS n FROM training_jobs GROUP BY 1")}
            sampler.stop()
            alive = daemon.proc.poll() is None
        finally:
            daemon.stop()
            daemon.close()
            pool.stop_all()
            r.close()
    samples = sampler.samples
    warm = [s for s in samples if s[0] - samples[0][0] >= WARM_UP_S] if samples else []
    slope = _slope_mb_per_min(warm if len(warm) >= 3 else samples)
    undone = sum(v for k, v in outcomes.items() if k not in ("cancelled", "already_finished",
                                                             "failed"))
    print_table(["measure", "value", "goal", "result"], [
        ("jobs enqueued (succeed / fail / sleep)", f"{sum(counts[k] for k in ('succeed', 'fail', 'sleep'))} "
         f"({counts['succeed']} / {counts['fail']} / {counts['sleep']}) in {elapsed:.0f} s", "", ""),
        ("worst time a row stayed active after RQ ended its job", f"{watch.worst:.2f} s "
         f"({watch.checks} checks)", f"<= {GOAL_LAG_S:g} s", verdict(watch.worst, GOAL_LAG_S)),
        ("rows over that at some check", len(watch.over), "0", "PASS" if not watch.over else "MISS"),
        ("cancel requests / outcomes", f"{counts['cancel']} / {outcomes}", "all with an outcome",
         "PASS" if undone == 0 else "MISS"),
        ("final table", str(final), "", ""),
        ("daemon RSS first / last / peak sample", f"{mb(samples[0][1]):.0f} / {mb(samples[-1][1]):.0f}"
         f" / {mb(max(s for _, s in samples)):.0f} MB" if samples else "-", "", ""),
        ("daemon RSS slope after warm-up", f"{slope:+.3f} MB/min",
         f"< {GOAL_SLOPE_MB_MIN:g}", verdict(slope, GOAL_SLOPE_MB_MIN)),
        ("daemon CPU", f"{cpu:.1f} s ({100 * cpu / max(elapsed, 1):.0f}% of one core)", "", ""),
        ("daemon alive at the end", alive, "True", "PASS" if alive else "MISS"),
    ])
    footer()
    return 0


if __name__ == "__main__":
    run(main)
