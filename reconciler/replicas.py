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
import time
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
        # worker -> the monotonic instant by which every replica listing it will have
        # missed its heartbeat (from the server's own ages: no clock is compared)
        self._stale_at: dict[str, float] = {}
        self._reported: set[str] = set()
        # Told the workers whose listing replicas all went stale (once each): their jobs
        # are worth a fresh look (liveness rule 4 may find them gone).
        self.on_owners_stale: Callable[[set[str]], None] | None = None

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
        await self.read_listings()
        try:
            async with asyncio.timeout(BEAT_SECONDS):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def read_listings(self) -> None:
        rows = await self.store.replicas.listings()
        now = time.monotonic()
        stale_at: dict[str, float] = {}
        for workers, age in rows:
            at = now + REPLICA_STALE_SECONDS - age
            for w in workers:
                stale_at[w] = max(stale_at.get(w, at), at)
        self._stale_at = stale_at
        self._reported &= set(stale_at)
        due = {w for w, at in stale_at.items() if at <= now and w not in self._reported}
        if due:
            self._reported |= due
            if self.on_owners_stale is not None:
                self.on_owners_stale(due)

    def owner_stale(self, worker_name: str, now: float) -> bool:
        """True if replicas listed `worker_name` as theirs and all have stopped beating."""
        at = self._stale_at.get(worker_name)
        return at is not None and now >= at

    async def owner_of(self, worker_name: str) -> str | None:
        """The live replica, other than us, that can see `worker_name` on its host."""
        return await self.store.replicas.for_worker(worker_name)

    async def leave(self) -> None:
        if self.registered:
            await self.store.replicas.unregister()
