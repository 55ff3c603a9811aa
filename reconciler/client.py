"""The application's side of a cancel: insert a request, optionally wait for its outcome.

Used by `rq-reconciler cancel`. Must never touch RQ or the jobs table: the daemon does
the cancelling; this only writes the request and reads its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg

from reconciler.aio import wait_event
from reconciler.config import Config
from reconciler.store import Store

# How often the outcome is read again if its NOTIFY was missed.
RECHECK_SECONDS = 1.0


async def request_and_wait(cfg: Config, job_id: str, *, reason: str, by: str,
                           wait: float | None) -> tuple[str, dict[str, Any] | None]:
    """Insert a request; with `wait`, wait for its outcome (LISTEN on <channel>_done)."""
    store = Store(cfg)
    await store.connect()
    conn: asyncpg.Connection | None = None
    try:
        got = asyncio.Event()
        if wait is not None:
            conn = await asyncpg.connect(cfg.postgres.dsn, timeout=10)
            await conn.add_listener(cfg.done_channel, lambda *_a: got.set())
        # UnknownJob / InvalidJobId (errors.py) say which id and table, for the app to show.
        rid = await store.insert_request(job_id, by, reason)
        if wait is None:
            return "pending", {"request_id": rid, "state": "pending"}
        deadline = time.monotonic() + wait
        while True:
            state, outcome, detail = await store.request_outcome(rid)
            if state == "done":
                out = dict(detail or {})
                out.setdefault("request_id", rid)
                out["outcome"] = outcome
                return str(outcome), out
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", {"request_id": rid, "state": state, "outcome": None,
                                   "message": f"no outcome within {wait:g} s; is the daemon running?"}
            got.clear()
            await wait_event(got, min(left, RECHECK_SECONDS))
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
        await store.close()
