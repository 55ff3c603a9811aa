"""`redis.url` and `postgres.dsn` read without connecting: checked before a driver sees them.

Both drivers split a URL with urllib: the authority (user, password, host, port) ends at
the first `/`, `?` or `#`, and asyncpg takes the user and password up to the *first* `@`.
A user or password that holds one of these, or a `%` that does not begin an escape, must
be percent-encoded (RFC 3986); both drivers decode it (`p%2Fss` is the password `p/ss`).
Left raw, the host and port come out of the middle of the password, and the error the
driver raises then (`invalid literal for int()`, an unknown host) shows that part of it.
So such a URL is refused here, by a message that shows neither the user nor the password.

Nothing here imports a driver: config validation runs before any of them is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What RFC 3986 lets a userinfo hold unencoded: unreserved, sub-delims, ":" and escapes.
_USERINFO = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:%]*")
# A `%` that does not begin an escape (`%` then two hex digits).
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_IPV6 = re.compile(r"\[([0-9A-Fa-f:.]+(?:%[^\]]*)?)\](?::(.*))?")

ENCODE_HINT = ("write % as %25, / as %2F, @ as %40, : as %3A, ? as %3F, # as %23 (python3 -c "
               "\"import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=''))\" "
               "'PASSWORD' prints it encoded)")
_NEEDS_ENCODING = ("its user or password holds a character that must be percent-encoded in a "
                   "URL: " + ENCODE_HINT)

DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "redis+sentinel": 26379,
                 "rediss+sentinel": 26379, "postgres": 5432, "postgresql": 5432}


class UrlError(ValueError):
    """What is wrong with a URL; the message never holds its user or password."""


def authority_end(s: str) -> int:
    """Where the authority of `s` (a URL after its `scheme://`) ends, by the RFC."""
    return min((i for i in (s.find(c) for c in "/?#") if i != -1), default=len(s))


def raw_password_end(rest: str, end: int) -> int:
    """Where a password that was not percent-encoded ends, or -1.

    `rest` is a URL after its `scheme://`, and `end` where its authority ends by the RFC.
    An `@` past that end closes the userinfo unless it sits in a query value
    (`?user=me@corp` has an `=` before it in its parameter): a raw `/` (base64), `?` or
    `#` in the password moved it there."""
    query = rest.find("?", end)
    fragment = rest.find("#", end)
    found = -1
    for i in range(end, len(rest)):
        if rest[i] != "@":
            continue
        in_query = query != -1 and i > query and (fragment == -1 or i < fragment)
        if in_query:
            seg = max(rest.rfind(c, 0, i) for c in "?&;")
            if "=" in rest[seg:i]:
                continue
        found = i
    return found


def cut_password_end(rest: str, end: int) -> int:
    """Where a password that begins with a raw `?` or `/` ends, or -1: `user:?a=b@host`
    has an authority of `user:` (a port that is empty or no number) and its `@` in what
    reads as a query value. No host of a URL written as meant looks like that."""
    authority = rest[:end]
    if "@" in authority or "@" not in rest[end:]:
        return -1
    for part in authority.split(","):
        _host, colon, port = part.rpartition(":")
        if colon and not port.isdigit() and not part.endswith("]"):
            return rest.find("@", end)
    return -1


@dataclass(frozen=True)
class Url:
    """A URL split as the drivers will split it. `hosts` are decoded, ports None where
    the URL gives none; `userinfo` is still encoded (and never to be shown)."""

    scheme: str
    userinfo: str | None
    hosts: tuple[tuple[str, int | None], ...]
    path: str
    query: str

    def query_pairs(self, *, strict: bool) -> list[tuple[str, str]]:
        if _BAD_PERCENT.search(self.query):
            raise UrlError("a % in its query must begin an escape (write a % itself as %25)")
        try:
            return parse_qsl(self.query, keep_blank_values=True, strict_parsing=strict)
        except ValueError:
            raise UrlError("its query is not name=value pairs joined by &") from None


def _host_port(spec: str) -> tuple[str, int | None]:
    m = _IPV6.fullmatch(spec)
    if m is not None:
        host, port = m.group(1), m.group(2)
    elif spec.startswith("["):
        raise UrlError("a bracketed host is not an IPv6 address ([::1]:6379)")
    else:
        host, colon, port = spec.partition(":")
        if colon and ":" in port:
            raise UrlError(f"host {host!r}: an IPv6 address must be in brackets ([::1]:6379)")
        if not colon:
            port = None
    if _BAD_PERCENT.search(host):
        raise UrlError(f"host {host!r}: a % must begin an escape")
    if port == "":
        # `redis://user:?x=@h/` reads as host "user" with an empty port: a raw ? / or # in
        # a password ends the authority there. Say how to write it, and show no part of it.
        raise UrlError("a host with an empty port (HOST: with nothing after the colon); if "
                       "that is a user and password, " + _NEEDS_ENCODING)
    host = unquote(host)
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UrlError(f"the port after host {host!r} is not a number from 1 to 65535")
    return host, int(port)


def split(url: str) -> Url:
    """UrlError if a driver could not read `url` as its author meant it."""
    m = SCHEME.match(url)
    if m is None:
        raise UrlError("not a URL (scheme://...)")
    scheme = url[:m.end() - 3].lower()
    rest = url[m.end():]
    end = authority_end(rest)
    if raw_password_end(rest, end) != -1 or cut_password_end(rest, end) != -1:
        raise UrlError(_NEEDS_ENCODING)
    userinfo, at, hostspec = rest[:end].rpartition("@")
    if at and ("@" in userinfo or not _USERINFO.fullmatch(userinfo)
               or _BAD_PERCENT.search(userinfo)):
        raise UrlError(_NEEDS_ENCODING)
    hosts = tuple(_host_port(h) for h in hostspec.split(",")) if hostspec else ()
    tail = rest[end:].partition("#")[0]
    path, _, query = tail.partition("?")
    return Url(scheme, userinfo if at else None, hosts, path, query)


REDIS_SCHEMES = ("redis", "rediss", "unix")
POSTGRES_SCHEMES = ("postgres", "postgresql")


def check_redis_url(url: str) -> Url:
    """A redis://, rediss:// or unix:// URL redis-py reads as written (Sentinel URLs are
    read by reconciler.redisconn)."""
    u = split(url)
    if u.scheme == "unix":
        if u.hosts:
            raise UrlError("a unix:// URL has no host: unix:///path/to/redis.sock?db=0")
        if not u.path.strip("/"):
            raise UrlError("a unix:// URL needs the socket's path: unix:///path/to/redis.sock?db=0")
    else:
        if len(u.hosts) > 1:
            raise UrlError("one host only (several are for redis+sentinel://)")
        db = u.path.strip("/")
        if db and not db.isdigit():
            raise UrlError(f"the path must be the db number (/0), not {u.path!r}")
    for name, value in u.query_pairs(strict=False):
        if name == "db" and not value.isdigit():
            raise UrlError("query parameter db must be a number")
    return u


def check_sentinel_userinfo(url: str) -> None:
    """A Sentinel URL's user and password (hosts and path: redisconn.parse_sentinel_url)."""
    m = SCHEME.match(url)
    rest = url[m.end():] if m else url
    end = authority_end(rest)
    if raw_password_end(rest, end) != -1 or cut_password_end(rest, end) != -1:
        raise UrlError(_NEEDS_ENCODING)
    userinfo, at, _hosts = rest[:end].rpartition("@")
    if at and ("@" in userinfo or not _USERINFO.fullmatch(userinfo)
               or _BAD_PERCENT.search(userinfo)):
        raise UrlError(_NEEDS_ENCODING)


def check_postgres_dsn(dsn: str) -> Url:
    """A postgresql:// URL asyncpg reads as written. A libpq key=value DSN is refused
    (asyncpg reads only URLs), with the URL to write instead (its password left out)."""
    if SCHEME.match(dsn) is None:
        raise UrlError(_keyword_advice(dsn))
    u = split(dsn)
    if u.scheme not in POSTGRES_SCHEMES:
        raise UrlError(f"scheme must be postgresql://, got {u.scheme}://")
    for name, value in u.query_pairs(strict=True):
        if name == "port" and not all(p.isdigit() for p in value.split(",")):
            raise UrlError("query parameter port must be a number (or numbers joined by ,)")
    return u


# libpq's key = value, the value bare (a backslash escapes) or in single quotes.
_KEYWORD = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:\\.|[^'\\])*'|(?:\\.|[^\s'\\])*)")
_SECRET_KEYS = ("password", "sslpassword")


def _keyword_values(dsn: str) -> dict[str, str] | None:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(dsn.rstrip()):
        m = _KEYWORD.match(dsn, pos)
        if m is None or m.end() == pos:
            return None
        raw = m.group(2)
        if raw.startswith("'"):
            raw = raw[1:-1]
        out[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", raw)
        pos = m.end()
    return out


def _keyword_advice(dsn: str) -> str:
    from urllib.parse import quote, urlencode

    values = _keyword_values(dsn)
    if not dsn.strip():
        return "is empty; write a URL: postgresql://user:password@host:5432/dbname"
    if not values:
        return "is neither a postgresql:// URL nor a key=value DSN"
    user = quote(values.pop("user", ""), safe="")
    secret = values.pop("password", None) is not None
    values.pop("sslpassword", None)
    host = values.pop("host", "")
    port = values.pop("port", "")
    dbname = quote(values.pop("dbname", ""), safe="")
    auth = ""
    if user or secret:
        auth = f"{user}{':PASSWORD' if secret else ''}@"
    netloc = ",".join(
        (f"[{h}]" if ":" in h else quote(h, safe="")) + (f":{port}" if port else "")
        for h in host.split(",")) if host and not host.startswith("/") else ""
    if host.startswith("/"):
        values["host"] = host
        if port:
            values["port"] = port
    query = f"?{urlencode(values)}" if values else ""
    said = " (PASSWORD: the password, percent-encoded)" if secret else ""
    return ("a key=value DSN (host=... dbname=...) is not supported: asyncpg reads URLs "
            f"only; write it as postgresql://{auth}{netloc}/{dbname}{query}{said}")


def addresses(url: str) -> str:
    """Where `url` connects, for an error message: host:port (several joined by ,), or the
    socket's path; never its user or password. "" when it cannot tell."""
    try:
        u = split(url)
    except UrlError:
        return ""
    if u.scheme == "unix":
        return unquote(u.path)
    default = DEFAULT_PORTS.get(u.scheme)
    hosts = u.hosts
    if not hosts and u.scheme in POSTGRES_SCHEMES:
        try:
            q = dict(u.query_pairs(strict=False))
        except UrlError:
            q = {}
        if q.get("host"):
            return q["host"] + (f":{q['port']}" if q.get("port") else "")
        return "the local socket (or $PGHOST)"
    shown = []
    for host, port in hosts:
        h = f"[{host}]" if ":" in host else host
        shown.append(f"{h}:{port if port is not None else default}")
    return ",".join(shown)
