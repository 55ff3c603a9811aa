"""Event sources: each turns something that happened into a wake-up, never into a decision.

- `CancelNotifications`: Postgres LISTEN on the request channel -> the cancel doorbell.
- `KeyspaceEvents`: Redis keyspace notifications on job and worker keys -> dirty ids.
- `LocalWorkerDeaths`: a watched local worker's pid exits -> the jobs it held are dirty.

Each has `async run()` that lives as long as the daemon: an outage is retried with
backoff (visible in backend_up) and followed by a sweep request, since events may have
been missed meanwhile. Must never read or write a job row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.exceptions
import structlog

from reconciler.aio import Backoff, TaskSet, retry_forever
from reconciler.config import Config
from reconciler.errors import BackendUnavailable, KeyspaceConfigError
from reconciler.health import Health, Wakeups
from reconciler.metrics import Metrics
from reconciler.pgpool import listen
from reconciler.rq_layout import missing_keyspace_flags
from reconciler.rq_state import RqState
from reconciler.workers import Workers
from reconciler.workqueue import WorkQueue

log = structlog.get_logger("reconciler.sources")


class CancelNotifications:
    """LISTEN for new cancel requests; after each reconnect, sweep and look at the table
    (requests inserted while we were not listening are there, not in a NOTIFY)."""

    def __init__(self, cfg: Config, health: Health, wake: Wakeups, metrics: Metrics) -> None:
        self.cfg, self.health, self.wake, self.metrics = cfg, health, wake, metrics
        self._connections = 0
        self._backoff = Backoff(0.2, 30.0)

    async def run(self) -> None:
        await retry_forever(self._listen_once, event="listen_lost", backoff=self._backoff,
                            on_outage=self.health.outage)

    async def _listen_once(self) -> None:
        await listen(self.cfg.postgres.session_dsn, self.cfg.cancel.channel, self._notified,
                     on_listening=self._listening)

    def _listening(self) -> None:
        self._backoff.reset()
        self.health.set_up("postgres", True)
        self.wake.cancel.set()
        self._connections += 1
        if self._connections > 1:  # the start-up sweep is requested by the supervisor
            log.info("listen_reconnected")
            self.wake.request_sweep()

    def _notified(self, _payload: str) -> None:
        self.metrics.events.labels(source="cancel_notify").inc()
        self.wake.cancel.set()


class KeyspaceEvents:
    """Keyspace notifications on RQ's job and worker keys. With keyspace_events = "auto",
    the flags we need are added (never removing any) after every (re)connect, since a
    restarted Redis forgot them; "require" ends the daemon if they cannot be had; "off",
    or a Redis that forbids CONFIG, leaves the daemon on sweeps alone (at the shorter
    fallback interval)."""

    def __init__(self, cfg: Config, rq: RqState, health: Health, wake: Wakeups,
                 queue: WorkQueue, workers: Workers, metrics: Metrics) -> None:
        self.cfg, self.rq, self.health, self.wake = cfg, rq, health, wake
        self.queue, self.workers, self.metrics = queue, workers, metrics
        self.live = False
        self.fallback = cfg.redis.keyspace_events == "off"
        self._forbidden_said = False
        self._learning = TaskSet("learn-worker")
        # Told the name of a worker whose key was deleted or expired (stranded jobs).
        self.on_worker_gone: Callable[[str], None] | None = None
        self._backoff = Backoff(0.1, 30.0)

    async def run(self) -> None:
        try:
            await retry_forever(self._subscribe_once, event="keyspace_lost", backoff=self._backoff,
                                on_outage=self._lost, after_outage=self.wake.request_sweep)
        finally:
            await self._learning.cancel_all()

    def _lost(self, exc: BackendUnavailable) -> None:
        self.live = False
        self.health.outage(exc)

    async def _subscribe_once(self) -> None:
        self.live = False
        await self.rq.ping()
        self.health.set_up("redis", True)
        if not await self.ensure_flags():
            self.fallback = True
            await asyncio.Event().wait()  # sweeps only, until cancelled
        self.fallback = False
        gen = self.rq.keyspace_events()
        try:
            async for kind, ident, event in gen:
                if kind == "subscribed":
                    self.live = True
                    self._backoff.reset()
                    log.info("keyspace_subscribed", patterns=self.rq.keyspace_patterns())
                    # Workers that registered while we were not subscribed sent their only
                    # event for minutes (an idle worker beats rarely): look for them now.
                    self._learning.spawn(self._discover(), "discover")
                elif kind == "job":
                    self.queue.add((ident,), "keyspace")
                else:
                    self._worker_changed(ident)
                    if event in ("del", "expired") and self.on_worker_gone is not None:
                        # (A worker that shuts down cleanly also ends this way: whatever it
                        # leaves in an intermediate list is judged the same.)
                        self.on_worker_gone(ident)
        finally:
            await gen.aclose()

    async def ensure_flags(self) -> bool:
        """True if keyspace events will flow. Never removes flags already set."""
        mode = self.cfg.redis.keyspace_events
        if mode == "off":
            return False
        try:
            current = await self.rq.keyspace_flags()
            new = current
            if mode == "auto":
                new = await self.rq.add_keyspace_flags(current)
                if new != current:
                    log.info("keyspace_events_enabled", before=current, after=new)
            missing = missing_keyspace_flags(new)
            if missing:
                raise KeyspaceConfigError(
                    f"notify-keyspace-events={new!r} lacks {missing!r} and "
                    "redis.keyspace_events = \"require\"")
            return True
        except redis.exceptions.ResponseError as exc:
            if mode == "require":
                raise KeyspaceConfigError(f"cannot read notify-keyspace-events: {exc}") from exc
            if not self._forbidden_said:
                self._forbidden_said = True
                log.error("keyspace_config_forbidden", error=str(exc),
                          fallback_interval=self.cfg.sweep.fallback_interval_seconds,
                          hint="enable notify-keyspace-events 'Kghx' in your Redis provider")
            return False

    def _worker_changed(self, name: str) -> None:
        """A worker key changed (heartbeat, death, expiry, deletion): its started jobs are
        dirty; a worker never seen before is learnt (local ones get their pid watched)."""
        self.metrics.events.labels(source="keyspace").inc()
        jobs = self.workers.jobs_of(name)
        if jobs:
            self.queue.add(jobs)
        if not self.workers.knows(name):
            self._learning.spawn(self._learn(name), name)

    async def _discover(self) -> None:
        try:
            await self.workers.discover()
        except BackendUnavailable:
            return  # the next sweep discovers them

    async def _learn(self, name: str) -> None:
        try:
            await self.workers.learn(name)
        except BackendUnavailable:
            return  # its next heartbeat tries again


class LocalWorkerDeaths:
    """A local worker's process exited: its jobs are dirty at once, not after its Redis
    TTL. Its hash is read once more to learn the job it held last."""

    def __init__(self, rq: RqState, health: Health, queue: WorkQueue, metrics: Metrics) -> None:
        self.rq, self.health, self.queue, self.metrics = rq, health, queue, metrics
        self.workers: Workers | None = None
        self._tasks = TaskSet("worker-exit")
        # Told the name of each local worker that exits (stranded jobs).
        self.on_exit: Callable[[str], None] | None = None

    def exited(self, name: str) -> None:
        assert self.workers is not None
        jobs = self.workers.local_exited(name)
        log.info("local_worker_exited", worker=name, jobs=sorted(jobs))
        if self.on_exit is not None:
            self.on_exit(name)
        self.metrics.events.labels(source="local_worker").inc()
        self._tasks.spawn(self._after_exit(name, jobs), name)

    async def _after_exit(self, name: str, jobs: set[str]) -> None:
        try:
            rec = (await self.rq.read_workers([name])).get(name)
            if rec is not None and rec.current_job:
                jobs.add(rec.current_job)
        except BackendUnavailable as exc:
            self.health.outage(exc)
        self.queue.add(jobs)

    async def run(self) -> None:
        """Nothing to poll (pidfds wake the loop); owns the follow-up reads until shutdown."""
        try:
            await asyncio.Event().wait()
        finally:
            await self._tasks.cancel_all()
