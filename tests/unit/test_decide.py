"""The reconcile table, row by row, and the properties every decision must keep."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.config import Statuses
from reconciler.model import (
    WAITING,
    Action,
    CancelIntent,
    Decision,
    JobRow,
    Reason,
    RqJob,
    RqStatus,
    WorkerState,
    decide,
    last_line,
)

S = Statuses()
T0 = datetime(2026, 1, 1, tzinfo=UTC)
ALIVE = WorkerState("w1", local=True, pid=10, current_job="j")
GONE = WorkerState("w1", gone_because="pid 10 is dead", local=True, pid=10)
CANCEL = CancelIntent("web:alice", "clicked Cancel")


def row(status: str = "running", rq_id: str | None = "j") -> JobRow:
    return JobRow(1, rq_id, status, started_at=T0)


def job(status: RqStatus, exc: str = "") -> RqJob:
    return RqJob("j", status, status.value, worker_name="w1", exc_line=exc)


def d(r: JobRow, j: RqJob | None, w: WorkerState | None = None, c: CancelIntent | None = None,
      old: bool = True, kill: bool = True) -> Decision:
    return decide(r, j, w, c, S, old_enough=old, orphaned_horse_kill=kill)


@pytest.mark.parametrize(
    ("rq", "cancel", "to", "reason", "error"),
    [
        (RqStatus.FINISHED, None, "completed", Reason.SYNCED, "Synced: RQ finished"),
        (RqStatus.FINISHED, CANCEL, "completed", Reason.SYNCED, "Synced: RQ finished"),
        (RqStatus.FAILED, None, "failed", Reason.SYNCED, "Synced: RQ failed: ValueError: x"),
        (RqStatus.STOPPED, None, "failed", Reason.SYNCED, "Synced: RQ job stopped"),
        (RqStatus.CANCELED, None, "failed", Reason.SYNCED, "Synced: RQ job canceled"),
        (RqStatus.FAILED, CANCEL, "cancelled", Reason.CANCELLED, "Cancelled: web:alice / clicked Cancel"),
        (RqStatus.STOPPED, CANCEL, "cancelled", Reason.CANCELLED, "Cancelled: web:alice"),
        (RqStatus.CANCELED, CANCEL, "cancelled", Reason.CANCELLED, "Cancelled: web:alice"),
        (RqStatus.MISSING, CANCEL, "cancelled", Reason.CANCELLED, "Cancelled: web:alice"),
        (RqStatus.MISSING, None, "failed", Reason.ORPHANED, "Orphaned: RQ job not found"),
    ],
)
@pytest.mark.parametrize("from_status", ["queued", "running"])
def test_ended_jobs(rq: RqStatus, cancel: CancelIntent | None, to: str, reason: Reason,
                    error: str, from_status: str) -> None:
    got = d(row(from_status), job(rq, exc="ValueError: x"), c=cancel)
    assert got.to_status == to
    assert got.reason is reason
    assert got.error.startswith(error)
    assert got.set_completed_at


def test_failed_without_exception_text() -> None:
    assert d(row(), job(RqStatus.FAILED)).error == "Synced: RQ failed"


@pytest.mark.parametrize("rq", [RqStatus.QUEUED, RqStatus.DEFERRED, RqStatus.SCHEDULED,
                                RqStatus.CREATED, RqStatus.RATE_LIMITED,
                                RqStatus.READY_TO_ENQUEUE, RqStatus.UNKNOWN])
@pytest.mark.parametrize("from_status", ["queued", "running"])
def test_waiting_or_unknown_is_unchanged(rq: RqStatus, from_status: str) -> None:
    assert d(row(from_status), job(rq)) == Decision()


@pytest.mark.parametrize("rq", [RqStatus.RATE_LIMITED, RqStatus.READY_TO_ENQUEUE])
@pytest.mark.parametrize("cancel", [None, CANCEL])
@pytest.mark.parametrize("from_status", ["queued", "running", "cancelled", "completed"])
def test_rq3_waiting_statuses_are_decided_as_queued(rq: RqStatus, cancel: CancelIntent | None,
                                                    from_status: str) -> None:
    """RQ 3's rate_limited and ready_to_enqueue jobs have not started: every row, with or
    without a cancel, is decided as if RQ said queued (a cancel intent cancels the RQ job
    with RQ's API, never a horse)."""
    got = d(row(from_status), job(rq), c=cancel)
    as_queued = d(row(from_status), job(RqStatus.QUEUED), c=cancel)
    assert (got.to_status, got.reason, got.error, got.action) == \
        (as_queued.to_status, as_queued.reason, as_queued.error, as_queued.action)
    assert got.action is not Action.STOP_HORSE
    assert rq in WAITING


@pytest.mark.parametrize("from_status", ["queued", "running", "cancelled"])
@pytest.mark.parametrize("cancel", [None, CANCEL])
@pytest.mark.parametrize("w", [None, ALIVE, GONE])
@pytest.mark.parametrize("old", [True, False])
def test_unreadable_job_is_like_a_redis_error(from_status: str, cancel: CancelIntent | None,
                                              w: WorkerState | None, old: bool) -> None:
    """A key of the wrong type (or fields no RQ writes): the row stays as it is, whatever
    else is known. Never "not found", never a cancel completed, no horse stopped on it."""
    unreadable = RqJob("j", RqStatus.UNREADABLE, "unreadable: WRONGTYPE", worker_name="w1")
    assert d(row(from_status), unreadable, w, cancel, old=old) == Decision()


def test_started_with_live_worker_marks_queued_row_running() -> None:
    got = d(row("queued"), job(RqStatus.STARTED), ALIVE)
    assert (got.to_status, got.reason, got.set_started_at) == ("running", Reason.STARTED, True)
    assert got.error == ""


def test_started_with_live_worker_leaves_running_row() -> None:
    assert d(row("running"), job(RqStatus.STARTED), ALIVE) == Decision()


def test_started_with_gone_worker_is_orphaned_and_horse_stopped() -> None:
    got = d(row(), job(RqStatus.STARTED), GONE)
    assert got.to_status == "failed"
    assert got.reason is Reason.ORPHANED
    assert got.error.startswith("Orphaned: worker w1 is gone")
    assert got.action is Action.STOP_HORSE


def test_let_finish_keeps_row_while_local_orphan_horse_runs() -> None:
    w = WorkerState("w1", gone_because="pid dead", local=True, orphan_horse_alive=True)
    assert d(row(), job(RqStatus.STARTED), w, kill=False) == Decision()
    # once the horse is gone too, nothing will ever write a result: orphaned
    w2 = WorkerState("w1", gone_because="pid dead", local=True, orphan_horse_alive=False)
    got = d(row(), job(RqStatus.STARTED), w2, kill=False)
    assert got.to_status == "failed" and got.action is Action.NONE


def test_started_with_cancel_stops_horse_but_keeps_row_until_rq_agrees() -> None:
    got = d(row(), job(RqStatus.STARTED), ALIVE, CANCEL)
    assert got.to_status is None
    assert got.action is Action.STOP_HORSE


def test_started_with_cancel_and_gone_worker_cancels_now() -> None:
    got = d(row(), job(RqStatus.STARTED), GONE, CANCEL)
    assert got.to_status == "cancelled"
    assert got.action is Action.STOP_HORSE


def test_missing_job_young_row_is_unchanged() -> None:
    assert d(row(), job(RqStatus.MISSING), old=False) == Decision()
    assert d(row(), job(RqStatus.MISSING), old=True).not_found


def test_no_rq_id() -> None:
    assert d(row(rq_id=None), None, old=False) == Decision()
    got = d(row(rq_id=None), None, old=True)
    assert (got.to_status, got.reason, got.error) == ("failed", Reason.ORPHANED, "Orphaned: no RQ job id")
    assert not got.not_found  # the breaker is about Redis answering "no such job", not this
    assert d(row(rq_id=None), None, c=CANCEL).to_status == "cancelled"


def test_cancelled_row_with_started_job_stops_horse_again() -> None:
    got = d(row("cancelled"), job(RqStatus.STARTED), ALIVE)
    assert got.to_status is None
    assert got.action is Action.STOP_HORSE


@pytest.mark.parametrize("rq", list(RqStatus))
@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_terminal_rows_never_change(rq: RqStatus, status: str) -> None:
    for w in (None, ALIVE, GONE):
        for c in (None, CANCEL):
            assert d(row(status), job(rq), w, c).to_status is None


def test_custom_status_words() -> None:
    words = Statuses("pending", "in_progress", "done", "error", "aborted")
    r = JobRow(1, "j", "in_progress")
    got = decide(r, job(RqStatus.FINISHED), None, None, words, old_enough=True)
    assert got.to_status == "done"
    got = decide(r, job(RqStatus.FAILED), None, CANCEL, words, old_enough=True)
    assert got.to_status == "aborted"
    assert decide(JobRow(1, "j", "done"), job(RqStatus.FAILED), None, None, words,
                  old_enough=True).to_status is None


def test_last_line() -> None:
    tb = "Traceback (most recent call last):\n  File x\nValueError: bad\n\n"
    assert last_line(tb) == "ValueError: bad"
    assert len(last_line("x" * 5000)) == 500
    assert last_line("") == ""


@given(st.text(alphabet=st.sampled_from(list("ab \n\r\t\x0b\x0c\x1c\x1e\x85\u2028")), max_size=40))
def test_last_line_is_the_last_line_splitlines_sees(text: str) -> None:
    """Read from the end, it must still agree with splitting the whole text."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    assert last_line(text) == (lines[-1] if lines else "")


# -- properties -----------------------------------------------------------------------------------

statuses = st.sampled_from(["queued", "running", "completed", "failed", "cancelled", "weird"])
rq_jobs = st.one_of(
    st.none(),
    st.builds(RqJob, id=st.just("j"), status=st.sampled_from(list(RqStatus)),
              worker_name=st.sampled_from(["", "w1"]), exc_line=st.text(max_size=20)),
)
workers = st.one_of(
    st.none(),
    st.builds(WorkerState, name=st.just("w1"),
              gone_because=st.sampled_from(["", "pid dead", "hash missing"]),
              local=st.booleans(), orphan_horse_alive=st.booleans()),
)
cancels = st.one_of(st.none(), st.builds(CancelIntent, st.text(max_size=10), st.text(max_size=10)))


@given(status=statuses, rq=rq_jobs, w=workers, c=cancels, old=st.booleans(), kill=st.booleans())
def test_properties(status: str, rq: RqJob | None, w: WorkerState | None,
                    c: CancelIntent | None, old: bool, kill: bool) -> None:
    r = JobRow(1, rq.id if rq else None, status)
    first = decide(r, rq, w, c, S, old_enough=old, orphaned_horse_kill=kill)
    # deterministic
    assert first == decide(r, rq, w, c, S, old_enough=old, orphaned_horse_kill=kill)
    # terminal (and unknown) rows never change
    if status not in S.active:
        assert first.to_status is None
    if first.to_status is not None:
        # only active rows move, and never back to queued
        assert status in S.active
        assert first.to_status != S.queued
        assert first.reason is not None
        # every transition into a terminal state says why, in the seed's vocabulary
        if first.to_status in S.terminal:
            assert first.error.split(":")[0] in ("Orphaned", "Synced", "Cancelled")
        # a row is never failed as "not found" while young
        if first.not_found:
            assert old
    # Redis never said "not found" for a job it has: only MISSING can be not_found
    if first.not_found:
        assert rq is not None and rq.status is RqStatus.MISSING
    # applying the decision and deciding again changes nothing more (idempotent)
    if first.to_status in S.terminal:
        again = decide(JobRow(1, r.rq_id, first.to_status), rq, w, c, S,
                       old_enough=old, orphaned_horse_kill=kill)
        assert again.to_status is None
