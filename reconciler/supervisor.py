"""The supervisor: lifecycle only. Build the parts, connect, run the sources and passes in
one TaskGroup, and on a signal stop taking work, drain, release leases, close.

Fail together: a task that dies of anything but a backend outage (those are retried
where they happen) ends the daemon non-zero and systemd restarts it. Signal handlers
only set state; a second SIGTERM/SIGINT skips the remaining waits, never a `finally`.
Every task started here or below has an owner that collects its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
from collections.abc import Callable
from dataclasses import replace

import structlog

from reconciler import __version__, hostpid
from reconciler import log as logsetup
from reconciler.aio import Backoff, TaskSet, cancel_until_done, on_schema_error, wait_event
from reconciler.cancel import CancelProcessor
from reconciler.config import Config, ConfigError, load, redact
from reconciler.errors import (
    BackendUnavailable,
    InstanceNameTaken,
    KeyspaceConfigError,
    SchemaError,
)
from reconciler.health import Health, Wakeups
from reconciler.jobs_table import Store
from reconciler.metrics import Metrics, MetricsServer
from reconciler.orphans import Orphans
from reconciler.passes import Aftercare, CancelLoop, EventPasses, IntentWatch, Sweeps
from reconciler.pgpool import translated
from reconciler.processes import Processes
from reconciler.reconcile import Reconciler
from reconciler.replicas import Replicas
from reconciler.rq_state import RqState
from reconciler.sources import CancelNotifications, KeyspaceEvents, LocalWorkerDeaths
from reconciler.stop import Stopper
from reconciler.strands import Strands
from reconciler.systemd import sd_notify, watchdog, watchdog_interval
from reconciler.workers import Workers
from reconciler.workqueue import WorkQueue

log = structlog.get_logger("reconciler.supervisor")

DRAIN_SECONDS = 30.0


class Daemon:
    def __init__(self, cfg: Config, *, install_signals: bool = True) -> None:
        self.cfg = cfg
        self.install_signals = install_signals
        self.metrics = m = Metrics()
        self.store = Store(cfg, on_poison=m.count_poison)
        self.rq = RqState(cfg.redis.url, socket_timeout=cfg.redis.socket_timeout_seconds,
                          on_poison=m.count_poison, key_prefix=cfg.redis.key_prefix)
        # Workers of this node's pods, seen from its PID namespace (reconciler.hostpid).
        self.host_pid, self.host_pid_off_because = hostpid.decide(cfg.instance.host_pid)
        self.procs = Processes(on_signal=lambda sig: m.process_signals.labels(signal=sig).inc(),
                               host_pid=self.host_pid)
        self.health = Health(m)
        self.wake = Wakeups()
        self.queue = WorkQueue(on_added=lambda src, n: m.events.labels(source=src).inc(n),
                               on_overflow=self._queue_overflowed)
        self.deaths = LocalWorkerDeaths(self.rq, self.health, self.queue, m)
        self.workers = Workers(self.rq, self.procs, on_local_exit=self.deaths.exited)
        self.deaths.workers = self.workers
        self.replicas = Replicas(self.store, self.health, m, lambda: self.workers.local)
        self.workers.on_local_change = self.replicas.workers_changed
        self.workers.owner_stale = self.replicas.owner_stale
        self.replicas.on_owners_stale = self._owners_stale
        self.workers.on_unseen = self._worker_unseen
        m.graceful_stop_available.set_function(lambda: 0.0 if self.workers.unseen else 1.0)
        self.reconciler = Reconciler(cfg, self.store, self.rq, self.workers, m)
        self.followups = TaskSet("followup")
        self.stopper = Stopper(cfg, self.rq, self.procs, self.workers, self.followups)
        self.stopper.owner_of = self.replicas.owner_of
        self.intents = IntentWatch(cfg, self.store, self.queue, self.health)
        self.cancels = CancelProcessor(cfg, self.store, self.rq, self.stopper, self.reconciler,
                                       m, on_cancelled=self.wake.request_orphan_scan,
                                       watch=self.intents.watch, hold=self.queue.held)
        self.cancels._slot_free = self.wake.cancel.set
        self.after = Aftercare(self.rq, self.workers, self.stopper, self.followups, self.queue)
        self.after.orphans = Orphans(cfg, self.store, self.rq, self.stopper, self.followups,
                                     self.queue, m)
        self.notifications = CancelNotifications(cfg, self.health, self.wake, m)
        self.keyspace = KeyspaceEvents(cfg, self.rq, self.health, self.wake, self.queue,
                                       self.workers, m)
        self.passes = EventPasses(self.queue, self.reconciler, self.health, self.wake, self.after)
        self.cancel_loop = CancelLoop(cfg, self.cancels, self.wake, self.health)
        self.sweeps = Sweeps(cfg, self.store, self.reconciler, self.workers, self.health,
                             self.wake, m, self.after,
                             events_live=lambda: self.keyspace.live and not self.keyspace.fallback,
                             on_swept=self._swept)
        self.strands = Strands(cfg, self.store, self.rq, self.health, m, self.workers)
        self.deaths.on_exit = self.strands.poke
        self.keyspace.on_worker_gone = self.strands.poke
        self.server: MetricsServer | None = None
        self.stopping = asyncio.Event()
        self.forced = asyncio.Event()
        self.ready = False
        self.schema_error: SchemaError | None = None
        self._signals = 0

    def _worker_unseen(self, name: str, why: str) -> None:
        log.warning("graceful_stop_unavailable", worker=name, why=why,
                    fix="run rq-reconciler in the workers' PID namespace and as their user: "
                        "a sidecar with shareProcessNamespace: true, compose's "
                        "pid: \"service:<worker>\", or on the host itself; until then its "
                        "cancels use RQ's stop-job (an immediate SIGKILL)")

    def _owners_stale(self, names: set[str]) -> None:
        """The replicas that watched these workers' processes stopped beating (their pods
        or hosts may be gone): their jobs get a fresh look now, not at the next sweep."""
        jobs = {j for n in names for j in self.workers.jobs_of(n)}
        if jobs:
            log.info("worker_replicas_stale", workers=sorted(names), jobs=sorted(jobs))
            self.queue.add(jobs, "replica_stale")

    def _queue_overflowed(self, dropped: int) -> None:
        log.warning("dirty_set_overflow", dropped=dropped, cap=self.queue.cap,
                    hint="too many events to follow one by one; a sweep reads them all")
        self.wake.request_sweep()

    # -- signals ----------------------------------------------------------------------------

    def on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            self.reload()
            return
        self._signals += 1
        if self._signals == 1:
            log.info("shutdown_requested", signal=sig.name)
            self.stopping.set()
        else:
            log.warning("shutdown_forced", signal=sig.name)
            self.stopping.set()
            self.forced.set()

    def reload(self) -> None:
        try:
            new = load(None if self.cfg.source == "<defaults>" else self.cfg.source)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return
        # Only what is safe to change live: intervals and log level.
        self.cfg = replace(self.cfg, sweep=new.sweep, log=new.log)
        self.reconciler.cfg = replace(self.reconciler.cfg, sweep=new.sweep)
        self.sweeps.cfg = replace(self.sweeps.cfg, sweep=new.sweep)
        logsetup.set_level(new.log.level)
        log.info("reloaded", sweep_interval=new.sweep.interval_seconds, log_level=new.log.level)
        self.wake.request_sweep()

    def _swept(self) -> None:
        self.strands.poke()  # each sweep looks for stranded jobs too
        self._notify_ready()

    def _notify_ready(self) -> None:
        if not self.ready:
            self.ready = True
            sd_notify("READY=1\nSTATUS=reconciling")
            log.info("ready", events=not self.keyspace.fallback)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if self.install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, self.on_signal, sig)
        host, port = self.cfg.metrics.host_port
        self.server = MetricsServer(self.metrics, self.health.healthy, host, port)
        try:
            await self.server.start()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # Most often a second daemon on this host with the default port; restarting
            # cannot fix that (exit 2: the unit does not restart).
            log.error("metrics_listen_in_use", listen=self.cfg.metrics.listen, error=str(exc),
                      hint="another program (a second rq-reconciler on this host?) listens "
                           "there: give each instance its own metrics.listen port")
            return 2
        log.info("starting", version=__version__, instance=self.cfg.instance.name,
                 redis=redact(self.cfg.redis.url), postgres=redact(self.cfg.postgres.dsn),
                 metrics=f"http://{host}:{self.server.port}/metrics", host_pid=self.host_pid)
        if self.cfg.instance.host_pid == "on" and not self.host_pid:
            log.warning("host_pid_unavailable", why=self.host_pid_off_because,
                        hint="workers of other hostnames stay remote: their cancels use RQ's "
                             "stop-job and their deaths wait for Redis")
        running = False
        try:
            try:
                if not await self.connect():
                    return 0
                running = True
                self.wake.request_sweep()  # the start-up sweep
                await self._run_tasks()
                if self.schema_error is not None:
                    raise self.schema_error
            except InstanceNameTaken as exc:
                # Two live replicas under one name would release each other's claims.
                log.error("instance_name_taken", error=str(exc))
                return 2
            except SchemaError as exc:
                # Not an outage: restarting cannot fix it (the unit does not restart on 2).
                # Refused mid-run (a column renamed or retyped, a privilege revoked), the
                # server's words seldom say what: the line is the one `check` would print.
                said = (await self.store.explain_refusal() if running else None) or str(exc)
                log.error("schema_error", error=said)
                return 2
            await self._drain()
            return 0
        finally:
            if self.install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            await self.close()

    def _schema_error_met(self, exc: SchemaError) -> None:
        """A background task met a configuration that cannot work: stop (exit 2)."""
        if self.schema_error is None:
            self.schema_error = exc
        self.stopping.set()

    async def _run_tasks(self) -> None:
        token = on_schema_error.set(self._schema_error_met)
        try:
            await self._task_group()
        except ExceptionGroup as eg:
            # One task's SchemaError ends them all: the daemon says it once and exits 2.
            found, _rest = eg.split(SchemaError)
            if found is None:
                raise
            raise _first_leaf(found) from eg
        finally:
            on_schema_error.reset(token)

    async def _task_group(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self.notifications.run(), name="listen"),
                tg.create_task(self.keyspace.run(), name="keyspace"),
                tg.create_task(self.deaths.run(), name="local-worker-deaths"),
                tg.create_task(self.passes.run(), name="event-passes"),
                tg.create_task(self.cancel_loop.run(), name="cancel"),
                tg.create_task(self.intents.run(), name="intent-watch"),
                tg.create_task(self.replicas.run(), name="replica-registry"),
                tg.create_task(self.sweeps.run(), name="sweep"),
                tg.create_task(self.strands.run(), name="strands"),
                tg.create_task(watchdog(lambda: self.ready, watchdog_interval()), name="watchdog"),
            ]
            try:
                await self.stopping.wait()
                sd_notify("STOPPING=1")
            finally:
                # Reached on shutdown, and when a task failed (the group cancelled us):
                # stop taking work. Cancelled until done, so the group's own wait ends.
                await cancel_until_done(tasks)

    async def _drain(self) -> None:
        """Let in-flight cancels and horse stops finish, bounded by DRAIN_SECONDS or by a
        second signal; then give back the claims not finished."""
        drain = asyncio.ensure_future(self._drain_work())
        force = asyncio.ensure_future(self.forced.wait())
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                await asyncio.wait({drain, force}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            pass
        finally:
            await cancel_until_done([force])
        if not drain.done():
            log.warning("drain_timeout", seconds=DRAIN_SECONDS, forced=self.forced.is_set())
            await cancel_until_done([drain])
        else:
            drain.result()
        with contextlib.suppress(BackendUnavailable):
            released = await self.store.requests.release_claims()
            if released:
                log.info("claims_released", count=released)
            await self.replicas.leave()

    async def _drain_work(self) -> None:
        await self.cancels.drain(DRAIN_SECONDS)
        await self.stopper.drain(DRAIN_SECONDS)
        await self.followups.drain(DRAIN_SECONDS)

    async def close(self) -> None:
        await self.cancels.cancel_all()
        await self.stopper.cancel_all()
        await self.followups.cancel_all()
        self.workers.close()
        with contextlib.suppress(Exception):
            await self.rq.close()
        with contextlib.suppress(Exception):
            await self.store.close()
        if self.server is not None:
            await self.server.close()
        log.info("stopped", instance=self.cfg.instance.name)

    def _address(self, backend: str) -> str:
        """Where `backend` is sought (host:port or a socket; never a password)."""
        from reconciler.urls import addresses

        if backend == "redis":
            return addresses(self.cfg.redis.url)
        return ",".join(dict.fromkeys(a for a in (addresses(self.cfg.postgres.dsn),
                                                  addresses(self.cfg.postgres.session_dsn)) if a))

    async def connect(self) -> bool:
        """Connect both backends and take back our own stale claims, retrying with backoff
        until that works or we are told to stop. False if told to stop first."""
        backoff = Backoff(0.2, 30.0)
        while not self.stopping.is_set():
            try:
                if self.store.pool is None:
                    await self.store.connect()
                    async with translated(self.store.pool):
                        await self.store.verify_schema()
                self.health.set_up("postgres", True)
                await self.rq.ping()
                self.health.set_up("redis", True)
                # A previous life of this instance may have died holding claims: take them
                # back now rather than wait out the lease, once the name is proven ours
                # (no other live replica runs under it). A write: a read-only database
                # makes this an outage, retried.
                await self.replicas.take_name()
                released = await self.store.requests.release_claims()
                if released:
                    log.info("stale_claims_released", count=released)
                break
            except BackendUnavailable as exc:
                self.health.outage(exc)
                delay = backoff.next()
                log.warning("connect_retry", backend=exc.backend, error=str(exc),
                            address=self._address(exc.backend), retry_in=round(delay, 2))
                if await wait_event(self.stopping, delay):
                    return False
        return not self.stopping.is_set()


def _first_leaf(eg: BaseExceptionGroup[SchemaError]) -> SchemaError:
    first = eg.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def run_daemon(cfg: Config, *, install_signals: bool = True,
                     on_start: Callable[[Daemon], None] | None = None) -> int:
    daemon = Daemon(cfg, install_signals=install_signals)
    if on_start is not None:
        on_start(daemon)
    try:
        return await daemon.run()
    except ExceptionGroup as eg:
        match, rest = eg.split(KeyspaceConfigError)
        if match is None or rest is not None:
            raise
        for exc in match.exceptions:
            log.error("keyspace_events_required", error=str(exc))
        return 1
