"""Throwaway local servers for the demo, the tests and bench/: redis-server, PostgreSQL,
``rq worker`` subprocesses and the daemon itself, plus the one helper of each kind they
share (a sync Postgres connection, ``wait_until``, ``migrate``, a /metrics reader).

No fakes and no mocks: everything starts real processes on free localhost ports inside
temporary directories and knows how to tear them down again, including the awkward cases
fault tests create (SIGKILLed servers, orphaned work horses).  No pytest dependency:
``tests/conftest.py`` wraps it in fixtures::

    with RedisServer() as rs, PostgresServer() as pg:
        dsn = pg.create_database("demo")
        create_jobs_table(dsn)
        w = start_worker(rs.url, "w1")
        w.wait_registered()
        job_id = enqueue(rs.url, "tests.jobs.succeed", 21)
        wait_until(lambda: rq_status(rs.url, job_id) == "finished", what="job finished")
        w.stop()

Every server and worker is kept in a registry; ``cleanup_all()`` (also run at exit)
kills whatever is still running and removes the temp dirs.  The product never imports
this package.
"""

from reconciler.devstack.cli_proc import migrate, run_cli, write_config
from reconciler.devstack.daemon_proc import DaemonProc
from reconciler.devstack.hosts import Host
from reconciler.devstack.jobs_table import (
    create_jobs_table,
    insert_job,
    request_cancel,
    row,
    statuses,
    transitions,
    wait_request,
    wait_status,
)
from reconciler.devstack.postgres import PostgresServer
from reconciler.devstack.procs import (
    REPO_ROOT,
    cleanup_all,
    free_port,
    harness_env,
    kill_stragglers,
    pid_alive,
    processes_under,
    processes_with_env,
    stragglers,
    tmp_base,
)
from reconciler.devstack.prom_text import histogram, metric_value
from reconciler.devstack.redis_server import RedisServer, redis_client
from reconciler.devstack.rqvenv import RQ_SERIES, worker_python
from reconciler.devstack.sync_pg import Pg, pg_fetch
from reconciler.devstack.wait import wait_until
from reconciler.devstack.workers import (
    FORK_WORKER,
    SPAWN_WORKER,
    Worker,
    WorkerPool,
    enqueue,
    rq_status,
    start_worker,
)

__all__ = [
    "FORK_WORKER",
    "REPO_ROOT",
    "RQ_SERIES",
    "SPAWN_WORKER",
    "DaemonProc",
    "Host",
    "Pg",
    "PostgresServer",
    "RedisServer",
    "Worker",
    "WorkerPool",
    "cleanup_all",
    "create_jobs_table",
    "enqueue",
    "free_port",
    "harness_env",
    "histogram",
    "insert_job",
    "kill_stragglers",
    "metric_value",
    "migrate",
    "pg_fetch",
    "pid_alive",
    "processes_under",
    "processes_with_env",
    "redis_client",
    "request_cancel",
    "row",
    "rq_status",
    "run_cli",
    "start_worker",
    "statuses",
    "stragglers",
    "tmp_base",
    "transitions",
    "wait_request",
    "wait_status",
    "wait_until",
    "worker_python",
    "write_config",
]
