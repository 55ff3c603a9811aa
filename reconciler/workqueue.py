"""The dirty set: RQ ids some event said to look at again, handed out in coalesced batches.

Events are wake-ups, not data: an id is here once however many events named it, and the
pass that takes it reads both sides fresh. The set is bounded: past `cap` ids (a long
Postgres outage under a busy fleet) it is emptied and `on_overflow` asks for a sweep,
which reads every active row anyway. Must never hold anything but ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

COALESCE_SECONDS = 0.002
MAX_BATCH = 2000
CAP = 200_000


class WorkQueue:
    def __init__(self, *, cap: int = CAP, max_batch: int = MAX_BATCH,
                 coalesce: float = COALESCE_SECONDS,
                 on_added: Callable[[str, int], None] | None = None,
                 on_overflow: Callable[[int], None] | None = None) -> None:
        self.cap, self.max_batch, self.coalesce = cap, max_batch, coalesce
        self._on_added = on_added
        self._on_overflow = on_overflow
        self._ids: set[str] = set()
        self._wake = asyncio.Event()
        self.overflows = 0
        # Ids a cancel flow is working on (how many flows), and those of them that events
        # named meanwhile: see held().
        self._held: dict[str, int] = {}
        self._parked: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, rq_id: object) -> bool:
        return rq_id in self._ids

    def add(self, rq_ids: Iterable[str], source: str | None = None) -> int:
        """Mark ids dirty; `source` (if given) is told how many arrived from it."""
        n = 0
        held = self._held
        for rid in rq_ids:
            if held and rid in held:
                self._parked.add(rid)
            else:
                self._ids.add(rid)
            n += 1
        if n:
            if source is not None and self._on_added is not None:
                self._on_added(source, n)
            if len(self._ids) > self.cap:
                dropped = len(self._ids)
                self._ids.clear()
                self.overflows += 1
                if self._on_overflow is not None:
                    self._on_overflow(dropped)
                return n
            self._wake.set()
        return n

    @contextmanager
    def held(self, rq_id: str) -> Iterator[None]:
        """While a cancel flow stops `rq_id` and writes its row, events about it wait: the
        flow reads both sides itself when the worker is done, and a pass beside it (the
        horse's exit, the worker's own writes) would only compete with it for the loop
        and the pool, milliseconds on the cancel's clock. What arrived meanwhile is
        marked dirty once the flow is over: a wake-up delayed, never lost."""
        self._held[rq_id] = self._held.get(rq_id, 0) + 1
        try:
            yield
        finally:
            left = self._held.pop(rq_id) - 1
            if left:
                self._held[rq_id] = left
            elif rq_id in self._parked:
                self._parked.discard(rq_id)
                self.add((rq_id,))

    def requeue(self, rq_ids: Iterable[str]) -> None:
        """Put back ids a pass could not finish (an outage, a locked row)."""
        self.add(rq_ids)

    async def batch(self) -> list[str]:
        """The next batch: waits for work, lets a burst gather for `coalesce` seconds,
        then takes up to `max_batch` ids."""
        while True:
            await self._wake.wait()
            if self.coalesce > 0:
                await asyncio.sleep(self.coalesce)
            self._wake.clear()
            out: list[str] = []
            while self._ids and len(out) < self.max_batch:
                out.append(self._ids.pop())
            if self._ids:
                self._wake.set()
            if out:
                return out
