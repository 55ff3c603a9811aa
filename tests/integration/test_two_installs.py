"""Two installs in one schema (two apps, two jobs tables, two cancel-request tables): each
has tables of its own, named after its requests table, so that one's first-seen times,
replica registry and audit trail are never the other's; `migrate` refuses a config that
would mix them; and an install made when the names were shared keeps its data. Real
PostgreSQL and redis-server."""

from __future__ import annotations

from pathlib import Path

from reconciler.devstack import Pg, create_jobs_table, migrate, run_cli, write_config

B_JOBS = {"table": "render_jobs"}
B_CANCEL = {"requests_table": "render_cancel_requests"}
B_TABLES = ["render_cancel_requests_events", "render_cancel_requests_first_seen",
            "render_cancel_requests_replicas", "render_cancel_requests_schema"]
A_TABLES = ["rq_reconciler_events", "rq_reconciler_first_seen", "rq_reconciler_replicas",
            "rq_reconciler_schema"]


def _configs(tmp_path: Path, redis_url: str, pg_dsn: str) -> tuple[Path, Path]:
    create_jobs_table(pg_dsn, "render_jobs")
    sweep = {"min_age_seconds": 60.0}
    a = write_config(tmp_path / "a.toml", redis_url, pg_dsn, sweep=sweep)
    b = write_config(tmp_path / "b.toml", redis_url, pg_dsn, jobs=B_JOBS, cancel=B_CANCEL,
                     sweep=sweep)
    return a, b


def _tables(pg: Pg) -> set[str]:
    return {r["relname"] for r in pg.fetch(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = "
        "'public'::regnamespace")}


def test_two_installs_keep_their_own_tables_and_first_seen_times(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    cfg_a, cfg_b = _configs(tmp_path, redis_url, pg_dsn)
    migrate(cfg_a)
    migrate(cfg_b)
    with Pg(pg_dsn) as pg:
        assert set(A_TABLES + B_TABLES) <= _tables(pg)
        # A saw its job 1 (no RQ id) an hour ago ...
        pg.execute("INSERT INTO rq_reconciler_first_seen (job_id, first_seen) "
                   "VALUES ('1', now() - interval '1 hour')")
        # ... B's own job 1, just inserted, has no RQ id yet either: it is young to B.
        b_job = int(pg.val("INSERT INTO render_jobs (status) VALUES ('running') RETURNING id"))
        assert b_job == 1
    p = run_cli(cfg_b, "sweep", "--json")
    assert p.returncode == 0, p.stderr
    with Pg(pg_dsn) as pg:
        assert pg.val("SELECT status FROM render_jobs WHERE id = 1") == "running"
        assert pg.val("SELECT count(*) FROM render_cancel_requests_first_seen") == 1
        # B's sweep neither read nor pruned A's first-seen row
        assert pg.val("SELECT count(*) FROM rq_reconciler_first_seen") == 1
        assert pg.val("SELECT count(*) FROM rq_reconciler_events") == 0


def test_migrate_refuses_a_config_that_would_share_another_installs_tables(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    cfg_a, _ = _configs(tmp_path, redis_url, pg_dsn)
    migrate(cfg_a)
    # B's config copied A's, changed the jobs table, kept the requests table
    mixed = write_config(tmp_path / "mixed.toml", redis_url, pg_dsn, jobs=B_JOBS)
    p = run_cli(mixed, "migrate")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert lines == [
        "rq-reconciler: rq_reconciler_cancel_requests belongs to the install on jobs table "
        "training_jobs, not render_jobs: give this install a cancel.requests_table of its own "
        "(its other tables are named after it)"], p.stderr
    # And a table marked as another install's is refused by name.
    cfg_b = write_config(tmp_path / "b.toml", redis_url, pg_dsn, jobs=B_JOBS, cancel=B_CANCEL)
    with Pg(pg_dsn) as pg:
        pg.execute("CREATE TABLE render_cancel_requests_replicas (instance text PRIMARY KEY)")
        pg.execute("COMMENT ON TABLE render_cancel_requests_replicas IS "
                   "'rq-reconciler: of the install whose cancel requests are in public.other'")
    p = run_cli(cfg_b, "migrate")
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        "rq-reconciler: render_cancel_requests_replicas belongs to the install whose cancel "
        "requests are in public.other, not render_cancel_requests: give each install a "
        "cancel.requests_table of its own (its other tables are named after it)"], p.stderr


def _as_before(pg: Pg) -> None:
    """B's tables as an install made before they were named after its requests table."""
    for new, old in zip(B_TABLES, A_TABLES, strict=True):
        pg.execute(f"COMMENT ON TABLE {new} IS NULL")
        pg.execute(f"ALTER TABLE {new} RENAME TO {old}")
    pg.execute("ALTER INDEX render_cancel_requests_events_job_idx "
               "RENAME TO rq_reconciler_events_job_idx")
    pg.execute("INSERT INTO rq_reconciler_events (job_id, from_status, to_status, reason, actor) "
               "VALUES ('7', 'running', 'failed', 'orphaned', 'old')")
    pg.execute("INSERT INTO rq_reconciler_first_seen (job_id) VALUES ('8')")


def test_an_install_from_the_shared_names_keeps_its_tables_and_data(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    """Alone in its schema, an install whose requests table is not the default one takes
    its old rq_reconciler_* tables, data and all, under its own names."""
    _, cfg_b = _configs(tmp_path, redis_url, pg_dsn)
    migrate(cfg_b)
    with Pg(pg_dsn) as pg:
        _as_before(pg)
        assert not set(B_TABLES) & _tables(pg)
    p = run_cli(cfg_b, "migrate")
    assert p.returncode == 0, p.stderr
    with Pg(pg_dsn) as pg:
        tables = _tables(pg)
        assert set(B_TABLES) <= tables and not set(A_TABLES) & tables
        assert pg.val("SELECT actor FROM render_cancel_requests_events WHERE job_id = '7'") == "old"
        assert pg.val("SELECT count(*) FROM render_cancel_requests_first_seen") == 1
        assert pg.val("SELECT max(version) FROM render_cancel_requests_schema") >= 3
        assert pg.val("SELECT count(*) FROM pg_indexes WHERE tablename = "
                      "'render_cancel_requests_events'") == 2  # its pkey and job index, no twin
    # the daemon's side finds every table it needs, at the schema version it needs
    p = run_cli(cfg_b, "sweep")
    assert p.returncode == 0, p.stderr


def test_shared_tables_stay_with_the_default_install(
        tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    """Beside the default install, the shared tables are not one install's to take: the
    other install gets fresh tables of its own, and the shared ones stay the default's."""
    cfg_a, cfg_b = _configs(tmp_path, redis_url, pg_dsn)
    migrate(cfg_b)
    with Pg(pg_dsn) as pg:
        _as_before(pg)  # B's old tables, which A's migrate now finds and uses as its own
    migrate(cfg_a)
    migrate(cfg_b)
    with Pg(pg_dsn) as pg:
        assert set(A_TABLES + B_TABLES) <= _tables(pg)
        assert pg.val("SELECT count(*) FROM rq_reconciler_events") == 1
        assert pg.val("SELECT count(*) FROM render_cancel_requests_events") == 0
        mark = pg.val("SELECT obj_description('rq_reconciler_events'::regclass, 'pg_class')")
        assert mark.endswith("public.rq_reconciler_cancel_requests"), mark
