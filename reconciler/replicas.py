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

import psutil
import structlog

from reconciler.aio import Backoff, retry_forever
from reconciler.errors import InstanceNameTaken
from reconciler.health import Health
from reconciler.hostid import host_id
from reconciler.jobs_table import Store
from reconciler.metrics import Metrics
from reconciler.replicas_table import REPLICA_STALE_SECONDS, Holder

log = structlog.get_logger("reconciler.replicas")

BEAT_SECONDS = REPLICA_STALE_SECONDS / 3


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

    async def take_name(self) -> None:
        """Make our instance name ours in the registry before anything is claimed under it
        (start-up releases the claims held under our name). InstanceNameTaken if a live
        replica elsewhere holds it: two replicas under one name would release each
        other's claims and could never hand a cancel to each other.

        Its holder is judged live by evidence: on this host (same host identity), its pid
        runs and is older than its last heartbeat; on another, its heartbeat moves while
        we watch (it beats every BEAT_SECONDS; a holder that died without leaving, a
        restart in a new container say, is seen stale within REPLICA_STALE_SECONDS and
        its name taken over)."""
        here = host_id()

        async def take(force: bool = False) -> Holder | None:
            return await self.store.replicas.take_name(
                hostname=socket.gethostname(), host_id=here, pid=os.getpid(), force=force)

        holder = await take()
        if holder is None:
            return
        if holder.host_id == here:
            if _runs(holder):
                raise InstanceNameTaken(_taken(self.store.cfg.instance.name, holder, "this host"))
            log.info("instance_name_taken_over", previous_pid=holder.pid)
            await take(force=True)
            return
        first = holder
        deadline = time.monotonic() + REPLICA_STALE_SECONDS - holder.age + 1.0
        log.warning("instance_name_held", holder_host=holder.hostname, holder_pid=holder.pid,
                    heartbeat_age=round(holder.age, 1),
                    hint="waiting to see whether its heartbeat moves")
        while (holder := await take()) is not None:
            if holder.heartbeat_at != first.heartbeat_at or holder.host_id != first.host_id:
                raise InstanceNameTaken(_taken(self.store.cfg.instance.name, holder,
                                               "another host"))
            if time.monotonic() > deadline:
                # Silent past its staleness by our clock, not yet by the database's.
                await take(force=True)
                return
            await asyncio.sleep(0.5)

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


def _runs(holder: Holder) -> bool:
    """The holder's pid, in our PID namespace, is a process that existed at its last
    heartbeat (a pid recycled since is not it)."""
    try:
        return psutil.Process(holder.pid).create_time() <= holder.heartbeat_at.timestamp() + 1
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _taken(name: str, holder: Holder, where: str) -> str:
    return (f"instance.name {name!r} is taken by a live replica on {where} (hostname "
            f"{holder.hostname}, host id {holder.host_id}, pid {holder.pid}, heartbeat "
            f"{holder.age:.0f} s ago): give each replica its own instance.name, or leave it "
            f"unset (the default, hostname plus host identity, is unique per host)")
