"""The daemon run in-process against real Redis and PostgreSQL: it starts, syncs a job,
and stops on request with every task it started finished and every error retrieved."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import redis

from reconciler.config import from_mapping
from reconciler.migrations import migrate
from reconciler.supervisor import Daemon
from tests.support import insert_job, row


async def _until(pred: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


async def test_daemon_in_process_starts_syncs_and_stops_clean(redis_url: str, pg_dsn: str) -> None:
    cfg = from_mapping({
        "redis": {"url": redis_url}, "postgres": {"dsn": pg_dsn},
        "metrics": {"listen": "127.0.0.1:0"}, "instance": {"name": "inproc"},
        "sweep": {"min_age_seconds": 0.0},
    })
    await migrate(cfg)
    r = redis.Redis.from_url(redis_url)
    r.hset("rq:job:inproc-1", mapping={"status": "queued", "origin": "default"})
    job_id = await asyncio.to_thread(insert_job, pg_dsn, "inproc-1", "queued")

    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _l, ctx: unretrieved.append(ctx))
    before = asyncio.all_tasks()
    daemon = Daemon(cfg, install_signals=False)
    run = asyncio.create_task(daemon.run())
    await _until(lambda: daemon.ready or run.done(), 30)
    assert not run.done(), run.result()
    assert daemon.health.healthy()

    # An event path sync: the job finishes in RQ, the row follows.
    r.hset("rq:job:inproc-1", mapping={"status": "finished",
                                       "ended_at": "2026-01-01T00:00:01.000000Z"})
    async with asyncio.timeout(15):
        while (await asyncio.to_thread(row, pg_dsn, job_id))["status"] != "completed":
            await asyncio.sleep(0.05)

    daemon.stopping.set()
    assert await asyncio.wait_for(run, 40) == 0
    await asyncio.sleep(0)
    left = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()}
    assert not left, [t.get_name() for t in left]
    gc.collect()
    await asyncio.sleep(0)
    assert not unretrieved, unretrieved
    r.close()


async def test_a_failing_part_ends_the_daemon_with_its_error(redis_url: str, pg_dsn: str) -> None:
    """Fail together: a bug in one task (not an outage) stops the whole daemon, and the
    other tasks are cancelled rather than left running."""
    cfg = from_mapping({"redis": {"url": redis_url}, "postgres": {"dsn": pg_dsn},
                        "metrics": {"listen": "127.0.0.1:0"}, "instance": {"name": "inproc2"}})
    await migrate(cfg)
    before = asyncio.all_tasks()
    daemon = Daemon(cfg, install_signals=False)

    async def broken() -> None:
        raise RuntimeError("a bug in the cancel loop")

    daemon.cancel_loop.one_round = broken  # type: ignore[method-assign]
    run = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(asyncio.shield(run), 30)
    except BaseException as exc:
        err = exc
    else:
        raise AssertionError("the daemon kept running with a dead task")
    assert isinstance(err, ExceptionGroup)
    assert any("a bug in the cancel loop" in str(e) for e in err.exceptions)
    await asyncio.sleep(0)
    left = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()}
    assert not left, [t.get_name() for t in left]
