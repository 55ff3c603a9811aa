"""The asyncio tools every part of the daemon shares: backoff, one way to bound a wait,
owned background tasks, and the one retry-with-backoff loop.

Must never: start a task nobody owns, or bound a wait with `asyncio.wait_for` (on Python
3.11 it can lose a cancellation that races the result, gh-86296: a loop that lost its
cancel runs on and the TaskGroup waiting for it never exits). `asyncio.timeout()` is the
one way to bound a wait here.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextvars import ContextVar
from typing import Any, NoReturn

import structlog

from reconciler.errors import BackendUnavailable, SchemaError

log = structlog.get_logger("reconciler.aio")


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, base: float = 0.1, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 20)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:  # noqa: ASYNC109
    """True if `event` is set within `timeout` seconds (None: wait as long as it takes)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False


async def cancel_until_done(tasks: Iterable[asyncio.Task[Any]], every: float = 0.5) -> None:
    """Cancel `tasks`, again every `every` seconds, until all are done, and collect their
    outcomes. Cancelling once is not enough: a library that swallowed the first cancel
    (see the module docstring) would keep its task, and our shutdown, alive."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    while pending := [t for t in tasks if not t.done()]:
        await asyncio.wait(pending, timeout=every)
        for t in pending:
            if not t.done():
                t.cancel()
    for t in tasks:
        if not t.cancelled():
            t.exception()


# Where a background task that met a configuration that cannot work (a SchemaError: a
# column renamed, a privilege revoked) reports it: the supervisor sets it for the tasks it
# runs, and ends the daemon with exit 2. Tasks started in its tasks inherit it.
on_schema_error: ContextVar[Callable[[SchemaError], None] | None] = ContextVar(
    "on_schema_error", default=None)


class TaskSet:
    """Background tasks with an owner. Each task is kept until it ends; a failure is
    logged (never "exception was never retrieved"), or, if it is a SchemaError and the
    spawner set `on_schema_error`, handed to it; shutdown drains or cancels them."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fatal: dict[asyncio.Task[Any], Callable[[SchemaError], None]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.owner}:{name}")
        self._tasks.add(task)
        handler = on_schema_error.get()
        if handler is not None:
            self._fatal[task] = handler
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        handler = self._fatal.pop(task, None)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, SchemaError) and handler is not None:
            handler(exc)
        elif exc is not None:
            log.error("task_failed", task=task.get_name(), error=f"{type(exc).__name__}: {exc}",
                      exc_info=exc)

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait for the tasks running now; True if they all ended within `timeout`."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending

    async def cancel_all(self) -> None:
        await cancel_until_done(set(self._tasks))


async def retry_forever(step: Callable[[], Awaitable[None]], *, event: str, backoff: Backoff,
                        on_outage: Callable[[BackendUnavailable], None],
                        after_outage: Callable[[], None] | None = None) -> NoReturn:
    """Run `step` again and again. A backend outage is reported to `on_outage`, logged as
    and waited out with `backoff`; any other error ends the loop (and, in
    the supervisor's TaskGroup, the daemon: systemd restarts it). A step that returns
    normally resets the backoff. `event` names the log line of each retry."""
    while True:
        try:
            await step()
            backoff.reset()
        except BackendUnavailable as exc:
            on_outage(exc)
            delay = backoff.next()
            log.warning(event, backend=exc.backend, error=str(exc), retry_in=round(delay, 2))
            await asyncio.sleep(delay)
            if after_outage is not None:
                after_outage()


async def settle(task: asyncio.Task[Any] | None) -> None:
    """Wait for `task` to end and collect its outcome (the caller has already seen or is
    already raising an error). If the caller is cancelled meanwhile, so is the task."""
    if task is None:
        return
    try:
        await asyncio.wait([task])
    finally:
        if not task.done():
            task.cancel()
    if not task.cancelled():
        task.exception()


async def abandon(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel unfinished helper tasks and collect every outcome, so that no error is left
    unretrieved. Unlike `suppress(BaseException): await t`, a cancellation of the caller
    itself still propagates."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    if live:
        await asyncio.wait(live)
    for t in live:
        if not t.cancelled():
            t.exception()
