"""The cancel flow: claim -> stop -> wait for RQ to agree -> outcome -> NOTIFY.

A request is durable; NOTIFY only wakes us. Claims are leases taken with SKIP LOCKED, so
any number of replicas share the work and a daemon that dies mid-cancel loses its claim
to whoever comes next. Many requests for one job get one cancellation and one outcome.
Signals go only to a horse proven at that moment (processes.py); the graceful path is
SIGTERM, then RQ's stop-job after grace_seconds, then our own SIGKILL 2 s later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from reconciler.config import Config
from reconciler.errors import BackendUnavailable, SchemaError
from reconciler.metrics import Metrics
from reconciler.model import WAITING, CancelIntent, RqStatus
from reconciler.processes import SIGKILL, SIGTERM, Processes, ProcIdentity
from reconciler.reconcile import HorseStop, Reconciler
from reconciler.rq_state import RqState, worker_gone_reason
from reconciler.store import CancelRequest, Store

log = structlog.get_logger("reconciler.cancel")

KILL_AFTER_STOP_JOB_SECONDS = 2.0
# How long a live worker gets to notice its horse died and record the job's end.
WORKER_REAP_SECONDS = 5.0
POLL_SECONDS = 0.01
# How many finished horse stops are remembered (see CancelProcessor._stopped).
RECENT_STOPS = 1000


@dataclass
class StopResult:
    signals: list[str] = field(default_factory=list)
    stopped: bool = False
    orphan: bool = False
    wedged: bool = False
    message: str = ""


class CancelProcessor:
    def __init__(self, cfg: Config, store: Store, rq: RqState, procs: Processes,
                 reconciler: Reconciler, metrics: Metrics,
                 on_cancelled: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.rq = rq
        self.procs = procs
        self.reconciler = reconciler
        self.metrics = metrics
        self._on_cancelled = on_cancelled
        self._sem = asyncio.Semaphore(32)
        self._inflight: set[asyncio.Task[None]] = set()
        # jobs whose horse is being stopped right now: one stop per job at a time
        self._stopping: dict[str, asyncio.Task[StopResult]] = {}
        # ...and how the last few stops ended: the event path may stop a horse for a
        # cancel request a moment before the request's own flow gets to it.
        self._stopped: OrderedDict[str, StopResult] = OrderedDict()

    @property
    def busy(self) -> int:
        return len(self._inflight)

    async def process_pending(self) -> int:
        """Claim every pending (or lease-expired) request and start its job's cancel."""
        total = 0
        while True:
            claims = await self.store.claim_requests(self.cfg.cancel.lease_seconds, limit=100)
            if not claims:
                return total
            total += len(claims)
            by_job: dict[Any, list[CancelRequest]] = defaultdict(list)
            for c in claims:
                by_job[c.job_id].append(c)
            for job_id, reqs in by_job.items():
                task = asyncio.create_task(self._guarded(job_id, reqs))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait for in-flight cancels; True if all finished in time."""
        if not self._inflight:
            return True
        _done, pending = await asyncio.wait(set(self._inflight), timeout=timeout)
        return not pending

    async def _guarded(self, job_id: Any, reqs: list[CancelRequest]) -> None:
        async with self._sem:
            structlog.contextvars.bind_contextvars(job_id=str(job_id))
            try:
                await self.cancel_job(job_id, reqs)
            except BackendUnavailable as exc:
                # The claim stays ours until its lease ends; then it is retried (here or
                # by another replica). Nothing was decided on missing data.
                log.warning("cancel_interrupted", error=str(exc), requests=[r.id for r in reqs])
            finally:
                structlog.contextvars.unbind_contextvars("job_id")

    async def cancel_job(self, job_id: Any, reqs: list[CancelRequest]) -> None:
        s = self.cfg.jobs.statuses
        ids = [r.id for r in reqs]
        first = reqs[0]
        intent = CancelIntent(first.requested_by, first.reason)
        rows = await self.store.rows_by_ids([job_id])
        if not rows:
            await self._finish(reqs, "failed", {"success": False,
                               "message": f"Job {job_id} no longer exists in {self.cfg.jobs.table}"})
            return
        row = rows[0].row
        if row.status in s.terminal:
            if row.status == s.cancelled:
                prior = await self.store.previous_cancel_detail(job_id)
                detail = prior or _cancelled_detail(job_id, rq_cancelled=False, signals=[])
                detail["duplicate"] = True
                await self._finish(reqs, "cancelled", detail)
            else:
                await self._finish(reqs, "already_finished", {
                    "success": False, "status": row.status,
                    "message": f"Job {job_id} already {row.status}"})
            return
        log.info("cancel_started", requests=ids, rq_id=row.rq_id, status=row.status)
        rq_cancelled = False
        stop = StopResult()
        rq_said = "no RQ job id"
        settle: set[str] = set()
        if row.rq_id:
            jobs = await self.rq.read_jobs([row.rq_id])
            job = jobs[row.rq_id]
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
                await self.store.extend_lease(ids, self.cfg.cancel.lease_seconds
                                              + self.cfg.cancel.grace_seconds)
                stop = await self.stop_horse(row.rq_id, job.worker_name, job.started_at)
                job = (await self.rq.read_jobs([row.rq_id]))[row.rq_id]
            elif row.rq_id in self._stopped:
                # The event path saw this request's intent and stopped the horse already
                # (the reconcile table's cancel rule): report those signals, not none.
                stop = self._stopped[row.rq_id]
            if stop.stopped and job.status in (RqStatus.FAILED, RqStatus.STOPPED):
                # Make RQ say what happened: the job was canceled, not failed.
                rq_cancelled = (await self.rq.cancel_job(
                    row.rq_id, only_from=(RqStatus.FAILED, RqStatus.STOPPED))) == "canceled"
        await self.reconciler.reconcile_job_ids([job_id], intents={job_id: intent},
                                                settle=settle)
        status = await self.store.job_status(job_id)
        if status == s.cancelled:
            detail = _cancelled_detail(job_id, rq_cancelled=rq_cancelled, signals=stop.signals)
            if stop.wedged:
                detail["worker_wedged"] = True
                detail["warning"] = stop.message
            await self._finish(reqs, "cancelled", detail)
            if self._on_cancelled is not None:
                self._on_cancelled()
        elif status in (s.completed, s.failed):
            await self._finish(reqs, "already_finished", {
                "success": False, "status": status, "signals": stop.signals,
                "message": f"Job {job_id} {status} before it could be cancelled"})
        else:
            if row.rq_id:
                last = (await self.rq.read_jobs([row.rq_id]))[row.rq_id]
                rq_said = f"RQ says {last.raw_status or last.status.value!r}"
            msg = stop.message or f"Job {job_id} could not be stopped (row is {status}, {rq_said})"
            await self._finish(reqs, "failed", {"success": False, "message": msg,
                                                "horse_signals": stop.signals})

    async def _finish(self, reqs: Sequence[CancelRequest], outcome: str,
                      detail: dict[str, Any]) -> None:
        done = await self.store.finish_requests([r.id for r in reqs], outcome, detail)
        now = datetime.now(UTC)
        for _rid, requested_at in done:
            self.metrics.cancel_requests.labels(outcome=outcome).inc()
            self.metrics.cancel_duration.observe(max(0.0, (now - requested_at).total_seconds()))
        if len(done) < len(reqs):
            log.warning("cancel_lease_lost", requests=[r.id for r in reqs], finished=len(done))
        level = log.info if outcome != "failed" else log.error
        level("cancel_done", outcome=outcome, requests=[r.id for r in reqs],
              message=detail.get("message"), horse_signals=detail.get("horse_signals"))

    # -- stopping a horse ---------------------------------------------------------------------

    async def stop_horse(self, rq_id: str, worker_name: str,
                         started_at: datetime | None) -> StopResult:
        """Stop the running job `rq_id`, once, however many callers ask at the same time."""
        task = self._stopping.get(rq_id)
        if task is None:
            task = asyncio.create_task(self._stop_horse(rq_id, worker_name, started_at))
            self._stopping[rq_id] = task
            task.add_done_callback(lambda t: self._stop_ended(rq_id, t))
        return await asyncio.shield(task)

    def _stop_ended(self, rq_id: str, task: asyncio.Task[StopResult]) -> None:
        self._stopping.pop(rq_id, None)
        if task.cancelled() or task.exception() is not None:
            return
        self._stopped[rq_id] = task.result()
        self._stopped.move_to_end(rq_id)
        while len(self._stopped) > RECENT_STOPS:
            self._stopped.popitem(last=False)

    async def _stop_horse(self, rq_id: str, worker_name: str,
                          started_at: datetime | None) -> StopResult:
        res = StopResult()
        grace = self.cfg.cancel.grace_seconds
        workers = await self.rq.read_workers([worker_name]) if worker_name else {}
        rec = workers.get(worker_name)
        now = datetime.now(UTC)
        gone = worker_gone_reason(rec, worker_name, now) if worker_name else "job has no worker"
        local = rec is not None and self.procs.is_local(rec)
        if rec is not None and local:
            gone = self.procs.local_worker_gone(rec) or gone
        horse: ProcIdentity | None = None
        if local and rec is not None and not gone:
            horse = self.procs.tracked_horse(rq_id) or await self._find_horse(rec, rq_id,
                                                                               started_at)
        elif local or not worker_name:
            horse = self.procs.tracked_horse(rq_id)
        if horse is not None:
            if self.procs.signal_horse(horse, SIGTERM):
                res.signals.append("SIGTERM")
            exited = await self.procs.wait_exit(horse, grace)
            if not exited and not gone and worker_name:
                n = await self.rq.send_stop_job(worker_name, rq_id)
                res.signals.append("stop-job")
                log.info("stop_job_sent", rq_id=rq_id, worker=worker_name, receivers=n)
                exited = await self.procs.wait_exit(horse, KILL_AFTER_STOP_JOB_SECONDS)
            if not exited:
                if self.procs.signal_horse(horse, SIGKILL):
                    res.signals.append("SIGKILL")
                exited = await self.procs.wait_exit(horse, KILL_AFTER_STOP_JOB_SECONDS)
            res.stopped = exited
            if not exited:
                res.message = f"horse pid {horse.pid} of job {rq_id} survived SIGKILL"
        elif gone:
            res.orphan = True
            res.message = f"worker {worker_name or '?'} is gone ({gone})"
            if local:
                # Its horse was never proven (the daemon was down when it started): we
                # cannot tell it from any other process, so it is left alone.
                res.message += "; its horse is unknown here and was not signalled"
                log.warning("orphan_horse_unknown", rq_id=rq_id, worker=worker_name)
            else:
                res.stopped = True
            return res
        else:
            # A worker on another host (or a horse we could not prove): RQ's stop-job.
            n = await self.rq.send_stop_job(worker_name, rq_id)
            res.signals.append("stop-job")
            if n == 0:
                res.orphan = True
                res.stopped = True
                res.message = f"worker {worker_name} did not receive stop-job: it is gone"
                return res
        if gone and horse is not None:
            # An orphan's horse: its worker is dead, so nobody will record an end and
            # there is no worker to be wedged.
            res.orphan = True
            self.procs.forget(rq_id)
            return res
        # The worker must record the end (and be ready for its next job) promptly.
        deadline = time.monotonic() + (WORKER_REAP_SECONDS if horse is not None
                                       else grace + WORKER_REAP_SECONDS)
        while time.monotonic() < deadline:
            job = (await self.rq.read_jobs([rq_id]))[rq_id]
            if job.status is not RqStatus.STARTED:
                res.stopped = True
                self.procs.forget(rq_id)
                return res
            await asyncio.sleep(POLL_SECONDS)
        res.wedged = horse is not None and res.stopped
        res.message = (f"worker {worker_name} did not record the end of job {rq_id} within "
                       f"{WORKER_REAP_SECONDS:g} s after its horse stopped: the worker looks "
                       "wedged; its supervisor should restart it")
        log.error("worker_wedged", rq_id=rq_id, worker=worker_name, horse_stopped=res.stopped)
        return res

    async def _find_horse(self, rec: Any, rq_id: str,
                          started_at: datetime | None) -> ProcIdentity | None:
        """The worker may have dequeued the job a moment ago and not forked yet: look again
        for up to a second before giving up on a local proof."""
        deadline = time.monotonic() + 1.0
        while True:
            horse = await self.reconciler.prove_horse(rec.name, rq_id, started_at)
            if horse is not None or time.monotonic() > deadline:
                return horse
            await asyncio.sleep(0.02)

    async def stop_for_reconcile(self, stops: Sequence[HorseStop]) -> None:
        """Horses the reconciler found: cancelled rows whose job started anyway, orphans."""
        for hs in stops:
            if hs.rq_id in self._stopping:
                continue
            task = asyncio.create_task(self._stop_quietly(hs))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _stop_quietly(self, hs: HorseStop) -> None:
        try:
            jobs = await self.rq.read_jobs([hs.rq_id])
            job = jobs[hs.rq_id]
            if job.status is not RqStatus.STARTED:
                return
            res = await self.stop_horse(hs.rq_id, job.worker_name, job.started_at)
            log.info("horse_stopped", job_id=str(hs.job_id), rq_id=hs.rq_id, why=hs.why,
                     signals=res.signals, stopped=res.stopped)
            if res.stopped and "cancelled" in hs.why:
                with contextlib.suppress(BackendUnavailable):
                    await self.rq.cancel_job(hs.rq_id, only_from=(RqStatus.FAILED, RqStatus.STOPPED))
        except BackendUnavailable as exc:
            log.warning("horse_stop_interrupted", rq_id=hs.rq_id, error=str(exc))


def _cancelled_detail(job_id: Any, *, rq_cancelled: bool, signals: list[str]) -> dict[str, Any]:
    return {
        "success": True,
        "message": f"Job {job_id} cancelled successfully",
        "rq_cancelled": rq_cancelled,
        "horse_signals": signals,
    }


# -- the `cancel` command ---------------------------------------------------------------------


async def request_and_wait(cfg: Config, job_id: str, *, reason: str, by: str,
                           wait: float | None) -> tuple[str, dict[str, Any] | None]:
    """Insert a request; with `wait`, wait for its outcome (LISTEN on <channel>_done)."""
    store = Store(cfg)
    await store.connect()
    conn: asyncpg.Connection | None = None
    try:
        got = asyncio.Event()
        if wait is not None:
            conn = await asyncpg.connect(cfg.postgres.dsn, timeout=10)
            await conn.add_listener(cfg.done_channel, lambda *_a: got.set())
        try:
            rid = await store.insert_request(job_id, by, reason)
        except SchemaError as exc:
            if "ForeignKeyViolation" in str(exc):
                raise SchemaError(f"no job with {cfg.jobs.id_column} = {job_id!r} in "
                                  f"{cfg.jobs.table}") from None
            if "InvalidTextRepresentation" in str(exc) or "NumericValueOutOfRange" in str(exc):
                raise SchemaError(f"{job_id!r} is not a valid {store.id_type} id") from None
            raise
        if wait is None:
            return "pending", {"request_id": rid, "state": "pending"}
        deadline = time.monotonic() + wait
        while True:
            state, outcome, detail = await store.request_outcome(rid)
            if state == "done":
                out = dict(detail or {})
                out.setdefault("request_id", rid)
                out["outcome"] = outcome
                return str(outcome), out
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", {"request_id": rid, "state": state, "outcome": None,
                                   "message": f"no outcome within {wait:g} s; is the daemon running?"}
            got.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(got.wait(), timeout=min(left, 1.0))
    finally:
        if conn is not None:
            await conn.close()
        await store.close()


StopCallback = Callable[[Sequence[HorseStop]], Awaitable[None]]
