"""The job the example enqueues: a training run that saves a checkpoint when asked to stop.

rq-reconciler stops a cancelled job with SIGTERM first (then RQ's stop-job, then SIGKILL
after `cancel.grace_seconds`): a job that catches it can save its work and exit cleanly.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import FrameType


def train(seconds: float, checkpoint: str | None = None) -> str:
    def on_sigterm(_sig: int, _frame: FrameType | None) -> None:
        if checkpoint:
            Path(checkpoint).write_text(f"stopped after {time.monotonic() - start:.1f} s\n")
        sys.exit(0)

    start = time.monotonic()
    signal.signal(signal.SIGTERM, on_sigterm)
    while time.monotonic() - start < seconds:
        time.sleep(0.05)  # one training step
    return f"trained for {seconds:g} s"
