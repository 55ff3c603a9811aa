"""The sweep: every active row, page by page, through the same pass as the event path
(reconcile.py), and the two breakers judged over the whole of it.

Keyset pagination, one Redis pipeline and one guarded UPDATE per page, three pages in the
air at once. "Not found" failures are held back until the whole sweep has been seen, so
that the mass-orphan breaker can refuse them all at once; so are the decisions that rest on
a worker being gone by Redis' word alone (the worker breaker: a failover, a flush or a jump
of the server's clock expires every worker hash at once). Held rows are kept as bare ids
and read afresh before anything is done to them.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any

import structlog

from reconciler.aio import abandon, settle
from reconciler.model import ActiveRow, Page, RqStatus
from reconciler.reconcile import Evaluated, PassReport, Reading, Reconciler

log = structlog.get_logger("reconciler.sweep")

# How long after a cancel each sweep still looks for its job to appear in RQ.
RECENTLY_CANCELLED_SECONDS = 3600.0
# The worker breaker: a sweep that would take more than sweep.max_orphan_fraction of the
# workers it knows (those it judged, and those RQ registers), and at least this many, for
# gone on Redis' word alone (no process of theirs proven dead on this host) takes none.
WORKER_BREAKER_MIN = 3
# Queues a sweep counts waiting rows of (the unserved-queues gauge and `check`).
MAX_QUEUES_COUNTED = 10_000

# Takes one page's report (its lists are emptied once it returns).
PageSink = Callable[[PassReport], Awaitable[None]]
# A page of rows on its way (Sweeper.pipeline).
Rows = Coroutine[Any, Any, list[ActiveRow]]


class Sweeper:
    """Sweeps with one Reconciler's reading, deciding and writing."""

    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec
        self.cfg = rec.cfg
        self.store = rec.store
        self.rq = rec.rq

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

        await self.pipeline(next_page, lambda page: self._read_page(page, dry_run), write)
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
        report, _ = await self.rec.apply(await self.rec.evaluate(rows), dry_run=dry_run)
        report.checked = 0  # not active rows
        await _hand_over(report, on_page)
        total.merge(report)

    async def _read_page(self, page: list[ActiveRow], dry_run: bool) -> Reading:
        if not dry_run:
            await self.store.remember_first_seen(
                [r.row.id for r in page if r.row.started_at is None and r.row.first_seen is None]
            )
        return await self.rec.read(page, id_range=True)

    async def _apply_page(self, page: list[ActiveRow], evaluated: list[Evaluated], total: PassReport,
                          held: _HeldIds, gone: _GoneWorkers, counts: dict[str, int],
                          stuck_after: float, dry_run: bool, on_page: PageSink | None) -> None:
        report, page_held = await self.rec.apply(evaluated, dry_run=dry_run, hold_not_found=True,
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
            report, _ = await self.rec.apply(evaluated, dry_run=dry_run)
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

        await self.pipeline(next_chunk, self.rec.read, write)

    async def pipeline(self, fetch: Callable[[list[ActiveRow] | None], Rows | None],
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
                evaluated = await self.rec.evaluate(current, reading=page_reading)
                if writing is not None:
                    done, writing = writing, None
                    await done  # raises the previous page's error, if it had one
                writing = asyncio.create_task(write(current, evaluated))
            if writing is not None:
                done, writing = writing, None
                await done
        finally:
            await abandon(fetching, reading)
            # A write in flight is let finish, not cancelled: cancelling a statement that may
            # already have committed would leave its transitions out of the report and logs.
            await settle(writing)


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
