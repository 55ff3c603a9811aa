"""RQ worker classes for fault tests (``rq worker --worker-class tests.faults.slow_worker...``).

``SlowStartWorker`` widens a real race in RQ: between the worker's BLMOVE of a job (it is
now in ``rq:queue:<q>:intermediate``, status still ``queued``) and its horse marking it
``started`` there are normally a few milliseconds; here there is a second. A
``Job.cancel()`` in that window sets ``canceled``, and the worker runs the job anyway.
"""

from __future__ import annotations

import os
import time
from typing import Any

from rq.worker import Worker

DELAY_ENV = "RQ_TEST_START_DELAY"


class SlowStartWorker(Worker):
    def prepare_execution(self, job: Any) -> Any:
        time.sleep(float(os.environ.get(DELAY_ENV, "1.0")))
        return super().prepare_execution(job)
