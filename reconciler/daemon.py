"""The supervisor: event sources -> one coalescing dirty set -> reconcile passes.

Every source only marks work: a NOTIFY wakes the cancel processor, a keyspace event or a
local worker's death marks RQ ids dirty, the timer requests a sweep. One task drains the
dirty set in batches; lost events cost latency, never correctness, because the sweep
reads everything again. Long-running tasks share one TaskGroup: an unexpected error ends
the daemon (systemd restarts it); a backend outage is retried with capped, jittered
backoff and shows in backend_up. Signal handlers only set state; a second one escalates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import asyncpg
import redis.exceptions
import structlog

from reconciler import __version__
from reconciler import log as logsetup
from reconciler.cancel import CancelProcessor
from reconciler.config import Config, ConfigError, load, redact
from reconciler.errors import (
    BackendUnavailable,
    KeyspaceConfigError,
    PostgresUnavailable,
    SchemaError,
)
from reconciler.metrics import Metrics, MetricsServer
from reconciler.processes import PidWatcher, Processes
from reconciler.reconcile import PassReport, Reconciler
from reconciler.rq_state import RqState
from reconciler.store import RowChange, Store, translated

log = structlog.get_logger("reconciler.daemon")

DRAIN_SECONDS = 30.0
COALESCE_SECONDS = 0.002
MAX_BATCH = 2000
LISTEN_LIVENESS_SECONDS = 30.0
ORPHAN_SCAN_DEBOUNCE_SECONDS = 1.0


async def cancel_until_done(tasks: Sequence[asyncio.Task[Any]], every: float = 0.5) -> None:
    """Cancel `tasks` again until they are done.

    On Python 3.11 a cancellation can be lost inside a library: asyncio.wait_for returns
    the inner result when it races the cancel (gh-86296), and redis-py awaits every socket
    write through it. A loop that lost its cancel runs on, and the TaskGroup waiting for
    it never exits: seen as a daemon that neither shut down on SIGTERM nor exited 1 when
    `keyspace_events = "require"` could not be met.
    """
    while pending := [t for t in tasks if not t.done()]:
        await asyncio.wait(pending, timeout=every)
        for t in pending:
            if not t.done():
                t.cancel()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:  # noqa: ASYNC109
    """True if `event` is set within `timeout` seconds.

    Not asyncio.wait_for, which on Python 3.11 loses a cancellation that races the event
    being set (gh-86296; see cancel_until_done). asyncio.timeout() lets it through.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, base: float = 0.1, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 20)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) something; a no-op without $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            # Never block the event loop on a receiver that stopped reading: a full
            # datagram queue would freeze the daemon inside its own watchdog ping.
            s.setblocking(False)
            s.connect(addr)
            s.send(message.encode())
        return True
    except OSError:  # includes BlockingIOError
        return False


class Daemon:
    def __init__(self, cfg: Config, *, install_signals: bool = True) -> None:
        self.cfg = cfg
        self.install_signals = install_signals
        self.metrics = Metrics()
        self.store = Store(cfg)
        self.rq = RqState(cfg.redis.url, socket_timeout=cfg.redis.socket_timeout_seconds)
        self.procs = Processes(
            on_signal=lambda sig: self.metrics.process_signals.labels(signal=sig).inc())
        self.reconciler = Reconciler(cfg, self.store, self.rq, self.procs, self.metrics)
        self.cancels = CancelProcessor(cfg, self.store, self.rq, self.procs, self.reconciler,
                                       self.metrics, on_cancelled=self.request_orphan_scan)
        self.watcher = PidWatcher(self._local_worker_exited)
        self.server: MetricsServer | None = None
        self.up = {"redis": False, "postgres": False}
        self.stopping = asyncio.Event()
        self._signals = 0
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._cancel_wake = asyncio.Event()
        self._sweep_wake = asyncio.Event()
        self._sweep_delay = 0.0
        self._ready = False
        self._events_live = False
        self._fallback = cfg.redis.keyspace_events == "off"
        self._config_forbidden_said = False
        self._reaper: asyncio.Task[None] | None = None
        self._remote_workers: set[str] = set()
        self.last_tick = time.monotonic()

    # -- health -------------------------------------------------------------------------------

    def set_up(self, backend: str, up: bool) -> None:
        was = self.up[backend]
        self.up[backend] = up
        self.metrics.backend_up.labels(backend=backend).set(1 if up else 0)
        if was and not up:
            log.warning("backend_down", backend=backend)
        elif up and not was:
            log.info("backend_up", backend=backend)

    def healthy(self) -> bool:
        return self.up["redis"] and self.up["postgres"]

    def _outage(self, exc: BackendUnavailable) -> None:
        self.set_up(exc.backend, False)

    # -- wake-ups -------------------------------------------------------------------------------

    def mark_dirty(self, rq_ids: Any, source: str) -> None:
        n = 0
        for rid in rq_ids:
            self._dirty.add(rid)
            n += 1
        if n:
            self.metrics.events.labels(source=source).inc(n)
            self._dirty_event.set()

    def request_sweep(self, delay: float = 0.0) -> None:
        self._sweep_delay = delay
        self._sweep_wake.set()

    def request_orphan_scan(self) -> None:
        # A burst of cancels becomes one scan.
        self.request_sweep(ORPHAN_SCAN_DEBOUNCE_SECONDS)

    def _local_worker_exited(self, name: str) -> None:
        jobs = set(self.reconciler.jobs_by_worker.get(name, set()))
        rec = self.reconciler.local_workers.pop(name, None)
        if rec is not None and rec.current_job:
            jobs.add(rec.current_job)
        log.info("local_worker_exited", worker=name, jobs=sorted(jobs))
        self.metrics.events.labels(source="local_worker").inc()
        # Re-read the worker hash to learn its current job, then reconcile it.
        asyncio.get_running_loop().create_task(self._after_worker_exit(name, jobs))

    async def _after_worker_exit(self, name: str, jobs: set[str]) -> None:
        try:
            fresh = await self.rq.read_workers([name])
            rec = fresh.get(name)
            if rec is not None and rec.current_job:
                jobs.add(rec.current_job)
        except BackendUnavailable as exc:
            self._outage(exc)
        for j in jobs:
            self._dirty.add(j)
        if jobs:
            self._dirty_event.set()

    def _watch_local_workers(self) -> None:
        for name, rec in list(self.reconciler.local_workers.items()):
            if self.watcher.watching(name):
                continue
            ident = self.procs.worker_identity(rec)
            if ident is None:
                continue  # already dead: the pass that saw it handles it
            self.watcher.watch(name, ident)

    async def discover_workers(self) -> None:
        names = await self.rq.worker_names()
        recs = await self.rq.read_workers(names)
        for name, rec in recs.items():
            if rec.exists and not rec.death and self.procs.is_local(rec):
                self.reconciler.local_workers[name] = rec
        self._watch_local_workers()

    # -- signals --------------------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            self._reload()
            return
        self._signals += 1
        if self._signals == 1:
            log.info("shutdown_requested", signal=sig.name)
            self.stopping.set()
        else:
            log.warning("shutdown_forced", signal=sig.name)
            os._exit(1)

    def _reload(self) -> None:
        try:
            new = load(None if self.cfg.source == "<defaults>" else self.cfg.source)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return
        # Only what is safe to change live: intervals and log level.
        self.cfg = replace(self.cfg, sweep=new.sweep, log=new.log)
        self.reconciler.cfg = replace(self.reconciler.cfg, sweep=new.sweep)
        logsetup.set_level(new.log.level)
        log.info("reloaded", sweep_interval=new.sweep.interval_seconds, log_level=new.log.level)
        self.request_sweep()

    # -- run ------------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if self.install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, self._on_signal, sig)
        host, port = self.cfg.metrics.host_port
        self.server = MetricsServer(self.metrics, self.healthy, host, port)
        await self.server.start()
        log.info("starting", version=__version__, instance=self.cfg.instance.name,
                 redis=redact(self.cfg.redis.url), postgres=redact(self.cfg.postgres.dsn),
                 metrics=f"http://{host}:{self.server.port}/metrics")
        try:
            try:
                if not await self._connect():
                    return 0
            except SchemaError as exc:
                # Not an outage: restarting cannot fix it (the unit does not restart on 2).
                log.error("schema_error", error=str(exc))
                return 2
            self.request_sweep()  # the start-up sweep
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._listen_loop(), name="listen"),
                    tg.create_task(self._keyspace_loop(), name="keyspace"),
                    tg.create_task(self._dirty_loop(), name="dirty"),
                    tg.create_task(self._cancel_loop(), name="cancel"),
                    tg.create_task(self._sweep_loop(), name="sweep"),
                    tg.create_task(self._watchdog_loop(), name="watchdog"),
                ]
                try:
                    await self.stopping.wait()
                    sd_notify("STOPPING=1")
                    # Stop taking work, then drain what is in flight, bounded.
                    for t in tasks:
                        t.cancel()
                finally:
                    # Reached on shutdown, and when a task failed (the group cancels us).
                    self._reaper = asyncio.get_running_loop().create_task(
                        cancel_until_done(tasks))
            drained = await self.cancels.drain(DRAIN_SECONDS)
            if not drained:
                log.warning("drain_timeout", seconds=DRAIN_SECONDS)
            with contextlib.suppress(BackendUnavailable):
                released = await self.store.release_claims()
                if released:
                    log.info("claims_released", count=released)
            return 0
        finally:
            self.watcher.close()
            with contextlib.suppress(Exception):
                await self.rq.close()
            with contextlib.suppress(Exception):
                await self.store.close()
            if self.server is not None:
                await self.server.close()
            log.info("stopped", instance=self.cfg.instance.name)

    async def _until_stopped(self, aw: Awaitable[Any], timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait for `aw` or for shutdown; True if shutdown came first."""
        stop = asyncio.ensure_future(self.stopping.wait())
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait({stop, task}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            return stop in done
        finally:
            for t in (stop, task):
                if not t.done():
                    t.cancel()

    async def _connect(self) -> bool:
        """Connect both backends, retrying with backoff until they answer or we are told to
        stop. Then: our own stale claims, keyspace config, a first sweep, READY=1."""
        backoff = Backoff(0.2, 30.0)
        while not self.stopping.is_set():
            try:
                if self.store.pool is None:
                    await self.store.connect()
                    async with translated(self.store.pool):
                        await self.store.verify_schema()
                self.set_up("postgres", True)
                await self.rq.ping()
                self.set_up("redis", True)
                break
            except BackendUnavailable as exc:
                self._outage(exc)
                delay = backoff.next()
                log.warning("connect_retry", backend=exc.backend, error=str(exc),
                            retry_in=round(delay, 2))
                if await self._until_stopped(asyncio.sleep(delay)):
                    return False
        if self.stopping.is_set():
            return False
        # A previous life of this instance may have died holding claims: take them back now
        # rather than waiting out the lease (instance names are unique per replica).
        released = await self.store.release_claims()
        if released:
            log.info("stale_claims_released", count=released)
        return True

    # -- sources ----------------------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        """LISTEN on a dedicated connection; reconnect, then sweep and pick up requests."""
        backoff = Backoff(0.2, 30.0)
        first = True
        while True:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.cfg.postgres.dsn, timeout=10)
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                await conn.add_listener(self.cfg.cancel.channel, self._on_notify)
                self.set_up("postgres", True)
                backoff.reset()
                # Requests inserted while we were not listening are in the table.
                self._cancel_wake.set()
                if not first:
                    log.info("listen_reconnected")
                    self.request_sweep()  # the start-up sweep is requested by run()
                first = False
                while not lost.is_set():
                    # asyncio.timeout, not wait_for: see wait_event().
                    await wait_event(lost, LISTEN_LIVENESS_SECONDS)
                    if not lost.is_set():
                        async with asyncio.timeout(10):
                            await conn.fetchval("SELECT 1")
                raise PostgresUnavailable("LISTEN connection terminated")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    asyncpg.exceptions.InternalClientError, TimeoutError,
                    PostgresUnavailable) as exc:
                self.set_up("postgres", False)
                delay = backoff.next()
                log.warning("listen_lost", error=str(exc) or type(exc).__name__,
                            retry_in=round(delay, 2))
                await asyncio.sleep(delay)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self.metrics.events.labels(source="cancel_notify").inc()
        self._cancel_wake.set()

    async def _ensure_keyspace(self) -> bool:
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
            from reconciler.rq_state import missing_keyspace_flags

            missing = missing_keyspace_flags(new)
            if missing:
                raise KeyspaceConfigError(
                    f"notify-keyspace-events={new!r} lacks {missing!r} and "
                    "redis.keyspace_events = \"require\"")
            return True
        except redis.exceptions.ResponseError as exc:
            if mode == "require":
                raise KeyspaceConfigError(f"cannot read notify-keyspace-events: {exc}") from exc
            if not self._config_forbidden_said:
                self._config_forbidden_said = True
                log.error("keyspace_config_forbidden", error=str(exc),
                          fallback_interval=self.cfg.sweep.fallback_interval_seconds,
                          hint="enable notify-keyspace-events 'Kghx' in your Redis provider")
            return False

    async def _keyspace_loop(self) -> None:
        backoff = Backoff(0.1, 30.0)
        while True:
            try:
                self._events_live = False
                await self.rq.ping()
                self.set_up("redis", True)
                if not await self._ensure_keyspace():
                    self._fallback = True
                    await asyncio.Event().wait()  # sweeps only, until cancelled
                self._fallback = False
                gen = self.rq.keyspace_events()
                try:
                    async for kind, ident, _event in gen:
                        if kind == "subscribed":
                            self._events_live = True
                            backoff.reset()
                            log.info("keyspace_subscribed", patterns=self.rq.keyspace_patterns())
                            continue
                        self._on_keyspace(kind, ident)
                finally:
                    await gen.aclose()
            except BackendUnavailable as exc:
                self._events_live = False
                self._outage(exc)
                delay = backoff.next()
                log.warning("keyspace_lost", error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                # After any reconnect: re-check the keyspace config (a restarted Redis lost
                # it), resubscribe, and sweep for what happened while we were deaf.
                self.request_sweep()
                continue
            backoff.reset()

    def _on_keyspace(self, kind: str, ident: str) -> None:
        if kind == "job":
            self.mark_dirty((ident,), "keyspace")
            return
        # A worker key changed (heartbeat, death, expiry, deletion): its started jobs.
        self.metrics.events.labels(source="keyspace").inc()
        jobs = self.reconciler.jobs_by_worker.get(ident)
        if jobs:
            self._dirty.update(jobs)
            self._dirty_event.set()
        if ident not in self.reconciler.local_workers and ident not in self._remote_workers:
            # Maybe a new worker on this host: learn it and watch its pid.
            asyncio.get_running_loop().create_task(self._learn_worker(ident))

    async def _learn_worker(self, name: str) -> None:
        try:
            recs = await self.rq.read_workers([name])
        except BackendUnavailable:
            return
        rec = recs.get(name)
        if rec is None or not rec.exists or rec.death:
            return
        if self.procs.is_local(rec):
            self.reconciler.local_workers[name] = rec
            self._watch_local_workers()
        elif len(self._remote_workers) < 100_000:
            self._remote_workers.add(name)  # its heartbeats need no lookup

    # -- workers ----------------------------------------------------------------------------------

    async def _dirty_loop(self) -> None:
        backoff = Backoff(0.1, 10.0)
        while True:
            await self._dirty_event.wait()
            await asyncio.sleep(COALESCE_SECONDS)  # let a burst gather into one pass
            self._dirty_event.clear()
            batch: list[str] = []
            while self._dirty and len(batch) < MAX_BATCH:
                batch.append(self._dirty.pop())
            if self._dirty:
                self._dirty_event.set()
            if not batch:
                continue
            try:
                report = await self.reconciler.reconcile_rq_ids(batch)
                backoff.reset()
                self._after_pass(report)
            except BackendUnavailable as exc:
                self._outage(exc)
                self._dirty.update(batch)  # nothing lost: retry after the backoff
                self._dirty_event.set()
                await asyncio.sleep(backoff.next())

    def _forget_ended(self, changes: Sequence[RowChange]) -> None:
        for ch in changes:
            # Forget a horse only once RQ says its job ended: an orphaned row is terminal
            # while its horse still runs and must still be stopped.
            if ch.rq_status not in ("", "started"):
                rq_id = ch.detail.get("rq_id")
                if isinstance(rq_id, str):
                    self.procs.forget(rq_id)

    def _after_pass(self, report: PassReport) -> None:
        self._forget_ended(report.changes)
        if report.horse_stops:
            asyncio.get_running_loop().create_task(
                self.cancels.stop_for_reconcile(report.horse_stops))
        self._watch_local_workers()
        if self.reconciler.untracked:
            pending, self.reconciler.untracked = self.reconciler.untracked, {}
            asyncio.get_running_loop().create_task(self._track_horses(pending))

    async def _track_horses(self, pending: dict[str, tuple[Any, Any]]) -> None:
        """Prove the horses of just-started local jobs: bounded retries, one batched worker
        read per round, and a job is dropped as soon as its worker no longer names it (it
        ended, or the worker moved on or died: nothing left to prove)."""
        for delay in (0.01, 0.05, 0.2, 1.0):
            await asyncio.sleep(delay)
            try:
                fresh = await self.rq.read_workers({name for name, _ in pending.values()})
                candidates = {}
                for rq_id, (name, started_at) in list(pending.items()):
                    rec = fresh.get(name)
                    if rec is None or not rec.exists or rec.current_job != rq_id:
                        del pending[rq_id]
                        continue
                    cand = self.procs.find_horse(rec, rq_id, started_at)
                    if cand is not None:
                        candidates[rq_id] = (name, cand)
                if candidates:
                    await self.reconciler.confirm_horses(candidates)
                    for rq_id in candidates:
                        pending.pop(rq_id, None)
            except BackendUnavailable:
                return  # the next pass that sees the job tries again
            if not pending:
                return

    async def _cancel_loop(self) -> None:
        backoff = Backoff(0.2, 10.0)
        while True:
            # Leases of dead replicas expire without a NOTIFY: look again now and then.
            await wait_event(self._cancel_wake, self.cfg.cancel.lease_seconds)
            self._cancel_wake.clear()
            try:
                await self.cancels.process_pending()
                backoff.reset()
            except BackendUnavailable as exc:
                self._outage(exc)
                await asyncio.sleep(backoff.next())
                self._cancel_wake.set()

    def _interval(self) -> float:
        if self._fallback or not self._events_live:
            return min(self.cfg.sweep.interval_seconds, self.cfg.sweep.fallback_interval_seconds)
        return self.cfg.sweep.interval_seconds

    async def _sweep_loop(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while True:
            if not await wait_event(self._sweep_wake, self._interval()):
                self.metrics.events.labels(source="timer").inc()
            if self._sweep_wake.is_set() and self._sweep_delay > 0:
                delay, self._sweep_delay = self._sweep_delay, 0.0
                await asyncio.sleep(delay)
            self._sweep_wake.clear()
            try:
                await self.sweep_once()
                backoff.reset()
            except BackendUnavailable as exc:
                self._outage(exc)
                self.metrics.sweeps.labels(result="failed").inc()
                log.warning("sweep_failed", error=str(exc))
                await asyncio.sleep(backoff.next())
                self._sweep_wake.set()

    async def sweep_once(self) -> PassReport | None:
        async with self.store.sweep_lock() as got:
            if not got:
                log.info("sweep_skipped", why="another replica holds the sweep lock")
                # Table-wide gauges belong to the replica that sweeps; ours would go stale.
                self.metrics.jobs_stuck.set(0)
                self.metrics.oldest_active_age.set(0)
                self.metrics.jobs_active.clear()
                self._notify_ready()
                return None
            await self.discover_workers()
            report = await self.reconciler.sweep(on_changes=self._forget_ended)
            # Reported while still under the lock: whoever takes the lock next (a replica,
            # an operator's one-shot sweep) finds this sweep's log line and metrics out.
            self.set_up("postgres", True)
            self.set_up("redis", True)
            m = self.metrics
            result = "breaker" if report.breaker_open else "ok"
            m.sweeps.labels(result=result).inc()
            m.sweep_duration.observe(report.duration)
            m.last_sweep_success.set(time.time())
            m.orphan_breaker_open.set(1 if report.breaker_open else 0)
            for status, n in report.counts.items():
                m.jobs_active.labels(status=status).set(n)
            m.jobs_stuck.set(report.stuck)
            m.oldest_active_age.set(report.oldest_age)
            log.info("sweep_done", checked=report.checked, changed=report.changed,
                     lost_races=report.lost_races, breaker_open=report.breaker_open,
                     seconds=round(report.duration, 3))
        self._after_pass(report)
        self._cancel_wake.set()  # pending requests are part of every sweep
        self._notify_ready()
        return report

    def _notify_ready(self) -> None:
        if not self._ready:
            self._ready = True
            sd_notify("READY=1\nSTATUS=reconciling")
            log.info("ready", events=not self._fallback)

    async def _watchdog_loop(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        interval = int(usec) / 2e6 if usec and usec.isdigit() else None
        while True:
            self.last_tick = time.monotonic()
            # Pet only while the loop is responsive and a backend outage is not permanent
            # (outages are retried; systemd should not restart us for them).
            if interval is not None and self._ready:
                sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval or 3600.0)


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
