"""Throwaway local servers: redis-server, PostgreSQL and ``rq worker`` subprocesses.

Used by ``rq-reconciler demo``, the test suite (through ``tests/harness.py``) and the
``bench/`` scripts. No fakes and no mocks.  Everything here starts real processes on free localhost ports
inside temporary directories and knows how to tear them down again, including the
awkward cases fault tests create (SIGKILLed servers, orphaned work horses).

It has no pytest dependency: ``tests/conftest.py`` wraps it in fixtures, and ``bench/``
scripts and the demo use it directly::

    with RedisServer() as rs, PostgresServer() as pg:
        dsn = pg.create_database("demo")
        create_jobs_table(dsn)
        w = start_worker(rs.url, "w1")
        w.wait_registered()
        job_id = enqueue(rs.url, "tests.jobs.succeed", 21)
        wait_for(lambda: rq_status(rs.url, job_id) == "finished", what="job finished")
        w.stop()

Every server/worker object created here is kept in a module registry; ``cleanup_all()``
(also registered with ``atexit``) kills whatever is still running and removes temp dirs.

Environment notes (found while building this, see ``tests/integration/test_harness.py``):

* PID 1 on this VM reaps re-parented orphans only every ~1-2 s, so an orphan (e.g. a
  work horse whose worker was SIGKILLed, then killed itself) stays a zombie for a
  second or two and ``os.kill(pid, 0)`` still "succeeds" on it.  Liveness checks must
  treat ``psutil.STATUS_ZOMBIE`` as dead (``pid_alive()`` below does).  Servers run as
  direct children of the calling process (postgres is started as ``postgres -D``, not
  via the daemonising ``pg_ctl start``) so they are reaped at once and a restart right
  after a kill never trips over a zombie postmaster named in ``postmaster.pid``.
* ``initdb``/``postgres`` refuse to run as root; as root they are run as the
  ``postgres`` system user with every directory they touch chowned to it.
* redis-py 8's default client retries a failed command 10 times with backoff, so a
  call against a dead Redis takes ~5 s to raise.  Clients made here don't retry.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.worker import Worker as RQWorker

__all__ = [
    "HARNESS_TOKEN",
    "JOBS_TABLE_DDL",
    "REPO_ROOT",
    "DaemonProc",
    "PostgresServer",
    "RedisServer",
    "Worker",
    "WorkerPool",
    "cleanup_all",
    "create_jobs_table",
    "enqueue",
    "free_port",
    "harness_env",
    "kill_stragglers",
    "pid_alive",
    "rq_status",
    "run_sql",
    "start_worker",
    "stragglers",
    "wait_for",
]

REPO_ROOT: Path = Path(__file__).resolve().parent.parent

#: Unique per importing process.  Every subprocess started through this module gets it in
#: its environment (``RQ_HARNESS_TOKEN``), which lets us find orphans (e.g. a work horse
#: whose worker was SIGKILLed) and leaks at teardown.
HARNESS_TOKEN: str = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
_TOKEN_ENV = "RQ_HARNESS_TOKEN"  # noqa: S105 - an env var name, not a secret
_WORKER_TOKEN_ENV = "RQ_HARNESS_WORKER"  # noqa: S105 - an env var name

JOBS_TABLE_DDL = """\
CREATE TABLE {table} (
  id bigserial PRIMARY KEY,
  name text NOT NULL DEFAULT 'job',
  rq_job_id text,
  status text NOT NULL DEFAULT 'queued',
  error_message text,
  created_at timestamptz NOT NULL DEFAULT now(),
  started_at timestamptz,
  completed_at timestamptz
);
CREATE INDEX ON {table} (rq_job_id);
"""

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUALIFIED_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


# --------------------------------------------------------------------------- generic helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], bool],
    timeout: float = 10,
    interval: float = 0.02,
    what: str = "",
) -> None:
    """Poll ``predicate`` until it returns truthy; raise AssertionError after ``timeout`` s.

    Exceptions raised by the predicate propagate immediately.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or predicate!r}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (zombies are common here: PID 1 doesn't reap)."""
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
    env[_TOKEN_ENV] = HARNESS_TOKEN
    if extra:
        env.update(extra)
    return env


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _redis_from_url(url: str) -> redis.Redis:
    """A sync client that fails fast.

    redis-py 8's default ``Retry`` makes 10 attempts with jittered exponential backoff
    (capped at 1 s), so a command against a dead server takes ~5 s to raise
    ConnectionError.  Harness helpers must fail fast instead.
    """
    return redis.Redis.from_url(url, socket_connect_timeout=5, retry=_no_retry())


def _tail(path: Path, nbytes: int = 4000) -> str:
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


def _processes_with_env(var: str, value: str) -> list[psutil.Process]:
    me = os.getpid()
    found: list[psutil.Process] = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        if _proc_env(p).get(var) == value and pid_alive(p.pid):
            found.append(p)
    return found


def _kill_and_wait(procs: Sequence[psutil.Process], timeout: float = 10) -> None:
    """SIGKILL ``procs`` and wait until each is gone or a zombie."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.kill()
    deadline = time.monotonic() + timeout
    for p in procs:
        while pid_alive(p.pid) and time.monotonic() < deadline:
            time.sleep(0.01)


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _signal_popen(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _world_traversable(path: Path) -> bool:
    try:
        return all(d.stat().st_mode & 0o001 for d in (path, *path.parents))
    except OSError:
        return False


def _accessible_tmp_base() -> str:
    """Where server dirs go.  Must be traversable by the postgres system user.

    ``RQ_HARNESS_TMPDIR`` wins.  Otherwise /dev/shm if it is a world-traversable,
    writable tmpfs with >= 1 GiB free (copying a 40 MB / ~1000-file cluster template
    takes ~1.3 s on this VM's ext4 /tmp and ~0.1 s on tmpfs), else the normal temp dir,
    else /tmp.
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


def _harness_root() -> Path:
    """Per-process temp root for all server dirs, world-traversable, removed by cleanup_all."""
    global _root_dir
    with _root_lock:
        if _root_dir is None or not _root_dir.exists():
            _root_dir = Path(tempfile.mkdtemp(prefix=f"rqh-{HARNESS_TOKEN}-", dir=_accessible_tmp_base()))
            _root_dir.chmod(0o755)
        return _root_dir


# --------------------------------------------------------------------------- registry


class _Managed(Protocol):
    def _hard_stop(self) -> None: ...


_registry_lock = threading.Lock()
_registry: list[_Managed] = []


def _register(obj: _Managed) -> None:
    with _registry_lock:
        if not any(o is obj for o in _registry):
            _registry.append(obj)


def _unregister(obj: _Managed) -> None:
    with _registry_lock:
        _registry[:] = [o for o in _registry if o is not obj]


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
    for p in _processes_with_env(_TOKEN_ENV, HARNESS_TOKEN):
        found[p.pid] = p
    return list(found.values())


def kill_stragglers() -> list[int]:
    """SIGKILL everything ``stragglers()`` reports; return the PIDs that were killed."""
    procs = stragglers()
    _kill_and_wait(procs)
    return [p.pid for p in procs]


def cleanup_all() -> None:
    """Hard-stop every server/worker this module started, kill leftovers, remove temp dirs."""
    global _root_dir
    with _registry_lock:
        objs = list(reversed(_registry))  # workers before the servers they talk to
    for obj in objs:
        with contextlib.suppress(Exception):
            obj._hard_stop()
        _unregister(obj)
    kill_stragglers()
    with _root_lock:
        if _root_dir is not None:
            shutil.rmtree(_root_dir, ignore_errors=True)
            _root_dir = None
    _PgTemplate.reset()


_OWNER_PID = os.getpid()


def _atexit_cleanup() -> None:
    # A fork()ed child (e.g. multiprocessing) inherits the registry; it must not tear
    # down its parent's servers when it exits.
    if os.getpid() == _OWNER_PID:
        cleanup_all()


atexit.register(_atexit_cleanup)


# --------------------------------------------------------------------------- redis


def _redis_server_bin() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server not found on PATH")
    return path


class RedisServer:
    """A private ``redis-server`` (no persistence) on 127.0.0.1:``port``."""

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        """``extra_args`` go last on redis-server's command line (they win), e.g.
        ``["--rename-command", "CONFIG", ""]`` for a managed-Redis look-alike, or
        ``["--appendonly", "yes"]`` for one whose data survives ``restart()``."""
        self._port = port if port is not None else free_port()
        self._extra_args = list(extra_args)
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def log_path(self) -> Path | None:
        return self._dir / "redis.log" if self._dir is not None else None

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """A new sync client; the caller must close it (``with srv.client() as r: ...``).

        Unlike redis-py's default (10 retries with backoff, ~5 s before a dead server
        raises), it does not retry unless you pass ``retry=...``.
        """
        kwargs.setdefault("retry", _no_retry())
        kwargs.setdefault("socket_connect_timeout", 5)
        return redis.Redis(host="127.0.0.1", port=self._port, db=db, **kwargs)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle
    def start(self, timeout: float = 10) -> Self:
        if self.is_running():
            raise RuntimeError(f"redis-server on port {self._port} is already running")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"redis-{self._port}-", dir=_harness_root()))
        log = self._dir / "redis.log"
        argv = [
            _redis_server_bin(),
            "--port", str(self._port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--daemonize", "no",
            "--protected-mode", "no",
            *self._extra_args,
        ]  # fmt: skip
        with log.open("ab") as logf:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=harness_env(),
                start_new_session=True,
            )
        _register(self)
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {proc.returncode} on port {self._port}:\n{_tail(log)}"
                )
            try:
                with self.client() as r:
                    return bool(r.ping())
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                return False

        wait_for(ready, timeout=timeout, what=f"redis-server :{self._port} to answer PING")
        return self

    def stop(self, timeout: float = 10) -> None:
        """Graceful ``SHUTDOWN NOSAVE`` (SIGTERM, then SIGKILL as fallbacks) and reap."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(redis.RedisError), self.client() as r:
                r.shutdown(nosave=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_popen(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _signal_popen(proc, signal.SIGKILL)
                    proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server (no shutdown handling at all) and reap it."""
        proc = self._proc
        if proc is None:
            return
        _signal_popen(proc, signal.SIGKILL)
        proc.wait()
        self._proc = None

    def restart(self, timeout: float = 10) -> Self:
        """stop() + start() on the same port.  Runtime CONFIG SETs are lost (intended)."""
        self.stop()
        return self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Stop the server and delete its directory."""
        try:
            self.stop()
        except Exception:
            self.kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _unregister(self)

    def _hard_stop(self) -> None:
        self.kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"RedisServer(port={self._port}, running={self.is_running()})"


# --------------------------------------------------------------------------- postgres


def _pg_bindir() -> Path:
    """Highest /usr/lib/postgresql/<ver>/bin, else the directory of ``initdb`` on PATH.

    ``RQ_HARNESS_PG_BIN`` overrides both.
    """
    override = os.environ.get("RQ_HARNESS_PG_BIN")
    if override:
        return Path(override)
    candidates: list[tuple[tuple[int, ...], Path]] = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        ver = Path(d).parent.name
        if (Path(d) / "initdb").exists() and re.fullmatch(r"\d+(\.\d+)*", ver):
            candidates.append((tuple(int(x) for x in ver.split(".")), Path(d)))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL binaries not found (/usr/lib/postgresql/*/bin or PATH)")
    return Path(initdb).resolve().parent


def _psql_bin() -> str:
    p = _pg_bindir() / "psql"
    if p.exists():
        return str(p)
    found = shutil.which("psql")
    if found is None:
        raise RuntimeError("psql not found")
    return found


def run_sql(dsn: str, sql: str, timeout: float = 60) -> str:
    """Run ``sql`` with ``psql`` against ``dsn`` (sync, no event loop needed).

    Returns psql's unaligned, tuples-only output (``|``-separated columns, one row a
    line, trailing newline stripped).  Raises RuntimeError with psql's stderr on error.
    Multiple statements in one string run in one implicit transaction, so statements
    like CREATE DATABASE must be sent on their own.
    """
    env = dict(os.environ)
    env.setdefault("PGCONNECT_TIMEOUT", "5")
    res = subprocess.run(
        [_psql_bin(), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"psql failed ({res.returncode}) on {dsn}: {res.stderr.decode(errors='replace')}"
        )
    return res.stdout.decode().rstrip("\n")


def create_jobs_table(dsn: str, table: str = "training_jobs") -> None:
    """Create the application's seed-shaped jobs table (``JOBS_TABLE_DDL``) in ``dsn``."""
    if not _QUALIFIED_IDENT_RE.match(table):
        raise ValueError(f"bad table name {table!r}")
    run_sql(dsn, JOBS_TABLE_DDL.format(table=table))


class _PgUser:
    """Who postgres processes run as: ourselves, or the ``postgres`` user when we are root."""

    def __init__(self) -> None:
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as e:
                raise RuntimeError("running as root but there is no 'postgres' user") from e
            self.user: int | None = pw.pw_uid
            self.group: int | None = pw.pw_gid
            self.extra_groups: list[int] | None = []
        else:
            self.user = self.group = None
            self.extra_groups = None

    def chown_tree(self, path: Path) -> None:
        if self.user is None or self.group is None:
            return
        os.chown(path, self.user, self.group)
        for dirpath, dirnames, filenames in os.walk(path):
            for n in (*dirnames, *filenames):
                os.chown(os.path.join(dirpath, n), self.user, self.group, follow_symlinks=False)

    def run(self, argv: Sequence[str], cwd: Path, log: Path, timeout: float = 120) -> None:
        with log.open("ab") as logf:
            res = subprocess.run(
                list(argv),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=harness_env({"LC_ALL": "C"}),
                user=self.user,
                group=self.group,
                extra_groups=self.extra_groups,
                timeout=timeout,
                check=False,
            )
        if res.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({res.returncode}):\n{_tail(log)}")


class _PgTemplate:
    """One ``initdb`` per process; every PostgresServer gets a copy (saves ~1 s each)."""

    _lock = threading.Lock()
    _dir: Path | None = None

    @classmethod
    def get(cls, pg_user: _PgUser) -> Path:
        with cls._lock:
            if cls._dir is None or not (cls._dir / "PG_VERSION").exists():
                base = Path(tempfile.mkdtemp(prefix="pg-template-", dir=_harness_root()))
                base.chmod(0o755)
                pg_user.chown_tree(base)
                data = base / "data"
                pg_user.run(
                    [
                        str(_pg_bindir() / "initdb"),
                        "-D", str(data),
                        "-U", "postgres",
                        "-A", "trust",
                        "-E", "UTF8",
                        "--locale=C",
                        "--no-sync",
                    ],
                    cwd=base,
                    log=base / "initdb.log",
                )  # fmt: skip
                (data / "pg_hba.conf").write_text(
                    "local all all trust\n"
                    "host  all all 127.0.0.1/32 trust\n"
                    "host  all all ::1/128 trust\n"
                )
                cls._dir = data
            return cls._dir

    @classmethod
    def reset(cls) -> None:
        with cls._lock:
            cls._dir = None


_PG_DSM_PREFIX = "/dev/shm/PostgreSQL."


class PostgresServer:
    """A private PostgreSQL cluster on 127.0.0.1:``port`` with trust auth for ``postgres``.

    The cluster is created (from a per-process ``initdb`` template) on the first
    ``start()``; later starts reuse it, so data survives ``stop()``/``kill()``/``restart()``.
    ``postgres`` runs as a direct child in its own process group (see module docstring).
    """

    DEFAULT_CONF: Mapping[str, str] = {
        "listen_addresses": "'127.0.0.1'",
        "fsync": "off",
        # NOT off: with synchronous_commit=off a SIGKILL of the whole cluster (``kill()``)
        # loses commits that were already acknowledged (observed: a just-created table
        # vanished after crash recovery).  With fsync=off a WAL flush is only a write()
        # into the page cache, so "on" costs next to nothing and keeps kill() honest.
        "synchronous_commit": "on",
        "full_page_writes": "off",
        "wal_level": "minimal",
        "max_wal_senders": "0",
        "shared_buffers": "32MB",
        "max_connections": "200",
        "autovacuum": "off",
        "jit": "off",
        "timezone": "'UTC'",
        "log_min_messages": "warning",
        "logging_collector": "off",
    }

    def __init__(self, port: int | None = None, extra_conf: Mapping[str, str] | None = None) -> None:
        """``extra_conf`` entries are written to postgresql.conf verbatim (quote strings)."""
        self._port = port if port is not None else free_port()
        self._extra_conf = dict(extra_conf or {})
        self._pg_user = _PgUser()
        self._base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties
    @property
    def port(self) -> int:
        return self._port

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self._port}/{dbname}"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def data_dir(self) -> Path | None:
        return self._base / "data" if self._base is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._base / "postgres.log" if self._base is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle
    def _init_cluster(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix=f"pg-{self._port}-", dir=_harness_root()))
        base.chmod(0o755)
        data = base / "data"
        shutil.copytree(_PgTemplate.get(self._pg_user), data, symlinks=True)
        (base / "sock").mkdir()
        conf = {
            **self.DEFAULT_CONF,
            "port": str(self._port),
            "unix_socket_directories": f"'{base / 'sock'}'",
            **self._extra_conf,
        }
        with (data / "postgresql.conf").open("a") as f:
            f.write("\n# rq-reconciler test harness\n")
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        data.chmod(0o700)
        self._pg_user.chown_tree(base)
        self._base = base
        return base

    def start(self, timeout: float = 60) -> Self:
        if self.is_running():
            raise RuntimeError(f"postgres on port {self._port} is already running")
        base = self._base if self._base is not None else self._init_cluster()
        data = base / "data"
        log = base / "postgres.log"
        with log.open("ab") as logf:
            self._proc = subprocess.Popen(
                [str(_pg_bindir() / "postgres"), "-D", str(data)],
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=harness_env({"LC_ALL": "C"}),
                user=self._pg_user.user,
                group=self._pg_user.group,
                extra_groups=self._pg_user.extra_groups,
                start_new_session=True,
            )
        _register(self)
        proc = self._proc
        pidfile = data / "postmaster.pid"

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {proc.returncode} on port {self._port}:\n{_tail(log)}"
                )
            try:
                lines = pidfile.read_text().splitlines()
            except OSError:
                return False
            # Same check as ``pg_ctl start -w``: line 1 is our PID, line 8 the status.
            if len(lines) < 8 or lines[0].strip() != str(proc.pid) or lines[7].strip() != "ready":
                return False
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex(("127.0.0.1", self._port)) == 0

        wait_for(ready, timeout=timeout, interval=0.05, what=f"postgres :{self._port} ready")
        return self

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown (what ``pg_ctl stop -m fast`` sends: SIGINT) and reap."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_popen(proc, signal.SIGINT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._proc = None

    def kill(self, postmaster_only: bool = False) -> None:
        """Crash the server with SIGKILL; the next ``start()`` runs normal crash recovery.

        By default the whole process group (postmaster and every backend) is killed at
        once, a deterministic "postgres died" state.  With ``postmaster_only=True`` only
        the postmaster is killed and the backends are given up to 10 s to notice and
        exit by themselves (they do within milliseconds, even mid-query), as after a
        real postmaster crash; stragglers are then SIGKILLed.  Either way the server
        is fully down when this returns.
        """
        proc = self._proc
        if proc is None:
            return
        members: list[psutil.Process] = []
        dsm: list[str] = []
        with contextlib.suppress(psutil.Error, OSError):
            pm = psutil.Process(proc.pid)
            members = pm.children(recursive=True)
            # POSIX dynamic shared memory segments: a crashed cluster leaves them in
            # /dev/shm until its next start cleans up; remove them so a killed cluster
            # that is never restarted doesn't leak them (the next start copes fine).
            for p in (pm, *members):
                with contextlib.suppress(psutil.Error, OSError):
                    dsm += [m.path for m in p.memory_maps() if m.path.startswith(_PG_DSM_PREFIX)]
        if not postmaster_only:
            _killpg(proc.pid, signal.SIGKILL)
        _signal_popen(proc, signal.SIGKILL)
        proc.wait()
        if postmaster_only:
            deadline = time.monotonic() + 10
            while any(pid_alive(m.pid) for m in members) and time.monotonic() < deadline:
                time.sleep(0.01)
        _kill_and_wait(members)
        for path in dsm:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._proc = None

    def restart(self, timeout: float = 60) -> Self:
        self.stop()
        return self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Stop the server and delete its cluster directory."""
        try:
            self.stop()
        except Exception:
            self.kill()
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
        _unregister(self)

    def _hard_stop(self) -> None:
        try:
            self.stop(timeout=5)
        except Exception:
            self.kill()
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    # -- admin
    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the ``postgres`` superuser; see ``run_sql`` for the output format."""
        return run_sql(self.dsn(dbname), sql)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` and return its DSN."""
        if not _IDENT_RE.match(name):
            raise ValueError(f"bad database name {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Terminate its backends and drop it (no error if it doesn't exist)."""
        if not _IDENT_RE.match(name):
            raise ValueError(f"bad database name {name!r}")
        self.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"PostgresServer(port={self._port}, running={self.is_running()})"


# --------------------------------------------------------------------------- rq


def _worker_key(name: str) -> str:
    prefix: str = RQWorker.redis_worker_namespace_prefix
    return prefix + name


class Worker:
    """An ``rq worker`` subprocess (forking ``rq.worker.Worker``).  Create via ``start_worker``."""

    def __init__(
        self,
        redis_url: str,
        name: str,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        token: str,
    ) -> None:
        self.redis_url = redis_url
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._token = token

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def key(self) -> str:
        """The worker's Redis hash key (``rq:worker:<name>``)."""
        return _worker_key(self.name)

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _redis(self) -> redis.Redis:
        return _redis_from_url(self.redis_url)

    def wait_registered(self, timeout: float = 20) -> None:
        """Wait until the worker is registered *and* has its signal handlers installed.

        RQ writes the worker hash (``birth``) in ``bootstrap()`` but installs its
        SIGTERM/SIGINT handlers only afterwards; a SIGTERM in that gap kills the worker
        outright (exit -15, no warm shutdown, no ``death`` field).  So besides ``birth``
        we wait for ``state`` to leave "started" (RQ sets "idle" when it first dequeues,
        after installing the handlers).
        """

        def registered() -> bool:
            if not self.is_alive():
                raise RuntimeError(
                    f"rq worker {self.name} exited with {self.proc.returncode}:\n"
                    f"{_tail(self.log_path)}"
                )
            with self._redis() as r:
                birth, state = r.hmget(self.key, ["birth", "state"])
            return birth is not None and state in (b"idle", b"busy", b"suspended")

        wait_for(registered, timeout=timeout, interval=0.05, what=f"rq worker {self.name} ready")

    def current_job_id(self) -> str | None:
        """The ``current_job`` field of the worker hash (None when idle)."""
        with self._redis() as r:
            v = r.hget(self.key, "current_job")
        if v is None:
            return None
        return v.decode() if isinstance(v, bytes) else str(v)

    def horse_pids(self) -> list[int]:
        """PIDs of live work horses: children of the worker that lead their own process group."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids: list[int] = []
        for c in children:
            try:
                if os.getpgid(c.pid) == c.pid and pid_alive(c.pid):
                    pids.append(c.pid)
            except ProcessLookupError:
                continue
        return pids

    def wait_horse(self, timeout: float = 20) -> int:
        """Wait until a work horse exists and return its PID."""
        found: list[int] = []

        def has_horse() -> bool:
            found[:] = self.horse_pids()
            return bool(found)

        wait_for(has_horse, timeout=timeout, what=f"a work horse under worker {self.name}")
        return found[0]

    def tagged_pids(self) -> list[int]:
        """Every live process started for this worker, including orphaned horses."""
        return [p.pid for p in _processes_with_env(_WORKER_TOKEN_ENV, self._token)]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's main process only (horses are in their own groups)."""
        _signal_popen(self.proc, sig)

    def kill_horses(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to the process group of every current horse; return their PIDs."""
        pids = self.horse_pids()
        for pid in pids:
            _killpg(pid, sig)
        return pids

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (RQ warm shutdown: finishes the current job first) and wait for exit.

        Returns the exit code.  If the worker is still alive after ``timeout`` seconds,
        everything is hard-stopped and TimeoutError is raised.
        """
        _signal_popen(self.proc, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(f"rq worker {self.name} ignored SIGTERM for {timeout}s") from None

    def stop(self) -> None:
        """Hard, idempotent teardown: SIGKILL horse groups, the worker, and any orphan.

        Horses are killed first and given a moment to be reaped by their worker, so that
        they don't turn into unreaped zombies.
        """
        horses = self.kill_horses(signal.SIGKILL)
        if horses and self.is_alive():
            with contextlib.suppress(AssertionError):
                wait_for(
                    lambda: not any(psutil.pid_exists(h) for h in horses),
                    timeout=2,
                    what="horses reaped",
                )
        _signal_popen(self.proc, signal.SIGKILL)
        self.proc.wait()
        leftovers = _processes_with_env(_WORKER_TOKEN_ENV, self._token)
        for p in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                if os.getpgid(p.pid) == p.pid:
                    _killpg(p.pid, signal.SIGKILL)
        _kill_and_wait(leftovers)
        _unregister(self)

    def _hard_stop(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Worker(name={self.name!r}, pid={self.pid}, alive={self.is_alive()})"


def _rq_cli_argv() -> list[str]:
    # ``python -m rq.cli`` works with rq 2.x (rq/cli/__main__.py); it avoids depending on
    # where the ``rq`` console script was installed.
    return [sys.executable, "-m", "rq.cli"]


def start_worker(
    redis_url: str,
    name: str,
    queues: Sequence[str] = ("default",),
    extra_env: dict[str, str] | None = None,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Worker:
    """Start ``rq worker`` (forking ``rq.worker.Worker``) listening on ``queues``.

    The worker runs with cwd and PYTHONPATH at the repo root (so ``tests.jobs`` imports)
    and logs to ``log_path`` (default: a file in the harness temp dir).  It is not waited
    for; call ``wait_registered()``.  RQ refuses to start a second live worker with the
    same ``name`` on the same Redis.
    """
    if log_path is None:
        log_dir = _harness_root() / "worker-logs"
        log_dir.mkdir(exist_ok=True)
        log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{HARNESS_TOKEN}-{name}-{uuid.uuid4().hex[:8]}"
    argv = [
        *_rq_cli_argv(),
        "worker",
        "--url", redis_url,
        "--name", name,
        "--worker-class", "rq.worker.Worker",
        "--logging_level", "INFO",
        *extra_args,
        *queues,
    ]  # fmt: skip
    env = harness_env({_WORKER_TOKEN_ENV: token, **(extra_env or {})})
    with log_path.open("ab") as logf:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    worker = Worker(redis_url, name, proc, log_path, token)
    _register(worker)
    return worker


class WorkerPool:
    """Starts workers against one Redis URL and stops them all in ``stop_all()``.

    Callable: ``pool(name=None, queues=("default",))`` is ``pool.start(...)``.
    """

    def __init__(self, redis_url: str, log_dir: Path | None = None) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.workers: list[Worker] = []
        self._n = 0

    def start(
        self,
        name: str | None = None,
        queues: Sequence[str] = ("default",),
        extra_env: dict[str, str] | None = None,
        wait: bool = True,
        extra_args: Sequence[str] = (),
    ) -> Worker:
        """Start a worker (named ``w<n>-<hex>`` if not given); wait for registration by default."""
        self._n += 1
        name = name or f"w{self._n}-{uuid.uuid4().hex[:6]}"
        log_path = self.log_dir / f"worker-{name}.log" if self.log_dir is not None else None
        w = start_worker(
            self.redis_url, name, queues, extra_env=extra_env, log_path=log_path,
            extra_args=extra_args,
        )  # fmt: skip
        self.workers.append(w)
        if wait:
            w.wait_registered()
        return w

    __call__ = start

    def stop_all(self) -> None:
        errors: list[BaseException] = []
        for w in self.workers:
            try:
                w.stop()
            except Exception as e:
                errors.append(e)
        self.workers.clear()
        if errors:
            raise errors[0]


def enqueue(
    redis_url: str,
    func: str | Callable[..., Any],
    *args: Any,
    queue: str = "default",
    job_id: str | None = None,
    **kw: Any,
) -> str:
    """Enqueue ``func(*args, **kw)`` on ``queue``; return the job id.

    ``kw`` goes through rq's ``Queue.enqueue``, so rq options such as ``job_timeout``,
    ``result_ttl``, ``meta`` work; pass ``kwargs={...}`` for function kwargs that clash.
    """
    with _redis_from_url(redis_url) as conn:
        q = Queue(queue, connection=conn)
        if isinstance(func, str):
            job = q.enqueue(func, *args, job_id=job_id, **kw)
        else:
            job = q.enqueue(func, *args, job_id=job_id, **kw)
        return str(job.id)


def rq_status(redis_url: str, job_id: str) -> str | None:
    """RQ's status string for ``job_id`` ("queued", "started", "failed", ...), None if gone."""
    with _redis_from_url(redis_url) as conn:
        try:
            status = Job.fetch(job_id, connection=conn).get_status()
        except (NoSuchJobError, InvalidJobOperation):
            return None
        return str(getattr(status, "value", status))


# --------------------------------------------------------------------------- the daemon

class DaemonProc:
    """`rq-reconciler run` as a real subprocess; ready = it sent READY=1 to the
    $NOTIFY_SOCKET we gave it, exactly as systemd would see it."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None,
                 name: str = "d") -> None:
        self.config = config
        self.log_path = log_path
        self.env = env or {}
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="rqr-notify-")
        self.sock_path = os.path.join(self._dir, "notify.sock")
        self.sock: socket.socket | None = None
        self.messages: list[str] = []

    def start(self, wait_ready: bool = True, timeout: float = 30) -> DaemonProc:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(self.sock_path)
        env = {**harness_env(), **self.env, "NOTIFY_SOCKET": self.sock_path,
               "WATCHDOG_USEC": "2000000", "PYTHONUNBUFFERED": "1"}
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
        )
        if wait_ready:
            self.wait_message("READY=1", timeout)
        return self

    def wait_message(self, text: str, timeout: float = 30) -> None:
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in m for m in self.messages):
                return
            self.sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())
            assert self.proc is not None
            if self.proc.poll() is not None:
                self._drain()  # what it sent before exiting is still queued
            if self.proc.poll() is not None and not any(text in m for m in self.messages):
                raise AssertionError(f"daemon exited {self.proc.returncode} before {text}:\n"
                                     + self.log_text()[-4000:])
        raise AssertionError(f"daemon did not send {text} within {timeout} s:\n"
                             + self.log_text()[-4000:])

    def _drain(self) -> None:
        assert self.sock is not None
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self.sock.setblocking(True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def stop(self, timeout: float = 40) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self._close_log()
        return int(rc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with_suppress_unlink(self.sock_path)

    def metrics_url(self) -> str:
        for line in self.config.read_text().splitlines():
            if line.startswith("listen"):
                return f"http://{json.loads(line.split('=', 1)[1].strip())}/metrics"
        raise AssertionError("no metrics.listen in config")

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url(), timeout=5) as r:  # noqa: S310 - our own loopback URL
            return str(r.read().decode())


def with_suppress_unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
