"""Sentinel URLs: what each part becomes, and what is refused (and never echoes a password)."""

from __future__ import annotations

import pytest

from reconciler.config import redact
from reconciler.redisconn import RedisUrlError, SentinelUrl, is_sentinel, parse_sentinel_url


def test_every_part_of_a_sentinel_url() -> None:
    url = ("rediss+sentinel://app:p%40ss@s1:26379,s2,[::1]:26380/my%20master/3"
           "?sentinel_password=sp&ssl_ca_certs=/etc/ca.pem&socket_timeout=2.5&ssl_check_hostname=false")
    assert parse_sentinel_url(url) == SentinelUrl(
        sentinels=(("s1", 26379), ("s2", 26379), ("::1", 26380)), master="my master", db=3,
        username="app", password="p@ss", sentinel_password="sp", ssl=True,
        options={"ssl_ca_certs": "/etc/ca.pem", "socket_timeout": 2.5, "ssl_check_hostname": False})
    s = parse_sentinel_url(url)
    assert s.connection_kwargs()["password"] == "p@ss"
    # the sentinels get their own password, never the data nodes'
    assert s.sentinel_kwargs({"socket_timeout": 1.0}) == {
        "ssl_ca_certs": "/etc/ca.pem", "ssl_check_hostname": False, "socket_timeout": 1.0,
        "ssl": True, "password": "sp"}
    assert "p@ss" not in redact(url) and "sp&" not in redact(url)


def test_the_db_defaults_to_0_and_may_come_from_the_query() -> None:
    assert parse_sentinel_url("redis+sentinel://h:1/m").db == 0
    assert parse_sentinel_url("redis+sentinel://h:1/m?db=2").db == 2
    assert not is_sentinel("redis://h:1/0") and is_sentinel("redis+sentinel://h:1/m")


@pytest.mark.parametrize(("url", "error"), [
    ("redis+sentinel://h:1", "no master name"),
    ("redis+sentinel://h:1/m/0/x", "is not /<master>/<db>"),
    ("redis+sentinel://:secret@h:99999/m", "'h:99999' is not host:port"),
    ("redis+sentinel://h:1/m?socket_timeout=soon", "not a number"),
    ("redis://h:1/0", "not a Sentinel URL"),
])
def test_refused(url: str, error: str) -> None:
    with pytest.raises(RedisUrlError, match=error) as info:
        parse_sentinel_url(url)
    assert "secret" not in str(info.value)
