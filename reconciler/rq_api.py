"""Writes through RQ's own API, and what the rq imported into this process says about
its keys. The daemon's only module that imports rq (besides `check`'s ACL probes).

It is imported on the first write, not with the reads: a one-shot `sweep` that never
writes through RQ does not pay rq's import (about a tenth of its start-up here). The
reads (rq_state.py) build RQ's key shapes from rq_layout.py's literals, which tests/unit/
test_rq_layout.py holds to the shapes `rq_key_shapes()` takes from the imported rq, on
RQ 2 and RQ 3 alike.

RQ 3 fixes its key prefix from $RQ_KEY_PREFIX when rq is first imported: `prefix_problem`
says when the rq imported here cannot write under the configured prefix.
"""

from __future__ import annotations

import zlib
from typing import Any

import redis
import redis.exceptions
import rq
import rq.defaults
from rq.command import PUBSUB_CHANNEL_TEMPLATE
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.executions import ExecutionRegistry
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.queue import Queue
from rq.results import Result
from rq.worker import Worker
from rq.worker_registration import REDIS_WORKER_KEYS

# The prefix the imported rq builds its keys with: RQ 3 reads RQ_KEY_PREFIX from the
# environment when it is imported (rq/defaults.py); RQ 2 has none and always uses "rq".
IMPORTED_PREFIX: str = getattr(rq.defaults, "RQ_KEY_PREFIX", "rq")


def tail(key: str) -> str:
    """An RQ key as the imported rq builds it, without its prefix ("rq:job:" -> ":job:")."""
    if not key.startswith(IMPORTED_PREFIX + ":"):
        raise ImportError(f"rq {rq.__version__} builds {key!r}, not under {IMPORTED_PREFIX!r}")
    return key[len(IMPORTED_PREFIX):]


def rq_key_shapes() -> dict[str, str]:
    """The shapes of RQ's keys as the imported rq builds them (without the prefix), named
    as rq_layout.py names its literals."""
    return {
        "job": tail(Job.redis_job_namespace_prefix),
        "queue": tail(Queue.redis_queue_namespace_prefix),
        "worker": tail(Worker.redis_worker_namespace_prefix),
        "workers": tail(REDIS_WORKER_KEYS),
        "pubsub": tail(PUBSUB_CHANNEL_TEMPLATE % ""),
        "results": tail(Result.get_key("")),  # type: ignore[no-untyped-call]
        "job_executions": tail(ExecutionRegistry.key_template.format("")),
        "intermediate": IntermediateQueue.get_intermediate_queue_key(""),
    }


def prefix_problem(prefix: str) -> str:
    """Why RQ's API, as imported into this process, cannot write under `prefix` ('' if it
    can): RQ fixes its key prefix when it is imported."""
    if prefix == IMPORTED_PREFIX:
        return ""
    if not hasattr(rq.defaults, "RQ_KEY_PREFIX"):
        return (f"redis.key_prefix is {prefix!r}, but the rq installed for rq-reconciler "
                f"({rq.__version__}) has no key prefix (RQ 2 always uses 'rq'): install rq>=3")
    return (f"redis.key_prefix is {prefix!r}, but rq was imported with RQ_KEY_PREFIX="
            f"{IMPORTED_PREFIX!r}: leave RQ_KEY_PREFIX unset or set it to {prefix!r} in the "
            "daemon's environment")


# -- cancelling a job ---------------------------------------------------------------------

CANCEL_ATTEMPTS = 3
# Looks at a job a worker keeps writing to before the cancel gives up on it.
WATCH_ATTEMPTS = 10


def cancel_sync(client: redis.Redis, job_id: str, only_from: frozenset[str]) -> str:
    """RQ's Job.cancel() on `client` (blocking), if the job is still in one of the statuses
    `only_from`. Returns canceled / already_canceled / missing / unreadable /
    not_canceled (<why>); redis-py's errors propagate.

    An execution can end under Job.cancel(): RQ then fails to read it (ValueError,
    "Execution ... not found", from rq/executions.py refresh(), in 2.12 and 3.0 alike)
    before anything was written. A fresh look decides again."""
    for _ in range(CANCEL_ATTEMPTS - 1):
        try:
            return _cancel_once(client, job_id, only_from)
        except _ExecutionGone:
            continue
    try:
        return _cancel_once(client, job_id, only_from)
    except _ExecutionGone as exc:
        return f"not_canceled ({exc})"


def _cancel_once(client: redis.Redis, job_id: str, only_from: frozenset[str]) -> str:
    # Job.cancel() overwrites any status, "finished" included, and stops nothing that
    # runs: a job that moved on since it was looked at must keep RQ's word for it. RQ's
    # cancel does not WATCH the job, so the look and the cancel are one transaction here:
    # the job's hash WATCHed, read, and cancelled inside MULTI on RQ's own writes, which
    # EXEC refuses if a worker wrote the job meanwhile (then it is looked at again).
    with client.pipeline() as pipe:
        for _ in range(WATCH_ATTEMPTS):
            try:
                pipe.watch(Job.key_for(job_id))  # type: ignore[no-untyped-call]
                job = _fetch(client, job_id)
                if isinstance(job, str):
                    return job
                status = str(getattr(job.get_status(refresh=False), "value", ""))
                if status not in only_from:
                    return f"not_canceled ({status or 'no status'})"
                if status == "canceled":  # (is_canceled would ask Redis again)
                    return "already_canceled"
                if getattr(job, "has_rate_limit", False):
                    # RQ 3 refuses a caller's transaction for a rate-limited job (it frees
                    # the slot after its own EXEC): its own cancel, unguarded, is all there is.
                    pipe.unwatch()
                    return _cancel(job, None)
                pipe.multi()
                outcome = _cancel(job, pipe)
                pipe.execute()
                return outcome
            except redis.exceptions.WatchError:
                continue
    return "not_canceled (the job kept changing while it was cancelled)"


def _fetch(client: redis.Redis, job_id: str) -> Job | str:
    """The job, or what to answer instead of cancelling it."""
    try:
        return _RawJob.fetch(job_id, connection=client, serializer=RefusingSerializer)
    except NoSuchJobError:
        return "missing"
    except redis.exceptions.ResponseError as exc:
        if "WRONGTYPE" not in str(exc):
            raise
        return "unreadable"  # not a hash: not a job RQ could cancel either
    except (ValueError, TypeError, zlib.error, UnicodeDecodeError):
        # A hash RQ itself cannot load (garbage fields): nothing of ours to cancel.
        return "unreadable"


def _cancel(job: Job, pipe: Any) -> str:
    try:
        job.cancel(pipeline=pipe)
    except InvalidJobOperation:
        return "already_canceled"
    except ValueError as exc:
        if not str(exc).startswith("Execution "):
            raise
        raise _ExecutionGone(f"an execution of the job ended under RQ's cancel: {exc}") from exc
    return "canceled"


class RefusingSerializer:
    """The serializer RQ's API gets for our writes. Job hashes carry pickles (data, meta,
    results) that anyone with write access to Redis can craft; loading one would run code
    in a process that holds the database credentials. Job.cancel() loads and dumps
    nothing (rq 2.12 and 3.0: it writes the status and registry entries only), and a
    failed load leaves RQ's `meta` as raw bytes it never writes back."""

    @staticmethod
    def loads(data: bytes) -> Any:
        raise ValueError("rq-reconciler never deserializes job data")

    @staticmethod
    def dumps(obj: Any) -> bytes:
        raise ValueError("rq-reconciler never serializes into a job")


class _RawJob(Job):
    """RQ's Job, restored without its `data`: RQ inflates it whole on every fetch (zlib,
    whatever it claims to unpack to), and cancelling never needs it."""

    def restore(self, raw_data: Any) -> Any:
        fields = dict(raw_data)
        fields[b"data"] = b""
        return super().restore(fields)


class _ExecutionGone(Exception):
    """An execution ended while RQ's Job.cancel() was reading it; nothing was written."""


# -- putting a stranded job back on its queue -----------------------------------------------

# RQ has no API that moves a job from a queue's intermediate list back onto the queue, so
# this is the one write of ours that is a script: atomic in Redis, on the keys RQ's own
# classes name, guarded so that it acts only on a job nobody runs or is about to run:
# still in the intermediate list, still `queued`, no live execution (ExecutionRegistry) and
# no entry in the queue's StartedJobRegistry (`<id>:<execution>` members); and not while
# RQ's maintenance holds the queue's lock (Queue.acquire_maintenance_lock, under which a
# worker runs IntermediateQueue.cleanup, which may fail the same job). Then the id leaves
# the intermediate list (LREM, as IntermediateQueue.remove) and goes back to the front of
# the queue (LPUSH, as Queue.push_job_id(at_front=True)): it was at the front when taken.
# KEYS: job hash, intermediate list, queue, maintenance lock, started registry, execution
# registry. ARGV: job id, now.
_REQUEUE_LUA = """
if redis.call('LPOS', KEYS[2], ARGV[1]) == false then return 'not_requeued (not in the intermediate list)' end
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' then return 'not_requeued (status ' .. tostring(st) .. ')' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'not_requeued (RQ maintenance holds the queue)' end
if redis.call('ZCOUNT', KEYS[6], ARGV[2], '+inf') > 0 then return 'not_requeued (it has an execution)' end
local cursor = '0'
repeat
  local r = redis.call('ZSCAN', KEYS[5], cursor, 'MATCH', ARGV[1] .. ':*', 'COUNT', 1000)
  cursor = r[1]
  if #r[2] > 0 then return 'not_requeued (in the started registry)' end
until cursor == '0'
redis.call('LREM', KEYS[2], 1, ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[1])
return 'requeued'
"""


def requeue_stranded_sync(client: redis.Redis, queue_name: str, job_id: str) -> str:
    """Put the stranded job `job_id` back at the front of `queue_name` (blocking); returns
    requeued / not_requeued (<why>). redis-py's errors propagate."""
    import time

    from rq.registry import StartedJobRegistry

    q = Queue(queue_name, connection=client, serializer=RefusingSerializer)
    keys = [
        Job.key_for(job_id),  # type: ignore[no-untyped-call, unused-ignore]
        q.intermediate_queue_key,
        q.key,
        q.registry_cleaning_key,
        StartedJobRegistry(queue_name, connection=client).key,
        ExecutionRegistry(job_id, connection=client).key,
    ]
    script = client.register_script(_REQUEUE_LUA)
    raw = script(keys=keys, args=[job_id, repr(time.time())])
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# -- queueing an orphan again ----------------------------------------------------------------

# A job whose worker died mid-run stays `started` in RQ, in its queue's StartedJobRegistry,
# until RQ's maintenance retries or fails it (StartedJobRegistry.cleanup: on RQ 2.12 it
# does so whatever the job's status says). To take it out of RQ's hands and run it again,
# in one atomic step: only if the job is still `started` by that worker in that run
# (`worker_name`, `started_at` as read) and RQ's maintenance does not hold the queue;
# its run's entries leave the started registry (members `<id>:<execution>`) and its
# executions go (the per-job ExecutionRegistry, each execution hash, and RQ 3's
# per-worker executions set), so that no cleanup can also act on it; then what
# RQ's own retry writes (rq/job.py, retry): `retries_left` spent by one when asked, and either status `queued`
# and the id pushed onto the queue (front or back), or status `scheduled` and the id in
# the queue's ScheduledJobRegistry at `score`. Its `worker_name` is emptied, as after RQ's
# stop: the dead worker's hash may still name the job as its current one (RQ 2), and a
# job that names that worker would read as held by it (rq_state's in-flight test).
# KEYS: job hash, started registry, queue, scheduled registry, job's execution registry,
# worker's executions set, maintenance lock, the queues set.
# ARGV: job id, worker name, started_at (raw), mode (front/back/schedule), score,
# spend a retry (1/0), now (RQ's time format), execution hash prefix, queue key.
_REQUEUE_ORPHAN_LUA = """
local v = redis.call('HMGET', KEYS[1], 'status', 'worker_name', 'started_at', 'retries_left')
if v[1] ~= 'started' then return 'not_requeued (status ' .. tostring(v[1]) .. ')' end
if (v[2] or '') ~= ARGV[2] then return 'not_requeued (another worker holds it)' end
if (v[3] or '') ~= ARGV[3] then return 'not_requeued (another run of it)' end
if redis.call('EXISTS', KEYS[7]) == 1 then return 'not_requeued (RQ maintenance holds the queue)' end
local left = tonumber(v[4] or '')
if ARGV[6] == '1' and (left == nil or left < 1) then return 'not_requeued (no retries left)' end
local cursor = '0'
repeat
  local r = redis.call('ZSCAN', KEYS[2], cursor, 'MATCH', ARGV[1] .. ':*', 'COUNT', 1000)
  cursor = r[1]
  for j = 1, #r[2], 2 do redis.call('ZREM', KEYS[2], r[2][j]) end
until cursor == '0'
redis.call('ZREM', KEYS[2], ARGV[1])
for _, ex in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  redis.call('DEL', ARGV[8] .. ARGV[1] .. ':' .. ex)
  redis.call('SREM', KEYS[6], ARGV[1] .. ':' .. ex)
end
redis.call('DEL', KEYS[5])
if ARGV[6] == '1' then redis.call('HSET', KEYS[1], 'retries_left', tostring(left - 1)) end
redis.call('HSET', KEYS[1], 'worker_name', '')
if ARGV[4] == 'schedule' then
  redis.call('HSET', KEYS[1], 'status', 'scheduled')
  redis.call('SADD', KEYS[8], ARGV[9])
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
  return 'scheduled'
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'enqueued_at', ARGV[7])
if ARGV[4] == 'front' then
  redis.call('LPUSH', KEYS[3], ARGV[1])
else
  redis.call('RPUSH', KEYS[3], ARGV[1])
end
return 'requeued'
"""


def requeue_orphan_sync(client: redis.Redis, *, queue_name: str, job_id: str, worker_name: str,
                        started_at_raw: str, delay: float, at_front: bool,
                        spend_retry: bool) -> str:
    """Queue the orphan `job_id` again (blocking): back on `queue_name` (its front if
    `at_front`), or, with `delay` > 0, into its scheduled registry that many seconds from
    now; spending one of RQ's retries if `spend_retry`. Returns requeued / scheduled /
    not_requeued (<why>). redis-py's errors propagate."""
    import math
    import time

    from rq.registry import ScheduledJobRegistry, StartedJobRegistry
    from rq.utils import utcformat

    q = Queue(queue_name, connection=client, serializer=RefusingSerializer)
    keys = [
        Job.key_for(job_id),  # type: ignore[no-untyped-call, unused-ignore]
        StartedJobRegistry(queue_name, connection=client).key,
        q.key,
        ScheduledJobRegistry(queue_name, connection=client).key,  # type: ignore[no-untyped-call, unused-ignore]
        ExecutionRegistry(job_id, connection=client).key,
        f"{Worker.redis_worker_namespace_prefix}{worker_name}:executions",
        q.registry_cleaning_key,
        Queue.redis_queues_keys,
    ]
    now = time.time()
    mode = "schedule" if delay > 0 else ("front" if at_front else "back")
    # As ScheduledJobRegistry.schedule(): whole seconds (calendar.timegm), rounded up here
    # so that the wait is never shorter than asked.
    score = str(math.ceil(now + delay)) if delay > 0 else "0"
    from datetime import UTC, datetime

    stamp = utcformat(datetime.fromtimestamp(now, UTC))
    args = [job_id, worker_name, started_at_raw, mode, score, "1" if spend_retry else "0",
            stamp, f"{IMPORTED_PREFIX}:execution:", q.key]
    script = client.register_script(_REQUEUE_ORPHAN_LUA)
    raw = script(keys=keys, args=args)
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# -- letting the dependents of a cancelled job run (cancel.dependents = "enqueue") ------------

class _Opaque(dict[str, Any]):
    """A pickled field (meta, result) as RQ's code holds it here: never unpickled, a dict
    (RQ's code asks meta for len() and get()) that gives its bytes back when RQ saves."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(unserialized=raw)
        self.raw = raw


class PassThroughSerializer:
    """For the one write that saves whole job hashes (Queue.enqueue_dependents rewrites each
    dependent it enqueues): every pickled field is carried as the bytes it was read as,
    never loaded; anything else to dump is refused."""

    @staticmethod
    def loads(data: bytes) -> Any:
        return _Opaque(bytes(data))

    @staticmethod
    def dumps(obj: Any) -> bytes:
        if isinstance(obj, _Opaque):
            return obj.raw
        raise ValueError("rq-reconciler never serializes into a job")


def enqueue_dependents_sync(client: redis.Redis, job_id: str) -> int:
    """What Job.cancel(enqueue_dependents=True) does after its cancel: RQ's
    Queue.enqueue_dependents(job, exclude_job_id=job.id), so that the dependents of the
    cancelled job whose other dependencies are met are enqueued (RQ's own WATCH loop).
    Returns how many dependents the job had; redis-py's errors propagate."""
    try:
        job = Job.fetch(job_id, connection=client, serializer=PassThroughSerializer)
    except NoSuchJobError:
        return 0
    n = int(client.scard(job.dependents_key))
    if n:
        q = Queue(job.origin, connection=client, serializer=PassThroughSerializer)
        q.enqueue_dependents(job, exclude_job_id=job.id)
    return n
