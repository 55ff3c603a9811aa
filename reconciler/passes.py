"""The daemon's consumers of wake-ups: event passes over dirty ids, the cancel processor's
loop, and the sweep schedule; plus what every pass leaves to do afterwards (horses to
stop, horses to prove, local workers to watch).

Each has `async run()` for the supervisor's TaskGroup. A backend outage is retried with
backoff and shows in backend_up; work taken when it struck is put back, never lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from reconciler.aio import Backoff, TaskSet, retry_forever, wait_event
from reconciler.cancel import CancelProcessor
from reconciler.config import Config
from reconciler.errors import BackendUnavailable, DataRejected
from reconciler.health import Health, Wakeups
from reconciler.jobs_table import RowChange, Store
from reconciler.metrics import Metrics
from reconciler.model import WAITING
from reconciler.orphans import Orphans
from reconciler.reconcile import PassReport, Reconciler
from reconciler.rq_state import RqState
from reconciler.stop import Stopper
from reconciler.sweep import Sweeper
from reconciler.workers import Workers
from reconciler.workqueue import WorkQueue

log = structlog.get_logger("reconciler.passes")


# Rows another transaction held locked are read again after this long: soon enough that
# the table follows once the app commits, slow enough not to spin on a long transaction.
LOCKED_RETRY_SECONDS = 0.5
# "Not found" answers that arrive by events are judged together, by a sweep this long
# after the first of them: the sweep's mass-orphan breaker and its existence re-check.
NOT_FOUND_WINDOW_SECONDS = 1.0


class Aftercare:
    """What a pass's report leaves to do; each follow-up is a task with an owner."""

    def __init__(self, rq: RqState, workers: Workers, stopper: Stopper, tasks: TaskSet,
                 queue: WorkQueue) -> None:
        self.rq = rq
        self.workers, self.stopper, self.tasks, self.queue = workers, stopper, tasks, queue
        self._later: set[str] = set()
        # Orphans to requeue or fail (orphans.py), where the daemon runs them.
        self.orphans: Orphans | None = None

    def forget_ended(self, changes: Sequence[RowChange]) -> None:
        self.workers.forget_ended(
            (rq_id, ch.rq_status) for ch in changes
            if isinstance(rq_id := ch.detail.get("rq_id"), str))

    def __call__(self, report: PassReport) -> None:
        self.forget_ended(report.changes)
        if report.retry_now:
            # A lost race is a wake-up: the row moved under us, read it fresh at once.
            self.queue.add(report.retry_now, "lost_race")
        if report.retry_later:
            self._retry_later(report.retry_later)
        if report.horse_stops:
            self.stopper.stop_for_reconcile(report.horse_stops)
        if report.rq_cancels:
            self.tasks.spawn(self.cancel_waiting(report.rq_cancels), "cancel-waiting")
        if report.orphans and self.orphans is not None:
            self.orphans.take(report.orphans)
        self.workers.watch_local()
        if self.workers.untracked:
            self.tasks.spawn(self.workers.track(), "track-horses")


    async def cancel_waiting(self, rq_ids: list[str]) -> None:
        """Cancel waiting RQ jobs whose row is cancelled, then look at them again: a worker
        that dequeued one a moment before runs it anyway, and the next pass stops it."""
        for rid in rq_ids:
            try:
                res = await self.rq.cancel_job(rid, only_from=WAITING)
            except BackendUnavailable as exc:
                log.warning("rq_cancel_interrupted", rq_id=rid, error=str(exc))
                break
            log.info("rq_job_cancelled", rq_id=rid, result=res, why="cancelled row")
        self.queue.add(rq_ids, "intent")

    def _retry_later(self, rq_ids: list[str]) -> None:
        fresh = [r for r in rq_ids if r not in self._later]
        if not fresh:
            return
        first = not self._later
        self._later.update(fresh)
        if first:
            self.tasks.spawn(self._requeue_later(), "locked-rows")

    async def _requeue_later(self) -> None:
        await asyncio.sleep(LOCKED_RETRY_SECONDS)
        ids, self._later = self._later, set()
        self.queue.add(ids, "locked_retry")


# How long a cancelled row is watched for its RQ job to appear (an app that enqueues, or
# stores the RQ id on its row, a moment after its user clicked Cancel), and how often its
# row is read meanwhile: often at first, when such races happen, then rarely.
INTENT_WATCH_SECONDS = 30.0
INTENT_POLL_FIRST = 0.01
INTENT_POLL_CAP = 1.0
INTENT_WATCH_MAX = 10_000


class IntentWatch:
    """Cancelled rows whose RQ job is not known to have ended: their RQ id (once the row
    has one) is marked dirty until the watch runs out, so the event path cancels a job
    that appears waiting and stops one that a worker took. No events reach us for a row
    that gets its RQ id after the job was enqueued: hence this bounded look, which runs
    only while something is watched."""

    def __init__(self, cfg: Config, store: Store, queue: WorkQueue, health: Health) -> None:
        self.store, self.queue, self.health = store, queue, health
        self.cancelled = cfg.jobs.statuses.cancelled
        self._until: dict[Any, float] = {}
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._until)

    def watch(self, job_id: Any) -> None:
        if len(self._until) >= INTENT_WATCH_MAX:
            return  # the sweep's look at recently cancelled rows is the backstop
        self._until[job_id] = time.monotonic() + INTENT_WATCH_SECONDS
        self._wake.set()

    async def run(self) -> None:
        await retry_forever(self.one_round, event="intent_watch_retry", backoff=Backoff(0.2, 10.0),
                            on_outage=self.health.outage)

    async def one_round(self) -> None:
        await self._wake.wait()
        self._wake.clear()
        delay = INTENT_POLL_FIRST
        while self._until:
            now = time.monotonic()
            for job_id in [j for j, t in self._until.items() if t <= now]:
                del self._until[job_id]
            rows = await self.store.rows_by_ids(list(self._until))
            # Rows no longer cancelled (the app reset one) are not ours to watch.
            for r in rows:
                if r.row.status != self.cancelled:
                    self._until.pop(r.row.id, None)
            rq_ids = [r.row.rq_id for r in rows if r.row.rq_id and r.row.status == self.cancelled]
            if rq_ids:
                self.queue.add(rq_ids, "intent")
            if self._wake.is_set():  # a new watch: look often again
                self._wake.clear()
                delay = INTENT_POLL_FIRST
            await wait_event(self._wake, delay)
            delay = min(delay * 2, INTENT_POLL_CAP)


class EventPasses:
    """Dirty ids, a coalesced batch at a time, through one reconcile pass each."""

    def __init__(self, queue: WorkQueue, reconciler: Reconciler, health: Health,
                 wake: Wakeups, after: Callable[[PassReport], None]) -> None:
        self.queue, self.reconciler, self.health, self.after = queue, reconciler, health, after
        self.wake = wake

    async def run(self) -> None:
        await retry_forever(self.one_batch, event="event_pass_retry", backoff=Backoff(0.1, 10.0),
                            on_outage=self.health.outage)

    async def one_batch(self) -> None:
        batch = await self.queue.batch()
        try:
            report = await self.reconciler.reconcile_rq_ids(batch)
        except BackendUnavailable:
            self.queue.requeue(batch)  # nothing lost: retried after the backoff
            raise
        except DataRejected as exc:
            # A value the database refused outside the batch UPDATE (which isolates its own
            # poison): these ids wait for the sweep rather than stop every event pass.
            log.error("event_pass_rejected", error=str(exc), pg_error=exc.pg_error,
                      rq_ids=len(batch))
            return
        # Both backends answered this pass: say so now, not at the next sweep (which after
        # an outage may be a backoff of up to half a minute away).
        self.health.set_up("postgres", True)
        self.health.set_up("redis", True)
        if report.not_found_held:
            log.info("not_found_held", count=report.not_found_held,
                     judged_in=NOT_FOUND_WINDOW_SECONDS)
        if report.gone_held:
            # Only Redis says their workers are gone: judged together too, under the
            # worker breaker (a failover or a server clock jump drops every worker hash).
            log.info("worker_gone_held", count=report.gone_held,
                     judged_in=NOT_FOUND_WINDOW_SECONDS)
        if report.not_found_held or report.gone_held:
            self.wake.request_sweep(NOT_FOUND_WINDOW_SECONDS)
        self.after(report)


class CancelLoop:
    """Pending cancel requests, whenever the doorbell rings, and every lease period (the
    leases of a dead replica's claims expire without a NOTIFY)."""

    def __init__(self, cfg: Config, cancels: CancelProcessor, wake: Wakeups, health: Health) -> None:
        self.cfg, self.cancels, self.wake, self.health = cfg, cancels, wake, health

    async def run(self) -> None:
        await retry_forever(self.one_round, event="cancel_loop_retry", backoff=Backoff(0.2, 10.0),
                            on_outage=self.health.outage, after_outage=self.wake.cancel.set)

    async def one_round(self) -> None:
        await wait_event(self.wake.cancel, self.cfg.cancel.lease_seconds)
        self.wake.cancel.clear()
        await self.cancels.process_pending()


class Sweeps:
    """Every sweep.interval_seconds (the fallback interval while keyspace events are not
    flowing), and whenever one is requested; one replica at a time (the sweep lock)."""

    def __init__(self, cfg: Config, store: Store, reconciler: Reconciler, workers: Workers,
                 health: Health, wake: Wakeups, metrics: Metrics, after: Aftercare,
                 events_live: Callable[[], bool], on_swept: Callable[[], None]) -> None:
        self.cfg, self.store, self.reconciler, self.workers = cfg, store, reconciler, workers
        self.sweeper = Sweeper(reconciler)
        self.health, self.wake, self.metrics, self.after = health, wake, metrics, after
        self.events_live = events_live
        self.on_swept = on_swept

    def interval(self) -> float:
        s = self.cfg.sweep
        if not self.events_live():
            return min(s.interval_seconds, s.fallback_interval_seconds)
        return s.interval_seconds

    async def run(self) -> None:
        await retry_forever(self.one_round, event="sweep_failed", backoff=Backoff(0.5, 30.0),
                            on_outage=self._failed, after_outage=self.wake.request_sweep)

    def _failed(self, exc: BackendUnavailable) -> None:
        self.health.outage(exc)
        self.metrics.sweeps.labels(result="failed").inc()

    async def _page_done(self, page: PassReport) -> None:
        self.after(page)

    async def one_round(self) -> None:
        if not await self.wake.sweep_due(self.interval()):
            self.metrics.events.labels(source="timer").inc()
        await self.sweep_once()

    async def sweep_once(self) -> PassReport | None:
        m = self.metrics
        async with self.store.sweep_lock() as got:
            if not got:
                log.info("sweep_skipped", why="another replica holds the sweep lock")
                # Table-wide gauges belong to the replica that sweeps; ours would go stale.
                m.jobs_stuck.set(0)
                m.oldest_active_age.set(0)
                m.jobs_active.clear()
                self.on_swept()
                return None
            await self.workers.discover()
            # Each page's follow-ups (horses to stop, RQ jobs to cancel, rows to read again)
            # are started as the page is applied, not gathered: a sweep over a million rows
            # keeps none of them.
            report = await self.sweeper.sweep(on_page=self._page_done)
            # Reported while still under the lock: whoever takes the lock next (a replica,
            # an operator's one-shot sweep) finds this sweep's log line and metrics out.
            self.health.set_up("postgres", True)
            self.health.set_up("redis", True)
            breaker = report.breaker_open or report.worker_breaker_open
            m.sweeps.labels(result="breaker" if breaker else "ok").inc()
            m.sweep_duration.observe(report.duration)
            m.last_sweep_success.set(time.time())
            m.orphan_breaker_open.set(1 if report.breaker_open else 0)
            m.worker_breaker_open.set(1 if report.worker_breaker_open else 0)
            for status, n in report.counts.items():
                m.jobs_active.labels(status=status).set(n)
            m.jobs_stuck.set(report.stuck)
            m.oldest_active_age.set(report.oldest_age)
            m.queues_unserved.set(len(report.unserved))
            if report.unserved:
                log.warning("queues_unserved", queues=dict(list(report.unserved.items())[:20]),
                            count=len(report.unserved),
                            hint="rows wait on queues no live worker listens to")
            log.info("sweep_done", checked=report.checked, changed=report.changed,
                     lost_races=report.lost_races, breaker_open=report.breaker_open,
                     worker_breaker_open=report.worker_breaker_open,
                     seconds=round(report.duration, 3))
        self.after(report)
        self.wake.cancel.set()  # pending requests are part of every sweep
        self.on_swept()
        return report
