"""One reconcile pass: rows -> read RQ fresh -> decide -> one guarded batch UPDATE.

The sweep is the same pass over every active row, page by page (keyset pagination, one
Redis pipeline and one UPDATE per page). A pass never holds a transaction across Redis
calls and never reads a Redis error as "not found": on RedisUnavailable it stops and
changes nothing more. "Not found" failures are held back until the whole sweep has been
seen, so that the mass-orphan breaker can refuse them all at once; so are the decisions
that rest on a worker being gone by Redis' word alone (the worker breaker: a failover, a
flush or a jump of the server's clock expires every worker hash at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from reconciler import lifecycle
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
    Page,
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
# How long after a cancel each sweep still looks for its job to appear in RQ.
RECENTLY_CANCELLED_SECONDS = 3600.0
# A sweep page believes Redis about missing jobs on an answer this recent (one INFO round
# trip a page otherwise). It acts on "missing" only for a row with a cancel intent; the
# rows it holds as not found are read again, with a fresh answer, before any is failed.
AUTHORITY_MAX_AGE = 1.0
# The worker breaker: a sweep that would take more than sweep.max_orphan_fraction of the
# workers it knows (those it judged, and those RQ registers), and at least this many, for
# gone on Redis' word alone (no process of theirs proven dead on this host) takes none.
WORKER_BREAKER_MIN = 3

# Queues a sweep counts waiting rows of (the unserved-queues gauge and `check`).
MAX_QUEUES_COUNTED = 10_000


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
# Takes one page's report (its lists are emptied once it returns).
PageSink = Callable[[PassReport], Awaitable[None]]
# A page of rows on its way (Reconciler._pipeline).
Rows = Coroutine[Any, Any, list[ActiveRow]]


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
            await _abandon(asking)
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
            await _abandon(looking)
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

    async def sweep(self, *, dry_run: bool = False, force: bool = False,
                    on_page: PageSink | None = None) -> PassReport:
        """Every active row, page by page. Raises BackendUnavailable if a backend fails.

        With `on_page`, each page's report (its changes, horses to stop, RQ jobs to cancel,
        ids to read again) goes there as soon as the page is applied, and is not kept: a
        sweep's memory stays bounded by the page size, not by the rows it changes. Rows
        held for the mass-orphan breaker are kept as bare ids (8 bytes each for bigint
        ids) and read afresh at the end.
        """
        t0 = time.monotonic()
        total = PassReport()
        held = _HeldIds()
        gone = _GoneWorkers()
        counts: dict[str, int] = {s: 0 for s in self.cfg.jobs.statuses.active}
        stuck_after = self.cfg.sweep.stuck_after_seconds
        size = self.cfg.sweep.page_size

        def next_page(previous: list[ActiveRow] | None) -> Rows | None:
            if previous is None:
                return self.store.active_page(None, size)
            if isinstance(previous, Page):  # (it may have skipped rows it could not read)
                read, last = previous.read, previous.last_id
            else:
                read, last = len(previous), previous[-1].row.id if previous else None
            if read < size:
                return None  # a short page is the last one
            return self.store.active_page(last, size)

        async def write(page: list[ActiveRow], evaluated: list[Evaluated]) -> None:
            await self._apply_page(page, evaluated, total, held, gone, counts, stuck_after,
                                   dry_run, on_page)

        await self._pipeline(next_page, lambda page: self._read_page(page, dry_run), write)
        total.counts = counts
        total.not_found_held = len(held)
        if held:
            n, checked = len(held), total.checked
            trips = n >= self.cfg.sweep.max_orphan_min and n > self.cfg.sweep.max_orphan_fraction * checked
            if trips and not force:
                total.breaker_open = True
                log.error("orphan_breaker_open", not_found=n, checked=checked,
                          max_fraction=self.cfg.sweep.max_orphan_fraction,
                          max_min=self.cfg.sweep.max_orphan_min,
                          hint="is this the right Redis and db? `rq-reconciler sweep --force` "
                               "overrides once")
            else:
                if trips:
                    log.warning("orphan_breaker_forced", not_found=n, checked=checked)
                await self._apply_not_found(held, total, counts, stuck_after, dry_run=dry_run,
                                            on_page=on_page)
        if gone.rows:
            await self._judge_gone(gone, total, counts, stuck_after, dry_run=dry_run,
                                   force=force, on_page=on_page)
        await self._recheck_cancelled(total, dry_run=dry_run, on_page=on_page)
        if total.waiting_queues:
            served = await self.rq.served_queues()
            total.unserved = {q: n for q, n in sorted(total.waiting_queues.items())
                              if q not in served}
        if not dry_run:
            await self.store.prune_first_seen()
        total.duration = time.monotonic() - t0
        return total

    async def _judge_gone(self, gone: _GoneWorkers, total: PassReport, counts: dict[str, int],
                          stuck_after: float, *, dry_run: bool, force: bool,
                          on_page: PageSink | None) -> None:
        """The worker breaker over a whole sweep: the rows whose worker only Redis says is
        gone are failed (read afresh first) unless that would take too many of the
        workers known for gone at once."""
        total.gone_held = len(gone.rows)
        known = len(gone.judged | set(await self.rq.worker_names()))
        n = len(gone.names)
        fraction = self.cfg.sweep.max_orphan_fraction
        trips = n >= WORKER_BREAKER_MIN and n > fraction * known
        if trips and not force:
            total.worker_breaker_open = True
            log.error("worker_breaker_open", gone=n, known=known, rows=len(gone.rows),
                      max_fraction=fraction, first_workers=sorted(gone.names)[:10],
                      hint="their hashes vanished at once: a failover, a flush or a jump of "
                           "the Redis server's clock? `rq-reconciler sweep --force` "
                           "overrides once")
            return
        if trips:
            log.warning("worker_breaker_forced", gone=n, known=known)
        await self._apply_not_found(gone.rows, total, counts, stuck_after, dry_run=dry_run,
                                    on_page=on_page)

    async def _recheck_cancelled(self, total: PassReport, *, dry_run: bool,
                                 on_page: PageSink | None) -> None:
        """Rows cancelled on request lately: a job enqueued (or an RQ id stored) after the
        cancel shows up here even if its keyspace event was lost. Only actions come of
        it (cancel the waiting RQ job, stop a horse); a cancelled row never changes."""
        rows = await self.store.recently_cancelled(RECENTLY_CANCELLED_SECONDS)
        if not rows:
            return
        report, _ = await self.apply(await self.evaluate(rows), dry_run=dry_run)
        report.checked = 0  # not active rows
        await _hand_over(report, on_page)
        total.merge(report)

    async def _read_page(self, page: list[ActiveRow], dry_run: bool) -> Reading:
        if not dry_run:
            await self.store.remember_first_seen(
                [r.row.id for r in page if r.row.started_at is None and r.row.first_seen is None]
            )
        return await self.read(page, id_range=True)

    async def _apply_page(self, page: list[ActiveRow], evaluated: list[Evaluated], total: PassReport,
                          held: _HeldIds, gone: _GoneWorkers, counts: dict[str, int],
                          stuck_after: float, dry_run: bool, on_page: PageSink | None) -> None:
        report, page_held = await self.apply(evaluated, dry_run=dry_run, hold_not_found=True,
                                             hold_gone=True)
        # The gauges describe the table as this sweep leaves it.
        now_status = {c.job_id: c.to_status for c in report.changes}
        for r in page:
            status = now_status.get(r.row.id, r.row.status)
            if status not in counts:
                continue  # terminal now
            counts[status] += 1
            total.oldest_age = max(total.oldest_age, r.age_seconds)
            if r.age_seconds > stuck_after:
                total.stuck += 1
        held.add(ev.row.row.id for ev in page_held if not ev.gone_by_redis)
        gone.add(evaluated, page_held)
        waiting = total.waiting_queues
        for ev in evaluated:
            j = ev.rq_job
            if j is not None and j.status is RqStatus.QUEUED and j.origin and (
                    j.origin in waiting or len(waiting) < MAX_QUEUES_COUNTED):
                waiting[j.origin] += 1
        await _hand_over(report, on_page)
        total.merge(report)

    async def _apply_not_found(self, held: _HeldIds, total: PassReport,
                               counts: dict[str, int], stuck_after: float, *, dry_run: bool,
                               on_page: PageSink | None) -> None:
        """The rows held as "not found" (or on a worker gone by Redis' word alone), read
        afresh (rows and RQ, a chunk at a time) right before failing them: they were read
        up to a whole sweep ago, and a job may have been enqueued, or a row changed, since.
        What the fresh reading decides is applied, "not found" included (the breaker has
        judged). They go through the sweep's own
        pipeline, a chunk of ids a page."""
        chunks = held.chunks(self.cfg.sweep.page_size)

        def next_chunk(_previous: list[ActiveRow] | None) -> Rows | None:
            chunk = next(chunks, None)
            return None if chunk is None else self.store.rows_by_ids(chunk)

        async def write(_rows: list[ActiveRow], evaluated: list[Evaluated]) -> None:
            report, _ = await self.apply(evaluated, dry_run=dry_run)
            report.checked = 0
            # They were counted as active when their page was read; what changed them moves
            # them. (The oldest age stays: it is a maximum, and a lower bound is not worth
            # a pass.)
            age = {ev.row.row.id: ev.row.age_seconds for ev in evaluated}
            for ch in report.changes:
                if ch.from_status in counts:
                    counts[ch.from_status] -= 1
                    if age.get(ch.job_id, 0.0) > stuck_after:
                        total.stuck -= 1
                if ch.to_status in counts:
                    counts[ch.to_status] += 1
                    if age.get(ch.job_id, 0.0) > stuck_after:
                        total.stuck += 1
            await _hand_over(report, on_page)
            total.merge(report)

        await self._pipeline(next_chunk, self.read, write)

    async def _pipeline(self, fetch: Callable[[list[ActiveRow] | None], Rows | None],
                        read: Callable[[list[ActiveRow]], Coroutine[Any, Any, Reading]],
                        write: Callable[[list[ActiveRow], list[Evaluated]],
                                        Coroutine[Any, Any, None]]) -> None:
        """Pages of rows through read, decide and write, three pages in the air at once:
        page i is decided while page i+1 is read (Redis, and its cancel intents) and page
        i-1 is written, and the rows of page i+2 are on their way. Pages never share a
        row, so their guarded writes commute; each is written once the one before it is.
        `fetch(previous)` starts the next page's rows (None: there are no more); an empty
        page is skipped, not an end."""
        fetching: asyncio.Task[list[ActiveRow]] | None = None
        reading: asyncio.Task[Reading] | None = None
        writing: asyncio.Task[None] | None = None
        page: list[ActiveRow] = []  # the page `reading` reads

        def start(previous: list[ActiveRow] | None) -> asyncio.Task[list[ActiveRow]] | None:
            rows = fetch(previous)
            return None if rows is None else asyncio.create_task(rows)

        async def read_next() -> None:
            """The next page that has rows, and its read started (`reading` stays None
            when there are no more)."""
            nonlocal fetching, reading, page
            while fetching is not None:
                page = await fetching
                fetching = start(page)
                if page:
                    reading = asyncio.create_task(read(page))
                    # Let the read send its request before the current page's decisions
                    # take the CPU (they do not yield), so that Redis works meanwhile.
                    await asyncio.sleep(0)
                    return

        try:
            fetching = start(None)
            await read_next()
            while reading is not None:
                got, reading = reading, None
                page_reading = await got
                current = page
                await read_next()
                evaluated = await self.evaluate(current, reading=page_reading)
                if writing is not None:
                    done, writing = writing, None
                    await done  # raises the previous page's error, if it had one
                writing = asyncio.create_task(write(current, evaluated))
            if writing is not None:
                done, writing = writing, None
                await done
        finally:
            await _abandon(fetching, reading)
            # A write in flight is let finish, not cancelled: cancelling a statement that may
            # already have committed would leave its transitions out of the report and logs.
            await _settle(writing)


class _HeldIds:
    """Job ids, compactly: 64-bit integer ids in an array (8 bytes each, where a list of
    ints costs about 36), any other id type in a list."""

    def __init__(self) -> None:
        self._ints = array("q")
        self._other: list[Any] = []

    def add(self, ids: Iterable[Any]) -> None:
        for i in ids:
            if type(i) is int and -(2 ** 63) <= i < 2 ** 63:
                self._ints.append(i)
            else:
                self._other.append(i)

    def __len__(self) -> int:
        return len(self._ints) + len(self._other)

    def chunks(self, size: int) -> Iterator[list[Any]]:
        for i in range(0, len(self._ints), size):
            yield self._ints[i:i + size].tolist()
        for i in range(0, len(self._other), size):
            yield self._other[i:i + size]


class _GoneWorkers:
    """What a sweep saw of workers: those it judged (bounded by the workers there are),
    those only Redis says are gone, and the rows whose decision rests on that."""

    def __init__(self) -> None:
        self.judged: set[str] = set()
        self.names: set[str] = set()
        self.rows = _HeldIds()

    def add(self, evaluated: Iterable[Evaluated], held: Iterable[Evaluated]) -> None:
        self.judged.update(ev.worker.name for ev in evaluated
                           if ev.worker is not None and ev.worker.name)
        for ev in held:
            if ev.gone_by_redis and ev.worker is not None:
                self.names.add(ev.worker.name)
                self.rows.add((ev.row.row.id,))


def _rq_ids(changes: Iterable[RowChange]) -> list[str]:
    return [rid for c in changes if isinstance(rid := c.detail.get("rq_id"), str)]


async def _hand_over(report: PassReport, sink: PageSink | None) -> None:
    """Give a page's report to the sweep's sink, then empty its lists (the counters stay
    for the sweep's totals)."""
    if sink is None:
        return
    await sink(report)
    report.changes = []
    report.horse_stops = []
    report.rq_cancels = []
    report.orphans = []
    report.retry_now = []
    report.retry_later = []


async def _settle(task: asyncio.Task[Any] | None) -> None:
    """Wait for `task` to end and collect its outcome (the caller has already seen or is
    already raising an error). If the caller is cancelled meanwhile, so is the task."""
    if task is None:
        return
    try:
        await asyncio.wait([task])
    finally:
        if not task.done():
            task.cancel()
    if not task.cancelled():
        task.exception()


async def _abandon(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel unfinished helper tasks and collect every outcome, so that no error is left
    unretrieved. Unlike `suppress(BaseException): await t`, a cancellation of the caller
    itself still propagates."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    if live:
        await asyncio.wait(live)
    for t in live:
        if not t.cancelled():
            t.exception()
