"""A private PgBouncer (Debian's ``pgbouncer``) in front of a devstack PostgreSQL, on a free
localhost port, in transaction mode by default: the pooler most RQ shops put between
their apps and the database, for the tests of ``postgres.listen_dsn`` / ``pooler``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from reconciler.devstack.postgres import _PgUser
from reconciler.devstack.procs import (
    free_port,
    harness_env,
    harness_root,
    register,
    signal_popen,
    tail,
    unregister,
)
from reconciler.devstack.wait import wait_until


def pgbouncer_bin() -> str | None:
    # Debian installs it in /usr/sbin, which a non-root PATH may lack.
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


class PgBouncer:
    """``pgbouncer`` on 127.0.0.1:``port`` pooling every database of the PostgreSQL on
    ``pg_port`` (trust auth, as the devstack cluster). It refuses to run as root: as root
    it runs as the user PostgreSQL runs as."""

    def __init__(self, pg_port: int, *, pool_mode: str = "transaction", pool_size: int = 2,
                 ignore_startup_parameters: str = "", users: tuple[str, ...] = ("postgres",)) -> None:
        self.pg_port = pg_port
        self.port = free_port()
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.ignore = ignore_startup_parameters
        self.users = users
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout: float = 10) -> Self:
        binary = pgbouncer_bin()
        if binary is None:
            raise RuntimeError("pgbouncer not found (apt install pgbouncer)")
        self._dir = Path(tempfile.mkdtemp(prefix=f"pgbouncer-{self.port}-", dir=harness_root()))
        self._dir.chmod(0o755)
        d = self._dir
        (d / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in self.users))
        (d / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.pg_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {d / 'userlist.txt'}\n"
            f"pool_mode = {self.pool_mode}\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 200\n"
            f"ignore_startup_parameters = {self.ignore}\n"
            f"logfile = {d / 'pgbouncer.log'}\n"
        )
        user = _PgUser()
        user.chown_tree(d)
        self._proc = subprocess.Popen(
            [binary, str(d / "pgbouncer.ini")], cwd=d, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=harness_env(),
            user=user.user, group=user.group, extra_groups=user.extra_groups,
            start_new_session=True)
        register(self)
        proc = self._proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {proc.returncode}:\n"
                                   f"{tail(d / 'pgbouncer.log')}")
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, timeout, f"pgbouncer :{self.port} to listen")
        return self

    def log(self) -> str:
        return tail(self._dir / "pgbouncer.log", 20000) if self._dir else ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            signal_popen(self._proc, signal.SIGINT)  # "safe shutdown"
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                signal_popen(self._proc, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        unregister(self)

    def _hard_stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            signal_popen(self._proc, signal.SIGKILL)
            self._proc.wait()
        self.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
