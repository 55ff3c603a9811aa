"""The servers a benchmark runs on: a throwaway redis-server and PostgreSQL cluster with
the seed-shaped jobs table and rq-reconciler's tables migrated (reconciler.devstack),
removed at exit. Never uses the machine's own servers."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from reconciler.devstack import (
    Pg,
    PostgresServer,
    RedisServer,
    create_jobs_table,
    migrate,
    write_config,
)


def make_workdir(prefix: str) -> Path:
    """A temp dir for configs and logs, removed at exit (BENCH_KEEP=1 keeps it)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if not os.environ.get("BENCH_KEEP"):
        atexit.register(shutil.rmtree, path, True)
    return path


@dataclass
class Env:
    """A redis-server, a PostgreSQL cluster, one database with the seed-shaped jobs table
    and rq-reconciler's own tables (migrated), and a config file pointing at them."""

    redis_srv: RedisServer
    pg: PostgresServer
    dbname: str
    dsn: str
    config: Path
    workdir: Path
    config_sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return self.redis_srv.url

    def redis_client(self) -> redis.Redis:
        return self.redis_srv.client()

    def write_config(self, dsn: str | None = None, path: Path | None = None,
                     **sections: dict[str, Any]) -> Path:
        merged = {k: dict(v) for k, v in self.config_sections.items()}
        for k, v in sections.items():
            merged.setdefault(k, {}).update(v)
        return write_config(path or self.config, self.redis_url, dsn or self.dsn, **merged)


@contextlib.contextmanager
def bench_env(workdir: Path, dbname: str = "bench", *,
              prepare: Callable[[str], None] | None = None,
              **sections: dict[str, Any]) -> Iterator[Env]:
    """Start redis + postgres, create `dbname` with training_jobs, migrate, yield an Env.
    `prepare(dsn)` runs on the new table before migrate (whose foreign key then refers
    to it). Everything is stopped and removed on exit (and by the harness's atexit hook)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with RedisServer() as rs, PostgresServer() as pg:
        dsn = pg.create_database(dbname)
        create_jobs_table(dsn)
        if prepare is not None:
            prepare(dsn)
        config = workdir / "config.toml"
        env = Env(rs, pg, dbname, dsn, config, workdir, {k: dict(v) for k, v in sections.items()})
        env.write_config()
        migrate(env.config)
        yield env


def pg_copy_rows(dsn: str, rows: Sequence[tuple[Any, ...]], columns: Sequence[str],
                 table: str = "training_jobs") -> None:
    """COPY ``rows`` into ``table``, then ANALYZE it."""
    with Pg(dsn) as pg:
        pg.copy_records(table, rows, columns)
        pg.execute(f"ANALYZE {table}")
