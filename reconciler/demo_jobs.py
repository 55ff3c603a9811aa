"""The job functions `rq-reconciler demo` enqueues: real code that real rq workers run."""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType


def _note(marker: str, text: str) -> None:
    with open(marker, "a", encoding="utf-8") as f:
        f.write(f"{text} {os.getpid()} {time.time():.6f}\n")


def prepare_dataset(rows: int = 1000) -> int:
    time.sleep(0.3)
    return rows


def train_broken_model() -> None:
    time.sleep(0.1)
    raise RuntimeError("CUDA out of memory (tried to allocate 24.00 GiB)")


def train(seconds: float, marker: str) -> str:
    """A long training run that saves a checkpoint when asked to stop (SIGTERM)."""

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        _note(marker, "SIGTERM: checkpoint saved, exiting")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    _note(marker, "STARTED")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return "trained"
