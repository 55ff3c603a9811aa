"""Process bookkeeping for the throwaway servers: the harness token, temp dirs, the
registry of everything started, and the teardown that finds leftovers.

Every subprocess gets ``RQ_HARNESS_TOKEN`` in its environment (``harness_env()``), so
orphans (a work horse whose worker was SIGKILLed) can be found and killed. It must never
touch a process that it cannot tie to this token or to this process's descendants.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import psutil

REPO_ROOT: Path = Path(__file__).resolve().parents[2]

#: Unique per importing process.  Every subprocess started through devstack gets it in
#: its environment (``RQ_HARNESS_TOKEN``), which lets us find orphans (e.g. a work horse
#: whose worker was SIGKILLed) and leaks at teardown.
HARNESS_TOKEN: str = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
TOKEN_ENV = "RQ_HARNESS_TOKEN"  # noqa: S105 - an env var name, not a secret
WORKER_TOKEN_ENV = "RQ_HARNESS_WORKER"  # noqa: S105 - an env var name


#: Under pytest-xdist each test process takes its ports from a block of its own, below
#: the kernel's ephemeral range: two processes asking the OS for "any free port" at once
#: can be handed the same one between its probe and the server's bind. Two pytest runs at
#: once (the gate's concurrent legs) each set RQ_DEVSTACK_PORT_BASE to a range of their own.
_PORT_BLOCK_BASE = int(os.environ.get("RQ_DEVSTACK_PORT_BASE", "20000"))
_PORT_BLOCK_SIZE = 1000
_port_lock = threading.Lock()
_port_next: int | None = None


def _xdist_index() -> int | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now: the OS picks it, except in
    a pytest-xdist test process, which walks its own block of ports."""
    global _port_next
    index = _xdist_index()
    if index is not None and index < 10:
        first = _PORT_BLOCK_BASE + index * _PORT_BLOCK_SIZE
        with _port_lock:
            if _port_next is None:
                _port_next = first + (os.getpid() % _PORT_BLOCK_SIZE)
            for _ in range(_PORT_BLOCK_SIZE):
                port = first + (_port_next - first) % _PORT_BLOCK_SIZE
                _port_next = port + 1
                if _bindable(port):
                    return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        return chosen


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie.

    A zombie counts as dead: an orphan stays one until PID 1 reaps it, which may take
    seconds, and ``os.kill(pid, 0)`` still "succeeds" on it meanwhile.
    """
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def harness_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``os.environ`` for subprocesses: harness token set, repo root on PYTHONPATH.

    Use it for any extra subprocess a test starts (e.g. the daemon under test) so that
    ``stragglers()`` / ``kill_stragglers()`` can find it if it leaks.
    """
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    env["PYTHONUNBUFFERED"] = "1"
    env[TOKEN_ENV] = HARNESS_TOKEN
    if extra:
        env.update(extra)
    return env


def tail(path: Path, nbytes: int = 4000) -> str:
    """The last ``nbytes`` of a log file, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"


def _proc_env(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return {}


def processes_with_env(var: str, value: str) -> list[psutil.Process]:
    """Live processes (other than this one) whose environment has ``var=value``.

    Only Python processes keep a readable environment: redis-server and postgres write
    their process titles over it, so find those with ``processes_under()``.
    """
    me = os.getpid()
    found: list[psutil.Process] = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        if _proc_env(p).get(var) == value and pid_alive(p.pid):
            found.append(p)
    return found


def processes_under(root: Path) -> list[psutil.Process]:
    """Live processes whose working directory or command line lies under ``root``.

    redis-server and every postgres process run with their cwd in their server
    directory, which devstack creates under ``RQ_HARNESS_TMPDIR`` when that is set.
    """
    prefix = str(root.resolve())
    me = os.getpid()
    found: list[psutil.Process] = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            where = [p.cwd(), *p.cmdline()]
            if any(w == prefix or w.startswith(prefix + os.sep) for w in where) and pid_alive(p.pid):
                found.append(p)
    return found


def kill_and_wait(procs: Sequence[psutil.Process], timeout: float = 10) -> None:
    """SIGKILL ``procs`` and wait until each is gone or a zombie."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.kill()
    deadline = time.monotonic() + timeout
    for p in procs:
        while pid_alive(p.pid) and time.monotonic() < deadline:
            time.sleep(0.01)


def killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def signal_popen(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


# --------------------------------------------------------------------------- temp dirs


def _world_traversable(path: Path) -> bool:
    try:
        return all(d.stat().st_mode & 0o001 for d in (path, *path.parents))
    except OSError:
        return False


def tmp_base() -> str:
    """Where server dirs go.  Must be traversable by the postgres system user.

    ``RQ_HARNESS_TMPDIR`` wins.  Otherwise /dev/shm if it is a world-traversable,
    writable tmpfs with >= 1 GiB free (copying the ~1000-file cluster template is an
    order of magnitude faster on tmpfs than on a disk), else the normal temp dir, else
    /tmp.
    """
    override = os.environ.get("RQ_HARNESS_TMPDIR")
    if override:
        return override
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if (
            shm.is_dir()
            and os.access(shm, os.W_OK | os.X_OK)
            and _world_traversable(shm)
            and shutil.disk_usage(shm).free >= 1 << 30
        ):
            return str(shm)
    base = Path(tempfile.gettempdir()).resolve()
    if _world_traversable(base):
        return str(base)
    return "/tmp"


_root_lock = threading.Lock()
_root_dir: Path | None = None


def harness_root() -> Path:
    """Per-process temp root for all server dirs, world-traversable, removed by cleanup_all."""
    global _root_dir
    with _root_lock:
        if _root_dir is None or not _root_dir.exists():
            _root_dir = Path(tempfile.mkdtemp(prefix=f"rqh-{HARNESS_TOKEN}-", dir=tmp_base()))
            _root_dir.chmod(0o755)
        return _root_dir


# --------------------------------------------------------------------------- registry


class Managed(Protocol):
    def _hard_stop(self) -> None: ...


_registry_lock = threading.Lock()
_registry: list[Managed] = []
_cleanup_hooks: list[Callable[[], None]] = []


def register(obj: Managed) -> None:
    with _registry_lock:
        if not any(o is obj for o in _registry):
            _registry.append(obj)


def unregister(obj: Managed) -> None:
    with _registry_lock:
        _registry[:] = [o for o in _registry if o is not obj]


def on_cleanup(hook: Callable[[], None]) -> None:
    """Run ``hook`` at the end of every ``cleanup_all()`` (e.g. forget a cached template)."""
    _cleanup_hooks.append(hook)


def stragglers() -> list[psutil.Process]:
    """Live (non-zombie) processes started by this harness instance that are still running.

    Looks at descendants of this process and at every process carrying our token in its
    environment (which catches orphaned work horses).  Postgres and redis rewrite their
    environment area for their process titles, but they are always our descendants while
    they run, so they are caught by the first rule.
    """
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        for c in psutil.Process().children(recursive=True):
            if pid_alive(c.pid):
                found[c.pid] = c
    for p in processes_with_env(TOKEN_ENV, HARNESS_TOKEN):
        found[p.pid] = p
    return list(found.values())


def kill_stragglers() -> list[int]:
    """SIGKILL everything ``stragglers()`` reports; return the PIDs that were killed."""
    procs = stragglers()
    kill_and_wait(procs)
    return [p.pid for p in procs]


def cleanup_all() -> None:
    """Hard-stop every server/worker devstack started, kill leftovers, remove temp dirs."""
    global _root_dir
    with _registry_lock:
        objs = list(reversed(_registry))  # workers before the servers they talk to
    for obj in objs:
        with contextlib.suppress(Exception):
            obj._hard_stop()
        unregister(obj)
    kill_stragglers()
    with _root_lock:
        if _root_dir is not None:
            shutil.rmtree(_root_dir, ignore_errors=True)
            _root_dir = None
    for hook in _cleanup_hooks:
        hook()


_OWNER_PID = os.getpid()


def _atexit_cleanup() -> None:
    # A fork()ed child (e.g. multiprocessing) inherits the registry; it must not tear
    # down its parent's servers when it exits.
    if os.getpid() == _OWNER_PID:
        cleanup_all()


atexit.register(_atexit_cleanup)

