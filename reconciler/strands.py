"""Jobs stranded in a queue's intermediate list, put back to work.

An RQ worker moves a job from its queue into `<queue>:intermediate` (BLMOVE) and, a few
milliseconds later, records an execution for it and forks its horse. A worker that dies
in between leaves the job there, `queued`, with no execution: it never ran, and nothing
will run it until RQ's maintenance fails it, 1 to 11 minutes later and only while some
worker serves that queue. Such a job seen twice, STRAND_SETTLE_SECONDS apart (no live
worker spends that long in that window), is put back at the front of its queue in one
atomic step (rq_api.requeue_stranded_sync: guarded, and never while RQ's maintenance holds
the queue) once a worker of that queue is known gone (the daemon's worker-gone judgement,
or its death seen); its row stays `queued` and an audit event says `requeued` (cause
`stranded`).
Under orphans.requeue = "never" the row fails at once instead (RQ's maintenance later
fails the job the same way).

Woken by a worker's death (a local pid exit, a worker key deleted or expired) and by every
sweep; it looks only while a sighting waits to ripen. It never decides on what it could not
read: an outage leaves every sighting to the next look.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import structlog

from reconciler.aio import Backoff, retry_forever
from reconciler.config import Config
from reconciler.health import Health
from reconciler.jobs_table import RowChange, Store
from reconciler.lifecycle import STRAND_SETTLE_SECONDS, StrandSighting, ripe, strand_decision
from reconciler.model import BoundedMemory
from reconciler.rq_layout import worker_gone_reason
from reconciler.rq_state import RqState
from reconciler.workers import Workers

if TYPE_CHECKING:
    from reconciler.metrics import Metrics

log = structlog.get_logger("reconciler.strands")

# Sightings remembered, and dead workers remembered to name in the audit detail.
MAX_SIGHTINGS = 10_000
MAX_GONE = 1000
# A dead worker counts as the one that may have stranded a job on a queue it served for
# this long after it was seen gone.
GONE_MEMORY_SECONDS = 900.0


class Strands:
    def __init__(self, cfg: Config, store: Store, rq: RqState, health: Health,
                 metrics: Metrics | None, workers: Workers | None = None, *,
                 settle: float = STRAND_SETTLE_SECONDS) -> None:
        self.cfg, self.store, self.rq, self.health, self.metrics = cfg, store, rq, health, metrics
        self.workers = workers
        self._undecided = BoundedMemory(1000)
        self.settle = settle
        self._seen: dict[tuple[str, str], StrandSighting] = {}
        # Recently gone workers: name -> (the queues it served, when it was seen gone).
        self._gone: OrderedDict[str, tuple[tuple[str, ...], float]] = OrderedDict()
        self._wake = asyncio.Event()
        self._to_read: set[str] = set()

    def poke(self, worker: str = "") -> None:
        """A worker died (its name, if known), or a sweep ran: look for stranded jobs."""
        if worker:
            self._to_read.add(worker)
            if len(self._to_read) > MAX_GONE:
                self._to_read.pop()
        self._wake.set()

    async def run(self) -> None:
        await retry_forever(self.one_round, event="strands_retry", backoff=Backoff(0.2, 10.0),
                            on_outage=self.health.outage)

    async def one_round(self) -> None:
        await self._wake.wait()
        self._wake.clear()
        while True:
            await self._learn_gone()
            wait = await self.look()
            if wait is None:
                return
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
                self._wake.clear()
            except TimeoutError:
                pass

    async def _learn_gone(self) -> None:
        """The queues of workers just seen dying (their hash outlives a SIGKILL)."""
        if not self._to_read:
            return
        names, self._to_read = sorted(self._to_read), set()
        queues = await self.rq.worker_queues(names)
        now = time.monotonic()
        for n in names:
            self._gone[n] = (tuple(queues.get(n, ())), now)
            self._gone.move_to_end(n)
        while len(self._gone) > MAX_GONE:
            self._gone.popitem(last=False)

    async def look(self) -> float | None:
        """Read the intermediate lists once: remember new sightings, act on ripe ones whose
        worker is known gone. Returns how long until the next sighting ripens (None:
        nothing waits to ripen; ripe ones whose worker is not known gone wait for the next
        death or sweep)."""
        found = await self.rq.read_strands()
        now = time.monotonic()
        current = {(s.queue, s.job_id) for s in found}
        for key in [k for k in self._seen if k not in current]:
            del self._seen[key]  # started, or gone: not stranded after all
        ripe_now: dict[str, list[StrandSighting]] = {}
        for s in found:
            key = (s.queue, s.job_id)
            seen = self._seen.get(key)
            if seen is None:
                if len(self._seen) < MAX_SIGHTINGS:
                    self._seen[key] = StrandSighting(s.queue, s.job_id, now)
            elif ripe(seen, now, self.settle):
                ripe_now.setdefault(s.queue, []).append(seen)
        if ripe_now:
            await self._act_on(ripe_now)
        waiting = [s.first_seen for s in self._seen.values() if not ripe(s, now, self.settle)]
        if not waiting:
            return None
        return max(0.01, min(waiting) + self.settle - time.monotonic())

    async def _act_on(self, ripe_now: dict[str, list[StrandSighting]]) -> None:
        """Which workers are gone (the ones we were told of, and every registered worker
        RQ's records or its pid say is gone) and which queues live workers serve; then each
        queue's ripe sightings, if a worker of that queue is known gone. A queue that a live
        worker also serves, with more sightings than gone workers, waits: one of them may be
        that worker's, however slow (each worker holds one job at a time)."""
        await self._learn_registered()
        live = await self.rq.served_queues()
        now = time.monotonic()
        for queue, sightings in sorted(ripe_now.items()):
            gone = [name for name, (queues, at) in reversed(self._gone.items())
                    if now - at <= GONE_MEMORY_SECONDS and (queue in queues or not queues)]
            if not gone or (queue in live and len(sightings) > len(gone)):
                if self._undecided.first_time((queue, len(sightings), len(gone))):
                    log.info("stranded_jobs_waiting", queue=queue, jobs=len(sightings),
                             gone_workers=len(gone), live_workers=queue in live,
                             why="no worker of this queue is known gone" if not gone else
                                 "more such jobs than gone workers while live ones serve it")
                continue
            for sighting in sightings:
                await self._act(sighting, gone[0])
                self._seen.pop((sighting.queue, sighting.job_id), None)

    async def _learn_registered(self) -> None:
        """Every worker in RQ's registry that is gone by the daemon's judgement (its hash
        missing or dead or silent past its TTL, nobody on its channel, or, on this host,
        its pid dead), remembered with the queues its hash names."""
        names = await self.rq.worker_names()
        if not names:
            return
        recs = await self.rq.read_workers(names)
        gone: list[str] = []
        for name, rec in recs.items():
            if self.workers is not None:
                dead = not self.workers.state(name, rec).alive
            else:
                dead = bool(worker_gone_reason(rec, name, self.rq.keys))
            if dead and name not in self._gone:
                gone.append(name)
        if gone:
            self._to_read.update(gone)
            await self._learn_gone()

    async def _act(self, s: StrandSighting, worker: str) -> None:
        requeue = self.cfg.orphans.requeue != "never"
        if requeue:
            outcome = await self.rq.requeue_stranded(s.queue, s.job_id)
            log.info("stranded_job", rq_id=s.job_id, queue=s.queue, worker=worker or None,
                     outcome=outcome)
            if outcome != "requeued":
                return
            if self.metrics is not None:
                self.metrics.requeues.labels(cause="stranded").inc()
        else:
            log.info("stranded_job", rq_id=s.job_id, queue=s.queue, worker=worker or None,
                     outcome="failed (orphans.requeue = never)")
        rows = await self.store.rows_by_rq_ids([s.job_id])
        changes: list[RowChange] = []
        for ar in rows:
            d = strand_decision(ar.row, self.cfg.jobs.statuses, requeue=requeue, worker=worker,
                                queue=s.queue)
            if d.to_status is None:
                continue
            changes.append(RowChange(ar.row.id, ar.row.status, d.to_status, d.error,
                                     d.reason or "", "queued", None, None, False,
                                     d.set_completed_at, {"rq_id": s.job_id, **d.detail}))
        if not changes:
            return
        result = await self.store.apply(changes)
        if self.metrics is not None:
            for ch in result.applied:
                self.metrics.transitions.labels(ch.from_status, ch.to_status, ch.reason).inc()
        for ch in result.applied:
            log.info("job_transition", job_id=str(ch.job_id), from_status=ch.from_status,
                     to_status=ch.to_status, reason=ch.reason, rq_status="queued",
                     error=ch.error or None)
