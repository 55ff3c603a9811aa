"""`rq-reconciler check` against a real redis-server with ACL users: it names the command
a user lacks, and a user with exactly the listed commands runs the daemon's Redis side."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from rq import Queue
from rq.results import Result

from reconciler.model import RqStatus
from reconciler.rq_state import RqState
from tests.support import run_cli, write_config

# What docs/operating.md's "Who may cancel, and the Redis user" tells operators to give the
# daemon.
COMMANDS = ("+ping +info +evalsha +script|load +hmget +exists +xrevrange +lpos +zcount +hget "
            "+scard +zrangebyscore +pttl +pubsub|numsub +smembers +publish +hgetall +watch +unwatch "
            "+multi +exec +hset +lrem +zrem +zadd +zrange +zremrangebyscore +config|get "
            "+srandmember +lrange +zscan +lpush +rpush +del +srem +sadd +psubscribe")
CHANNELS = "&rq:pubsub:* &__keyspace@0__:rq:job:* &__keyspace@0__:rq:worker:*"


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as r:
        r.config_set("notify-keyspace-events", "Kghx")  # set once by an admin
        r.script_flush()
        yield r


@pytest.fixture
def acl_user(admin: redis.Redis, redis_url: str) -> Iterator[tuple[str, str]]:
    """(name, password); the caller sets its rules. Deleted afterwards."""
    name, pw = f"rqr_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    yield name, pw
    admin.acl_deluser(name)


def make_user(admin: redis.Redis, user: tuple[str, str], commands: str = COMMANDS,
              keys: str = "~rq:*", channels: str = CHANNELS) -> str:
    name, pw = user
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{pw}", "-@all",
                          *commands.split(), *keys.split(), *channels.split())
    return name


def url_for(redis_url: str, user: tuple[str, str]) -> str:
    u = urlsplit(redis_url)
    return f"redis://{user[0]}:{user[1]}@{u.hostname}:{u.port}/0"


def check(tmp_path: Path, url: str, pg_dsn: str) -> tuple[int, str]:
    cfg = write_config(tmp_path / "config.toml", url, pg_dsn)
    p = run_cli(cfg, "migrate")
    assert p.returncode == 0, p.stderr
    p = run_cli(cfg, "check")
    return p.returncode, p.stdout + p.stderr


def acl_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if " redis acl: " in ln]


def test_user_without_evalsha_fails_check_naming_it(
        tmp_path: Path, redis_url: str, pg_dsn: str, admin: redis.Redis,
        acl_user: tuple[str, str]) -> None:
    name = make_user(admin, acl_user, commands=COMMANDS.replace("+evalsha ", ""))
    rc, out = check(tmp_path, url_for(redis_url, acl_user), pg_dsn)
    assert rc == 1, out
    [line] = acl_lines(out)
    assert line.startswith("FAIL redis acl:"), out
    assert "EVALSHA (reads job and worker state in one atomic script)" in line
    assert f"user {name!r} may not run" in line and f"Fix: ACL SETUSER {name} +evalsha" in line
    assert acl_user[1] not in out  # the password never shows


def test_nothing_the_probe_queues_is_run(
        tmp_path: Path, redis_url: str, pg_dsn: str, admin: redis.Redis,
        acl_user: tuple[str, str]) -> None:
    make_user(admin, acl_user)
    probe_channel = "rq:pubsub:rq-reconciler-acl-probe"
    sub = admin.pubsub()
    sub.subscribe(probe_channel)
    assert sub.get_message(timeout=2) is not None  # the subscribe confirmation
    rc, out = check(tmp_path, url_for(redis_url, acl_user), pg_dsn)
    assert rc == 0, out
    [line] = acl_lines(out)
    assert line.startswith("OK   redis acl:"), out
    assert admin.keys("*acl-probe*") == []  # no HSET / ZADD ran
    assert admin.script_exists(hashlib.sha1(b"return 1").hexdigest()) == [False]
    assert sub.get_message(timeout=0.5) is None  # no PUBLISH reached anyone
    assert admin.config_get("notify-keyspace-events")["notify-keyspace-events"] in ("Kghx", "ghxK")
    sub.close()


@pytest.mark.parametrize(("rules", "expect"), [
    ({"keys": "~rq:job:*"}, ["key rq:workers (SMEMBERS)", "~rq:*"]),
    ({"channels": "&rq:pubsub:*"},
     ["channel __keyspace@0__:rq:job:* __keyspace@0__:rq:worker:* (PSUBSCRIBE)",
      "&__keyspace@0__:rq:job:* &__keyspace@0__:rq:worker:*"]),
    ({"channels": "&__keyspace@0__:rq:job:* &__keyspace@0__:rq:worker:*"},
     ["channel rq:pubsub:rq-reconciler-acl-probe (PUBLISH)", "&rq:pubsub:*"]),
    ({"commands": COMMANDS.replace("+script|load ", "").replace("+zrem ", "")},
     ["SCRIPT|LOAD", "ZREM", "+script|load +zrem"]),
    ({"commands": COMMANDS.replace("+multi ", "")}, ["may not run MULTI", "+multi"]),
    ({"commands": COMMANDS.replace("+exec ", "")}, ["EXEC (cancels a waiting job", "+exec"]),
])
def test_missing_keys_channels_and_commands_are_named(
        tmp_path: Path, redis_url: str, pg_dsn: str, admin: redis.Redis,
        acl_user: tuple[str, str], rules: dict[str, str], expect: list[str]) -> None:
    make_user(admin, acl_user, **rules)
    rc, out = check(tmp_path, url_for(redis_url, acl_user), pg_dsn)
    assert rc == 1, out
    fail = [ln for ln in acl_lines(out) if ln.startswith("FAIL")]
    assert fail, out
    for text in expect:
        assert text in fail[0], out


def test_config_get_refused_is_a_warning_not_a_failure(
        tmp_path: Path, redis_url: str, pg_dsn: str, admin: redis.Redis,
        acl_user: tuple[str, str]) -> None:
    make_user(admin, acl_user, commands=COMMANDS.replace("+config|get ", ""))
    rc, out = check(tmp_path, url_for(redis_url, acl_user), pg_dsn)
    assert rc == 0, out
    [line] = acl_lines(out)
    assert line.startswith("WARN redis acl:") and "CONFIG|GET" in line, out


async def _daemon_side(url: str, admin_url: str) -> None:
    """What the daemon does with Redis, under the least-privilege user."""
    with redis.Redis.from_url(admin_url) as r:
        q = Queue("default", connection=r)
        waiting = q.enqueue("os.getcwd")
        failed = q.enqueue("os.getcwd")
        failed.set_status("failed")
        Result.create_failure(failed, ttl=60, exc_string="Traceback\nRuntimeError: no GPU left")
    rq = RqState(url, socket_timeout=5)
    try:
        await rq.ping()
        assert await rq.not_authoritative() == ""
        jobs = await rq.read_jobs([waiting.id, failed.id, "missing-job"])
        assert jobs[waiting.id].status is RqStatus.QUEUED
        assert jobs[failed.id].status is RqStatus.FAILED
        assert jobs[failed.id].exc_line == "RuntimeError: no GPU left"  # XREVRANGE allowed
        assert jobs["missing-job"].status is RqStatus.MISSING
        assert await rq.jobs_exist([waiting.id, "missing-job"]) == {waiting.id: True,
                                                                     "missing-job": False}
        assert await rq.worker_names() == []
        assert set(await rq.read_workers(["w1"])) == {"w1"}
        assert await rq.keyspace_flags()
        assert await rq.send_stop_job("w1", waiting.id) == 0
        events = rq.keyspace_events()
        assert (await events.__anext__())[0] == "subscribed"
        await events.aclose()
        # a job no longer in a state to cancel: looked at, WATCH let go (UNWATCH)
        assert await rq.cancel_job(failed.id, only_from=[RqStatus.QUEUED]) == "not_canceled (failed)"
        assert await rq.cancel_job(waiting.id, only_from=[RqStatus.QUEUED]) == "canceled"
        jobs = await rq.read_jobs([waiting.id])  # the canceled branch of the script
        assert jobs[waiting.id].status is RqStatus.CANCELED
        assert not jobs[waiting.id].in_flight
    finally:
        await rq.close()


def test_a_user_with_exactly_the_listed_commands_runs_the_daemons_redis_side(
        redis_url: str, admin: redis.Redis, acl_user: tuple[str, str]) -> None:
    make_user(admin, acl_user)
    asyncio.run(_daemon_side(url_for(redis_url, acl_user), redis_url))
