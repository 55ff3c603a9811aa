"""A cancel outcome says whether the job got SIGTERM first: never graceful by default."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.cancel import graceful
from reconciler.client import CancelOutcome


@pytest.mark.parametrize(("detail", "want"), [
    ({"horse_signals": ["SIGTERM"]}, True),
    ({"horse_signals": ["SIGTERM", "stop-job", "SIGKILL"]}, True),
    ({"horse_signals": ["stop-job"]}, False),
    ({"horse_signals": ["stop-execution"]}, False),
    ({"horse_signals": ["SIGKILL:leftovers"]}, False),
    ({"horse_signals": []}, None),
    ({"signals": ["SIGTERM"]}, True),
    ({}, None),
    ({"horse_signals": "SIGTERM"}, None),
])
def test_graceful_only_when_sigterm_came_first(detail: dict[str, Any], want: bool | None) -> None:
    assert graceful(detail) is want


@pytest.mark.parametrize(("detail", "want"), [
    ({"graceful": True}, True), ({"graceful": False}, False), ({"graceful": None}, None),
    ({}, None), ({"graceful": "yes"}, None),
])
def test_the_client_passes_graceful_on(detail: dict[str, Any], want: bool | None) -> None:
    out = CancelOutcome(1, "7", "done", "cancelled", detail)
    assert out.graceful is want
    assert out.as_dict().get("graceful") == detail.get("graceful")
