"""What the daemon's parts tell each other: backend health and the wake-ups for the
cancel processor and the sweep. Plain state; no I/O beyond the metrics gauges and a log
line when a backend goes down or comes back.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from reconciler.aio import wait_event
from reconciler.errors import BackendUnavailable

if TYPE_CHECKING:
    from reconciler.metrics import Metrics

log = structlog.get_logger("reconciler.health")

# A burst of cancels becomes one orphan scan.
ORPHAN_SCAN_DEBOUNCE_SECONDS = 1.0


class Health:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.up = {"redis": False, "postgres": False}

    def set_up(self, backend: str, up: bool) -> None:
        was = self.up[backend]
        self.up[backend] = up
        self.metrics.backend_up.labels(backend=backend).set(1 if up else 0)
        if was and not up:
            log.warning("backend_down", backend=backend)
        elif up and not was:
            log.info("backend_up", backend=backend)

    def outage(self, exc: BackendUnavailable) -> None:
        self.set_up(exc.backend, False)

    def healthy(self) -> bool:
        return self.up["redis"] and self.up["postgres"]


class Wakeups:
    """The cancel processor's and the sweep's doorbells."""

    def __init__(self) -> None:
        self.cancel = asyncio.Event()
        self._sweep = asyncio.Event()
        self._sweep_delay = 0.0

    def request_sweep(self, delay: float = 0.0) -> None:
        self._sweep_delay = delay
        self._sweep.set()

    def request_orphan_scan(self) -> None:
        self.request_sweep(ORPHAN_SCAN_DEBOUNCE_SECONDS)

    async def sweep_due(self, interval: float) -> bool:
        """Wait until a sweep is requested (True) or `interval` passes (False)."""
        requested = await wait_event(self._sweep, interval)
        if self._sweep.is_set() and self._sweep_delay > 0:
            delay, self._sweep_delay = self._sweep_delay, 0.0
            await asyncio.sleep(delay)
        self._sweep.clear()
        return requested
