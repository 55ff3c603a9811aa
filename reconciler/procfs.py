"""What /proc says of a process: its identity (pid + start time), state, session, program
and environment, read without psutil where one read of a small file will do.

Pure reads, no decisions: processes.py proves and signals with them. Start times are the
kernel's (seconds after boot), which no step of the wall clock moves.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # psutil is imported by what lists and inspects a worker's children (proving a horse);
    # whether a known process still lives is one read of /proc, which a sweep on a host
    # without workers, or whose workers are idle, never needs psutil for.
    import psutil


def child_processes(proc: psutil.Process) -> list[psutil.Process]:
    """The direct children of `proc`, from /proc/<pid>/task/<tid>/children (Linux >= 3.5,
    CONFIG_PROC_CHILDREN): a few reads, where psutil's children() reads the stat file of
    every process on the host (about 1.5 ms each time on a quiet host, and growing with
    it). Falls back to psutil where the kernel does not offer the file."""
    import psutil

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
    """A process, not a pid: `create_time` is when it started, in seconds after boot (the
    kernel's own record, which no step of the wall clock moves)."""

    pid: int
    create_time: float


HZ = os.sysconf("SC_CLK_TCK")


def start_and_state(pid: int) -> tuple[float, str] | None:
    """When `pid` started, in seconds after boot (field 22 of /proc/<pid>/stat), and its
    state letter (field 3: R, S, Z...), from one read; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: split after its end.
        rest = stat[stat.rindex(b")") + 2:].split()
        return int(rest[19]) / HZ, rest[0].decode()
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/<pid>/stat a horse is recognised by."""

    state: str
    ppid: int
    pgrp: int
    session: int
    start: float  # seconds after boot


def proc_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        rest = stat[stat.rindex(b")") + 2:].split()
        return ProcStat(rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[3]),
                        int(rest[19]) / HZ)
    except (OSError, ValueError, IndexError):
        return None


def exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class Lineage:
    """What a proven worker's horses inherit from it, read while it lived: its program,
    its session (RQ's horse leaves its worker's process group with setpgrp(), not its
    session) and the horse-naming variables it was itself started with."""

    exe: str
    session: int
    leads_session: bool
    env: dict[str, str]


def proc_start(pid: int) -> float | None:
    """When `pid` started, in seconds after boot, or None."""
    st = start_and_state(pid)
    return None if st is None else st[0]


def state_of(ident: ProcIdentity) -> str:
    """The state letter of `ident`, '' if that process is gone (the pid missing, or
    another process's now)."""
    st = start_and_state(ident.pid)
    return st[1] if st is not None and st[0] == ident.create_time else ""


def is_process(pid: int) -> bool:
    """True if `pid` names a process (a thread-group leader), not one of some process's
    threads: /proc/<tid> answers for a thread too, although /proc does not list it, so in
    a PID namespace of its own a worker's pid can name a thread of this very daemon."""
    if pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1]) == pid
    except (OSError, ValueError, IndexError):
        return False
    return False


def to_wall(boot_seconds: float) -> float:
    """A time after boot as wall-clock time, by the wall clock as it reads now."""
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - boot_seconds)


# /proc/<pid>/stat states of a process that has ended: zombie, dead ('x' before Linux 3.13);
# and '' from state_of(): gone, or the pid is another process's now.
ENDED = frozenset({"", "Z", "X", "x"})


def identity_alive(ident: ProcIdentity) -> bool:
    """True while the process with this pid is still the one first seen (and not a zombie)."""
    return state_of(ident) not in ENDED


# What RQ puts in a SpawnWorker horse's environment before it spawns it: RQ 3 both
# (rq 3.0 rq/worker/worker_classes.py SpawnWorker.fork_work_horse), RQ 2.12 only the
# execution id. A forked horse shows its worker's environment as the worker was started
# (RQ sets these in os.environ after the fork), so it says nothing.
HORSE_ENV = ("RQ_JOB_ID", "RQ_EXECUTION_ID")


def rq_env(proc: psutil.Process) -> dict[str, str]:
    """The horse-naming variables in `proc`'s environment as the kernel shows it; {} if
    it cannot be read (the structural proof then stands alone)."""
    import psutil

    try:
        env = proc.environ()
    except psutil.AccessDenied:
        return {}
    return {k: env[k] for k in HORSE_ENV if k in env}


def env_disagrees(child: psutil.Process, inherited: dict[str, str], job_id: str,
                   execution_id: str | None) -> bool:
    """True if `child`'s environment names another job or execution than the one proven.
    A value the worker was itself started with is inherited, not RQ's: it says nothing.
    An execution id that cannot be compared (the record names none) is a disagreement."""
    env = {k: v for k, v in rq_env(child).items() if inherited.get(k) != v}
    if "RQ_JOB_ID" in env and env["RQ_JOB_ID"] != job_id:
        return True
    return "RQ_EXECUTION_ID" in env and env["RQ_EXECUTION_ID"] != execution_id


def pids() -> list[str]:
    try:
        return [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def read_lineage(worker: ProcIdentity) -> Lineage | None:
    """`worker`'s Lineage, read now (None if it cannot be read: no orphan is then proven)."""
    st = proc_stat(worker.pid)
    exe = exe_of(worker.pid)
    if st is None or exe is None or st.start != worker.create_time:
        return None
    try:
        with open(f"/proc/{worker.pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        raw = b""
    env = {}
    for item in raw.split(b"\0"):
        key, _, value = item.partition(b"=")
        if key.decode(errors="replace") in HORSE_ENV:
            env[key.decode()] = value.decode(errors="replace")
    return Lineage(exe, st.session, st.session == worker.pid, env)


def environ_disagrees(pid: int, inherited: dict[str, str], job_id: str) -> bool:
    """True if `pid`'s environment names another job than `job_id` (a SpawnWorker horse
    gets RQ_JOB_ID in its environment; a forked one shows its worker's)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    for item in raw.split(b"\0"):
        if item.startswith(b"RQ_JOB_ID="):
            value = item[len(b"RQ_JOB_ID="):].decode(errors="replace")
            return inherited.get("RQ_JOB_ID") != value and value != job_id
    return False
