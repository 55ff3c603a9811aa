"""Backoff, bounded waits, owned tasks and the retry loop."""

from __future__ import annotations

import asyncio
import logging

import pytest
from structlog.testing import capture_logs

from reconciler.aio import Backoff, TaskSet, cancel_until_done, retry_forever, wait_event
from reconciler.errors import PostgresUnavailable, RedisUnavailable


def test_backoff_grows_caps_and_resets() -> None:
    b = Backoff(0.1, 1.0)
    delays = [b.next() for _ in range(10)]
    assert all(0.05 <= d <= 1.0 for d in delays)
    assert max(delays[5:]) > 0.5  # it grew to the cap's neighbourhood
    b.reset()
    assert b.next() <= 0.1


async def test_wait_event_true_when_set_false_on_timeout() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, ev.set)
    assert await wait_event(ev, 1) is True


async def test_taskset_logs_a_failure_and_forgets_finished_tasks() -> None:
    ts = TaskSet("t")

    async def boom() -> None:
        raise ValueError("nope")

    async def fine() -> int:
        return 1

    with capture_logs() as logs:
        ts.spawn(boom(), "boom")
        ts.spawn(fine(), "fine")
        assert await ts.drain(1)
        await asyncio.sleep(0)  # done-callbacks run on the next loop turn
    assert len(ts) == 0
    failed = [e for e in logs if e["event"] == "task_failed"]
    assert len(failed) == 1 and failed[0]["task"] == "t:boom" and "nope" in failed[0]["error"]


async def test_taskset_cancel_all_ends_every_task() -> None:
    ts = TaskSet("t")
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    t = ts.spawn(forever(), "f")
    await started.wait()
    await ts.cancel_all()
    assert t.cancelled() and len(ts) == 0


async def test_cancel_until_done_outlasts_a_swallowed_cancel() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed >= 2:
                    raise

    t = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await cancel_until_done([t], every=0.01)
    assert t.cancelled() and swallowed == 2


async def test_retry_forever_reports_outages_and_resets_after_success() -> None:
    calls: list[str] = []
    outages: list[str] = []
    after: list[int] = []
    backoff = Backoff(0.001, 0.002)

    async def step() -> None:
        calls.append("x")
        if len(calls) in (1, 2):
            raise RedisUnavailable("down")
        if len(calls) == 3:
            assert backoff.attempt == 2
            return
        if len(calls) == 4:
            assert backoff.attempt == 0  # reset by the success before
            raise PostgresUnavailable("gone")
        raise KeyError("a bug, not an outage")

    with pytest.raises(KeyError):
        await retry_forever(step, event="t_retry", backoff=backoff,
                            on_outage=lambda e: outages.append(e.backend),
                            after_outage=lambda: after.append(1))
    assert outages == ["redis", "redis", "postgres"]
    assert len(after) == 3


async def test_no_task_warning_leaks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    ts = TaskSet("t")

    async def boom() -> None:
        raise RuntimeError("x")

    ts.spawn(boom(), "b")
    await ts.drain(1)
    import gc
    gc.collect()
    assert "never retrieved" not in caplog.text
