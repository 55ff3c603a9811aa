"""Our own schema: versioned migrations (sql/) and the names derived from the request table's.
The SQL is written from the config alone (`migrate --print-sql` connects to nothing); the
grants both roles need are schema_needs'. Must never touch the application's own table
beyond reading its id column's type (for the foreign key)."""

from __future__ import annotations

import re
from importlib import resources
from typing import NamedTuple

import asyncpg

from reconciler.config import MAX_IDENT_BYTES, Config, derived_ident, quote_ident
from reconciler.errors import PostgresUnavailable, SchemaError
from reconciler.indexes import print_sql_section
from reconciler.pgpool import translated
from reconciler.schema_needs import find_table, lacking, shown_role

MIGRATIONS = ("001_initial.sql", "002_owner_only.sql", "003_replicas.sql", "004_requeues.sql")
SCHEMA_VERSION = len(MIGRATIONS)


def _bare(name: str) -> str:
    return name.rpartition(".")[2]


def _schema_prefix(name: str) -> str:
    schema, dot, _ = name.rpartition(".")
    return f"{schema}{dot}"


def _fill(text: str, subs: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1) not in subs:
            raise KeyError(f"migration placeholder {m.group(0)} has no value")
        return subs[m.group(1)]

    return re.sub(r"\{([a-z_]+)\}", one, text)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _Derived(NamedTuple):
    """A name we make from the request table's, kept within 63 bytes."""

    placeholder: str
    suffix: str


# In creation order: where two legacy (cut) names coincided, the first one made exists.
_DERIVED = (
    _Derived("requests_open_index", "_open_idx"),
    _Derived("requests_job_index", "_job_idx"),
    _Derived("trigger_name", "_notify"),
    _Derived("requests_done_index", "_done_idx"),
)


# Names made only after names were kept short: no install has a cut one.
_NEVER_CUT = frozenset({"requests_done_index"})


def _legacy_names_sql(cfg: Config) -> str:
    """Installs made before names were kept within 63 bytes have PostgreSQL's cut names
    (for a request table name of 55+ characters): rename such an index to its new name and
    drop the old trigger and function (v1 re-creates them), instead of building twins."""
    req = cfg.cancel.requests_table
    base, pre = _bare(req), _schema_prefix(req)
    stmts: list[str] = []
    drop_fn = ""
    for d in _DERIVED:
        if d.placeholder in _NEVER_CUT:
            continue
        full = base + d.suffix
        legacy = full.encode("utf-8")[:MAX_IDENT_BYTES].decode("utf-8", "ignore")
        new = derived_ident(base, d.suffix)
        if legacy == new:
            continue
        if d.suffix == "_notify":
            # The function had the trigger's cut name; it goes once its trigger has gone.
            stmts.append(f"        DROP TRIGGER IF EXISTS {quote_ident(legacy)} ON {quote_ident(req)};")
            drop_fn = f"DROP FUNCTION IF EXISTS {quote_ident(pre + legacy)}();\n"
            continue
        rename = f"ALTER INDEX {quote_ident(pre + legacy)} RENAME TO {quote_ident(new)}"
        stmts.append(
            "        IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid\n"
            f"                   WHERE i.indrelid = {_literal(quote_ident(req))}::regclass\n"
            f"                     AND c.relname = {_literal(legacy)})\n"
            f"           AND to_regclass({_literal(quote_ident(pre + new))}) IS NULL THEN\n"
            f"            EXECUTE {_literal(rename)};\n"
            "        END IF;"
        )
    if not stmts:
        return ""
    return (
        "-- Names PostgreSQL cut to 63 bytes before rq-reconciler kept them short itself.\n"
        "DO $legacy_names$\nBEGIN\n"
        f"    IF to_regclass({_literal(quote_ident(req))}) IS NOT NULL THEN\n"
        + "\n".join(stmts)
        + "\n    END IF;\nEND\n$legacy_names$;\n"
        + drop_fn
    )


# Our tables other than the requests table, as (config property, legacy bare name): the
# names every install had before they were named after its requests table.
_OURS = (("events_table", "rq_reconciler_events"), ("first_seen_table", "rq_reconciler_first_seen"),
         ("replicas_table", "rq_reconciler_replicas"), ("version_table", "rq_reconciler_schema"),
         ("requeues_table", "rq_reconciler_requeues"))
# The comment each of them carries: whose they are (the requests table, schema-qualified).
INSTALL_MARK = "rq-reconciler: of the install whose cancel requests are in "
# Columns that make a table an rq-reconciler cancel-request table (another install's).
_REQUEST_COLUMNS = ("job_id", "requested_by", "state", "claimed_by", "claimed_until", "outcome",
                    "done_at")


def _ours_by_name(cfg: Config) -> list[tuple[str, str]]:
    pre = _schema_prefix(cfg.cancel.requests_table)
    return [(getattr(cfg, prop), pre + legacy) for prop, legacy in _OURS]


def _canonical_requests_sql(cfg: Config) -> str:
    """The requests table's schema-qualified name, as SQL (it exists when this runs)."""
    return ("(SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n "
            f"ON n.oid = c.relnamespace WHERE c.oid = {_literal(quote_ident(cfg.cancel.requests_table))}"
            "::regclass)")


def _adopt_legacy_sql(cfg: Config) -> str:
    """An install whose requests table is not the default one had the shared names
    (rq_reconciler_events, ...): its tables are renamed to its own names, if they are its
    alone (no other cancel-request table in the schema, no other install's mark on them).
    Shared ones are left to the install of the default requests table."""
    moves = [(new, legacy) for new, legacy in _ours_by_name(cfg) if new != legacy]
    if not moves:
        return ""
    req = _literal(quote_ident(cfg.cancel.requests_table))
    cols = ", ".join(_literal(c) for c in _REQUEST_COLUMNS)
    stmts = []
    for new, legacy in moves:
        rename = f"ALTER TABLE {quote_ident(legacy)} RENAME TO {quote_ident(_bare(new))}"
        stmts.append(
            f"        IF to_regclass({_literal(quote_ident(legacy))}) IS NOT NULL\n"
            f"           AND to_regclass({_literal(quote_ident(new))}) IS NULL\n"
            f"           AND coalesce(obj_description(to_regclass({_literal(quote_ident(legacy))}), "
            "'pg_class'), mine) = mine THEN\n"
            f"            EXECUTE {_literal(rename)};\n"
            f"            RAISE NOTICE 'rq-reconciler: renamed % to %', {_literal(legacy)}, "
            f"{_literal(new)};\n"
            "        END IF;"
        )
    for new, legacy in moves:
        if _bare(legacy) != "rq_reconciler_events":
            continue
        # Its index, named after it (the table's rename keeps the index's name).
        old_idx = quote_ident(_schema_prefix(new) + "rq_reconciler_events_job_idx")
        new_idx = derived_ident(_bare(new), "_job_idx")
        rename_idx = f"ALTER INDEX {old_idx} RENAME TO {quote_ident(new_idx)}"
        stmts.append(
            f"        IF to_regclass({_literal(old_idx)}) IS NOT NULL\n"
            f"           AND to_regclass({_literal(quote_ident(_schema_prefix(new) + new_idx))})"
            " IS NULL\n"
            f"           AND (SELECT indrelid FROM pg_index WHERE indexrelid = "
            f"to_regclass({_literal(old_idx)})) = to_regclass({_literal(quote_ident(new))}) THEN\n"
            f"            EXECUTE {_literal(rename_idx)};\n"
            "        END IF;"
        )
    return (
        "-- Installs made before our tables were named after the requests table shared\n"
        "-- rq_reconciler_events, _first_seen, _replicas and _schema in a schema. This install's\n"
        "-- own (no other cancel-request table beside its own) take its names; shared ones stay.\n"
        "DO $adopt$\nDECLARE\n    mine text;\nBEGIN\n"
        f"    IF to_regclass({req}) IS NOT NULL AND NOT EXISTS (\n"
        "        SELECT 1 FROM pg_class c\n"
        f"        WHERE c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = to_regclass({req}))\n"
        f"          AND c.relkind IN ('r', 'p') AND c.oid <> to_regclass({req})\n"
        "          AND (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid\n"
        f"               AND NOT a.attisdropped AND a.attname IN ({cols})) = {len(_REQUEST_COLUMNS)}) THEN\n"
        f"        mine := {_literal(INSTALL_MARK)} || {_canonical_requests_sql(cfg)};\n"
        + "\n".join(stmts)
        + "\n    END IF;\nEND\n$adopt$;\n"
    )


def _mark_sql(cfg: Config) -> str:
    """Each of our tables says whose it is: `migrate` of another install refuses them."""
    marks = "".join(
        f"    IF to_regclass({_literal(quote_ident(new))}) IS NOT NULL THEN\n"
        f"        EXECUTE format('COMMENT ON TABLE %s IS %L', {_literal(quote_ident(new))}, mine);\n"
        "    END IF;\n"
        for new, _legacy in _ours_by_name(cfg))
    return (
        "-- Whose these tables are: `migrate` of another install refuses to share them.\n"
        "DO $mark$\nDECLARE\n    mine text;\nBEGIN\n"
        f"    mine := {_literal(INSTALL_MARK)} || {_canonical_requests_sql(cfg)};\n"
        f"{marks}END\n$mark$;\n"
    )


async def refuse_mixing(conn: asyncpg.Connection, cfg: Config) -> None:
    """SchemaError if the tables this config names belong to another install: a requests
    table whose job_id references another jobs table, or one of our tables marked as
    another requests table's. Two installs never share a table (first-seen times, the
    replica registry and the audit trail are each install's own)."""
    req = quote_ident(cfg.cancel.requests_table)
    async with translated():
        rec = await conn.fetchrow(
            "SELECT CASE WHEN c.oid IS NOT NULL THEN format('%I.%I', n.nspname, c.relname) END "
            "AS name, "
            "(SELECT f.confrelid::regclass::text FROM pg_constraint f WHERE f.conrelid = c.oid "
            " AND f.contype = 'f' AND f.confrelid <> to_regclass($2) LIMIT 1) AS other_jobs, "
            "(SELECT format('%I.%I', n2.nspname, $3::text)) AS planned "
            "FROM pg_namespace n2 LEFT JOIN pg_class c ON c.oid = to_regclass($1) "
            "LEFT JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n2.nspname = coalesce(nullif($4, ''), current_schema())",
            req, quote_ident(cfg.jobs.table), _bare(cfg.cancel.requests_table),
            _schema_prefix(cfg.cancel.requests_table).rstrip("."))
        if rec is None:
            return  # its schema does not exist: migrate says so itself
        if rec["other_jobs"] is not None:
            raise SchemaError(
                f"{cfg.cancel.requests_table} belongs to the install on jobs table "
                f"{rec['other_jobs']}, not {cfg.jobs.table}: give this install a "
                "cancel.requests_table of its own (its other tables are named after it)")
        mine = INSTALL_MARK + str(rec["name"] or rec["planned"])
        for table, _legacy in _ours_by_name(cfg):
            mark = await conn.fetchval(
                "SELECT obj_description(to_regclass($1), 'pg_class')", quote_ident(table))
            if mark and mark.startswith(INSTALL_MARK) and mark != mine:
                raise SchemaError(
                    f"{table} belongs to the install whose cancel requests are in "
                    f"{mark[len(INSTALL_MARK):]}, not {cfg.cancel.requests_table}: give each "
                    "install a cancel.requests_table of its own (its other tables are named "
                    "after it)")


def render_migrations(cfg: Config) -> str:
    req = cfg.cancel.requests_table
    base = _bare(req)
    pre = _schema_prefix(req)
    names = {d.placeholder: derived_ident(base, d.suffix) for d in _DERIVED}
    subs = {
        "requests_table": quote_ident(req),
        "requests_table_literal": _literal(quote_ident(req)),
        "jobs_table": quote_ident(cfg.jobs.table),
        "jobs_table_literal": _literal(quote_ident(cfg.jobs.table)),
        "jobs_id": quote_ident(cfg.jobs.id_column),
        "jobs_id_literal": _literal(cfg.jobs.id_column),
        "requests_open_index": quote_ident(names["requests_open_index"]),
        "requests_job_index": quote_ident(names["requests_job_index"]),
        "requests_done_index": quote_ident(names["requests_done_index"]),
        "replicas_table": quote_ident(cfg.replicas_table),
        "requeues_table": quote_ident(cfg.requeues_table),
        "trigger_fn": quote_ident(pre + names["trigger_name"]),
        "trigger_name": quote_ident(names["trigger_name"]),
        "channel_literal": _literal(cfg.cancel.channel),
        "events_table": quote_ident(cfg.events_table),
        "events_table_literal": _literal(quote_ident(cfg.events_table)),
        "events_job_index": quote_ident(derived_ident(_bare(cfg.events_table), "_job_idx")),
        "first_seen_table": quote_ident(cfg.first_seen_table),
        "version_table": quote_ident(cfg.version_table),
    }
    legacy = _legacy_names_sql(cfg)
    parts = [legacy] if legacy else []
    adopt = _adopt_legacy_sql(cfg)
    if adopt:
        parts.append(adopt)
    for name in MIGRATIONS:
        text = resources.files("reconciler").joinpath("sql", name).read_text(encoding="utf-8")
        parts.append(_fill(text, subs))
    version = subs["version_table"]
    versions = ", ".join(f"({n})" for n in range(1, SCHEMA_VERSION + 1))
    parts.append(
        f"CREATE TABLE IF NOT EXISTS {version} (version int PRIMARY KEY, "
        "applied_at timestamptz NOT NULL DEFAULT now());\n"
        f"REVOKE ALL ON {version} FROM PUBLIC;\n"
        f"INSERT INTO {version} (version) VALUES {versions} ON CONFLICT DO NOTHING;\n"
    )
    parts.append(_mark_sql(cfg))
    return "\n".join(parts)


async def _preflight(conn: asyncpg.Connection, cfg: Config) -> None:
    """What `migrate` needs, asked before it changes anything: a refusal halfway says only
    `permission denied for schema ml`, not whose, nor the GRANT that fixes it."""
    role, lacks = await lacking(conn, cfg, migrating=True)
    if lacks:
        raise SchemaError(
            f"migrate as role {shown_role(role)}: it lacks "
            f"{'; '.join(f'{x.what} ({x.why})' for x in lacks)}. Fix, as the owner of "
            f"{cfg.jobs.table} (or a superuser): {' '.join(x.fix for x in lacks)}")
    jobs = await find_table(conn, cfg.jobs.table)
    has_id = jobs is not None and await conn.fetchval(
        "SELECT true FROM pg_attribute WHERE attrelid = $1 AND attname = $2 AND NOT attisdropped",
        jobs.oid, cfg.jobs.id_column)
    if not has_id:
        raise SchemaError(
            f"jobs table {cfg.jobs.table!r} with id column {cfg.jobs.id_column!r} not found "
            "(jobs.table / jobs.id_column); migrate needs it for the foreign key"
        )


async def preflight(cfg: Config) -> None:
    """Raise SchemaError, in one line with the GRANTs that fix it, if `migrate` as the
    configured role could not do its work. Changes nothing."""
    async with translated():
        conn = await asyncpg.connect(cfg.postgres.session_dsn, timeout=10)
    try:
        async with translated():
            await _preflight(conn, cfg)
    finally:
        await conn.close()


# How long migrate waits for a lock (the app's table, for the foreign key) before it gives up.
MIGRATE_LOCK_TIMEOUT_MS = 5000


async def migrate(cfg: Config, *, print_only: bool = False) -> str:
    """Create/upgrade our tables in one transaction, serialized by an advisory lock.
    `print_only`: the SQL it runs, and the indexes the jobs table should have, from the
    config alone."""
    sql = render_migrations(cfg)
    if print_only:
        # For the DBA: the indexes our queries need on the app's table, as comments
        # (migrate never builds an index on a table that is not ours).
        return f"{sql}\n{print_sql_section(cfg)}"
    async with translated():
        # A session (listen_dsn, if dsn is a transaction pooler): asyncpg's prepared
        # statements do not survive a pooler's switch of server connection.
        conn = await asyncpg.connect(cfg.postgres.session_dsn, timeout=10)
    try:
        async with translated():
            await _preflight(conn, cfg)
            await refuse_mixing(conn, cfg)
        try:
            async with translated(), conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('rq-reconciler:migrate'))")
                # The first run adds a foreign key to the app's table, which locks it against
                # writes while the lock is waited for: never stall the app behind a long
                # transaction of its own; give up and say so instead.
                await conn.execute(f"SET LOCAL lock_timeout = '{MIGRATE_LOCK_TIMEOUT_MS}ms'")
                await conn.execute(sql)
        except PostgresUnavailable as exc:
            if not isinstance(exc.__cause__, asyncpg.LockNotAvailableError):
                raise
            raise PostgresUnavailable(
                f"migrate waited {MIGRATE_LOCK_TIMEOUT_MS / 1000:g} s for a lock on "
                f"{cfg.jobs.table} (its foreign key) or on its own tables, held by another "
                "transaction; nothing changed: run it again when that transaction has "
                "ended") from exc
        except SchemaError as exc:
            role = await conn.fetchval("SELECT current_user")
            raise SchemaError(f"migrate as role {shown_role(str(role))}: {exc} (what each role "
                              "needs: `rq-reconciler migrate --print-grants`)") from exc
        return sql
    finally:
        await conn.close()
