"""The pure core: what one active row should become, given what RQ says.

`decide()` does no I/O, reads no clock and keeps no state: everything it needs is passed
in, so it is tested by tables and properties. It must never move a row out of a
terminal state, and it must never read "Redis could not be asked" as "job not found".
"""

from __future__ import annotations

import enum
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, NamedTuple

from reconciler.config import Statuses


class RqStatus(enum.StrEnum):
    """RQ's job statuses (2.x and 3.x), plus three of ours for what RQ cannot say."""

    CREATED = "created"
    QUEUED = "queued"
    FINISHED = "finished"
    FAILED = "failed"
    STARTED = "started"
    DEFERRED = "deferred"
    SCHEDULED = "scheduled"
    STOPPED = "stopped"
    CANCELED = "canceled"
    # RQ 3 only (rq/job.py JobStatus): held back by a concurrency limit, or its
    # dependencies met and about to be enqueued. Both are still waiting to run.
    RATE_LIMITED = "rate_limited"
    READY_TO_ENQUEUE = "ready_to_enqueue"
    # The job hash is gone (never existed, expired, or deleted).
    MISSING = "missing"
    # The hash exists but its status field is absent or a word RQ does not use.
    UNKNOWN = "unknown"
    # The key exists but could not be read (a key of the wrong type, fields no RQ writes):
    # for this one job it is as if Redis had failed. Never "not found"; the row stays.
    UNREADABLE = "unreadable"


WAITING = frozenset({RqStatus.CREATED, RqStatus.QUEUED, RqStatus.DEFERRED, RqStatus.SCHEDULED,
                     RqStatus.RATE_LIMITED, RqStatus.READY_TO_ENQUEUE})
ENDED = frozenset({RqStatus.FINISHED, RqStatus.FAILED, RqStatus.STOPPED, RqStatus.CANCELED})


NO_DETAIL: Mapping[str, Any] = MappingProxyType({})


class Reason(enum.StrEnum):
    """The `reason` label of transitions_total and the audit table."""

    SYNCED = "synced"
    ORPHANED = "orphaned"
    CANCELLED = "cancelled"
    STARTED = "started"
    # A job put back on its queue (its row stays queued): a stranded job, an orphan.
    REQUEUED = "requeued"


class Action(enum.StrEnum):
    NONE = "none"
    # Stop the job's work-horse (cancel intent, or an orphaned horse with policy kill).
    STOP_HORSE = "stop_horse"
    # Cancel the RQ job with RQ's API: a cancel intent met the job still waiting in RQ
    # (enqueued after the cancel, or before RQ's own cancel got to it).
    CANCEL_RQ = "cancel_rq"
    # An orphan under a policy that may queue it again: its horse is stopped first, then
    # requeue_policy.orphan_verdict() decides on fresh facts (orphans.py carries it out).
    # The row is left as it is until then.
    REQUEUE_ORPHAN = "requeue_orphan"


# The per-row types below are NamedTuples, not frozen dataclasses: a sweep builds several
# per active row, and a frozen dataclass's __init__ (one object.__setattr__ per field) cost
# about 2 us against 0.5 us. They are just as immutable; change them with _replace().


class JobRow(NamedTuple):
    """One row of the application's jobs table, as read."""

    id: Any
    rq_id: str | None
    status: str
    started_at: datetime | None = None
    first_seen: datetime | None = None


class ActiveRow(NamedTuple):
    """A job row as the sweep and the lookups read it, with its age in seconds (since it
    started, or was first seen)."""

    row: JobRow
    age_seconds: float


class Page(list[ActiveRow]):
    """One page of the sweep: the rows read, and where the next page starts. A row the
    database could not hand over (poison on a read) is not in it, but the page's end and
    size count it: the next page starts after it, and a page short of rows it skipped is
    not taken for the last one."""

    __slots__ = ("last_id", "read")

    def __init__(self, rows: list[ActiveRow], last_id: Any, read: int) -> None:
        super().__init__(rows)
        self.last_id = last_id
        self.read = read


class RqJob(NamedTuple):
    """What Redis says about one RQ job, read fresh."""

    id: str
    status: RqStatus
    raw_status: str = ""
    worker_name: str = ""
    origin: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    exc_line: str = ""
    # Status says canceled, but a worker has already dequeued the job (RQ's Job.cancel()
    # raced the dequeue): the worker will overwrite the status and run it anyway.
    in_flight: bool = False


@dataclass(frozen=True, slots=True)
class WorkerState:
    """Liveness of the worker a started job names. `gone_because` empty means alive."""

    name: str
    gone_because: str = ""
    local: bool = False
    pid: int | None = None
    current_job: str | None = None
    # For a gone local worker: a horse it left behind is still running (let-finish).
    orphan_horse_alive: bool = False

    @property
    def alive(self) -> bool:
        return not self.gone_because


@dataclass(frozen=True, slots=True)
class CancelIntent:
    """A cancel request exists for the row (pending, or done for a row that came back)."""

    who: str = ""
    why: str = ""
    # True in the cancel flow that carries the request out (it cancels the RQ job and
    # watches a worker that may hold it); False where a pass merely sees the request
    # pending. Only the former may cancel a row whose job RQ still shows waiting: the job
    # may already be in a worker's hands, and only the flow waits to see it started.
    acting: bool = False

    def describe(self) -> str:
        # Both are free text from the app: a megabyte of reason belongs on the request
        # row (it is kept there), not in the error column or in every log line.
        parts = [clip(p, MAX_ERROR_LINE // 2) for p in (self.who, self.why) if p]
        return " / ".join(parts) if parts else "cancel requested"


class Doom(NamedTuple):
    """Why a deferred job can never run: RQ will not let it follow `dependency` (which
    ended, or is itself doomed), at the root of whose chain `root` ended `root_status`.
    `cancelled_by` is the cancel request that ended the root, if one did (lifecycle.py
    works this out from the dependency graph; decide() only words it)."""

    dependency: str
    root: str
    root_status: RqStatus
    cancelled_by: CancelIntent | None = None

    @property
    def direct(self) -> bool:
        return self.dependency == self.root


class Orphan(NamedTuple):
    """A started job whose worker is gone, to requeue or fail once its horse is stopped
    (Action.REQUEUE_ORPHAN): as the pass read it."""

    job_id: Any
    row_status: str
    rq_id: str
    worker_name: str
    started_at: datetime | None
    gone_because: str = ""


class Decision(NamedTuple):
    """What to do with one row. `to_status` None means leave the row as it is."""

    to_status: str | None = None
    reason: Reason | None = None
    error: str = ""
    set_started_at: bool = False
    set_completed_at: bool = False
    action: Action = Action.NONE
    not_found: bool = False
    detail: Mapping[str, Any] = NO_DETAIL

    @property
    def changes_row(self) -> bool:
        return self.to_status is not None


KEEP = Decision()

MAX_ERROR_LINE = 500


def last_line(text: str) -> str:
    """The last non-empty line of an exception text (lines as str.splitlines() sees
    them), trimmed to a sane length. Read from the end, a newline-separated piece at a
    time: a traceback's earlier lines are never split out."""
    end = len(text)
    while end >= 0:
        start = text.rfind("\n", 0, end) + 1
        for line in reversed(text[start:end].splitlines()):
            if line.strip():
                return clip(line.strip(), MAX_ERROR_LINE)
        end = start - 1
    return ""


def decide(
    row: JobRow,
    rq_job: RqJob | None,
    worker: WorkerState | None,
    cancel: CancelIntent | None,
    statuses: Statuses,
    *,
    old_enough: bool,
    orphaned_horse_kill: bool = True,
    doom: Doom | None = None,
    requeue_orphans: bool = False,
) -> Decision:
    """Apply SPEC's reconcile table to one row.

    `rq_job` None means the row has no RQ id; `RqStatus.MISSING` means Redis answered
    that the hash does not exist. A Redis error must never reach here: the caller skips
    the row instead. `old_enough` is the min_age test, done by the caller with its clock.
    `requeue_orphans`: orphans.requeue is not "never" (an orphan may be queued again).
    """
    s = statuses
    if rq_job is not None and rq_job.status is RqStatus.UNREADABLE:
        # Redis could not tell us about this job: decide nothing, stop nothing.
        return KEEP
    if row.status == s.cancelled:
        # A cancel is an intent that holds until RQ agrees: a horse that started anyway
        # (it dequeued the job a moment before RQ's cancel) is stopped again.
        if rq_job is not None and (rq_job.status is RqStatus.STARTED or (
                rq_job.status is RqStatus.CANCELED and rq_job.in_flight)):
            # (RQ's cancel can land on a job a worker already holds: it says "canceled"
            # while the horse runs it.)
            return Decision(action=Action.STOP_HORSE, detail={"why": "cancelled row, job started"})
        if rq_job is not None and rq_job.status in WAITING:
            # ... and a job enqueued after the cancel (or whose RQ id the app stored after
            # it) never starts.
            return Decision(action=Action.CANCEL_RQ, detail={"why": "cancelled row, job waiting"})
        return KEEP
    if row.status not in s.active:
        return KEEP

    if rq_job is None:
        if cancel is not None:
            return _cancelled(s, cancel, "no RQ job id")
        if old_enough:
            return Decision(s.failed, Reason.ORPHANED, "Orphaned: no RQ job id",
                            set_completed_at=True)
        return KEEP

    st = rq_job.status
    if st is RqStatus.CANCELED and rq_job.in_flight:
        # Not final yet: the worker that holds it will start it. Decide once it has.
        return KEEP
    if cancel is not None and (st in ENDED - {RqStatus.FINISHED} or st is RqStatus.MISSING):
        return _cancelled(s, cancel, f"RQ job {st.value}", rq_status=st.value)
    if cancel is not None and cancel.acting and st in WAITING:
        # The intent holds whatever the order: the row is cancelled now and the waiting
        # RQ job is cancelled with RQ's API (stopped instead if a worker takes it first).
        d = _cancelled(s, cancel, f"RQ job {st.value}", rq_status=st.value)
        return d._replace(action=Action.CANCEL_RQ)

    if st is RqStatus.FINISHED:
        return Decision(s.completed, Reason.SYNCED, "Synced: RQ finished", set_completed_at=True)
    if st is RqStatus.FAILED:
        text = "Synced: RQ failed"
        if rq_job.exc_line:
            text += f": {rq_job.exc_line}"
        return Decision(s.failed, Reason.SYNCED, text, set_completed_at=True)
    if st is RqStatus.STOPPED:
        return Decision(s.failed, Reason.SYNCED, "Synced: RQ job stopped", set_completed_at=True)
    if st is RqStatus.CANCELED:
        return Decision(s.failed, Reason.SYNCED, "Synced: RQ job canceled", set_completed_at=True)
    if st is RqStatus.MISSING:
        if old_enough:
            return Decision(s.failed, Reason.ORPHANED, "Orphaned: RQ job not found",
                            set_completed_at=True, not_found=True)
        return KEEP
    if st is RqStatus.STARTED:
        gone = worker is not None and not worker.alive
        if cancel is not None:
            if gone:
                # Nobody will ever record an end for this job: the cancel completes now.
                d = _cancelled(s, cancel, "worker gone", rq_status=st.value)
                return Decision(d.to_status, d.reason, d.error, set_completed_at=True,
                                action=Action.STOP_HORSE, detail=d.detail)
            # The cancel flow stops the horse; the row follows once RQ records the end.
            return Decision(action=Action.STOP_HORSE, detail={"why": "cancel requested"})
        if worker is not None and gone:
            if not orphaned_horse_kill and worker.local and worker.orphan_horse_alive:
                # let-finish: the reparented horse is watched; the row follows its result.
                return KEEP
            if requeue_orphans:
                return Decision(action=Action.REQUEUE_ORPHAN,
                                detail={"worker": worker.name,
                                        "gone_because": worker.gone_because})
            return Decision(
                s.failed,
                Reason.ORPHANED,
                f"Orphaned: worker {worker.name or '?'} is gone ({worker.gone_because})",
                set_completed_at=True,
                action=Action.STOP_HORSE if orphaned_horse_kill else Action.NONE,
                detail={"worker": worker.name, "gone_because": worker.gone_because},
            )
        if row.status == s.queued:
            return Decision(s.running, Reason.STARTED, "", set_started_at=True)
        return KEEP
    if st is RqStatus.DEFERRED and doom is not None:
        return _doomed(s, doom, cancel)
    # queued / deferred / scheduled / created, or a status word we do not know: unchanged.
    return KEEP


def _doomed(s: Statuses, doom: Doom, cancel: CancelIntent | None) -> Decision:
    """A deferred job that can never run ends now, and its RQ job is cancelled (it leaves
    the deferred registry) once the row has."""
    detail: dict[str, Any] = {"dependency": doom.dependency, "root": doom.root,
                              "root_status": doom.root_status.value}
    if cancel is not None:
        # A request for this very row: its own words, as for any cancel.
        d = _cancelled(s, cancel, f"dependency {doom.dependency} cannot run")
        return d._replace(action=Action.CANCEL_RQ, detail={**d.detail, **detail})
    if doom.cancelled_by is not None:
        text = f"Cancelled: dependency {doom.dependency} was cancelled ({doom.cancelled_by.describe()})"
        if not doom.direct:
            text += f" via {doom.root}"
        return Decision(s.cancelled, Reason.CANCELLED, clip(text, MAX_ERROR_LINE * 2),
                        set_completed_at=True, action=Action.CANCEL_RQ, detail=detail)
    if doom.direct:
        text = f"Orphaned: dependency {doom.dependency} ended {doom.root_status.value}"
    else:
        # The dependency in between is cancelled in the same pass: it ends canceled.
        text = (f"Orphaned: dependency {doom.dependency} ended canceled "
                f"(its dependency {doom.root} ended {doom.root_status.value})")
    return Decision(s.failed, Reason.ORPHANED, text, set_completed_at=True,
                    action=Action.CANCEL_RQ, detail=detail)


def _cancelled(s: Statuses, cancel: CancelIntent, what: str, *, rq_status: str = "") -> Decision:
    detail: dict[str, Any] = {"what": what}
    if rq_status:
        detail["rq_status"] = rq_status
    return Decision(
        s.cancelled,
        Reason.CANCELLED,
        f"Cancelled: {cancel.describe()}",
        set_completed_at=True,
        detail=detail,
    )


# -- texts bound to SQL, and what was refused ---------------------------------------------------
# One bad value must cost its row only. PostgreSQL refuses NUL in text and jsonb (and its
# JSON escape), and lone surrogates cannot even be encoded as UTF-8; varchar(n)
# refuses n + 1 characters. So every text bound to SQL is cleaned and clipped first.

REPLACEMENT = "\ufffd"
# What an unbounded text column (text, varchar) is given at most: an error line is a few
# hundred characters; anything near this is garbage, and it would be kept in every log too.
TEXT_CAP = 64 * 1024
# Each string inside an audit/outcome `detail` document.
DETAIL_TEXT_CAP = 4096
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, an ellipsis marking the cut."""
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "…" if limit > 0 else ""


def storable(text: str) -> bool:
    """True if PostgreSQL can store `text` as it is (no NUL, no lone surrogate)."""
    if text.isascii():
        return "\x00" not in text
    return _UNSTORABLE.search(text) is None


def clean_text(text: str) -> str:
    """`text` with NUL and lone surrogates (undecodable bytes smuggled in by
    surrogateescape, or a half pair) replaced by U+FFFD. The common case is a scan."""
    return text if storable(text) else _UNSTORABLE.sub(REPLACEMENT, text)


def sql_text(text: str, limit: int = TEXT_CAP) -> str:
    """A text as a column holding at most `limit` characters can take it."""
    if len(text) <= limit and (text.isascii() and "\x00" not in text):
        return text  # the common case, one scan
    return clip(clean_text(text), limit)


def sql_json(value: Any, limit: int = DETAIL_TEXT_CAP, _depth: int = 0) -> Any:
    """A JSON-able value with every string (keys too) made storable in jsonb and clipped.
    Nesting deeper than a detail document ever has is cut."""
    if isinstance(value, str):
        return sql_text(value, limit)
    if _depth > 8:
        return None
    if isinstance(value, Mapping):
        return {sql_text(str(k), limit): sql_json(v, limit, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [sql_json(v, limit, _depth + 1) for v in value]
    return value


# kind ("row", "key", "job_hash"), the job id or key (printable), what was wrong with it.
PoisonCallback = Callable[[str, str, str], None]
POISON_MEMORY = 10_000


class BoundedMemory:
    """A key -> value memory of at most `size` entries, least recently used forgotten
    first: what was refused (and why) is remembered, without letting garbage in the data
    grow the daemon."""

    __slots__ = ("_d", "size")

    def __init__(self, size: int = POISON_MEMORY) -> None:
        self.size = size
        self._d: OrderedDict[Hashable, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._d

    def get(self, key: Hashable) -> Hashable | None:
        value = self._d.get(key)
        if value is not None:
            self._d.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Hashable = True) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def discard(self, key: Hashable) -> None:
        self._d.pop(key, None)

    def first_time(self, key: Hashable, value: Hashable = True) -> bool:
        """Remember `key` as `value`; True unless it was already remembered as that."""
        if self.get(key) == value:
            return False
        self.put(key, value)
        return True
