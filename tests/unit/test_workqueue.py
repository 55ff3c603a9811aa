"""The dirty set: coalescing, batching, requeue and its bound."""

from __future__ import annotations

import asyncio

from reconciler.workqueue import WorkQueue


async def test_a_burst_becomes_one_batch_and_duplicates_one_id() -> None:
    added: list[tuple[str, int]] = []
    q = WorkQueue(coalesce=0.01, on_added=lambda src, n: added.append((src, n)))
    q.add(["a", "b"], "keyspace")
    await asyncio.sleep(0)
    q.add(["b", "c"], "keyspace")
    batch = await q.batch()
    assert sorted(batch) == ["a", "b", "c"]
    assert len(q) == 0
    assert added == [("keyspace", 2), ("keyspace", 2)]


async def test_batches_are_bounded_and_the_rest_follows() -> None:
    q = WorkQueue(max_batch=3, coalesce=0)
    q.add([str(i) for i in range(7)])
    sizes = [len(await q.batch()) for _ in range(3)]
    assert sizes == [3, 3, 1]


async def test_batch_waits_for_work() -> None:
    q = WorkQueue(coalesce=0)
    waiter = asyncio.create_task(q.batch())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    q.requeue(["x"])
    assert await asyncio.wait_for(waiter, 1) == ["x"]


async def test_past_its_cap_the_set_empties_and_asks_for_a_sweep() -> None:
    overflowed: list[int] = []
    q = WorkQueue(cap=5, coalesce=0, on_overflow=overflowed.append)
    q.add(["1", "2", "3", "4", "5"])
    assert overflowed == []
    q.add(["6"])
    assert overflowed == [6]
    assert len(q) == 0 and q.overflows == 1
    q.add(["7"])
    assert await q.batch() == ["7"]


async def test_no_source_counts_nothing() -> None:
    added: list[tuple[str, int]] = []
    q = WorkQueue(on_added=lambda src, n: added.append((src, n)))
    q.add(["a"])
    q.add([], "keyspace")
    assert added == []


async def test_events_about_a_job_under_cancel_wait_until_the_cancel_is_over() -> None:
    """A cancel flow reads and writes its job itself; events about it are parked meanwhile
    (a pass beside it would only compete for the loop) and marked dirty once it is over,
    after the last of two overlapping flows."""
    q = WorkQueue(coalesce=0)
    with q.held("x"):
        with q.held("x"):
            q.add(["x", "y"], "keyspace")
            assert await q.batch() == ["y"]
            assert "x" not in q
        assert "x" not in q  # one flow still holds it
    assert await q.batch() == ["x"]
    with q.held("z"):
        pass  # nothing arrived: nothing to look at afterwards
    q.add(["w"])
    assert await q.batch() == ["w"]
