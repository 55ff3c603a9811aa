"""deploy/compose/: compose.yaml passes the Compose Specification's JSON schema (as vendored
by check-jsonschema, offline) and what it references holds together: the daemon shares
the worker's PID namespace, uid and hostname; files, build contexts and services named
exist; its config.toml is one the daemon accepts. No container is started (the images
it names come from a registry this machine cannot reach; tests/deploy/test_container.py
runs the daemon's image, tests/faults/test_pod_layouts.py the shared-PID layout)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from reconciler import config as rconfig

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())  # resolves the << merge keys, as Compose does
    assert isinstance(doc, dict)
    return doc


def _schema() -> dict[str, Any]:
    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(ref.read_text())
    return schema


def test_compose_file_passes_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(_schema()).validate(compose)


def test_schema_catches_a_mistake(compose: dict[str, Any]) -> None:
    # The validation is not vacuous: a misspelt key fails it.
    bad = json.loads(json.dumps(compose))
    bad["services"]["reconciler"]["pids"] = bad["services"]["reconciler"].pop("pid")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(_schema()).validate(bad)


def test_daemon_shares_the_workers_pid_namespace_uid_and_hostname(compose: dict[str, Any]) -> None:
    services = compose["services"]
    sharing = {name: s for name, s in services.items() if str(s.get("pid", "")).startswith("service:")}
    assert sharing, "no service shares another's PID namespace"
    for name, svc in sharing.items():
        target = svc["pid"].split(":", 1)[1]
        assert target in services, f"{name}: pid names unknown service {target!r}"
        worker = services[target]
        assert "rq" in worker["command"] and "worker" in worker["command"], target
        assert svc.get("user") and svc["user"] == worker.get("user"), (
            f"{name} must run as {target}'s uid to signal its horses")
        assert svc.get("hostname") and svc["hostname"] == worker.get("hostname"), (
            f"{name} must share {target}'s hostname, or the worker looks remote")
        assert worker.get("init") is True  # the worker's death must not end the namespace
        assert name == "reconciler"
        cfg = rconfig.load(str(COMPOSE_DIR / "config.toml"), environ={})
        assert cfg.instance.name == worker["hostname"]


def test_daemon_is_hardened_like_the_systemd_unit(compose: dict[str, Any]) -> None:
    for name in ("reconciler", "migrate"):
        svc = compose["services"][name]
        assert svc["read_only"] is True
        assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc
        assert "no-new-privileges:true" in svc["security_opt"]
        assert "/tmp" in svc["tmpfs"]
        assert "privileged" not in svc


def test_references_resolve(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep, cond in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep] or dep in ("reconciler",), (
                    f"{name} waits for {dep} to be healthy, which has no healthcheck")
            if cond.get("condition") == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot"
        build = svc.get("build")
        if build:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"
            assert context == REPO
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (COMPOSE_DIR / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in compose.get("volumes", {}), f"{name}: unknown volume {src}"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["reconciler"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_secrets_come_from_the_environment_and_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["reconciler"]["environment"]
    assert set(env) == {rconfig.ENV_REDIS_URL, rconfig.ENV_POSTGRES_DSN}
    assert services["migrate"]["environment"] == env
    text = (COMPOSE_DIR / "config.toml").read_text()
    assert "redis://" not in text and "postgresql://" not in text  # no secrets in the file
    cfg = rconfig.load(str(COMPOSE_DIR / "config.toml"), environ=dict(env))
    assert cfg.redis.url == env[rconfig.ENV_REDIS_URL]
    assert cfg.metrics.host_port == ("0.0.0.0", 9464)
    app = services["app"]["environment"]
    assert app["DATABASE_URL"] == env[rconfig.ENV_POSTGRES_DSN]
    assert app["REDIS_URL"] == env[rconfig.ENV_REDIS_URL]
    worker_cmd = services["worker"]["command"]
    assert worker_cmd[worker_cmd.index("--url") + 1] == env[rconfig.ENV_REDIS_URL]
    db = services["db"]["environment"]
    assert f"{db['POSTGRES_USER']}:{db['POSTGRES_PASSWORD']}@db:5432/{db['POSTGRES_DB']}" in (
        env[rconfig.ENV_POSTGRES_DSN])


def test_redis_has_the_keyspace_flags_the_config_requires(compose: dict[str, Any]) -> None:
    cmd = compose["services"]["redis"]["command"]
    flags = cmd[cmd.index("--notify-keyspace-events") + 1]
    cfg = rconfig.load(str(COMPOSE_DIR / "config.toml"), environ={})
    assert cfg.redis.keyspace_events == "require"
    assert set("Kghx") <= set(flags)


def test_the_apps_table_is_the_one_the_daemon_reads() -> None:
    cfg = rconfig.load(str(COMPOSE_DIR / "config.toml"), environ={})
    sql = (COMPOSE_DIR / "initdb" / "01-training_jobs.sql").read_text()
    m = re.search(r"CREATE TABLE (\w+) \((.*?)\n\);", sql, re.S)
    assert m and m.group(1) == cfg.jobs.table
    columns = {ln.split()[0] for ln in m.group(2).strip().splitlines()}
    j = cfg.jobs
    assert {j.id_column, j.rq_id_column, j.status_column, j.error_column,
            j.started_at_column, j.completed_at_column} <= columns
    assert f"CREATE INDEX ON {cfg.jobs.table} ({j.rq_id_column})" in sql
