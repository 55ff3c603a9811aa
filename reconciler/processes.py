"""Local processes: prove a work-horse's identity, signal it, watch local workers die.

Never signal a process that was not proven, at the moment of the signal, to be the
horse of the job being stopped: pid + create time is the identity, a bare pid is not.
Signals go to the horse's process group (RQ makes the horse a group leader) so that
whatever the job spawned goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from reconciler.hostpid import UtsNames, nspid_index, runs_rq
from reconciler.procfs import (
    ENDED,
    HZ,
    Lineage,
    ProcIdentity,
    child_processes,
    env_disagrees,
    environ_disagrees,
    exe_of,
    identity_alive,
    is_process,
    pids,
    proc_start,
    proc_stat,
    read_lineage,
    rq_env,
    start_and_state,
    state_of,
    to_wall,
)
from reconciler.rq_layout import WorkerRecord

if TYPE_CHECKING:
    # psutil is imported by what lists and inspects a worker's children (proving a horse);
    # whether a known process still lives is one read of /proc, which a sweep on a host
    # without workers, or whose workers are idle, never needs psutil for.
    pass

# Worker birth is written after its process starts: the process must be older than its
# birth record (plus clock slack). A process created after it is a recycled pid.
BIRTH_SLACK_SECONDS = 2.0
# ...and not much older either: a process far older than the birth record did not write
# it (e.g. the pid of a worker in another pid namespace, on a host that shares our
# hostname, lands on init or some old daemon here). `rq worker` registers within seconds.
WORKER_STARTUP_SECONDS = 600.0
# The horse forks right after RQ writes started_at.
HORSE_SLACK_SECONDS = 2.0
# How long a stopped horse's worker gets to reap it before its group is scanned for
# leftovers: REAP_WAITS looks, REAP_WAIT_SECONDS apart.
REAP_WAITS = 10
REAP_WAIT_SECONDS = 0.0005
# Worker identities remembered (local workers only; a host runs a few dozen at most).
MAX_KNOWN_WORKERS = 10_000
# Host-PID mode (hostpid.py): how long one reading of every process's NSpid serves the
# workers looked up meanwhile.
NSPID_INDEX_SECONDS = 0.5
# An orphaned horse (its worker died before this host proved it) started this long before
# the job's started_at at most (RQ's horse writes started_at itself, after the fork: a
# loaded host may take a while to get there), and HORSE_SLACK_SECONDS after it at most.
ORPHAN_FORK_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class OrphanedHorse:
    """What a dead local worker left of a job's horse: the one process proven to be it,
    or proof that none is left (`absent`), or neither (both empty: never guess)."""

    horse: ProcIdentity | None = None
    absent: bool = False
    why: str = ""


def _registered(pid: int, registered: int, birth: datetime | None) -> ProcIdentity | None:
    """`pid` (here) as the live process that registered pid `registered` at `birth`: a
    process, not a thread, created within the birth's slack; or None."""
    ct = proc_start(pid)
    if ct is None or not is_process(pid):
        return None
    if birth is not None:
        wall = to_wall(ct)
        if wall > birth.timestamp() + BIRTH_SLACK_SECONDS:
            return None  # recycled pid: this process started after the worker registered
        if wall < birth.timestamp() - WORKER_STARTUP_SECONDS:
            return None  # not the process that registered: it is not our worker's pid
    ident = ProcIdentity(pid, ct)
    return ident if identity_alive(ident) else None


class Processes:
    """What this host can see and do about RQ workers and horses."""

    def __init__(self, hostname: str | None = None,
                 on_signal: Callable[[str], None] | None = None, *,
                 host_pid: bool = False) -> None:
        """`host_pid`: also map workers that registered another hostname and a pid inside
        a PID namespace below ours (a pod's, seen from its node: hostpid.py); only where
        hostpid.available() says this daemon can prove them."""
        self.hostname = hostname or socket.gethostname()
        self._on_signal = on_signal
        self.host_pid = host_pid
        # job id -> the horse proven for it while its worker was alive
        self.horses: dict[str, ProcIdentity] = {}
        # worker name -> (the pid it registered, its process as proven here once: pid in
        # our namespace and start against its birth); later checks compare that identity
        # only, so a step of the wall clock cannot make a live worker look recycled.
        self._workers: dict[str, tuple[int, ProcIdentity]] = {}
        # worker name -> its Lineage, read when it was proven (for horses it leaves behind)
        self._lineage: dict[str, Lineage] = {}
        # Host-PID mode: workers of other hostnames already looked for and not found here
        # (name, pid, birth): a process does not move into view after it registered.
        self._unmapped: dict[tuple[str, int, float | None], None] = {}
        self._nspids: tuple[float, dict[int, list[int]]] | None = None
        self._uts = UtsNames()

    def _mapped(self, rec: WorkerRecord) -> bool:
        """`rec` registered another hostname: ours only through host-PID mode."""
        return rec.hostname != self.hostname

    def _known(self, rec: WorkerRecord) -> ProcIdentity | None:
        known = self._workers.get(rec.name)
        return known[1] if known is not None and known[0] == rec.pid else None

    def is_local(self, rec: WorkerRecord) -> bool:
        """A worker runs on this host if its hostname is ours *and* its pid, seen from here,
        is the process that registered it (or was, when we proved it); in host-PID mode
        also a worker of another hostname whose process we proved in a PID namespace below
        ours (hostpid.py). A worker whose pid we cannot see (another PID namespace, another
        machine of the same name) is remote: never taken for dead."""
        if not rec.hostname or rec.pid is None:
            return False
        if self._mapped(rec) and not self.host_pid:
            return False
        if self._known(rec) is not None:
            return True
        return self.worker_identity(rec) is not None

    def unseen(self, rec: WorkerRecord) -> str:
        """Why this replica cannot stop `rec`'s jobs gracefully although the worker says it
        runs on this hostname, or '' if it can (or the worker is another host's). A worker
        on our hostname whose pid we cannot prove lives in another PID namespace: a
        container of its own, a pod without a shared process namespace."""
        if not rec.hostname or rec.pid is None:
            return ""
        mapped = self._mapped(rec)
        if mapped and not self.host_pid:
            return ""
        ident = self.worker_identity(rec)
        if ident is None:
            if mapped:
                return ""  # another host's, as far as this node can tell
            return (f"worker {rec.name} registered from this hostname with pid {rec.pid}, "
                    "which this replica cannot see: it runs in another PID namespace")
        try:
            os.kill(ident.pid, 0)
        except PermissionError:
            return (f"worker {rec.name} (pid {rec.pid}) runs as another user: this replica "
                    "may not signal its horses")
        except ProcessLookupError:
            return ""
        return ""

    def worker_identity(self, rec: WorkerRecord) -> ProcIdentity | None:
        """The live process that registered `rec` (its pid in our namespace), or None."""
        if rec.pid is None or rec.pid <= 0:
            return None
        known = self._known(rec)
        if known is not None:
            return known if identity_alive(known) else None
        if self._mapped(rec):
            ident = self._map(rec) if self.host_pid else None
        else:
            ident = _registered(rec.pid, rec.pid, rec.birth)
        if ident is None:
            return None
        if len(self._workers) >= MAX_KNOWN_WORKERS:
            oldest = next(iter(self._workers))
            del self._workers[oldest]
            self._lineage.pop(oldest, None)
        self._workers[rec.name] = (rec.pid, ident)
        lineage = read_lineage(ident)
        if lineage is not None:
            self._lineage[rec.name] = lineage
        return ident

    def _map(self, rec: WorkerRecord) -> ProcIdentity | None:
        """Host-PID mode: the one process of this node that registered `rec` from a PID and
        UTS namespace of its own, or None (none, or more than one: never guess)."""
        assert rec.pid is not None
        key = (rec.name, rec.pid, None if rec.birth is None else rec.birth.timestamp())
        if key in self._unmapped:
            return None
        fresh = self._nspids is None or time.monotonic() - self._nspids[0] > NSPID_INDEX_SECONDS
        while True:
            if fresh or self._nspids is None:
                self._nspids = (time.monotonic(), nspid_index())
            found = [ident for host in self._nspids[1].get(rec.pid, ())
                     if (ident := self._mapped_candidate(host, rec)) is not None]
            if found or fresh:
                break
            # Not in a reading made before `rec` was: read again (the worker may be newer).
            fresh = True
        if len(found) == 1:
            return found[0]
        if len(self._unmapped) >= MAX_KNOWN_WORKERS:
            self._unmapped.pop(next(iter(self._unmapped)))
        self._unmapped[key] = None
        return None

    def _mapped_candidate(self, host: int, rec: WorkerRecord) -> ProcIdentity | None:
        """`host` (a pid here whose innermost pid is `rec.pid`) if it is the process that
        registered `rec`: a process (not a thread), started within the birth's slack, an
        RQ worker by its command line, in a UTS namespace whose hostname is the one the
        worker registered."""
        assert rec.pid is not None
        ident = _registered(host, rec.pid, rec.birth)
        if ident is None or not runs_rq(host):
            return None
        if self._uts.nodename(host, lambda: identity_alive(ident)) != rec.hostname:
            return None
        return ident if identity_alive(ident) else None

    def local_worker_gone(self, rec: WorkerRecord) -> str:
        """'' if the local worker's process is alive and is the one that registered."""
        if rec.pid is None:
            return "no pid recorded"
        known = self._known(rec)
        if known is not None:
            # (kept after the death: the worker stays local, so its orphaned horse is ours)
            return "" if identity_alive(known) else f"pid {rec.pid} is dead"
        if self._mapped(rec):
            # Only ever asked once is_local() proved it (which remembers it): it just died.
            ident = self.worker_identity(rec)
            return "" if ident is not None else f"pid {rec.pid} (in its PID namespace) is dead"
        st = start_and_state(rec.pid)
        if st is None:
            return f"pid {rec.pid} is dead"
        if rec.birth is not None and to_wall(st[0]) > rec.birth.timestamp() + BIRTH_SLACK_SECONDS:
            return f"pid {rec.pid} was recycled"
        if st[1] in ENDED:
            return f"pid {rec.pid} is dead"
        return ""

    def known_worker_gone(self, name: str) -> str | None:
        """For a worker whose process was proven here once: '' while that process lives,
        else why it is gone. None if it never was (this host has no proof either way)."""
        known = self._workers.get(name)
        if known is None:
            return None
        return "" if identity_alive(known[1]) else f"pid {known[1].pid} is dead"

    def find_horse(self, rec: WorkerRecord, job_id: str,
                   job_started_at: datetime | None) -> ProcIdentity | None:
        """The one process that can be `job_id`'s horse under the live worker `rec`.

        The worker pid is alive and is the process that registered; `rec` is a layout we
        can read (RQ 2, or RQ 3 with one live execution) and its `current_job` is this job;
        the candidate is its child, leads its own process group, runs the worker's
        executable and was created after the execution began (RQ writes it before it
        forks; failing that, after the job started, minus slack); and what its environment
        says it runs (a SpawnWorker horse's RQ_JOB_ID / RQ_EXECUTION_ID) agrees.

        This is only half a proof: `rec` was read before the children were listed, and
        the worker may have moved on to its next job in between. Reconciler.prove_horse()
        completes it with a fresh read and only then remember()s the horse.
        """
        if not self.is_local(rec) or rec.current_job != job_id or not rec.provable:
            return None
        worker = self.worker_identity(rec)
        if worker is None:
            return None
        import psutil

        try:
            wproc = psutil.Process(worker.pid)
            children = child_processes(wproc)
            exe = wproc.exe()
            inherited = rq_env(wproc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        began = rec.execution_created_at or job_started_at
        found: list[ProcIdentity] = []
        for child in children:
            try:
                if os.getpgid(child.pid) != child.pid:
                    continue
                st = start_and_state(child.pid)
                if st is None or st[1] in ENDED:
                    continue
                ct = st[0]
                # A horse is a fork of its worker (or, with SpawnWorker, the same
                # interpreter): a child running another program is not one.
                if child.exe() != exe:
                    continue
                if env_disagrees(child, inherited, job_id, rec.execution_id):
                    continue
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess,
                    ProcessLookupError):
                continue
            if began is not None and to_wall(ct) < began.timestamp() - HORSE_SLACK_SECONDS:
                continue
            found.append(ProcIdentity(child.pid, ct))
        if len(found) != 1:
            return None  # none, or ambiguous: never guess
        return found[0]

    def orphaned_horse(self, worker_name: str, job_id: str,
                       job_started_at: datetime | None) -> OrphanedHorse:
        """`job_id`'s horse, left behind by the local worker `worker_name`, which died
        before this host proved the horse (it forked a moment before it was killed).

        Only for a worker proven here, and now dead. Its horse outlives it reparented, but
        keeps what RQ's fork gave it: the worker's session (RQ's horse calls setpgrp(),
        never setsid()) and program. The one process that is a process-group leader in that
        session, runs the worker's program, started after the worker did and around the
        job's start (ORPHAN_FORK_SECONDS before it, HORSE_SLACK_SECONDS after), whose parent
        is not a live process of that program (then it is another worker's horse) and
        whose environment names no other job or execution, is the horse. A worker that led
        its own session (systemd, supervisors, `setsid`) and left no live process in it
        left no horse: that is proof too. Anything else proves nothing."""
        known = self._workers.get(worker_name)
        lineage = self._lineage.get(worker_name)
        if known is None or lineage is None:
            return OrphanedHorse(why="the worker was never proven here")
        worker = known[1]
        if identity_alive(worker):
            return OrphanedHorse(why="the worker lives")
        began = None if job_started_at is None else job_started_at.timestamp()
        in_session = 0
        found: list[ProcIdentity] = []
        for name in pids():
            pid = int(name)
            st = proc_stat(pid)
            if st is None or st.session != lineage.session or st.state in ENDED:
                continue
            in_session += 1
            if st.pgrp != pid or st.start < worker.create_time or pid == os.getpid():
                continue
            if began is not None:
                wall = to_wall(st.start)
                if not began - ORPHAN_FORK_SECONDS <= wall <= began + HORSE_SLACK_SECONDS:
                    continue
            if exe_of(pid) != lineage.exe:
                continue
            parent = proc_stat(st.ppid)
            if parent is not None and parent.state not in ENDED and exe_of(st.ppid) == lineage.exe:
                continue  # a live worker's own horse
            if environ_disagrees(pid, lineage.env, job_id):
                continue
            found.append(ProcIdentity(pid, st.start))
        live = [ident for ident in found if identity_alive(ident)]
        if len(live) == 1:
            return OrphanedHorse(horse=live[0], why="the one horse left in its session")
        if live:
            return OrphanedHorse(why=f"{len(live)} processes could be its horse")
        if lineage.leads_session and in_session == 0:
            return OrphanedHorse(absent=True, why=f"no process of its session {lineage.session} "
                                                  "is left")
        return OrphanedHorse(why="no process proven to be its horse")

    def remember(self, job_id: str, ident: ProcIdentity) -> None:
        self.horses[job_id] = ident

    def tracked_horse(self, job_id: str) -> ProcIdentity | None:
        """A horse proven earlier (its worker may be dead now), if it is still that process."""
        ident = self.horses.get(job_id)
        if ident is None:
            return None
        if identity_alive(ident):
            return ident
        self.horses.pop(job_id, None)
        return None

    def forget(self, job_id: str) -> None:
        self.horses.pop(job_id, None)

    def signal_horse(self, ident: ProcIdentity, sig: signal.Signals) -> bool:
        """Signal the horse's process group, re-proving identity right before the call."""
        if not identity_alive(ident):
            return False
        try:
            if os.getpgid(ident.pid) != ident.pid:
                return False
            os.killpg(ident.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        if self._on_signal is not None:
            self._on_signal(sig.name)
        return True

    def group_leftovers(self, leader: ProcIdentity) -> list[ProcIdentity]:
        """Processes still in the process group `leader` led, once the leader is gone: what
        the job spawned (a data loader that ignores SIGTERM, say). A group id is never
        handed to a new process while any member lives, and every member started after
        the leader did: both are checked, so nothing outside the group is ever named."""
        out: list[ProcIdentity] = []
        # One system call answers the usual case: no process is left in the group (the
        # leader reaped, nothing spawned), where reading every /proc/<pid>/stat on the host
        # costs a millisecond or more of the cancel. PermissionError means someone is there
        # that we may not signal: the scan below looks who.
        with contextlib.suppress(PermissionError):
            try:
                os.killpg(leader.pid, 0)
            except ProcessLookupError:
                return out
        try:
            entries = os.listdir("/proc")
        except OSError:
            return out
        for name in entries:
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read()
                rest = fields[fields.rindex(b")") + 2:].split()
                pgrp, start = int(rest[2]), int(rest[19]) / HZ
            except (OSError, ValueError, IndexError):
                continue
            if pgrp == leader.pid and int(name) != leader.pid and start >= leader.create_time:
                out.append(ProcIdentity(int(name), start))
        return out

    async def kill_leftovers(self, leader: ProcIdentity, wait: float = 2.0) -> list[int]:
        """SIGKILL what is left of the stopped horse's process group, and wait (bounded)
        for it to go. Returns the pids signalled."""
        killed: list[int] = []
        # Until its worker reaps it, the exited leader (a zombie) alone keeps the group in
        # being, and only a scan of every process tells whether anything else is left in
        # it. The worker reaps at once; a few milliseconds of waiting for that usually
        # save the scan (group_leftovers' one-call answer).
        for _ in range(REAP_WAITS):
            if state_of(leader) != "Z":
                break
            await asyncio.sleep(REAP_WAIT_SECONDS)
        for ident in self.group_leftovers(leader):
            if not identity_alive(ident):
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(ident.pid, signal.SIGKILL)
                killed.append(ident.pid)
                if self._on_signal is not None:
                    self._on_signal("SIGKILL")
        for pid in killed:
            start = proc_start(pid)
            if start is not None:
                await wait_pid_exit(ProcIdentity(pid, start), wait)
        return killed

    async def wait_exit(self, ident: ProcIdentity, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until the process exits (pidfd, no polling). True if it did in time."""
        return await wait_pid_exit(ident, timeout)


async def wait_pid_exit(ident: ProcIdentity, timeout: float) -> bool:  # noqa: ASYNC109
    if not identity_alive(ident):
        return True
    try:
        fd = os.pidfd_open(ident.pid)
    except (ProcessLookupError, OSError):
        return True
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    try:
        # Opened after the identity check: if the pid was recycled in between, the new
        # process is not ours; re-check once the fd is held.
        if not identity_alive(ident):
            return True
        loop.add_reader(fd, ready)
        try:
            async with asyncio.timeout(timeout):  # the one way to bound a wait (aio.py)
                await fut
            return True
        except TimeoutError:
            return not identity_alive(ident)
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


class PidWatcher:
    """Calls `on_exit(key)` the moment a watched process exits (pidfd readable)."""

    def __init__(self, on_exit: Callable[[str], None]) -> None:
        self._on_exit = on_exit
        self._fds: dict[str, tuple[int, ProcIdentity]] = {}

    def watching(self, key: str) -> bool:
        return key in self._fds

    def watch(self, key: str, ident: ProcIdentity) -> bool:
        if key in self._fds:
            return True
        try:
            fd = os.pidfd_open(ident.pid)
        except ProcessLookupError:
            self._on_exit(key)
            return False
        except OSError:
            # EINVAL (a thread, not a process), EMFILE...: no death was seen. The passes
            # still judge this worker by its pid and by Redis; nothing is reported here.
            return False
        if not identity_alive(ident):
            os.close(fd)
            self._on_exit(key)
            return False
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, self._fired, key)
        self._fds[key] = (fd, ident)
        return True

    def _fired(self, key: str) -> None:
        self.unwatch(key)
        self._on_exit(key)

    def unwatch(self, key: str) -> None:
        entry = self._fds.pop(key, None)
        if entry is None:
            return
        fd, _ = entry
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)

    def close(self) -> None:
        for key in list(self._fds):
            self.unwatch(key)


SIGTERM = signal.SIGTERM
SIGKILL = signal.SIGKILL
