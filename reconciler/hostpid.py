"""Host-PID mode: prove, from a node's PID namespace, the workers of its pods.

A worker in a pod registers its pod's hostname and its pid inside the pod's PID
namespace. A daemon on the node (a Kubernetes DaemonSet with `hostPID: true`, or a root
daemon on a host that runs its workers in containers) sees those processes under other
pids. It maps a worker to one of them only on facts the worker's pod cannot fake:

- the candidate's `NSpid:` (/proc/<pid>/status) ends with the registered pid: that is its
  pid in its innermost PID namespace;
- it is a process (`Tgid` is its pid), created within the slack of the worker's `birth`,
  running `rq` by its command line;
- the hostname of its UTS namespace, read by entering that namespace from a short-lived
  thread of our own (setns(2); the thread ends with it), is the registered hostname; read
  once per UTS namespace, and trusted again only while the process it was read through
  still lives (a namespace's inode number is reused only once it is gone);
- exactly one process passes (more than one: not local, never a guess).

Entering another UTS namespace needs CAP_SYS_ADMIN: `available()` says whether this
daemon has what the mode needs. A worker that cannot be proven stays remote, never dead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable

CLONE_NEWUTS = 0x04000000
# The kernel's inode numbers of the initial namespaces (include/linux/proc_ns.h).
PROC_PID_INIT_INO = 0xEFFFFFFC
CAP_SYS_ADMIN = 21
# UTS namespaces whose hostname is remembered (a node runs a few hundred pods at most).
MAX_UTS = 10_000
NODENAME_TIMEOUT_SECONDS = 1.0
MODES = ("auto", "on", "off")


def _cap_eff() -> int:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def initial_pid_namespace() -> bool:
    """True if this process runs in the machine's own PID namespace (the node's: a pod with
    hostPID, or no container at all)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino == PROC_PID_INIT_INO
    except OSError:
        return False


def missing() -> str:
    """'' if this daemon can map workers of its node's pods, else what it lacks."""
    if not _cap_eff() >> CAP_SYS_ADMIN & 1:
        return ("CAP_SYS_ADMIN (to read a pod's hostname from its UTS namespace; run as root "
                "with it, plus CAP_SYS_PTRACE and CAP_KILL for workers of another uid)")
    return ""


def decide(mode: str) -> tuple[bool, str]:
    """(on, why) for `[instance] host_pid`: "off" never maps; "on" maps whenever it can
    (and says what it lacks otherwise); "auto" maps where this daemon runs in the
    machine's PID namespace and has what it needs."""
    if mode == "off":
        return False, "host_pid = \"off\""
    lack = missing()
    if mode == "auto" and not initial_pid_namespace():
        return False, "not in the node's PID namespace (no hostPID)"
    if lack:
        return False, f"needs {lack}"
    return True, ""


def nspid_index() -> dict[int, list[int]]:
    """Every process we can see, by its pid in its innermost PID namespace: {that pid:
    [its pids here]}. One read of /proc/<pid>/status per process."""
    out: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"NSpid:"):
                        inner = int(line.split()[-1])
                        out.setdefault(inner, []).append(int(name))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return out


def runs_rq(pid: int) -> bool:
    """True if `pid`'s command line names rq (`rq worker`, `python -m rq.cli worker`,
    `rqworker`...). A worker started by a script that never mentions rq is not mapped."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(b"rq" in os.path.basename(a).lower() or a.startswith(b"rq.") for a in argv)


_libc: ctypes.CDLL | None = None


def _setns(fd: int, nstype: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, nstype)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _nodename_in(fd: int) -> str | None:
    """The hostname of the UTS namespace `fd` names, read from a thread that enters it
    and ends (a namespace entered by one thread is that thread's alone)."""
    out: list[str] = []

    def enter() -> None:
        with contextlib.suppress(OSError):
            _setns(fd, CLONE_NEWUTS)
            out.append(os.uname().nodename)

    t = threading.Thread(target=enter, name="rq-reconciler-uts", daemon=True)
    t.start()
    t.join(NODENAME_TIMEOUT_SECONDS)
    return out[0] if out and not t.is_alive() else None


class UtsNames:
    """The hostname of each process's UTS namespace, read once per namespace."""

    def __init__(self) -> None:
        # UTS namespace inode -> (its hostname, the pid it was read through, that
        # process's "still the same process" check)
        self._names: dict[int, tuple[str, Callable[[], bool]]] = {}

    def nodename(self, pid: int, still: Callable[[], bool]) -> str | None:
        """The hostname of `pid`'s UTS namespace; `still()` says whether `pid` is still the
        process meant. None if it cannot be read."""
        try:
            fd = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            ino = os.fstat(fd).st_ino
            # The fd holds the namespace of whoever had the pid when it was opened: that
            # is `pid`'s process only if it is still the one meant now.
            if not still():
                return None
            cached = self._names.get(ino)
            if cached is not None and cached[1]():
                return cached[0]
            name = _nodename_in(fd)
        finally:
            os.close(fd)
        if name is not None:
            if ino not in self._names and len(self._names) >= MAX_UTS:
                self._names.pop(next(iter(self._names)))
            self._names[ino] = (name, still)
        return name

