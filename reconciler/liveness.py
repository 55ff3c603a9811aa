"""Is an RQ worker alive? Judged only on facts that cannot lie across hosts.

A worker's `last_heartbeat` is written by its own host's clock; ours may be minutes away
from it (a skewed host, an NTP step, a resumed VM). So it is never compared with our wall
clock. What counts, strongest first:

1. This host's proof of the worker's process (hostname, pid, create time; processes.py):
   a live process is a live worker whatever Redis says, a dead one is a dead worker.
2. What the server holds: the hash missing (RQ deleted it, or the server expired it when
   no heartbeat came within the TTL every heartbeat sets) or a recorded death.
3. What several readings show on the daemon's *monotonic* clock: a hash that never
   expires whose heartbeat value stops changing; a command channel nobody listens to
   (PUBSUB NUMSUB 0) *and* a heartbeat that stops changing, both for SILENT_SECONDS,
   while the server says that heartbeat is late (the TTL RQ set with the last one is
   down to its margin: rq_layout.heartbeat_late). NUMSUB 0 alone is never a death: RQ's
   pub/sub thread can die, or its connection drop, while the worker works on.
4. A whole pod (or host) gone: nobody on the command channel *and* every replica that
   proved the worker's process, which ran beside it (in its pod, or on its node), has
   stopped heartbeating in the replica registry (`owner_stale`). Two things that live
   apart from each other both fell silent: the worker's own listener and the daemon that
   watched its pid. A live worker whose listing replica lives is never gone by this rule.

`judge()` is pure: the facts of one reading, what earlier readings showed (`Seen`) and a
monotonic instant in, the verdict and what to remember out. `Memory` keeps the `Seen` of
each worker, bounded, and forgets a worker once its hash is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from reconciler.rq_layout import (
    DEFAULT_KEYS,
    HEARTBEAT_STALE_SECONDS,
    Keys,
    WorkerRecord,
    worker_gone_reason,
)

# A silent command channel is a death only once it has stayed silent, and the heartbeat
# has stood still, this long on our monotonic clock, with the server saying the heartbeat
# is late (the hash has less than its worker's margin left: rq_layout.heartbeat_late).
# RQ's default busy heartbeat interval is 30 s.
SILENT_SECONDS = 30.0
MAX_REMEMBERED = 100_000


@dataclass(frozen=True, slots=True)
class Seen:
    """What earlier readings of one worker showed, on the daemon's monotonic clock."""

    # The heartbeat value as read (only ever compared with the next one for equality).
    heartbeat: datetime | None
    # When this value was first seen.
    since: float
    # When an unbroken run of readings with nobody on the command channel began; None
    # while someone listens (or Redis could not tell).
    silent_since: float | None = None


def remember(prev: Seen | None, rec: WorkerRecord, now: float) -> Seen:
    """`prev` updated with the reading `rec`, made at monotonic instant `now`."""
    silent = rec.subscribers == 0
    if prev is None:
        return Seen(rec.last_heartbeat, now, now if silent else None)
    silent_since = (now if prev.silent_since is None else prev.silent_since) if silent else None
    if rec.last_heartbeat == prev.heartbeat:
        return Seen(prev.heartbeat, prev.since, silent_since)
    return Seen(rec.last_heartbeat, now, silent_since)


def judge(rec: WorkerRecord | None, name: str, prev: Seen | None, now: float, *,
          pid_gone: str | None, keys: Keys = DEFAULT_KEYS,
          owner_stale: bool = False) -> tuple[str, Seen | None]:
    """Why the worker `name` is gone ('' if it is not), and what to remember of it (None:
    forget it).

    `rec`: this reading (None: not read, taken as missing). `prev`: what earlier readings
    showed. `now`: the daemon's monotonic time. `pid_gone`: this host's proof of the
    worker's process: None when there is none (another host, or a process we cannot see),
    '' when it is alive, else why it is dead. `owner_stale`: the replicas that listed
    the worker as theirs (replicas.py) have all stopped heartbeating.
    """
    readable = rec is not None and rec.exists and not rec.unreadable
    if pid_gone == "":
        return "", remember(prev, rec, now) if readable and rec is not None else prev
    if pid_gone:
        return pid_gone, None
    why = worker_gone_reason(rec, name, keys)
    if why:
        return why, None
    if rec is None or not readable:
        return "", prev  # unreadable: says nothing either way
    seen = remember(prev, rec, now)
    if owner_stale and rec.subscribers == 0:
        return (f"nobody subscribed to {keys.channel(name)} and the replica that watched its "
                "process stopped heartbeating: its pod or host is gone"), seen
    still = now - seen.since
    if rec.persistent and still > HEARTBEAT_STALE_SECONDS:
        return f"heartbeat unchanged for {int(still)} s and its hash never expires", seen
    if seen.silent_since is not None and rec.heartbeat_late:
        silent = now - seen.silent_since
        if silent > SILENT_SECONDS and still > SILENT_SECONDS:
            return (f"nobody subscribed to {keys.channel(name)} for {int(silent)} s, "
                    f"heartbeat unchanged for {int(still)} s and late by the server's "
                    "clock"), seen
    return "", seen


class Memory:
    """The `Seen` of each worker judged, bounded (the oldest entry makes room)."""

    def __init__(self, cap: int = MAX_REMEMBERED) -> None:
        self._seen: dict[str, Seen] = {}
        self._cap = cap

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, name: object) -> bool:
        return name in self._seen

    def judge(self, name: str, rec: WorkerRecord | None, now: float, *,
              pid_gone: str | None, keys: Keys = DEFAULT_KEYS, owner_stale: bool = False) -> str:
        why, seen = judge(rec, name, self._seen.get(name), now, pid_gone=pid_gone, keys=keys,
                          owner_stale=owner_stale)
        if seen is None:
            self._seen.pop(name, None)
        else:
            if name not in self._seen and len(self._seen) >= self._cap:
                self._seen.pop(next(iter(self._seen)))
            self._seen[name] = seen
        return why

    def keep_only(self, names: set[str]) -> None:
        """Forget every worker not in `names` (those RQ still registers)."""
        for name in [n for n in self._seen if n not in names]:
            del self._seen[name]
