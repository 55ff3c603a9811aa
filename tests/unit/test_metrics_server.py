"""MetricsServer in-process on port 0: deadlines, the connection cap, HEAD, oversized
requests, EMFILE in accept. Real sockets, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from reconciler.metrics import Metrics, MetricsServer

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def both_loops(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[str], None]:
    """Run an async test once on asyncio's loop and once on uvloop, which the daemon
    runs on and whose accept and socket errors take other paths."""

    @pytest.mark.parametrize("loop", sorted(LOOPS))
    def test(loop: str) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(fn())

    test.__name__, test.__doc__ = fn.__name__, fn.__doc__
    return test


class Health:
    def __init__(self) -> None:
        self.ok = True
        self.boom = False

    def __call__(self) -> bool:
        if self.boom:
            raise RuntimeError("health check exploded")
        return self.ok


@contextlib.asynccontextmanager
async def serving(process: bool = False,
                  **kw: float) -> AsyncIterator[tuple[MetricsServer, Metrics, Health]]:
    """Without the process's own series unless asked: their values move between two
    renders, and most tests compare bodies byte for byte."""
    m = Metrics(process=process)
    health = Health()
    srv = MetricsServer(m, health, "127.0.0.1", 0, **kw)  # type: ignore[arg-type]
    await srv.start()
    try:
        yield srv, m, health
    finally:
        await srv.close()


async def request(port: int, raw: bytes, *, timeout: float = 5.0) -> bytes:
    """Send `raw`, read the whole answer (the server closes every connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def split(resp: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


async def get_with(port: int, **headers: str) -> tuple[int, dict[str, str], bytes]:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return split(await request(port, f"GET /metrics HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()))


def errors(m: Metrics, kind: str) -> float:
    return m.metrics_server_errors.labels(kind=kind)._value.get()


def small_window_client(port: int) -> socket.socket:
    """A client whose receive window stays tiny (set before connect, or it is ignored)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def _send_buffer_max() -> int:
    """The most a TCP socket's send buffer grows to here (tcp_wmem's third field)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 * 1024 * 1024


def make_huge(m: Metrics) -> None:
    """An exposition half again as large as the server's send buffer can grow (6 MB with
    Linux's default 4 MB): more than its send buffer and a small-window client's receive
    buffer hold together. (Each filler series is 69 bytes. The tests that use it fail,
    not pass, if it ever fit: their answer would be written whole.)"""
    for i in range(int(_send_buffer_max() * 1.5) // 69 + 1):
        m.events.labels(source=f"filler-source-number-{i:06d}").inc()


async def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return split(await request(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))


# -- the ordinary answers ------------------------------------------------------------------


@both_loops
async def test_get_metrics_is_the_exposition_unchanged() -> None:
    async with serving() as (srv, m, _h):
        status, headers, body = await get(srv.port)
    assert status == 200
    # prometheus_client's choice for a scrape that states no preference.
    assert headers["content-type"] == choose_encoder("")[1]
    assert headers["content-type"].startswith("text/plain; version=")
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    assert body == m.render()
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "rq_reconciler_backend_up" in names
    assert "rq_reconciler_metrics_server_errors" in names
    assert headers["vary"] == "Accept, Accept-Encoding"
    assert "content-encoding" not in headers


@both_loops
async def test_process_series_are_exported_by_prometheus_clients_collectors() -> None:
    async with serving(process=True) as (srv, _m, _h):
        _status, _headers, body = await get(srv.port)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds",
                 "process_cpu_seconds", "process_start_time_seconds", "python_info"):
        assert name in families, name
    [rss] = families["process_resident_memory_bytes"].samples
    assert rss.value > 1_000_000  # a Python process holds more than a megabyte
    [fds] = families["process_open_fds"].samples
    assert fds.value >= 3


@both_loops
async def test_openmetrics_when_accepted() -> None:
    async with serving() as (srv, _m, _h):
        status, headers, body = await get_with(
            srv.port, Accept="application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    families = {f.name for f in openmetrics_families(body.decode())}
    assert "rq_reconciler_backend_up" in families


@both_loops
async def test_gzip_when_accepted_and_head_says_the_same_length() -> None:
    async with serving() as (srv, m, _h):
        status, headers, body = await get_with(srv.port, Accept_Encoding="gzip, deflate")
        _s, h_headers, h_body = split(await request(
            srv.port, b"HEAD /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n"))
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == m.render()
    assert int(headers["content-length"]) == len(body)
    assert h_body == b"" and h_headers["content-encoding"] == "gzip"
    assert int(h_headers["content-length"]) == len(body)


@both_loops
async def test_name_filter_keeps_only_the_families_asked_for() -> None:
    async with serving() as (srv, _m, _h):
        _s, _h2, body = await get(srv.port, "/metrics?name[]=rq_reconciler_backend_up")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert names == {"rq_reconciler_backend_up"}


@both_loops
async def test_head_sends_headers_with_length_and_no_body() -> None:
    async with serving() as (srv, m, _h):
        status, headers, body = await get(srv.port, method="HEAD")
        h_status, h_headers, h_body = await get(srv.port, "/healthz", method="HEAD")
    assert status == 200
    assert body == b""
    assert int(headers["content-length"]) == len(m.render())
    assert h_status == 200 and h_body == b"" and h_headers["content-length"] == "3"


@both_loops
async def test_healthz_follows_the_health_check() -> None:
    async with serving() as (srv, _m, health):
        assert (await get(srv.port, "/healthz"))[::2] == (200, b"ok\n")
        health.ok = False
        assert (await get(srv.port, "/healthz?verbose=1"))[::2] == (503, b"unhealthy\n")


@both_loops
async def test_unknown_path_method_and_garbage() -> None:
    async with serving() as (srv, m, _h):
        assert (await get(srv.port, "/nope"))[0] == 404
        status, headers, _ = await get(srv.port, "/metrics", method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert split(await request(srv.port, b"\x00\xff\xfe garbage\r\n\r\n"))[0] == 400
        assert split(await request(srv.port, b"GET /metrics SPDY/3\r\n\r\n"))[0] == 400
        # Bare LF line ends are read too.
        assert split(await request(srv.port, b"GET /healthz HTTP/1.0\n\n"))[0] == 200
        assert errors(m, "bad_request") == 3


@both_loops
async def test_a_health_check_that_raises_costs_one_500() -> None:
    async with serving() as (srv, m, health):
        health.boom = True
        assert (await get(srv.port, "/healthz"))[0] == 500
        health.boom = False
        assert (await get(srv.port, "/healthz"))[0] == 200
        assert errors(m, "internal") == 1


# -- oversized requests ----------------------------------------------------------------------


@both_loops
async def test_long_request_line_gets_414() -> None:
    async with serving(max_request_line=1024) as (srv, m, _h):
        raw = b"GET /metrics?" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n"
        assert split(await request(srv.port, raw))[0] == 414
        # No newline at all yet, but already past the limit: no need to wait for more.
        status, _, _ = split(await request(srv.port, b"GET /" + b"b" * 2000))
        assert status == 414
        assert errors(m, "too_large") == 2
        assert (await get(srv.port))[0] == 200


@both_loops
async def test_huge_headers_get_431() -> None:
    async with serving(max_header_bytes=4096) as (srv, m, _h):
        raw = b"GET /metrics HTTP/1.1\r\n" + b"".join(
            b"X-Filler-%d: %s\r\n" % (i, b"v" * 100) for i in range(200)) + b"\r\n"
        assert split(await request(srv.port, raw))[0] == 431
        # One gigantic header line, never ended.
        raw = b"GET /metrics HTTP/1.1\r\nCookie: " + b"c" * 100_000
        assert split(await request(srv.port, raw))[0] == 431
        assert errors(m, "too_large") == 2
        assert (await get(srv.port))[0] == 200


# -- deadlines ---------------------------------------------------------------------------------


@both_loops
async def test_whole_request_deadline_against_a_drip_feed() -> None:
    """A client that sends a byte every 0.1 s never lets a per-read timeout fire; the
    deadline is for the whole request."""
    async with serving(request_deadline=0.6) as (srv, m, _h):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        t0 = time.monotonic()
        closed_after = None
        for b in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"z" * 100:
            try:
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(0.1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.001):
                        if await reader.read(1) == b"":
                            raise ConnectionResetError
            except ConnectionError:
                closed_after = time.monotonic() - t0
                break
        writer.close()
        assert closed_after is not None, "server never dropped the drip-fed request"
        assert 0.5 <= closed_after < 2.0
        assert errors(m, "timeout") == 1
        assert srv.connections == 0


@both_loops
async def test_a_client_that_never_reads_its_answer_is_dropped() -> None:
    async with serving(write_deadline=0.5) as (srv, m, _h):
        # An answer far larger than the socket buffers, never read.
        make_huge(m)
        sock = small_window_client(srv.port)
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        try:
            t0 = time.monotonic()
            while errors(m, "timeout") == 0 and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.05)
            assert errors(m, "timeout") == 1
            assert time.monotonic() - t0 >= 0.4
            assert srv.connections == 0
        finally:
            sock.close()
        assert (await get(srv.port, "/healthz"))[0] == 200


# -- the connection cap ---------------------------------------------------------------------------


@both_loops
async def test_at_the_cap_the_oldest_slow_client_makes_room_for_a_scrape() -> None:
    async with serving(max_connections=8, request_deadline=30) as (srv, m, _h):
        slow = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
        try:
            for s in slow:
                s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
            t0 = time.monotonic()
            while errors(m, "evicted") < 12 and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.01)
            assert srv.connections == 8
            assert errors(m, "evicted") == 12
            t0 = time.monotonic()
            status, _, body = await get(srv.port)
            assert status == 200 and body == m.render()
            assert time.monotonic() - t0 < 1.0
            # The oldest were dropped: their sockets read EOF (or a reset).
            slow[0].settimeout(2)
            with contextlib.suppress(ConnectionResetError):
                assert slow[0].recv(10) == b""
        finally:
            for s in slow:
                s.close()
        assert srv.connections <= 8


@both_loops
async def test_at_the_cap_with_every_slot_writing_a_newcomer_gets_503_unread() -> None:
    async with serving(max_connections=2, write_deadline=30) as (srv, m, _h):
        make_huge(m)
        stuck = []
        for _ in range(2):  # each asks for the big answer and never reads it
            s = small_window_client(srv.port)
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            stuck.append(s)
        try:
            await asyncio.sleep(0.3)
            assert srv.connections == 2
            status, headers, body = split(await request(srv.port, b""))
            assert status == 503 and body == b"busy\n" and headers["retry-after"] == "1"
            assert errors(m, "rejected") == 1
        finally:
            for s in stuck:
                s.close()


# -- accept() failing ----------------------------------------------------------------------------


@both_loops
async def test_emfile_in_accept_is_counted_and_the_server_recovers() -> None:
    async with serving() as (srv, m, _h):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setblocking(False)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hogs: list[int] = []
        try:
            # Take every descriptor this process may have left, then connect: the
            # server's accept() gets EMFILE.
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
            with contextlib.suppress(OSError):
                while True:
                    hogs.append(os.open(os.devnull, os.O_RDONLY))
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", srv.port))
            t0 = time.monotonic()
            while errors(m, "accept") < 2 and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.02)
            assert errors(m, "accept") >= 2  # retried, with a back-off, not given up
        finally:
            for fd in hogs:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        # The connection waited in the backlog; it is served now.
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"GET /healthz HTTP/1.1\r\n\r\n")
        async with asyncio.timeout(5):
            data = b""
            while chunk := await loop.sock_recv(client, 4096):
                data += chunk
        client.close()
        assert split(data)[0] == 200
        assert (await get(srv.port))[0] == 200


@both_loops
async def test_close_stops_listening_and_drops_connections() -> None:
    for host in ("127.0.0.1", "localhost", ""):
        srv = MetricsServer(Metrics(), lambda: True, host, 0)
        await srv.start()
        port = srv.port
        assert port != 0
        idle = socket.create_connection(("127.0.0.1", port))
        await asyncio.sleep(0.05)
        assert srv.connections == 1
        await srv.close()
        idle.settimeout(2)
        with contextlib.suppress(ConnectionResetError):
            assert idle.recv(10) == b""
        idle.close()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


@both_loops
async def test_metrics_listen_port_alone_binds_loopback_and_empty_host_every_interface() -> None:
    from reconciler.config import from_mapping

    for listen, bound in (("0", {"127.0.0.1"}), (":0", {"0.0.0.0"})):
        host, port = from_mapping({"metrics": {"listen": listen}}, environ={}).metrics.host_port
        srv = MetricsServer(Metrics(), lambda: True, host, port)
        await srv.start()
        try:
            assert {s.getsockname()[0] for s in srv._socks} == bound
        finally:
            await srv.close()
