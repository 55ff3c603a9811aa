"""systemd's notify protocol (Type=notify): READY, STOPPING, STATUS, WATCHDOG.

Must never block the event loop: a receiver that stopped reading would otherwise freeze
the daemon inside its own watchdog ping. Without $NOTIFY_SOCKET everything is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one notify datagram; False if there is no socket or it could not be sent."""
    addr = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(addr)
            s.send(message.encode())
        return True
    except OSError:  # includes BlockingIOError
        return False


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of $WATCHDOG_USEC in seconds (systemd's advice), or None if not asked."""
    usec = (environ if environ is not None else os.environ).get("WATCHDOG_USEC", "")
    return int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None


async def watchdog(is_ready: Callable[[], bool], interval: float | None) -> None:
    """Pet the watchdog while the loop runs. Only after READY: start-up may wait out a
    backend outage for as long as it lasts, and systemd must not restart us for that."""
    if interval is None:
        await asyncio.Event().wait()  # nothing asked for: sleep until cancelled
    assert interval is not None
    while True:
        if is_ready():
            sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)
