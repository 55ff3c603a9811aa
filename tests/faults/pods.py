"""Kubernetes/Compose pod layouts on one machine, made of Linux namespaces (root,
unshare(1) and nsenter(1) from util-linux), for tests/faults/test_pod_layouts.py and
bench/layouts.py.

A `Pod` is its pause container: PID 1 of a new UTS + PID namespace with the pod's
hostname (reconciler.devstack's Host with no workers: it reaps whatever is reparented to
it, so a container that dies does not end the namespace). A container of the pod runs in
the pod's PID and UTS namespaces with a mount namespace of its own (and /proc of the
pod's PID namespace), as containers of a pod do; the network is the machine's (the
throwaway Redis and PostgreSQL listen on loopback).

Layouts, by where the daemon runs relative to a worker pod:

- "separate": a container of the worker's pod *without* shareProcessNamespace (same
  hostname, its own PID namespace);
- "sidecar": a container of the worker's pod with shareProcessNamespace (same PID and
  UTS namespaces);
- "daemonset": a pod with hostPID on the worker's node: the machine's own PID and UTS
  namespaces, while the worker runs in its pod's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import redis

from reconciler.devstack import DaemonProc, Host, harness_env, worker_python
from reconciler.devstack.procs import REPO_ROOT, WORKER_TOKEN_ENV
from reconciler.devstack.wait import wait_until

LAYOUTS = ("separate", "sidecar", "daemonset")


def available() -> str:
    """'' if pods can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (unshare/nsenter for PID, UTS and mount namespaces)"
    import shutil

    missing = [t for t in ("unshare", "nsenter") if shutil.which(t) is None]
    return f"needs {', '.join(missing)} (util-linux)" if missing else ""


class Pod:
    def __init__(self, tmp: Path, hostname: str, redis_url: str) -> None:
        self.hostname = hostname
        self.host = Host(tmp, hostname, redis_url)
        self.host.wait_ready(60)

    @property
    def init_pid(self) -> int:
        """The pod's PID 1 as this (the machine's) PID namespace sees it."""
        (child,) = psutil.Process(self.host.proc.pid).children()
        return int(child.pid)

    def container(self, argv: list[str], *, share_pid: bool = True) -> list[str]:
        """`argv` as a container of this pod: the pod's UTS namespace, its PID namespace
        (or, share_pid=False, a new one of its own), a mount namespace of its own."""
        enter = ["nsenter", "-t", str(self.init_pid), "-u"]
        if share_pid:
            return [*enter, "-p", "--", "unshare", "--mount", "--mount-proc", "--", *argv]
        return [*enter, "--", "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                "--", *argv]

    def stop(self) -> None:
        """Ends the pod: its PID 1 exits, and the kernel kills whatever is left in it."""
        self.host.stop()


def _leaf(proc: subprocess.Popen[bytes], word: str) -> int:
    """The pid (here) of the process `proc` became inside its namespaces: nsenter and
    unshare fork before they exec what they run."""

    def find() -> int | None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if p.name() not in ("nsenter", "unshare") and word in " ".join(p.cmdline()):
                        return int(p.pid)
        return None

    return int(wait_until(find, 30, f"the {word} process to start", interval=0.01))


class PodWorker:
    """A real `rq worker` (forking) run as a container of `pod`."""

    def __init__(self, pod: Pod, redis_url: str, log_dir: Path, rq_version: str | None = None,
                 name: str | None = None) -> None:
        self.redis_url = redis_url
        self.name = name or f"{pod.hostname}-{uuid.uuid4().hex[:6]}"
        self.log_path = log_dir / f"worker-{self.name}.log"
        argv = [worker_python(rq_version), "-m", "rq.cli", "worker", "--url", redis_url,
                "--name", self.name, "--worker-class", "rq.worker.Worker", "default"]
        env = harness_env({WORKER_TOKEN_ENV: f"pod-{self.name}"})
        env.pop("RQ_KEY_PREFIX", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(pod.container(argv), cwd=REPO_ROOT, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = _leaf(self.proc, "rq.cli")

    def wait_registered(self, timeout: float = 60) -> dict[str, str]:
        """The worker's hash once it has registered and installed its signal handlers."""
        def ready() -> dict[str, str] | None:
            assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
            with redis.Redis.from_url(self.redis_url, decode_responses=True) as r:
                h = r.hgetall(f"rq:worker:{self.name}")
            return h if h.get("birth") and h.get("state") in ("idle", "busy") else None

        return dict(wait_until(ready, timeout, f"worker {self.name} registered", interval=0.05))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)

    def close(self) -> None:
        """Reap nsenter (after the pod is stopped, or kill the worker first)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(30)


def start_daemon(layout: str, pod: Pod, config: Path, log: Path) -> DaemonProc:
    """rq-reconciler placed as `layout` says, relative to the worker pod `pod`; ready."""
    argv = [sys.executable, "-m", "reconciler", "run", "--config", str(config)]
    if layout == "sidecar":
        argv = pod.container(argv, share_pid=True)
    elif layout == "separate":
        argv = pod.container(argv, share_pid=False)
    elif layout != "daemonset":
        raise ValueError(layout)
    d = DaemonProc(config, log, name=layout, argv=argv if layout != "daemonset" else None)
    d.start(timeout=60)
    return d


def stop_daemon(d: DaemonProc) -> None:
    """SIGTERM to the daemon itself (nsenter does not pass signals on), then the rest."""
    if d.proc is not None and d.proc.poll() is None:
        with contextlib.suppress(AssertionError, psutil.NoSuchProcess, ProcessLookupError):
            pid = _leaf(d.proc, "reconciler")
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(psutil.TimeoutExpired):
                psutil.Process(pid).wait(30)
    d.close()


def wait_file_line(path: Path, word: str, timeout: float = 60) -> None:
    wait_until(lambda: path.exists() and word in path.read_text(), timeout,
               f"{word} in {path.name}", interval=0.005)


def now() -> float:
    return time.monotonic()
