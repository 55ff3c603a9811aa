"""`check`'s list of Redis commands keeps up with what rq_state.py and rq_api.py send."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis.exceptions

import reconciler.rq_api
import reconciler.rq_layout
import reconciler.rq_state
from reconciler.config import from_mapping
from reconciler.redis_acl import AclProbe, acl_probes, denial
from reconciler.rq_state import RqState

SOURCE = "\n".join(Path(m.__file__).read_text()
                   for m in (reconciler.rq_layout, reconciler.rq_state, reconciler.rq_api))

# redis-py / RQ calls in rq_state.py -> the commands they send, as ACL rules name them.
SENDS = {
    "ping": {"PING"},
    "info": {"INFO"},
    "smembers": {"SMEMBERS"},
    # whether any worker is registered (on the worker set SMEMBERS lists)
    "scard": {"SCARD"},
    "hmget": {"HMGET"},
    "hget": {"HGET"},
    "publish": {"PUBLISH"},
    "config_get": {"CONFIG|GET"},
    "config_set": {"CONFIG|SET"},
    "psubscribe": {"PSUBSCRIBE"},
    # redis-py's Script: EVALSHA, and SCRIPT LOAD when the server does not know it.
    "register_script": {"EVALSHA", "SCRIPT|LOAD"},
    # The same by hand, for a script run inside a pipeline.
    "evalsha": {"EVALSHA"},
    "script_load": {"SCRIPT|LOAD"},
    # The job's hash WATCHed around RQ's cancel; redis-py sends UNWATCH when the pipeline
    # is let go of while still watching.
    "watch": {"WATCH", "UNWATCH"},
    "unwatch": {"UNWATCH"},
    # RQ's Job.fetch() and Job.cancel() (queued / deferred / scheduled jobs only).
    "Job.fetch": {"HGETALL"},
    "job.cancel": {"HGET", "MULTI", "HSET", "LREM", "ZREM", "ZADD", "EXEC",
                   # a job that started meanwhile: RQ reads (and cleans) its executions
                   "ZRANGE", "ZREMRANGEBYSCORE"},
}
SENDS["Job.cancel"] = SENDS["job.cancel"]  # as comments name it
# RQ's Queue.enqueue_dependents (cancel.dependents = "enqueue"): the dependents set WATCHed
# and read, the dependents fetched and their dependencies' statuses read, then in MULTI each
# one leaves the deferred registry, is saved queued and pushed on its queue.
SENDS["q.enqueue_dependents"] = {"WATCH", "SMEMBERS", "HGETALL", "HGET", "MULTI", "ZREM",
                                 "HSET", "RPUSH", "LPUSH", "EXEC", "UNWATCH"}
SENDS["_RawJob.fetch"] = SENDS["Job.fetch"]  # RQ's Job, restored without its data
# Calls on the same objects that send no command of their own.
NOT_COMMANDS = {"pipeline", "execute", "execute_command", "aclose", "close", "pubsub", "multi",
                "key_for",
                "get_message", "get_status", "connection_pool", "from_url"}


def sent_by_rq_state() -> set[str]:
    found: set[str] = set()
    for cmd in re.findall(r"redis\.p?call\('([A-Z]+)'", SOURCE):
        found.add(cmd)
    for a, b in re.findall(r'execute_command\("([A-Z]+)",\s*"([A-Z]+)"', SOURCE):
        found.add(f"{a}|{b}")
    for obj, method in re.findall(r"\b(client|pipe|pubsub|Job|job|_RawJob|q)\.([a-z_]+)\(", SOURCE):
        key = f"{obj}.{method}" if obj in ("Job", "job", "_RawJob", "q") else method
        if key in SENDS:
            found |= SENDS[key]
        elif method not in NOT_COMMANDS:
            raise AssertionError(
                f"rq_state.py calls {obj}.{method}(): add the commands it sends to "
                "reconciler.redis_acl.acl_probes and to SENDS here")
    return found


def probe_names(mode: str = "auto") -> set[str]:
    cfg = from_mapping({"redis": {"keyspace_events": mode}}, environ={})
    return {p.name for p in acl_probes(cfg, RqState(cfg.redis.url))}


def test_every_command_rq_state_sends_is_probed() -> None:
    sent = sent_by_rq_state()
    # The scan itself must see the obvious ones, or it proves nothing.
    assert {"EVALSHA", "HMGET", "XREVRANGE", "PUBSUB|NUMSUB", "PUBLISH", "PSUBSCRIBE",
            "HGETALL", "ZADD"} <= sent
    assert sent - probe_names() == set()


def test_keyspace_off_needs_no_psubscribe() -> None:
    assert "PSUBSCRIBE" in probe_names("auto")
    assert "PSUBSCRIBE" not in probe_names("off")


def test_probes_use_the_daemons_key_and_channel_shapes() -> None:
    cfg = from_mapping({"redis": {"url": "redis://127.0.0.1:6379/3"}}, environ={})
    probes = {p.name: p for p in acl_probes(cfg, RqState(cfg.redis.url))}
    assert probes["HMGET"].argv[1].startswith("rq:job:")
    assert probes["PUBLISH"].argv[1].startswith("rq:pubsub:")
    assert probes["SMEMBERS"].argv[1] == "rq:workers"
    assert probes["PSUBSCRIBE"].argv[1:] == ("__keyspace@3__:rq:job:*", "__keyspace@3__:rq:worker:*")
    # a CONFIG SET that would change nothing even if it ran
    assert probes["CONFIG|SET"].argv[2] != "notify-keyspace-events"


@pytest.mark.parametrize(("exc", "probe", "what", "rule"), [
    (redis.exceptions.NoPermissionError(
        "this user has no permissions to run the 'evalsha' command"),
     AclProbe("EVALSHA", ("EVALSHA", "0" * 40, "0"), ""), "EVALSHA", "+evalsha"),
    (redis.exceptions.NoPermissionError(
        "this user has no permissions to run the 'script|load' command"),
     AclProbe("SCRIPT|LOAD", ("SCRIPT", "LOAD", "return 1"), ""), "SCRIPT|LOAD", "+script|load"),
    (redis.exceptions.NoPermissionError(
        "this user has no permissions to access one of the keys used as arguments"),
     AclProbe("HSET", ("HSET", "rq:job:x", "status", "canceled"), ""),
     "key rq:job:x (HSET)", "~rq:*"),
    (redis.exceptions.NoPermissionError(
        "this user has no permissions to access one of the channels used as arguments"),
     AclProbe("PUBLISH", ("PUBLISH", "rq:pubsub:x", ""), ""),
     "channel rq:pubsub:x (PUBLISH)", "&rq:pubsub:*"),
    (redis.exceptions.NoPermissionError(
        "this user has no permissions to access one of the channels used as arguments"),
     AclProbe("PSUBSCRIBE", ("PSUBSCRIBE", "__keyspace@0__:rq:job:*"), ""),
     "channel __keyspace@0__:rq:job:* (PSUBSCRIBE)", "&__keyspace@0__:rq:job:*"),
    (redis.exceptions.ResponseError("unknown command 'LPOS'"),
     AclProbe("LPOS", ("LPOS", "k", "x"), ""), "LPOS (not available: unknown command 'LPOS')",
     "+lpos"),
])
def test_denials_say_what_to_grant(exc: redis.exceptions.ResponseError, probe: AclProbe,
                                   what: str, rule: str) -> None:
    assert denial(exc, probe) == (what, rule)
