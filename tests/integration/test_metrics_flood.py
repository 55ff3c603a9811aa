"""1,000 slow clients against the real daemon's /metrics: scrapes still answer promptly,
and the daemon lives on (its watchdog keeps beating, /healthz stays 200)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import DaemonProc, metric_value, run_cli, write_config

CLIENTS = 1000
FLOOD_SECONDS = 12.0


async def _slow_client(port: int, stop: asyncio.Event, stats: dict[str, int]) -> None:
    """Slowloris: headers a byte at a time, never finished; reconnect when dropped."""
    drip = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 10_000
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats["connect_failed"] += 1
            await asyncio.sleep(0.2)
            continue
        stats["connected"] += 1
        try:
            for b in drip:
                if stop.is_set() or reader.at_eof():
                    break
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(0.3)
            stats["dropped"] += 1
        except OSError:
            stats["dropped"] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _scrape(port: int) -> tuple[float, int, bytes]:
    """As Prometheus does it: connect, send the request at once, read to the end. From
    a thread of its own, so that the slow clients' event loop cannot delay its request."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n")
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0
    return time.monotonic() - t0, status, body


async def _flood(port: int) -> tuple[list[tuple[float, int, bytes]], dict[str, int]]:
    stop = asyncio.Event()
    stats = {"connected": 0, "dropped": 0, "connect_failed": 0}
    clients = [asyncio.create_task(_slow_client(port, stop, stats)) for _ in range(CLIENTS)]
    scrapes = []
    try:
        await asyncio.sleep(2.0)  # let the flood build up past the connection cap
        t_end = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < t_end:
            scrapes.append(await asyncio.to_thread(_scrape, port))
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
    return scrapes, stats


def _notifications(d: DaemonProc) -> list[str]:
    """The sd_notify datagrams queued on the daemon's $NOTIFY_SOCKET since last read."""
    assert d.sock is not None
    out = []
    d.sock.setblocking(False)
    try:
        while True:
            out.append(d.sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        d.sock.setblocking(True)
    return out


@pytest.mark.alone  # 1,000 clients want the CPU: beside other tests, scrapes starve
def test_thousand_slow_clients_do_not_starve_a_scrape(tmp_path: Path, redis_url: str,
                                                      pg_dsn: str) -> None:
    cfg = write_config(tmp_path / "config.toml", redis_url, pg_dsn)
    p = run_cli(cfg, "migrate")
    assert p.returncode == 0, p.stderr
    d = DaemonProc(cfg, tmp_path / "daemon.log").start()
    try:
        port = int(d.metrics_url().rsplit(":", 1)[1].split("/")[0])
        _notifications(d)  # forget what came before the flood
        scrapes, stats = asyncio.run(_flood(port))
        # The daemon's main loop kept beating through the flood (every second: half of
        # the WATCHDOG_USEC=2 s that DaemonProc gives it).
        beats = _notifications(d).count("WATCHDOG=1")
        assert beats >= FLOOD_SECONDS / 3, beats
        assert d.proc is not None and d.proc.poll() is None, d.log_text()[-3000:]

        assert stats["connected"] > 1000, stats  # the slow clients were dropped and came back
        assert len(scrapes) >= 10
        assert all(status == 200 for _, status, _ in scrapes), [s for _, s, _ in scrapes]
        for _, _, body in scrapes:
            names = {f.name for f in text_string_to_metric_families(body.decode())}
            assert "rq_reconciler_backend_up" in names
        times = sorted(t for t, _, _ in scrapes)
        # Promptly: never waiting out a slow client's 5 s request deadline.
        assert statistics.median(times) < 1.0, times
        assert times[-1] < 4.0, times

        text = d.scrape()
        assert metric_value(text, "rq_reconciler_metrics_server_errors_total", kind="evicted") > 0
        assert metric_value(text, "rq_reconciler_backend_up", backend="postgres") == 1
        health = d.metrics_url().replace("/metrics", "/healthz")
        with urllib.request.urlopen(health, timeout=5) as r:
            assert r.status == 200
    finally:
        d.close()
