"""A "host" of its own on this machine: a UTS + PID namespace (root and unshare(1)) in
which `host_main` runs real rq workers and, optionally, a daemon replica. For tests and
bench/ that need several hosts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from reconciler.devstack.procs import REPO_ROOT, harness_env
from reconciler.devstack.wait import wait_until


class Host:
    """`python -m reconciler.devstack.host_main` as PID 1 of its own UTS + PID namespace."""

    def __init__(self, tmp: Path, hostname: str, redis_url: str, *, workers: int = 0,
                 config: Path | None = None, rq_version: str | None = None) -> None:
        """`rq_version`: the RQ series ("2", "3") of its workers; None: the rq imported here."""
        self.hostname = hostname
        self.control = tmp / f"control-{hostname}-{time.monotonic_ns()}"
        self.logs = tmp / f"logs-{hostname}"
        argv = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
                sys.executable, "-m", "reconciler.devstack.host_main", "--hostname", hostname,
                "--redis-url", redis_url, "--workers", str(workers),
                "--control", str(self.control), "--logs", str(self.logs)]
        if config is not None:
            argv += ["--config", str(config)]
        if rq_version is not None:
            argv += ["--rq-version", rq_version]
        self.proc = subprocess.Popen(argv, env=harness_env(), cwd=REPO_ROOT)

    def wait_ready(self, timeout: float = 120) -> list[str]:
        wait_until(lambda: (self.control / "ready").exists() or self.proc.poll() is not None,
                   timeout, f"host {self.hostname} to be ready")
        assert self.proc.poll() is None, f"host {self.hostname} exited {self.proc.returncode}"
        return [ln.split()[1] for ln in (self.control / "ready").read_text().splitlines()]

    def daemon_pid(self) -> int:
        """The replica's pid as this (the parent) PID namespace sees it."""
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            if "reconciler" in p.cmdline() and "run" in p.cmdline():
                return p.pid
        raise AssertionError(f"no replica runs on {self.hostname}")

    def kill_daemon(self) -> None:
        (self.control / "kill-daemon").touch()

    def daemon_log(self) -> Path:
        return self.logs / "daemon.log"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.control.mkdir(parents=True, exist_ok=True)
            (self.control / "stop").touch()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
