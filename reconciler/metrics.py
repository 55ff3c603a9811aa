"""Prometheus metrics and the tiny HTTP server that serves /metrics and /healthz.

Every metric lives in one private registry so that tests and the demo can run several
daemons in one process tree without colliding. Nothing here talks to Redis or Postgres:
the daemon pushes state in, the server only reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import math
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted

from reconciler import __version__

PREFIX = "rq_reconciler_"

# `_created` series double the exposition size and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SWEEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """All of the daemon's metric objects, in one registry."""

    def __init__(self, *, process: bool = True) -> None:
        """`process`: also export the process's own series, as prometheus_client's
        default registry does: process_* (resident memory, CPU seconds, open and maximum
        file descriptors, start time), python_info and python_gc_*."""
        r = self.registry = CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        p = PREFIX
        self.cancel_requests = Counter(
            p + "cancel_requests", "Cancel requests finished, by outcome.", ["outcome"], registry=r
        )
        self.cancel_duration = Histogram(
            p + "cancel_duration_seconds",
            "Cancel request inserted -> outcome written.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.transitions = Counter(
            p + "transitions",
            "Row transitions applied by the daemon.",
            ["from_status", "to_status", "reason"],
            registry=r,
        )
        self.sweeps = Counter(p + "sweeps", "Sweeps run, by result.", ["result"], registry=r)
        self.sweep_duration = Histogram(
            p + "sweep_duration_seconds", "Duration of a full sweep.", buckets=_SWEEP_BUCKETS,
            registry=r,
        )
        self.last_sweep_success = Gauge(
            p + "last_sweep_success_timestamp_seconds",
            "Unix time of the last sweep that completed.",
            registry=r,
        )
        self.jobs_active = Gauge(
            p + "jobs_active", "Active rows seen by the last sweep, by status.", ["status"],
            registry=r,
        )
        self.jobs_stuck = Gauge(
            p + "jobs_stuck", "Active rows older than sweep.stuck_after_seconds.", registry=r
        )
        self.oldest_active_age = Gauge(
            p + "oldest_active_job_age_seconds", "Age of the oldest active row.", registry=r
        )
        self.events = Counter(
            p + "events", "Wake-ups received, by source.", ["source"], registry=r
        )
        self.sync_lag = Histogram(
            p + "sync_lag_seconds",
            "RQ ended_at -> row updated, for synced transitions.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.process_signals = Counter(
            p + "process_signals", "Signals sent to proven work-horses.", ["signal"], registry=r
        )
        self.backend_up = Gauge(
            p + "backend_up", "1 when the backend is connected.", ["backend"], registry=r
        )
        self.orphan_breaker_open = Gauge(
            p + "orphan_breaker_open",
            "1 when the last sweep refused a mass 'not found' failure.",
            registry=r,
        )
        self.cancel_handovers = Counter(
            p + "cancel_handovers",
            "Cancels of jobs on another host, by result: handed (to the replica on that "
            "host), taken (a hand-over this replica carried out), fallback (stop-job: no "
            "live replica there, or it did not take over in time).",
            ["result"],
            registry=r,
        )
        self.replicas_alive = Gauge(
            p + "replicas_alive", "Replicas with a fresh heartbeat, this one included.",
            registry=r,
        )
        for result in ("handed", "taken", "fallback"):
            self.cancel_handovers.labels(result=result)
        self.graceful_stop_available = Gauge(
            p + "graceful_stop_available",
            "1 while this replica can see and signal every live worker registered from its "
            "hostname (so their cancels start with SIGTERM); 0 when one runs in a PID "
            "namespace or as a user it cannot reach, whose cancels fall back to RQ's stop-job.",
            registry=r,
        )
        self.metrics_server_errors = Counter(
            p + "metrics_server_errors",
            "Problems of the /metrics server, by kind: accept (e.g. EMFILE), io, timeout, "
            "too_large, bad_request, evicted / rejected (connection cap), internal.",
            ["kind"],
            registry=r,
        )
        for kind in ("accept", "io", "timeout", "too_large", "bad_request", "evicted",
                     "rejected", "internal"):
            self.metrics_server_errors.labels(kind=kind)
        self.build_info = Info(p + "build", "Build information.", registry=r)
        self.build_info.info({"version": __version__})
        for backend in ("redis", "postgres"):
            self.backend_up.labels(backend=backend).set(0)
        # Known label values start at 0 so that rate()/increase() see the first event.
        for outcome in ("cancelled", "already_finished", "failed"):
            self.cancel_requests.labels(outcome=outcome)
        for result in ("ok", "failed", "breaker"):
            self.sweeps.labels(result=result)
        for source in ("cancel_notify", "keyspace", "local_worker", "timer", "lost_race", "locked_retry",
                       "replica_stale",
                       "intent"):
            self.events.labels(source=source)
        for sig in ("SIGTERM", "SIGKILL"):
            self.process_signals.labels(signal=sig)
        self.orphan_breaker_open.set(0)
        # SPEC "Nothing the data does stops the daemon": what was skipped, by kind: row (a
        # change the database refused), key (a job or worker key name we cannot use),
        # job_hash (a job key we cannot read, e.g. of the wrong type). Each counted once.
        self.poison = Counter(
            p + "poison", "Rows or keys skipped because they could not be read or written.",
            ["kind"], registry=r,
        )
        for kind in ("row", "key", "job_hash"):
            self.poison.labels(kind=kind)
        self.worker_breaker_open = Gauge(
            p + "worker_breaker_open",
            "1 when the last sweep refused to take a mass of workers for gone on Redis' "
            "word alone (their keys vanished at once: a failover, a flush, a clock jump).",
            registry=r,
        )
        self.worker_breaker_open.set(0)
        # SPEC "RQ's own lifecycle": jobs put back on their queue, by cause; queues that
        # jobs wait on and no live worker listens to (as of the last sweep).
        self.requeues = Counter(
            p + "requeues", "Jobs put back on their queue, by cause (stranded: taken into a "
            "queue's intermediate list by a worker that died before it started them).",
            ["cause"], registry=r,
        )
        for cause in ("worker_died", "disruption", "stranded"):
            self.requeues.labels(cause=cause)
        self.queues_unserved = Gauge(
            p + "queues_unserved", "Queues that rows wait on and no live worker listens to "
            "(as of the last sweep).", registry=r,
        )
        for source in ("dependency", "stranded"):
            self.events.labels(source=source)

    def count_poison(self, kind: str, _name: str = "", _error: str = "") -> None:
        """A PoisonCallback for Store(on_poison=...) and RqState(on_poison=...)."""
        self.poison.labels(kind=kind).inc()

    def render(self) -> bytes:
        """The Prometheus text format (what a scrape without an Accept header gets)."""
        return generate_latest(self.registry)

    def exposition(self, accept: str = "", accept_encoding: str = "",
                   names: list[str] | None = None) -> tuple[bytes, list[tuple[str, str]]]:
        """Body and headers of a /metrics answer, by prometheus_client's own rules (as its
        WSGI app answers): OpenMetrics when `accept` asks for it, else the text format;
        gzip when `accept_encoding` allows it; only the families in `names` (the
        `name[]` query parameter) when given."""
        encoder, content_type = choose_encoder(accept)
        registry = self.registry.restricted_registry(names) if names else self.registry
        body = encoder(registry)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(accept_encoding):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        return body, headers


HealthCheck = Callable[[], bool]

log = structlog.get_logger("reconciler.metrics")

# errno values that mean "this process or host ran out of something", not "that client
# went away": an outage symptom, logged as a warning.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_TEXT = "text/plain; charset=utf-8"
_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable",
}
# Answered without reading a byte when every slot is busy writing (see _admit).
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 5\r\nRetry-After: 1\r\nConnection: close\r\n\r\nbusy\n")


class _TooLarge(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Conn:
    """One accepted connection. `reading` until its request is complete: only those may
    be dropped to make room."""

    __slots__ = ("reading", "sock", "task")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reading = True
        self.task: asyncio.Task[None] | None = None


class MetricsServer:
    """A small asyncio HTTP/1.1 server: GET or HEAD /metrics and /healthz, one request per
    connection. It must never be what stops the daemon, nor be stopped by its clients.

    - A whole-request deadline: request line and headers within `request_deadline`
      seconds in total, however slowly they drip in; a response is written within
      `write_deadline` or the connection is dropped.
    - A connection cap (256: a few MB and as many descriptors at most). At the cap a new
      connection takes the place of the oldest one still sending its request. A
      Prometheus scrape sends its request right after connecting and is served as soon as
      it is in, so slow clients cannot starve it: one would be dropped only after 255
      newer connections arrived in the meantime (70 ms of the 3,600 a second that 1,000
      reconnecting slow clients managed in tests/integration/test_metrics_flood.py).
      When every slot is writing a response, the newcomer gets a 503 without a byte read.
    - Bounded requests: a request line over `max_request_line` bytes gets 414, headers
      over `max_header_bytes` 431, anything unparseable 400. Nothing a client sends raises.
    - Its own accept loop: an OSError such as EMFILE in accept() is logged, counted and
      retried with a back-off; the loop (and the daemon) carries on.

    Every problem is counted in `rq_reconciler_metrics_server_errors_total{kind}`.
    """

    def __init__(self, metrics: Metrics, healthy: HealthCheck, host: str, port: int, *,
                 max_connections: int = 256, request_deadline: float = 5.0,
                 write_deadline: float = 10.0, max_request_line: int = 8192,
                 max_header_bytes: int = 16384) -> None:
        self._metrics = metrics
        self._healthy = healthy
        self._host = host
        self._port = port
        self.max_connections = max_connections
        self.request_deadline = request_deadline
        self.write_deadline = write_deadline
        self.max_request_line = max_request_line
        self.max_header_bytes = max_header_bytes
        self._socks: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        # Insertion order is age: the first `reading` entry is the oldest slow client.
        self._conns: dict[_Conn, None] = {}
        self._last_cap_log = -math.inf

    @property
    def port(self) -> int:
        if not self._socks:
            return self._port
        return int(self._socks[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Connections being served now (at most max_connections)."""
        return len(self._conns)

    async def start(self) -> None:
        """Listen on every address the host resolves to (as asyncio.start_server does),
        all on one port: the first one's, when asked for port 0."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self._host or None, self._port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        port = self._port
        try:
            for i, (family, type_, proto, _canon, addr) in enumerate(dict.fromkeys(infos)):
                try:
                    sock = self._listen(family, type_, proto, (addr[0], port, *addr[2:]))
                except OSError as exc:
                    if i == 0:
                        raise
                    # e.g. "localhost" resolves to ::1 on a host without IPv6.
                    log.warning("metrics_bind_failed", address=addr[0], error=str(exc))
                    continue
                port = int(sock.getsockname()[1])
                self._socks.append(sock)
        except BaseException:
            await self.close()
            raise
        self._accept_tasks = [
            asyncio.create_task(self._accept_loop(sock), name="metrics-accept")
            for sock in self._socks
        ]
        for t in self._accept_tasks:
            t.add_done_callback(_log_if_failed)

    @staticmethod
    def _listen(family: int, type_: int, proto: int, addr: tuple[Any, ...]) -> socket.socket:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # As asyncio does: an IPv6 socket serves IPv6 only, its IPv4 twin (from
                # the same getaddrinfo answer) serves IPv4.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            # Room for a burst: a full backlog drops SYNs, and a dropped SYN costs the
            # scrape behind it a one-second retransmit.
            sock.listen(512)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def close(self) -> None:
        tasks = [*self._accept_tasks, *(c.task for c in self._conns if c.task is not None)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._accept_tasks = []
        for c in list(self._conns):
            c.sock.close()
        self._conns.clear()
        for sock in self._socks:
            sock.close()
        self._socks = []

    # -- accepting --------------------------------------------------------------------------

    def _count(self, kind: str) -> None:
        self._metrics.metrics_server_errors.labels(kind=kind).inc()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.0
        failures = 0
        while True:
            try:
                sock, _addr = await loop.sock_accept(listener)
            except OSError as exc:
                self._count("accept")
                failures += 1
                if failures == 1:
                    log.warning("metrics_accept_failed", error=str(exc), errno=exc.errno,
                                exhausted=exc.errno in _EXHAUSTED)
                if exc.errno in _EXHAUSTED:
                    # The connection waits in the backlog; retrying at once would spin.
                    backoff = min(1.0, max(0.05, backoff * 2))
                    await asyncio.sleep(backoff)
                continue
            if failures:
                log.info("metrics_accept_recovered", failed_attempts=failures)
                failures, backoff = 0, 0.0
            self._admit(sock)
            # Let the newcomer read what it has already sent before the next accept: a
            # scrape whose request is in is then served before a flood can push it out.
            await asyncio.sleep(0)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if len(self._conns) >= self.max_connections:
            oldest = next((c for c in self._conns if c.reading), None)
            if oldest is None:
                self._count("rejected")
                self._log_cap("rejected")
                with contextlib.suppress(OSError):
                    sock.send(_BUSY)
                sock.close()
                return
            self._count("evicted")
            self._log_cap("evicted")
            del self._conns[oldest]
            if oldest.task is not None:
                oldest.task.cancel()  # its finally closes the socket
        conn = _Conn(sock)
        self._conns[conn] = None
        conn.task = asyncio.create_task(self._serve(conn), name="metrics-conn")
        conn.task.add_done_callback(_log_if_failed)

    def _log_cap(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_cap_log >= 60:
            self._last_cap_log = now
            log.warning("metrics_connection_cap", action=what, max_connections=self.max_connections)

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        sock = conn.sock
        try:
            try:
                async with asyncio.timeout(self.request_deadline):
                    head = await self._read_head(loop, sock)
            except TimeoutError:
                self._count("timeout")
                return
            except _TooLarge as exc:
                self._count("too_large")
                conn.reading = False
                await self._send(loop, sock, self._response(exc.status, b"request too large\n"))
                await self._linger(loop, sock)
                return
            if head is None:
                return  # the client closed before finishing its request
            conn.reading = False
            try:
                data = self._answer(head)
            except Exception:
                # A bug of ours, or a health check that raised: this answer fails, not
                # the server.
                self._count("internal")
                log.exception("metrics_request_failed")
                data = self._response(500, b"internal error\n")
            await self._send(loop, sock, data)
        except OSError as exc:
            self._count("io")
            if exc.errno in _EXHAUSTED:
                log.warning("metrics_io_failed", error=str(exc), errno=exc.errno)
            else:
                log.debug("metrics_io_failed", error=str(exc), errno=exc.errno)
        except Exception:
            self._count("internal")
            log.exception("metrics_request_failed")
        finally:
            self._conns.pop(conn, None)
            sock.close()

    async def _read_head(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes | None:
        """Request line and headers, or None if the client hung up first."""
        buf = bytearray()
        while True:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                return None
            scan_from = max(0, len(buf) - 3)
            buf += chunk
            line_end = buf.find(b"\n")
            if (line_end == -1 and len(buf) > self.max_request_line) or line_end > self.max_request_line:
                raise _TooLarge(414)
            end = buf.find(b"\r\n\r\n", scan_from)
            if end == -1:
                end = buf.find(b"\n\n", scan_from)
            if end != -1:
                if end > self.max_header_bytes:
                    raise _TooLarge(431)
                return bytes(buf[:end])
            if len(buf) > self.max_header_bytes:
                raise _TooLarge(431)

    async def _send(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.write_deadline):
                await loop.sock_sendall(sock, data)
        except TimeoutError:
            self._count("timeout")

    async def _linger(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """After an early answer, read (and drop) a little of what the client is still
        sending, so that closing with unread data does not reset the connection before
        the client has read our answer."""
        with contextlib.suppress(OSError, TimeoutError):
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(1.0):
                drained = 0
                while drained < 1 << 16:
                    chunk = await loop.sock_recv(sock, 4096)
                    if not chunk:
                        break
                    drained += len(chunk)

    def _answer(self, head: bytes) -> bytes:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._count("bad_request")
            return self._response(400, b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            self._count("bad_request")
            return self._response(405, b"method not allowed\n", extra="Allow: GET, HEAD\r\n")
        path, _, query = target.partition(b"?")
        head_only = method == b"HEAD"
        if path == b"/metrics":
            headers = _headers(head)
            names = parse_qs(query.decode("latin-1")).get("name[]")
            body, fields = self._metrics.exposition(
                headers.get("accept", ""), headers.get("accept-encoding", ""), names)
            ctype = fields[0][1]
            extra = "".join(f"{k}: {v}\r\n" for k, v in fields[1:])
            return self._response(200, body, ctype=ctype, head_only=head_only,
                                  extra=extra + "Vary: Accept, Accept-Encoding\r\n")
        if path == b"/healthz":
            ok = self._healthy()
            status, body = (200 if ok else 503), (b"ok\n" if ok else b"unhealthy\n")
        else:
            status, body = 404, b"not found\n"
        return self._response(status, body, head_only=head_only)

    @staticmethod
    def _response(status: int, body: bytes, *, ctype: str = _TEXT, extra: str = "",
                  head_only: bool = False) -> bytes:
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
        ).encode("latin-1")
        return head if head_only else head + body


def _headers(head: bytes) -> dict[str, str]:
    """A request's headers by lower-case name (a repeated one: its values joined by ,)."""
    out: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        name, colon, value = line.partition(":")
        if colon:
            key = name.strip().lower()
            out[key] = f"{out[key]}, {value.strip()}" if key in out else value.strip()
    return out


def _log_if_failed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("metrics_task_failed", task=task.get_name(), exc_info=task.exception())
