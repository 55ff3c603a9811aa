"""Never signal a process that was not proven to be the horse of the job being stopped.

Impostors are real processes: a recycled pid (forced with /proc/sys/kernel/ns_last_pid
when we may write it), a live unrelated process under a recorded identity, a worker
record whose pid now belongs to a process born after the worker registered, or to one
that is far older than the registration. Each impostor traps SIGTERM and writes it to a
marker file, so "never signalled" is checked on the victim itself, not on our bookkeeping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
import redis

from reconciler.devstack import (
    DaemonProc,
    Pg,
    WorkerPool,
    enqueue,
    harness_env,
    metric_value,
    migrate,
    pid_alive,
    wait_until,
    write_config,
)
from reconciler.processes import Processes
from reconciler.procfs import ProcIdentity, child_processes, identity_alive, proc_start
from reconciler.rq_layout import WorkerRecord, parse_time
from reconciler.workers import Candidate, Workers
from tests.faults.common import insert_requests

IMPOSTOR = r"""
import os, signal, sys, time
marker, children = sys.argv[1], int(sys.argv[2])
def note(line):
    with open(marker, "a") as f:
        f.write(line + "\n")
signal.signal(signal.SIGTERM, lambda s, f: note(f"SIGTERM {os.getpid()}"))
for _ in range(children):
    if os.fork() == 0:
        os.setsid()  # like an RQ horse: leads its own process group
        note(f"CHILD {os.getpid()}")
        break
else:
    note(f"PARENT {os.getpid()}")
while True:
    time.sleep(0.05)
"""


class Impostor:
    """A python process (optionally with horse-like children) that records SIGTERMs."""

    def __init__(self, tmp: Path, children: int = 0) -> None:
        self.marker = tmp / f"impostor-{uuid.uuid4().hex[:6]}"
        self.marker.touch()
        self.proc = subprocess.Popen([sys.executable, "-c", IMPOSTOR, str(self.marker),
                                      str(children)], env=harness_env())
        wait_until(lambda: self.marker.read_text().count("\n") >= 1 + children, 10,
                   what="impostor up")
        self.pid = self.proc.pid
        self.create_time = psutil.Process(self.pid).create_time()  # wall clock, for births
        start = proc_start(self.pid)  # after boot, for identities
        assert start is not None
        self.start = start
        self.children = [int(ln.split()[1]) for ln in self.marker.read_text().splitlines()
                         if ln.startswith("CHILD")]

    def signalled(self) -> bool:
        return "SIGTERM" in self.marker.read_text()

    def all_alive(self) -> bool:
        return all(pid_alive(p) for p in (self.pid, *self.children))

    def stop(self) -> None:
        for pid in (*self.children, self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL) if pid in self.children else os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def impostors(tmp_path: Path) -> Iterator[list[Impostor]]:
    made: list[Impostor] = []
    yield made
    for imp in made:
        imp.stop()


def record(pid: int, birth: datetime, job: str = "job-1") -> WorkerRecord:
    return WorkerRecord(name="w-fake", exists=True, birth=birth, last_heartbeat=birth, pid=pid,
                        hostname=socket.gethostname(), current_job=job, subscribers=1)


def ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


# -- the proof, against real processes -----------------------------------------------------------


def test_a_recycled_pid_is_never_signalled(tmp_path: Path, impostors: list[Impostor]) -> None:
    procs = Processes()
    first = subprocess.Popen([sys.executable, "-c", "pass"])
    first.wait()
    # what we recorded while it lived
    old = ProcIdentity(first.pid, time.clock_gettime(time.CLOCK_BOOTTIME) - 5)
    if os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        # Make the kernel hand out that very pid again, to a process that traps SIGTERM.
        for _ in range(20):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(first.pid - 1))
            imp = Impostor(tmp_path)
            impostors.append(imp)
            if imp.pid == first.pid:
                break
        else:
            pytest.fail("could not recycle the pid")
    else:  # not root: a live unrelated process under an identity with another create time
        imp = Impostor(tmp_path)
        impostors.append(imp)
        old = ProcIdentity(imp.pid, imp.start - 5)
    assert imp.pid == old.pid
    assert not identity_alive(old)
    assert procs.signal_horse(old, signal.SIGTERM) is False
    assert procs.signal_horse(old, signal.SIGKILL) is False
    procs.horses["job-1"] = old
    assert procs.tracked_horse("job-1") is None
    time.sleep(0.2)
    assert imp.all_alive() and not imp.signalled()
    # and the same process under its true identity *is* signalled: the check is not vacuous
    true = ProcIdentity(imp.pid, imp.start)
    assert identity_alive(true)


def test_a_live_unrelated_pid_with_another_create_time(tmp_path: Path,
                                                       impostors: list[Impostor]) -> None:
    imp = Impostor(tmp_path, children=1)
    impostors.append(imp)
    procs = Processes()
    child = imp.children[0]
    ct = proc_start(child)
    assert ct is not None
    for ident in (ProcIdentity(child, ct + 0.5), ProcIdentity(child, ct - 3600),
                  ProcIdentity(imp.pid, imp.start + 1)):
        assert procs.signal_horse(ident, signal.SIGTERM) is False
    time.sleep(0.2)
    assert imp.all_alive() and not imp.signalled()


def test_a_zombie_is_not_alive() -> None:
    """A process that has exited but is not reaped yet (state Z in /proc/<pid>/stat) is
    dead, as a worker and as a horse: read from /proc, as a live one's state is."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the word, then exit without being reaped
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        ct = proc_start(pid)
        assert ct is not None
        ident = ProcIdentity(pid, ct)
        rec = record(pid, birth=ts(time.time()))
        assert identity_alive(ident)
        assert Processes().local_worker_gone(rec) == ""
        os.write(write, b"x")
        stat = Path(f"/proc/{pid}/stat")
        wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", 10,
                   what="the child a zombie")
        assert not identity_alive(ident)
        assert Processes().local_worker_gone(rec) == f"pid {pid} is dead"
    finally:
        os.close(write)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    assert not identity_alive(ident)  # reaped: gone


def test_worker_record_whose_pid_was_born_after_the_worker(tmp_path: Path,
                                                           impostors: list[Impostor]) -> None:
    imp = Impostor(tmp_path, children=1)
    impostors.append(imp)
    procs = Processes()
    # The worker registered a minute before this process existed: its pid was recycled.
    rec = record(imp.pid, birth=ts(imp.create_time - 60))
    started = ts(imp.create_time - 30)
    assert procs.worker_identity(rec) is None
    assert "recycled" in procs.local_worker_gone(rec)
    assert procs.find_horse(rec, "job-1", started) is None
    assert procs.horses == {}
    assert imp.all_alive() and not imp.signalled()


def test_worker_record_whose_pid_is_far_older_than_the_worker(tmp_path: Path,
                                                              impostors: list[Impostor]) -> None:
    """A pid from another pid namespace (a worker in a container sharing our hostname)
    lands on an old local process, e.g. init. That process did not register the worker,
    and the recent child it happens to have is not a horse."""
    imp = Impostor(tmp_path, children=1)
    impostors.append(imp)
    procs = Processes()
    child_ct = psutil.Process(imp.children[0]).create_time()
    rec = record(imp.pid, birth=ts(imp.create_time + 6 * 3600))
    assert procs.worker_identity(rec) is None
    assert procs.find_horse(rec, "job-1", ts(child_ct - 1)) is None
    assert imp.all_alive() and not imp.signalled()


def test_a_horse_must_be_a_fork_of_the_worker(tmp_path: Path, impostors: list[Impostor]) -> None:
    """A child of the worker pid that leads its own group but runs another program (the pid
    is not our worker's: its children are exec'd services) is not a horse."""
    marker = tmp_path / "exec-child"
    marker.touch()
    child_src = IMPOSTOR.replace("for _ in range(children):", "for _ in range(0):")
    # sh starts a setsid'd python, then becomes `sleep` (exec): parent and child differ in exe
    parent = subprocess.Popen(
        ["sh", "-c", f'setsid "{sys.executable}" -c \'{child_src}\' "{marker}" 0 & exec sleep 600'],
        env=harness_env())
    try:
        wait_until(lambda: "PARENT" in marker.read_text(), 10, what="exec'd child up")
        kid = int(marker.read_text().split()[1])
        wait_until(lambda: psutil.Process(parent.pid).name() == "sleep", 10, what="exec sleep")
        p_ct = psutil.Process(parent.pid).create_time()
        k_ct = psutil.Process(kid).create_time()
        procs = Processes()
        rec = record(parent.pid, birth=ts(p_ct + 1))
        assert procs.worker_identity(rec) is not None  # the "worker" itself passes
        assert procs.find_horse(rec, "job-1", ts(k_ct - 1)) is None
        assert "SIGTERM" not in marker.read_text() and pid_alive(kid)
    finally:
        for pid in (kid if "kid" in dir() else None, parent.pid):
            if pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL) if pid != parent.pid else parent.kill()
        parent.wait()


def read_worker(redis_url: str, name: str) -> WorkerRecord:
    """The worker as the daemon reads it (its hash and, on RQ 3, its executions)."""
    import asyncio

    from reconciler.rq_state import RqState

    async def go() -> WorkerRecord:
        rq = RqState(redis_url)
        try:
            return (await rq.read_workers([name]))[name]
        finally:
            await rq.close()

    return asyncio.run(go())


def test_the_real_horse_is_found(tmp_path: Path, redis_url: str, workers: WorkerPool,
                                 tmp_marker: Path) -> None:
    """The positive control for the refusals above: same code, a real worker, a real horse."""
    w = workers()
    rq_id = enqueue(redis_url, "tests.jobs.touch_and_sleep", 30, str(tmp_marker))
    horse = w.wait_horse()
    wait_until(lambda: w.current_job_id() == rq_id, 10, what="the worker names the job")
    with redis.Redis.from_url(redis_url) as r:
        started = r.hget(f"rq:job:{rq_id}", "started_at")
    rec = read_worker(redis_url, w.name)
    procs = Processes()
    found = procs.find_horse(rec, rq_id, parse_time(started))
    assert found is not None and found.pid == horse


# -- end to end: the daemon cancels jobs whose worker record lies about its pid -----------------


def test_daemon_never_signals_a_pid_it_could_not_prove(tmp_path: Path, redis_url: str,
                                                       pg_dsn: str, workers: WorkerPool,
                                                       impostors: list[Impostor]) -> None:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, sweep={"min_age_seconds": 60.0},
                       cancel={"grace_seconds": 1.0})
    migrate(cfg)
    pool = [workers(wait=False) for _ in range(3)]
    for w in pool:
        w.wait_registered()
    markers: dict[str, Path] = {}
    with Pg(pg_dsn) as pg:
        for _ in pool:
            rq_id = uuid.uuid4().hex
            markers[rq_id] = tmp_path / f"job-{rq_id}"
            markers[rq_id].touch()
            pg.fetch("INSERT INTO training_jobs (rq_job_id, status, started_at) "
                     "VALUES ($1, 'running', now())", rq_id)
            enqueue(redis_url, "tests.jobs.trap_sigterm", 60, str(markers[rq_id]), job_id=rq_id)
        wait_until(lambda: all(w.current_job_id() for w in pool)
                   and all("STARTED" in m.read_text() for m in markers.values()), 20,
                   what="a job on every worker")
        honest, lying_young, lying_old = pool
        job_of = {w.name: w.current_job_id() for w in pool}
        # Now the records lie. `young`'s pid was born after the worker registered (a
        # recycled pid); `old`'s long before (another pid namespace). Each has a child that
        # looks like a horse: it leads its own group and was born after the job started.
        young = Impostor(tmp_path, children=1)
        old = Impostor(tmp_path, children=1)
        impostors += [young, old]
        with redis.Redis.from_url(redis_url) as r:
            # (birth a minute back: within BIRTH_SLACK_SECONDS of it, clocks cannot tell)
            r.hset(lying_young.key, mapping={"pid": str(young.pid), "birth": ts(
                young.create_time - 60).strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
            r.hset(lying_old.key, mapping={"pid": str(old.pid), "birth": ts(
                old.create_time + 6 * 3600).strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
        ids = {name: pg.val("SELECT id FROM training_jobs WHERE rq_job_id = $1", rq)
               for name, rq in job_of.items()}
        rids = insert_requests(pg, list(ids.values()), reason="pid test")
        d = DaemonProc(cfg, tmp_path / "d.log")
        try:
            d.start()
            wait_until(lambda: pg.val("SELECT count(*) FROM rq_reconciler_cancel_requests "
                                      "WHERE state = 'done'") == len(rids), 40, "outcomes", interval=0.1)
            time.sleep(1.5)  # past grace: any late signal would have been sent by now
            for imp in (young, old):
                assert imp.all_alive(), imp.marker.read_text()
                assert not imp.signalled(), imp.marker.read_text()
            # the honest worker's horse was proven and stopped gracefully
            assert "SIGTERM" in markers[job_of[honest.name]].read_text()
            out = {r["job_id"]: r for r in pg.fetch(
                "SELECT job_id, outcome, detail FROM rq_reconciler_cancel_requests")}
            assert out[ids[honest.name]]["outcome"] == "cancelled"
            assert '"SIGTERM"' in out[ids[honest.name]]["detail"]
            for w in (lying_young, lying_old):
                assert '"SIGTERM"' not in (out[ids[w.name]]["detail"] or "")
                assert "SIGTERM" not in markers[job_of[w.name]].read_text()
            text = d.scrape()
            assert metric_value(text, "rq_reconciler_process_signals_total", signal="SIGTERM") == 1
            assert metric_value(text, "rq_reconciler_process_signals_total", signal="SIGKILL") == 0
            assert d.stop() == 0
            print("\n" + "\n".join(f"{w.name}: {out[ids[w.name]]['outcome']} "
                                    f"{out[ids[w.name]]['detail']}" for w in pool))
        finally:
            d.close()


def test_a_stale_worker_record_never_proves_the_next_jobs_horse(
        redis_url: str, workers: WorkerPool, tmp_marker: Path) -> None:
    """Found by the 200+200 replica storm: a worker record read while job A ran, and the
    worker's children listed after A ended and B's horse was forked, 'proved' B's horse to
    be A's -- and a cancel of A sent SIGTERM to B. The fresh re-read must refuse it."""
    import asyncio

    from reconciler.rq_state import RqState

    w = workers()
    a = enqueue(redis_url, "tests.jobs.sleep", 0.5)
    wait_until(lambda: w.current_job_id() == a, 10, what="A running")
    stale = read_worker(redis_url, w.name)
    assert stale.current_job == a
    with redis.Redis.from_url(redis_url) as r:
        a_started = parse_time(r.hget(f"rq:job:{a}", "started_at"))
    b = enqueue(redis_url, "tests.jobs.touch_and_sleep", 30, str(tmp_marker))
    wait_until(lambda: w.current_job_id() == b, 10, what="B running")
    b_horse = w.wait_horse()
    procs = Processes()
    cand = procs.find_horse(stale, a, a_started)
    # the hazard is real: half a proof picks B's horse for A
    assert cand is not None and cand.pid == b_horse

    async def confirm() -> None:

        rq = RqState(redis_url)
        try:
            rec = Workers(rq, procs)
            await rec.confirm_horses({a: Candidate(w.name, cand, stale.execution_id)})
            assert await rec.prove_horse(w.name, a, a_started) is None
            proven = await rec.prove_horse(w.name, b, None)
            assert proven is not None and proven.pid == b_horse
        finally:
            await rq.close()

    asyncio.run(confirm())
    assert a not in procs.horses
    assert procs.horses[b].pid == b_horse


def test_child_processes_lists_exactly_the_live_direct_children() -> None:
    """Horse candidates come from /proc/<pid>/task/*/children, not a scan of every
    process: it must list the same children psutil does, no grandchildren, none that ended."""
    me = psutil.Process()
    before = {p.pid for p in child_processes(me)}
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
                               "time.sleep(30)"])
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until(lambda: len(psutil.Process(parent.pid).children()) == 1, 10, what="grandchild")
        quick.wait(10)  # reaped: gone from the list
        mine = {p.pid for p in child_processes(me)} - before
        assert mine == {parent.pid} == {p.pid for p in me.children()} - before
        grand = psutil.Process(parent.pid).children()
        assert [p.pid for p in child_processes(psutil.Process(parent.pid))] == [grand[0].pid]
    finally:
        for p in psutil.Process(parent.pid).children():
            p.kill()
        parent.kill()
        parent.wait(10)


# -- a horse its worker left behind before this host proved it ---------------------------------


def _started(redis_url: str, rq_id: str) -> datetime | None:
    with redis.Redis.from_url(redis_url) as r:
        raw = r.hget(f"rq:job:{rq_id}", "started_at")
    return parse_time(raw)


def test_an_orphaned_horse_is_found_by_what_the_fork_gave_it(
        redis_url: str, workers: WorkerPool, tmp_marker: Path) -> None:
    """The worker was proven here but its horse was not (it died a moment after the fork):
    the horse, reparented, is recognised by its worker's session and program, and is the
    only process taken for it."""
    w = workers()
    procs = Processes()
    assert procs.worker_identity(read_worker(redis_url, w.name)) is not None
    rq_id = enqueue(redis_url, "tests.jobs.touch_and_sleep", 30, str(tmp_marker))
    horse = w.wait_horse()
    wait_until(lambda: "STARTED" in tmp_marker.read_text(), 10, what="the job runs")
    started = _started(redis_url, rq_id)
    assert procs.orphaned_horse(w.name, rq_id, started).why == "the worker lives"
    w.kill(signal.SIGKILL)
    wait_until(lambda: not w.is_alive(), 10, what="the worker dies")
    assert psutil.Process(horse).ppid() != w.pid  # reparented
    left = procs.orphaned_horse(w.name, rq_id, started)
    assert left.horse is not None and left.horse.pid == horse and not left.absent
    # Outside the fork's window (a job that started an hour later), nothing is proven.
    later = datetime.fromtimestamp(time.time() + 3600, UTC)
    assert procs.orphaned_horse(w.name, rq_id, later).horse is None
    os.killpg(horse, signal.SIGKILL)
    wait_until(lambda: not pid_alive(horse), 10, what="the horse dies")
    gone = procs.orphaned_horse(w.name, rq_id, started)
    assert gone.horse is None and gone.absent, gone.why  # the worker led its session


def test_no_orphaned_horse_for_a_worker_never_proven_here(
        redis_url: str, workers: WorkerPool, tmp_marker: Path) -> None:
    w = workers()
    rq_id = enqueue(redis_url, "tests.jobs.touch_and_sleep", 30, str(tmp_marker))
    horse = w.wait_horse()
    started = _started(redis_url, rq_id)
    w.kill(signal.SIGKILL)
    wait_until(lambda: not w.is_alive(), 10, what="the worker dies")
    left = Processes().orphaned_horse(w.name, rq_id, started)
    assert left.horse is None and not left.absent
    assert pid_alive(horse)
    os.killpg(horse, signal.SIGKILL)


def test_two_horses_in_one_session_are_never_guessed(tmp_path: Path) -> None:
    """A worker that did not lead its session (started from a shell) shares it: two
    process-group leaders of its program there, both started around the job's start, and
    neither is taken."""
    marker = tmp_path / "twins"
    marker.touch()
    src = IMPOSTOR.replace("os.setsid()", "os.setpgrp()")
    # The "worker" forks two horse-like children (setpgrp, same program), then dies.
    parent = subprocess.Popen([sys.executable, "-c", src, str(marker), "2"],
                              env=harness_env(), start_new_session=True)
    kids: list[int] = []
    try:
        wait_until(lambda: marker.read_text().count("CHILD") == 2
                   and "PARENT" in marker.read_text(), 10, what="twins up")
        kids = [int(line.split()[1]) for line in marker.read_text().splitlines()
                if line.startswith("CHILD")]
        ct = psutil.Process(parent.pid).create_time()
        procs = Processes()
        assert procs.worker_identity(record(parent.pid, birth=ts(ct + 1))) is not None
        parent.kill()
        parent.wait(10)
        left = procs.orphaned_horse("w-fake", "job-1", datetime.now(UTC))
        assert left.horse is None and not left.absent and "2 processes" in left.why
        assert "SIGTERM" not in marker.read_text()
    finally:
        for k in kids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(k, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
