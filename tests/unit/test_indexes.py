"""The index advice: the statement it recommends, and how it reads a page query's plan."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.config import from_mapping
from reconciler.indexes import _page_plan_problem, active_index_sql, rq_id_index_sql
from reconciler.jobs_sql import active_predicate


def test_recommended_indexes_name_the_configured_table_columns_and_words() -> None:
    cfg = from_mapping({"jobs": {"table": "app.Jobs", "id_column": "job_pk", "status_column": "state",
                                 "rq_id_column": "rq",
                                 "statuses": {"queued": "waiting", "running": "it's on"}}},
                       environ={})
    assert active_index_sql(cfg) == (
        'CREATE INDEX CONCURRENTLY IF NOT EXISTS "Jobs_rq_reconciler_active_idx" ON "app"."Jobs" '
        '("job_pk") WHERE "state" IN (\'waiting\', \'it\'\'s on\');')
    assert rq_id_index_sql(cfg) == (
        'CREATE INDEX CONCURRENTLY IF NOT EXISTS "Jobs_rq_idx" ON "app"."Jobs" ("rq");')


def test_a_backslash_in_a_status_word_reads_the_same_under_either_string_setting() -> None:
    cfg = from_mapping({"jobs": {"statuses": {"running": "run\\ning"}}}, environ={})
    assert active_predicate(cfg) == "t.\"status\" IN ('queued', E'run\\\\ning')"


def _scan(kind: str, **extra: Any) -> dict[str, Any]:
    return {"Node Type": kind, "Relation Name": "training_jobs", "Alias": "t", **extra}


def _limit(*plans: dict[str, Any]) -> dict[str, Any]:
    return {"Node Type": "Limit", "Plans": list(plans)}


@pytest.mark.parametrize(("plan", "problem"), [
    (_limit(_scan("Index Scan", **{"Index Name": "active_idx"})), ""),
    # A sort of the limited page, joined to first-seen afterwards, is fine.
    ({"Node Type": "Sort", "Plans": [_limit(_scan("Index Scan", **{"Index Name": "a"}))]}, ""),
    (_limit(_scan("Seq Scan")), "it reads the whole table"),
    (_limit(_scan("Index Scan", **{"Index Name": "training_jobs_pkey", "Filter": "(status = ...)"})),
     "it walks index training_jobs_pkey over finished rows too"),
    (_limit({"Node Type": "Sort", "Plans": [_scan("Index Scan", **{"Index Name": "status_id"})]}),
     "it sorts every active row for each page"),
    # A partition of the jobs table, and our own table beside it (not judged).
    (_limit(_scan("Seq Scan", Alias="t_1")), "it reads the whole table"),
    (_limit({"Node Type": "Seq Scan", "Relation Name": "rq_reconciler_first_seen", "Alias": "f"}),
     ""),
])
def test_page_plan_problem(plan: dict[str, Any], problem: str) -> None:
    assert _page_plan_problem(plan) == problem
