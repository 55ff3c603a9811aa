"""A cancel is an intent that holds in every order: the reconcile table's intent rows, and
properties over every status RQ may show when the intent meets it."""

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
    JobRow,
    Reason,
    RqJob,
    RqStatus,
    WorkerState,
    decide,
)

S = Statuses()
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CANCEL = CancelIntent("web:alice", "clicked Cancel", acting=True)  # the cancel flow's own
SEEN = CancelIntent("web:alice", "clicked Cancel")  # a pending request another pass sees
ALIVE = WorkerState("w1", local=True, pid=10, current_job="j")


def job(status: RqStatus, *, in_flight: bool = False, worker: str = "w1") -> RqJob:
    return RqJob("j", status, status.value, worker_name=worker, in_flight=in_flight)


@pytest.mark.parametrize("rq", sorted(WAITING, key=str))
@pytest.mark.parametrize("from_status", ["queued", "running"])
@pytest.mark.parametrize("old", [True, False])
def test_cancel_meets_a_waiting_job_cancels_row_and_rq(rq: RqStatus, from_status: str,
                                                       old: bool) -> None:
    got = decide(JobRow(1, "j", from_status, T0), job(rq), None, CANCEL, S, old_enough=old)
    assert (got.to_status, got.reason, got.action) == ("cancelled", Reason.CANCELLED,
                                                      Action.CANCEL_RQ)
    assert got.error == "Cancelled: web:alice / clicked Cancel" and got.set_completed_at


@pytest.mark.parametrize("old", [True, False])
def test_cancel_before_enqueue_cancels_the_row(old: bool) -> None:
    """Not in RQ yet (the app's enqueue has not landed): the row is cancelled now; the job
    is dealt with when it appears (the rows below)."""
    got = decide(JobRow(1, "j", "queued", T0), job(RqStatus.MISSING, worker=""), None, CANCEL, S,
                 old_enough=old)
    assert got.to_status == "cancelled" and got.action is Action.NONE and not got.not_found


def test_cancel_before_the_rq_id_is_stored_cancels_the_row() -> None:
    got = decide(JobRow(1, None, "queued", T0), None, None, CANCEL, S, old_enough=False)
    assert got.to_status == "cancelled"


@pytest.mark.parametrize("rq", sorted(WAITING, key=str))
def test_cancelled_row_whose_job_appears_waiting_cancels_it_in_rq(rq: RqStatus) -> None:
    got = decide(JobRow(1, "j", "cancelled", T0), job(rq), None, None, S, old_enough=True)
    assert got.to_status is None and got.action is Action.CANCEL_RQ


def test_cancelled_row_whose_job_a_worker_holds_stops_its_horse() -> None:
    for rq in (job(RqStatus.STARTED), job(RqStatus.CANCELED, in_flight=True)):
        got = decide(JobRow(1, "j", "cancelled", T0), rq, ALIVE, None, S, old_enough=True)
        assert got.to_status is None and got.action is Action.STOP_HORSE


@pytest.mark.parametrize("rq", [RqStatus.FINISHED, RqStatus.FAILED, RqStatus.STOPPED,
                                RqStatus.CANCELED, RqStatus.MISSING, RqStatus.UNREADABLE])
def test_cancelled_row_whose_job_ended_or_is_gone_is_left_alone(rq: RqStatus) -> None:
    got = decide(JobRow(1, "j", "cancelled", T0), job(rq), None, None, S, old_enough=True)
    assert got.to_status is None and got.action is Action.NONE


statuses = st.sampled_from(list(RqStatus))


@given(rq=statuses, in_flight=st.booleans(), from_status=st.sampled_from(["queued", "running"]),
       old=st.booleans(), alive=st.booleans())
def test_an_intent_never_leaves_a_waiting_job_to_run(rq: RqStatus, in_flight: bool,
                                                   from_status: str, old: bool,
                                                   alive: bool) -> None:
    """Whatever RQ shows when the intent meets the row, the row ends cancelled, or the
    job is stopped / cancelled in RQ, or the row is left for RQ's own end (finished wins,
    as does an unreadable reading) - never "unchanged while the job still waits"."""
    w = ALIVE if alive else WorkerState("w1", gone_because="pid 10 is dead", local=True)
    j = job(rq, in_flight=in_flight)
    got = decide(JobRow(1, "j", from_status, T0), j, w if rq is RqStatus.STARTED else None,
                 CANCEL, S, old_enough=old)
    if rq in WAITING:
        assert got.to_status == "cancelled" and got.action is Action.CANCEL_RQ
    # Once the row is cancelled, the same reading never asks for less than it did.
    if got.to_status == "cancelled":
        again = decide(JobRow(1, "j", "cancelled", T0), j, w, None, S, old_enough=old)
        assert again.to_status is None
        if rq in WAITING:
            assert again.action is Action.CANCEL_RQ
        if rq is RqStatus.STARTED:
            assert again.action is Action.STOP_HORSE
    # A request never ends merely "unchanged" while the job waits in RQ.
    assert not (rq in WAITING and got.to_status is None)


@given(rq=statuses, in_flight=st.booleans(), old=st.booleans())
def test_deciding_a_cancelled_row_twice_gives_the_same_answer(rq: RqStatus, in_flight: bool,
                                                            old: bool) -> None:
    r, j = JobRow(1, "j", "cancelled", T0), job(rq, in_flight=in_flight)
    assert decide(r, j, ALIVE, None, S, old_enough=old) == decide(r, j, ALIVE, None, S,
                                                                  old_enough=old)


@pytest.mark.parametrize("rq", sorted(WAITING, key=str))
def test_a_pass_that_only_sees_the_request_leaves_a_waiting_job_to_the_cancel_flow(
        rq: RqStatus) -> None:
    """The job may already be in a worker's hands (dequeued, its status not yet written):
    only the flow that cancels it in RQ and watches for that worker may cancel the row."""
    got = decide(JobRow(1, "j", "queued", T0), job(rq), None, SEEN, S, old_enough=True)
    assert got.to_status is None and got.action is Action.NONE
