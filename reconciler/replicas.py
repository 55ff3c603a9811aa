"""The replica registry: who else runs, on which host, and which workers each can see.

Each replica beats into a table every third of REPLICA_STALE_SECONDS with the local
workers it has proven (hostname and a live pid that is the process that registered),
so that a replica claiming a cancel for a job on a worker it cannot see knows which
replica can stop that job gracefully. Must never decide anything about jobs.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterable

import structlog

from reconciler.aio import Backoff, retry_forever
from reconciler.health import Health
from reconciler.jobs_table import Store
from reconciler.metrics import Metrics
from reconciler.replicas_table import REPLICA_STALE_SECONDS

log = structlog.get_logger("reconciler.replicas")

BEAT_SECONDS = REPLICA_STALE_SECONDS / 3


def host_id() -> str:
    """This host as the kernel sees it: boot id and PID namespace, beside the hostname
    (containers and cloned machines share hostnames; they never share both of these)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = "?"
    return f"{socket.gethostname()}/{boot}/{pidns}"


class Replicas:
    def __init__(self, store: Store, health: Health, metrics: Metrics,
                 local_workers: Callable[[], Iterable[str]]) -> None:
        self.store, self.health, self.metrics = store, health, metrics
        self._local_workers = local_workers
        self._changed = asyncio.Event()
        self._listed: frozenset[str] = frozenset()
        self.registered = False

    def workers_changed(self) -> None:
        """A local worker appeared or went: beat now, so that hand-overs find it."""
        if frozenset(self._local_workers()) != self._listed:
            self._changed.set()

    async def run(self) -> None:
        await retry_forever(self.beat_once, event="replica_beat_retry", backoff=Backoff(0.5, 10.0),
                            on_outage=self.health.outage)

    async def beat_once(self) -> None:
        workers = frozenset(self._local_workers())
        alive = await self.store.replicas.register(
            hostname=socket.gethostname(), host_id=host_id(), pid=os.getpid(),
            workers=sorted(workers))
        self._listed = workers
        self.registered = True
        self.metrics.replicas_alive.set(alive)
        self._changed.clear()
        try:
            async with asyncio.timeout(BEAT_SECONDS):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def owner_of(self, worker_name: str) -> str | None:
        """The live replica, other than us, that can see `worker_name` on its host."""
        return await self.store.replicas.for_worker(worker_name)

    async def leave(self) -> None:
        if self.registered:
            await self.store.replicas.unregister()
