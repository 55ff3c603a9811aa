"""decide() on RQ states that are not final although they look it (found by tests/faults)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from reconciler.config import Statuses
from reconciler.model import CancelIntent, JobRow, RqJob, RqStatus, decide

S = Statuses()
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("status", ["queued", "running"])
@pytest.mark.parametrize("cancel", [None, CancelIntent("web", "x")])
def test_canceled_but_in_flight_is_not_final(status: str, cancel: CancelIntent | None) -> None:
    # Job.cancel() raced a worker's dequeue: the horse will overwrite "canceled" and run it.
    row = JobRow(1, "j", status, started_at=T0)
    job = RqJob("j", RqStatus.CANCELED, "canceled", origin="default", in_flight=True)
    assert not decide(row, job, None, cancel, S, old_enough=True).changes_row
    settled = RqJob("j", RqStatus.CANCELED, "canceled", origin="default")
    want = "cancelled" if cancel is not None else "failed"
    assert decide(row, settled, None, cancel, S, old_enough=True).to_status == want
