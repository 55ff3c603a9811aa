"""The sweep's pipeline (Sweeper.pipeline), on its own: pages read, decided and written
in order, three in the air at once, empty pages skipped, and every task collected when a
step fails. The backends are coroutines that log what they do; nothing touches a server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from reconciler.config import Config
from reconciler.model import ActiveRow
from reconciler.reconcile import Evaluated, Reading, Reconciler
from reconciler.sweep import Sweeper


def _rows(*ids: int) -> list[ActiveRow]:
    # (Only the ids matter here; the pipeline never looks inside a row.)
    return [ActiveRow(row=(i, None, "running", None, None), age_seconds=0.0)  # type: ignore[arg-type]
            for i in ids]


def _ids(page: list[ActiveRow]) -> list[int]:
    return [r.row[0] for r in page]


class Backends:
    """fetch/read/write for `pages` (lists of ids); each step yields to the loop once, so
    that whatever else could run meanwhile does."""

    def __init__(self, pages: list[list[int]], *, fail: str = "") -> None:
        self.pages = pages
        self.fail = fail
        self.log: list[str] = []
        self.written: list[list[int]] = []
        self.asked = 0

    def fetch(self, previous: list[ActiveRow] | None) -> Any:
        n = self.asked
        if n >= len(self.pages):
            return None
        self.asked += 1

        async def rows() -> list[ActiveRow]:
            self.log.append(f"fetch {n}")
            await asyncio.sleep(0)
            if self.fail == f"fetch {n}":
                raise RuntimeError(self.fail)
            return _rows(*self.pages[n])
        self.log.append(f"fetch {n} asked")
        return rows()

    async def read(self, page: list[ActiveRow]) -> Reading:
        self.log.append(f"read {_ids(page)}")
        await asyncio.sleep(0)
        return Reading({}, {}, {})

    async def write(self, page: list[ActiveRow], evaluated: list[Evaluated]) -> None:
        self.log.append(f"write {_ids(page)} start")
        for _ in range(3):
            await asyncio.sleep(0)
        if self.fail == f"write {_ids(page)}":
            raise RuntimeError(self.fail)
        self.written.append(_ids(page))
        self.log.append(f"write {_ids(page)} end")


def _reconciler(b: Backends) -> Reconciler:
    rec = Reconciler(Config(), None, None, None, None)  # type: ignore[arg-type]

    async def evaluate(rows: list[ActiveRow], *args: Any, **kw: Any) -> list[Evaluated]:
        b.log.append(f"decide {_ids(rows)}")
        return []
    rec.evaluate = evaluate  # type: ignore[method-assign]
    return rec


async def test_pages_go_through_in_order_and_empty_ones_are_skipped() -> None:
    b = Backends([[1, 2], [], [3], [], [4, 5], []])
    await Sweeper(_reconciler(b)).pipeline(b.fetch, b.read, b.write)
    assert b.written == [[1, 2], [3], [4, 5]]
    assert [e for e in b.log if e.startswith(("read", "decide"))] == [
        "read [1, 2]", "read [3]", "decide [1, 2]", "read [4, 5]", "decide [3]", "decide [4, 5]"]
    # Every page was asked for, the empty ones included, and nothing after the last.
    assert sum(1 for e in b.log if e.endswith("asked")) == 6


async def test_three_pages_are_in_the_air_at_once() -> None:
    b = Backends([[1], [2], [3], [4]])
    await Sweeper(_reconciler(b)).pipeline(b.fetch, b.read, b.write)
    log = b.log
    # Page 2 is read, and page 3's rows asked for, before page 1 is decided; page 1 is
    # written while page 2 is decided; page 2's write waits for page 1's.
    assert log.index("read [2]") < log.index("decide [1]")
    assert log.index("fetch 2 asked") < log.index("decide [1]")
    assert log.index("write [1] start") < log.index("decide [2]") < log.index("write [1] end")
    assert log.index("write [1] end") < log.index("write [2] start")
    assert b.written == [[1], [2], [3], [4]]


async def test_nothing_to_do() -> None:
    for pages in ([], [[]], [[], []]):
        b = Backends(pages)
        await Sweeper(_reconciler(b)).pipeline(b.fetch, b.read, b.write)
        assert b.written == []
        assert not [e for e in b.log if e.startswith(("read", "decide"))]


@pytest.mark.parametrize("fail", ["write [2]", "fetch 3", "fetch 0"])
async def test_a_failed_step_is_raised_and_no_task_is_left(fail: str) -> None:
    loop = asyncio.get_running_loop()
    unretrieved: list[Any] = []
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    before = asyncio.all_tasks()
    b = Backends([[1], [2], [3], [4], [5]], fail=fail)
    with pytest.raises(RuntimeError, match=fail.replace("[", r"\[").replace("]", r"\]")):
        await Sweeper(_reconciler(b)).pipeline(b.fetch, b.read, b.write)
    assert asyncio.all_tasks() == before
    # A write already under way when the failure surfaced was let finish, not cancelled.
    started = [e for e in b.log if e.endswith(" start")]
    assert len(started) == len(b.written) + (1 if fail.startswith("write") else 0)
    assert [5] not in b.written
    import gc
    gc.collect()
    await asyncio.sleep(0)
    assert unretrieved == []
