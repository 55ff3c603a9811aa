"""redact(): no password survives into a log line or `check` output, whatever its form."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.config import redact

# (given, expected, the secret that must not appear)
CASES: list[tuple[str, str, str]] = [
    # userinfo passwords
    ("redis://:s3cret@h:1/2", "redis://:***@h:1/2", "s3cret"),
    ("redis://user:?=Kq7Wx9@s1:26379/0", "redis://user:***@s1:26379/0", "Kq7Wx9"),
    ("redis+sentinel://u:?=Kq7Wx9@s1:26379,s2/m/0", "redis+sentinel://u:***@s1:26379,s2/m/0", "Kq7Wx9"),
    ("redis://default:s3cret@h:6379/0", "redis://default:***@h:6379/0", "s3cret"),
    ("rediss://app:s3cret@redis.example:6380/1?ssl_cert_reqs=required",
     "rediss://app:***@redis.example:6380/1?ssl_cert_reqs=required", "s3cret"),
    ("postgresql://u:pw1234@h:5432/db", "postgresql://u:***@h:5432/db", "pw1234"),
    ("postgres://u:pw1234@h/db?sslmode=require", "postgres://u:***@h/db?sslmode=require", "pw1234"),
    ("redis://:pw1234@[::1]:6379/0", "redis://:***@[::1]:6379/0", "pw1234"),
    ("unix://:pw1234@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2", "pw1234"),
    # percent-encoded specials stay hidden whole
    ("redis://:p%40ss%2Fw%3Frd@h:6379/0", "redis://:***@h:6379/0", "p%40ss"),
    # an `@` inside the password, unencoded: the last one in the authority ends it
    ("redis://u:p@ssword@h/0", "redis://u:***@h/0", "ssword"),
    # unencoded `/` (base64), `?`, `#` in a password: still hidden
    ("redis://:Zm9v/YmFy==@h:6379/0", "redis://:***@h:6379/0", "YmFy"),
    ("redis://:Zm9v/YmFy==@h/0?client_name=a@b", "redis://:***@h/0?client_name=a@b", "YmFy"),
    ("redis://u:pa?ssword@h/0", "redis://u:***@h/0", "ssword"),
    ("redis://u:pa#ssword@h/0", "redis://u:***@h/0", "ssword"),
    ("redis://u:p@s/sword@h/0", "redis://u:***@h/0", "sword"),
    # query-string passwords: the only way to give a unix:// Redis one
    ("unix:///run/redis/redis.sock?db=0&password=s3cret", "unix:///run/redis/redis.sock?db=0&password=***",
     "s3cret"),
    ("unix:///run/redis.sock?password=s3cret&db=3", "unix:///run/redis.sock?password=***&db=3", "s3cret"),
    ("unix:///run/redis.sock?Password=s3cret", "unix:///run/redis.sock?Password=***", "s3cret"),
    ("redis://h:6379/0?password=s3cret", "redis://h:6379/0?password=***", "s3cret"),
    ("redis://u:one111@h/0?password=two222", "redis://u:***@h/0?password=***", "one111"),
    ("redis://u:one111@h/0?password=two222", "redis://u:***@h/0?password=***", "two222"),
    ("postgresql://h/db?user=u&password=s3cret&sslmode=verify-full",
     "postgresql://h/db?user=u&password=***&sslmode=verify-full", "s3cret"),
    ("postgresql://h/db?sslpassword=keypass1", "postgresql://h/db?sslpassword=***", "keypass1"),
    ("rediss://h/0?ssl_password=keypass1", "rediss://h/0?ssl_password=***", "keypass1"),
    ("redis://h/0?password=s3cret#frag", "redis://h/0?password=***#frag", "s3cret"),
    # libpq key/value DSNs
    ("host=h password=pw1234 dbname=x", "host=h password=*** dbname=x", "pw1234"),
    ("password=pw1234", "password=***", "pw1234"),
    ("host=h password = pw1234 user=u", "host=h password = *** user=u", "pw1234"),
    ("host=h password='a b\\'c d' user=u", "host=h password=*** user=u", "c d"),
    ("host=h password='a b\\'c d' user=u", "host=h password=*** user=u", "a b"),
    ("host=h password='' user=u", "host=h password=*** user=u", "''"),
    ("host=h password=a\\ bcdef user=u", "host=h password=*** user=u", "bcdef"),
    ("host=h\tpassword=pw1234\nuser=u", "host=h\tpassword=***\nuser=u", "pw1234"),
    ("host=h sslpassword=keypass1 user=u", "host=h sslpassword=*** user=u", "keypass1"),
    ("host=h PASSWORD=pw1234", "host=h PASSWORD=***", "pw1234"),
    # an unterminated quote hides everything after it
    ("host=h password='never closed user=u", "host=h password=***", "never closed"),
]

# Nothing to hide: the string comes back as it was.
UNCHANGED = [
    "redis://127.0.0.1:6379/0",
    "redis://h",
    "rediss://default@h:6380/0",
    "postgresql://u@h/db",
    "postgresql://h:5432/db?user=me@corp&sslmode=require",
    "unix:///run/redis.sock?db=0",
    "host=h user=u dbname=x",
    "host=h passfile=/etc/pgpass user=u",
    "redis://[::1]:6379/0",
    "",
]


@pytest.mark.parametrize(("given_", "expected", "secret"), CASES)
def test_redact_hides_the_password(given_: str, expected: str, secret: str) -> None:
    shown = redact(given_)
    assert secret not in shown
    assert shown == expected


@pytest.mark.parametrize("url", UNCHANGED)
def test_redact_keeps_what_has_no_password(url: str) -> None:
    assert redact(url) == url


def test_redact_is_idempotent() -> None:
    for given_, expected, _secret in CASES:
        assert redact(redact(given_)) == expected


_password = st.text(min_size=6, max_size=30).filter(lambda s: s.strip() == s)


@given(_password)
def test_percent_encoded_userinfo_password_never_shows(pw: str) -> None:
    enc = quote(pw, safe="")
    for template in ("redis://user:{}@host.example:6379/0",
                     "postgresql://user:{}@db.example:5432/app?sslmode=require",
                     "unix:///run/redis.sock?db=0&password={}"):
        if enc in template.format(""):
            continue  # a "password" that is part of the rest of the URL proves nothing
        assert enc not in redact(template.format(enc))


# What people paste unencoded: base64 alphabets, `@`, `:`, `.`, `-`.
_raw = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/=@:._-",
               min_size=6, max_size=30).filter(lambda s: not s.startswith(("/", "@")))


@given(_raw)
def test_unencoded_userinfo_password_never_shows(pw: str) -> None:
    shown = redact(f"redis://user:{pw}@host.example:6379/0")
    if pw not in "redis://user:***@host.example:6379/0":  # else it proves nothing
        assert pw not in shown
    assert shown.endswith("@host.example:6379/0")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=4, max_size=30))
def test_quoted_kv_password_never_shows(pw: str) -> None:
    quoted = "'" + pw.replace("\\", "\\\\").replace("'", "\\'") + "'"
    shown = redact(f"host=db.example password={quoted} dbname=app")
    assert shown == "host=db.example password=*** dbname=app"
