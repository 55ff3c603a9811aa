"""`rq-reconciler check`: one OK/WARN/FAIL line per check, each FAIL saying how to fix it.

Read-only: it never changes the keyspace setting, the table or RQ state. The Redis ACL
check queues each command the daemon sends inside a MULTI that is never executed (see
`_check_redis_acl`; the probes themselves are redis_acl.py's).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
import uuid
from collections.abc import Coroutine
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import redis.exceptions

from reconciler.config import Config, quote_ident, redact
from reconciler.errors import BackendUnavailable, ReconcilerError
from reconciler.indexes import advise
from reconciler.redis_acl import acl_probes, denial, probe_replies, whoami
from reconciler.redisconn import async_client, is_sentinel, parse_sentinel_url, sentinel_masters
from reconciler.rq_layout import missing_keyspace_flags, worker_gone_reason
from reconciler.rq_state import RqState
from reconciler.schema_needs import Line, column_lines, find_table, privilege_lines


async def run_checks(cfg: Config) -> list[Line]:
    out = [Line("OK", "config", f"{cfg.source} is valid")]
    out += await _guarded("redis", _check_redis_route(cfg))
    out += await _guarded("redis", _check_redis(cfg))
    out += await _guarded("postgres", _check_postgres(cfg))
    out += await _guarded("postgres listen", _check_postgres_session(cfg))
    out += await _guarded("metrics", _listed(_check_metrics_listen(cfg)))
    if not any(ln.level == "FAIL" for ln in out):
        out += await _guarded("unserved queues", _listed(_unserved_queues_line(cfg)))
    return out


async def _listed(line: Coroutine[Any, Any, Line]) -> list[Line]:
    return [await line]


async def _guarded(what: str, lines: Coroutine[Any, Any, list[Line]]) -> list[Line]:
    """A check that fails in a way it did not foresee is one FAIL line, never a traceback
    that hides the lines of the others."""
    try:
        return await lines
    except Exception as exc:
        return [Line("FAIL", what, f"the check itself failed: {type(exc).__name__}: {exc}")]


async def _check_redis(cfg: Config) -> list[Line]:
    shown = redact(cfg.redis.url)
    try:
        rq = RqState(cfg.redis.url, socket_timeout=cfg.redis.socket_timeout_seconds,
                     key_prefix=cfg.redis.key_prefix)
    except ValueError:
        # The parser's message may quote part of the URL, password included.
        return [Line("FAIL", "redis", f"redis.url {shown} cannot be parsed: is a password with "
                     "/, ?, #, @ or : in it percent-encoded (%2F, %3F, %23, %40, %3A)?")]
    try:
        try:
            await rq.ping()
        except BackendUnavailable as exc:
            return [Line("FAIL", "redis", f"cannot reach {shown}: {exc}. Is Redis running, and is "
                         "redis.url (or $RQ_RECONCILER_REDIS_URL) right?")]
        lines = [Line("OK", "redis", f"{shown} answers PING")]
        lines += await _check_redis_acl(cfg, rq)
        if any(ln.level == "FAIL" for ln in lines):
            return lines  # what follows would fail on the same missing permissions
        lines.append(await _workers_line(rq))
        lines.append(await _graceful_line(cfg, rq))
        mode = cfg.redis.keyspace_events
        try:
            flags = await rq.keyspace_flags()
        except redis.exceptions.ResponseError as exc:
            level = "FAIL" if mode == "require" else "WARN"
            lines.append(Line(level, "keyspace events", f"CONFIG GET refused ({exc}); the daemon "
                              f"will rely on sweeps every {cfg.sweep.fallback_interval_seconds:g} s. "
                              "Set notify-keyspace-events to include 'Kghx' in your provider's "
                              "console for millisecond sync"))
            return lines
        missing = missing_keyspace_flags(flags)
        if not missing:
            lines.append(Line("OK", "keyspace events", f"notify-keyspace-events={flags!r}"))
        elif mode == "off":
            lines.append(Line("OK", "keyspace events", "off by config: sweeps only"))
        elif mode == "auto":
            lines.append(Line("WARN", "keyspace events",
                              f"notify-keyspace-events={flags!r} lacks {missing!r}; the daemon "
                              "adds it at start-up (redis.keyspace_events = \"auto\")"))
        else:
            lines.append(Line("FAIL", "keyspace events",
                              f"notify-keyspace-events={flags!r} lacks {missing!r}; run "
                              f"`redis-cli CONFIG SET notify-keyspace-events {flags + missing}` "
                              "(and persist it in redis.conf), or set redis.keyspace_events = "
                              "\"auto\""))
        return lines
    finally:
        await rq.close()


async def _workers_line(rq: RqState) -> Line:
    """Workers alive by RQ's own records (a dead one's hash lives on for its TTL, or for
    ever with `death` set, and stays in rq:workers until RQ cleans it)."""
    names = await rq.worker_names()
    if not names:
        return Line("WARN", "rq workers", "none registered in this Redis db: is redis.url's db "
                    "number the one your workers use?")
    try:
        records = await rq.read_workers(names)
    except BackendUnavailable as exc:
        return Line("WARN", "rq workers", f"{len(names)} registered; could not read them: {exc}")
    gone = {n: why for n in names if (why := worker_gone_reason(records.get(n), n, rq.keys))}
    alive = len(names) - len(gone)
    shown = "; ".join(f"{n} ({why})" for n, why in list(gone.items())[:5])
    more = f" and {len(gone) - 5} more" if len(gone) > 5 else ""
    if not gone:
        return Line("OK", "rq workers", f"{alive} alive")
    if not alive:
        return Line("WARN", "rq workers", f"none alive: {len(gone)} registered but gone: "
                    f"{shown}{more}. Are the workers running, and is redis.url's db theirs?")
    return Line("OK", "rq workers", f"{alive} alive; {len(gone)} registered but gone: {shown}{more}")


async def _graceful_line(cfg: Config, rq: RqState) -> Line:
    """Can a daemon started here see and signal the workers that registered from this
    hostname (so that their cancels start with SIGTERM)? Judged as `run` judges it, from
    this process's PID namespace and user: run `check` where the daemon runs."""
    from reconciler import hostpid
    from reconciler.processes import Processes

    host_pid, _why = hostpid.decide(cfg.instance.host_pid)
    procs = Processes(host_pid=host_pid)
    names = await rq.worker_names()
    try:
        records = await rq.read_workers(names) if names else {}
    except BackendUnavailable as exc:
        return Line("WARN", "graceful stop", f"could not read the workers: {exc}")
    live = {n: r for n, r in records.items() if r.exists and not r.death}
    unseen = {n: why for n, r in live.items() if (why := procs.unseen(r))}
    local = sum(1 for r in live.values() if procs.is_local(r))
    if unseen:
        first = next(iter(unseen.values()))
        return Line("WARN", "graceful stop", f"{len(unseen)} worker(s) of this hostname cannot be "
                    f"stopped gracefully from here ({first}): run rq-reconciler in the workers' PID "
                    "namespace and as their user (a sidecar with shareProcessNamespace: true, "
                    "compose's pid: \"service:<worker>\", or on the host); until then their "
                    "cancels use RQ's stop-job, an immediate SIGKILL")
    return Line("OK", "graceful stop", f"{local} worker(s) on this host can be stopped with "
                "SIGTERM first" + ("" if local else " (none runs here: run a replica on each "
                                   "worker host)"))


async def _check_redis_acl(cfg: Config, rq: RqState) -> list[Line]:
    probes = acl_probes(cfg, rq)
    # MULTI is the vehicle and EXEC is asked about last (see probe_replies).
    queued = [p for p in probes if p.name not in ("MULTI", "EXEC")]
    who = await whoami(cfg, rq)
    user = f"user {who!r}"
    try:
        replies = await probe_replies(cfg, [p.argv for p in queued])
    except redis.exceptions.ResponseError as exc:
        return [Line("FAIL", "redis acl", f"{user} may not run MULTI ({exc}): RQ's Job.cancel() "
                     "needs it, and check needs it to test the other commands. Fix: ACL SETUSER "
                     f"{who} +multi +exec")]
    except (redis.exceptions.RedisError, OSError) as exc:
        return [Line("WARN", "redis acl", f"could not test the commands the daemon needs: {exc}")]
    exec_probe = next(p for p in probes if p.name == "EXEC")
    results = list(zip([*queued, exec_probe], replies, strict=True))
    missing: dict[str, list[tuple[str, str, str]]] = {"FAIL": [], "WARN": []}
    flags_missing = False
    if cfg.redis.keyspace_events == "auto":
        try:
            flags_missing = bool(missing_keyspace_flags(await rq.keyspace_flags()))
        except (redis.exceptions.RedisError, BackendUnavailable):
            flags_missing = True
    for probe, reply in results:
        allowed = (reply == b"QUEUED" or reply == "QUEUED"
                   or isinstance(reply, redis.exceptions.ExecAbortError)
                   # WATCH is never queued: past the ACL check, it says where it was sent
                   # (Redis: "inside MULTI is not allowed"; Valkey: "not allowed inside a
                   # transaction")
                   or (probe.name == "WATCH"
                       and any(t in str(reply) for t in ("inside MULTI", "inside a transaction"))))
        if allowed or not isinstance(reply, redis.exceptions.ResponseError):
            continue
        if probe.name == "CONFIG|SET" and not flags_missing:
            continue  # only needed to add flags that are missing
        what, rule = denial(reply, probe)
        missing["WARN" if probe.optional else "FAIL"].append((what, rule, probe.why))
    lines = []
    for level in ("FAIL", "WARN"):
        found = missing[level]
        if not found:
            continue
        names = "; ".join(f"{what} ({why})" for what, _rule, why in found)
        rules = " ".join(dict.fromkeys(rule for _what, rule, _why in found))
        tail = "" if level == "FAIL" else " The daemon runs without it."
        lines.append(Line(level, "redis acl", f"{user} may not run: {names}.{tail} Fix: ACL "
                          f"SETUSER {who} {rules}"))
    if not lines:
        lines.append(Line("OK", "redis acl", f"{user} may run every command the daemon sends "
                          f"({len(dict.fromkeys(p.name for p in probes))}: tested inside a "
                          "MULTI that never ran)"))
    return lines


# -- PostgreSQL -------------------------------------------------------------------------------


async def _check_postgres(cfg: Config) -> list[Line]:
    shown = redact(cfg.postgres.dsn)
    try:
        # No statement cache: dsn may be a transaction-mode pooler (PgBouncer), which
        # loses named prepared statements between transactions (check says so below).
        conn = await asyncpg.connect(cfg.postgres.dsn, timeout=10, statement_cache_size=0)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        return [Line("FAIL", "postgres", f"cannot connect to {shown}: {exc}. Is PostgreSQL "
                     "running, and is postgres.dsn (or $RQ_RECONCILER_POSTGRES_DSN) right?")]
    lines = [Line("OK", "postgres", f"connected to {shown}")]
    try:
        await _check_tables(conn, cfg, lines)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        # Whatever the server refused, the lines so far stand, and this one says what.
        lines.append(Line("FAIL", "postgres", f"the checks stopped at: {type(exc).__name__}: "
                          f"{exc}"))
    finally:
        with contextlib.suppress(Exception):
            await conn.close()
    return lines


async def _check_tables(conn: asyncpg.Connection, cfg: Config, lines: list[Line]) -> None:
    j = cfg.jobs
    privileges = await privilege_lines(conn, cfg)
    table = await find_table(conn, j.table)
    if table is None:
        lines.append(Line("FAIL", "jobs table", f"{j.table!r} does not exist in this database; "
                          "set jobs.table (schema-qualified if needed, names are "
                          "case-sensitive)"))
        lines += privileges
        return
    lines.append(Line("OK", "jobs table", f"{j.table} exists"))
    lines += await column_lines(conn, cfg, table)
    lines += privileges
    # The index checks EXPLAIN the daemon's own queries: not on columns that are missing,
    # nor without the privileges to read them.
    if not any(ln.level == "FAIL" for ln in lines):
        try:
            for advice in await advise(conn, cfg):
                if advice.ok:
                    lines.append(Line("OK", advice.what, advice.message))
                else:
                    lines.append(Line("WARN", advice.what,
                                      f"{advice.message}. Fix: {advice.statement}"))
        except asyncpg.PostgresError as exc:
            lines.append(Line("WARN", "indexes", f"could not ask the planner ({exc})"))
    missing = [name for name in (cfg.cancel.requests_table, cfg.events_table)
               if await find_table(conn, name) is None]
    if missing:
        lines.append(Line("FAIL", "schema", "rq-reconciler's tables are missing; run "
                          "`rq-reconciler migrate` (or `migrate --print-sql` for your DBA)"))
    else:
        lines.append(Line("OK", "schema", f"{cfg.cancel.requests_table} and "
                          f"{cfg.events_table} exist"))


# -- PostgreSQL behind a pooler -----------------------------------------------------------------

# How long a NOTIFY may take to reach the LISTEN probe: milliseconds on a direct session.
_NOTIFY_WAIT_SECONDS = 2.0
_POOLER_FIX = ("if postgres.dsn goes through a transaction-mode pooler (PgBouncer), set "
               "postgres.pooler = \"transaction\" and postgres.listen_dsn to a direct (or "
               "session-pooled) DSN")


async def _check_postgres_session(cfg: Config) -> list[Line]:
    """What a transaction-mode pooler (PgBouncer) breaks, tried for real: startup parameters
    on the pool's connections, and LISTEN, which the daemon does on the session DSN
    (listen_dsn, else dsn) and hears a NOTIFY sent through dsn (as the app's INSERT
    trigger sends it)."""
    pg = cfg.postgres
    pooled = pg.pooler == "transaction"
    lines: list[Line] = []
    # The pool's own connection options (pgpool.open_pool).
    options: dict[str, Any] = ({"statement_cache_size": 0} if pooled else
                               {"server_settings": {"lock_timeout": "2000"}})
    try:
        sender = await asyncpg.connect(pg.dsn, timeout=10, **options)
    except asyncpg.ProtocolViolationError as exc:
        return [Line("FAIL", "postgres pooler", f"{redact(pg.dsn)} refused the pool's startup "
                     f"parameters ({exc}): {_POOLER_FIX}")]
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return []  # unreachable: the postgres line above says so
    try:
        if pooled:
            lines += await _pooled_timeouts(sender)
        lines += await _listen_probe(cfg, sender)
    finally:
        await sender.close()
    return lines


async def _pooled_timeouts(conn: asyncpg.Connection) -> list[Line]:
    """Behind a pooler the pool sets no timeouts at connect: they must be the role's."""
    row = await conn.fetchrow("SELECT current_setting('lock_timeout') AS l, "
                              "current_setting('statement_timeout') AS s, current_user AS u")
    unset = [name for name, value in (("lock_timeout", row["l"]), ("statement_timeout", row["s"]))
             if value in ("0", "")]
    if not unset:
        return [Line("OK", "postgres pooler", f"pooler = \"transaction\": no prepared-statement "
                     f"cache; the role's lock_timeout={row['l']}, statement_timeout={row['s']}")]
    fix = "; ".join(f"ALTER ROLE {quote_ident(row['u'])} SET {name} = '{want}'"
                    for name, want in (("lock_timeout", "2s"), ("statement_timeout", "30s"))
                    if name in unset)
    return [Line("WARN", "postgres pooler", f"{' and '.join(unset)} not set for role "
                 f"{row['u']!r}, and a pooler lets no client set them at connect: one app "
                 f"transaction holding a row lock can stall the daemon. Fix: {fix}")]


async def _listen_probe(cfg: Config, sender: asyncpg.Connection) -> list[Line]:
    pg = cfg.postgres
    key = "listen_dsn" if pg.listen_dsn else "dsn"
    channel = f"rq_reconciler_check_{uuid.uuid4().hex[:12]}"
    try:
        listener = await asyncpg.connect(pg.session_dsn, timeout=10, statement_cache_size=0)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        return [Line("FAIL", "postgres listen", f"cannot connect to postgres.{key} "
                     f"{redact(pg.session_dsn)}: {exc}")]
    heard = asyncio.Event()
    try:
        await listener.add_listener(channel, lambda *_a: heard.set())
        started = time.monotonic()
        await sender.execute("SELECT pg_notify($1, 'probe')", channel)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_NOTIFY_WAIT_SECONDS):
                await heard.wait()
        took = time.monotonic() - started
    finally:
        await listener.close()
    if heard.is_set():
        return [Line("OK", "postgres listen", f"LISTEN on postgres.{key} hears a NOTIFY sent "
                     f"through postgres.dsn ({took * 1000:.0f} ms)")]
    fix = (_POOLER_FIX if not pg.listen_dsn else
           "postgres.listen_dsn must be a direct (or session-pooled) connection to the "
           "database the app writes to")
    return [Line("FAIL", "postgres listen", f"a NOTIFY sent through postgres.dsn did not reach "
                 f"a LISTEN on postgres.{key} ({redact(pg.session_dsn)}) within "
                 f"{_NOTIFY_WAIT_SECONDS:g} s: cancels would wait for a sweep. Fix: {fix}")]


# -- Redis: Sentinel and TLS ----------------------------------------------------------------


async def _check_redis_route(cfg: Config) -> list[Line]:
    """How the daemon reaches Redis, before it talks to it: which master the sentinels name,
    and whether a TLS connection can be verified (a CA file that cannot be read, a
    certificate the CA did not sign or that names another host)."""
    url = cfg.redis.url
    lines: list[Line] = []
    if is_sentinel(url):
        lines.append(await _sentinel_line(cfg))
    scheme = urlsplit(url).scheme
    if scheme in ("rediss", "rediss+sentinel"):
        lines.append(await _tls_line(cfg))
    return lines


async def _sentinel_line(cfg: Config) -> Line:
    name = parse_sentinel_url(cfg.redis.url).master
    said = await sentinel_masters(cfg.redis.url, cfg.redis.socket_timeout_seconds)
    masters = sorted({a.master for a in said if a.master})
    others = "; ".join(f"{a.sentinel} {a.error}" for a in said if not a.master)
    if not masters:
        return Line("FAIL", "redis sentinel", f"no sentinel names a master {name!r}: {others}. "
                    "Are redis.url's sentinels and master name right?")
    if len(masters) > 1:
        return Line("WARN", "redis sentinel", f"the sentinels disagree on master {name!r} "
                    f"({', '.join(masters)}): a failover is under way, or they are split; the "
                    "daemon follows the one it asks")
    agree = sum(1 for a in said if a.master)
    line = (f"{agree} of {len(said)} sentinels name {masters[0]} as master {name!r} (the "
            "daemon follows a failover)")
    if others:
        return Line("WARN", "redis sentinel", f"{line}; {others}")
    return Line("OK", "redis sentinel", line)


async def _tls_line(cfg: Config) -> Line:
    query = dict(parse_qsl(urlsplit(cfg.redis.url).query))
    ca = query.get("ssl_ca_certs")
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        path = query.get(key)
        if path and not os.access(path, os.R_OK):
            return Line("FAIL", "redis tls", f"{key}={path} cannot be read by this user")
    if query.get("ssl_cert_reqs", "required").lower() in ("none", "optional"):
        return Line("WARN", "redis tls", f"ssl_cert_reqs={query['ssl_cert_reqs']}: the server's "
                    "certificate is not verified (anyone on the path can read the traffic)")
    client = async_client(cfg.redis.url, socket_timeout=cfg.redis.socket_timeout_seconds,
                          socket_connect_timeout=cfg.redis.socket_timeout_seconds)
    try:
        await client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text.lower():
            return Line("FAIL", "redis tls", f"the server's certificate was refused ({text}). Fix: "
                        "ssl_ca_certs=<the CA that signed it> in redis.url (and a certificate "
                        "that names the host you connect to)")
        if "SSL" in text or "TLS" in text or "wrong version number" in text:
            return Line("FAIL", "redis tls", f"TLS handshake failed ({text}): is the server's "
                        "port a TLS port (tls-port), and redis.url's scheme rediss://?")
        if isinstance(exc, redis.exceptions.TimeoutError):
            # A plain Redis port answers a TLS hello with silence, not an error.
            return Line("FAIL", "redis tls", f"TLS handshake failed: no answer within "
                        f"{cfg.redis.socket_timeout_seconds:g} s. Is the port the server's "
                        "tls-port (a plain port stays silent), and can it be reached?")
        return Line("WARN", "redis tls", f"could not try TLS: {text}")
    finally:
        await client.aclose()
    by = f"the CA in {ca}" if ca else "the system's CAs"
    return Line("OK", "redis tls", f"the server's certificate is verified against {by}")


# -- metrics.listen ------------------------------------------------------------------------------


async def _check_metrics_listen(cfg: Config) -> Line:
    """A second daemon on one host with the same metrics port cannot start: say so first."""
    host, port = cfg.metrics.host_port
    try:
        with socket.create_server((host, port), reuse_port=False):
            return Line("OK", "metrics", f"{cfg.metrics.listen} is free for /metrics")
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return Line("FAIL", "metrics", f"cannot listen on {cfg.metrics.listen}: {exc}")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        await writer.drain()
        body = await asyncio.wait_for(reader.read(1 << 20), 2)
        writer.close()
    except (OSError, TimeoutError):
        body = b""
    if b"rq_reconciler_build_info" in body:
        return Line("OK", "metrics", f"{cfg.metrics.listen} is served by a running rq-reconciler "
                    "(this one? a second instance on this host needs its own metrics.listen)")
    return Line("FAIL", "metrics", f"{cfg.metrics.listen} is in use by another program: the "
                "daemon would not start (exit 2). Give metrics.listen another port")


async def _unserved_queues_line(cfg: Config) -> Line:
    """Queues that active rows' jobs wait on (`queued` in RQ) and no live worker listens
    to (SPEC: never an orphan, but worth knowing). Reads every active row, a page at a
    time, and their jobs, as a sweep does; changes nothing."""
    from collections import Counter

    from reconciler.jobs_table import Store
    from reconciler.model import RqStatus

    store = Store(cfg)
    rq = RqState(cfg.redis.url, socket_timeout=cfg.redis.socket_timeout_seconds,
                 key_prefix=cfg.redis.key_prefix)
    waiting: Counter[str] = Counter()
    try:
        await store.connect(min_size=1)
        after = None
        while True:
            page = await store.active_page(after, cfg.sweep.page_size)
            if not page:
                break
            jobs = await rq.read_jobs(r.row.rq_id for r in page if r.row.rq_id)
            waiting.update(j.origin for j in jobs.values()
                           if j.status is RqStatus.QUEUED and j.origin)
            if len(page) < cfg.sweep.page_size:
                break
            after = page[-1].row.id
        served = await rq.served_queues() if waiting else set()
    except (BackendUnavailable, ReconcilerError) as exc:
        return Line("WARN", "unserved queues", f"could not be counted: {exc}")
    finally:
        await store.close()
        await rq.close()
    unserved = {q: n for q, n in sorted(waiting.items()) if q not in served}
    if not unserved:
        return Line("OK", "unserved queues", f"every queue rows wait on ({len(waiting)}) "
                    "has a live worker")
    shown = ", ".join(f"{q} ({n} rows)" for q, n in list(unserved.items())[:10])
    more = f" and {len(unserved) - 10} more" if len(unserved) > 10 else ""
    return Line("WARN", "unserved queues", f"no live worker listens to {shown}{more}: those "
                "rows wait (never failed for it) until a worker serves the queue")
