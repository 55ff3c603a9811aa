"""reconciler.client's arguments, checked before any SQL: `wait` must be a finite number of
seconds >= 0 (a NaN made the wait endless); table and channel names are checked when a
Client is made or configure() is called. No database: the connection is never touched."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections.abc import Iterator

import pytest

from reconciler import client
from reconciler.client import Client, cancel, cancel_async, configure
from reconciler.config import from_mapping


class Untouchable:
    """A connection that fails the test if anything is asked of it."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the connection was used ({name}) before the arguments were checked")


@pytest.fixture(autouse=True)
def _default_client() -> Iterator[None]:
    saved = client._configured
    yield
    client._configured = saved


@pytest.mark.parametrize("wait", [math.nan, math.inf, -math.inf, -1, -0.001])
def test_a_wait_that_never_ends_or_is_negative_is_refused(wait: float) -> None:
    with pytest.raises(ValueError, match="wait must be a finite number of seconds >= 0"):
        cancel(Untouchable(), 1, reason="x", wait=wait)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wait must be a finite number of seconds >= 0"):
        asyncio.run(cancel_async(Untouchable(), 1, reason="x", wait=wait))
    with pytest.raises(ValueError, match="wait must be a finite number"):
        Client().cancel(Untouchable(), 1, reason="x", wait=wait)  # type: ignore[arg-type]


@pytest.mark.parametrize("wait", ["30", True])
def test_a_wait_that_is_not_a_number_is_refused(wait: object) -> None:
    with pytest.raises(TypeError, match="wait must be a number of seconds"):
        cancel(Untouchable(), 1, reason="x", wait=wait)  # type: ignore[arg-type]


def test_cli_refuses_a_nan_wait() -> None:
    p = subprocess.run([sys.executable, "-m", "reconciler", "cancel", "7", "--wait", "nan"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "argument --wait: 'nan': give a finite number of seconds >= 0" in p.stderr


def test_configure_sets_the_names_every_call_uses_and_keeps_what_is_not_given() -> None:
    c = configure(requests_table="app.cancels")
    assert (c.requests_table, c.channel) == ("app.cancels", "rq_reconciler_cancel")
    c = configure(channel="app_cancel")
    assert (c.requests_table, c.channel) == ("app.cancels", "app_cancel")
    assert client._resolved(None, None) == ("app.cancels", "app_cancel")
    assert client._resolved("other", None) == ("other", "app_cancel")  # a call's own wins


def test_configure_from_a_config_and_client_from_config() -> None:
    cfg = from_mapping({"cancel": {"requests_table": "ops.reqs", "channel": "ops_cancel"}},
                       environ={})
    assert client.configure_from(cfg) == Client("ops.reqs", "ops_cancel")
    assert Client.from_config(cfg) == Client("ops.reqs", "ops_cancel")


@pytest.mark.parametrize(("kw", "what"), [
    ({"requests_table": "a.b.c"}, "requests_table"),
    ({"requests_table": "x; DROP TABLE y"}, "requests_table"),
    ({"channel": "a-b"}, "channel"),
])
def test_bad_names_are_refused_when_configured(kw: dict[str, str], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        Client(**kw)
    with pytest.raises(ValueError, match=what):
        configure(**kw)
    assert client._configured == Client()  # a refused configure() changed nothing
