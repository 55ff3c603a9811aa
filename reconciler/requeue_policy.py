"""The pure decision for an orphan: a job whose worker died mid-run. Fail it, queue it
again (and how), or wait.

No I/O, no clock, no state: every fact is passed in (`OrphanFacts`), so it is tested by
tables and properties. Two things it must never do: answer "requeue" while the job's
previous horse is not proven gone (two copies of one job would run), or while a cancel
is pending (a cancel always wins).

The policies (`[orphans] requeue`):
- "retries": RQ's own rule, applied at once instead of on RQ's maintenance pass: a job
  with RQ retries left is retried as Job.retry() would (one retry spent; its interval
  honoured, from the scheduled registry when > 0); without, it fails.
- "always": queued again up to `max_requeues` times (after `requeue_delay_seconds`,
  doubling), then failed saying how many times it was requeued.
- "never": failed.
Under "retries" and "always", a worker that had been asked to shut down (RQ records
`shutdown_requested_date` on SIGTERM) and died mid-job lost it through no fault of the
job: it is queued again at once without spending a retry or a requeue, up to
`max_disruptions` times.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple

from reconciler.config import MAX_REQUEUE_DELAY_SECONDS, OrphansConfig


class Horse(enum.StrEnum):
    """What is known of the job's previous work-horse."""

    # Proven gone: stopped by our ladder, or its worker is gone by the server's own facts
    # (hash expired, missing or marked dead) and no replica on its host says otherwise.
    GONE = "gone"
    # Still running (it survived the ladder), or not yet looked at.
    RUNNING = "running"
    # On this host, but never proven (the daemon was down when it started): it cannot be
    # told from any other process, so it may still run and is never signalled.
    UNKNOWN = "unknown"


class Cause(enum.StrEnum):
    """The `cause` label of rq_reconciler_requeues_total (strands.py adds `stranded`)."""

    WORKER_DIED = "worker_died"
    DISRUPTION = "disruption"


class Kind(enum.StrEnum):
    FAIL = "fail"
    REQUEUE = "requeue"
    WAIT = "wait"


class OrphanFacts(NamedTuple):
    worker: str
    horse: Horse
    # A cancel request is pending (or the row is being cancelled).
    cancel: bool = False
    # The worker recorded shutdown_requested_date before it died.
    shutdown_requested: bool = False
    # RQ's raw `retries_left` / `retry_intervals` of the job hash (None: no Retry).
    retries_left: int | None = None
    retry_intervals: tuple[int, ...] = ()
    # Requeues and disruptions already made (our table), before this one.
    requeues: int = 0
    disruptions: int = 0
    # Why the worker is gone (the liveness judgement), for the failure text.
    gone_because: str = ""


class Verdict(NamedTuple):
    kind: Kind
    cause: Cause | None = None
    # Seconds before the job may run again (0: back on its queue now).
    delay: float = 0.0
    # Spend one of RQ's retries (retries_left - 1), as Job.retry() does.
    spend_retry: bool = False
    # For a fail: the row's error text. For a wait: why.
    text: str = ""

    @property
    def requeue(self) -> bool:
        return self.kind is Kind.REQUEUE


def rq_retry_interval(retries_left: int, intervals: Sequence[int]) -> int:
    """RQ's Job.get_retry_interval() (rq 2.12 and 3.0 alike): the interval before the
    retry that `retries_left` (> 0) is about to spend."""
    if not intervals:
        return 0
    index = max(len(intervals) - retries_left, 0)
    return max(0, int(intervals[min(index, len(intervals) - 1)]))


def requeue_delay(policy: OrphansConfig, requeues: int) -> float:
    """The wait before the requeue that follows `requeues` earlier ones: the configured
    delay, doubled each time, capped at a day."""
    if policy.requeue_delay_seconds <= 0:
        return 0.0
    return min(policy.requeue_delay_seconds * 2.0 ** min(requeues, 32), MAX_REQUEUE_DELAY_SECONDS)


def orphan_verdict(policy: OrphansConfig, f: OrphanFacts) -> Verdict:
    """What the orphan described by `f` becomes under `policy`."""
    if f.cancel:
        # The cancel completes it (the pass decides `cancelled` with the intent).
        return Verdict(Kind.WAIT, text="a cancel is pending")
    gone = f"Orphaned: worker {f.worker or '?'} is gone"
    why = f" ({f.gone_because})" if f.gone_because else ""
    if f.horse is Horse.UNKNOWN:
        # It may still run: no second copy may start, so it can only fail (as RQ would).
        return Verdict(Kind.FAIL, text=f"{gone}{why}; its horse is unknown here")
    if f.horse is not Horse.GONE:
        return Verdict(Kind.WAIT, text="its horse is not proven gone")
    if policy.requeue == "never":
        return Verdict(Kind.FAIL, text=gone + why)
    if f.shutdown_requested and f.disruptions < policy.max_disruptions:
        return Verdict(Kind.REQUEUE, Cause.DISRUPTION)
    if policy.requeue == "retries":
        left = f.retries_left
        if left is not None and left > 0:
            return Verdict(Kind.REQUEUE, Cause.WORKER_DIED,
                           float(rq_retry_interval(left, f.retry_intervals)), spend_retry=True)
        return Verdict(Kind.FAIL, text=gone + why)
    if f.requeues < policy.max_requeues:
        return Verdict(Kind.REQUEUE, Cause.WORKER_DIED, requeue_delay(policy, f.requeues))
    return Verdict(Kind.FAIL, text=f"{gone} (requeued {f.requeues} times)")
