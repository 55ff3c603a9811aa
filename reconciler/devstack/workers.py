"""``rq worker`` subprocesses (forking ``rq.worker.Worker`` by default), and enqueueing.

Each worker and everything it forks carries its own token (``RQ_HARNESS_WORKER``), so a
horse orphaned by a SIGKILLed worker is still found and killed by ``Worker.stop()``.
A worker runs RQ 2 or RQ 3 (``rq_version``: a venv of that series, see rqvenv.py), or the
rq this package imports (None); under RQ 3 it may use another key prefix (RQ_KEY_PREFIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil
import redis
from rq import Queue

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
from reconciler.devstack.rqvenv import worker_python
from reconciler.devstack.wait import wait_until
from reconciler.rq_api import IMPORTED_PREFIX
from reconciler.rq_layout import WORKER_EXECUTIONS_SUFFIX, Keys

FORK_WORKER = "rq.worker.Worker"
SPAWN_WORKER = "rq.worker.SpawnWorker"  # the same path in RQ 2.12 and 3.0 (rq/worker/__init__.py)



#: How long terminate() waits for a warm shutdown before RQ's cold one (a second SIGTERM).
WARM_SHUTDOWN_SECONDS = 8.0

class Worker:
    """An ``rq worker`` subprocess.  Create via ``start_worker``."""

    def __init__(
        self,
        redis_url: str,
        name: str,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        token: str,
        rq_version: str | None = None,
        key_prefix: str = "rq",
    ) -> None:
        self.redis_url = redis_url
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._token = token
        self.rq_version = rq_version
        self.keys = Keys(key_prefix)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def key(self) -> str:
        """The worker's Redis hash key (``rq:worker:<name>``)."""
        return self.keys.worker + self.name

    @property
    def executions_key(self) -> str:
        """RQ 3's set of the worker's running executions (``rq:worker:<name>:executions``)."""
        return self.key + WORKER_EXECUTIONS_SUFFIX

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
        """The job the worker runs (None when idle): RQ 2's ``current_job`` field, or the
        job of RQ 3's one execution."""
        return self.current_execution()[0]

    def current_execution(self) -> tuple[str | None, str | None]:
        """(job id, execution id) of what the worker runs; (None, None) when idle. RQ 2
        names no execution in the worker hash: its execution id is None."""
        with self._redis() as r:
            v = r.hget(self.key, "current_job")
            members = sorted(r.smembers(self.executions_key))
        if v is not None:
            return (v.decode() if isinstance(v, bytes) else str(v)), None
        if len(members) == 1:
            job, _, execution = members[0].decode().partition(":")
            return job, execution
        return None, None

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
            return self.proc.wait(timeout=min(timeout / 2, WARM_SHUTDOWN_SECONDS))
        except subprocess.TimeoutExpired:
            # A warm shutdown that lands during the worker's start-up maintenance can hang in
            # its teardown (seen with RQ 2.12: in PubSub.unsubscribe(), after its death was
            # registered). Only then, with no job left to finish, RQ's cold shutdown: a
            # second SIGTERM.
            if self._death_registered():
                signal_popen(self.proc, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout / 2)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(f"rq worker {self.name} ignored SIGTERM for {timeout}s; its log "
                               f"ends:\n{tail(self.log_path, 3000)}") from None

    def _death_registered(self) -> bool:
        with contextlib.suppress(redis.RedisError), \
                redis.Redis.from_url(self.redis_url, socket_timeout=5) as r:
            return bool(r.hexists(self.key, "death"))
        return False

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


def _rq_cli_argv(rq_version: str | None) -> list[str]:
    # ``python -m rq.cli`` works with rq 2.x and 3.x (rq/cli/__main__.py); it avoids
    # depending on where the ``rq`` console script was installed.
    return [worker_python(rq_version), "-m", "rq.cli"]


def start_worker(
    redis_url: str,
    name: str,
    queues: Sequence[str] = ("default",),
    extra_env: dict[str, str] | None = None,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
    rq_version: str | None = None,
    worker_class: str = FORK_WORKER,
    key_prefix: str = "rq",
) -> Worker:
    """Start ``rq worker`` (``worker_class``, forking ``rq.worker.Worker`` by default) of
    RQ ``rq_version`` ("2", "3", or None: the rq this package imports) listening on
    ``queues``, with RQ 3's ``key_prefix``.

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
        *_rq_cli_argv(rq_version),
        "worker",
        "--url", redis_url,
        "--name", name,
        "--worker-class", worker_class,
        "--logging_level", "INFO",
        *extra_args,
        *queues,
    ]  # fmt: skip
    env = harness_env({WORKER_TOKEN_ENV: token, **(extra_env or {})})
    if key_prefix != "rq":
        env["RQ_KEY_PREFIX"] = key_prefix
    else:
        env.pop("RQ_KEY_PREFIX", None)
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
    worker = Worker(redis_url, name, proc, log_path, token, rq_version, key_prefix)
    register(worker)
    return worker


class WorkerPool:
    """Starts workers against one Redis URL and stops them all in ``stop_all()``.

    Callable: ``pool(name=None, queues=("default",))`` is ``pool.start(...)``.
    """

    def __init__(self, redis_url: str, log_dir: Path | None = None, *,
                 rq_version: str | None = None, worker_class: str = FORK_WORKER,
                 key_prefix: str = "rq") -> None:
        """`rq_version`, `worker_class`, `key_prefix`: what `start()` uses unless told."""
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.rq_version = rq_version
        self.worker_class = worker_class
        self.key_prefix = key_prefix
        self.workers: list[Worker] = []
        self._n = 0

    def start(
        self,
        name: str | None = None,
        queues: Sequence[str] = ("default",),
        extra_env: dict[str, str] | None = None,
        wait: bool = True,
        extra_args: Sequence[str] = (),
        rq_version: str | None = None,
        worker_class: str | None = None,
    ) -> Worker:
        """Start a worker (named ``w<n>-<hex>`` if not given); wait for registration by
        default. `rq_version` / `worker_class` override the pool's for this worker."""
        self._n += 1
        name = name or f"w{self._n}-{uuid.uuid4().hex[:6]}"
        log_path = self.log_dir / f"worker-{name}.log" if self.log_dir is not None else None
        w = start_worker(
            self.redis_url, name, queues, extra_env=extra_env, log_path=log_path,
            extra_args=extra_args, rq_version=rq_version or self.rq_version,
            worker_class=worker_class or self.worker_class, key_prefix=self.key_prefix,
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
    key_prefix: str = "rq",
    **kw: Any,
) -> str:
    """Enqueue ``func(*args, **kw)`` (``func`` a dotted path) on ``queue``; return the job id.

    ``kw`` goes through rq's ``Queue.enqueue``, so rq options such as ``job_timeout``,
    ``result_ttl``, ``meta`` work; pass ``kwargs={...}`` for function kwargs that clash.
    Under another ``key_prefix`` than the imported rq's, RQ 3 enqueues it in a subprocess
    (RQ fixes its prefix at import); ``args`` and ``kw`` must then be JSON.
    """
    if key_prefix != IMPORTED_PREFIX:
        return _enqueue_elsewhere(redis_url, func, args, queue, job_id, key_prefix, kw)
    with redis_client(redis_url) as conn:
        job = Queue(queue, connection=conn).enqueue(func, *args, job_id=job_id, **kw)
        return str(job.id)


_ENQUEUE_SCRIPT = """
import json, sys
from redis import Redis
from rq import Queue
a = json.loads(sys.argv[1])
job = Queue(a["queue"], connection=Redis.from_url(a["url"])).enqueue(
    a["func"], *a["args"], job_id=a["job_id"], **a["kw"])
print(job.id)
"""


def _enqueue_elsewhere(redis_url: str, func: str, args: Sequence[Any], queue: str,
                       job_id: str | None, key_prefix: str, kw: dict[str, Any]) -> str:
    payload = json.dumps({"url": redis_url, "func": func, "args": list(args), "queue": queue,
                          "job_id": job_id, "kw": kw})
    done = subprocess.run([worker_python("3"), "-c", _ENQUEUE_SCRIPT, payload],
                          env=harness_env({"RQ_KEY_PREFIX": key_prefix}), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"enqueue under prefix {key_prefix!r} failed: {done.stderr}")
    return done.stdout.strip()


def rq_status(redis_url: str, job_id: str, key_prefix: str = "rq") -> str | None:
    """RQ's status word for ``job_id`` ("queued", "started", "failed", ...), None if gone.
    Read raw: it works for any RQ version's words and never loads the job's pickles."""
    with redis_client(redis_url) as conn:
        status = conn.hget(Keys(key_prefix).job + job_id, "status")
    if status is None:
        return None
    return status.decode() if isinstance(status, bytes) else str(status)
