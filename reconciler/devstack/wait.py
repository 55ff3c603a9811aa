"""``wait_until``: the one polling loop of devstack, the tests, bench/ and the demo."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    pred: Callable[[], T],
    timeout: float = 10,
    what: str | Callable[[], str] = "",
    interval: float = 0.02,
) -> T:
    """Poll ``pred`` until it returns something truthy and return that; raise
    AssertionError after ``timeout`` seconds.

    ``what`` names the wait in the error; a callable is asked only then, so it can
    describe the state the wait gave up on.  Exceptions raised by ``pred`` propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            desc = (what() if callable(what) else what) or repr(pred)
            raise AssertionError(f"timed out after {timeout:g} s waiting for {desc}")
        time.sleep(interval)
