"""`rq-reconciler check`: one OK/WARN/FAIL line per check, each FAIL saying how to fix it.

Read-only: it never changes the keyspace setting, the table or RQ state.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import redis.exceptions

from reconciler.config import Config, quote_ident, redact
from reconciler.errors import BackendUnavailable
from reconciler.rq_state import RqState, missing_keyspace_flags

_TEXT_TYPES = {"text", "character varying", "character", "citext", "name"}
_TIME_TYPES = {"timestamp with time zone", "timestamp without time zone"}


@dataclass(frozen=True)
class Line:
    level: str  # OK, WARN, FAIL
    what: str
    message: str

    def render(self) -> str:
        return f"{self.level:<4} {self.what}: {self.message}"


async def run_checks(cfg: Config) -> list[Line]:
    out = [Line("OK", "config", f"{cfg.source} is valid")]
    out += await _check_redis(cfg)
    out += await _check_postgres(cfg)
    return out


async def _check_redis(cfg: Config) -> list[Line]:
    rq = RqState(cfg.redis.url, socket_timeout=cfg.redis.socket_timeout_seconds)
    shown = redact(cfg.redis.url)
    try:
        try:
            await rq.ping()
        except BackendUnavailable as exc:
            return [Line("FAIL", "redis", f"cannot reach {shown}: {exc}. Is Redis running, and is "
                         "redis.url (or $RQ_RECONCILER_REDIS_URL) right?")]
        lines = [Line("OK", "redis", f"{shown} answers PING")]
        workers = await rq.worker_names()
        lines.append(Line("OK" if workers else "WARN", "rq workers",
                          f"{len(workers)} registered" if workers else
                          "none registered in this Redis db: is redis.url's db number the one "
                          "your workers use?"))
        mode = cfg.redis.keyspace_events
        try:
            flags = await rq.keyspace_flags()
        except redis.exceptions.ResponseError as exc:
            level = "FAIL" if mode == "require" else "WARN"
            lines.append(Line(level, "keyspace events", f"CONFIG GET refused ({exc}); the daemon "
                              f"will rely on sweeps every {cfg.sweep.fallback_interval_seconds:g} s. "
                              "Set notify-keyspace-events to include 'Kghx' in your provider's "
                              "console for millisecond sync"))
            return lines
        missing = missing_keyspace_flags(flags)
        if not missing:
            lines.append(Line("OK", "keyspace events", f"notify-keyspace-events={flags!r}"))
        elif mode == "off":
            lines.append(Line("OK", "keyspace events", "off by config: sweeps only"))
        elif mode == "auto":
            lines.append(Line("WARN", "keyspace events",
                              f"notify-keyspace-events={flags!r} lacks {missing!r}; the daemon "
                              "adds it at start-up (redis.keyspace_events = \"auto\")"))
        else:
            lines.append(Line("FAIL", "keyspace events",
                              f"notify-keyspace-events={flags!r} lacks {missing!r}; run "
                              f"`redis-cli CONFIG SET notify-keyspace-events {flags + missing}` "
                              "(and persist it in redis.conf), or set redis.keyspace_events = "
                              "\"auto\""))
        return lines
    finally:
        await rq.close()


async def _check_postgres(cfg: Config) -> list[Line]:
    shown = redact(cfg.postgres.dsn)
    try:
        conn = await asyncpg.connect(cfg.postgres.dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        return [Line("FAIL", "postgres", f"cannot connect to {shown}: {exc}. Is PostgreSQL "
                     "running, and is postgres.dsn (or $RQ_RECONCILER_POSTGRES_DSN) right?")]
    try:
        lines = [Line("OK", "postgres", f"connected to {shown}")]
        j = cfg.jobs
        table_oid = await conn.fetchval("SELECT to_regclass($1)::oid", quote_ident(j.table))
        if table_oid is None:
            lines.append(Line("FAIL", "jobs table", f"{j.table!r} does not exist in this database; "
                              "set jobs.table (schema-qualified if needed, names are "
                              "case-sensitive)"))
            return lines
        lines.append(Line("OK", "jobs table", f"{j.table} exists"))
        cols = {
            r["attname"]: r["t"]
            for r in await conn.fetch(
                "SELECT attname, format_type(atttypid, NULL) AS t FROM pg_attribute "
                "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped", table_oid)
        }
        wanted = [
            ("jobs.id_column", j.id_column, None),
            ("jobs.rq_id_column", j.rq_id_column, _TEXT_TYPES),
            ("jobs.status_column", j.status_column, _TEXT_TYPES),
            ("jobs.error_column", j.error_column, _TEXT_TYPES),
            ("jobs.started_at_column", j.started_at_column, _TIME_TYPES),
            ("jobs.completed_at_column", j.completed_at_column, _TIME_TYPES),
        ]
        for key, col, types in wanted:
            if not col:
                lines.append(Line("OK", key, "not configured (optional)"))
                continue
            typ = cols.get(col)
            if typ is None:
                lines.append(Line("FAIL", key, f"column {col!r} not found in {j.table}; existing: "
                                  f"{', '.join(sorted(cols))}"))
            elif types is not None and typ not in types:
                lines.append(Line("FAIL", key, f"column {col!r} is {typ}; expected one of "
                                  f"{', '.join(sorted(types))}"))
            else:
                lines.append(Line("OK", key, f"{col} ({typ})"))
        indexed = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = i.indkey[0] WHERE i.indrelid = $1 AND a.attname = $2)",
            table_oid, j.rq_id_column)
        if indexed:
            lines.append(Line("OK", "rq id index", f"{j.rq_id_column} is indexed"))
        else:
            lines.append(Line("WARN", "rq id index",
                              f"no index leads with {j.rq_id_column}: every Redis event costs a "
                              f"table scan. Fix: CREATE INDEX CONCURRENTLY ON {quote_ident(j.table)} "
                              f"({quote_ident(j.rq_id_column)});"))
        req = await conn.fetchval("SELECT to_regclass($1)", quote_ident(cfg.cancel.requests_table))
        events = await conn.fetchval("SELECT to_regclass($1)", quote_ident(cfg.events_table))
        if req is None or events is None:
            lines.append(Line("FAIL", "schema", "rq-reconciler's tables are missing; run "
                              "`rq-reconciler migrate` (or `migrate --print-sql` for your DBA)"))
        else:
            lines.append(Line("OK", "schema", f"{cfg.cancel.requests_table} and "
                              f"{cfg.events_table} exist"))
        return lines
    finally:
        await conn.close()
