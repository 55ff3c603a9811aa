"""Processes a benchmark measures: a launcher that reports each command's exact peak RSS,
and a sampler of a running process's RSS and CPU. Measures, never kills what it did not
start."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

_LAUNCHER = """
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    with open(job["out"], "wb") as out, open(job["err"], "wb") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(job["argv"], stdout=out, stderr=err, cwd=job["cwd"], env=job["env"])
        print(json.dumps({"pid": proc.pid}), flush=True)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss": usage.ru_maxrss * 1024,
                      "cpu": usage.ru_utime + usage.ru_stime, "wall": wall}), flush=True)
"""


class Launcher:
    """Starts commands from a small process of its own and reports each one's exact peak
    RSS (ru_maxrss from os.wait4). Started before a benchmark builds its data: the kernel
    counts a child's memory from the moment it is forked, so a command forked straight
    from a benchmark holding a million rows would report the benchmark's size, not its own."""

    def __init__(self) -> None:
        import subprocess

        self._proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)

    def start(self, argv: Sequence[str], out: Path, err: Path, *, cwd: Path,
              env: dict[str, str]) -> int:
        """Start `argv` (stdout and stderr to files); returns its pid."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"argv": list(argv), "out": str(out), "err": str(err),
                                           "cwd": str(cwd), "env": env}) + "\n")
        self._proc.stdin.flush()
        return int(json.loads(self._proc.stdout.readline())["pid"])

    def wait(self) -> dict[str, Any]:
        """The last command's exit code, peak RSS (bytes), CPU seconds and wall seconds."""
        assert self._proc.stdout is not None
        return dict(json.loads(self._proc.stdout.readline()))

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=10)


class ProcSampler:
    """Polls a process's RSS (and CPU times) every `interval` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (monotonic, rss bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process(pid)

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                return
            self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak(self) -> int:
        return max((s for _, s in self.samples), default=0)

    def between(self, t0: float, t1: float) -> list[int]:
        return [s for t, s in self.samples if t0 <= t <= t1]


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)
