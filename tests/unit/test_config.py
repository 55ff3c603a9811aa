"""Config: every key loads, every mistake names its key, secrets never print."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from reconciler.config import (
    Config,
    ConfigError,
    from_mapping,
    load,
    quote_ident,
    redact,
)

ROOT = Path(__file__).resolve().parents[2]


def test_example_file_loads_and_lists_every_key() -> None:
    cfg = load(str(ROOT / "config.example.toml"), environ={})
    defaults = from_mapping({}, environ={})
    assert cfg.jobs == defaults.jobs
    assert cfg.sweep == defaults.sweep
    raw = tomllib.loads((ROOT / "config.example.toml").read_text())
    for section in ("redis", "postgres", "jobs", "cancel", "sweep", "metrics", "log"):
        obj = getattr(defaults, section)
        for f in fields(obj):
            if f.name == "statuses":
                assert set(raw["jobs"]["statuses"]) == {g.name for g in fields(obj.statuses)}
                continue
            assert f.name in raw[section], f"config.example.toml lacks {section}.{f.name}"
    # instance.name defaults to the hostname plus host identity; documented as a comment
    assert "# name = " in (ROOT / "config.example.toml").read_text()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"jobs": {"table": "jobs; DROP TABLE x"}}, "jobs.table"),
        ({"jobs": {"table": "a.b.c"}}, "jobs.table"),
        ({"jobs": {"status_column": 'st"atus'}}, "jobs.status_column"),
        ({"jobs": {"rq_id_column": "1abc"}}, "jobs.rq_id_column"),
        ({"jobs": {"started_at_column": "x y"}}, "jobs.started_at_column"),
        ({"cancel": {"requests_table": "r--"}}, "cancel.requests_table"),
        ({"cancel": {"channel": "a-b"}}, "cancel.channel"),
        ({"cancel": {"orphaned_horse": "maybe"}}, "cancel.orphaned_horse"),
        ({"cancel": {"grace_seconds": -1}}, "cancel.grace_seconds"),
        ({"cancel": {"grace_seconds": "ten"}}, "cancel.grace_seconds"),
        ({"redis": {"keyspace_events": "yes"}}, "redis.keyspace_events"),
        ({"redis": {"url": "http://x"}}, "redis.url"),
        ({"redis": {"nope": 1}}, "redis.nope"),
        ({"postgres": {"pool_size": 0}}, "postgres.pool_size"),
        ({"postgres": {"pool_size": 1}}, "postgres.pool_size"),
        ({"postgres": {"pool_size": True}}, "postgres.pool_size"),
        ({"sweep": {"max_orphan_fraction": 1.5}}, "sweep.max_orphan_fraction"),
        ({"sweep": {"interval_seconds": 0}}, "sweep.interval_seconds"),
        ({"metrics": {"listen": "nowhere"}}, "metrics.listen"),
        ({"log": {"level": "loud"}}, "log.level"),
        ({"jobs": {"statuses": {"failed": "completed"}}}, "jobs.statuses.failed"),
        ({"jobs": {"statuses": {"queued": ""}}}, "jobs.statuses.queued"),
        ({"jobs": {"statuses": {"paused": "p"}}}, "jobs.statuses.paused"),
        ({"bogus": {}}, "bogus"),
        ({"jobs": "training_jobs"}, "jobs"),
    ],
)
def test_errors_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(raw, environ={})
    assert err.value.key == key
    assert key in str(err.value)


def test_env_overrides_secrets() -> None:
    cfg = from_mapping({}, environ={"RQ_RECONCILER_REDIS_URL": "redis://:s3cret@h:1/2",
                                    "RQ_RECONCILER_POSTGRES_DSN": "postgresql://u:pw@h/db"})
    assert cfg.redis.url == "redis://:s3cret@h:1/2"
    assert cfg.postgres.dsn == "postgresql://u:pw@h/db"


def test_redact() -> None:
    assert redact("redis://:s3cret@h:1/2") == "redis://:***@h:1/2"
    assert redact("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert "pw" not in redact("host=h password=pw dbname=x")


def test_quote_ident() -> None:
    assert quote_ident("app.training_jobs") == '"app"."training_jobs"'
    assert quote_ident("id") == '"id"'


def test_schema_qualified_tables_and_optional_columns() -> None:
    cfg = from_mapping({"jobs": {"table": "app.jobs", "started_at_column": ""},
                        "cancel": {"requests_table": "ops.cancels"}}, environ={})
    assert cfg.jobs.started_at_column == ""
    # our other tables are named after the requests table, beside it
    assert cfg.events_table == "ops.cancels_events"
    assert cfg.first_seen_table == "ops.cancels_first_seen"
    assert cfg.replicas_table == "ops.cancels_replicas"
    assert cfg.version_table == "ops.cancels_schema"
    # ... and the default one keeps the names installs always had
    default = from_mapping({"cancel": {"requests_table": "ops.rq_reconciler_cancel_requests"}},
                           environ={})
    assert (default.events_table, default.first_seen_table, default.replicas_table,
            default.version_table) == ("ops.rq_reconciler_events", "ops.rq_reconciler_first_seen",
                                       "ops.rq_reconciler_replicas", "ops.rq_reconciler_schema")


def test_defaults_are_the_spec() -> None:
    cfg = Config()
    assert cfg.sweep.interval_seconds == 300
    assert cfg.sweep.min_age_seconds == 60
    assert cfg.sweep.max_orphan_fraction == 0.5
    assert cfg.sweep.max_orphan_min == 20
    assert cfg.cancel.grace_seconds == 10
    assert cfg.cancel.channel == "rq_reconciler_cancel"
    assert cfg.metrics.listen == "127.0.0.1:9464"


@pytest.mark.parametrize("cmd", ["run", "sweep", "check", "migrate"])
def test_cli_exits_2_on_bad_config_before_connecting(tmp_path: Path, cmd: str) -> None:
    bad = tmp_path / "c.toml"
    # Backends that do not exist: exit 2 proves nothing tried to connect first.
    bad.write_text('[redis]\nurl = "redis://127.0.0.1:1/0"\n[jobs]\ntable = "x; drop"\n')
    p = subprocess.run([sys.executable, "-m", "reconciler", cmd, "--config", str(bad)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "jobs.table" in p.stderr


def test_cli_missing_file_and_bad_toml(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "reconciler", "check", "--config",
                        str(tmp_path / "nope.toml")], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "does not exist" in p.stderr
    bad = tmp_path / "c.toml"
    bad.write_text("[redis\n")
    p = subprocess.run([sys.executable, "-m", "reconciler", "check", "--config", str(bad)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "not valid TOML" in p.stderr


@pytest.mark.parametrize(("listen", "host_port"), [
    ("19464", ("127.0.0.1", 19464)),  # a port alone: loopback, never every interface
    (" 9464 ", ("127.0.0.1", 9464)),
    (":9464", ("0.0.0.0", 9464)),  # an empty host, written out: every IPv4 interface
    ("0.0.0.0:9464", ("0.0.0.0", 9464)),
    ("localhost:9464", ("localhost", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    ("[::]:0", ("::", 0)),
])
def test_metrics_listen_forms(listen: str, host_port: tuple[str, int]) -> None:
    cfg = from_mapping({"metrics": {"listen": listen}}, environ={})
    assert cfg.metrics.host_port == host_port


@pytest.mark.parametrize("listen", ["nowhere", "h:", "h:70000", "::1:9464", "h:-1", ""])
def test_metrics_listen_mistakes(listen: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping({"metrics": {"listen": listen}}, environ={})
    assert err.value.key == "metrics.listen"
