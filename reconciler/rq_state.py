"""Redis: everything this package knows about RQ's layout lives here, and only here.

Reads are raw and pipelined (never RQ registry reads with cleanup=True, which change
state). Writes to RQ state go through RQ's own API (rq_api.py: a sync client, in a
thread; rq is imported on the first write, never by reading). Every
redis-py error is translated into RedisUnavailable: a caller must never read "Redis
could not be asked" as "job not found". Odd data costs only itself: a key whose name is
not UTF-8 or holds control characters is skipped (logged once, counted as poison), a key
of the wrong type makes only its job unreadable, and no text is read whole (fields are
clipped in the read script, exception texts inflated with a budget).

RQ 2.x and 3.x side by side: each worker's layout is read from Redis (its hash's
`version`; RQ 3 keeps the job it runs in a `<prefix>:worker:<name>:executions` set, not in
`current_job`), never taken from the rq this package imports, so a fleet mid-upgrade is
read worker by worker. Every key is built from `redis.key_prefix` (RQ 3's RQ_KEY_PREFIX),
with the shapes of RQ's own constants (held to them by tests). Job data is never
deserialized: reads are raw fields, and RQ's API gets a serializer that refuses to load
or dump anything.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import hashlib
import json
import math
import re
import time
import zlib
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff

from reconciler.errors import RedisUnavailable
from reconciler.model import BoundedMemory, PoisonCallback, RqJob, RqStatus, last_line
from reconciler.redisconn import async_client, sync_client

log = structlog.get_logger("reconciler.rq_state")

# The shapes of RQ's keys (2.12 and 3.x alike), as rq's own constants build them:
# Job.redis_job_namespace_prefix, Queue.redis_queue_namespace_prefix,
# Worker.redis_worker_namespace_prefix, REDIS_WORKER_KEYS, PUBSUB_CHANNEL_TEMPLATE,
# Result.get_key, ExecutionRegistry.key_template, IntermediateQueue's key. Literals, so that
# reading needs no rq import (rq_api.py); tests/unit/test_rq_layout.py holds each to the
# shape the imported rq builds.
_JOB = ":job:"
_QUEUE = ":queue:"
_WORKER = ":worker:"
_WORKERS = ":workers"
_PUBSUB = ":pubsub:"
_RESULTS = ":results:"
_JOB_EXECUTIONS = ":executions:"
_INTERMEDIATE = ":intermediate"
# Execution.key: "<prefix>:execution:<job_id>:<execution_id>" (rq/executions.py, 2.12 and
# 3.0 alike; a property, no constant to take it from).
_EXECUTION = ":execution:"
# RQ 3's per-worker execution index (WORKER_EXECUTIONS_KEY_TEMPLATE in rq/executions.py,
# "<prefix>:worker:{0}:executions"); RQ 2 has no such key, so it cannot come from an
# imported rq 2. tests/unit/test_rq_layout.py holds both to RQ's own when rq 3 is imported.
WORKER_EXECUTIONS_SUFFIX = ":executions"


class Keys:
    """Every RQ key and channel name this package reads or sends to, under one prefix."""

    __slots__ = ("execution", "job", "job_executions", "prefix", "pubsub", "queue", "results",
                 "worker", "workers")

    def __init__(self, prefix: str = "rq") -> None:
        self.prefix = prefix
        self.job = prefix + _JOB  # + job id: the job hash
        self.queue = prefix + _QUEUE  # + queue name: the queue list
        self.worker = prefix + _WORKER  # + worker name: the worker hash
        self.workers = prefix + _WORKERS  # the set of every worker hash's key
        self.pubsub = prefix + _PUBSUB  # + worker name: its command channel
        self.results = prefix + _RESULTS  # + job id: the results stream
        self.execution = prefix + _EXECUTION  # + "<job id>:<execution id>": one execution
        self.job_executions = prefix + _JOB_EXECUTIONS  # + job id: its executions (zset)

    def channel(self, worker_name: str) -> str:
        return self.pubsub + worker_name

    def rebase(self, rq_key: str) -> str:
        """A key as the imported rq builds it (a registry's, say), under this prefix."""
        from reconciler.rq_api import tail

        return self.prefix + tail(rq_key)

    def intermediate(self, queue: str) -> str:
        """The list a worker moves a job to as it dequeues it (RQ >= 2.0)."""
        return self.queue + queue + _INTERMEDIATE

    def job_id(self, key: str) -> str | None:
        """`rq:job:<id>` -> id; None for RQ's side keys (`rq:job:<id>:dependents` ...)."""
        if not key.startswith(self.job):
            return None
        rest = key[len(self.job):]
        # RQ reserves ':' inside ids for execution ids, so a colon means a side key.
        return rest if rest and ":" not in rest else None

    def worker_name(self, key: str) -> str | None:
        """The worker a key under `rq:worker:` belongs to: its hash, or (RQ 3) its
        executions set, whose events say the same worker changed. RQ 3 itself could not
        tell a worker named `<name>:executions` from that set, so neither can we."""
        if not key.startswith(self.worker):
            return None
        rest = key[len(self.worker):]
        if rest.endswith(WORKER_EXECUTIONS_SUFFIX):
            rest = rest[:-len(WORKER_EXECUTIONS_SUFFIX)]
        return rest or None


DEFAULT_KEYS = Keys()
# For callers that only ever deal with the default prefix (and the tests' raw writes).
JOB_PREFIX: str = DEFAULT_KEYS.job
QUEUE_PREFIX: str = DEFAULT_KEYS.queue
WORKER_PREFIX: str = DEFAULT_KEYS.worker


# A busy worker refreshes its hash every job_monitoring_interval (30 s) with a TTL of
# 90 s; an idle one every worker_ttl (420 s) with TTL + 60. Past this, it is gone.
HEARTBEAT_STALE_SECONDS = 420 + 60 + 30
# After this much silence on the keyspace subscription, PING it.
PUBSUB_LIVENESS_SECONDS = 30.0
# Keyspace flags we need: K keyspace channel, g generic (del/expire), h hash, x expired.
NEEDED_KEYSPACE_FLAGS = "Kghx"
# How long after a Redis (re)start PUBSUB NUMSUB is not evidence of a worker's death.
PUBSUB_SETTLE_SECONDS = 30

_JOB_FIELDS = (b"status", b"worker_name", b"origin", b"started_at", b"ended_at", b"exc_info")
_REDIS_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
_KNOWN = {s.value for s in RqStatus} - {
    RqStatus.MISSING.value, RqStatus.UNKNOWN.value, RqStatus.UNREADABLE.value}
# A job id or worker name longer than this is not one RQ made (RQ's ids are 36 characters;
# worker names are host.pid or a uuid).
MAX_NAME = 512
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Exception texts: at most this much is inflated (a zlib bomb of 389 KB unpacks to 826 MB),
# and of that only the end is kept: the last line is all that is used.
EXC_INFLATE_BUDGET = 4 * 1024 * 1024
EXC_TAIL = 64 * 1024
EXC_NOT_READ = "(exception text too long or incomplete; its end was not read)"


class Layout(enum.StrEnum):
    """Where a worker records the job it runs, as its own hash says."""

    # RQ 2.x: the worker hash's `current_job` field.
    RQ2 = "rq2"
    # RQ 3.x: the `<prefix>:worker:<name>:executions` set, one `<job_id>:<execution_id>`
    # member per running execution, each with its `<prefix>:execution:...` hash.
    RQ3 = "rq3"
    # No version, another major, or evidence that contradicts the version: nothing it says
    # about its job is enough to prove a horse by.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """An RQ worker as read in one atomic step (its hash, and its executions), plus its
    command-channel subscriber count.

    `current_job` is the shared notion the rest of the package uses, whatever the layout:
    RQ 2's field, or RQ 3's single live execution (None when it runs several). The
    execution fields name that one execution (RQ 3), or the one live execution of
    `current_job` in RQ 2's per-job execution registry."""

    name: str
    exists: bool
    birth: datetime | None = None
    last_heartbeat: datetime | None = None
    pid: int | None = None
    hostname: str = ""
    death: bool = False
    current_job: str | None = None
    # PUBSUB NUMSUB of its command channel; -1 when Redis cannot tell (just restarted).
    subscribers: int = 0
    # The key exists but is not a hash RQ wrote (WRONGTYPE): it says nothing either way.
    unreadable: bool = False
    version: str = ""
    # Records built by hand (tests) describe an RQ 2 worker; the reader always sets it.
    layout: Layout = Layout.RQ2
    execution_id: str | None = None
    execution_created_at: datetime | None = None
    # Live executions: all the worker holds (RQ 3), or those of current_job (RQ 2).
    executions: int = 0

    @property
    def provable(self) -> bool:
        """True if what this record says about the worker's job is enough to prove a horse
        by: a known layout, and (RQ 3) exactly one live execution."""
        if self.layout is Layout.UNKNOWN or not self.current_job:
            return False
        return self.layout is Layout.RQ2 or (self.executions == 1 and self.execution_id is not None)


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def parse_time(value: bytes | str | None) -> datetime | None:
    """RQ's utcformat timestamps ('%Y-%m-%dT%H:%M:%S.%fZ'); garbage gives None, never an
    exception. fromisoformat: strptime cost a tenth of a 20,000-row sweep."""
    if not value:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def inflate_tail(data: bytes, *, budget: int = EXC_INFLATE_BUDGET,
                 tail: int = EXC_TAIL) -> tuple[bytes, bool]:
    """The last `tail` bytes of zlib `data` inflated, inflating at most about `budget`
    bytes; and whether that reached the end of the stream. Memory stays O(tail) whatever
    the data claims to unpack to. zlib.error if `data` is not zlib at all."""
    d = zlib.decompressobj()
    end = b""
    total = 0
    buf = data
    while total < budget:
        out = d.decompress(buf, tail)
        buf = d.unconsumed_tail
        if out:
            total += len(out)
            end = (end + out)[-tail:]
        if d.eof or (not out and not buf):
            break
    return end, d.eof


def _decode_exc(raw: bytes | None, *, b64: bool) -> str:
    """The end of an exception text (zlib, and base64 in RQ's results stream). A text
    that could not be read to its end (too long, or clipped by the read script) ends in
    EXC_NOT_READ instead of a last line that is not the last."""
    if not raw:
        return ""
    try:
        data = base64.b64decode(raw) if b64 else raw
        end, complete = inflate_tail(data)
    except (binascii.Error, zlib.error, ValueError):
        return ""
    text = end.decode("utf-8", "replace")
    return text if complete else f"{text}\n{EXC_NOT_READ}"


def name_problem(name: str) -> str:
    """Why `name`, a job id or worker name taken from a key, is not one to act on; ''
    if it is fine. Such a name cannot be an RQ id, and would poison SQL (NUL) or logs."""
    if not name:
        return "empty name"
    if len(name) > MAX_NAME:
        return f"name longer than {MAX_NAME} characters"
    if _CONTROL.search(name):
        return "name holds a control character"
    return ""


def decode_key(raw: bytes | str) -> str | None:
    """A key name as text, or None if it is not UTF-8 (RQ's names always are)."""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def printable_key(raw: bytes | str) -> str:
    """A key name fit for a log line or a label, whatever it holds."""
    return ascii(raw if isinstance(raw, str) else bytes(raw))[:200]


_STATUS_BY_WORD: dict[bytes, tuple[RqStatus, str]] = {
    s.value.encode(): (s, str(s.value)) for s in RqStatus if s.value in _KNOWN}
_UNKNOWN_WORD = (RqStatus.UNKNOWN, "")


def job_from_hash(job_id: str, values: Sequence[bytes | None], result_exc: bytes | None = None) -> RqJob:
    """Build an RqJob from HMGET of _JOB_FIELDS. All-None means the hash does not exist.
    `result_exc`: a failed job's exc_string from its latest result (RQ 2), preferred over
    the job hash's legacy exc_info. Runs once per active row in a sweep: no per-field
    helpers on the common path."""
    status_b, worker_b, origin_b, started_b, ended_b, exc_b = values[:6]
    if status_b is None and worker_b is None and origin_b is None and started_b is None \
            and ended_b is None and exc_b is None:
        return RqJob(job_id, RqStatus.MISSING)
    status, word = _STATUS_BY_WORD.get(status_b or b"", _UNKNOWN_WORD)
    worker = ""
    if worker_b:
        try:
            worker = worker_b.decode("utf-8")
        except UnicodeDecodeError:
            if status is RqStatus.STARTED:
                # Which worker runs it decides whether the job is orphaned; RQ always
                # writes UTF-8 there, so this hash is not RQ's and says nothing.
                return RqJob(job_id, RqStatus.UNREADABLE, "unreadable: worker_name is not UTF-8")
            worker = worker_b.decode("utf-8", "replace")
    exc = ""
    if result_exc and status is RqStatus.FAILED:
        exc = _decode_exc(result_exc, b64=True)
    if not exc and exc_b:
        exc = _decode_exc(exc_b, b64=False)
    return RqJob(
        job_id,
        status,
        word or _text(status_b)[:64],
        worker,
        origin_b.decode("utf-8", "replace") if origin_b else "",
        parse_time(started_b) if started_b else None,
        parse_time(ended_b) if ended_b else None,
        last_line(exc) if exc else "",
    )


def job_id_from_key(key: str, keys: Keys = DEFAULT_KEYS) -> str | None:
    return keys.job_id(key)


def worker_name_from_key(key: str, keys: Keys = DEFAULT_KEYS) -> str | None:
    return keys.worker_name(key)


def missing_keyspace_flags(current: str) -> str:
    """The flags of NEEDED_KEYSPACE_FLAGS that `current` does not already enable."""
    have = set(current)
    if "A" in have:  # alias for g$lshzxetd
        have |= set("g$lshzxetd")
    return "".join(f for f in NEEDED_KEYSPACE_FLAGS if f not in have)


class RqState:
    """A narrow async interface to RQ's Redis state."""

    def __init__(self, url: str, *, socket_timeout: float = 5.0,
                 on_poison: PoisonCallback | None = None, key_prefix: str = "rq") -> None:
        """`on_poison(kind, name, error)`: called once per odd key ("key") or unreadable
        job hash ("job_hash") newly met; the daemon counts them (poison_total).
        `key_prefix`: RQ's RQ_KEY_PREFIX (redis.key_prefix), for every key read or sent."""
        self.url = url
        self.keys = Keys(key_prefix)
        # RQ's API writes under the prefix it was imported with; the CLI refuses to start
        # on a mismatch, and a write under the wrong prefix is refused here too (checked
        # on the first write, which is when rq is imported: rq_api.py).
        self._write_problem: str | None = None
        self._timeout = socket_timeout
        self._on_poison = on_poison
        self._poison_seen = BoundedMemory()
        # redis-py's default retries (10, with backoff) would hide an outage for seconds;
        # we retry at our own level, visibly, so one quick retry is all we want here.
        self.client: aioredis.Redis = async_client(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
            health_check_interval=30,
            retry=AsyncRetry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        )
        self._sync: redis.Redis | None = None
        # The server that answered last (INFO run_id) and when another one took its place:
        # a Sentinel failover keeps the uptime of the promoted replica (see read_workers).
        self._server_run_id: str | None = None
        self._server_changed_at = -math.inf
        # When this Redis last answered that it can be believed about missing keys.
        self._believed_at = -math.inf
        self._script: Any = None
        self._exists_script: Any = None

    def poison(self, kind: str, name: str, error: str) -> None:
        """Log and count a key or job hash we skip, once (until it is forgotten: the
        memory is bounded)."""
        if not self._poison_seen.first_time((kind, name), error):
            return
        log.warning(f"poison_{kind}", key=name, error=error)
        if self._on_poison is not None:
            self._on_poison(kind, name, error)

    def _usable_name(self, raw: bytes | str, name: str | None) -> bool:
        """True if `name` (parsed from key `raw`; None if that was not UTF-8) is one to
        act on; otherwise it is reported as a poison key."""
        problem = "key name is not UTF-8" if name is None else name_problem(name)
        if problem:
            self.poison("key", printable_key(raw), problem)
            return False
        return True

    @property
    def db(self) -> int:
        return int(self.client.connection_pool.connection_kwargs.get("db", 0) or 0)

    async def close(self) -> None:
        await self.client.aclose()
        if self._sync is not None:
            self._sync.close()

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc

    async def not_authoritative(self, *, max_age: float = 0.0) -> str:
        """Why this Redis cannot be believed about a missing key right now ('' if it can):
        it is still loading its data set, or it is a replica that is syncing or has lost
        its master (its keyspace may be empty or behind). One round trip.

        `max_age`: a "can be believed" answer at most this many seconds old is taken as
        it is (a sweep asks once a page; the rows it holds as not found are read, and
        this asked, afresh before any is failed). A "cannot" is never remembered."""
        now = time.monotonic()
        if max_age > 0 and now - self._believed_at <= max_age:
            return ""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.info("persistence")
                pipe.info("replication")
                info, repl = await pipe.execute()
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        why = _not_believed(info, repl)
        if not why:
            self._believed_at = now
        return why

    async def read_jobs(self, ids: Iterable[str]) -> dict[str, RqJob]:
        """One atomic script call per 1,000 jobs: status and fields, a failed job's text,
        and whether a canceled job is still in a worker's hands."""
        id_list = list(dict.fromkeys(ids))
        if not id_list:
            return {}
        try:
            jobs: dict[str, RqJob] = {}
            for i in range(0, len(id_list), READ_CHUNK):
                chunk = id_list[i:i + READ_CHUNK]
                readable, packed = _pack_ids(chunk)
                k = self.keys
                raw = await self._read_jobs_script(args=[
                    packed, k.job, k.results, k.queue, _INTERMEDIATE, k.job_executions, "",
                    k.worker, repr(time.time()), EXC_READ_MAX, EXC_READ_SMALL,
                    EXC_READ_BUDGET, WORKER_EXECUTIONS_SUFFIX, MAX_EXECUTIONS]) if readable else []
                for jid, vals in zip(readable, raw, strict=True):
                    job = jobs[jid] = _job_from_script(jid, vals)
                    if job.status is RqStatus.UNREADABLE:
                        self.poison("job_hash", jid, job.raw_status)
                for jid in chunk:
                    if jid not in jobs:
                        # RQ never makes such an id (letters, digits, '_' and '-' only).
                        jobs[jid] = RqJob(jid, RqStatus.MISSING)
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        return jobs

    @property
    def _read_jobs_script(self) -> Any:
        if self._script is None:
            self._script = self.client.register_script(_READ_JOBS_LUA)
        return self._script

    async def jobs_exist(self, ids: Sequence[str]) -> dict[str, bool]:
        if not ids:
            return {}
        out: dict[str, bool] = {}
        try:
            for i in range(0, len(ids), READ_CHUNK):
                chunk = list(ids[i:i + READ_CHUNK])
                if self._exists_script is None:
                    self._exists_script = self.client.register_script(_EXISTS_LUA)
                readable, packed = _pack_ids(chunk)
                raw = await self._exists_script(args=[packed, self.keys.job]) if readable else []
                out.update(dict.fromkeys(chunk, False))
                out.update((jid, bool(n)) for jid, n in zip(readable, raw, strict=True))
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        return out

    async def read_workers(self, names: Iterable[str]) -> dict[str, WorkerRecord]:
        """Each worker as one atomic script reads it (its hash, its executions and their
        hashes, whatever its RQ version), with its command channel's subscriber count."""
        wanted = [n for n in dict.fromkeys(names) if n]
        # A name holding the script's separator cannot be asked about in it: unreadable
        # (it says nothing either way), never "missing", which would read as a death.
        odd = {n: WorkerRecord(n, exists=True, unreadable=True, subscribers=-1)
               for n in wanted if _ID_SEP in n}
        name_list = [n for n in wanted if n not in odd]
        if not name_list:
            return odd
        channels = [self.keys.channel(n) for n in name_list]
        try:
            replies = await self._read_workers_once(name_list, channels)
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                # A restarted Redis forgot the script: load it, ask once more.
                await self.client.script_load(_READ_WORKERS_LUA)
                replies = await self._read_workers_once(name_list, channels)
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        raw: list[Any] = []
        for reply in replies[:-2]:
            if isinstance(reply, Exception) or not isinstance(reply, list):
                # The script as a whole failed (not one worker's key): Redis could not be
                # asked, which must never read as "worker gone".
                raise RedisUnavailable(f"reading workers: {reply}")
            raw.extend(reply)
        raw += replies[-2:]
        info = raw[-1] if isinstance(raw[-1], dict) else {}
        uptime = info.get("uptime_in_seconds")
        # A Redis that has just (re)started has lost every subscription; workers come back
        # within seconds (RQ retries its pub/sub connection every 2 s). Until then a count
        # of 0 says nothing about them: report it as unknown (-1), not as 0.
        settled = not isinstance(uptime, int) or uptime >= PUBSUB_SETTLE_SECONDS
        # So has a replica just promoted by a Sentinel failover (its uptime is long): the
        # workers follow within seconds. A change of server is one of run_id.
        run_id, mono = info.get("run_id"), time.monotonic()
        if isinstance(run_id, str) and run_id != self._server_run_id:
            if self._server_run_id is not None:
                self._server_changed_at = mono
            self._server_run_id = run_id
        settled = settled and mono - self._server_changed_at >= PUBSUB_SETTLE_SECONDS
        numsub_flat: list[Any] = raw[-2] if isinstance(raw[-2], list) else []
        subs: dict[str, int] = {}
        for i in range(0, len(numsub_flat) - 1, 2):
            ch_raw = numsub_flat[i]
            subs[ch_raw.decode() if isinstance(ch_raw, bytes) else str(ch_raw)] = int(numsub_flat[i + 1])
        out: dict[str, WorkerRecord] = {}
        for n, ch, vals in zip(name_list, channels, raw[:-2], strict=True):
            count = subs.get(ch, -1 if not isinstance(raw[-2], list) else 0)
            if count == 0 and not settled:
                count = -1
            out[n] = worker_from_reply(n, vals, count)
        return {**out, **odd}

    async def _read_workers_once(self, names: list[str], channels: list[str]) -> list[Any]:
        """One round trip: the workers script per chunk of names (EVALSHA, not redis-py's
        Script, which would add a SCRIPT EXISTS round trip to every pipeline), their
        channels' subscriber counts, and the server's uptime."""
        k = self.keys
        now = repr(time.time())
        async with self.client.pipeline(transaction=False) as pipe:
            for i in range(0, len(names), READ_CHUNK):
                pipe.evalsha(_READ_WORKERS_SHA, 0, _ID_SEP.join(names[i:i + READ_CHUNK]),
                             k.worker, WORKER_EXECUTIONS_SUFFIX, k.execution,
                             k.job_executions, now, MAX_EXECUTIONS)
            pipe.execute_command("PUBSUB", "NUMSUB", *channels)
            pipe.info("server")
            return list(await pipe.execute(raise_on_error=False))

    async def worker_names(self) -> list[str]:
        try:
            keys = await self.client.smembers(self.keys.workers)
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        names: list[str] = []
        for k in keys:
            key = decode_key(k)
            name = self.keys.worker_name(key) if key is not None else None
            if key is not None and name is None:
                continue  # not a worker key at all: not ours to judge
            if self._usable_name(k, name):
                assert name is not None
                names.append(name)
        return sorted(names)

    # -- keyspace notifications -------------------------------------------------------

    async def keyspace_flags(self) -> str:
        """Current notify-keyspace-events. redis.exceptions.ResponseError if CONFIG is
        forbidden (managed Redis) — the caller decides what that means."""
        try:
            cfg = await self.client.config_get("notify-keyspace-events")
        except redis.exceptions.ResponseError:
            raise
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        raw: dict[Any, Any] = dict(cfg)
        value = raw.get(b"notify-keyspace-events", raw.get("notify-keyspace-events", b""))
        return value.decode() if isinstance(value, bytes) else str(value)

    async def add_keyspace_flags(self, current: str) -> str:
        """Add what we need, keeping every flag already set. Returns the new setting."""
        missing = missing_keyspace_flags(current)
        if not missing:
            return current
        new = current + missing
        try:
            await self.client.config_set("notify-keyspace-events", new)
        except redis.exceptions.ResponseError:
            raise
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        return new

    def keyspace_patterns(self) -> list[str]:
        # The worker pattern also covers RQ 3's `<worker>:executions` sets.
        return [f"__keyspace@{self.db}__:{self.keys.job}*",
                f"__keyspace@{self.db}__:{self.keys.worker}*"]

    async def keyspace_events(self) -> AsyncGenerator[tuple[str, str, str], None]:
        """Yield ("subscribed", "", "") once subscribed, then (kind, id, event) with kind "job"
        or "worker", until the connection drops (then RedisUnavailable)."""
        prefix_len = len(f"__keyspace@{self.db}__:")
        # A client of its own, with no silent retry: redis-py would otherwise reconnect
        # and resubscribe behind our back, and a restarted Redis (which forgot its
        # notify-keyspace-events) would leave us subscribed to silence.
        client: aioredis.Redis = async_client(
            self.url, socket_connect_timeout=self._timeout, socket_timeout=None,
            retry=AsyncRetry(NoBackoff(), 0),
        )
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe(*self.keyspace_patterns())
            yield "subscribed", "", ""
            while True:
                msg = await pubsub.get_message(timeout=PUBSUB_LIVENESS_SECONDS)
                if msg is None:
                    # Silence: prove the connection is still there.
                    async with asyncio.timeout(self._timeout):  # not wait_for (gh-86296)
                        await pubsub.ping()
                    continue
                raw_channel = msg.get("channel") or b""
                event = _text(msg.get("data")) if isinstance(msg.get("data"), bytes) else ""
                decoded = decode_key(raw_channel)
                if decoded is None:
                    # Which key it is cannot even be told: nothing to wake, one poison.
                    self._usable_name(raw_channel[prefix_len:], None)
                    continue
                channel = decoded[prefix_len:]
                jid = self.keys.job_id(channel)
                if jid is not None:
                    if self._usable_name(channel, jid):
                        yield "job", jid, event
                    continue
                wname = self.keys.worker_name(channel)
                if wname is not None and self._usable_name(channel, wname):
                    yield "worker", wname, event
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        finally:
            with contextlib.suppress(*_REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(*_REDIS_ERRORS):
                await client.aclose()

    # -- writes, through RQ's own API -------------------------------------------------

    def _sync_client(self) -> redis.Redis:
        if self._sync is None:
            self._sync = sync_client(
                self.url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
            )
        return self._sync

    async def cancel_job(self, job_id: str, *, only_from: Iterable[RqStatus]) -> str:
        """RQ's Job.cancel(), if the job is still in one of `only_from`. Returns canceled /
        already_canceled / missing / unreadable / not_canceled (<status>)."""
        from reconciler import rq_api

        allowed = frozenset(s.value for s in only_from)
        if self._write_problem is None:
            self._write_problem = rq_api.prefix_problem(self.keys.prefix)
        if self._write_problem:
            log.error("rq_write_refused", job_id=job_id, error=self._write_problem)
            return f"not_canceled ({self._write_problem})"
        try:
            return await asyncio.to_thread(rq_api.cancel_sync, self._sync_client(), job_id, allowed)
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc

    async def send_stop_job(self, worker_name: str, job_id: str,
                            worker: WorkerRecord | None = None) -> int:
        """RQ's command that stops `job_id` on `worker_name`: `stop-execution` for the
        execution `worker` (as read) names on an RQ 3 worker, else `stop-job` (see
        stop_command). The payloads are those RQ's send_stop_execution_command and
        send_stop_job_command send (rq/command.py); published by us so that we learn how
        many workers received it: 0 means nobody listens."""
        command, args = stop_command(worker, job_id)
        payload = json.dumps({"command": command, **args})
        try:
            return int(await self.client.publish(self.keys.channel(worker_name), payload))
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc


def _not_believed(persistence: dict[str, Any], replication: dict[str, Any]) -> str:
    """Why a Redis with this INFO cannot be believed about a missing key ('' if it can)."""
    if int(persistence.get("loading", 0) or 0):
        return "redis is loading its data set"
    if replication.get("role") == "slave":
        if int(replication.get("master_sync_in_progress", 0) or 0):
            return "redis is a replica in its initial sync"
        if replication.get("master_link_status") != "up":
            return "redis is a replica that lost its master"
    return ""


def worker_from_hash(name: str, vals: Sequence[bytes | None], subscribers: int) -> WorkerRecord:
    """A WorkerRecord from the worker hash's birth, last_heartbeat, pid, hostname, death,
    current_job (and version) values alone: an RQ 2 worker unless its version says other."""
    if all(v is None for v in vals):
        return WorkerRecord(name, exists=False, subscribers=subscribers)
    return worker_from_reply(name, [*vals[:6], vals[6] if len(vals) > 6 else b"2", 0, [], []],
                             subscribers)


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) < 4 else None


def layout_of(version: str, has_current_job: bool, executions_set: int) -> Layout:
    """A worker's layout from its hash's `version`, checked against the evidence:
    `executions_set` is the size of its RQ 3 executions set (-1 if that key is not a set
    RQ could have written). Contradicting evidence makes it UNKNOWN, as does any other
    version: what such a worker says about its job cannot be trusted to prove a horse."""
    major = _major(version)
    if major == 2 and executions_set == 0:
        return Layout.RQ2  # RQ 2 keeps no executions set (rq 2.12 rq/executions.py)
    if major == 3 and executions_set >= 0 and not has_current_job:
        return Layout.RQ3  # RQ 3 never writes current_job (rq 3.0 rq/worker/base.py serialize)
    return Layout.UNKNOWN


def _exec_time(value: Any) -> datetime | None:
    """An execution's created_at: seconds since the epoch, as RQ's Execution.serialize
    writes it (rq/executions.py)."""
    try:
        return datetime.fromtimestamp(float(_text(value)), UTC)
    except (ValueError, OverflowError, OSError):
        return None


def worker_from_reply(name: str, vals: Any, subscribers: int) -> WorkerRecord:
    """A WorkerRecord from one worker's reply of _READ_WORKERS_LUA."""
    if not isinstance(vals, list) or len(vals) < 10 or vals[0] == b"!ERR":
        return WorkerRecord(name, exists=True, unreadable=True, subscribers=subscribers)
    fields: list[Any] = vals[:7]
    if all(v is None for v in fields):
        return WorkerRecord(name, exists=False, subscribers=subscribers)
    set_size = vals[7] if isinstance(vals[7], int) else -1
    live3: list[Any] = vals[8] if isinstance(vals[8], list) else []
    live2: list[Any] = vals[9] if isinstance(vals[9], list) else []
    pid: int | None
    try:
        pid = int(_text(fields[2])) if fields[2] else None
    except ValueError:
        pid = None
    version = _text(fields[6])[:64]
    field_job = _text(fields[5]) or None
    layout = layout_of(version, field_job is not None, set_size)
    execution_id: str | None = None
    created: datetime | None = None
    if layout is Layout.RQ3:
        # Several live executions (or a set too big to read): which one a child runs
        # cannot be told, so none is named.
        count = len(live3) // 3 if 0 < set_size <= MAX_EXECUTIONS else set_size
        current = None
        if count == 1 and len(live3) == 3:
            current, execution_id, created = _text(live3[0]), _text(live3[1]), _exec_time(live3[2])
    else:
        count = len(live2) // 2
        current = field_job
        if layout is Layout.RQ2 and count == 1:
            execution_id, created = _text(live2[0]), _exec_time(live2[1])
    return WorkerRecord(
        name=name,
        exists=True,
        birth=parse_time(fields[0]),
        last_heartbeat=parse_time(fields[1]),
        pid=pid,
        hostname=_text(fields[3]),
        death=bool(fields[4]),
        current_job=current,
        subscribers=subscribers,
        version=version,
        layout=layout,
        execution_id=execution_id,
        execution_created_at=created,
        executions=count,
    )


# Each worker as one atomic step: its hash, its RQ 3 executions set with each live
# execution's created_at, and (for RQ 2's current_job) the live executions in that job's
# execution registry. Read apart, the hash could name a job whose execution had already
# been replaced by the next one. Read-only (HMGET, SCARD, SMEMBERS, ZRANGEBYSCORE).
# ARGV[1] = worker names joined by "\n", ARGV[2] = the worker hash prefix, ARGV[3] = the
# executions set's suffix, ARGV[4] = the execution hash prefix, ARGV[5] = the job
# execution registry prefix, ARGV[6] = now, ARGV[7] = the most executions read per worker.
# Reply per worker: {"!ERR", msg} if its hash cannot be read, else the 7 hash values, the
# executions set's size (-1: not a set RQ wrote, or a member that is no `<job>:<execution>`),
# {job, execution, created_at, ...} of its live executions and {execution, created_at, ...}
# of current_job's. An execution is live while its hash exists: RQ deletes it when the
# execution ends, and it expires when its worker died.
_READ_WORKERS_LUA = """
local out = {}
local wp, es, xp, rp = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now, cap = ARGV[6], tonumber(ARGV[7])
local function created(job, ex)
  local e = redis.pcall('HMGET', xp .. job .. ':' .. ex, 'created_at')
  if type(e) == 'table' and e[1] and #e[1] <= 64 then return e[1] end
  return false
end
local i = 0
for name in string.gmatch(ARGV[1], '[^\\n]+') do
  i = i + 1
  local h = redis.pcall('HMGET', wp .. name, 'birth', 'last_heartbeat', 'pid', 'hostname',
                        'death', 'current_job', 'version')
  local long = false
  if not h.err then
    for j = 1, 7 do
      if h[j] and #h[j] > 1024 then long = true end
    end
  end
  if h.err then
    out[i] = {'!ERR', h.err}
  elseif long then
    out[i] = {'!ERR', 'a field is longer than any RQ writes'}
  else
    local size = redis.pcall('SCARD', wp .. name .. es)
    local live3, live2 = {}, {}
    if type(size) ~= 'number' then
      size = -1
    elseif size > 0 and size <= cap then
      for _, m in ipairs(redis.pcall('SMEMBERS', wp .. name .. es)) do
        local job, ex = string.match(m, '^([%w_-]+):([%w_-]+)$')
        if not job or #m > 256 then
          size = -1
        else
          local c = created(job, ex)
          if c then
            live3[#live3 + 1] = job
            live3[#live3 + 1] = ex
            live3[#live3 + 1] = c
          end
        end
      end
    end
    if h[6] and #h[6] <= 256 then
      local ids = redis.pcall('ZRANGEBYSCORE', rp .. h[6], now, '+inf', 'LIMIT', 0, cap)
      if type(ids) == 'table' and not ids.err then
        for _, ex in ipairs(ids) do
          local c = created(h[6], ex)
          if c then
            live2[#live2 + 1] = ex
            live2[#live2 + 1] = c
          end
        end
      end
    end
    out[i] = {h[1], h[2], h[3], h[4], h[5], h[6], h[7], size, live3, live2}
  end
end
return out
"""
_READ_WORKERS_SHA = hashlib.sha1(_READ_WORKERS_LUA.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


# One round trip and one reply per chunk of jobs instead of one command each: per-command
# packing and parsing in redis-py dominated a sweep. Read-only (HMGET, XREVRANGE, LPOS,
# ZCOUNT, HGET, SCARD, SMEMBERS): it changes nothing in RQ. ARGV[1] = the chunk's job ids
# joined by "\n", ARGV[2] = the job hash prefix, ARGV[3] = the results stream prefix,
# ARGV[4..7] = the intermediate list and execution registry keys around a queue name / job
# id, ARGV[8] = the worker hash prefix, ARGV[9] = now, ARGV[13] = the suffix of RQ 3's
# worker executions set, ARGV[14] = the most members of it worth reading. The ids travel
# as one argument, not as KEYS:
# packing 2,000 key arguments in redis-py cost more than running the script. That needs a
# standalone Redis (a cluster requires declared keys); so does RQ itself.
# Reply per job: 0 if its hash does not exist, else the HMGET values, [7] the failure text
# of a failed job, [8] for a canceled job 1 if a worker still holds it. A key of the wrong
# type fails only its own entry ({"!ERR", msg}), and so does a short field (status, worker,
# queue, times) longer than any RQ writes. Compressed exception texts are clipped: at most
# ARGV[10] bytes each until ARGV[12] bytes were returned for the chunk, ARGV[11] after
# that (both multiples of 4, so base64 stays decodable): a reply never holds a whole 300 MB
# field, and a chunk of 1,000 failed jobs stays a few MB.
#
# Why [8] is read here, in the same atomic step as the status: RQ's Job.cancel() does not
# stop a worker that dequeued the job a moment earlier. The job sits in its queue's
# intermediate list (BLMOVE) or has an execution record until the horse writes "started"
# over "canceled"; or the horse already runs it and its worker names it (RQ 2's
# current_job, or a `<id>:<execution>` member of RQ 3's executions set).
# Read in a second round trip, the horse could take the job out of the intermediate list
# in between, while the worker name read with the status was still empty: the job would
# look canceled and idle, the row would be cancelled, and the job would then run to its end.
_READ_JOBS_LUA = """
local out = {}
local jp, rp = ARGV[2], ARGV[3]
local iq_pre, iq_suf, ex_pre, ex_suf, wp = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local now = ARGV[9]
local exc_max, exc_small, budget = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local function exc(s)
  if not s then return s end
  local cap = exc_max
  if budget < exc_max then cap = exc_small end
  if #s > cap then s = string.sub(s, 1, cap) end
  budget = budget - #s
  return s
end
local i = 0
for id in string.gmatch(ARGV[1], '[^\\n]+') do
  i = i + 1
  local v = redis.pcall('HMGET', jp .. id, 'status', 'worker_name', 'origin', 'started_at',
                        'ended_at', 'exc_info')
  local long = false
  if not v.err then
    for j = 1, 5 do
      if v[j] and #v[j] > 1024 then long = true end
    end
  end
  if v.err then
    out[i] = {'!ERR', v.err}
  elseif long then
    out[i] = {'!ERR', 'a field is longer than any RQ writes'}
  elseif not (v[1] or v[2] or v[3] or v[4] or v[5] or v[6]) then
    out[i] = 0
  else
    v[6] = exc(v[6])
    if v[1] == 'failed' then
      local s = redis.pcall('XREVRANGE', rp .. id, '+', '-', 'COUNT', 1)
      if not s.err and s[1] then
        local f = s[1][2]
        for j = 1, #f, 2 do
          if f[j] == 'exc_string' then v[7] = exc(f[j + 1]) end
        end
      end
    elseif v[1] == 'canceled' then
      local held = 0
      if v[3] then
        local p = redis.pcall('LPOS', iq_pre .. v[3] .. iq_suf, id)
        if type(p) == 'number' then held = 1 end
      end
      if held == 0 then
        local n = redis.pcall('ZCOUNT', ex_pre .. id .. ex_suf, now, '+inf')
        if type(n) == 'number' and n > 0 then held = 1 end
      end
      if held == 0 and v[2] then
        local cj = redis.pcall('HGET', wp .. v[2], 'current_job')
        if cj == id then held = 1 end
      end
      if held == 0 and v[2] then
        local xs = wp .. v[2] .. ARGV[13]
        local n = redis.pcall('SCARD', xs)
        if type(n) == 'number' and n > 0 and n <= tonumber(ARGV[14]) then
          for _, m in ipairs(redis.pcall('SMEMBERS', xs)) do
            if string.sub(m, 1, #id + 1) == id .. ':' then held = 1 end
          end
        end
      end
      v[7] = false
      v[8] = held
    end
    out[i] = v
  end
end
return out
"""
_ID_SEP = "\n"


def _pack_ids(chunk: Sequence[str]) -> tuple[list[str], str]:
    """The ids of `chunk` a script can be asked about, and them as its one argument.

    One argument for the whole chunk: redis-py packs each argument in Python, and 2,000
    key arguments cost more than the script itself. An id holding the separator cannot
    be an RQ id (letters, digits, '_' and '-' only): callers read those as missing."""
    readable = [jid for jid in chunk if jid and _ID_SEP not in jid]
    return readable, _ID_SEP.join(readable)


READ_CHUNK = 1000
# Executions read per worker: an RQ worker runs one at a time; a set larger than this is
# not one RQ keeps, and says only "several" (no horse is proven under it).
MAX_EXECUTIONS = 16
# Compressed exception text returned per job (bytes, multiples of 4: see _READ_JOBS_LUA),
# and per chunk before the smaller cap applies. Ordinary tracebacks compress to 1-3 KB.
EXC_READ_MAX = 256 * 1024
EXC_READ_SMALL = 4 * 1024
EXC_READ_BUDGET = 8 * 1024 * 1024
_EXISTS_LUA = """
local out = {}
local i = 0
for id in string.gmatch(ARGV[1], '[^\\n]+') do
  i = i + 1
  out[i] = redis.call('EXISTS', ARGV[2] .. id)
end
return out
"""


def _job_from_script(job_id: str, vals: Any) -> RqJob:
    if vals == 0:
        return RqJob(job_id, RqStatus.MISSING)
    if not isinstance(vals, list) or len(vals) < 2:
        return RqJob(job_id, RqStatus.UNREADABLE, "unreadable")
    if vals[0] == b"!ERR":
        return RqJob(job_id, RqStatus.UNREADABLE, f"unreadable: {_text(vals[1])}"[:120])
    if len(vals) > 7:
        return job_from_hash(job_id, vals, vals[6])._replace(in_flight=vals[7] == 1)
    if len(vals) > 6:
        return job_from_hash(job_id, vals, vals[6])
    return job_from_hash(job_id, vals if len(vals) == 6 else vals + [None] * (6 - len(vals)))


def _reply_error(value: Any) -> str:
    """The error of one pipelined command (raise_on_error=False), or '' if it succeeded."""
    return str(value) if isinstance(value, redis.exceptions.ResponseError) else ""


def worker_gone_reason(rec: WorkerRecord | None, name: str, now: datetime,
                       keys: Keys = DEFAULT_KEYS) -> str:
    """Why RQ's own records say the worker is gone, or '' if they say it is alive.

    The local pid check (the only fast signal after a SIGKILL: the orphaned horse keeps
    the pub/sub socket, and the hash outlives the worker by its TTL) is the caller's.
    """
    if rec is None or not rec.exists:
        return f"worker hash {keys.worker}{name} is missing"
    if rec.unreadable:
        return ""  # garbage under the worker's key: skip, never read it as a death
    if rec.death:
        return "worker registered its death"
    if rec.last_heartbeat is not None:
        age = (now - rec.last_heartbeat).total_seconds()
        if age > HEARTBEAT_STALE_SECONDS:
            return f"last heartbeat {int(age)} s ago"
    if rec.subscribers == 0:
        return f"nobody subscribed to {keys.channel(name)}"
    return ""


def stop_command(worker: WorkerRecord | None, job_id: str) -> tuple[str, dict[str, str]]:
    """The command (and its arguments) that makes the worker stop `job_id`'s horse.

    An RQ 3 worker whose record names the execution of `job_id` gets `stop-execution`: it
    stops that execution only, so a stop meant for a run that has ended cannot hit a later
    run of the same job id (RQ 3 rq/command.py handle_stop_execution_command; RQ 2 workers
    ignore the command). Everyone else gets `stop-job`, which both versions obey for the
    job they run (handle_stop_job_command)."""
    if (worker is not None and worker.layout is Layout.RQ3 and worker.current_job == job_id
            and worker.execution_id):
        return "stop-execution", {"job_id": job_id, "execution_id": worker.execution_id}
    return "stop-job", {"job_id": job_id}
