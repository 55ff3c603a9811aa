"""redis.url and postgres.dsn checked at config validation: a URL is accepted only if the
drivers read its host and port as written; otherwise a one-line error names the key and
shows no part of the password. Key=value DSNs are refused with the URL to write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.connection import parse_url

from reconciler.config import ConfigError, from_mapping
from reconciler.urls import addresses

SPECIALS = "/@:%?#"


def redis_cfg(url: str) -> dict[str, object]:
    return {"redis": {"url": url}}


def pg_cfg(dsn: str, key: str = "dsn") -> dict[str, object]:
    return {"postgres": {key: dsn}}


@pytest.mark.parametrize("pw", ["Kq7/Wx9", "Kq7@Wx9", "Kq7%zzWx9", "Kq7?Wx9", "Kq7#Wx9", "Kq7Wx9%",
                                "Kq7/Wx9@Lm3:Pr4%", "?=Kq7Wx9", "/x=Kq7Wx9"])
@pytest.mark.parametrize(("raw", "key"), [
    (lambda pw: redis_cfg(f"redis://u:{pw}@127.0.0.1:6379/0"), "redis.url"),
    (lambda pw: redis_cfg(f"redis+sentinel://u:{pw}@s1:26379,s2:26379/mymaster/0"), "redis.url"),
    (lambda pw: pg_cfg(f"postgresql://app:{pw}@127.0.0.1:5432/app"), "postgres.dsn"),
    (lambda pw: pg_cfg(f"postgresql://app:{pw}@127.0.0.1:5432/app", "listen_dsn"),
     "postgres.listen_dsn"),
])
def test_a_raw_special_in_a_password_is_refused_naming_the_key(raw: object, key: str, pw: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(raw(pw), environ={})  # type: ignore[operator]
    assert err.value.key == key
    text = str(err.value)
    assert text.startswith(f"config error: {key}: ") and "\n" not in text
    assert "percent-encoded" in text and "%2F" in text
    for piece in ("Kq7", "Wx9", "Lm3", "Pr4"):
        assert piece not in text


@pytest.mark.parametrize("pw", ["ab/cd", "ab@cd", "ab:cd", "ab%cd", "x/y@z:w%2F"])
def test_percent_encoded_passwords_are_read_back_whole(pw: str) -> None:
    url = f"redis://u:{quote(pw, safe='')}@127.0.0.1:6390/3"
    cfg = from_mapping(redis_cfg(url), environ={})
    kw = parse_url(cfg.redis.url)
    assert (kw["password"], kw["host"], kw["port"], kw["db"]) == (pw, "127.0.0.1", 6390, 3)
    dsn = f"postgresql://app:{quote(pw, safe='')}@127.0.0.1:5499/app"
    assert from_mapping(pg_cfg(dsn), environ={}).postgres.dsn == dsn


def test_a_raw_colon_in_the_password_is_fine() -> None:
    """RFC 3986 allows `:` in the userinfo, and both drivers split user from password at
    the first one."""
    cfg = from_mapping({"redis": {"url": "redis://u:a:b@h:6379/0"},
                        "postgres": {"dsn": "postgresql://u:a:b@h:5432/db"}}, environ={})
    assert parse_url(cfg.redis.url)["password"] == "a:b"


@given(st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S")),
               min_size=1, max_size=20))
def test_accepted_means_the_driver_sees_the_host_and_port_as_written(pw: str) -> None:
    """Any raw password: refused without showing it, or accepted and read back whole,
    with the host and port that were written."""
    url = f"redis://user:{pw}@redis.example:6390/0"
    dsn = f"postgresql://user:{pw}@db.example:5499/app"
    for raw, key in ((redis_cfg(url), "redis.url"), (pg_cfg(dsn), "postgres.dsn")):
        try:
            from_mapping(raw, environ={})
        except ConfigError as exc:
            assert exc.key == key
            if len(pw) >= 4:
                assert pw not in str(exc)
            continue
        if key == "redis.url":
            kw = parse_url(url)
            assert (kw["host"], kw["port"]) == ("redis.example", 6390)
        else:  # asyncpg: the userinfo ends at the first `@` of urllib's netloc
            hostspec = urlparse(dsn).netloc.partition("@")[2]
            assert hostspec == "db.example:5499"


@pytest.mark.parametrize(("dsn", "expected"), [
    ("host=db.example port=5433 dbname=app user=app password=s3cretpw",
     "postgresql://app:PASSWORD@db.example:5433/app"),
    ("host=db.example dbname=app", "postgresql://db.example/app"),
    ("host=/run/postgresql dbname=app user=app sslmode=disable",
     "postgresql://app@/app?sslmode=disable&host=%2Frun%2Fpostgresql"),
    ("dbname = 'my app' user=app password='a b\\'c'", "postgresql://app:PASSWORD@/my%20app"),
])
def test_a_keyword_dsn_is_refused_with_the_url_to_write(dsn: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(pg_cfg(dsn), environ={})
    text = str(err.value)
    assert err.value.key == "postgres.dsn"
    assert f"write it as {expected}" in text, text
    assert "s3cretpw" not in text and "a b" not in text


def test_env_supplied_urls_say_where_they_came_from() -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping({}, environ={"RQ_RECONCILER_POSTGRES_DSN": "host=h dbname=x password=pw"})
    assert err.value.key == "postgres.dsn"
    assert "(set by $RQ_RECONCILER_POSTGRES_DSN)" in str(err.value)
    assert "pw" not in str(err.value).replace("PASSWORD", "")


@pytest.mark.parametrize(("url", "fragment"), [
    ("redis://h:63a79/0", "the port after host 'h' is not a number"),
    ("redis://h:0/0", "the port after host 'h' is not a number"),
    ("redis://h:6379/zero", "the path must be the db number"),
    ("redis://h:6379/0?db=x", "db must be a number"),
    ("redis://a:1,b:2/0", "one host only"),
    ("redis://::1:6379/0", "IPv6 address must be in brackets"),
    ("unix://", "needs the socket's path"),
    ("http://h", "scheme must be redis://"),
])
def test_redis_url_mistakes(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(redis_cfg(url), environ={})
    assert err.value.key == "redis.url" and fragment in str(err.value), str(err.value)


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "redis://h", "rediss://default@h:6380/1?ssl_cert_reqs=required",
    "redis://[::1]:6379/0", "unix:///run/redis.sock?db=2", "unix://:p%40ss@/run/redis.sock",
    "redis+sentinel://s1:26379,s2/mymaster/0",
])
def test_good_redis_urls_pass(url: str) -> None:
    assert from_mapping(redis_cfg(url), environ={}).redis.url == url


@pytest.mark.parametrize(("dsn", "fragment"), [
    ("postgresql://h:5x/db", "the port after host 'h'"),
    ("postgresql://h/db?port=abc", "port must be a number"),
    ("postgresql://h/db?sslmode", "not name=value pairs"),
    ("mysql://h/db", "scheme must be postgresql://"),
    ("", "is empty"),
])
def test_postgres_dsn_mistakes(dsn: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(pg_cfg(dsn), environ={})
    assert err.value.key == "postgres.dsn" and fragment in str(err.value), str(err.value)


@pytest.mark.parametrize("dsn", [
    "postgresql://postgres@127.0.0.1:5432/postgres", "postgres://u:p%2Fw@h1:5432,h2:5433/db",
    "postgresql:///app?host=/run/postgresql", "postgresql://%2Frun%2Fpostgresql/app",
    "postgresql://h/db?user=me@corp&sslmode=require",
])
def test_good_postgres_dsns_pass(dsn: str) -> None:
    assert from_mapping(pg_cfg(dsn), environ={}).postgres.dsn == dsn


@pytest.mark.parametrize(("url", "where"), [
    ("redis://u:p%2Fw@127.0.0.1:6390/0", "127.0.0.1:6390"),
    ("redis://h", "h:6379"),
    ("redis://[::1]/0", "[::1]:6379"),
    ("unix:///run/redis.sock?db=1", "/run/redis.sock"),
    ("redis+sentinel://s1,s2:26380/m/0", "s1:26379,s2:26380"),
    ("postgresql://u:pw@h1,h2:5433/db", "h1:5432,h2:5433"),
    ("postgresql:///db?host=/run/pg&port=5433", "/run/pg:5433"),
])
def test_addresses_name_host_and_port_never_the_password(url: str, where: str) -> None:
    assert addresses(url) == where


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[postgres]\ndsn = "postgresql://app:Zq9/Wv8x@127.0.0.1:1/app"\n')
    p = subprocess.run([sys.executable, "-m", "reconciler", "check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    [line] = p.stderr.splitlines()
    assert line.startswith("rq-reconciler: config error: postgres.dsn: ")
    assert "Zq9" not in line and "Wv8x" not in line
