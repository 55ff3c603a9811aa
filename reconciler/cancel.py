"""The cancel flow: claim -> stop -> wait for RQ to agree -> outcome -> NOTIFY.

A request is durable; NOTIFY only wakes us. Claims are leases taken with SKIP LOCKED, so
any number of replicas share the work and a daemon that dies mid-cancel loses its claim
to whoever comes next. Many requests for one job get one cancellation and one outcome.
Stopping a running horse is the stop ladder's job (stop.py). Must never decide on data
it could not read: an outage leaves the claim to expire and be taken again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from reconciler.aio import TaskSet, cancel_until_done
from reconciler.config import Config
from reconciler.errors import BackendUnavailable, DataRejected, ReconcilerError, RedisUnavailable
from reconciler.jobs_table import Store
from reconciler.metrics import Metrics
from reconciler.model import WAITING, ActiveRow, CancelIntent, RqStatus
from reconciler.reconcile import PassReport, Reconciler
from reconciler.replicas_table import REPLICA_STALE_SECONDS
from reconciler.requests_table import CancelRequest
from reconciler.rq_state import RqState
from reconciler.stop import POLL_SECONDS, WORKER_REAP_SECONDS, Stopper, StopResult, Target

log = structlog.get_logger("reconciler.cancel")
T = TypeVar("T")

# How long a cancel waits for another transaction to let go of its row before it reports
# the row as it stands.
LOCKED_ROW_WAIT_SECONDS = 2.0


class CancelProcessor:
    def __init__(self, cfg: Config, store: Store, rq: RqState, stopper: Stopper,
                 reconciler: Reconciler, metrics: Metrics,
                 on_cancelled: Callable[[], None] | None = None,
                 watch: Callable[[Any], None] | None = None,
                 hold: Callable[[str], AbstractContextManager[None]] | None = None) -> None:
        """`on_cancelled`: after each cancelled outcome (the orphan scan). `watch(job_id)`:
        keep an eye on a cancelled row whose RQ job is not known to have ended yet.
        `hold(rq_id)`: while a cancel of it is in flight, events about it wait
        (WorkQueue.held)."""
        self.cfg = cfg
        self.store = store
        self.rq = rq
        self.stopper = stopper
        self.reconciler = reconciler
        self.metrics = metrics
        self._on_cancelled = on_cancelled
        self._watch = watch
        # Called when a cancel ends: requests left pending for want of a slot are claimed.
        self._slot_free: Callable[[], None] | None = None
        # Cancels carried out at once (cancel.concurrency); the rest wait their turn.
        self._slots = cfg.cancel.concurrency
        self._sem = asyncio.Semaphore(self._slots)
        self._hold = hold or (lambda _rq_id: contextlib.nullcontext())
        self._tasks = TaskSet("cancel")
        self._job_locks: dict[Any, tuple[asyncio.Lock, int]] = {}

    @property
    def busy(self) -> int:
        return len(self._tasks)

    async def process_pending(self) -> int:
        """Claim pending (or lease-expired) requests, as many as can start now, and start
        their jobs' cancels. The rest stay pending, free for another replica, and are
        claimed here when a slot frees up: a lease never runs out while its request
        waits for a slot. Requests handed to this replica are the exception: they are
        claimed however busy it is, and wait here for a slot with their leases kept (a
        live owner keeps its hand-overs; only a dead or silent one's fall back to
        stop-job elsewhere)."""
        total = 0
        lease = self.cfg.cancel.lease_seconds
        while (free := self._slots - len(self._tasks)) > 0:
            limit = min(100, free)
            claims = await self.store.requests.claim(lease, limit=limit)
            if not claims:
                return total
            total += len(claims)
            self._spawn(claims)
            if len(claims) < limit:
                # Nothing more was pending: asking again would only cost the cancel just
                # started a round trip's worth of the pool and the loop.
                return total
        # Every slot is busy: what another replica handed us is queued here all the same.
        handed = await self.store.requests.claim_handed(lease)
        if handed:
            log.info("cancel_handovers_queued", requests=[r.id for r in handed],
                     busy=len(self._tasks))
            self._spawn(handed)
        return total + len(handed)

    def _spawn(self, claims: list[CancelRequest]) -> None:
        by_job: dict[Any, list[CancelRequest]] = defaultdict(list)
        for c in claims:
            by_job[c.job_id].append(c)
        for job_id, reqs in by_job.items():
            self._tasks.spawn(self._guarded(job_id, reqs), f"job:{job_id}")

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait for in-flight cancels; True if all finished in time."""
        return await self._tasks.drain(timeout)

    async def cancel_all(self) -> None:
        await self._tasks.cancel_all()

    async def _guarded(self, job_id: Any, reqs: list[CancelRequest]) -> None:
        # Requests for one job claimed in separate rounds run one after the other: the
        # later ones then find the row cancelled and report the same outcome, instead of
        # racing the first flow through RQ and the row.
        lock, users = self._job_locks.get(job_id, (asyncio.Lock(), 0))
        self._job_locks[job_id] = (lock, users + 1)
        waited = lock.locked()
        try:
            async with contextlib.AsyncExitStack() as held:
                keeping = None
                if self._sem.locked() or waited:
                    # Queued behind busy slots (or this job's earlier flow): the claims are
                    # kept ours meanwhile, so that nobody takes them for abandoned.
                    keeping = asyncio.create_task(self._keep_leases([r.id for r in reqs]))
                try:
                    await held.enter_async_context(self._sem)
                    await held.enter_async_context(lock)
                finally:
                    if keeping is not None:
                        await cancel_until_done([keeping])
                await self._run(job_id, reqs, fresh_row=waited)
        finally:
            lock, users = self._job_locks[job_id]
            if users <= 1:
                del self._job_locks[job_id]
            else:
                self._job_locks[job_id] = (lock, users - 1)
            if self._slot_free is not None:
                self._slot_free()

    def _stopped_meanwhile(self, job_id: Any, rq_id: str | None,
                           handed_to: str | None) -> dict[str, Any]:
        """The outcome of a request whose row the event path cancelled first (it acts on the
        request as an intent): the signals of the stop it made, and which path that was."""
        stop = self.stopper.recent.get(rq_id) if rq_id else None
        signals = list(stop.signals) if stop is not None else []
        detail = _cancelled_detail(job_id, rq_cancelled=False, signals=signals)
        detail["path"] = "stop-job" if signals and signals[0] != "SIGTERM" else "local"
        detail["instance"] = self.cfg.instance.name
        if handed_to and handed_to != self.cfg.instance.name:
            detail["handover"] = f"{handed_to} did not take it; stopped by {self.cfg.instance.name}"
        return detail

    async def _keep_leases(self, ids: list[int]) -> None:
        lease = self.cfg.cancel.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                await self.store.requests.extend_lease(ids, lease)
            except BackendUnavailable as exc:
                log.warning("cancel_lease_not_extended", requests=ids, error=str(exc))

    async def _run(self, job_id: Any, reqs: list[CancelRequest], *, fresh_row: bool) -> None:
        structlog.contextvars.bind_contextvars(job_id=str(job_id))
        try:
            await self.cancel_job(job_id, reqs, fresh_row=fresh_row)
        except BackendUnavailable as exc:
            # The claim stays ours until its lease ends; then it is retried (here or by
            # another replica). Nothing was decided on missing data.
            log.warning("cancel_interrupted", error=str(exc), requests=[r.id for r in reqs])
        except DataRejected as exc:
            # Something this job's data carries that the database refuses: retrying cannot
            # help, so the request gets an outcome that says so.
            log.error("cancel_rejected", error=str(exc), requests=[r.id for r in reqs])
            with contextlib.suppress(ReconcilerError):
                await self._finish(reqs, "failed", {
                    "success": False,
                    "message": f"Job {job_id} could not be cancelled: the database refused "
                               f"a value ({exc.pg_error})"})
        finally:
            structlog.contextvars.unbind_contextvars("job_id")

    async def cancel_job(self, job_id: Any, reqs: list[CancelRequest], *,
                         fresh_row: bool = False) -> None:
        """`fresh_row`: read the row again rather than trust the claim's reading (another
        flow for the same job ran meanwhile)."""
        s = self.cfg.jobs.statuses
        ids = [r.id for r in reqs]
        first = reqs[0]
        intent = CancelIntent(first.requested_by, first.reason, acting=True)
        # The row as the claim read it a moment ago; every change to it is guarded by that
        # status, and the row is read afresh wherever a pass decides on RQ's new word.
        rows = [first.row] if first.row is not None and not fresh_row \
            else await self.store.rows_by_ids([job_id])
        if not rows:
            await self._finish(reqs, "failed", {"success": False,
                               "message": f"Job {job_id} no longer exists in {self.cfg.jobs.table}"})
            return
        row = rows[0].row
        if row.status in s.terminal:
            if row.status == s.cancelled:
                prior = await self.store.requests.previous_cancel_detail(job_id)
                if prior is not None:
                    detail = prior
                    detail["duplicate"] = True
                else:
                    detail = self._stopped_meanwhile(job_id, row.rq_id, reqs[0].handed_to)
                await self._finish(reqs, "cancelled", detail)
            else:
                await self._finish(reqs, "already_finished", {
                    "success": False, "status": row.status,
                    "message": f"Job {job_id} already {row.status}"})
            return
        log.info("cancel_started", requests=ids, rq_id=row.rq_id, status=row.status)
        with self._hold(row.rq_id) if row.rq_id else contextlib.nullcontext():
            await self._cancel_active(job_id, reqs, rows, intent)

    async def _cancel_active(self, job_id: Any, reqs: list[CancelRequest], rows: list[ActiveRow],
                             intent: CancelIntent, *, again: bool = True) -> None:
        """Cancel the active row `rows[0]`: its RQ job cancelled or its horse stopped,
        then the row and the outcome written. `again`: the flow may start over once, if
        the row turns out to have got its RQ id meanwhile."""
        s = self.cfg.jobs.statuses
        ids = [r.id for r in reqs]
        row = rows[0].row
        rq_cancelled = False
        stop = StopResult()
        path: dict[str, Any] = {"path": "local", "instance": self.cfg.instance.name}
        rq_said = "no RQ job id"
        seen: str | None = None  # what RQ said of the job at first look (None: no RQ id)
        settle: set[str] = set()
        marking: asyncio.Task[str] | None = None
        if row.rq_id:
            jobs = await self.rq.read_jobs([row.rq_id])
            job = jobs[row.rq_id]
            seen = job.raw_status or job.status.value
            if job.status is RqStatus.MISSING and (why := await self.rq.not_authoritative()):
                # A loading or syncing Redis is no witness at all: an outage, retried.
                raise RedisUnavailable(f"{why}: not believed about missing jobs")
            if job.status is RqStatus.MISSING and not await self.rq.workers_registered():
                # "Not found" proves the job ended only in the Redis the workers use. With
                # no worker registered here either, this may be the wrong db or key prefix
                # and the job may run on: nothing was stopped, so the cancel failed and the
                # row is left as it is (a later request, once fixed, can cancel it).
                await self._finish(reqs, "failed", {
                    "success": False, **path, "rq_status": seen,
                    "message": f"Job {job_id} was not cancelled: RQ job {row.rq_id} is not "
                               f"in this Redis ({self.rq.where()}) and no RQ worker is "
                               f"registered there either ({self.rq.keys.workers} is empty): "
                               f"check that redis.url's db and redis.key_prefix are the "
                               f"workers'; the row is left {row.status}"})
                return
            if job.status in WAITING:
                res = await self.rq.cancel_job(row.rq_id, only_from=WAITING)
                rq_cancelled = res == "canceled"
                # A worker may have dequeued it a moment before: then RQ's cancel does not
                # stop it, and we must.
                job = (await self.rq.read_jobs([row.rq_id]))[row.rq_id]
            # Or it had, and its horse has not marked it started yet: RQ says "canceled",
            # but the job is about to run. Wait for the horse rather than believe it.
            deadline = time.monotonic() + WORKER_REAP_SECONDS
            while job.in_flight and not job.worker_name and time.monotonic() < deadline:
                await asyncio.sleep(POLL_SECONDS)
                job = (await self.rq.read_jobs([row.rq_id]))[row.rq_id]
            if job.status is RqStatus.CANCELED and job.in_flight and not job.worker_name:
                # The worker that took it has not started it within WORKER_REAP_SECONDS
                # (it may have died holding it). RQ says canceled: the cancel stands. If
                # that worker starts it after all, the cancelled row's horse is stopped
                # again (the reconcile table's last rule).
                settle.add(row.rq_id)
            # In flight with a worker: RQ says "canceled" over a running horse.
            elif job.status is RqStatus.STARTED or job.in_flight:
                routed = await self._route(reqs, row.rq_id, job.worker_name)
                if routed is None:
                    return  # handed to the replica on the job's host: it writes the outcome
                path, target = routed
                stop = await self._leased(ids, self.stopper.stop(
                    row.rq_id, job.worker_name, job.started_at, target=target))
                job = stop.job or (await self.rq.read_jobs([row.rq_id]))[row.rq_id]
            elif (joined := await self._leased(ids, self.stopper.joined(row.rq_id))
                  if self.stopper.stopping(row.rq_id)
                  else self.stopper.recent.get(row.rq_id)) is not None:
                # The event path saw this request's intent and stopped the horse (the
                # reconcile table's cancel rule), or is stopping it: the job reads ended
                # while that stop waits for the worker. Report those signals, not none.
                stop = joined
                # ... and told RQ the job was canceled, once it had stopped it.
                rq_cancelled = stop.stopped and job.status is RqStatus.CANCELED
            if stop.stopped and job.status in (RqStatus.FAILED, RqStatus.STOPPED):
                # Make RQ say what happened: the job was canceled, not failed. Done beside
                # the row's reconcile, which decides `cancelled` on either word. (Canceled
                # already: the event path's stop for this request marked it first.)
                marking = asyncio.create_task(self.rq.cancel_job(
                    row.rq_id, only_from=(RqStatus.FAILED, RqStatus.STOPPED, RqStatus.CANCELED)))
        if row.rq_id and stop.stopped and stop.job is not None:
            # This flow stopped the run and saw its worker record the end. RQ's "canceled"
            # over a job its worker still lists (our own marking, racing the worker's
            # bookkeeping) is that ended run, not one about to start.
            settle.add(row.rq_id)
        report: PassReport | None = None
        try:
            if (stop.job is not None and stop.job.status is not RqStatus.STARTED
                    and not stop.job.in_flight):
                # The job as its worker recorded the end, read a moment ago, and the row as
                # read above (its change is guarded by that status): nothing to read again.
                report = await self.reconciler.reconcile_reading(
                    rows, {stop.job.id: stop.job}, {job_id: intent})
                if report.lost_races or not any(c.job_id == job_id for c in report.changes):
                    report = None  # the row moved meanwhile: read both sides afresh
            if report is None:
                report = await self.reconciler.reconcile_job_ids(
                    [job_id], intents={job_id: intent}, settle=settle)
            # Another transaction holds the row (a replica's event pass for the same job,
            # most often, for a few ms): wait for it rather than report on a status that
            # is about to change.
            # (10 ms, doubling to 200 ms: an app transaction that sits on the row for the
            # whole wait costs a dozen passes, not two hundred.)
            # A change that lost a race (an event pass moved the row, queued to running,
            # between this pass's read and its write) is decided again at once, on both
            # sides read afresh: the status it leaves is what the outcome reports.
            deadline = time.monotonic() + LOCKED_ROW_WAIT_SECONDS
            pause = POLL_SECONDS
            while ((report.lost_races or row.rq_id in report.retry_later)
                   and time.monotonic() < deadline):
                if not report.lost_races:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.2)
                report = await self.reconciler.reconcile_job_ids(
                    [job_id], intents={job_id: intent}, settle=settle)
        finally:
            if marking is not None:
                rq_cancelled = (await marking) in ("canceled", "already_canceled")
        if row.rq_id in report.retry_later:
            # Held longer than that (an app transaction sits on it): no outcome yet. The
            # requests stay claimed and are carried out again when their lease ends; their
            # intent meanwhile holds for every pass that reads the row.
            log.warning("cancel_row_locked", requests=[r.id for r in reqs],
                        waited_seconds=LOCKED_ROW_WAIT_SECONDS)
            return
        for rid in report.rq_cancels:
            # The job showed up waiting in RQ only now (enqueued after the cancel); or (not
            # this row's) a deferred job the same pass found can never run.
            done = (await self.rq.cancel_job(rid, only_from=WAITING)) == "canceled"
            rq_cancelled = rq_cancelled or (done and rid == row.rq_id)
        # The row's status as this pass left it, if it changed it; else read it.
        applied = [c.to_status for c in report.changes if c.job_id == job_id]
        status = applied[-1] if applied else await self.store.job_status(job_id)
        if again and status in s.active and any(h.job_id == job_id for h in report.horse_stops):
            # A worker started the job while this flow looked at it missing or waiting
            # (the app enqueued it, or stored the row's RQ id, a moment after the cancel):
            # cancel it as it is now, the same way, rather than report a cancel that could
            # not stop anything.
            fresh = await self.store.rows_by_ids([job_id])
            if fresh and fresh[0].row.rq_id:
                with self._hold(fresh[0].row.rq_id):
                    await self._cancel_active(job_id, reqs, fresh, intent, again=False)
                return
        if status == s.cancelled and not stop.stopped and self._watch is not None:
            # The intent holds until RQ agrees: a job enqueued (or an RQ id stored on the
            # row) after this moment is cancelled, or stopped, when it appears.
            self._watch(job_id)
        if status == s.cancelled and row.rq_id and self.cfg.cancel.dependents == "enqueue":
            # RQ's Job.cancel(enqueue_dependents=True): its dependents run anyway.
            n = await self.rq.enqueue_dependents(row.rq_id)
            if n:
                log.info("dependents_enqueued", rq_id=row.rq_id, dependents=n)
        if status == s.cancelled:
            detail = _cancelled_detail(job_id, rq_cancelled=rq_cancelled, signals=stop.signals)
            detail.update(path, rq_status=seen)
            if stop.wedged:
                detail["worker_wedged"] = True
                detail["warning"] = stop.message
            await self._finish(reqs, "cancelled", detail)
            if self._on_cancelled is not None:
                self._on_cancelled()
        elif status in (s.completed, s.failed):
            await self._finish(reqs, "already_finished", {
                "success": False, "status": status, "signals": stop.signals, "rq_status": seen,
                "message": f"Job {job_id} {status} before it could be cancelled"})
        else:
            if row.rq_id:
                last = (await self.rq.read_jobs([row.rq_id]))[row.rq_id]
                rq_said = f"RQ says {last.raw_status or last.status.value!r}"
            msg = stop.message or f"Job {job_id} could not be stopped (row is {status}, {rq_said})"
            await self._finish(reqs, "failed", {"success": False, "message": msg,
                                                "horse_signals": stop.signals, **path,
                                                "rq_status": seen})

    async def _leased(self, ids: list[int], stopping: Awaitable[T]) -> T:
        """`stopping` (a stop of the job, ours or one under way) awaited while the requests'
        lease is made longer by the grace period a stop may take. The longer lease is
        written while the horse is signalled, not before: a round trip less between the
        request and the SIGTERM."""
        extending = asyncio.create_task(self.store.requests.extend_lease(
            ids, self.cfg.cancel.lease_seconds + self.cfg.cancel.grace_seconds))
        try:
            return await stopping
        finally:
            await extending

    async def _route(self, reqs: list[CancelRequest], rq_id: str,
                     worker_name: str) -> tuple[dict[str, Any], Target | None] | None:
        """Who stops a running job: this replica if it can see the worker (or the worker is
        gone); else the live replica that lists the worker, to which the requests are
        handed (None returned); else RQ's stop-job from here. The dict says which path ran,
        for the outcome's detail; the Target is where the job runs, if it was read here
        (the stop ladder starts from it instead of reading it again)."""
        me = self.cfg.instance.name
        handed_to = reqs[0].handed_to
        m = self.metrics.cancel_handovers
        if handed_to == me:
            m.labels(result="taken").inc()
            log.info("cancel_taken_over", rq_id=rq_id, worker=worker_name)
            return {"path": "handed-over", "instance": me}, None
        if handed_to is not None:
            # Handed to another replica that did not take it and has gone silent (its
            # heartbeat stopped; the claim query lets nobody else have it before): stop-job
            # from here.
            m.labels(result="fallback").inc()
            log.warning("cancel_handover_expired", rq_id=rq_id, worker=worker_name, to=handed_to,
                        seconds=self.cfg.cancel.handover_seconds)
            return {"path": "stop-job", "instance": me,
                    "handover": f"{handed_to} did not take it within "
                                f"{self.cfg.cancel.handover_seconds:g} s and is not alive "
                                f"(no heartbeat for {REPLICA_STALE_SECONDS:g} s)"}, None
        if not worker_name or self.stopper.owner_of is None:
            return {"path": "local", "instance": me}, None
        target = await self.stopper.where(rq_id, worker_name)
        if target.local or target.gone:
            return {"path": "local", "instance": me}, target
        owner = await self.stopper.owner_of(worker_name)
        if owner is None:
            m.labels(result="fallback").inc()
            return {"path": "stop-job", "instance": me,
                    "handover": f"no live replica sees worker {worker_name}"}, target
        handed = await self.store.requests.hand_over([r.id for r in reqs], owner)
        if handed:
            m.labels(result="handed").inc()
            log.info("cancel_handed_over", rq_id=rq_id, worker=worker_name, to=owner,
                     requests=[r.id for r in reqs])
            if self._slot_free is not None:
                # Look again once the hand-over may have timed out, and once a replica
                # that died at this moment would have been seen dead: then the fallback
                # is ours (or any replica's) to take. While the owner lives it keeps them.
                loop = asyncio.get_running_loop()
                for after in (self.cfg.cancel.handover_seconds,
                              max(self.cfg.cancel.handover_seconds, REPLICA_STALE_SECONDS)):
                    loop.call_later(after + 0.05, self._slot_free)
            return None
        # Our lease ran out meanwhile: whoever holds the requests now carries them out.
        return None

    async def _finish(self, reqs: Sequence[CancelRequest], outcome: str,
                      detail: dict[str, Any]) -> None:
        detail.setdefault("path", "local")
        if detail["path"] == "local" and reqs and reqs[0].handed_to == self.cfg.instance.name:
            # Handed to us, and carried out here (by this flow, or by our event path acting
            # on the request as an intent first, or joined under way): the hand-over's path.
            detail["path"] = "handed-over"
        detail.setdefault("instance", self.cfg.instance.name)
        detail.setdefault("graceful", graceful(detail))
        done = await self.store.requests.finish([r.id for r in reqs], outcome, detail)
        now = datetime.now(UTC)
        for _rid, requested_at in done:
            self.metrics.cancel_requests.labels(outcome=outcome).inc()
            self.metrics.cancel_duration.observe(max(0.0, (now - requested_at).total_seconds()))
        if len(done) < len(reqs):
            log.warning("cancel_lease_lost", requests=[r.id for r in reqs], finished=len(done))
        level = log.info if outcome != "failed" else log.error
        level("cancel_done", outcome=outcome, requests=[r.id for r in reqs],
              message=detail.get("message"), horse_signals=detail.get("horse_signals"))


def graceful(detail: Mapping[str, Any]) -> bool | None:
    """Did the job get SIGTERM first? None when no horse was signalled (the job was not
    running, or ended by itself); False when the first stop was RQ's stop-job (an
    immediate SIGKILL) or a SIGKILL: a cancel that could not be graceful never reads as one."""
    signals = detail.get("horse_signals") or detail.get("signals") or []
    if not isinstance(signals, list) or not signals:
        return None
    return bool(signals[0] == "SIGTERM")


def _cancelled_detail(job_id: Any, *, rq_cancelled: bool, signals: list[str]) -> dict[str, Any]:
    return {
        "success": True,
        "message": f"Job {job_id} cancelled successfully",
        "rq_cancelled": rq_cancelled,
        "horse_signals": signals,
    }
