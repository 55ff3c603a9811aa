"""Redis clients from `redis.url`: one server, or the master that Redis Sentinel names.

    redis://[user:password@]host:port/db             rediss:// with TLS, unix:///path?db=0
    redis+sentinel://[user:password@]s1:26379,s2:26379,s3:26379/mymaster/0
    rediss+sentinel://...   (TLS to the sentinels and to the data nodes)

A Sentinel URL lists the sentinels, then the master's name (as in `sentinel monitor`) and
the db. The user and password in it are the data nodes'; the sentinels' are the query
parameters `sentinel_username` / `sentinel_password` (none by default, as Sentinel's own
`requirepass` is usually unset). Other query parameters are redis-py connection options
(`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`, `ssl_check_hostname`...),
the same as a `rediss://` URL takes, applied to every connection.

A client for a Sentinel URL asks the sentinels for the master on every new connection and
drops a connection the old master refuses writes on (READONLY: it was demoted); a
failover that Sentinel carries out also has the old master close its clients. RQ workers
can use the same URL: `rq worker --url 'redis+sentinel://...' --connection-class
reconciler.redisconn.SentinelAwareRedis`.

Must never import anything beyond redis-py and the standard library: RQ workers import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel as ssentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
# Query parameters that are not connection options of the data nodes.
_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")
# Values redis-py takes as typed options, from their text in a URL.
_BOOLS = ("ssl_check_hostname", "health_check_interval_is_bool")
_FLOATS = ("socket_timeout", "socket_connect_timeout", "health_check_interval")


class RedisUrlError(ValueError):
    """A `redis.url` that cannot be used; the message never holds its password."""


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def connection_kwargs(self) -> dict[str, Any]:
        """For the master's (and replicas') connections."""
        kw: dict[str, Any] = {"db": self.db, **self.options}
        if self.username:
            kw["username"] = self.username
        if self.password:
            kw["password"] = self.password
        if self.ssl:
            kw["ssl"] = True
        return kw

    def sentinel_kwargs(self, base: dict[str, Any]) -> dict[str, Any]:
        """For the sentinels' connections: the socket and TLS options, their own auth."""
        kw = {k: v for k, v in {**self.options, **base}.items()
              if k.startswith(("socket_", "ssl_"))}
        if self.ssl:
            kw["ssl"] = True
        if self.sentinel_username:
            kw["username"] = self.sentinel_username
        if self.sentinel_password:
            kw["password"] = self.sentinel_password
        return kw


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def _option(name: str, value: str) -> Any:
    if name in _FLOATS:
        return float(value)
    if name in _BOOLS or value.lower() in ("true", "false"):
        return value.lower() in ("1", "true", "yes", "on")
    return value


def parse_sentinel_url(url: str) -> SentinelUrl:
    """RedisUrlError says what is wrong, naming no password."""
    u = urlsplit(url)
    if u.scheme not in SENTINEL_SCHEMES:
        raise RedisUrlError(f"not a Sentinel URL (scheme {u.scheme!r})")
    userinfo, at, hosts = u.netloc.rpartition("@")
    if not at:
        userinfo = ""
    user, colon, password = userinfo.partition(":")
    sentinels: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep:
            host, port = part.strip(), str(DEFAULT_SENTINEL_PORT)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RedisUrlError(f"sentinel address {part!r} is not host:port")
        sentinels.append((host, int(port)))
    path = [p for p in u.path.split("/") if p]
    if not path:
        raise RedisUrlError("no master name in the path")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise RedisUrlError(f"path {u.path!r} is not /<master>/<db>")
    query = dict(parse_qsl(u.query, keep_blank_values=True))
    try:
        options = {k: _option(k, v) for k, v in query.items()
                   if k not in (*_SENTINEL_AUTH, "db")}
    except ValueError as exc:
        raise RedisUrlError(f"a query parameter is not a number: {exc}") from None
    db = int(path[1]) if len(path) == 2 else int(query.get("db", "0") or 0)
    return SentinelUrl(
        sentinels=tuple(sentinels), master=unquote(path[0]), db=db,
        username=unquote(user) or None, password=unquote(password) if colon else None,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
        ssl=u.scheme == "rediss+sentinel", options=options)


class _AsyncMaster(aioredis.Redis):
    """The master's client that also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()


class _SyncMaster(redis.Redis):
    def close(self) -> None:
        super().close()
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            sentinel.close()


# Connections one asyncio client may hold at once. A burst beyond it (many cancels at
# once, each with its reads) waits for a free connection instead of failing: redis-py's
# default pool raises "Too many connections" at 100, which read as a Redis outage.
MAX_CONNECTIONS = 200


def async_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client for `url`; `kwargs` are redis-py options (timeouts, retry)."""
    if not is_sentinel(url):
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS,
            timeout=kwargs.get("socket_timeout") or 5.0, **kwargs)
        return aioredis.Redis.from_pool(pool)  # as from_url does: the client owns its pool
    s = parse_sentinel_url(url)
    sentinel = asentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2 on
        list(s.sentinels), sentinel_kwargs=s.sentinel_kwargs(kwargs), **s.connection_kwargs())
    client: aioredis.Redis = sentinel.master_for(s.master, redis_class=_AsyncMaster, **kwargs)
    return client


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client for `url` (RQ's API is blocking)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    s = parse_sentinel_url(url)
    sentinel = ssentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2 on
        list(s.sentinels), sentinel_kwargs=s.sentinel_kwargs(kwargs), **s.connection_kwargs())
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        s.master, redis_class=_SyncMaster, **kwargs)
    return client


@dataclass(frozen=True)
class SentinelAnswer:
    sentinel: str  # host:port
    master: str | None  # ip:port it names, None if it named none
    error: str = ""


async def sentinel_masters(url: str, socket_timeout: float) -> list[SentinelAnswer]:
    """What each sentinel of `url` says the master's address is."""
    s = parse_sentinel_url(url)
    out: list[SentinelAnswer] = []
    for host, port in s.sentinels:
        client = aioredis.Redis(host=host, port=port, socket_timeout=socket_timeout,
                                socket_connect_timeout=socket_timeout, **s.sentinel_kwargs({}))
        where = f"{host}:{port}"
        try:
            addr = await client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", s.master)
            if addr:
                ip, p = (a.decode() if isinstance(a, bytes) else str(a) for a in addr)
                out.append(SentinelAnswer(where, f"{ip}:{p}"))
            else:
                out.append(SentinelAnswer(where, None, f"knows no master named {s.master!r}"))
        except (redis.exceptions.RedisError, OSError) as exc:
            out.append(SentinelAnswer(where, None, f"no answer ({exc})"))
        finally:
            await client.aclose()
    return out


# How long an RQ worker's command waits for Redis (a new master) before it fails: about a
# minute of capped backoff, enough for a failover with Sentinel's default
# down-after-milliseconds of 30 s.
WORKER_RETRY_ATTEMPTS = 40
WORKER_RETRY_CAP_SECONDS = 2.0


class SentinelAwareRedis(redis.Redis):
    """`rq worker --url 'redis+sentinel://...' --connection-class
    reconciler.redisconn.SentinelAwareRedis` makes an RQ worker take the same URL as the
    daemon (RQ's own Sentinel support wants a settings module), and ride out a failover: an
    RQ 2 worker whose command fails while a job runs dies (rq/worker: an uncaught
    ConnectionError in monitor_work_horse), leaving its horse and its job behind, so its
    commands wait for the new master instead."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("retry", Retry(ExponentialBackoff(cap=WORKER_RETRY_CAP_SECONDS, base=0.05),
                                         WORKER_RETRY_ATTEMPTS))
        return sync_client(url, **kwargs)
