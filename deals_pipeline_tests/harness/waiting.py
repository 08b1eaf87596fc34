"""Waiting for events, never for a fixed wall-clock window.

Tests that race processes or clocks wait until something observable happened (a chunk committed, a
request served, a run started, a line logged), with one generous overall timeout. On a busy 2-core
CI box work takes however long it takes; only a test that makes no progress at all for the whole
timeout fails, and it says what it was waiting for.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

#: Overall timeout for an event that normally takes a few seconds: generous, so that only a hang fails
#: (at a load average of ~30 on 2 cores a worker needed over 120 s to reach its third paid request).
GENEROUS_TIMEOUT_S = 300.0


class WaitTimeout(AssertionError):
    """The awaited event did not happen within the overall timeout (an AssertionError: the test fails)."""


def wait_for(predicate: Callable[[], T], timeout: float = GENEROUS_TIMEOUT_S, what: str = "the event", *,
             poll_s: float = 0.05, abort: Callable[[], str | None] | None = None) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    Args:
        predicate: called repeatedly; its first truthy result is returned.
        timeout: wall seconds before giving up (an upper bound for a hang, never a pass criterion).
        what: what is awaited, for the failure message ("chunk 3 committed").
        poll_s: pause between calls.
        abort: optional; called after each miss, a non-None result (a reason) stops the wait at once
            with :class:`WaitTimeout`, e.g. "the worker exited with 1" instead of waiting the whole timeout.

    Raises:
        WaitTimeout: the predicate stayed falsy for ``timeout`` seconds, or ``abort`` gave a reason.
    """
    started = time.monotonic()
    while True:
        value = predicate()
        if value:
            return value
        if abort is not None:
            reason = abort()
            if reason is not None:
                raise WaitTimeout(f"gave up waiting for {what}: {reason}")
        if time.monotonic() - started > timeout:
            raise WaitTimeout(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(poll_s)
