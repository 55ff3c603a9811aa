"""What the daemon needs of PostgreSQL, and the GRANTs that give it: the jobs table's
columns and their types, and each privilege its statements use, judged the same way by
`check` (a line each), by `run` at start-up (exit 2 on the first that fails), by `migrate`
(before it changes anything) and after a statement was refused mid-run (the line the
daemon exits with).

The daemon's role needs, and should hold, exactly: USAGE on the jobs table's schema;
SELECT on the jobs table (it reads the columns it maps); UPDATE of the status, error and
timestamp columns it writes; REFERENCES on the id column (for `migrate` to create the
request table's foreign key); USAGE and CREATE on the schema of its own tables, which it
creates and owns. An application role needs INSERT of (job_id, requested_by, reason) on
the request table, its id sequence, and SELECT of the outcome columns. `render_grants`
writes both from the config alone; the probes here never raise for a privilege that is
missing (names are looked up in the catalog, never through to_regclass(), which fails
without USAGE on the schema).
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg

from reconciler.config import MAX_IDENT_BYTES, Config, quote_ident

TEXT_TYPES = frozenset({"text", "character varying", "character", "citext", "name"})
TIME_TYPES = frozenset({"timestamp with time zone", "timestamp without time zone"})

# The columns an application reads to learn what became of its request.
OUTCOME_COLUMNS = ("id", "job_id", "requested_at", "requested_by", "reason", "state", "outcome",
                   "detail", "done_at")
# The columns it writes; `requested_by` defaults to its role name.
REQUEST_COLUMNS = ("job_id", "requested_by", "reason")


@dataclass(frozen=True)
class Line:
    """One finding: what `check` prints, and what `run` and `migrate` say when it fails."""

    level: str  # OK, WARN, FAIL
    what: str
    message: str

    def render(self) -> str:
        return f"{self.level:<4} {self.what}: {self.message}"


# -- names ----------------------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str]:
    """(schema, table) of a configured name; schema "" when unqualified."""
    schema, _dot, bare = name.rpartition(".")
    return schema, bare


def quote_role(role: str) -> str:
    # A role name is one identifier, dots and all (quote_ident would split it).
    return '"' + role.replace('"', '""') + '"'


def shown_role(role: str) -> str:
    """A role's name as a comment or a log line may show it (no line breaks)."""
    return "".join(c if c.isprintable() else "?" for c in quote_role(role))


def dsn_role(dsn: str) -> str:
    """The role a DSN logs in as, as libpq and asyncpg choose it: the URL's user (or its
    `user=` parameter), else $PGUSER, else the operating system's user name."""
    parts = urlsplit(dsn)
    if parts.username:
        return unquote(parts.username)
    user = dict(parse_qsl(parts.query)).get("user")
    return user or os.environ.get("PGUSER") or getpass.getuser()


def _object_name(name1: str, name2: str, label: str) -> str:
    """PostgreSQL's makeObjectName(): `name1_name2_label`, the longer of the two names cut
    first until it fits in 63 bytes (how a serial column's sequence is named)."""
    b1, b2 = name1.encode(), name2.encode()
    avail = MAX_IDENT_BYTES - (len(label.encode()) + 1) - 1
    n1, n2 = len(b1), len(b2)
    while n1 + n2 > avail:
        if n1 > n2:
            n1 -= 1
        else:
            n2 -= 1
    return (f"{b1[:n1].decode('utf-8', 'ignore')}_{b2[:n2].decode('utf-8', 'ignore')}"
            f"_{label}")


def requests_sequence(cfg: Config) -> str:
    """The request table's id sequence (bigserial), quoted, as `migrate` creates it."""
    schema, bare = split_name(cfg.cancel.requests_table)
    seq = quote_ident(_object_name(bare, "id", "seq"))
    return f"{quote_ident(schema)}.{seq}" if schema else seq


def _schema_of(name: str) -> str:
    """The schema a grant on USAGE names: the configured one, else public (where an
    unqualified name lands with the default search_path)."""
    return split_name(name)[0] or "public"


def _written_columns(cfg: Config) -> list[str]:
    j = cfg.jobs
    return [c for c in (j.status_column, j.error_column, j.started_at_column,
                        j.completed_at_column) if c]


def _read_columns(cfg: Config) -> list[str]:
    j = cfg.jobs
    return list(dict.fromkeys([j.id_column, j.rq_id_column, *_written_columns(cfg)]))


def _cols(columns: list[str]) -> str:
    return ", ".join(quote_ident(c) for c in columns)


# -- the GRANTs, from the config alone --------------------------------------------------------


def daemon_grants(cfg: Config, role: str) -> str:
    j = cfg.jobs
    r = quote_role(role)
    jobs_schema, our_schema = _schema_of(j.table), _schema_of(cfg.cancel.requests_table)
    lines = [
        f"-- The daemon's role {shown_role(role)} (postgres.dsn's user): before `rq-reconciler "
        f"migrate`, as the owner of {j.table} (or a superuser).",
        f"-- It reads {j.table}, writes only the columns it sets, and owns its own tables "
        "(`migrate`, run as it, creates them).",
    ]
    if jobs_schema == our_schema:
        lines.append(f"GRANT USAGE, CREATE ON SCHEMA {quote_ident(jobs_schema)} TO {r};")
    else:
        lines.append(f"GRANT USAGE ON SCHEMA {quote_ident(jobs_schema)} TO {r};")
        lines.append(f"GRANT USAGE, CREATE ON SCHEMA {quote_ident(our_schema)} TO {r};")
    lines.append(f"GRANT SELECT, UPDATE ({_cols(_written_columns(cfg))}), "
                 f"REFERENCES ({quote_ident(j.id_column)}) ON {quote_ident(j.table)} TO {r};")
    return "\n".join(lines) + "\n"


def app_grants(cfg: Config, role: str) -> str:
    """What an application role needs to ask for cancels and read their outcomes, and no
    more: it can never write state, outcome, claimed_by or the audit tables."""
    req = quote_ident(cfg.cancel.requests_table)
    r = quote_role(role)
    return (
        f"-- The app's role {shown_role(role)}: after `rq-reconciler migrate`, as the owner of "
        f"{cfg.cancel.requests_table} (the daemon's role) or a superuser.\n"
        f"-- LISTEN {cfg.done_channel} (to hear outcomes) needs no grant.\n"
        f"GRANT USAGE ON SCHEMA {quote_ident(_schema_of(cfg.cancel.requests_table))} TO {r};\n"
        f"GRANT INSERT ({', '.join(REQUEST_COLUMNS)}) ON {req} TO {r};\n"
        f"GRANT USAGE ON SEQUENCE {requests_sequence(cfg)} TO {r};\n"
        f"GRANT SELECT ({', '.join(OUTCOME_COLUMNS)}) ON {req} TO {r};\n"
    )


def render_grants(cfg: Config, *, daemon_role: str, app_role: str | None = None) -> str:
    """`migrate --print-grants [APP_ROLE]`: the daemon's role's grants, then (given an app
    role) the app's. Written from the config alone: nothing here connects."""
    head = ("-- rq-reconciler: the grants its roles need, and no more (`rq-reconciler migrate "
            "--print-grants`).\n")
    parts = [head, daemon_grants(cfg, daemon_role)]
    if app_role is not None:
        parts += ["\n", app_grants(cfg, app_role)]
    return "".join(parts)


# -- the live probes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    oid: int
    schema: str
    owner: str
    ours: bool  # the current role is (a member of) its owner


async def find_table(conn: asyncpg.Connection, name: str) -> Table | None:
    """The table a configured name means, as the daemon's statements resolve it (the
    search_path's first schema that has it, when unqualified); looked up in the catalog,
    so that a schema the role may not use does not raise."""
    schema, bare = split_name(name)
    rec = await conn.fetchrow(
        "SELECT c.oid, n.nspname, pg_get_userbyid(c.relowner) AS owner, "
        "pg_has_role(c.relowner, 'USAGE') AS ours FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'f', 'm') "
        "AND (n.nspname = $1 OR ($1 = '' AND n.nspname = ANY(current_schemas(true)))) "
        "ORDER BY array_position(current_schemas(true), n.nspname) LIMIT 1", schema, bare)
    if rec is None:
        return None
    return Table(int(rec["oid"]), str(rec["nspname"]), str(rec["owner"]), bool(rec["ours"]))


async def _schema_usage(conn: asyncpg.Connection, schema: str, priv: str = "USAGE") -> bool | None:
    """None if there is no such schema."""
    got = await conn.fetchval("SELECT has_schema_privilege(oid, $2) FROM pg_namespace "
                              "WHERE nspname = $1", schema, priv)
    return None if got is None else bool(got)


def _bounded_text_line(cfg: Config, key: str, col: str, typ: str, n: int) -> Line:
    """A text column with a length limit: fine for the error column (the daemon clips what
    it writes there to fit), fatal for a status column too short for a status word."""
    shown = f"{col} ({typ}({n}))"
    if key == "jobs.error_column":
        return Line("OK", key, f"{shown}: texts longer than {n} characters are clipped to "
                    f"{n} (an exception's last line can be long); use text to keep them whole")
    if key == "jobs.status_column":
        s = cfg.jobs.statuses
        long = [w for w in (*s.active, *s.terminal) if len(w) > n]
        if long:
            return Line("FAIL", key, f"{shown} cannot hold {', '.join(map(repr, long))} "
                        "(jobs.statuses): widen the column or choose shorter words")
    return Line("OK", key, shown)


async def column_lines(conn: asyncpg.Connection, cfg: Config, table: Table) -> list[Line]:
    """A line per mapped column: there, and of a type the daemon's statements work with."""
    j = cfg.jobs
    cols: dict[str, str] = {}
    enums: set[str] = set()
    max_chars: dict[str, int] = {}  # varchar(n) / char(n) columns: n
    # A domain is judged by its base type, as the daemon judges it.
    for r in await conn.fetch(
            "SELECT attname, format_type(b.oid, NULL) AS t, CASE WHEN b.oid IN "
            "('varchar'::regtype, 'bpchar'::regtype) AND b.mod > 4 THEN b.mod - 4 END AS n, "
            "(SELECT typtype = 'e' FROM pg_type WHERE oid = b.oid) AS enum "
            "FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid, LATERAL (SELECT "
            "CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE a.atttypid END AS oid, "
            "CASE WHEN ty.typtype = 'd' THEN ty.typtypmod ELSE a.atttypmod END AS mod) b "
            "WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped", table.oid):
        cols[r["attname"]] = r["t"]
        if r["enum"]:
            enums.add(r["attname"])
        if r["n"] is not None:
            max_chars[r["attname"]] = int(r["n"])
    wanted = [
        ("jobs.id_column", j.id_column, None),
        ("jobs.rq_id_column", j.rq_id_column, TEXT_TYPES),
        ("jobs.status_column", j.status_column, TEXT_TYPES),
        ("jobs.error_column", j.error_column, TEXT_TYPES),
        ("jobs.started_at_column", j.started_at_column, TIME_TYPES),
        ("jobs.completed_at_column", j.completed_at_column, TIME_TYPES),
    ]
    lines: list[Line] = []
    for key, col, types in wanted:
        if not col:
            lines.append(Line("OK", key, "not configured (optional)"))
            continue
        typ = cols.get(col)
        if typ is None:
            lines.append(Line("FAIL", key, f"column {col!r} not found in {j.table}; existing: "
                              f"{', '.join(sorted(cols))}"))
        elif types is not None and typ not in types:
            kind = "an enum" if col in enums else "of type"
            lines.append(Line("FAIL", key, f"column {col!r} is {kind} {typ}; expected one of "
                              f"{', '.join(sorted(types))}"))
        elif col in max_chars:
            lines.append(_bounded_text_line(cfg, key, col, typ, max_chars[col]))
        else:
            lines.append(Line("OK", key, f"{col} ({typ})"))
    return lines


def _our_tables(cfg: Config) -> list[str]:
    schema, dot, _ = cfg.cancel.requests_table.rpartition(".")
    return [cfg.cancel.requests_table, cfg.events_table, cfg.first_seen_table,
            cfg.replicas_table, cfg.requeues_table, f"{schema}{dot}rq_reconciler_schema"]


@dataclass(frozen=True)
class Lack:
    """A privilege the daemon's role lacks: what, what it is for, and the GRANT (or other
    statement) that gives it."""

    what: str
    why: str
    fix: str


async def lacking(conn: asyncpg.Connection, cfg: Config, *,
                  migrating: bool = False) -> tuple[str, list[Lack]]:
    """The connection's role, and each privilege it lacks of those the daemon uses (or,
    `migrating`, of those `migrate` needs: REFERENCES on the id and CREATE on our schema,
    rather than the jobs table's SELECT and UPDATE)."""
    role = str(await conn.fetchval("SELECT current_user"))
    r = quote_role(role)
    j = cfg.jobs
    out: list[Lack] = []
    jobs = await find_table(conn, j.table)
    jobs_schema = jobs.schema if jobs else _schema_of(j.table)
    if await _schema_usage(conn, jobs_schema) is False:
        out.append(Lack(f"USAGE on schema {jobs_schema}", f"to find {j.table}",
                        f"GRANT USAGE ON SCHEMA {quote_ident(jobs_schema)} TO {r};"))
    t = quote_ident(j.table)
    attnums: dict[str, int] = {}
    if jobs is not None:
        attnums = {str(rec["attname"]): int(rec["attnum"]) for rec in await conn.fetch(
            "SELECT attname, attnum FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 "
            "AND NOT attisdropped", jobs.oid)}

    async def has(col: str, priv: str) -> bool:
        if jobs is None or col not in attnums:
            return True  # a missing table or column is reported as such, elsewhere
        return bool(await conn.fetchval("SELECT has_column_privilege($1::oid, $2::int2, $3)",
                                        jobs.oid, attnums[col], priv))

    if not migrating:
        unread = [c for c in _read_columns(cfg) if not await has(c, "SELECT")]
        if unread:
            out.append(Lack(f"SELECT on {j.table} ({', '.join(unread)})",
                            "it reads each active row", f"GRANT SELECT ON {t} TO {r};"))
        unwritten = [c for c in _written_columns(cfg) if not await has(c, "UPDATE")]
        if unwritten:
            out.append(Lack(f"UPDATE of {', '.join(unwritten)} on {j.table}",
                            f"it writes {'it' if len(unwritten) == 1 else 'them'} on every "
                            "transition",
                            f"GRANT UPDATE ({_cols(unwritten)}) ON {t} TO {r};"))
    ours = [(name, await find_table(conn, name)) for name in _our_tables(cfg)]
    our_schema = ours[0][1].schema if ours[0][1] else _schema_of(cfg.cancel.requests_table)
    needed = ["USAGE", "CREATE"] if migrating and any(f is None for _n, f in ours) else ["USAGE"]
    if our_schema == jobs_schema:
        needed = [p for p in needed if p != "USAGE"]  # asked above
    missing = [p for p in needed if await _schema_usage(conn, our_schema, p) is False]
    if missing:
        out.append(Lack(f"{' and '.join(missing)} on schema {our_schema}",
                        "to create its own tables there" if migrating else
                        "where its own tables are",
                        f"GRANT {', '.join(missing)} ON SCHEMA {quote_ident(our_schema)} TO {r};"))
    if migrating and ours[0][1] is None and not await has(j.id_column, "REFERENCES"):
        out.append(Lack(f"REFERENCES on {j.table} ({j.id_column})",
                        f"for the foreign key of {cfg.cancel.requests_table}",
                        f"GRANT REFERENCES ({quote_ident(j.id_column)}) ON {t} TO {r};"))
    for name, found in ours:
        if found is not None and not found.ours:
            out.append(Lack(f"ownership of {name} (owned by {shown_role(found.owner)})",
                            "the daemon's role owns its own tables",
                            f"run `rq-reconciler migrate` as it, or ALTER TABLE "
                            f"{quote_ident(name)} OWNER TO {r};"))
    return role, out


async def privilege_lines(conn: asyncpg.Connection, cfg: Config) -> list[Line]:
    """A FAIL line per privilege the daemon's role (the connection's) lacks, each with the
    GRANT that gives it; one OK line if it lacks none."""
    role, lacks = await lacking(conn, cfg)
    who = f"role {shown_role(role)}"
    if lacks:
        return [Line("FAIL", "privileges", f"{who} lacks {x.what} ({x.why}). Fix: {x.fix}")
                for x in lacks]
    j = cfg.jobs
    return [Line("OK", "privileges", f"{who} holds what the daemon uses: USAGE on the "
                 f"schemas, SELECT and UPDATE ({', '.join(_written_columns(cfg))}) on "
                 f"{j.table}, and owns its own tables")]


async def startup_problems(conn: asyncpg.Connection, cfg: Config) -> list[Line]:
    """The FAIL lines of what `check` says of the jobs table, its columns and the daemon's
    privileges: what `run` refuses to start with, and says after a statement was refused."""
    fails = [ln for ln in await privilege_lines(conn, cfg) if ln.level == "FAIL"]
    jobs = await find_table(conn, cfg.jobs.table)
    if jobs is None:
        if not fails:
            fails.append(Line("FAIL", "jobs table", f"{cfg.jobs.table!r} does not exist in "
                              "this database; set jobs.table (schema-qualified if needed, names "
                              "are case-sensitive)"))
        return fails
    return [ln for ln in await column_lines(conn, cfg, jobs) if ln.level == "FAIL"] + fails


def one_line(fails: list[Line]) -> str:
    """The first problem, as the single line a command that cannot work ends with."""
    first = fails[0]
    more = f" (and {len(fails) - 1} more: run `rq-reconciler check`)" if len(fails) > 1 else ""
    return f"{first.what}: {first.message}{more}"
