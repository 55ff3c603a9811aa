"""``Pg``: one asyncpg connection used from synchronous code (tests, bench/, the demo).

It runs its own private event loop, so it must not be used while another event loop is
running in the same thread (call it from sync code only).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

# What a connection that went away raises: the server restarting, being killed, or not
# accepting connections yet.
_GONE: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
)


class Pg:
    """One asyncpg connection on a private event loop, usable from sync code.

    Connects lazily and again after the server went away. ``retry_for`` (seconds) makes
    a call ride out a restart of the server instead of raising.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._runner = asyncio.Runner()
        self._conn: asyncpg.Connection | None = None

    def connect(self) -> Pg:
        """Connect now rather than on the first call (keeps connecting out of a timing)."""
        self._connect()
        return self

    def _connect(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = self._runner.run(asyncpg.connect(self.dsn, timeout=5))
        return self._conn

    def _call(self, method: str, args: Sequence[Any], retry_for: float) -> Any:
        deadline = time.monotonic() + retry_for
        while True:
            try:
                conn = self._connect()
                return self._runner.run(getattr(conn, method)(*args))
            except _GONE:
                self._drop()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def fetch(self, sql: str, *args: Any, retry_for: float = 0.0) -> list[asyncpg.Record]:
        return list(self._call("fetch", (sql, *args), retry_for))

    def val(self, sql: str, *args: Any, retry_for: float = 0.0) -> Any:
        """The first column of the first row, None when there is no row."""
        rows = self.fetch(sql, *args, retry_for=retry_for)
        return rows[0][0] if rows else None

    def execute(self, sql: str, *args: Any, retry_for: float = 0.0) -> str:
        """Run ``sql``; without ``args`` it may hold several statements (simple protocol)."""
        return str(self._call("execute", (sql, *args), retry_for))

    def copy_records(self, table: str, records: Iterable[Sequence[Any]], columns: Sequence[str]) -> None:
        """COPY ``records`` into ``table`` (fast bulk load)."""
        conn = self._connect()
        self._runner.run(conn.copy_records_to_table(table, records=records, columns=list(columns)))

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.terminate()
            self._conn = None

    def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(Exception):
                self._runner.run(self._conn.close(timeout=5))
        self._drop()
        self._runner.close()

    def __enter__(self) -> Pg:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pg_fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """One statement on a connection of its own (for a call or two; loops want a ``Pg``)."""
    with Pg(dsn) as pg:
        return pg.fetch(sql, *args)
