"""Orphans (jobs whose worker died mid-run) queued again or failed, one at a time each.

The reconcile pass only notices an orphan (Action.REQUEUE_ORPHAN, under orphans.requeue
"retries" or "always"); here, in order:
1. the job is read again: still `started` by that worker, or it moved on (then a pass
   follows it, and nothing is done here);
2. its worker is read again and must be gone now; its horse is stopped (stop.py: the
   proven horse and its group on this host; another host's worker is gone only on the
   server's own facts, its hash missing, expired or dead, which liveness.py holds to);
3. the facts (policy, counts from our table, RQ's retries, the worker's
   shutdown_requested_date, what became of the horse, a pending cancel) go to
   requeue_policy.orphan_verdict(), which says fail, requeue or wait;
4. a requeue is claimed in our table (one replica per run of the job), then made in one
   atomic step in Redis (rq_api.requeue_orphan_sync: guarded by that run); its row goes
   back to `queued` (started_at kept) with an audit event `requeued`.

Never queues a job again while its previous horse may still run, and never while a cancel
is pending: the cancel completes it instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from reconciler.aio import TaskSet
from reconciler.config import Config
from reconciler.errors import BackendUnavailable
from reconciler.jobs_table import RowChange, Store
from reconciler.model import Orphan, Reason
from reconciler.requeue_policy import Cause, Horse, Kind, OrphanFacts, Verdict, orphan_verdict
from reconciler.requeues_table import Counts
from reconciler.rq_layout import OrphanJob
from reconciler.rq_state import RqState
from reconciler.stop import Stopper
from reconciler.workqueue import WorkQueue

if TYPE_CHECKING:
    from reconciler.metrics import Metrics

log = structlog.get_logger("reconciler.orphans")

# Orphans handled at once (each holds a stop ladder at most).
MAX_BUSY = 1000
# How long an orphan whose horse this replica never proved waits before it is failed.
UNKNOWN_HORSE_GRACE_SECONDS = 2.0


class Orphans:
    def __init__(self, cfg: Config, store: Store, rq: RqState, stopper: Stopper,
                 tasks: TaskSet, queue: WorkQueue, metrics: Metrics | None) -> None:
        self.cfg, self.store, self.rq, self.stopper = cfg, store, rq, stopper
        self.tasks, self.queue, self.metrics = tasks, queue, metrics
        self._busy: set[str] = set()

    def take(self, orphans: Sequence[Orphan]) -> None:
        """Orphans a pass found: each handled once at a time, however often it is found."""
        for o in orphans:
            if o.rq_id in self._busy or len(self._busy) >= MAX_BUSY:
                continue
            self._busy.add(o.rq_id)
            self.tasks.spawn(self._handle_quietly(o), f"orphan:{o.rq_id}")

    async def _handle_quietly(self, o: Orphan) -> None:
        try:
            await self.handle(o)
        except BackendUnavailable as exc:
            # Nothing half-done is left: a claim is made only right before the requeue, and
            # given back if Redis refused it. The next pass finds the orphan again.
            log.warning("orphan_interrupted", rq_id=o.rq_id, error=str(exc))
        finally:
            self._busy.discard(o.rq_id)

    async def handle(self, o: Orphan) -> str:
        """Carry out one orphan; returns what came of it (for the log and tests)."""
        job = await self.rq.read_orphan_job(o.rq_id)
        if not _same_run(job, o):
            self.queue.add([o.rq_id], "orphan_moved")
            return "moved on"
        assert job is not None
        target = await self.stopper.where(o.rq_id, job.worker_name)
        if not target.gone:
            return "worker alive"  # read more recently than the pass: it judges again
        counts = await self.store.requeues.counts(o.rq_id)
        cancel = bool(await self.store.cancel_intents([o.job_id]))
        shutdown = target.worker is not None and target.worker.shutdown_requested
        sure = orphan_verdict(self.cfg.orphans, OrphanFacts(
            worker=job.worker_name, horse=Horse.GONE, cancel=cancel, shutdown_requested=shutdown,
            retries_left=job.retries_left, retry_intervals=job.retry_intervals,
            requeues=counts.requeues, disruptions=counts.disruptions, gone_because=target.gone))
        if sure.kind is Kind.FAIL:
            # Failed however the stop goes (the policy requeues nothing here): the row says
            # so first, as an orphan, before a SIGTERMed horse records an end of its own
            # ("failed: SystemExit"); then the horse is stopped.
            log.info("orphan_verdict", rq_id=o.rq_id, worker=job.worker_name, verdict="fail",
                     requeues=counts.requeues, retries_left=job.retries_left, why=sure.text)
            await self._to_row(o, self.cfg.jobs.statuses.failed, sure.text, Reason.ORPHANED,
                               {"worker": job.worker_name, "gone_because": target.gone,
                                "requeues": counts.requeues}, completed=True)
            await self.stopper.stop(o.rq_id, job.worker_name, o.started_at, target=target)
            return "failed"
        res = await self.stopper.stop(o.rq_id, job.worker_name, o.started_at, target=target)
        if res.stopped:
            horse = Horse.GONE
        elif res.orphan and not res.signals:
            horse = Horse.UNKNOWN
        else:
            horse = Horse.RUNNING
        # Read after the stop: the horse may have written its end meanwhile.
        job = await self.rq.read_orphan_job(o.rq_id)
        if not _same_run(job, o):
            self.queue.add([o.rq_id], "orphan_moved")
            return "moved on"
        assert job is not None
        counts = await self.store.requeues.counts(o.rq_id)
        cancel = bool(await self.store.cancel_intents([o.job_id]))
        facts = OrphanFacts(
            worker=job.worker_name, horse=horse, cancel=cancel,
            shutdown_requested=target.worker is not None and target.worker.shutdown_requested,
            retries_left=job.retries_left, retry_intervals=job.retry_intervals,
            requeues=counts.requeues, disruptions=counts.disruptions, gone_because=target.gone)
        v = orphan_verdict(self.cfg.orphans, facts)
        log.info("orphan_verdict", rq_id=o.rq_id, worker=job.worker_name, verdict=v.kind.value,
                 cause=v.cause.value if v.cause else None, delay=v.delay, horse=horse.value,
                 signals=res.signals, requeues=counts.requeues, disruptions=counts.disruptions,
                 retries_left=job.retries_left, shutdown_requested=facts.shutdown_requested,
                 why=v.text or None)
        if v.kind is Kind.WAIT:
            if cancel:
                self.queue.add([o.rq_id], "intent")  # the pass cancels it, with the intent
            return f"wait ({v.text})"
        if v.kind is Kind.FAIL and horse is Horse.UNKNOWN:
            # Another replica on this host may have proven the horse and be requeueing the
            # job: give it the moment that takes, then fail only the same run.
            await asyncio.sleep(UNKNOWN_HORSE_GRACE_SECONDS)
            if not _same_run(await self.rq.read_orphan_job(o.rq_id), o):
                self.queue.add([o.rq_id], "orphan_moved")
                return "moved on"
        if v.kind is Kind.FAIL:
            await self._to_row(o, self.cfg.jobs.statuses.failed, v.text, Reason.ORPHANED,
                               {"worker": job.worker_name, "gone_because": target.gone,
                                "requeues": counts.requeues, "horse_signals": res.signals},
                               completed=True)
            return "failed"
        return await self._requeue(o, job, v, counts, target.gone)

    async def _requeue(self, o: Orphan, job: OrphanJob, v: Verdict, counts: Counts,
                       gone: str) -> str:
        assert v.cause is not None
        attempt = f"{job.worker_name}@{job.started_at_raw}"
        disruption = v.cause is Cause.DISRUPTION
        won = await self.store.requeues.claim(o.rq_id, attempt, counts, disruption=disruption,
                                              cause=v.cause.value)
        if won is None:
            log.info("requeue_claimed_elsewhere", rq_id=o.rq_id, attempt=attempt)
            return "claimed elsewhere"
        at_front = disruption or (v.spend_retry and job.at_front_on_retry)
        try:
            outcome = await self.rq.requeue_orphan(job, delay=v.delay, at_front=at_front,
                                                   spend_retry=v.spend_retry)
        except BackendUnavailable:
            # Not known whether the script ran: the claim stays (the run cannot be
            # requeued twice); if it did not run, the job is still `started` and RQ's own
            # maintenance retries or fails it.
            raise
        if outcome not in ("requeued", "scheduled"):
            await self.store.requeues.unclaim(o.rq_id, attempt, counts)
            log.info("requeue_refused", rq_id=o.rq_id, outcome=outcome)
            self.queue.add([o.rq_id], "orphan_moved")
            return outcome
        if self.metrics is not None:
            self.metrics.requeues.labels(cause=v.cause.value).inc()
        count = won.disruptions if disruption else won.requeues
        detail = {"cause": v.cause.value, "count": count, "worker": job.worker_name,
                  "gone_because": gone, "delay_seconds": v.delay,
                  "retry_spent": v.spend_retry, "rq_outcome": outcome}
        if v.spend_retry and job.retries_left is not None:
            detail["retries_left"] = job.retries_left - 1
        await self._to_row(o, self.cfg.jobs.statuses.queued, "", Reason.REQUEUED, detail,
                           completed=False, rq_status=outcome if outcome == "scheduled" else "queued")
        return outcome

    async def _to_row(self, o: Orphan, to_status: str, error: str, reason: Reason,
                      detail: Mapping[str, Any], *, completed: bool,
                      rq_status: str = "started") -> None:
        """The row's transition, from the status it has now (it may have moved from
        queued to running since the pass read it)."""
        rows = await self.store.rows_by_ids([o.job_id])
        statuses = self.cfg.jobs.statuses
        changes = [
            RowChange(ar.row.id, ar.row.status, to_status, error, reason.value, rq_status,
                      None, None, False, completed, {"rq_id": o.rq_id, **detail})
            for ar in rows if ar.row.status in statuses.active and ar.row.rq_id == o.rq_id
        ]
        if not changes:
            return
        result = await self.store.apply(changes)
        for ch in result.applied:
            if self.metrics is not None:
                self.metrics.transitions.labels(ch.from_status, ch.to_status, ch.reason).inc()
            log.info("job_transition", job_id=str(ch.job_id), from_status=ch.from_status,
                     to_status=ch.to_status, reason=ch.reason, rq_status=rq_status,
                     error=ch.error or None)
        if len(result.applied) < len(changes):
            self.queue.add([o.rq_id], "lost_race")


def _same_run(job: OrphanJob | None, o: Orphan) -> bool:
    return job is not None and job.status == "started" and job.worker_name == o.worker_name
