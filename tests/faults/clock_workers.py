"""RQ worker classes for the liveness tests (``rq worker --worker-class
tests.faults.clock_workers...``).

``BehindWorker`` runs on a host whose clock is ten minutes behind: every clock RQ reads
(``rq.utils.now`` and ``current_timestamp``, and each module's own binding of them) is
moved back before the worker starts, so its birth, heartbeats, job times and registry
scores all say so. Redis' TTLs are the server's and are not moved.

``DeafWorker`` never subscribes to its command channel (``rq:pubsub:<name>``), as a
worker whose pub/sub thread died: PUBSUB NUMSUB says 0 while it works on.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from typing import Any

import rq.utils
from rq.worker import Worker

BEHIND = datetime.timedelta(minutes=10)


def _behind_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - BEHIND


def _behind_timestamp() -> int:
    return int(_behind_now().timestamp())


def _patch(name: str, fake: Callable[[], Any]) -> None:
    real = getattr(rq.utils, name)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("rq") and getattr(mod, name, None) is real:
            setattr(mod, name, fake)


class BehindWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # (Every rq module a worker uses is imported by now: rq.worker imports them all.)
        _patch("now", _behind_now)
        _patch("current_timestamp", _behind_timestamp)
        super().__init__(*args, **kwargs)


class DeafWorker(Worker):
    def subscribe(self) -> None:
        self.log.info("Worker %s: not subscribing to %s (test)", self.name,
                      self.pubsub_channel_name)

