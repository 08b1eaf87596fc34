"""Injectable time.

Every token wait and refill goes through a :class:`Clock`, so tests and the simulator can run
a 5 tokens/minute plan at 60x (or 10,000x) without sleeping for real minutes.

All clocks speak *server-comparable* Unix milliseconds, the unit of Keepa's envelope
``timestamp``. A :class:`ScaledClock` is shared across processes by giving each process the same
``anchor_wall_s`` and ``scale`` (see :func:`clock_from_env`), which is how the demo's simulator
process and its ``dagster asset materialize`` processes agree on what time it is.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Protocol, runtime_checkable

TIME_SCALE_ENV = "DEALS_PIPELINE_TIME_SCALE"
TIME_ANCHOR_ENV = "DEALS_PIPELINE_TIME_ANCHOR"


@runtime_checkable
class Clock(Protocol):
    """Source of (possibly scaled) time in Unix milliseconds."""

    def now_ms(self) -> int:
        """Current time, in Unix ms on the (scaled) timeline."""

    def sleep_ms(self, ms: float) -> None:
        """Sleep ``ms`` milliseconds of *timeline* time (scaled down for a fast clock)."""


class SystemClock:
    """Real time."""

    scale = 1.0

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def sleep_ms(self, ms: float) -> None:
        if ms > 0:
            time.sleep(ms / 1000.0)


class ScaledClock:
    """Real time sped up by ``scale`` from an anchor.

    timeline_ms = anchor_wall_s * 1000 + (time.time() - anchor_wall_s) * 1000 * scale

    Two processes built with the same anchor and scale read the same time, to within the
    wall-clock skew between them multiplied by ``scale``.
    """

    def __init__(self, scale: float, anchor_wall_s: float | None = None) -> None:
        if scale <= 0:
            raise ValueError(f"time scale must be > 0, got {scale!r}")
        self.scale = float(scale)
        self.anchor_wall_s = time.time() if anchor_wall_s is None else float(anchor_wall_s)

    def now_ms(self) -> int:
        elapsed = time.time() - self.anchor_wall_s
        return int((self.anchor_wall_s + elapsed * self.scale) * 1000)

    def sleep_ms(self, ms: float) -> None:
        if ms > 0:
            time.sleep(ms / 1000.0 / self.scale)

    def env(self) -> dict[str, str]:
        """Environment variables that make :func:`clock_from_env` rebuild this clock elsewhere."""
        return {TIME_SCALE_ENV: repr(self.scale), TIME_ANCHOR_ENV: repr(self.anchor_wall_s)}


class ManualClock:
    """A clock that only moves when told to; ``sleep_ms`` advances it instantly.

    Thread-safe, so an in-process simulator and several client threads can share it.
    """

    scale = float("inf")

    def __init__(self, start_ms: int = 1_757_873_538_842) -> None:
        self._now = int(start_ms)
        self._lock = threading.Lock()
        self.slept_ms: list[float] = []

    def now_ms(self) -> int:
        with self._lock:
            return self._now

    def advance(self, ms: float) -> None:
        with self._lock:
            self._now += int(ms)

    def sleep_ms(self, ms: float) -> None:
        if ms > 0:
            self.slept_ms.append(ms)
            self.advance(ms)


def clock_from_env(environ: dict[str, str] | None = None) -> Clock:
    """The clock this process should use: scaled when ``DEALS_PIPELINE_TIME_SCALE`` is set."""
    env = os.environ if environ is None else environ
    raw_scale = env.get(TIME_SCALE_ENV, "").strip()
    if not raw_scale or float(raw_scale) == 1.0:
        return SystemClock()
    raw_anchor = env.get(TIME_ANCHOR_ENV, "").strip()
    clock = ScaledClock(float(raw_scale), float(raw_anchor) if raw_anchor else None)
    if not raw_anchor and environ is None:
        # Pin the anchor so every later clock of this process (and its children) reads the same time.
        os.environ[TIME_ANCHOR_ENV] = repr(clock.anchor_wall_s)
    return clock
