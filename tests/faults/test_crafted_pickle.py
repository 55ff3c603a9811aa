"""A job hash crafted by whoever can write to Redis: its pickles (data, meta, result) would
run code when loaded. The daemon, which holds the database credentials, reads, syncs and
cancels such jobs without ever loading one (SPEC "Names")."""

from __future__ import annotations

import pickle
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from reconciler.devstack import (
    DaemonProc,
    insert_job,
    migrate,
    request_cancel,
    run_cli,
    wait_request,
    wait_status,
    write_config,
)


class _Payload:
    """Unpickling this creates the file at `path` (open(path, "a")); nothing else runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "a"))


def crafted(path: Path) -> bytes:
    return pickle.dumps(_Payload(path))


@pytest.fixture
def daemon(tmp_path: Path, redis_url: str, pg_dsn: str) -> Iterator[DaemonProc]:
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn, sweep={"min_age_seconds": 60.0})
    migrate(cfg)
    d = DaemonProc(cfg, tmp_path / "d.log")
    d.start()
    yield d
    d.close()


def test_crafted_pickles_in_job_hashes_never_run(tmp_path: Path, redis_url: str, pg_dsn: str,
                                                daemon: DaemonProc) -> None:
    canary = tmp_path / "canary"
    pickle.loads(crafted(canary)).close()  # the payload does work when loaded
    assert canary.exists()
    marker = tmp_path / "pwned"
    evil = crafted(marker)
    fields = {"data": zlib.compress(evil), "meta": evil, "result": evil,
              "origin": "nobody-listens", "created_at": "2026-01-01T00:00:00.000000Z",
              "enqueued_at": "2026-01-01T00:00:00.000000Z", "description": "crafted"}
    jobs = {
        "crafted-queued": {**fields, "status": "queued"},
        "crafted-finished": {**fields, "status": "finished",
                             "ended_at": "2026-01-01T00:00:01.000000Z"},
        "crafted-failed": {**fields, "status": "failed", "exc_info": zlib.compress(b"Boom: x"),
                           "ended_at": "2026-01-01T00:00:01.000000Z"},
    }
    rows = {jid: insert_job(pg_dsn, jid, status="queued", started_ago=None) for jid in jobs}
    with redis.Redis.from_url(redis_url) as r:
        for jid, mapping in jobs.items():
            r.hset(f"rq:job:{jid}", mapping=mapping)  # type: ignore[arg-type]
        r.rpush("rq:queue:nobody-listens", "crafted-queued")
        # the event path syncs the ended ones
        wait_status(pg_dsn, rows["crafted-finished"], "completed")
        assert wait_status(pg_dsn, rows["crafted-failed"], "failed")["error_message"] == \
            "Synced: RQ failed: Boom: x"
        # a cancel goes through RQ's own Job.cancel(), which fetches the whole job
        req = wait_request(pg_dsn, request_cancel(pg_dsn, rows["crafted-queued"]))
        assert req["outcome"] == "cancelled" and req["detail"]["rq_cancelled"] is True, req
        assert r.hget("rq:job:crafted-queued", "status") == b"canceled"
        assert r.lrange("rq:queue:nobody-listens", 0, -1) == []
        # RQ wrote back none of what it could not load
        for jid in jobs:
            assert r.hmget(f"rq:job:{jid}", ["data", "meta", "result"]) == \
                [fields["data"], evil, evil]
    # a one-shot sweep reads them too
    assert run_cli(daemon.config, "sweep").returncode == 0
    assert not marker.exists()
    assert "pwned" not in daemon.log_text()
