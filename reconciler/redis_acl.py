"""The Redis commands the daemon sends, as probes `check` queues to learn whether the ACL
user may run them: each command's form as an ACL rule names it, the MULTI that holds the
probes (never executed), and how a refusal reads.

It must never run a probe for real: every command is queued inside a MULTI that is then
discarded, and the probe's key and channel names are never created. Judging the replies
(OK/WARN/FAIL) is checks.py's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.exceptions
from rq.registry import CanceledJobRegistry, DeferredJobRegistry, ScheduledJobRegistry

from reconciler.config import Config
from reconciler.redisconn import async_client
from reconciler.rq_layout import DEPENDENTS_SUFFIX, STARTED_REGISTRY, WORKER_EXECUTIONS_SUFFIX
from reconciler.rq_state import RqState

# Shaped like the daemon's own key and channel names, so that key patterns (~rq:*) and
# channel patterns (&rq:pubsub:*) are judged as they will be; never created.
_PROBE = "rq-reconciler-acl-probe"
# 40 hex digits that are no script: EVALSHA of it would only say NOSCRIPT.
_NO_SCRIPT = "0" * 40


@dataclass(frozen=True)
class AclProbe:
    """One command the daemon sends, in the form an ACL rule names it (`SCRIPT|LOAD`)."""

    name: str
    argv: tuple[str, ...]
    why: str
    optional: bool = False  # the daemon copes without it (said as WARN, not FAIL)


def acl_probes(cfg: Config, rq: RqState) -> list[AclProbe]:
    """Every command rq_state.py and rq_api.py send (directly, inside Lua scripts, and
    through RQ's Job.fetch / Job.cancel), with keys and channels shaped like the real ones.
    tests/unit/test_check_acl.py fails when either starts sending one not listed."""
    k = rq.keys
    job = k.job + _PROBE
    queue = k.queue + _PROBE
    read = "reads job and worker state"
    cancel = "cancels a waiting job with RQ's Job.cancel()"
    requeue = "puts a stranded job back on its queue"
    orphan = "queues a job whose worker died again ([orphans] requeue)"
    no_orphans = cfg.orphans.requeue == "never"
    probes = [
        AclProbe("PING", ("PING",), "checks the connection"),
        AclProbe("INFO", ("INFO", "server"), "tells a restarted, loading or replica Redis"),
        AclProbe("EVALSHA", ("EVALSHA", _NO_SCRIPT, "0"), read + " in one atomic script"),
        AclProbe("SCRIPT|LOAD", ("SCRIPT", "LOAD", "return 1"),
                 "loads that script after a Redis restart"),
        # Inside the scripts: a command the user may not run there makes the job read as
        # unreadable, silently and for ever; so each is asked about here.
        AclProbe("HMGET", ("HMGET", job, "status"), read),
        AclProbe("EXISTS", ("EXISTS", job), "tells a missing job"),
        AclProbe("XREVRANGE", ("XREVRANGE", k.results + _PROBE, "+", "-", "COUNT", "1"),
                 "reads a failed job's exception"),
        AclProbe("LPOS", ("LPOS", k.intermediate(_PROBE), _PROBE),
                 "tells a canceled job a worker already took"),
        AclProbe("ZCOUNT", ("ZCOUNT", k.job_executions + _PROBE, "0", "+inf"),
                 "tells a canceled job a worker already took"),
        AclProbe("HGET", ("HGET", k.worker + _PROBE, "current_job"),
                 "tells a canceled job a worker already took"),
        AclProbe("SCARD", ("SCARD", k.worker + _PROBE + WORKER_EXECUTIONS_SUFFIX),
                 "reads the job an RQ 3 worker runs (its executions set)"),
        AclProbe("ZRANGEBYSCORE", ("ZRANGEBYSCORE", k.job_executions + _PROBE, "0", "+inf"),
                 "reads the execution an RQ 2 worker runs"),
        AclProbe("PTTL", ("PTTL", k.worker + _PROBE),
                 "tells a worker hash that never expires (its existence says nothing then)"),
        AclProbe("PUBSUB|NUMSUB", ("PUBSUB", "NUMSUB", k.channel(_PROBE)),
                 "tells a dead worker (nobody on its command channel)"),
        AclProbe("SMEMBERS", ("SMEMBERS", k.workers), "lists workers"),
        AclProbe("PUBLISH", ("PUBLISH", k.channel(_PROBE), ""),
                 "sends RQ's stop-execution / stop-job command to a worker"),
        AclProbe("HGETALL", ("HGETALL", job), cancel),
        # The job's hash is WATCHed while it is read and cancelled (rq_api.py), and let go
        # of with UNWATCH when it is not cancelled after all.
        AclProbe("WATCH", ("WATCH", job), cancel),
        AclProbe("UNWATCH", ("UNWATCH",), cancel),
        AclProbe("MULTI", ("MULTI",), cancel),
        AclProbe("HSET", ("HSET", job, "status", "canceled"), cancel),
        AclProbe("LREM", ("LREM", queue, "1", _PROBE), cancel),
        AclProbe("ZREM", ("ZREM", k.rebase(DeferredJobRegistry.key_template.format(_PROBE)), _PROBE),
                 cancel),
        AclProbe("ZREM", ("ZREM", k.rebase(ScheduledJobRegistry.key_template.format(_PROBE)), _PROBE),
                 cancel),
        AclProbe("ZADD", ("ZADD", k.rebase(CanceledJobRegistry.key_template.format(_PROBE)), "1",
                                  _PROBE), cancel),
        AclProbe("EXEC", ("EXEC",), cancel),
        # Job.cancel() of a job a worker started meanwhile reads its executions (RQ cleans
        # that registry as it reads it); a refusal there would fail every retry of it.
        AclProbe("ZRANGE", ("ZRANGE", k.job_executions + _PROBE, "0", "-1"), cancel),
        AclProbe("ZREMRANGEBYSCORE", ("ZREMRANGEBYSCORE", k.job_executions + _PROBE, "0", "0"),
                 cancel),
        # Dependents and strandings (rq_state's graph and strands scripts, rq_api's requeue).
        AclProbe("SRANDMEMBER", ("SRANDMEMBER", job + DEPENDENTS_SUFFIX, "10"),
                 "reads the dependents of a job that ended"),
        AclProbe("LRANGE", ("LRANGE", k.intermediate(_PROBE), "0", "10"),
                 "looks for jobs stranded in a queue's intermediate list"),
        AclProbe("ZSCAN", ("ZSCAN", k.prefix + STARTED_REGISTRY + _PROBE, "0"), requeue),
        AclProbe("LREM", ("LREM", k.intermediate(_PROBE), "1", _PROBE), requeue),
        AclProbe("LPUSH", ("LPUSH", queue, _PROBE), requeue),
        AclProbe("RPUSH", ("RPUSH", queue, _PROBE),
                 "queues an orphan again, and enqueues the dependents of a cancelled job",
                 optional=cfg.cancel.dependents != "enqueue" and cfg.orphans.requeue == "never"),
        # An orphan queued again (rq_api's requeue of a job whose worker died): its run
        # leaves the started registry and its executions go; it is queued or scheduled.
        AclProbe("ZREM", ("ZREM", k.prefix + STARTED_REGISTRY + _PROBE, _PROBE), orphan,
                 optional=no_orphans),
        AclProbe("DEL", ("DEL", k.execution + _PROBE + ":" + _PROBE), orphan,
                 optional=no_orphans),
        AclProbe("SREM", ("SREM", k.worker + _PROBE + WORKER_EXECUTIONS_SUFFIX, _PROBE), orphan,
                 optional=no_orphans),
        AclProbe("SADD", ("SADD", k.prefix + ":queues", queue), orphan, optional=no_orphans),
        AclProbe("ZADD", ("ZADD", k.rebase(ScheduledJobRegistry.key_template.format(_PROBE)),
                          "1", _PROBE), orphan, optional=no_orphans),
        AclProbe("CONFIG|GET", ("CONFIG", "GET", "notify-keyspace-events"),
                 "reads notify-keyspace-events (without it: sweeps only)",
                 optional=cfg.redis.keyspace_events != "require"),
        # A parameter that does not exist: even run, it would change nothing.
        AclProbe("CONFIG|SET", ("CONFIG", "SET", _PROBE, "x"),
                 "adds missing keyspace flags (redis.keyspace_events = \"auto\")", optional=True),
    ]
    if cfg.redis.keyspace_events != "off":
        probes.append(AclProbe("PSUBSCRIBE", ("PSUBSCRIBE", *rq.keyspace_patterns()),
                               "hears keyspace events (millisecond sync)"))
    return probes


def denial(exc: redis.exceptions.ResponseError, probe: AclProbe) -> tuple[str, str]:
    """(what is missing, the ACL rule that grants it) from a refusal."""
    text = str(exc)
    # Redis says "... to access one of the keys (channels) used as arguments", Valkey "No
    # permissions to access a key (channel)"; a command refusal says "to run the 'x' command".
    access = "to access" in text
    if access and "key" in text and isinstance(exc, redis.exceptions.NoPermissionError):
        return f"key {probe.argv[1]} ({probe.name})", "~" + probe.argv[1].split(":")[0] + ":*"
    if access and "channel" in text and isinstance(exc, redis.exceptions.NoPermissionError):
        chans = probe.argv[1:] if probe.name == "PSUBSCRIBE" else (probe.argv[1],)
        rules = " ".join("&" + (c if probe.name == "PSUBSCRIBE" else c.rsplit(":", 1)[0] + ":*")
                         for c in chans)
        return f"channel {' '.join(chans)} ({probe.name})", rules
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return probe.name, "+" + probe.name.lower()
    # "unknown command": renamed or disabled (managed Redis), or a server too old for it.
    return f"{probe.name} (not available: {text})", "+" + probe.name.lower()


async def probe_replies(cfg: Config, argvs: list[tuple[str, ...]]) -> list[Any]:
    """Send MULTI, a command with a wrong number of arguments, every probe, then EXEC;
    return the replies to the probes and to EXEC (an exception where the server said no).

    Nothing runs: the server checks ACLs when it queues a command, and the bad command
    at the head marks the transaction failed, so EXEC (itself checked) only answers
    EXECABORT. This needs nothing beyond what the daemon needs anyway (MULTI, for RQ's
    Job.cancel()), unlike ACL DRYRUN or ACL GETUSER, which are admin commands a
    least-privilege user does not have (and DRYRUN needs Redis 7). It also judges keys,
    channels and read/write selectors exactly as the server will."""
    client = async_client(cfg.redis.url, socket_timeout=cfg.redis.socket_timeout_seconds,
                          socket_connect_timeout=cfg.redis.socket_timeout_seconds)
    conn = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.connect()
        # MULTI on its own first: were it refused, what follows would run for real.
        await conn.send_command("MULTI")
        await conn.read_response()  # raises ResponseError if refused
        cmds = [("GET",), *argvs]
        await conn.send_packed_command(conn.pack_commands(cmds))
        replies: list[Any] = []
        for _ in cmds:
            try:
                replies.append(await conn.read_response())
            except redis.exceptions.ResponseError as exc:
                replies.append(exc)
        if not isinstance(replies[0], redis.exceptions.ResponseError):
            # The server queued a GET without a key: it does not fail a transaction on a
            # bad command, so EXEC could run the probes. Never send it.
            await conn.send_command("DISCARD")
            await conn.read_response()
            raise redis.exceptions.RedisError("this server queued a malformed command")
        await conn.send_command("EXEC")
        try:
            replies.append(await conn.read_response())
        except redis.exceptions.ExecAbortError as exc:
            # "EXECABORT ... previous errors": allowed, and nothing ran. Redis 7 also
            # answers a refused EXEC with EXECABORT, naming the NOPERM.
            refused = "NOPERM" in str(exc)
            replies.append(redis.exceptions.NoPermissionError(str(exc)) if refused else exc)
        except redis.exceptions.ResponseError as exc:
            replies.append(exc)
            # A refused EXEC may leave the transaction open (older servers).
            await conn.send_command("DISCARD")
            with contextlib.suppress(redis.exceptions.ResponseError):
                await conn.read_response()
        return replies[1:]
    finally:
        await conn.disconnect()
        await client.aclose()


async def whoami(cfg: Config, rq: RqState) -> str:
    try:
        who = await rq.client.execute_command("ACL", "WHOAMI")  # type: ignore[no-untyped-call]
    except (redis.exceptions.RedisError, OSError):
        # Not allowed (the daemon does not need it): the user the URL logs in as.
        try:
            return unquote(urlsplit(cfg.redis.url).username or "") or "default"
        except ValueError:
            return "default"
    return who.decode() if isinstance(who, bytes) else str(who)
