"""The jobs table's statements, as text: the sweep's pages, the lookups of rows, the
guarded batch UPDATE with its audit rows, the first-seen table's upkeep; and how a row
they read becomes an `ActiveRow`.

Pure: builds SQL from the configured names, never runs it (jobs_table.Store runs it,
indexes EXPLAINs it). Identifiers arrive quoted (`Names`), the configured status words as
string constants; every other value must stay a bind parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reconciler.config import Config, quote_ident
from reconciler.model import ActiveRow, JobRow
from reconciler.pgpool import Names


def _string_constant(text: str) -> str:
    """An SQL string constant for `text` that reads the same whatever
    standard_conforming_strings says (a backslash is an escape only in E'' form)."""
    quoted = text.replace("'", "''")
    if "\\" in text:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


def active_predicate(cfg: Config, alias: str = "t") -> str:
    """`<alias>.status IN ('queued', 'running')` with the configured words as constants:
    the sweep's page condition, and the predicate of the partial index `check`
    recommends (the planner matches the two)."""
    words = ", ".join(_string_constant(w) for w in cfg.jobs.statuses.active)
    col = quote_ident(cfg.jobs.status_column)
    return f"{alias}.{col} IN ({words})" if alias else f"{col} IN ({words})"



def active_row(rec: Sequence[Any]) -> ActiveRow:
    # By position (id, rq_id, status, started_at, first_seen, age: the SELECT's order of
    # row_select): once per active row in a sweep.
    return ActiveRow(
        JobRow(rec[0], rec[1] or None, rec[2], rec[3], rec[4]),
        float(rec[5] or 0.0),
    )


def _started(n: Names) -> str:
    return f"t.{n.started}" if n.started else "NULL::timestamptz"


# A timestamptz PostgreSQL holds but Python's datetime cannot: '-infinity', 'infinity', and
# years past 9999 (asyncpg fails to decode those, outside any SQL error). What a row reads
# is clamped to what Python holds, and its age is computed from the clamped time:
# '-infinity' (or year 1) is "very old" (about 64 billion seconds: min_age has passed, and
# the row counts as stuck), a time in the future (up to 'infinity') is "just now" (age 0:
# min_age counts from when it is reached). Unclamped, `now() - '-infinity'` fails the
# whole statement ("cannot subtract infinite timestamps"), for every row of the page.
_EARLIEST = "'0001-01-01 00:00:00+00'::timestamptz"
_LATEST = "'9999-12-31 00:00:00+00'::timestamptz"


def readable_time(expr: str) -> str:
    """`expr` (a timestamptz) clamped to what Python's datetime holds; NULL stays NULL."""
    return f"CASE WHEN {expr} IS NOT NULL THEN greatest(least({expr}, {_LATEST}), {_EARLIEST}) END"


def age_seconds(started: str, first_seen: str) -> str:
    """Seconds since `started` (else `first_seen`, else now): 0 for a time in the future,
    finite for an infinite one (see _EARLIEST)."""
    since = f"greatest(least(coalesce({started}, {first_seen}, now()), now()), {_EARLIEST})"
    return f"extract(epoch FROM now() - {since})::float8"


def row_select(n: Names) -> str:
    """A job row as `active_row` reads it, up to its WHERE (the jobs table is `t`)."""
    t, cid, crq, cst, started = n.jobs, n.id, n.rq_id, n.status, _started(n)
    return (
        f"SELECT t.{cid} AS id, t.{crq}::text AS rq_id, t.{cst} AS status, "
        f"{readable_time(started)} AS started_at, {readable_time('f.first_seen')} AS first_seen, "
        f"{age_seconds(started, 'f.first_seen')} AS age "
        f"FROM {t} t LEFT JOIN {n.first_seen} f ON f.job_id = t.{cid}::text "
    )


def read_queries(n: Names, id_type: str, active: str, select: str) -> dict[str, str]:
    """The sweep's pages and the lookups of rows by id, by RQ id and by recent cancel.

    The active statuses are written into the statement (`active`), not bound: a jobs table
    holds years of finished rows, and only a partial index on the active ones (the one
    `check` recommends) keeps a page from reading them. The planner can use a partial
    index only if it can prove the query's condition implies the index's, which it cannot
    do for a parameter once asyncpg's prepared statement switches to a generic plan (after
    five runs). The words come from the config, as quoted literals."""
    t, cid, crq, cst, started = n.jobs, n.id, n.rq_id, n.status, _started(n)
    # A page is limited first and joined after: with the join inside, the planner may
    # hash the (small) first-seen table and then sort every active row after the
    # cursor to take 1,000 of them, for each page: quadratic in the active rows.
    page = (
        f"SELECT p.id, p.rq_id, p.status, {readable_time('p.started_at')} AS started_at, "
        f"{readable_time('f.first_seen')} AS first_seen, "
        f"{age_seconds('p.started_at', 'f.first_seen')} AS age "
        f"FROM (SELECT t.{cid} AS id, t.{crq}::text AS rq_id, t.{cst} AS status, "
        f"{started} AS started_at FROM {t} t WHERE {{where}} ORDER BY t.{cid} LIMIT $1) p "
        f"LEFT JOIN {n.first_seen} f ON f.job_id = p.id::text ORDER BY p.id"
    )
    cancelled = (
        f"WHERE t.{cid} IN (SELECT r.job_id FROM {n.requests} r WHERE r.outcome = 'cancelled' "
        f"AND r.done_at > now() - make_interval(secs => $1)) AND t.{cst} = $2 "
        f"AND t.{crq} IS NOT NULL ORDER BY t.{cid} LIMIT $3"
    )
    # The ids alone, for finding the row at fault when a page cannot be read whole.
    page_ids = f"SELECT t.{cid} FROM {t} t WHERE {{where}} ORDER BY t.{cid} LIMIT $1"
    return {
        "page_first": page.format(where=active),
        "page_next": page.format(where=f"{active} AND t.{cid} > $2::{id_type}"),
        "page_ids_first": page_ids.format(where=active),
        "page_ids_next": page_ids.format(where=f"{active} AND t.{cid} > $2::{id_type}"),
        "by_rq_ids": select + f"WHERE t.{crq} = ANY($1::text[]) AND t.{cst} = ANY($2::text[])",
        "by_ids": select + f"WHERE t.{cid} = ANY($1::text[]::{id_type}[])",
        "recently_cancelled": select + cancelled,
        "recently_cancelled_ids": f"SELECT t.{cid} FROM {t} t " + cancelled,
    }


def apply_query(n: Names, id_type: str) -> str:
    """The guarded batch UPDATE with its audit rows (Store.apply)."""
    t, cid, cst = n.jobs, n.id, n.status
    sets = [
        f"{cst} = u.to_s",
        f"{n.error} = CASE WHEN u.err = '' THEN t.{n.error} ELSE u.err END",
    ]
    if n.started:
        sets.append(
            f"{n.started} = CASE WHEN u.mark_started "
            f"THEN coalesce(t.{n.started}, u.started_ts, now()) ELSE t.{n.started} END"
        )
    if n.completed:
        sets.append(
            f"{n.completed} = CASE WHEN u.mark_completed "
            f"THEN coalesce(u.completed_ts, now()) ELSE t.{n.completed} END"
        )
    # The batch travels as one JSON document ($2), each change as the array its
    # RowChange tuple is: encoding eleven parallel arrays, or a dict per change, cost
    # more client CPU than the statement costs the server.
    # `t.id = ANY($1)` as well as the join: without it the planner hashes the whole jobs
    # table for every batch when the table is small enough to look cheap to scan (9 of
    # 19 ms for 500 rows in a 20,000-row table); with it, each batch costs index
    # lookups only, however the table grows.
    # `lk` locks the rows to change first, skipping those another transaction holds:
    # one app transaction sitting on one row must not stall a whole batch (nor the
    # daemon) until lock_timeout; those rows come back as locked (false, id) and are
    # decided again later. Rows still in their read status that `lk` did not get are
    # the locked ones; the rest lost their race. The UPDATE finds its rows by the
    # array of locked ids (`got`: one index scan, as before), and the locked ones are
    # looked for only when `lk` got fewer rows than the batch has (a one-time filter):
    # joined to `lk` directly, the UPDATE ran one index probe per row and the lookup a
    # nested-loop anti join, 15 ms against 5 for 500 rows; this way it costs 6.
    # The lock is the one the UPDATE itself takes (NO KEY UPDATE: no key column changes),
    # not FOR UPDATE: an open transaction that inserted a cancel request for the row holds
    # KEY SHARE on it (its foreign key), which FOR UPDATE would skip the row for.
    return f"""
WITH u AS (
    SELECT (b->>0)::{id_type} AS id, b->>1 AS from_s, b->>2 AS to_s, b->>3 AS err,
           b->>4 AS reason, b->>5 AS rq_status, (b->>6)::timestamptz AS started_ts,
           (b->>7)::timestamptz AS completed_ts, (b->>8)::bool AS mark_started,
           (b->>9)::bool AS mark_completed, b->10 AS detail
    FROM jsonb_array_elements($2::jsonb) AS b
), lk AS (
    SELECT t.{cid} AS id FROM {t} t JOIN u ON t.{cid} = u.id AND t.{cst} = u.from_s
    WHERE t.{cid} = ANY($1::text[]::{id_type}[])
    FOR NO KEY UPDATE OF t SKIP LOCKED
), got AS (
    SELECT coalesce(array_agg(id), '{{}}') AS ids, count(*) AS n FROM lk
), upd AS (
    UPDATE {t} t SET {', '.join(sets)}
    FROM u
    WHERE t.{cid} = ANY((SELECT ids FROM got)::{id_type}[]) AND t.{cid} = u.id
      AND t.{cst} = u.from_s
    RETURNING t.{cid} AS id, u.from_s, u.to_s, u.reason, u.rq_status, u.detail
), gone AS (
    DELETE FROM {n.first_seen} f USING upd
    WHERE f.job_id = upd.id::text AND upd.to_s <> ALL($4::text[])
), ev AS (
    INSERT INTO {n.events} (job_id, from_status, to_status, reason, rq_status, detail, actor)
    SELECT upd.id::text, upd.from_s, upd.to_s, upd.reason, nullif(upd.rq_status, ''),
           upd.detail, $3
    FROM upd
    RETURNING job_id
)
SELECT true AS applied, job_id FROM ev
UNION ALL
SELECT false, u.id::text FROM u JOIN {t} t ON t.{cid} = u.id AND t.{cst} = u.from_s
WHERE (SELECT n FROM got) < cardinality($1::text[])
  AND t.{cid} = ANY($1::text[]::{id_type}[]) AND u.id NOT IN (SELECT id FROM lk)
"""


def first_seen_queries(n: Names, id_type: str, active: str) -> dict[str, str]:
    return {
        "first_seen": (
            f"INSERT INTO {n.first_seen} (job_id) SELECT unnest($1::text[]) "
            "ON CONFLICT (job_id) DO NOTHING"
        ),
        # The ids compared in the id column's own type, so that each lookup is one probe of
        # the jobs table's primary key (or of the partial index on its active rows):
        # `t.id::text = f.job_id` read the whole table. Only ids we wrote are in there.
        "prune_first_seen": (
            f"DELETE FROM {n.first_seen} f WHERE NOT EXISTS (SELECT 1 FROM {n.jobs} t "
            f"WHERE t.{n.id} = f.job_id::{id_type} AND {active})"
        ),
    }
