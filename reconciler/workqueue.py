"""The dirty set: RQ ids some event said to look at again, handed out in coalesced batches.

Events are wake-ups, not data: an id is here once however many events named it, and the
pass that takes it reads both sides fresh. The set is bounded: past `cap` ids (a long
Postgres outage under a busy fleet) it is emptied and `on_overflow` asks for a sweep,
which reads every active row anyway. Must never hold anything but ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

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

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, rq_id: object) -> bool:
        return rq_id in self._ids

    def add(self, rq_ids: Iterable[str], source: str | None = None) -> int:
        """Mark ids dirty; `source` (if given) is told how many arrived from it."""
        n = 0
        for rid in rq_ids:
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
