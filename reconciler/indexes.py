"""The indexes rq-reconciler's queries need on the application's jobs table.

A jobs table holds years of finished rows and a few thousand active ones. The sweep
reads the active rows in keyset pages (`status IN (...) ORDER BY id`), and the event path
looks rows up by RQ id; without the right index each page, and each burst of events,
reads the whole table. `check` says which index is missing and prints the `CREATE INDEX
CONCURRENTLY` that adds it; `migrate --print-sql` prints both. Nothing here builds one: the table is
the application's, and an index on a large table is its DBA's call (CONCURRENTLY does
not block writes, but it takes time and cannot run inside a transaction).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from reconciler.config import Config, derived_ident, quote_ident
from reconciler.jobs_sql import active_predicate, read_queries, row_select
from reconciler.pgpool import Names

# The alias the store's statements give the jobs table (partitions: t_1, t_2, ...).
_JOBS_ALIAS = "t"


@dataclass(frozen=True)
class IndexAdvice:
    what: str  # "active rows index", "rq id index"
    ok: bool
    message: str  # what was found (and what it costs when missing)
    statement: str  # the CREATE INDEX CONCURRENTLY that provides it


def _bare(name: str) -> str:
    return name.rpartition(".")[2]


def active_index_sql(cfg: Config) -> str:
    """A partial index on the id over the active statuses: a sweep page is then one range
    of this (small) index, however many finished rows the table holds."""
    j = cfg.jobs
    name = derived_ident(_bare(j.table), "_rq_reconciler_active_idx")
    return (f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {quote_ident(name)} ON "
            f"{quote_ident(j.table)} ({quote_ident(j.id_column)}) "
            f"WHERE {active_predicate(cfg, alias='')};")


def rq_id_index_sql(cfg: Config) -> str:
    j = cfg.jobs
    name = derived_ident(_bare(j.table), f"_{j.rq_id_column}_idx")
    return (f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {quote_ident(name)} ON "
            f"{quote_ident(j.table)} ({quote_ident(j.rq_id_column)});")


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _is_jobs(node: dict[str, Any]) -> bool:
    alias = str(node.get("Alias", ""))
    return "Relation Name" in node and (alias == _JOBS_ALIAS or alias.startswith(_JOBS_ALIAS + "_"))


def _page_plan_problem(plan: dict[str, Any]) -> str:
    """Why a plan of the sweep's page query reads more than the active rows ('' if it
    does not): a sequential scan, an index scan that filters rows out (it walks finished
    rows too), or a sort (every active row read and sorted for each page)."""
    for node in _nodes(plan):
        kind = node.get("Node Type", "")
        if kind == "Sort":
            below = list(_nodes(node))[1:]
            # Sorting a limited page is fine; sorting the table's rows to find it is not.
            if not any(n.get("Node Type") == "Limit" for n in below) and any(
                    _is_jobs(n) for n in below):
                return "it sorts every active row for each page"
        if not _is_jobs(node):
            continue
        if kind == "Seq Scan":
            return "it reads the whole table"
        if "Filter" in node:
            index = node.get("Index Name")
            return (f"it walks index {index} over finished rows too" if index
                    else "it reads rows it then discards")
    return ""


def _indexes_used(plan: dict[str, Any]) -> list[str]:
    """The indexes through which the jobs table is read (a bitmap scan's are its children)."""
    names: list[str] = []
    for node in _nodes(plan):
        if _is_jobs(node):
            names += [str(n["Index Name"]) for n in _nodes(node) if "Index Name" in n]
    return sorted(set(names))


async def _id_type(conn: asyncpg.Connection, cfg: Config) -> str | None:
    found = await conn.fetchval(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
        quote_ident(cfg.jobs.table), cfg.jobs.id_column)
    return None if found is None else str(found)


async def _queries(conn: asyncpg.Connection, cfg: Config, id_type: str) -> dict[str, str]:
    """The sweep's and the lookups' statements (jobs_sql, as the store runs them); before
    `migrate` has made our first-seen table, which they join, the same reads without it
    (the jobs table is read the same way)."""
    names = Names.of(cfg)
    queries = read_queries(names, id_type, active_predicate(cfg), row_select(names))
    if await conn.fetchval("SELECT to_regclass($1)", quote_ident(cfg.first_seen_table)) is None:
        j = cfg.jobs
        t, cid = quote_ident(j.table), quote_ident(j.id_column)
        queries["page_first"] = (f"SELECT t.{cid} FROM {t} t WHERE {active_predicate(cfg)} "
                                 f"ORDER BY t.{cid} LIMIT $1")
        queries["by_rq_ids"] = (f"SELECT t.{cid} FROM {t} t WHERE t.{quote_ident(j.rq_id_column)} "
                                f"= ANY($1::text[]) AND t.{quote_ident(j.status_column)} "
                                "= ANY($2::text[])")
    return queries


async def _plan(conn: asyncpg.Connection, sql: str, args: list[Any],
                settings: str) -> dict[str, Any]:
    """The plan of `sql` under `settings` (SET LOCALs), in a read-only transaction that is
    rolled back."""
    tr = conn.transaction(readonly=True)
    await tr.start()
    try:
        await conn.execute(settings)
        raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    finally:
        await tr.rollback()
    doc = json.loads(raw) if isinstance(raw, str) else raw
    return dict(doc[0]["Plan"])


async def active_index_advice(conn: asyncpg.Connection, cfg: Config) -> IndexAdvice:
    """Ask the planner how it would run a sweep page on a large table: with sequential
    scans, bitmap scans and sorts priced out, as they are once the table is large, a
    plan that still filters or sorts shows that no index selects the active rows in id
    order. (A small table is scanned whatever indexes it has: its statistics alone would
    say nothing.)"""
    statement = active_index_sql(cfg)
    id_type = await _id_type(conn, cfg)
    if id_type is None:
        return IndexAdvice("active rows index", False,
                           f"{cfg.jobs.table}.{cfg.jobs.id_column} not found", statement)
    plan = await _plan(conn, (await _queries(conn, cfg, id_type))["page_first"],
                       [cfg.sweep.page_size],
                       "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; "
                       "SET LOCAL enable_sort = off")
    problem = _page_plan_problem(plan)
    rows = await conn.fetchval("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)",
                               quote_ident(cfg.jobs.table))
    size = f" (about {int(rows):,} rows)" if rows is not None and rows > 0 else ""
    if problem:
        return IndexAdvice("active rows index", False,
                           f"no index on {cfg.jobs.table}{size} selects the active rows in "
                           f"{cfg.jobs.id_column} order: each sweep page costs what the whole "
                           f"table does ({problem})", statement)
    used = _indexes_used(plan)
    return IndexAdvice("active rows index", True,
                       f"sweep pages read only active rows ({', '.join(used)})", statement)


async def rq_id_index_advice(conn: asyncpg.Connection, cfg: Config) -> IndexAdvice:
    """The event path looks rows up by RQ id (`= ANY($1)`): the planner must be able to
    find them through an index condition on that column (sequential scans priced out,
    as on a large table)."""
    j = cfg.jobs
    statement = rq_id_index_sql(cfg)
    id_type = await _id_type(conn, cfg)
    if id_type is None:
        return IndexAdvice("rq id index", False, f"{j.table}.{j.id_column} not found", statement)
    s = cfg.jobs.statuses
    plan = await _plan(conn, (await _queries(conn, cfg, id_type))["by_rq_ids"],
                       [["rq-reconciler-check"], [*s.active, s.cancelled]],
                       "SET LOCAL enable_seqscan = off")
    found = any(j.rq_id_column in str(n.get("Index Cond", "")) for n in _nodes(plan))
    if found:
        used = _indexes_used(plan)
        return IndexAdvice("rq id index", True,
                           f"rows are found by {j.rq_id_column} through {', '.join(used)}", statement)
    return IndexAdvice("rq id index", False,
                       f"no index leads with {j.rq_id_column}: every burst of Redis events "
                       "costs a scan of the whole table", statement)


async def advise(conn: asyncpg.Connection, cfg: Config) -> list[IndexAdvice]:
    return [await active_index_advice(conn, cfg), await rq_id_index_advice(conn, cfg)]


def print_sql_section(cfg: Config) -> str:
    """What `migrate --print-sql` adds after our own schema, from the config alone: the
    indexes the jobs table should have, as comments (`check` says which it lacks; run each
    yourself: CONCURRENTLY cannot run in a transaction)."""
    return (f"-- Indexes on the application's table {cfg.jobs.table}: `rq-reconciler migrate` "
            "never builds one.\n"
            "-- `rq-reconciler check` says which of these your table lacks (an equivalent index "
            "under\n-- another name does as well); run each on its own, outside a transaction "
            "block (it does not block writes):\n"
            f"-- active rows index (sweep pages):\n-- {active_index_sql(cfg)}\n"
            f"-- rq id index (the event path):\n-- {rq_id_index_sql(cfg)}\n")
