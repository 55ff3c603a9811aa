"""Redis: the reads and writes of RQ's state. What RQ's layout means lives in
rq_layout.py (pure: keys, hashes, executions, replies); the I/O lives here, and nowhere
else touches RQ's keys.

Reads are raw and pipelined, or one Lua script per chunk (never RQ registry reads with
cleanup=True, which change state). Writes to RQ state go through RQ's own API (rq_api.py:
a sync client, in a thread; rq is imported on the first write, never by reading). Every
redis-py error is translated into RedisUnavailable: a caller must never read "Redis
could not be asked" as "job not found". Odd data costs only itself: a key whose name is
not UTF-8 or holds control characters is skipped (logged once, counted as poison), a key
of the wrong type makes only its job unreadable, and no text is read whole (fields are
clipped in the read script, exception texts inflated with a budget).

RQ 2.x and 3.x side by side: each worker's layout is read from Redis, never taken from the
rq this package imports, so a fleet mid-upgrade is read worker by worker (rq_layout.py).
Job data is never deserialized: reads are raw fields, and RQ's API gets a serializer that
refuses to load or dump anything.

Its ~900 lines are mostly its four read scripts (jobs, workers, dependency graphs,
intermediate lists), each kept beside the call that passes its ARGV.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections.abc import AsyncGenerator, Iterable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff

from reconciler.errors import RedisUnavailable
from reconciler.model import BoundedMemory, PoisonCallback, RqJob, RqStatus
from reconciler.redisconn import async_client, sync_client
from reconciler.rq_layout import (
    DEPENDENTS_SUFFIX,
    INTERMEDIATE_SUFFIX,
    MAX_EXECUTIONS,
    MAX_GRAPH,
    QUEUES_SET,
    WORKER_EXECUTIONS_SUFFIX,
    DepNode,
    Keys,
    OrphanJob,
    Stranded,
    WorkerRecord,
    decode_key,
    graph_from_reply,
    job_from_script,
    missing_keyspace_flags,
    name_problem,
    not_believed,
    orphan_job_from_reply,
    printable_key,
    served_queues,
    stop_command,
    strands_from_reply,
    text_of,
    worker_from_reply,
)

log = structlog.get_logger("reconciler.rq_state")

# After this much silence on the keyspace subscription, PING it.
PUBSUB_LIVENESS_SECONDS = 30.0
# How long after a Redis (re)start PUBSUB NUMSUB is not evidence of a worker's death.
PUBSUB_SETTLE_SECONDS = 30
_REDIS_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


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
        self._graph_script: Any = None
        self._strands_script: Any = None

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
        why = not_believed(info, repl)
        if not why:
            self._believed_at = now
        return why

    async def workers_registered(self) -> bool:
        """Whether any RQ worker is registered here (RQ's set of worker keys, under our
        prefix, is not empty): evidence that this db and prefix are the workers'. Without
        it, a job "not found" may only be a job looked for in the wrong place."""
        try:
            return bool(await self.client.scard(self.keys.workers))
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc

    def where(self) -> str:
        """This Redis db and key prefix, as a message names them."""
        return f"db {self.db}, key prefix {self.keys.prefix!r}"

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
                    packed, k.job, k.results, k.queue, INTERMEDIATE_SUFFIX, k.job_executions, "",
                    k.worker, repr(time.time()), EXC_READ_MAX, EXC_READ_SMALL,
                    EXC_READ_BUDGET, WORKER_EXECUTIONS_SUFFIX, MAX_EXECUTIONS]) if readable else []
                for jid, vals in zip(readable, raw, strict=True):
                    job = jobs[jid] = job_from_script(jid, vals)
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

    # -- dependencies, strandings, served queues ----------------------------------------

    async def read_graph(self, ids: Iterable[str], *, down: bool = False
                         ) -> tuple[dict[str, DepNode], bool]:
        """The dependency graph around `ids`, read in one atomic script: with `down`, first
        the deferred dependents (and theirs, ...) of those of `ids` that ended canceled,
        stopped or failed, plus those of `ids` that are deferred themselves; then, from each
        deferred job, up through what it depends on. Returns every node read (status,
        dependency ids, allow_failure; never its data) and whether MAX_GRAPH cut it short."""
        wanted = [i for i in dict.fromkeys(ids) if i]
        readable, packed = _pack_ids(wanted)
        if not readable:
            return {}, False
        if self._graph_script is None:
            self._graph_script = self.client.register_script(_GRAPH_LUA)
        try:
            reply = await self._graph_script(args=[packed, self.keys.job, DEPENDENTS_SUFFIX,
                                                   MAX_GRAPH, "1" if down else "0"])
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        return graph_from_reply(reply)

    async def read_strands(self) -> list[Stranded]:
        """Jobs in any queue's intermediate list (RQ's set of queues) that are still
        `queued` with no live execution: dequeued by a worker that has not (yet) recorded
        that it runs them. One atomic, read-only script."""
        if self._strands_script is None:
            self._strands_script = self.client.register_script(_STRANDS_LUA)
        k = self.keys
        try:
            reply = await self._strands_script(args=[
                k.prefix + QUEUES_SET, k.queue, INTERMEDIATE_SUFFIX, k.job, k.job_executions,
                repr(time.time()), STRANDS_PER_QUEUE, STRAND_QUEUES])
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        return strands_from_reply(reply)

    async def served_queues(self) -> set[str]:
        """The queues some live worker listens to (its hash's `queues`), by RQ's records:
        a worker whose hash is gone, dead or silent past its TTL serves nothing."""
        names = await self.worker_names()
        if not names:
            return set()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for n in names:
                    pipe.hmget(self.keys.worker + n, "birth", "last_heartbeat", "death", "queues")
                replies = await pipe.execute(raise_on_error=False)
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        flat: list[Any] = []
        for n, r in zip(names, replies, strict=True):
            flat += [n.encode(), r if isinstance(r, list) else [b"!ERR"]]
        return served_queues(flat, self.keys)

    async def worker_queues(self, names: Sequence[str]) -> dict[str, list[str]]:
        """The queues each worker's hash says it listens to (none if its hash is gone)."""
        if not names:
            return {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for n in names:
                    pipe.hget(self.keys.worker + n, "queues")
                replies = await pipe.execute(raise_on_error=False)
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        return {n: [q for q in text_of(r).split(",") if q] if isinstance(r, bytes) else []
                for n, r in zip(names, replies, strict=True)}

    def _write_refused(self, job_id: str) -> str:
        """Why RQ may not be written to under this key prefix ('' if it may); logged."""
        from reconciler import rq_api

        if self._write_problem is None:
            self._write_problem = rq_api.prefix_problem(self.keys.prefix)
        if self._write_problem:
            log.error("rq_write_refused", job_id=job_id, error=self._write_problem)
        return self._write_problem

    async def requeue_stranded(self, queue: str, job_id: str) -> str:
        """Put a stranded job back at the front of its queue, in one atomic step that RQ's
        maintenance cannot interleave with (rq_api.requeue_stranded_sync). Returns
        requeued / not_requeued (<why>)."""
        from reconciler import rq_api

        if problem := self._write_refused(job_id):
            return f"not_requeued ({problem})"
        try:
            return await asyncio.to_thread(rq_api.requeue_stranded_sync, self._sync_client(),
                                           queue, job_id)
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc

    async def read_orphan_job(self, rq_id: str) -> OrphanJob | None:
        """The raw fields queueing an orphan again needs (rq_layout.OrphanJob); None if the
        hash is gone. Never unpickles anything."""
        try:
            vals = await self.client.hmget(self.keys.job + rq_id, "status", "worker_name",
                                           "started_at", "origin", "retries_left",
                                           "retry_intervals", "enqueue_at_front_on_retry")
        except redis.exceptions.ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                return None
            raise RedisUnavailable(str(exc)) from exc
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
        return orphan_job_from_reply(rq_id, list(vals))

    async def requeue_orphan(self, job: OrphanJob, *, delay: float, at_front: bool,
                             spend_retry: bool) -> str:
        """Queue the orphan `job` again in one atomic step, guarded by the run it was read
        in (rq_api.requeue_orphan_sync). Returns requeued / scheduled / not_requeued
        (<why>)."""
        from reconciler import rq_api

        if problem := self._write_refused(job.rq_id):
            return f"not_requeued ({problem})"
        try:
            return await asyncio.to_thread(
                rq_api.requeue_orphan_sync, self._sync_client(), queue_name=job.origin,
                job_id=job.rq_id, worker_name=job.worker_name, started_at_raw=job.started_at_raw,
                delay=delay, at_front=at_front, spend_retry=spend_retry)
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc

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
                event = text_of(msg.get("data")) if isinstance(msg.get("data"), bytes) else ""
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
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
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
        if problem := self._write_refused(job_id):
            return f"not_canceled ({problem})"
        try:
            return await asyncio.to_thread(rq_api.cancel_sync, self._sync_client(), job_id, allowed)
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc

    async def enqueue_dependents(self, job_id: str) -> int:
        """Let the dependents of the cancelled job `job_id` run (cancel.dependents =
        "enqueue"): RQ's enqueue_dependents, as Job.cancel(enqueue_dependents=True) calls
        it. Returns how many dependents it had."""
        from reconciler import rq_api

        if self._write_refused(job_id):
            return 0
        try:
            return await asyncio.to_thread(rq_api.enqueue_dependents_sync, self._sync_client(),
                                           job_id)
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
                        'death', 'current_job', 'version', 'shutdown_requested_date')
  local long = false
  if not h.err then
    for j = 1, 8 do
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
    local ttl = redis.pcall('PTTL', wp .. name)
    if type(ttl) ~= 'number' then ttl = -3 end
    out[i] = {h[1], h[2], h[3], h[4], h[5], h[6], h[7], size, live3, live2, ttl, h[8] or ''}
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

# The dependency graph around a set of jobs (RqState.read_graph). Read-only (HGET, HMGET,
# SCARD, SMEMBERS). ARGV[1] = ids joined by "\n", ARGV[2] = the job hash prefix, ARGV[3] =
# the dependents set's suffix, ARGV[4] = the most nodes to visit, ARGV[5] = "1" to walk
# down first. Reply: {cut short (0/1), id, vals, id, vals, ...}, vals = the node's {status,
# dependency_ids, dependency_id, allow_dependency_failures}, 0 if its hash does not exist,
# or {"!ERR", msg}. Dependency ids come from the JSON RQ writes (cjson, in a pcall: a field
# no RQ writes is returned as it is, for the parser to refuse, and walked no further).
_GRAPH_LUA = """
local jp, dsuf, cap = ARGV[2], ARGV[3], tonumber(ARGV[4])
local out = {0}
local seen, todo = {}, {}
local function push(id)
  if type(id) == 'string' and #id > 0 and #id <= 256 and not seen[id] then
    seen[id] = true
    todo[#todo + 1] = id
  end
end
local below = 0
for id in string.gmatch(ARGV[1], '[^\\n]+') do
  local st = redis.pcall('HGET', jp .. id, 'status')
  if ARGV[5] ~= '1' or st == 'deferred' then
    push(id)
  elseif st == 'canceled' or st == 'stopped' or st == 'failed' then
    local stack, went = {id}, {}
    while #stack > 0 do
      local x = table.remove(stack)
      local n = redis.pcall('SCARD', jp .. x .. dsuf)
      if type(n) == 'number' and n > 0 then
        if n > cap then out[1] = 1 end
        for _, m in ipairs(redis.pcall('SRANDMEMBER', jp .. x .. dsuf, cap)) do
          if not went[m] and below < cap then
            went[m] = true
            below = below + 1
            if redis.pcall('HGET', jp .. m, 'status') == 'deferred' then
              push(m)
              stack[#stack + 1] = m
            end
          end
        end
      end
    end
  end
end
local head = 1
while head <= #todo do
  if head > cap then
    out[1] = 1
    break
  end
  local id = todo[head]
  head = head + 1
  local v = redis.pcall('HMGET', jp .. id, 'status', 'dependency_ids', 'dependency_id',
                        'allow_dependency_failures')
  out[#out + 1] = id
  if v.err then
    out[#out + 1] = {'!ERR', v.err}
  elseif not (v[1] or v[2] or v[3] or v[4]) then
    out[#out + 1] = 0
  else
    local long = false
    for j = 1, 4 do
      if v[j] and #v[j] > 65536 then long = true end
    end
    if long then
      out[#out + 1] = {'!ERR', 'a field is longer than any RQ writes'}
    else
      out[#out + 1] = v
      if v[1] == 'deferred' then
        local ok, deps = false, nil
        if v[2] then ok, deps = pcall(cjson.decode, v[2]) end
        if ok and type(deps) == 'table' then
          for _, d in ipairs(deps) do push(d) end
        elseif v[3] then
          push(v[3])
        end
      end
    end
  end
end
return out
"""

# Jobs stranded in intermediate lists (RqState.read_strands). Read-only (SMEMBERS, LRANGE,
# HGET, ZCOUNT). ARGV[1] = RQ's set of queue keys, ARGV[2] = the queue key prefix, ARGV[3]
# = the intermediate list's suffix, ARGV[4] = the job hash prefix, ARGV[5] = the job
# execution registry prefix, ARGV[6] = now, ARGV[7] = ids read per list, ARGV[8] = queues
# read. Reply: {queue, id, ...} for each job there that is `queued` with no live execution.
_STRANDS_LUA = """
local qp, isuf, jp, xp, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local per, maxq = tonumber(ARGV[7]), tonumber(ARGV[8])
local out = {}
local qs = redis.pcall('SMEMBERS', ARGV[1])
if type(qs) ~= 'table' or qs.err then return out end
for i, qkey in ipairs(qs) do
  if i > maxq then break end
  if string.sub(qkey, 1, #qp) == qp and #qkey <= 512 then
    local ids = redis.pcall('LRANGE', qkey .. isuf, 0, per - 1)
    if type(ids) == 'table' and not ids.err then
      for _, id in ipairs(ids) do
        if #id <= 256 and redis.pcall('HGET', jp .. id, 'status') == 'queued' then
          local n = redis.pcall('ZCOUNT', xp .. id, now, '+inf')
          if n == 0 then
            out[#out + 1] = string.sub(qkey, #qp + 1)
            out[#out + 1] = id
          end
        end
      end
    end
  end
end
return out
"""
# Ids read from each intermediate list (it holds the jobs being started: about one per
# worker), and queues looked at, per strands read.
STRANDS_PER_QUEUE = 1000
STRAND_QUEUES = 10_000


def _pack_ids(chunk: Sequence[str]) -> tuple[list[str], str]:
    """The ids of `chunk` a script can be asked about, and them as its one argument.

    One argument for the whole chunk: redis-py packs each argument in Python, and 2,000
    key arguments cost more than the script itself. An id holding the separator cannot
    be an RQ id (letters, digits, '_' and '-' only): callers read those as missing."""
    readable = [jid for jid in chunk if jid and _ID_SEP not in jid]
    return readable, _ID_SEP.join(readable)


READ_CHUNK = 1000
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



def _reply_error(value: Any) -> str:
    """The error of one pipelined command (raise_on_error=False), or '' if it succeeded."""
    return str(value) if isinstance(value, redis.exceptions.ResponseError) else ""
