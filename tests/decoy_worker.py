"""RQ worker classes that start a decoy beside every horse (``rq worker --worker-class
tests.decoy_worker.DecoyWorker`` or ``...DecoySpawnWorker``), for the horse-proof tests.

The decoy is what a careless proof would take for the horse: a child of the worker that
leads its own process group, runs the worker's interpreter and was created after the
job's execution began; only its environment tells it apart, naming the job but another
execution (RQ_EXECUTION_ID), as a horse of another run would. With $RQ_TEST_DECOY_MARKER
set, it appends "DECOY <pid>" to that file, then "DECOY-SIGNAL <n>" for every signal it
can catch, and lives DECOY_SECONDS.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rq.worker import SpawnWorker, Worker

MARKER_ENV = "RQ_TEST_DECOY_MARKER"
DECOY_SECONDS = 120

_DECOY = """
import os, signal, sys, time
marker = sys.argv[1]
def mark(text):
    with open(marker, "a") as f:
        f.write(text + "\\n")
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(sig, lambda n, _f: mark(f"DECOY-SIGNAL {n}"))
mark(f"DECOY {os.getpid()}")
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    time.sleep(0.05)
"""


def _spawn_decoy(worker: Any, job: Any) -> None:
    marker = os.environ.get(MARKER_ENV)
    if not marker:
        return
    env = dict(os.environ)
    env["RQ_JOB_ID"] = job.id
    env["RQ_EXECUTION_ID"] = "decoy" + worker.execution.id
    os.posix_spawn(sys.executable, [sys.executable, "-c", _DECOY, marker, str(DECOY_SECONDS)],
                   env, setpgroup=0)


class DecoyWorker(Worker):
    def fork_work_horse(self, job: Any, queue: Any) -> None:
        super().fork_work_horse(job, queue)  # the horse itself never returns from this
        _spawn_decoy(self, job)


class DecoySpawnWorker(SpawnWorker):
    def fork_work_horse(self, job: Any, queue: Any) -> None:
        super().fork_work_horse(job, queue)
        _spawn_decoy(self, job)
