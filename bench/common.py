"""Shared helpers for the rq-reconciler benchmarks (bench/*.py).

Each benchmark script starts its own throwaway redis-server and PostgreSQL through
reconciler.devstack, prints plain-text tables and exits 0: it reports numbers beside the
goal ("PASS"/"MISS"), it does not assert them. Run the scripts from the repo root:
``python -m bench.<name>``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, cast

import psutil
import redis
from rq.job import Job, JobStatus
from rq.results import Result

from reconciler.devstack import (
    Pg,
    PostgresServer,
    RedisServer,
    cleanup_all,
    create_jobs_table,
    migrate,
    write_config,
)

SEED = 20240611


# -- running a script ---------------------------------------------------------------------------


def run(main: Callable[[], int]) -> NoReturn:
    """Every script's entry point: exit with `main()`'s status, and stop every server and
    process it started however it ends (an exception, Ctrl-C, or a SIGTERM: `kill`,
    `timeout`, a CI runner giving up, which would otherwise leave them running)."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        sys.exit(main())
    finally:
        cleanup_all()


# -- output -------------------------------------------------------------------------------------


def banner(title: str) -> None:
    print()
    print("=" * len(title))
    print(title)
    print("=" * len(title))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    """A plain-text table, columns left-aligned, one header line and a rule."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def verdict(value: float, limit: float, *, higher_is_better: bool = False) -> str:
    if math.isnan(value):
        return "MISS"
    ok = value >= limit if higher_is_better else value <= limit
    return "PASS" if ok else "MISS"


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method); nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = math.ceil(k)
    if lo == hi:
        return xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float) -> float:
    return seconds * 1000.0


# -- servers ------------------------------------------------------------------------------------


def make_workdir(prefix: str) -> Path:
    """A temp dir for configs and logs, removed at exit (BENCH_KEEP=1 keeps it)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if not os.environ.get("BENCH_KEEP"):
        atexit.register(shutil.rmtree, path, True)
    return path


@dataclass
class Env:
    """A redis-server, a PostgreSQL cluster, one database with the seed-shaped jobs table
    and rq-reconciler's own tables (migrated), and a config file pointing at them."""

    redis_srv: RedisServer
    pg: PostgresServer
    dbname: str
    dsn: str
    config: Path
    workdir: Path
    config_sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return self.redis_srv.url

    def redis_client(self) -> redis.Redis:
        return self.redis_srv.client()

    def write_config(self, dsn: str | None = None, path: Path | None = None,
                     **sections: dict[str, Any]) -> Path:
        merged = {k: dict(v) for k, v in self.config_sections.items()}
        for k, v in sections.items():
            merged.setdefault(k, {}).update(v)
        return write_config(path or self.config, self.redis_url, dsn or self.dsn, **merged)


@contextlib.contextmanager
def bench_env(workdir: Path, dbname: str = "bench", *,
              prepare: Callable[[str], None] | None = None,
              **sections: dict[str, Any]) -> Iterator[Env]:
    """Start redis + postgres, create `dbname` with training_jobs, migrate, yield an Env.
    `prepare(dsn)` runs on the new table before migrate (whose foreign key then refers
    to it). Everything is stopped and removed on exit (and by the harness's atexit hook)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with RedisServer() as rs, PostgresServer() as pg:
        dsn = pg.create_database(dbname)
        create_jobs_table(dsn)
        if prepare is not None:
            prepare(dsn)
        config = workdir / "config.toml"
        env = Env(rs, pg, dbname, dsn, config, workdir, {k: dict(v) for k, v in sections.items()})
        env.write_config()
        migrate(env.config)
        yield env


def pg_copy_rows(dsn: str, rows: Sequence[tuple[Any, ...]], columns: Sequence[str],
                 table: str = "training_jobs") -> None:
    """COPY ``rows`` into ``table``, then ANALYZE it."""
    with Pg(dsn) as pg:
        pg.copy_records(table, rows, columns)
        pg.execute(f"ANALYZE {table}")


# -- RQ state through RQ's own API --------------------------------------------------------------

EXC_TEXT = (
    "Traceback (most recent call last):\n"
    '  File "/srv/app/train.py", line 42, in train\n'
    "    raise RuntimeError(msg)\n"
    "RuntimeError: CUDA out of memory (job {i})\n"
)


def create_rq_jobs(conn: redis.Redis, specs: Sequence[tuple[str, str]], *,
                   func: str = "tests.jobs.succeed", batch: int = 1000,
                   worker_name: str = "") -> None:
    """Create RQ job hashes with RQ's API: Job.create + job.save, then set_status; failed ones
    get a failure Result (exc_string) in rq:results:<id>. `specs` is [(rq_id, status)] with
    status one of queued/finished/failed/started/...; status "missing" (or "no_rq_id")
    creates nothing. A started job names `worker_name` as its worker."""
    pipe = conn.pipeline(transaction=False)
    pending = 0
    for rq_id, status in specs:
        if status in ("missing", "no_rq_id"):
            continue
        job = Job.create(func, args=(1,), id=rq_id, connection=conn, result_ttl=-1)
        if status in ("finished", "failed", "stopped", "canceled", "started"):
            job.started_at = datetime.now(UTC)
        if status == "started":
            job.worker_name = worker_name
        elif status in ("finished", "failed", "stopped", "canceled"):
            job.ended_at = datetime.now(UTC)
        job.save(pipeline=pipe)
        job.set_status(JobStatus(status), pipeline=pipe)
        if status == "failed":
            Result.create_failure(job, 86400, exc_string=EXC_TEXT.format(i=rq_id), pipeline=pipe)
        pending += 1
        if pending >= batch:
            pipe.execute()
            pending = 0
    pipe.execute()


# The active rows of issue 13's sweep fixture, by what RQ says of their job: started on a
# live, idle local worker (they stay running), finished, failed (an exception in RQ's
# results stream), stopped or canceled, gone from Redis, and rows that never got an RQ id.
SWEEP_MIX = (("started", 0.50), ("finished", 0.20), ("failed", 0.10), ("stopped", 0.025),
             ("canceled", 0.025), ("missing", 0.10), ("no_rq_id", 0.05))


def mixed_kinds(n: int, rng: Any) -> list[str]:
    """`n` kinds in SWEEP_MIX's shares (any remainder goes to "started"), shuffled by `rng`."""
    kinds: list[str] = []
    for kind, share in SWEEP_MIX:
        kinds += [kind] * int(n * share)
    kinds += ["started"] * (n - len(kinds))
    rng.shuffle(kinds)
    return kinds


def clone_rq_jobs(conn: redis.Redis, specs: Sequence[tuple[str, str]], *,
                  worker_name: str = "", batch: int = 2000) -> None:
    """What create_rq_jobs makes, for many jobs quickly: one job of each status is made
    with RQ's API, and its keys (the job hash; a failed job's results stream) are copied
    to every other id with DUMP / RESTORE. RQ keeps no job id inside these keys, so each
    copy is the job RQ would have written under that id."""
    templates: dict[str, list[tuple[str, bytes]]] = {}
    for status in sorted({st for _, st in specs} - {"missing", "no_rq_id"}):
        tid = f"template-{status}"
        create_rq_jobs(conn, [(tid, status)], worker_name=worker_name)
        keys = [f"rq:job:{tid}", f"rq:results:{tid}"]
        templates[status] = []
        for key in keys:
            dumped = conn.dump(key)
            if dumped is not None:
                templates[status].append((key.rsplit(tid, 1)[0], cast(bytes, dumped)))
        conn.delete(*keys)
    pipe = conn.pipeline(transaction=False)
    for n, (rq_id, status) in enumerate(specs, 1):
        for prefix, dumped in templates.get(status, ()):
            pipe.restore(prefix + rq_id, 0, dumped, replace=True)
        if n % batch == 0:
            pipe.execute()
    pipe.execute()


def seed_mixed(env: Env, kinds: Sequence[str], *, prefix: str, worker_name: str,
               table: str = "training_jobs", clone: bool = False) -> list[tuple[str | None, str]]:
    """RQ jobs (RQ's API; `clone`: clone_rq_jobs) for `kinds` and one `running` row each,
    started an hour ago, appended to `table` by COPY. Returns the rows' (rq_job_id, kind)
    in id order."""
    specs = [(f"{prefix}-{i:07d}", kind) for i, kind in enumerate(kinds)]
    with env.redis_client() as r:
        (clone_rq_jobs if clone else create_rq_jobs)(r, specs, worker_name=worker_name)
    rows = [(None if kind == "no_rq_id" else rq_id, kind) for rq_id, kind in specs]
    with Pg(env.dsn) as pg:
        pg.copy_records(table, [(rq_id, "running", datetime.now(UTC) - timedelta(hours=1))
                                for rq_id, _ in rows], ["rq_job_id", "status", "started_at"])
    return rows


def load_history(dsn: str, n: int, table: str = "training_jobs") -> None:
    """`n` finished rows (completed, failed, cancelled; RQ ids of jobs long gone from Redis)
    as ids 1..n of the seed-shaped table, the way years of history look: loaded by one
    INSERT ... SELECT generate_series with the table's indexes dropped and built again
    afterwards (an order of magnitude faster than inserting into them), then VACUUM
    ANALYZE. The id sequence continues after them: rows added later are the newest."""
    with Pg(dsn) as pg:
        pg.execute("SET maintenance_work_mem = '512MB'")
        pg.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey CASCADE")
        pg.execute(f"DROP INDEX IF EXISTS {table}_rq_job_id_idx")
        pg.execute(
            f"INSERT INTO {table} (id, name, rq_job_id, status, error_message, created_at, "
            "started_at, completed_at) "
            "SELECT g, 'train', 'hist-' || g, "
            "(ARRAY['completed', 'completed', 'completed', 'failed', 'cancelled'])[g % 5 + 1], "
            "CASE g % 5 WHEN 3 THEN 'Synced: RQ failed: RuntimeError: CUDA out of memory' "
            "WHEN 4 THEN 'Cancelled: web:alice / clicked Cancel' END, "
            "ts, ts + interval '1 minute', ts + interval '30 minutes' "
            f"FROM generate_series(1, {int(n)}) g, "
            f"LATERAL (SELECT now() - interval '3 years' + g * (interval '3 years' / {int(n)})) AS x(ts)")
        pg.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id)")
        pg.execute(f"CREATE INDEX {table}_rq_job_id_idx ON {table} (rq_job_id)")
        pg.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {int(n)})")
        pg.execute(f"VACUUM ANALYZE {table}")


_LAUNCHER = """
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    with open(job["out"], "wb") as out, open(job["err"], "wb") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(job["argv"], stdout=out, stderr=err, cwd=job["cwd"], env=job["env"])
        print(json.dumps({"pid": proc.pid}), flush=True)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss": usage.ru_maxrss * 1024,
                      "cpu": usage.ru_utime + usage.ru_stime, "wall": wall}), flush=True)
"""


class Launcher:
    """Starts commands from a small process of its own and reports each one's exact peak
    RSS (ru_maxrss from os.wait4). Started before a benchmark builds its data: the kernel
    counts a child's memory from the moment it is forked, so a command forked straight
    from a benchmark holding a million rows would report the benchmark's size, not its own."""

    def __init__(self) -> None:
        import subprocess

        self._proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)

    def start(self, argv: Sequence[str], out: Path, err: Path, *, cwd: Path,
              env: dict[str, str]) -> int:
        """Start `argv` (stdout and stderr to files); returns its pid."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"argv": list(argv), "out": str(out), "err": str(err),
                                           "cwd": str(cwd), "env": env}) + "\n")
        self._proc.stdin.flush()
        return int(json.loads(self._proc.stdout.readline())["pid"])

    def wait(self) -> dict[str, Any]:
        """The last command's exit code, peak RSS (bytes), CPU seconds and wall seconds."""
        assert self._proc.stdout is not None
        return dict(json.loads(self._proc.stdout.readline()))

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=10)


# -- process sampling ---------------------------------------------------------------------------


class ProcSampler:
    """Polls a process's RSS (and CPU times) every `interval` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (monotonic, rss bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process(pid)

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                return
            self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak(self) -> int:
        return max((s for _, s in self.samples), default=0)

    def between(self, t0: float, t1: float) -> list[int]:
        return [s for t, s in self.samples if t0 <= t <= t1]


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def mb(n_bytes: float) -> float:
    return n_bytes / (1024 * 1024)


# -- prometheus histograms (read with reconciler.devstack.histogram) ---------------------------


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile() over cumulative buckets (linear within a bucket)."""
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return buckets[-1][0]


def bucket_summary(buckets: Sequence[tuple[float, float]]) -> str:
    """'le=0.005:12 le=0.01:40 ...' for buckets whose count changed."""
    parts = []
    prev = 0.0
    for le, c in buckets:
        if c != prev:
            parts.append(f"<={'+Inf' if math.isinf(le) else f'{le:g}'}:{int(c)}")
        prev = c
    return " ".join(parts)


_START: dict[str, float] = {}


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


def _own_seconds() -> float:
    """CPU of this process and of every descendant it has reaped (the harness reaps its
    servers, workers and daemons; postgres reaps its backends)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def env_info() -> str:
    """One line about the host, including the load average at the start: the numbers are
    only comparable between runs on an otherwise idle machine. Also starts the account
    of CPU used by other processes that footer() prints."""
    _START.update(wall=time.monotonic(), busy=_busy_seconds(), own=_own_seconds())
    return (f"host: {os.cpu_count()} CPUs, {mb(psutil.virtual_memory().total) / 1024:.1f} GiB RAM, "
            f"python {sys.version.split()[0]}; {loadavg()} at start")


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def footer() -> None:
    """Load average, and how much CPU processes outside this benchmark used meanwhile
    (host busy time - this process tree's; call after the servers have been stopped)."""
    print(f"\n{loadavg()} at the end")
    if _START:
        wall = time.monotonic() - _START["wall"]
        busy = _busy_seconds() - _START["busy"]
        own = _own_seconds() - _START["own"]
        other = max(0.0, busy - own)
        print(f"CPU over {wall:.0f} s: host busy {busy:.1f} s, this benchmark's processes {own:.1f} s, "
              f"other processes ~{other:.1f} s ({100 * other / wall / (os.cpu_count() or 1):.0f}% of "
              f"the machine){'  <- numbers disturbed by other load' if other > 0.1 * wall else ''}")
    sys.stdout.flush()



# -- driving RQ state directly (RQ's API, no real worker) --------------------------------------


class DriverWorker:
    """This process registered as an RQ worker (RQ's Worker API: register_birth, heartbeat,
    register_death) and subscribed to its command channel, so that the daemon sees a live
    local worker for the jobs the driver marks `started` (hash present, fresh heartbeat,
    NUMSUB 1, pid alive and older than its birth). Job transitions use RQ's Job API the
    way a real worker does: prepare_for_execution (started), _handle_success (finished)."""

    def __init__(self, conn: redis.Redis, name: str) -> None:
        from rq.command import PUBSUB_CHANNEL_TEMPLATE
        from rq.worker import Worker

        self.conn = conn
        self.name = name
        self.worker = Worker(["default"], connection=conn, name=name)
        self.worker.register_birth()  # type: ignore[no-untyped-call]
        self._pubsub = conn.pubsub()  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(PUBSUB_CHANNEL_TEMPLATE % name)
        self._pubsub.get_message(timeout=1)  # the subscribe confirmation

    def heartbeat(self) -> None:
        self.worker.heartbeat()

    def start_job(self, job: Job, pipe: Any) -> None:
        job.prepare_for_execution(self.name, pipe)

    def finish_job(self, job: Job, pipe: Any) -> datetime:
        from rq.utils import now

        job.ended_at = now()
        job._result = 1
        job._handle_success(-1, pipeline=pipe, worker_name=self.name)
        return job.ended_at

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._pubsub.close()
            self.worker.register_death()  # type: ignore[no-untyped-call]


def pace(t0: float, i: int, rate: float) -> None:
    """Sleep until slot i of a fixed-rate schedule starting at perf_counter() == t0."""
    delay = t0 + i / rate - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
