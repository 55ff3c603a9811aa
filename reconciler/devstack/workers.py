"""``rq worker`` subprocesses (forking ``rq.worker.Worker``), and enqueueing through RQ.

Each worker and everything it forks carries its own token (``RQ_HARNESS_WORKER``), so a
horse orphaned by a SIGKILLed worker is still found and killed by ``Worker.stop()``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil
import redis
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.worker import Worker as RQWorker

from reconciler.devstack.procs import (
    HARNESS_TOKEN,
    REPO_ROOT,
    WORKER_TOKEN_ENV,
    harness_env,
    harness_root,
    kill_and_wait,
    killpg,
    pid_alive,
    processes_with_env,
    register,
    signal_popen,
    tail,
    unregister,
)
from reconciler.devstack.redis_server import redis_client
from reconciler.devstack.wait import wait_until


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

    def _redis(self) -> redis.Redis:
        return redis_client(self.redis_url)

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
                    f"{tail(self.log_path)}"
                )
            with self._redis() as r:
                birth, state = r.hmget(self.key, ["birth", "state"])
            return birth is not None and state in (b"idle", b"busy", b"suspended")

        wait_until(registered, timeout=timeout, interval=0.05, what=f"rq worker {self.name} ready")

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
        return wait_until(self.horse_pids, timeout, f"a work horse under worker {self.name}")[0]

    def tagged_pids(self) -> list[int]:
        """Every live process started for this worker, including orphaned horses."""
        return [p.pid for p in processes_with_env(WORKER_TOKEN_ENV, self._token)]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's main process only (horses are in their own groups)."""
        signal_popen(self.proc, sig)

    def kill_horses(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to the process group of every current horse; return their PIDs."""
        pids = self.horse_pids()
        for pid in pids:
            killpg(pid, sig)
        return pids

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (RQ warm shutdown: finishes the current job first) and wait for exit.

        Returns the exit code.  If the worker is still alive after ``timeout`` seconds,
        everything is hard-stopped and TimeoutError is raised.
        """
        signal_popen(self.proc, signal.SIGTERM)
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
                wait_until(
                    lambda: not any(psutil.pid_exists(h) for h in horses),
                    timeout=2,
                    what="horses reaped",
                )
        signal_popen(self.proc, signal.SIGKILL)
        self.proc.wait()
        leftovers = processes_with_env(WORKER_TOKEN_ENV, self._token)
        for p in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                if os.getpgid(p.pid) == p.pid:
                    killpg(p.pid, signal.SIGKILL)
        kill_and_wait(leftovers)
        unregister(self)

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
        log_dir = harness_root() / "worker-logs"
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
    env = harness_env({WORKER_TOKEN_ENV: token, **(extra_env or {})})
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
    register(worker)
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
    func: str,
    *args: Any,
    queue: str = "default",
    job_id: str | None = None,
    **kw: Any,
) -> str:
    """Enqueue ``func(*args, **kw)`` (``func`` a dotted path) on ``queue``; return the job id.

    ``kw`` goes through rq's ``Queue.enqueue``, so rq options such as ``job_timeout``,
    ``result_ttl``, ``meta`` work; pass ``kwargs={...}`` for function kwargs that clash.
    """
    with redis_client(redis_url) as conn:
        job = Queue(queue, connection=conn).enqueue(func, *args, job_id=job_id, **kw)
        return str(job.id)


def rq_status(redis_url: str, job_id: str) -> str | None:
    """RQ's status string for ``job_id`` ("queued", "started", "failed", ...), None if gone."""
    with redis_client(redis_url) as conn:
        try:
            status = Job.fetch(job_id, connection=conn).get_status()
        except (NoSuchJobError, InvalidJobOperation):
            return None
        return str(getattr(status, "value", status))
