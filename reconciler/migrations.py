"""Our own schema: versioned migrations (sql/), the names derived from the request table's,
and the grants an application role needs. Must never touch the application's own table
beyond reading its id column's type (for the foreign key)."""

from __future__ import annotations

import re
from importlib import resources
from typing import NamedTuple

import asyncpg

from reconciler.config import MAX_IDENT_BYTES, Config, derived_ident, quote_ident
from reconciler.errors import SchemaError
from reconciler.indexes import advise, print_sql_section
from reconciler.pgpool import translated

MIGRATIONS = ("001_initial.sql", "002_owner_only.sql", "003_replicas.sql")
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


def _quote_role(role: str) -> str:
    # A role name is one identifier, dots and all (quote_ident would split it).
    return '"' + role.replace('"', '""') + '"'


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
         ("replicas_table", "rq_reconciler_replicas"), ("version_table", "rq_reconciler_schema"))
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


def render_migrations(cfg: Config, id_type: str) -> str:
    req = cfg.cancel.requests_table
    base = _bare(req)
    pre = _schema_prefix(req)
    names = {d.placeholder: derived_ident(base, d.suffix) for d in _DERIVED}
    subs = {
        "requests_table": quote_ident(req),
        "requests_table_literal": _literal(quote_ident(req)),
        "jobs_table": quote_ident(cfg.jobs.table),
        "jobs_id": quote_ident(cfg.jobs.id_column),
        "id_type": id_type,
        "requests_open_index": quote_ident(names["requests_open_index"]),
        "requests_job_index": quote_ident(names["requests_job_index"]),
        "requests_done_index": quote_ident(names["requests_done_index"]),
        "replicas_table": quote_ident(cfg.replicas_table),
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


# The columns an application reads to learn what became of its request.
OUTCOME_COLUMNS = ("id", "job_id", "requested_at", "requested_by", "reason", "state", "outcome",
                   "detail", "done_at")
# The columns it writes; `requested_by` defaults to its role name.
REQUEST_COLUMNS = ("job_id", "requested_by", "reason")


def render_grants(cfg: Config, role: str, *, schema: str, sequence: str) -> str:
    """What an application role needs to ask for cancels and read their outcomes, and no
    more: it can never write state, outcome, claimed_by or the audit tables. `schema` is
    the request table's schema, `sequence` its id sequence (already quoted, as
    pg_get_serial_sequence() gives it)."""
    req = quote_ident(cfg.cancel.requests_table)
    r = _quote_role(role)
    # A line break in the role's name must not end the comment it is shown in.
    shown = "".join(c if c.isprintable() else "?" for c in r)
    return (
        f"-- rq-reconciler: what role {shown} needs to request cancels "
        f"(`rq-reconciler migrate --print-grants`).\n"
        f"-- LISTEN {cfg.done_channel} (to hear outcomes) needs no grant.\n"
        f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {r};\n"
        f"GRANT INSERT ({', '.join(REQUEST_COLUMNS)}) ON {req} TO {r};\n"
        f"GRANT USAGE ON SEQUENCE {sequence} TO {r};\n"
        f"GRANT SELECT ({', '.join(OUTCOME_COLUMNS)}) ON {req} TO {r};\n"
    )


async def print_grants(cfg: Config, role: str) -> str:
    """render_grants() for the tables as they are in the database (run `migrate` first)."""
    async with translated():
        # A session (listen_dsn, if dsn is a transaction pooler): asyncpg's prepared
        # statements do not survive a pooler's switch of server connection.
        conn = await asyncpg.connect(cfg.postgres.session_dsn, timeout=10)
    try:
        async with translated():
            rec = await conn.fetchrow(
                "SELECT n.nspname, pg_get_serial_sequence($1, 'id') AS seq FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
                quote_ident(cfg.cancel.requests_table),
            )
        if rec is None or rec["seq"] is None:
            raise SchemaError(f"{cfg.cancel.requests_table} does not exist here: run "
                              "`rq-reconciler migrate` first")
        return render_grants(cfg, role, schema=str(rec["nspname"]), sequence=str(rec["seq"]))
    finally:
        await conn.close()


async def migrate(cfg: Config, *, print_only: bool = False) -> str:
    """Create/upgrade our tables in one transaction, serialized by an advisory lock."""
    async with translated():
        # A session (listen_dsn, if dsn is a transaction pooler): asyncpg's prepared
        # statements do not survive a pooler's switch of server connection.
        conn = await asyncpg.connect(cfg.postgres.session_dsn, timeout=10)
    try:
        async with translated():
            id_type = await conn.fetchval(
                "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
                quote_ident(cfg.jobs.table), cfg.jobs.id_column,
            )
        if id_type is None:
            raise SchemaError(
                f"jobs table {cfg.jobs.table!r} with id column {cfg.jobs.id_column!r} not found "
                "(jobs.table / jobs.id_column); migrate needs it for the foreign key"
            )
        await refuse_mixing(conn, cfg)
        sql = render_migrations(cfg, str(id_type))
        if print_only:
            # For the DBA: the indexes our queries need on the app's table, as comments
            # (migrate never builds an index on a table that is not ours).
            try:
                section = print_sql_section(await advise(conn, cfg), cfg)
            except asyncpg.PostgresError as exc:  # a column the config names is missing
                section = f"-- Indexes on {cfg.jobs.table} not checked: {exc}\n"
            return f"{sql}\n{section}"
        async with translated(), conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('rq-reconciler:migrate'))")
            await conn.execute(sql)
        return sql
    finally:
        await conn.close()
