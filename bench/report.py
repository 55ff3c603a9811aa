"""How a benchmark script runs and reports: its entry point (servers stopped however it
ends), plain-text tables, PASS/MISS beside each goal, and the host's load around it.

Reports numbers, never asserts them: a script exits 0 whatever it measured."""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

import psutil

from bench.stats import mb
from reconciler.devstack import (
    cleanup_all,
)


def run(main: Callable[[], int]) -> NoReturn:
    """Every script's entry point: exit with `main()`'s status, and stop every server and
    process it started however it ends (an exception, Ctrl-C, or a SIGTERM: `kill`,
    `timeout`, a CI runner giving up, which would otherwise leave them running)."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        sys.exit(main())
    finally:
        cleanup_all()


# -- output -------------------------------------------------------------------------------------


def banner(title: str) -> None:
    print()
    print("=" * len(title))
    print(title)
    print("=" * len(title))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    """A plain-text table, columns left-aligned, one header line and a rule."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def verdict(value: float, limit: float, *, higher_is_better: bool = False) -> str:
    if math.isnan(value):
        return "MISS"
    ok = value >= limit if higher_is_better else value <= limit
    return "PASS" if ok else "MISS"


_START: dict[str, float] = {}


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


def _own_seconds() -> float:
    """CPU of this process and of every descendant it has reaped (the harness reaps its
    servers, workers and daemons; postgres reaps its backends)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def env_info() -> str:
    """One line about the host, including the load average at the start: the numbers are
    only comparable between runs on an otherwise idle machine. Also starts the account
    of CPU used by other processes that footer() prints."""
    _START.update(wall=time.monotonic(), busy=_busy_seconds(), own=_own_seconds())
    return (f"host: {os.cpu_count()} CPUs, {mb(psutil.virtual_memory().total) / 1024:.1f} GiB RAM, "
            f"python {sys.version.split()[0]}; {loadavg()} at start")


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def footer() -> None:
    """Load average, and how much CPU processes outside this benchmark used meanwhile
    (host busy time - this process tree's; call after the servers have been stopped)."""
    print(f"\n{loadavg()} at the end")
    if _START:
        wall = time.monotonic() - _START["wall"]
        busy = _busy_seconds() - _START["busy"]
        own = _own_seconds() - _START["own"]
        other = max(0.0, busy - own)
        print(f"CPU over {wall:.0f} s: host busy {busy:.1f} s, this benchmark's processes {own:.1f} s, "
              f"other processes ~{other:.1f} s ({100 * other / wall / (os.cpu_count() or 1):.0f}% of "
              f"the machine){'  <- numbers disturbed by other load' if other > 0.1 * wall else ''}")
    sys.stdout.flush()
