"""Passwords holding `/ @ : %` against a real redis-server (requirepass and an ACL user) and
a real PostgreSQL role that must log in by password: percent-encoded they work for every
command; raw, the config is refused (exit 2, one line naming the key) and no part of the
password is ever printed."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from reconciler.devstack import Pg, PostgresServer, RedisServer, create_jobs_table
from tests.support import run_cli, write_config

# Every character a URL's userinfo cannot hold raw, and an escape that must not be decoded
# twice ("%2F" here is three characters of the password, not a slash).
REDIS_PASSWORD = "Qz7kR/Xw9fR@Lm3hR:Vb8nR%2FTy4gR%"
PG_PASSWORD = "Hj5dP/Nc2sP@Wq6eP:Ru1aP%2FKm8vP%"
ROLE = "app_pw"


def pieces(secret: str) -> list[str]:
    """The parts a broken parser would show (split at the special characters), and the
    whole, raw and encoded."""
    parts = [p for p in secret.replace("@", "/").replace(":", "/").replace("%", "/").split("/")
             if len(p) >= 4]
    return [secret, quote(secret, safe=""), *parts]


@pytest.fixture
def pw_redis(own_redis: RedisServer) -> Iterator[RedisServer]:
    """own_redis with a password on the default user and an ACL user `rqr`."""
    with own_redis.client() as r:
        r.execute_command("ACL", "SETUSER", "rqr", "on", f">{REDIS_PASSWORD}", "~*", "&*", "+@all")
        r.config_set("requirepass", REDIS_PASSWORD)
    yield own_redis
    with own_redis.client(password=REDIS_PASSWORD) as r:  # so that its SHUTDOWN is heard
        r.config_set("requirepass", "")


@pytest.fixture
def pw_pg(own_pg: PostgresServer) -> Iterator[str]:
    """A database owned by role ROLE, which may log in over TCP by password only; its
    URL without user and password (`postgresql://127.0.0.1:PORT/app`)."""
    with Pg(own_pg.dsn()) as pg:
        pg.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD $$" + PG_PASSWORD + "$$")
        pg.execute(f"CREATE DATABASE app OWNER {ROLE}")
        hba = Path(str(pg.val("SHOW hba_file")))
        # The first matching line wins: this role by password, whatever follows.
        hba.write_text(f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        pg.execute("SELECT pg_reload_conf()")
    create_jobs_table(own_pg.dsn("app"))
    with Pg(own_pg.dsn("app")) as pg:
        pg.execute(f"ALTER TABLE training_jobs OWNER TO {ROLE}")
    yield f"postgresql://127.0.0.1:{own_pg.port}/app"


def with_auth(url: str, user: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}:{password}@{rest}"


def assert_silent(p: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        for piece in pieces(secret):
            assert piece not in p.stdout + p.stderr, (piece, p.stdout, p.stderr)


@pytest.mark.parametrize("redis_user", ["", "rqr"], ids=["requirepass", "acl-user"])
def test_percent_encoded_passwords_work_for_every_command(
        tmp_path: Path, pw_redis: RedisServer, pw_pg: str, redis_user: str) -> None:
    redis_url = with_auth(pw_redis.url, redis_user, quote(REDIS_PASSWORD, safe=""))
    dsn = with_auth(pw_pg, ROLE, quote(PG_PASSWORD, safe=""))
    cfg = write_config(tmp_path / "c.toml", redis_url, dsn)
    for cmd in (("migrate",), ("check",), ("sweep",), ("migrate", "--print-grants", "web")):
        p = run_cli(cfg, *cmd)
        assert p.returncode == 0, (cmd, p.stdout, p.stderr)
        assert_silent(p, REDIS_PASSWORD, PG_PASSWORD)
    p = run_cli(cfg, "check")
    assert "OK   redis:" in p.stdout and "OK   postgres:" in p.stdout, p.stdout


@pytest.mark.parametrize("key", ["redis.url", "postgres.dsn"])
def test_raw_passwords_are_a_config_error_that_shows_no_part_of_them(
        tmp_path: Path, pw_redis: RedisServer, pw_pg: str, key: str) -> None:
    redis_url = with_auth(pw_redis.url, "rqr", quote(REDIS_PASSWORD, safe=""))
    dsn = with_auth(pw_pg, ROLE, quote(PG_PASSWORD, safe=""))
    if key == "redis.url":
        redis_url = with_auth(pw_redis.url, "rqr", REDIS_PASSWORD)
    else:
        dsn = with_auth(pw_pg, ROLE, PG_PASSWORD)
    cfg = write_config(tmp_path / "c.toml", redis_url, dsn)
    for cmd in ("check", "migrate", "sweep", "run"):
        p = run_cli(cfg, cmd)
        assert p.returncode == 2, (cmd, p.stdout, p.stderr)
        [line] = p.stderr.splitlines()
        assert line.startswith(f"rq-reconciler: config error: {key}: ") and "%2F" in line, line
        assert p.stdout == ""
        assert_silent(p, REDIS_PASSWORD, PG_PASSWORD)


def test_a_wrong_password_names_host_and_port_and_not_the_password(
        tmp_path: Path, pw_redis: RedisServer, pw_pg: str) -> None:
    wrong = f"Wr0ng{uuid.uuid4().hex[:6]}/Zx9Pw0rd"
    port = pw_pg.rsplit(":", 1)[1].split("/")[0]
    cfg = write_config(tmp_path / "c.toml", with_auth(pw_redis.url, "rqr", quote(REDIS_PASSWORD, safe="")),
                       with_auth(pw_pg, ROLE, quote(wrong, safe="")))
    p = run_cli(cfg, "migrate")
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith(f"rq-reconciler: postgres at 127.0.0.1:{port}: "), p.stderr
    assert "password authentication failed" in p.stderr
    assert_silent(p, wrong, REDIS_PASSWORD, PG_PASSWORD)
