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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psutil

from reconciler.rq_state import WorkerRecord

# Worker birth is written after its process starts: the process must be older than its
# birth record (plus clock slack). A process created after it is a recycled pid.
BIRTH_SLACK_SECONDS = 2.0
# ...and not much older either: a process far older than the birth record did not write
# it (e.g. the pid of a worker in another pid namespace, on a host that shares our
# hostname, lands on init or some old daemon here). `rq worker` registers within seconds.
WORKER_STARTUP_SECONDS = 600.0
# The horse forks right after RQ writes started_at.
HORSE_SLACK_SECONDS = 2.0


def child_processes(proc: psutil.Process) -> list[psutil.Process]:
    """The direct children of `proc`, from /proc/<pid>/task/<tid>/children (Linux >= 3.5,
    CONFIG_PROC_CHILDREN): a few reads, where psutil's children() reads the stat file of
    every process on the host (about 1.5 ms each time on a quiet host, and growing with
    it). Falls back to psutil where the kernel does not offer the file."""
    base = f"/proc/{proc.pid}/task"
    try:
        tids = os.listdir(base)
    except FileNotFoundError:
        raise psutil.NoSuchProcess(proc.pid) from None
    except OSError:
        return proc.children(recursive=False)
    pids: list[int] = []
    for tid in tids:
        try:
            with open(f"{base}/{tid}/children", "rb") as f:
                pids.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            if tid == str(proc.pid) and os.path.exists(base):
                return proc.children(recursive=False)  # no CONFIG_PROC_CHILDREN
            continue  # that thread just exited
    out: list[psutil.Process] = []
    for pid in dict.fromkeys(pids):
        try:
            child = psutil.Process(pid)
            if child.ppid() == proc.pid:  # the pid may have been reused since the read
                out.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


@dataclass(frozen=True, slots=True)
class ProcIdentity:
    pid: int
    create_time: float


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ValueError):
        return None


def identity_alive(ident: ProcIdentity) -> bool:
    """True while the process with this pid is still the one first seen (and not a zombie)."""
    try:
        p = psutil.Process(ident.pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return p.create_time() == ident.create_time
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


class Processes:
    """What this host can see and do about RQ workers and horses."""

    def __init__(self, hostname: str | None = None,
                 on_signal: Callable[[str], None] | None = None) -> None:
        self.hostname = hostname or socket.gethostname()
        self._on_signal = on_signal
        # job id -> the horse proven for it while its worker was alive
        self.horses: dict[str, ProcIdentity] = {}

    def is_local(self, rec: WorkerRecord) -> bool:
        return bool(rec.hostname) and rec.hostname == self.hostname

    def worker_identity(self, rec: WorkerRecord) -> ProcIdentity | None:
        """The live process that registered `rec`, or None."""
        if rec.pid is None or rec.pid <= 0:
            return None
        ct = _create_time(rec.pid)
        if ct is None:
            return None
        if rec.birth is not None and ct > rec.birth.timestamp() + BIRTH_SLACK_SECONDS:
            return None  # recycled pid: this process started after the worker registered
        if rec.birth is not None and ct < rec.birth.timestamp() - WORKER_STARTUP_SECONDS:
            return None  # not the process that registered: it is not our worker's pid
        ident = ProcIdentity(rec.pid, ct)
        return ident if identity_alive(ident) else None

    def local_worker_gone(self, rec: WorkerRecord) -> str:
        """'' if the local worker's process is alive and is the one that registered."""
        if rec.pid is None:
            return "no pid recorded"
        ct = _create_time(rec.pid)
        if ct is None:
            return f"pid {rec.pid} is dead"
        if rec.birth is not None and ct > rec.birth.timestamp() + BIRTH_SLACK_SECONDS:
            return f"pid {rec.pid} was recycled"
        try:
            if psutil.Process(rec.pid).status() == psutil.STATUS_ZOMBIE:
                return f"pid {rec.pid} is dead"
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return f"pid {rec.pid} is dead"
        return ""

    def find_horse(self, rec: WorkerRecord, job_id: str,
                   job_started_at: datetime | None) -> ProcIdentity | None:
        """The one process that can be `job_id`'s horse under the live worker `rec`.

        The worker pid is alive and is the process that registered; `rec.current_job` is
        this job; the candidate is its child, leads its own process group, runs the
        worker's executable and was created after the job started (minus slack).

        This is only half a proof: `rec` was read before the children were listed, and
        the worker may have moved on to its next job in between. Reconciler.prove_horse()
        completes it with a fresh read and only then remember()s the horse.
        """
        if not self.is_local(rec) or rec.current_job != job_id:
            return None
        worker = self.worker_identity(rec)
        if worker is None:
            return None
        try:
            wproc = psutil.Process(worker.pid)
            children = child_processes(wproc)
            exe = wproc.exe()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        found: list[ProcIdentity] = []
        for child in children:
            try:
                if os.getpgid(child.pid) != child.pid:
                    continue
                ct = child.create_time()
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                # A horse is a fork of its worker (or, with SpawnWorker, the same
                # interpreter): a child running another program is not one.
                if child.exe() != exe:
                    continue
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess,
                    ProcessLookupError):
                continue
            if job_started_at is not None and ct < job_started_at.timestamp() - HORSE_SLACK_SECONDS:
                continue
            found.append(ProcIdentity(child.pid, ct))
        if len(found) != 1:
            return None  # none, or ambiguous: never guess
        return found[0]

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
        except OSError:
            self._on_exit(key)
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
