"""A jobs table with history: 200,000 rows of which 1% are active, ANALYZEd.

Every statement the daemon sends to the jobs table (the sweep's pages, the event path's
lookups, the batch UPDATE, the first-seen prune, the cancel-intent read) is EXPLAINed, as
the custom plan and as the generic plan asyncpg's prepared statements switch to, and
must read no part of the jobs table by a sequential scan once the index `check`
recommends is there. Without it, `check` says so and prints the CREATE INDEX that fixes
it, and the sweep's page plan is seen to read finished rows. `migrate` builds no index on
the application's table. (How fast: bench/history_table.py, on 10M rows.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.config import load
from reconciler.devstack import Pg, run_cli, write_config
from reconciler.devstack.explain import explain_store_queries
from reconciler.indexes import active_index_sql

ROWS = 200_000
ACTIVE_EVERY = 100  # 1% active, spread over the whole table (stuck old rows too)
FIRST_SEEN = 500  # active rows without started_at the daemon has seen


def _jobs_indexes(pg: Pg) -> set[str]:
    return {str(r["indexdef"]) for r in pg.fetch(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'training_jobs'")}


@pytest.fixture
def history(pg_dsn: str, redis_url: str, tmp_path: Path) -> Path:
    """The table loaded (ids 1..ROWS, every 100th active, a third of those queued without
    started_at), migrated, some first-seen rows and cancel requests, ANALYZEd."""
    cfg = write_config(tmp_path / "c.toml", redis_url, pg_dsn)
    with Pg(pg_dsn) as pg:
        pg.execute(
            "INSERT INTO training_jobs (rq_job_id, status, error_message, started_at, completed_at) "
            f"SELECT 'rq-' || g, CASE WHEN g % {ACTIVE_EVERY} = 0 THEN "
            "  (CASE WHEN g % 3 = 0 THEN 'queued' ELSE 'running' END) "
            "  ELSE (ARRAY['completed', 'failed', 'cancelled'])[g % 3 + 1] END, "
            "CASE WHEN g % 100 <> 0 THEN 'Synced: RQ finished' END, "
            "CASE WHEN g % 300 <> 0 THEN now() - interval '1 day' END, "
            "CASE WHEN g % 100 <> 0 THEN now() END "
            f"FROM generate_series(1, {ROWS}) g")
        before = _jobs_indexes(pg)
    assert run_cli(cfg, "migrate").returncode == 0
    with Pg(pg_dsn) as pg:
        assert _jobs_indexes(pg) == before, "migrate built an index on the app's table"
        pg.execute("INSERT INTO rq_reconciler_first_seen (job_id) SELECT id::text FROM "
                   f"training_jobs WHERE status = 'queued' AND started_at IS NULL LIMIT {FIRST_SEEN}")
        pg.execute("INSERT INTO rq_reconciler_cancel_requests (job_id, state, outcome, done_at) "
                   "SELECT id, 'done', 'cancelled', now() - interval '1 day' FROM training_jobs "
                   "WHERE status = 'cancelled' LIMIT 2000")
        pg.execute("VACUUM ANALYZE")
    return cfg


def _index_lines(out: str) -> dict[str, str]:
    return {what: ln for ln in out.splitlines()
            for what in ("active rows index", "rq id index") if f" {what}: " in ln}


def test_every_jobs_query_is_index_driven_with_the_recommended_index(history: Path) -> None:
    cfg = load(history)
    p = run_cli(history, "check")
    lines = _index_lines(p.stdout)
    statement = active_index_sql(cfg)
    assert lines["active rows index"].startswith("WARN active rows index: "), p.stdout
    assert lines["active rows index"].endswith(f"Fix: {statement}")
    assert "CREATE INDEX CONCURRENTLY" in statement and "WHERE \"status\" IN ('queued', 'running')" \
        in statement
    assert lines["rq id index"].startswith("OK   rq id index: "), p.stdout
    # Without it, a sweep page walks the finished rows (the check's reason), and so would
    # every page of the generic plan.
    pages = [e for e in explain_store_queries(cfg.postgres.dsn, cfg) if e.name == "page_next"]
    assert all(e.seq_scans("training_jobs") or "Filter" in str(e.plan) for e in pages)

    sql = run_cli(history, "migrate", "--print-sql").stdout
    assert f"-- {statement}" in sql
    with Pg(cfg.postgres.dsn) as pg:
        pg.execute(statement)  # what check printed, as a DBA would run it
        pg.execute("ANALYZE training_jobs")

    p = run_cli(history, "check")
    lines = _index_lines(p.stdout)
    assert lines["active rows index"].startswith("OK   active rows index: "), p.stdout
    assert "training_jobs_rq_reconciler_active_idx" in lines["active rows index"]
    assert f"-- {statement}" in run_cli(history, "migrate", "--print-sql").stdout  # (config alone)

    explained = explain_store_queries(cfg.postgres.dsn, cfg)
    names = {e.name for e in explained}
    assert {"page_first", "page_next", "by_rq_ids", "by_ids", "apply", "prune_first_seen",
            "recently_cancelled", "intents", "job_status", "first_seen"} <= names
    scans = {(e.name, e.mode): e.seq_scans("training_jobs") for e in explained}
    assert {k: v for k, v in scans.items() if v} == {}, \
        {f"{e.name}/{e.mode}": e.summary("training_jobs") for e in explained}
    # The pages go through the partial index, never the primary key over history.
    for e in explained:
        if e.name.startswith("page_"):
            assert "training_jobs_rq_reconciler_active_idx" in e.summary("training_jobs"), e.plan


def test_rq_id_index_missing_is_reported_with_its_fix(history: Path) -> None:
    cfg = load(history)
    with Pg(cfg.postgres.dsn) as pg:
        pg.execute("DROP INDEX training_jobs_rq_job_id_idx")
    p = run_cli(history, "check")
    line = _index_lines(p.stdout)["rq id index"]
    assert line.startswith("WARN rq id index: no index leads with rq_job_id"), p.stdout
    assert line.endswith('Fix: CREATE INDEX CONCURRENTLY IF NOT EXISTS "training_jobs_rq_job_id_idx" '
                         'ON "training_jobs" ("rq_job_id");')
    # The event path's lookup then reads the whole table (generic plan: no estimate of the
    # array to argue with).
    explained = explain_store_queries(cfg.postgres.dsn, cfg)
    assert any(e.seq_scans("training_jobs") for e in explained if e.name == "by_rq_ids")


def test_first_seen_prune_probes_the_jobs_table_by_id(history: Path) -> None:
    """The prune compares ids in the id column's type, so each first-seen row can be one
    key lookup (`t.id::text = f.job_id` could only be answered by reading the table or a
    whole index: no index holds id::text)."""
    cfg = load(history)
    [prune] = [e for e in explain_store_queries(cfg.postgres.dsn, cfg, settings=(
        "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"))
        if e.name == "prune_first_seen" and e.mode == "generic"]
    conds = [str(n.get("Index Cond", "")) for n in prune.nodes()
             if n.get("Relation Name") == "training_jobs"]
    assert any("(id = (f.job_id)::bigint)" in c for c in conds), prune.plan

