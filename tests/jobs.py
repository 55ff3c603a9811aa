"""Real job functions for ``rq worker`` subprocesses in tests (import path ``tests.jobs``).

Marker files: jobs that take a ``marker`` path append one line per event to it, e.g.
``STARTED <pid> <unix time>`` before they begin sleeping, so a test can wait for the
job to really be running in its work horse and learn the horse PID.

How RQ 2.12 records signal deaths of the work horse (verified with a real forking
``rq.worker.Worker`` in tests/integration/test_harness.py):

* SIGTERM, job does not handle it (SIG_DFL; RQ resets SIGTERM to SIG_DFL in the
  horse): the horse dies of the signal; the worker's ``monitor_work_horse`` sees a
  non-zero wait status and marks the job ``failed`` with exc_info
  "Work-horse terminated unexpectedly; waitpid returned 15 (signal 15); ".
* SIGTERM trapped by ``trap_sigterm`` (default ``how="raise"``): the handler raises
  ``SystemExit(143)`` inside the job; RQ's ``perform_job`` catches *everything*
  (bare ``except:``), so the job goes through the normal failure path and is
  ``failed`` with a "SystemExit: 143" traceback; the horse then exits 0.
* ``how="exit"`` (``os._exit(143)``): no Python unwinding; the worker sees exit
  status 143 and marks the job ``failed`` ("Work-horse terminated unexpectedly;
  waitpid returned 36608; ").
* SIGKILL: like the untrapped SIGTERM, ``failed`` with "(signal 9)".
* ``rq.command.send_stop_job_command``: the worker SIGKILLs the horse's process
  group and marks the job ``stopped`` (not ``failed``), though it is still put in
  the FailedJobRegistry.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType
from typing import Literal

_TICK = 0.05


def _mark(marker: str, line: str) -> None:
    with open(marker, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()


def _sleep_until(deadline: float) -> None:
    # Small increments so signal handlers run promptly and handled signals can't
    # shorten the total (time.sleep would resume anyway, but the deadline is explicit).
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(_TICK, remaining))


def succeed(x: int = 1) -> int:
    return x * 2


def fail(msg: str = "boom") -> None:
    raise RuntimeError(msg)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def trap_sigterm(seconds: float, marker: str, how: Literal["raise", "exit"] = "raise") -> float:
    """Sleep ``seconds``; on SIGTERM append "SIGTERM <time>" to ``marker`` and exit 143.

    ``how="raise"`` raises SystemExit(143) (RQ records ``failed`` via its normal
    exception path, with a traceback); ``how="exit"`` calls ``os._exit(143)`` (RQ
    records ``failed`` as "work-horse terminated unexpectedly").  Both are ``failed``.
    """

    def on_term(signum: int, frame: FrameType | None) -> None:
        _mark(marker, f"SIGTERM {time.time():.6f}")
        if how == "exit":
            os._exit(143)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    _mark(marker, f"STARTED {os.getpid()} {time.time():.6f}")
    _sleep_until(time.monotonic() + seconds)
    return seconds


def linger_on_sigterm(seconds: float, marker: str, linger: float) -> float:
    """As ``trap_sigterm``, but the handler takes ``linger`` seconds to clean up before it
    exits 143 (a job that saves a checkpoint): its cancel holds a slot that long."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        _mark(marker, f"SIGTERM {time.time():.6f}")
        _sleep_until(time.monotonic() + linger)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    _mark(marker, f"STARTED {os.getpid()} {time.time():.6f}")
    _sleep_until(time.monotonic() + seconds)
    return seconds


def ignore_sigterm(seconds: float, marker: str) -> float:
    """Sleep ``seconds`` no matter how many SIGTERMs arrive (each logs "SIGTERM-IGNORED")."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        _mark(marker, f"SIGTERM-IGNORED {time.time():.6f}")

    signal.signal(signal.SIGTERM, on_term)
    _mark(marker, f"STARTED {os.getpid()} {time.time():.6f}")
    _sleep_until(time.monotonic() + seconds)
    return seconds


def touch_and_sleep(seconds: float, marker: str) -> float:
    """Append "STARTED <pid> <time>" to ``marker`` and sleep the full ``seconds``."""
    _mark(marker, f"STARTED {os.getpid()} {time.time():.6f}")
    _sleep_until(time.monotonic() + seconds)
    return seconds


def stubborn_child(seconds: float, marker: str) -> float:
    """Start a child in the horse's process group that ignores SIGTERM (as a data loader
    might), log "CHILD <pid>", then behave as ``trap_sigterm``."""
    import subprocess
    import sys

    # The child says when it ignores SIGTERM: a cancel that comes while its interpreter
    # is still starting would otherwise kill it with the default action (and there would
    # be no leftover to find).
    child = subprocess.Popen([sys.executable, "-c",
                              "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                              " print('ready', flush=True); time.sleep(600)"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    child.stdout.readline()
    _mark(marker, f"CHILD {child.pid}")
    return trap_sigterm(seconds, marker)


def fail_times(times: int, marker: str) -> int:
    """Append "ATTEMPT <pid>" to ``marker``; raise while this is one of the first ``times``
    attempts (RQ's Retry then runs it again), succeed after."""
    with open(marker) as f:
        attempt = sum(1 for line in f if line.startswith("ATTEMPT")) + 1
    _mark(marker, f"ATTEMPT {os.getpid()} {attempt}")
    if attempt <= times:
        raise RuntimeError(f"attempt {attempt} fails")
    return attempt


def _pid_running(pid: int) -> bool:
    """A process `pid` exists and is not a zombie (read from /proc: no psutil needed in a
    worker's venv)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _mark_run(marker: str) -> None:
    """Append ``RUN <pid> <unix time> <n>``, n being how many earlier runs' horses are
    still running as this one starts (0 unless two copies of the job run at once)."""
    earlier = []
    try:
        with open(marker) as f:
            earlier = [int(ln.split()[1]) for ln in f if ln.startswith("RUN ")]
    except FileNotFoundError:
        pass
    alive = sum(1 for pid in earlier if _pid_running(pid))
    _mark(marker, f"RUN {os.getpid()} {time.time():.6f} {alive}")


def mark_runs(seconds: float, marker: str) -> float:
    """Record this run's start (see _mark_run), sleep ``seconds``, record ``DONE``."""
    _mark_run(marker)
    _sleep_until(time.monotonic() + seconds)
    _mark(marker, f"DONE {os.getpid()} {time.time():.6f}")
    return seconds


def mark_runs_trap_sigterm(seconds: float, marker: str) -> float:
    """mark_runs, but SIGTERM raises SystemExit(143) inside the job (recorded as
    "SIGTERM <pid>"): RQ's horse then handles the failure itself, Retry included."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        _mark(marker, f"SIGTERM {os.getpid()} {time.time():.6f}")
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    return mark_runs(seconds, marker)


def kill_own_worker(marker: str, seconds: float = 30.0, after: float = 0.5) -> float:
    """Record this run's start, SIGKILL the worker that forked this horse ``after``
    seconds later (a poison pill that takes its worker down), then go on sleeping as an
    orphaned horse would."""
    _mark_run(marker)
    _sleep_until(time.monotonic() + after)
    os.kill(os.getppid(), signal.SIGKILL)
    _sleep_until(time.monotonic() + seconds)
    _mark(marker, f"DONE {os.getpid()} {time.time():.6f}")
    return seconds
