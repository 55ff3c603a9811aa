"""Which horse stops are for a cancel: those tell RQ the job was canceled once stopped;
an orphan's stop leaves RQ's word (failed) alone."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from reconciler.config import from_mapping
from reconciler.model import ActiveRow, CancelIntent, JobRow, RqJob, RqStatus, WorkerState, decide
from reconciler.reconcile import Evaluated, Reconciler

CFG = from_mapping({}, environ={})
S = CFG.jobs.statuses
INTENT = CancelIntent("web:alice", "clicked Cancel")
ALIVE = WorkerState("w1", local=True, pid=1, current_job="j1")
GONE = WorkerState("w1", "pid 1 is dead", local=True, pid=1, current_job="j1")


@pytest.mark.parametrize(("row_status", "worker", "intent", "for_cancel"), [
    (S.running, ALIVE, INTENT, True),    # a cancel requested: the flow's horse
    (S.cancelled, ALIVE, None, True),    # a cancelled row whose job started anyway
    (S.running, GONE, INTENT, True),     # a cancel meets a dead worker
    (S.running, GONE, None, False),      # an orphan
])
def test_a_horse_stop_says_whether_it_is_for_a_cancel(row_status: str, worker: WorkerState,
                                                      intent: Any, for_cancel: bool) -> None:
    row = JobRow(1, "j1", row_status)
    job = RqJob("j1", RqStatus.STARTED, "started", "w1")
    d = decide(row, job, worker, intent, S, old_enough=True)
    ev = Evaluated(ActiveRow(row, 60.0), job, worker, d)
    rec = Reconciler(CFG, None, None, None, None)  # type: ignore[arg-type]
    report, _ = asyncio.run(rec.apply([ev], dry_run=True))
    [stop] = report.horse_stops
    assert stop.for_cancel is for_cancel


def test_a_thread_is_never_taken_for_a_worker_process() -> None:
    """In a PID namespace of its own, a worker's registered pid can name one of the
    daemon's threads: /proc/<tid>/stat answers for it, but it is no process of a worker."""
    import subprocess
    import sys
    import threading

    from reconciler.procfs import is_process

    tid: list[int] = []
    ready, done = threading.Event(), threading.Event()

    def run() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(5)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert ready.wait(5)
        assert not is_process(tid[0])
    finally:
        done.set()
        t.join()
    assert not is_process(os.getpid())  # the daemon is never its own worker
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert is_process(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not is_process(child.pid)
