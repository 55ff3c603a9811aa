"""Prometheus metrics and the tiny HTTP server that serves /metrics and /healthz.

Every metric lives in one private registry so that tests and the demo can run several
daemons in one process tree without colliding. Nothing here talks to Redis or Postgres:
the daemon pushes state in, the server only reads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from reconciler import __version__

PREFIX = "rq_reconciler_"

# `_created` series double the exposition size and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SWEEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """All of the daemon's metric objects, in one registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
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
        self.build_info = Info(p + "build", "Build information.", registry=r)
        self.build_info.info({"version": __version__})
        for backend in ("redis", "postgres"):
            self.backend_up.labels(backend=backend).set(0)
        # Known label values start at 0 so that rate()/increase() see the first event.
        for outcome in ("cancelled", "already_finished", "failed"):
            self.cancel_requests.labels(outcome=outcome)
        for result in ("ok", "failed", "breaker"):
            self.sweeps.labels(result=result)
        for source in ("cancel_notify", "keyspace", "local_worker", "timer"):
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

    def count_poison(self, kind: str, _name: str = "", _error: str = "") -> None:
        """A PoisonCallback for Store(on_poison=...) and RqState(on_poison=...)."""
        self.poison.labels(kind=kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


HealthCheck = Callable[[], bool]


class MetricsServer:
    """A minimal asyncio HTTP/1.0 server: GET /metrics, GET /healthz. No framework needed."""

    def __init__(self, metrics: Metrics, healthy: HealthCheck, host: str, port: int) -> None:
        self._metrics = metrics
        self._healthy = healthy
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            # Drain the headers; we never need them.
            while True:
                h = await asyncio.wait_for(reader.readline(), timeout=5)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
            elif path == "/healthz":
                ok = self._healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain; charset=utf-8", (b"ok\n" if ok else b"unhealthy\n")
            else:
                status, ctype, body = "404 Not Found", "text/plain; charset=utf-8", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
