"""One reconcile pass: rows -> read RQ fresh -> decide -> one guarded batch UPDATE.

The event path and the cancel flow run one pass over the rows they name; the sweep
(sweep.py) runs the same pass over every active row, page by page. A pass never holds a
transaction across Redis calls and never reads a Redis error as "not found": on
RedisUnavailable it stops and changes nothing more. Rows whose job is not found, or whose
worker only Redis says is gone, are held for the caller to judge together under the
breakers (the event path leaves them to a sweep).
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from reconciler import lifecycle
from reconciler.aio import abandon
from reconciler.config import Config
from reconciler.errors import RedisUnavailable
from reconciler.jobs_table import RowChange, Store
from reconciler.model import (
    Action,
    ActiveRow,
    BoundedMemory,
    CancelIntent,
    Decision,
    Doom,
    Orphan,
    Reason,
    RqJob,
    RqStatus,
    WorkerState,
    decide,
)
from reconciler.rq_layout import WorkerRecord
from reconciler.rq_state import RqState
from reconciler.stop import HorseStop
from reconciler.workers import Workers

if TYPE_CHECKING:  # prometheus_client is imported only where metrics are served
    from reconciler.metrics import Metrics

log = structlog.get_logger("reconciler.reconcile")

LOG_EACH_MAX = 50
# A sweep page believes Redis about missing jobs on an answer this recent (one INFO round
# trip a page otherwise). It acts on "missing" only for a row with a cancel intent; the
# rows it holds as not found are read again, with a fresh answer, before any is failed.
AUTHORITY_MAX_AGE = 1.0


@dataclass
class PassReport:
    """What one pass did. A sweep with an `on_page` sink hands each page's report there
    and keeps only the counters: its lists (changes, horse stops, RQ cancels, retries)
    never grow past a page, however many rows the sweep changes."""

    checked: int = 0
    # Applied (or, in a dry run, decided) changes: `changed` counts them all.
    changed: int = 0
    changes: list[RowChange] = field(default_factory=list)
    lost_races: int = 0
    horse_stops: list[HorseStop] = field(default_factory=list)
    breaker_open: bool = False
    not_found_held: int = 0
    # Rows whose decision rests on a worker gone by Redis' word alone: held for a sweep to
    # judge together (event path), or refused by the worker breaker (sweep).
    gone_held: int = 0
    worker_breaker_open: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    oldest_age: float = 0.0
    stuck: int = 0
    duration: float = 0.0
    # RQ ids to read again: at once (their change lost a race: the row moved under us, so
    # the reading it was decided on is stale), or after a while (another transaction held
    # the row locked). Bounded by the rows of one pass.
    retry_now: list[str] = field(default_factory=list)
    retry_later: list[str] = field(default_factory=list)
    # RQ ids of waiting jobs whose row is (now) cancelled: to cancel with RQ's API.
    rq_cancels: list[str] = field(default_factory=list)
    # A sweep's: active rows whose job is `queued`, by queue; and of those queues, the ones
    # no live worker listens to (never an orphan: the app may be deploying).
    waiting_queues: Counter[str] = field(default_factory=Counter)
    unserved: dict[str, int] = field(default_factory=dict)
    # Orphans to requeue or fail once their horse is stopped (orphans.py).
    orphans: list[Orphan] = field(default_factory=list)

    def merge(self, other: PassReport) -> None:
        self.checked += other.checked
        self.changed += other.changed
        self.changes += other.changes
        self.lost_races += other.lost_races
        self.horse_stops += other.horse_stops
        self.retry_now += other.retry_now
        self.retry_later += other.retry_later
        self.rq_cancels += other.rq_cancels
        self.orphans += other.orphans


class Evaluated(NamedTuple):
    row: ActiveRow
    rq_job: RqJob | None
    worker: WorkerState | None
    decision: Decision
    # The decision would differ were the worker alive, and only Redis says it is gone (no
    # process of it proven dead here): the worker breaker judges it.
    gone_by_redis: bool = False


class Reading(NamedTuple):
    jobs: dict[str, RqJob]
    workers: dict[str, WorkerRecord]
    intents: dict[Any, CancelIntent]
    # Deferred jobs that can never run (lifecycle.judge), rows' and others'.
    dooms: Mapping[str, Doom] = MappingProxyType({})


class Evaluations(list[Evaluated]):
    """A pass's decisions, and the RQ ids of doomed deferred jobs that have no row here
    (jobs in between in a dependency chain): cancelled in RQ all the same."""

    rq_cancels: list[str]

    def __init__(self, items: Iterable[Evaluated] = (), rq_cancels: Iterable[str] = ()) -> None:
        super().__init__(items)
        self.rq_cancels = list(rq_cancels)


# (from_status, to_status, reason) of a RowChange: what the transitions counter counts.
_KIND = itemgetter(1, 2, 4)


class Reconciler:
    def __init__(self, cfg: Config, store: Store, rq: RqState, workers: Workers,
                 metrics: Metrics | None) -> None:
        """`metrics`: None in a one-shot command, which nothing scrapes."""
        self.cfg = cfg
        self.store = store
        self.rq = rq
        self.workers = workers
        self.metrics = metrics
        # Dependency graphs that could not be judged, each logged once.
        self._unjudged = BoundedMemory(1000)

    # -- evaluate ---------------------------------------------------------------------------

    async def read(self, rows: Sequence[ActiveRow], settle: set[str] | None = None,
                   known_intents: dict[Any, CancelIntent] | None = None, *,
                   id_range: bool = False, extra_deferred: Iterable[str] = ()) -> Reading:
        """Everything `rows` need from the backends: their jobs and the workers of the
        started ones (Redis), and their cancel intents (Postgres, asked once the jobs are
        read, beside the workers; unless `known_intents` already has one for every row: the
        cancel flow's own request).

        `settle`: RQ ids whose "canceled but a worker holds it" is to be taken as final.
        `id_range`: `rows` are a sweep page, ordered by id (intents are asked by its bounds).
        `extra_deferred`: RQ ids of deferred jobs with no row here, whose dependencies are
        judged with the rows' (the event path found them below a job that ended).
        """
        rq_ids = [r.row.rq_id for r in rows if r.row.rq_id]
        asking: asyncio.Task[dict[Any, CancelIntent]] | None = None
        try:
            jobs = await self.rq.read_jobs(rq_ids)
            if any(j.status is RqStatus.MISSING for j in jobs.values()):
                # "Not found" from a Redis that is loading or still syncing as a replica is
                # no answer at all: an outage for this pass, retried like one.
                why = await self.rq.not_authoritative(
                    max_age=AUTHORITY_MAX_AGE if id_range else 0.0)
                if why:
                    raise RedisUnavailable(f"{why}: not believed about missing jobs")
            # The intents are asked only now, after RQ answered: whatever a cancel does to
            # a job in RQ (canceled, stopped, failed by its SIGTERM) follows its request's
            # INSERT, so a job read in such a state is read with that cancel's intent.
            # Asked before (or beside) the RQ read, a pass could see the job ended by a
            # cancel and no cancel, and sync the row `failed` instead of `cancelled`.
            if id_range and rows and self.store.id_ranges_are_exact:
                asking = asyncio.create_task(self.store.cancel_intents_between(
                    rows[0].row.id, rows[-1].row.id))
            elif not (known_intents and all(r.row.id in known_intents for r in rows)):
                asking = asyncio.create_task(self.store.cancel_intents([r.row.id for r in rows]))
            for rid in settle or ():
                if rid in jobs and jobs[rid].in_flight:
                    jobs[rid] = jobs[rid]._replace(in_flight=False)
            started = [j for j in jobs.values() if j.status is RqStatus.STARTED]
            workers = await self.rq.read_workers(j.worker_name for j in started if j.worker_name)
            deferred = [j.id for j in jobs.values() if j.status is RqStatus.DEFERRED]
            deferred += extra_deferred
            dooms = await self.dooms(deferred) if deferred else {}
            intents = await asking if asking is not None else {}
            unsure = [r.row.rq_id for r in rows if r.row.id in intents and r.row.rq_id
                      and jobs[r.row.rq_id].status is RqStatus.MISSING]
            if unsure and not await self.rq.workers_registered():
                # A cancel of a job this Redis does not have, where no worker is registered
                # either: the job may run on, looked for in the wrong db or key prefix.
                # "Not found" is no proof that it ended: nothing is decided on it.
                for rid in unsure:
                    jobs[rid] = jobs[rid]._replace(status=RqStatus.UNREADABLE)
        finally:
            await abandon(asking)
        return Reading(jobs, workers, intents, dooms)

    async def dooms(self, deferred: Sequence[str]) -> dict[str, Doom]:
        """Which of the deferred jobs `deferred` (and of the deferred jobs they wait for) can
        never run, read fresh: one graph script, and, if any is doomed, one lookup of the
        cancel requests that ended the jobs at the root of their chains."""
        graph, cut = await self.rq.read_graph(deferred)
        verdicts = lifecycle.judge(graph)
        for rq_id, v in verdicts.items():
            if v.problem and self._unjudged.first_time(rq_id, v.problem):
                log.warning("dependency_unjudged", rq_id=rq_id, problem=v.problem,
                            graph_cut_short=cut)
        roots = lifecycle.roots(verdicts)
        if not roots:
            return {}
        intents = await self.store.cancel_intents_by_rq_ids(sorted(roots))
        if intents and self.cfg.cancel.dependents == "enqueue":
            # Those cancels enqueue their dependents (RQ's enqueue_dependents=True): they
            # block nobody.
            verdicts = lifecycle.judge(graph, spared=intents.keys())
        return lifecycle.with_causes(verdicts, intents)

    async def evaluate(self, rows: Sequence[ActiveRow],
                       extra_intents: dict[Any, CancelIntent] | None = None,
                       settle: set[str] | None = None, *,
                       reading: Reading | None = None,
                       extra_deferred: Iterable[str] = ()) -> Evaluations:
        """Decide each of `rows` on a fresh `read()` (or on `reading`, made for them), after
        the worker tracker has learnt from that reading (which workers live, which horses
        it can prove now)."""
        reading = reading if reading is not None else await self.read(
            rows, settle, extra_intents, extra_deferred=extra_deferred)
        states = await self.workers.observe(reading.jobs, reading.workers)
        if extra_intents:
            reading.intents.update(extra_intents)
        return self.decide(rows, reading, states)

    def decide(self, rows: Sequence[ActiveRow], reading: Reading,
               states: dict[str, WorkerState]) -> Evaluations:
        """The pure part: `decide()` for each row on one reading."""
        jobs, intents, dooms = reading.jobs, reading.intents, reading.dooms
        min_age = self.cfg.sweep.min_age_seconds
        kill = self.cfg.cancel.orphaned_horse == "kill"
        requeue = self.cfg.orphans.requeue != "never"
        words = self.cfg.jobs.statuses
        out = Evaluations()
        for ar in rows:
            row = ar.row
            job = jobs.get(row.rq_id) if row.rq_id else None
            worker: WorkerState | None = None
            if job is not None and job.status is RqStatus.STARTED:
                worker = states.get(job.worker_name) if job.worker_name else WorkerState(
                    "", gone_because="job has no worker_name")
            cancel = intents.get(row.id)
            doom = dooms.get(job.id) if job is not None and dooms else None
            d = decide(row, job, worker, cancel, words,
                       old_enough=ar.age_seconds >= min_age, orphaned_horse_kill=kill, doom=doom,
                       requeue_orphans=requeue)
            by_redis = False
            if worker is not None and worker.name and not worker.alive and not worker.local \
                    and (d.to_status is not None or d.action is not Action.NONE):
                alive = WorkerState(worker.name, "", False, worker.pid, worker.current_job)
                by_redis = d != decide(row, job, alive, cancel, words,
                                       old_enough=ar.age_seconds >= min_age,
                                       orphaned_horse_kill=kill, doom=doom,
                                       requeue_orphans=requeue)
            out.append(Evaluated(ar, job, worker, d, by_redis))
        if dooms:
            with_rows = {ar.row.rq_id for ar in rows}
            out.rq_cancels = [rid for rid in dooms if rid not in with_rows]
        return out

    # -- apply --------------------------------------------------------------------------------

    def to_change(self, ev: Evaluated) -> RowChange | None:
        """The guarded transition for a decision that changes its row (runs per change:
        positional, and the StrEnum members are the strs they stand for)."""
        d = ev.decision
        if d.to_status is None:
            return None
        row, job = ev.row.row, ev.rq_job
        reason = d.reason or ""
        if job is None:
            return RowChange(row.id, row.status, d.to_status, d.error, reason, "", None, None,
                             d.set_started_at, d.set_completed_at, dict(d.detail))
        detail = {"rq_id": job.id, **d.detail} if d.detail else {"rq_id": job.id}
        if job.status is RqStatus.UNKNOWN:
            detail["rq_raw_status"] = job.raw_status
        # RQ's times travel only where the statement uses them (each is a datetime to encode).
        return RowChange(row.id, row.status, d.to_status, d.error, reason, job.status,
                         job.started_at if d.set_started_at else None,
                         job.ended_at if d.set_completed_at else None,
                         d.set_started_at, d.set_completed_at, detail)

    async def apply(self, evaluated: Sequence[Evaluated], *, dry_run: bool = False,
                    hold_not_found: bool = False, hold_gone: bool = False,
                    ) -> tuple[PassReport, list[Evaluated]]:
        """Apply decided changes; returns the report and (if asked) the held ones: not
        found (`decision.not_found`), and those resting on a worker gone by Redis' word
        alone (`gone_by_redis`: neither their change nor their horse stop is made)."""
        report = PassReport(checked=len(evaluated))
        held: list[Evaluated] = []
        changes: list[RowChange] = []
        cancel_if_applied: dict[Any, str] = {}
        for ev in evaluated:
            d = ev.decision
            if hold_gone and ev.gone_by_redis:
                held.append(ev)
                continue
            if d.action is Action.STOP_HORSE and ev.rq_job is not None:
                report.horse_stops.append(HorseStop(
                    ev.row.row.id, ev.rq_job.id, ev.rq_job.worker_name,
                    str(d.detail.get("why") or d.error or "orphan"),
                    for_cancel=d.reason is not Reason.ORPHANED))
            elif d.action is Action.REQUEUE_ORPHAN and ev.rq_job is not None:
                report.orphans.append(Orphan(
                    ev.row.row.id, ev.row.row.status, ev.rq_job.id, ev.rq_job.worker_name,
                    ev.rq_job.started_at, str(d.detail.get("gone_because") or "")))
            elif d.action is Action.CANCEL_RQ and ev.rq_job is not None:
                if d.to_status is None:
                    report.rq_cancels.append(ev.rq_job.id)
                else:  # only once the row is cancelled: a lost race decides again
                    cancel_if_applied[ev.row.row.id] = ev.rq_job.id
            if d.to_status is None:
                continue
            if hold_not_found and d.not_found:
                held.append(ev)
                continue
            ch = self.to_change(ev)
            if ch is not None:
                changes.append(ch)
        if isinstance(evaluated, Evaluations):
            report.rq_cancels += evaluated.rq_cancels
        if dry_run:
            report.changes = changes
            report.changed = len(changes)
            report.rq_cancels += cancel_if_applied.values()
            return report, held
        result = await self.store.apply(changes)
        applied = result.applied
        report.changes = applied
        report.changed = len(applied)
        # Rows held locked elsewhere (decided again by a later pass) and rows the database
        # refused (poison, logged and counted by the store) did not lose a race.
        report.lost_races = len(changes) - len(applied) - len(result.locked) - len(result.rejected)
        if report.lost_races:
            settled = {c.job_id for c in applied}
            settled.update(c.job_id for c in result.rejected)
            settled.update(c.job_id for c in result.locked)
            report.retry_now = _rq_ids(c for c in changes if c.job_id not in settled)
        report.retry_later = _rq_ids(result.locked)
        if cancel_if_applied:
            report.rq_cancels += (cancel_if_applied[c.job_id] for c in applied
                                  if c.job_id in cancel_if_applied)
        now = datetime.now(UTC)
        # One line per transition, unless a batch is large (a first sweep over a neglected
        # table): then those go to debug and one summary line to info. The audit table
        # keeps every one of them either way.
        each = log.info if len(applied) <= LOG_EACH_MAX else log.debug
        # Skip building 500 debug events a page nobody will see (a first sweep over a
        # neglected table is exactly when the CPU matters).
        quiet = len(applied) > LOG_EACH_MAX and not log.is_enabled_for(logging.DEBUG)
        summary = Counter(map(_KIND, applied))
        if self.metrics is not None:
            for (f, t, r), n in summary.items():
                self.metrics.transitions.labels(f, t, r).inc(n)
            lag = self.metrics.sync_lag
            for ch in applied:
                # set_completed_at of a synced change is RQ's ended_at
                if ch.reason == Reason.SYNCED and ch.set_completed_at is not None:
                    lag.observe(max(0.0, (now - ch.set_completed_at).total_seconds()))
        if not quiet:
            for ch in applied:
                each("job_transition", job_id=str(ch.job_id), from_status=ch.from_status,
                     to_status=ch.to_status, reason=ch.reason, rq_status=ch.rq_status,
                     error=ch.error or None)
        if len(applied) > LOG_EACH_MAX:
            log.info("job_transitions", count=len(applied),
                     by_kind={f"{f}->{t} ({r})": n for (f, t, r), n in summary.items()},
                     first_job_ids=[str(ch.job_id) for ch in applied[:10]],
                     hint="every transition is in rq_reconciler_events")
        if report.lost_races:
            log.info("transitions_lost_race", count=report.lost_races)
        return report, held

    # -- entry points -------------------------------------------------------------------------

    async def reconcile_rq_ids(self, rq_ids: Sequence[str]) -> PassReport:
        """The event path: rows looked up by RQ id (= ANY), one pass. Rows whose job is
        not found are not failed here: they are counted in `not_found_held` for the
        caller to judge together, under the mass-orphan breaker (a FLUSHDB makes every
        worker heartbeat wake every running job)."""
        looking = asyncio.create_task(self.store.rows_by_rq_ids(rq_ids))
        try:
            # Beside the rows: the deferred jobs below those of `rq_ids` that ended (their
            # dependents, and theirs), whether or not they have rows, and the deferred ones
            # among `rq_ids` themselves.
            graph, _cut = await self.rq.read_graph(rq_ids, down=True)
            rows = await looking
        finally:
            await abandon(looking)
        doomed = {j for j, v in lifecycle.judge(graph).items() if v.doom is not None}
        rowless: set[str] = set()
        if doomed:
            have = {r.row.rq_id for r in rows}
            extra = sorted(doomed - have)
            if extra:
                rows = [*rows, *await self.store.rows_by_rq_ids(extra)]
                rowless = doomed - {r.row.rq_id for r in rows}
        if not rows and not rowless:
            return PassReport()
        evaluated = await self.evaluate(rows, extra_deferred=sorted(rowless))
        report, held = await self.apply(evaluated, hold_not_found=True, hold_gone=True)
        report.gone_held = sum(1 for ev in held if ev.gone_by_redis)
        report.not_found_held = len(held) - report.gone_held
        return report

    async def reconcile_job_ids(self, job_ids: Sequence[Any],
                                intents: dict[Any, CancelIntent] | None = None,
                                settle: set[str] | None = None) -> PassReport:
        """`settle`: RQ ids whose "canceled but a worker holds it" is to be taken as final
        (the cancel flow waited for that worker long enough)."""
        rows = await self.store.rows_by_ids(job_ids)
        if not rows:
            return PassReport()
        evaluated = await self.evaluate(rows, intents, settle)
        report, _ = await self.apply(evaluated)
        return report

    async def reconcile_reading(self, rows: Sequence[ActiveRow], jobs: dict[str, RqJob],
                                intents: dict[Any, CancelIntent]) -> PassReport:
        """One pass over `rows` on RQ state the caller read a moment ago (jobs that are not
        running: no worker is read). The cancel flow has just seen the worker record the
        end of the job it stopped; reading it all again would only add round trips. The
        rows' side needs no fresh read: each change is guarded by the status it was
        decided from, and a lost race says so (`lost_races`)."""
        reading = Reading(dict(jobs), {}, dict(intents))
        report, _ = await self.apply(await self.evaluate(rows, reading=reading))
        return report


def _rq_ids(changes: Iterable[RowChange]) -> list[str]:
    return [rid for c in changes if isinstance(rid := c.detail.get("rq_id"), str)]
