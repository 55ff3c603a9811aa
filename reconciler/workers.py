"""What the daemon knows about RQ workers and their horses, with one owner.

Which workers are local (their pid is watched, their horses can be proven and signalled)
and which are remote; which started jobs each worker holds (a worker key event wakes
those jobs); which local jobs still need their horse proven. Everything here is a cache
of the last reading, bounded by the set of running jobs and live workers: it is a hint
for where to look, never the truth a decision is made on. The one exception is liveness:
whether a worker is gone is judged on this reading *and* what earlier ones showed, on
the monotonic clock (liveness.py), never on the worker's wall clock against ours.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import NamedTuple

import structlog

from reconciler.errors import BackendUnavailable
from reconciler.liveness import Memory
from reconciler.model import RqJob, RqStatus, WorkerState
from reconciler.processes import PidWatcher, Processes
from reconciler.procfs import ProcIdentity, identity_alive
from reconciler.rq_layout import WorkerRecord
from reconciler.rq_state import RqState

log = structlog.get_logger("reconciler.workers")

MAX_REMOTE = 100_000
# Started jobs remembered per worker, for its key events to wake. A worker runs one job at
# a time; thousands of "started" jobs naming one worker are stale leftovers (a sweep reads
# them anyway), and remembering them all would grow with the table.
MAX_JOBS_PER_WORKER = 1000
# Rounds of looking for a just-started job's horse (it may not have forked yet).
TRACK_DELAYS = (0.01, 0.05, 0.2, 1.0)


class Pending(NamedTuple):
    worker_name: str
    started_at: datetime | None


class Candidate(NamedTuple):
    """A child that may be a job's horse, and the execution its worker named when found."""

    worker_name: str
    ident: ProcIdentity
    execution_id: str | None


class Workers:
    def __init__(self, rq: RqState, procs: Processes,
                 on_local_exit: Callable[[str], None] | None = None) -> None:
        """`on_local_exit`: called the moment a watched local worker's process exits; None
        (a one-shot command) watches nothing."""
        self.rq = rq
        self.procs = procs
        self._on_local_exit = on_local_exit
        self._watcher = PidWatcher(self._exited) if on_local_exit is not None else None
        self.local: dict[str, WorkerRecord] = {}
        self.remote: set[str] = set()
        self._jobs: dict[str, set[str]] = {}
        self._untracked: dict[str, Pending] = {}
        # What earlier readings showed of each worker (liveness.judge), bounded.
        self.liveness = Memory()
        # Told when the set of local workers changes (the replica registry lists them).
        self.on_local_change: Callable[[], None] | None = None
        # Workers registered from our hostname that we cannot see or signal, and why:
        # their cancels cannot be graceful (the layout is wrong, never silently).
        self.unseen: dict[str, str] = {}
        self.on_unseen: Callable[[str, str], None] | None = None
        # (name, monotonic now) -> have all the replicas that listed that worker as theirs
        # stopped heartbeating? (replicas.py; liveness rule 4)
        self.owner_stale: Callable[[str, float], bool] | None = None

    # -- queries --------------------------------------------------------------------------

    def _add_local(self, name: str, rec: WorkerRecord) -> None:
        new = name not in self.local
        self.local[name] = rec
        if new and self.on_local_change is not None:
            self.on_local_change()

    def _drop_local(self, name: str) -> WorkerRecord | None:
        rec = self.local.pop(name, None)
        if rec is not None and self.on_local_change is not None:
            self.on_local_change()
        return rec

    def jobs_of(self, name: str) -> set[str]:
        """The started jobs `name` held when last read."""
        return set(self._jobs.get(name, ()))

    def knows(self, name: str) -> bool:
        return name in self.local or name in self.remote

    @property
    def untracked(self) -> int:
        return len(self._untracked)

    def state(self, name: str, rec: WorkerRecord | None, now: float | None = None) -> WorkerState:
        """Is `name` alive (liveness.judge), by a reading `rec` made at monotonic instant
        `now` (default: now)? This host's proof of a local worker's process wins over
        everything Redis says: a dead process is the fresh signal (a SIGKILLed worker's
        hash lives on for its TTL), and a live one is never taken for dead, whatever its
        heartbeat or command channel look like."""
        mono = time.monotonic() if now is None else now
        local = rec is not None and rec.exists and self.procs.is_local(rec)
        pid_gone: str | None = None
        if local:
            assert rec is not None
            pid_gone = self.procs.local_worker_gone(rec)
        elif name in self.local:
            # Proven here before, and its hash is now gone or no longer names its process
            # (an RQ 2 heartbeat after the server expired the hash writes last_heartbeat
            # alone): the process we proved still tells.
            pid_gone = self.procs.known_worker_gone(name)
            local = pid_gone is not None
        owner_stale = (pid_gone is None and self.owner_stale is not None
                       and self.owner_stale(name, mono))
        gone = self.liveness.judge(name, rec, mono, pid_gone=pid_gone, keys=self.rq.keys,
                                   owner_stale=owner_stale)
        if local:
            if gone:
                self._drop_local(name)
            elif rec is not None and rec.exists and rec.pid is not None:
                self._add_local(name, rec)
        horse_alive = False
        current = rec.current_job if rec is not None else None
        if gone and local and current:
            horse_alive = self.procs.tracked_horse(current) is not None
        return WorkerState(name, gone, local, rec.pid if rec is not None else None, current,
                           horse_alive)

    # -- learning from a reading -----------------------------------------------------------

    async def observe(self, jobs: Mapping[str, RqJob], workers: Mapping[str, WorkerRecord],
                      now: float | None = None) -> dict[str, WorkerState]:
        """Learn from one fresh reading (made at monotonic instant `now`, default now):
        each worker's state, which jobs each holds, and the horses of started local jobs
        (proven now, or queued for `track()`)."""
        mono = time.monotonic() if now is None else now
        states = {name: self.state(name, rec, mono) for name, rec in workers.items()}
        candidates: dict[str, Candidate] = {}
        for j in jobs.values():
            if j.status is not RqStatus.STARTED:
                self._job_left(j)
                continue
            if not j.worker_name:
                continue
            held = self._jobs.setdefault(j.worker_name, set())
            if len(held) < MAX_JOBS_PER_WORKER:
                held.add(j.id)
            rec = workers.get(j.worker_name)
            if (rec is None or rec.current_job != j.id or not states[j.worker_name].alive
                    or not self.procs.is_local(rec) or self.procs.horses.get(j.id) is not None):
                # (A job its worker does not name as its current one has no horse there to
                # prove, now or later: a stale "started" left behind, which only the
                # worker's death changes.)
                continue
            cand = self.procs.find_horse(rec, j.id, j.started_at)
            if cand is not None:
                candidates[j.id] = Candidate(j.worker_name, cand, rec.execution_id)
            else:
                # Not forked yet, or just gone: look again shortly, so that the horse is
                # known if its worker dies later.
                self._untracked[j.id] = Pending(j.worker_name, j.started_at)
        if candidates:
            await self.confirm_horses(candidates)
        return states

    def _job_left(self, j: RqJob) -> None:
        """`j` is no longer running: no longer its worker's business."""
        if j.worker_name:
            held = self._jobs.get(j.worker_name)
            if held is not None:
                held.discard(j.id)
                if not held:
                    del self._jobs[j.worker_name]
        self._untracked.pop(j.id, None)
        # Its horse is forgotten once that process is gone: a horse still alive after its
        # job "ended" (a dead worker's orphan that RQ's cleanup failed) must still be
        # stoppable.
        self.procs.tracked_horse(j.id)

    def forget_ended(self, ended: Iterable[tuple[str, str]]) -> None:
        """(rq_id, rq_status) of applied changes: forget the horse once RQ says its job
        ended. An orphaned row is terminal while its horse still runs and must still be
        stopped, so a row's own status is not enough."""
        for rq_id, rq_status in ended:
            if rq_status not in ("", "started"):
                self.procs.forget(rq_id)

    # -- horses ----------------------------------------------------------------------------

    async def confirm_horses(self, candidates: dict[str, Candidate]) -> None:
        """Complete the proof of horse candidates with one fresh read of their workers.

        A candidate was found under a worker record read *before* the worker's children
        were listed; meanwhile the worker may have finished the job and forked the next
        one's horse. RQ clears current_job (RQ 2) or ends the execution (RQ 3) before it
        forks again, so a worker that still names the job, and the same execution, after
        the listing means the child seen is that run's horse: the execution id also tells
        a re-run of the same job id, which the job id alone cannot.
        """
        fresh = await self.rq.read_workers({c.worker_name for c in candidates.values()})
        for job_id, (name, ident, execution_id) in candidates.items():
            rec = fresh.get(name)
            if rec is not None and rec.exists and rec.current_job == job_id and rec.provable \
                    and rec.execution_id == execution_id and identity_alive(ident):
                self.procs.remember(job_id, ident)
                self._untracked.pop(job_id, None)

    async def prove_horse(self, worker_name: str, job_id: str,
                          started_at: datetime | None) -> ProcIdentity | None:
        """Find and prove `job_id`'s horse under `worker_name` now (two worker reads)."""
        rec = (await self.rq.read_workers([worker_name])).get(worker_name)
        if rec is None or not rec.exists:
            return None
        cand = self.procs.find_horse(rec, job_id, started_at)
        if cand is None:
            return None
        await self.confirm_horses({job_id: Candidate(worker_name, cand, rec.execution_id)})
        return cand if self.procs.horses.get(job_id) == cand else None

    async def track(self) -> None:
        """Prove the horses of just-started local jobs: bounded retries, one batched worker
        read per round; a job is dropped as soon as its worker no longer names it (it
        ended, or the worker moved on or died: nothing left to prove)."""
        pending, self._untracked = self._untracked, {}
        for delay in TRACK_DELAYS:
            if not pending:
                return
            await asyncio.sleep(delay)
            try:
                fresh = await self.rq.read_workers({p.worker_name for p in pending.values()})
            except BackendUnavailable:
                return  # the next pass that sees the job tries again
            candidates = {}
            for rq_id, (name, started_at) in list(pending.items()):
                rec = fresh.get(name)
                if rec is None or not rec.exists or rec.current_job != rq_id:
                    del pending[rq_id]
                    continue
                cand = self.procs.find_horse(rec, rq_id, started_at)
                if cand is not None:
                    candidates[rq_id] = Candidate(name, cand, rec.execution_id)
            if candidates:
                try:
                    await self.confirm_horses(candidates)
                except BackendUnavailable:
                    return
                for rq_id in candidates:
                    pending.pop(rq_id, None)

    # -- local workers' lives --------------------------------------------------------------

    async def discover(self) -> None:
        """Every live local worker registered in Redis gets its pid watched."""
        names = await self.rq.worker_names()
        # What RQ no longer registers needs no memory of its heartbeats.
        self.liveness.keep_only(set(names))
        recs = await self.rq.read_workers(names)
        for name, rec in recs.items():
            if rec.exists and not rec.death and self.procs.is_local(rec):
                self._add_local(name, rec)
        self._judge_unseen({n: r for n, r in recs.items() if r.exists and not r.death},
                           complete=True)
        self.watch_local()

    def _judge_unseen(self, recs: Mapping[str, WorkerRecord], *, complete: bool) -> None:
        """Note the workers of our hostname we cannot stop gracefully; `complete`: `recs`
        is every live worker, so those not in it are forgotten."""
        if complete:
            for name in [n for n in self.unseen if n not in recs]:
                del self.unseen[name]
        for name, rec in recs.items():
            why = self.procs.unseen(rec)
            if not why:
                self.unseen.pop(name, None)
            elif name not in self.unseen and len(self.unseen) < MAX_REMOTE:
                self.unseen[name] = why
                if self.on_unseen is not None:
                    self.on_unseen(name, why)

    async def learn(self, name: str) -> None:
        """A worker key we have not seen: local (watch its pid) or remote (its heartbeats
        need no lookup)."""
        rec = (await self.rq.read_workers([name])).get(name)
        if rec is None or not rec.exists or rec.death:
            return
        self._judge_unseen({name: rec}, complete=False)
        if self.procs.is_local(rec):
            self._add_local(name, rec)
            self.watch_local()
        elif len(self.remote) < MAX_REMOTE:
            self.remote.add(name)

    def watch_local(self) -> None:
        if self._watcher is None:
            return
        for name, rec in list(self.local.items()):
            if self._watcher.watching(name):
                continue
            ident = self.procs.worker_identity(rec)
            if ident is None:
                continue  # already dead: the pass that saw it handles it
            self._watcher.watch(name, ident)

    def _exited(self, name: str) -> None:
        if self._on_local_exit is not None:
            self._on_local_exit(name)

    def local_exited(self, name: str) -> set[str]:
        """Forget the local worker `name`, which just died; the jobs it held."""
        jobs = self.jobs_of(name)
        rec = self._drop_local(name)
        if rec is not None and rec.current_job:
            jobs.add(rec.current_job)
        return jobs

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()

