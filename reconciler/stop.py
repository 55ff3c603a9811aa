"""The stop ladder: SIGTERM -> grace -> RQ's stop-job -> SIGKILL, then the worker's reap.

One stop per job at a time, however many callers (a cancel request, the event path)
ask at once. Must never signal a process that was not proven, at that moment, to be the
job's horse (processes.py); a horse that cannot be proven gets RQ's stop-job instead, or
nothing if its worker is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from reconciler.aio import TaskSet, cancel_until_done
from reconciler.config import Config
from reconciler.errors import BackendUnavailable
from reconciler.model import RqJob, RqStatus
from reconciler.processes import SIGKILL, SIGTERM, Processes
from reconciler.procfs import ProcIdentity
from reconciler.rq_layout import WorkerRecord, stop_command
from reconciler.rq_state import RqState
from reconciler.workers import Workers

log = structlog.get_logger("reconciler.stop")

KILL_AFTER_STOP_JOB_SECONDS = 2.0
# How long a live worker gets to notice its horse died and record the job's end.
WORKER_REAP_SECONDS = 5.0
POLL_SECONDS = 0.01
# How long a worker that dequeued a job a moment ago gets to fork its horse.
FIND_HORSE_SECONDS = 1.0
# How many finished stops are remembered (see Stopper.recent).
RECENT_STOPS = 1000


@dataclass(frozen=True, slots=True)
class HorseStop:
    """A horse to stop: for a cancelled row whose job started anyway, or an orphan."""

    job_id: Any
    rq_id: str
    worker_name: str
    why: str
    # For a cancel (not an orphan): once stopped, RQ is told the job was canceled.
    for_cancel: bool = False


@dataclass
class StopResult:
    signals: list[str] = field(default_factory=list)
    stopped: bool = False
    orphan: bool = False
    wedged: bool = False
    message: str = ""
    # The job as read when the worker was seen to record its end (None if it was not).
    job: RqJob | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Where the job runs, as read right before the ladder starts."""

    rq_id: str
    worker_name: str
    worker: WorkerRecord | None
    gone: str  # why the worker is gone; "" if alive
    local: bool


class Stopper:
    def __init__(self, cfg: Config, rq: RqState, procs: Processes, workers: Workers,
                 tasks: TaskSet) -> None:
        self.cfg = cfg
        self.rq = rq
        self.procs = procs
        self.workers = workers
        self.tasks = tasks
        # The live replica that can see a worker on its host (replicas.py), if any: stops
        # the event path asks for on such a worker are left to it.
        self.owner_of: Callable[[str], Awaitable[str | None]] | None = None
        self._running: dict[str, asyncio.Task[StopResult]] = {}
        # How the last few stops ended: the event path may stop a horse for a cancel
        # request a moment before the request's own flow gets to it.
        self.recent: OrderedDict[str, StopResult] = OrderedDict()

    def stopping(self, rq_id: str) -> bool:
        return rq_id in self._running

    async def joined(self, rq_id: str) -> StopResult:
        """The result of the stop of `rq_id` under way (`stopping(rq_id)`), once it ends.
        The event path may stop a horse for a cancel request before the request's own flow
        reads the job: that flow then reads the job ended, by this very stop, while the
        stop may still be waiting for the worker to record it."""
        return await asyncio.shield(self._running[rq_id])

    async def stop(self, rq_id: str, worker_name: str, started_at: datetime | None, *,
                   target: Target | None = None) -> StopResult:
        """Stop the running job `rq_id`, once, however many callers ask at the same time.
        `target`: where it runs, if the caller has just read it (`where()`)."""
        task = self._running.get(rq_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._stop(rq_id, worker_name, started_at, target), name=f"stop:{rq_id}")
            self._running[rq_id] = task
            task.add_done_callback(lambda t: self._ended(rq_id, t))
        return await asyncio.shield(task)

    def _ended(self, rq_id: str, task: asyncio.Task[StopResult]) -> None:
        self._running.pop(rq_id, None)
        if task.cancelled():
            return
        if task.exception() is not None:
            return  # raised to every caller that awaited it
        self.recent[rq_id] = task.result()
        self.recent.move_to_end(rq_id)
        while len(self.recent) > RECENT_STOPS:
            self.recent.popitem(last=False)

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109
        if not self._running:
            return True
        _done, pending = await asyncio.wait(set(self._running.values()), timeout=timeout)
        return not pending

    async def cancel_all(self) -> None:
        await cancel_until_done(list(self._running.values()))

    # -- the ladder -----------------------------------------------------------------------

    async def _stop(self, rq_id: str, worker_name: str, started_at: datetime | None,
                    target: Target | None) -> StopResult:
        if target is None or target.rq_id != rq_id or target.worker_name != worker_name:
            target = await self._target(rq_id, worker_name)
        horse = await self._horse(target, started_at)
        if horse is None and target.gone and target.local:
            # Its worker died before this host proved the horse (it was killed a moment
            # after the fork): what it left is recognised by what RQ's fork gave it.
            left = self.procs.orphaned_horse(worker_name, rq_id, started_at)
            log.info("orphaned_horse_search", rq_id=rq_id, worker=worker_name,
                     pid=left.horse.pid if left.horse else None, absent=left.absent,
                     why=left.why)
            if left.absent:
                return StopResult(orphan=True, stopped=True, message=(
                    f"worker {worker_name} is gone ({target.gone}); its horse is gone "
                    f"too: {left.why}"))
            horse = left.horse
        if horse is not None:
            res = await self._signal_ladder(target, horse)
            if not res.stopped:
                log.error("horse_survived", rq_id=rq_id, pid=horse.pid, signals=res.signals)
                return res  # nothing more to wait for: say what happened
            if target.gone:
                # An orphan's horse: its worker is dead, so nobody will record an end and
                # there is no worker to be wedged.
                res.orphan = True
                self.procs.forget(rq_id)
                return res
            return await self._await_reap(target, res, horse=True)
        if target.gone:
            return self._orphan_unknown(target)
        # A worker on another host (or a horse we could not prove): RQ's stop-job (or
        # stop-execution, for an RQ 3 worker: stop_command).
        res = StopResult()
        command = stop_command(target.worker, rq_id)[0]
        n = await self.rq.send_stop_job(worker_name, rq_id, target.worker)
        res.signals.append(command)
        if n == 0:
            # Nobody listens on its command channel, yet nothing says the worker is gone (its
            # hash is there, its heartbeat not late): RQ's pub/sub thread may have died in a
            # live worker. The job may run on, so this is no stop and no orphan.
            res.message = (f"worker {worker_name} did not receive {command}: nobody listens on "
                           "its command channel and nothing proves it gone, so the job may "
                           "still run")
            log.warning("stop_job_unheard", rq_id=rq_id, worker=worker_name, command=command)
            return res
        return await self._await_reap(target, res, horse=False)

    async def where(self, rq_id: str, worker_name: str) -> Target:
        """Where `rq_id` runs, read now: its worker, whether it is local, whether gone."""
        return await self._target(rq_id, worker_name)

    async def _target(self, rq_id: str, worker_name: str) -> Target:
        workers = await self.rq.read_workers([worker_name]) if worker_name else {}
        rec = workers.get(worker_name)
        if not worker_name:
            return Target(rq_id, worker_name, rec, "job has no worker", False)
        st = self.workers.state(worker_name, rec)
        return Target(rq_id, worker_name, rec, st.gone_because, st.local)

    async def _horse(self, t: Target, started_at: datetime | None) -> ProcIdentity | None:
        """The proven horse to signal, if this host can prove one."""
        if t.local and t.worker is not None and not t.gone:
            return self.procs.tracked_horse(t.rq_id) or await self._find_horse(
                t.worker, t.rq_id, started_at)
        if t.local or not t.worker_name:
            return self.procs.tracked_horse(t.rq_id)
        return None

    async def _find_horse(self, rec: WorkerRecord, rq_id: str,
                          started_at: datetime | None) -> ProcIdentity | None:
        """The worker may have dequeued the job a moment ago and not forked yet: look again
        for up to FIND_HORSE_SECONDS before giving up on a local proof."""
        deadline = time.monotonic() + FIND_HORSE_SECONDS
        while True:
            horse = await self.workers.prove_horse(rec.name, rq_id, started_at)
            if horse is not None or time.monotonic() > deadline:
                return horse
            await asyncio.sleep(0.02)

    async def _signal_ladder(self, t: Target, horse: ProcIdentity) -> StopResult:
        """Step 1 SIGTERM, wait grace; step 2 stop-job (live worker only), wait; step 3
        SIGKILL, wait. Each step only if the horse outlived the one before."""
        res = StopResult()
        if self.procs.signal_horse(horse, SIGTERM):
            res.signals.append("SIGTERM")
        exited = await self.procs.wait_exit(horse, self.cfg.cancel.grace_seconds)
        if not exited and not t.gone and t.worker_name:
            n = await self.rq.send_stop_job(t.worker_name, t.rq_id, t.worker)
            res.signals.append(stop_command(t.worker, t.rq_id)[0])
            log.info("stop_job_sent", rq_id=t.rq_id, worker=t.worker_name, receivers=n,
                     command=res.signals[-1])
            exited = await self.procs.wait_exit(horse, KILL_AFTER_STOP_JOB_SECONDS)
        if not exited:
            if self.procs.signal_horse(horse, SIGKILL):
                res.signals.append("SIGKILL")
            exited = await self.procs.wait_exit(horse, KILL_AFTER_STOP_JOB_SECONDS)
        res.stopped = exited
        if not exited:
            res.message = f"horse pid {horse.pid} of job {t.rq_id} survived SIGKILL"
            return res
        # Whatever the job spawned into its group must not outlive the cancel.
        left = await self.procs.kill_leftovers(horse)
        if left:
            res.signals.append("SIGKILL:leftovers")
            log.warning("horse_leftovers_killed", rq_id=t.rq_id, pids=left)
        return res

    def _orphan_unknown(self, t: Target) -> StopResult:
        res = StopResult(orphan=True)
        res.message = f"worker {t.worker_name or '?'} is gone ({t.gone})"
        if t.local:
            # Its horse was never proven (the daemon was down when it started): we cannot
            # tell it from any other process, so it is left alone.
            res.message += "; its horse is unknown here and was not signalled"
            log.warning("orphan_horse_unknown", rq_id=t.rq_id, worker=t.worker_name)
        else:
            res.stopped = True
        return res

    async def _await_reap(self, t: Target, res: StopResult, *, horse: bool) -> StopResult:
        """The worker must record the end (and be ready for its next job) promptly: within
        WORKER_REAP_SECONDS of our last signal, or of its own grace if it got stop-job."""
        wait = WORKER_REAP_SECONDS if horse else self.cfg.cancel.grace_seconds + WORKER_REAP_SECONDS
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            job = (await self.rq.read_jobs([t.rq_id]))[t.rq_id]
            if job.status is not RqStatus.STARTED:
                res.stopped = True
                res.job = job
                self.procs.forget(t.rq_id)
                return res
            await asyncio.sleep(POLL_SECONDS)
        res.wedged = horse and res.stopped
        res.message = (f"worker {t.worker_name} did not record the end of job {t.rq_id} within "
                       f"{WORKER_REAP_SECONDS:g} s after its horse stopped: the worker looks "
                       "wedged; its supervisor should restart it")
        log.error("worker_wedged", rq_id=t.rq_id, worker=t.worker_name, horse_stopped=res.stopped)
        return res

    # -- stops the reconcile pass asked for ----------------------------------------------

    def stop_for_reconcile(self, stops: Sequence[HorseStop]) -> None:
        """Horses the reconciler found: cancelled rows whose job started anyway, orphans."""
        for hs in stops:
            if hs.rq_id not in self._running:
                self.tasks.spawn(self._stop_quietly(hs), f"horse-stop:{hs.rq_id}")

    async def _stop_quietly(self, hs: HorseStop) -> None:
        try:
            job = (await self.rq.read_jobs([hs.rq_id]))[hs.rq_id]
            # A worker that holds a job RQ says is canceled has not always written its
            # name on it yet: give it the moment it takes.
            deadline = time.monotonic() + WORKER_REAP_SECONDS
            while job.in_flight and not job.worker_name and time.monotonic() < deadline:
                await asyncio.sleep(POLL_SECONDS)
                job = (await self.rq.read_jobs([hs.rq_id]))[hs.rq_id]
            if job.status is not RqStatus.STARTED and not (job.in_flight and job.worker_name):
                return
            if hs.rq_id not in self._running and self.owner_of is not None and job.worker_name:
                t = await self.where(hs.rq_id, job.worker_name)
                if not t.local and not t.gone:
                    owner = await self.owner_of(job.worker_name)
                    if owner is not None:
                        # Its own host's replica stops it gracefully; a stop-job from here
                        # would SIGKILL it inside that replica's grace period.
                        log.info("stop_left_to_owner", rq_id=hs.rq_id, worker=job.worker_name,
                                 owner=owner, why=hs.why)
                        return
            res = await self.stop(hs.rq_id, job.worker_name, job.started_at)
            log.info("horse_stopped", job_id=str(hs.job_id), rq_id=hs.rq_id, why=hs.why,
                     signals=res.signals, stopped=res.stopped)
            if res.stopped and hs.for_cancel:
                with contextlib.suppress(BackendUnavailable):
                    await self.rq.cancel_job(hs.rq_id, only_from=(RqStatus.FAILED, RqStatus.STOPPED))
        except BackendUnavailable as exc:
            log.warning("horse_stop_interrupted", rq_id=hs.rq_id, error=str(exc))
