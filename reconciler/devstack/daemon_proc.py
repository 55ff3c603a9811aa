"""``rq-reconciler run`` as a real subprocess, ready when it says so over $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from reconciler.devstack.procs import REPO_ROOT, harness_env


class DaemonProc:
    """`rq-reconciler run` as a real subprocess; ready = it sent READY=1 to the
    $NOTIFY_SOCKET we gave it, exactly as systemd would see it."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None,
                 name: str = "d", argv: list[str] | None = None) -> None:
        """`argv`: what to run instead of `python -m reconciler run --config <config>` (a
        script that ends by exec'ing the daemon as its unit would)."""
        self.config = config
        self.argv = argv
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
            self.argv or [sys.executable, "-m", "reconciler", "run", "--config", str(self.config)],
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
                raise AssertionError(f"daemon {self.name} exited {self.proc.returncode} before "
                                     f"{text}:\n" + self.log_text()[-4000:])
        raise AssertionError(f"daemon {self.name} did not send {text} within {timeout} s:\n"
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)

    def metrics_url(self) -> str:
        for line in self.config.read_text().splitlines():
            if line.startswith("listen"):
                return f"http://{json.loads(line.split('=', 1)[1].strip())}/metrics"
        raise AssertionError("no metrics.listen in config")

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url(), timeout=5) as r:  # noqa: S310 - our own loopback URL
            return str(r.read().decode())
