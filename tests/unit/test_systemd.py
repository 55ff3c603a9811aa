"""sd_notify over a real unix datagram socket; the watchdog pets only once ready."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from reconciler.systemd import sd_notify, watchdog, watchdog_interval


def test_without_notify_socket_nothing_is_sent() -> None:
    assert sd_notify("READY=1", environ={}) is False


def test_notify_reaches_the_socket_and_abstract_names_work(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": path})
        assert rx.recv(100) == b"READY=1"
    name = f"rq-reconciler-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        assert sd_notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert rx.recv(100) == b"WATCHDOG=1"


def test_a_full_receiver_never_blocks(tmp_path: Path) -> None:
    path = str(tmp_path / "full")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        results = [sd_notify("WATCHDOG=1" * 50, environ={"NOTIFY_SOCKET": path}) for _ in range(5000)]
        assert results[0] is True
        assert results[-1] is False  # the queue filled: refused at once, not blocked


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "bogus"}) is None


async def test_watchdog_pets_only_when_ready(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "wd")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    ready = False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.setblocking(False)
        task = asyncio.create_task(watchdog(lambda: ready, 0.01))
        await asyncio.sleep(0.05)
        try:
            rx.recv(100)
            got_early = True
        except BlockingIOError:
            got_early = False
        ready = True
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not got_early
        assert rx.recv(100) == b"WATCHDOG=1"
