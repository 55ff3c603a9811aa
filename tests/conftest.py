"""Shared fixtures: real redis-server / PostgreSQL / rq workers (see reconciler.devstack)."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler import devstack
from reconciler.devstack import (
    DaemonProc,
    PostgresServer,
    RedisServer,
    WorkerPool,
    migrate,
    write_config,
)

_db_counter = itertools.count(1)

# Every test that starts rq workers runs once with RQ 2 workers and once with RQ 3 workers
# (each from a venv of its own series, built on first use: reconciler/devstack/rqvenv.py),
# whatever rq the package itself imports. RQ_WORKER_VERSIONS=3 runs one series only.
RQ_WORKER_VERSIONS = [v for v in os.environ.get("RQ_WORKER_VERSIONS", "2,3").split(",") if v]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long runs first: under pytest-xdist a chaos run that starts last is the whole
    suite's tail, one that starts first overlaps everything else."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """At session end: stop everything the harness started and kill any straggler."""
    yield
    devstack.cleanup_all()
    leaked = devstack.stragglers()
    if leaked:
        desc = ", ".join(f"{p.pid}" for p in leaked)
        devstack.kill_stragglers()
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"rq-harness: killed leftover processes: {desc}", red=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server per session (started on first use). Don't kill it: use own_redis."""
    srv = RedisServer().start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster per session (started on first use). Don't kill it: use own_pg."""
    srv = PostgresServer().start()
    yield srv
    srv.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session redis-server, FLUSHALLed and with keyspace notifications off."""
    if not redis_server.is_running():  # a test misbehaved; heal rather than cascade
        redis_server.start()
    with redis_server.client() as r:
        r.flushall()
        r.config_set("notify-keyspace-events", "")
    return redis_server.url


@pytest.fixture
def pg_dsn(pg_server: PostgresServer) -> Iterator[str]:
    """DSN of a brand-new database (with an empty ``training_jobs`` table), dropped after."""
    if not pg_server.is_running():
        pg_server.start()
    name = f"t_{next(_db_counter)}_{uuid.uuid4().hex[:8]}"
    dsn = pg_server.create_database(name)
    devstack.create_jobs_table(dsn)
    yield dsn
    if pg_server.is_running():
        pg_server.drop_database(name)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private redis-server for tests that kill/restart it."""
    srv = RedisServer().start()
    yield srv
    srv.cleanup()


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A private, running PostgreSQL cluster for tests that kill/restart it."""
    srv = PostgresServer().start()
    yield srv
    srv.cleanup()


@pytest.fixture(params=RQ_WORKER_VERSIONS, ids=lambda v: f"rq{v}")
def rq_version(request: pytest.FixtureRequest) -> str:
    """The RQ series ("2" or "3") of the workers this test starts."""
    return str(request.param)


@pytest.fixture
def workers(redis_url: str, tmp_path: Path, rq_version: str) -> Iterator[WorkerPool]:
    """Factory for real ``rq worker`` processes of RQ ``rq_version`` on ``redis_url``; all
    stopped at teardown.

    ``workers()`` / ``workers.start(name=None, queues=("default",), extra_env=None,
    wait=True, rq_version=None, worker_class=None)`` returns a registered
    ``devstack.Worker``.  Logs go to ``tmp_path``.
    """
    pool = WorkerPool(redis_url, log_dir=tmp_path, rq_version=rq_version)
    yield pool
    pool.stop_all()


@pytest.fixture
def tmp_marker(tmp_path: Path) -> Path:
    """A fresh, empty marker file for the job functions in ``tests.jobs``."""
    path = tmp_path / f"marker-{uuid.uuid4().hex[:8]}.txt"
    path.touch()
    return path


# The sweep every 300 s: what a test sees is the event path's doing.
EVENTS_ONLY = {"interval_seconds": 300.0, "fallback_interval_seconds": 300.0,
               "min_age_seconds": 0.0}


@pytest.fixture
def daemon(tmp_path: Path, redis_url: str, pg_dsn: str) -> Iterator[Any]:
    """Start daemons as real subprocesses: `daemon(**config_sections)`, each a replica
    with a name of its own (replica-0, replica-1, ...), events only unless `sweep` is
    given; all closed at the end."""
    made: list[DaemonProc] = []

    def make(**sections: dict[str, Any]) -> DaemonProc:
        sections.setdefault("sweep", EVENTS_ONLY)
        n = len(made)
        sections.setdefault("instance", {"name": f"replica-{n}"})
        cfg = write_config(tmp_path / f"config-{n}.toml", redis_url, pg_dsn, **sections)
        migrate(cfg)
        d = DaemonProc(cfg, tmp_path / f"daemon-{n}.log", name=f"d{n}")
        made.append(d)
        d.start()
        return d

    yield make
    for d in made:
        d.close()
