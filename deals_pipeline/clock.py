"""Injectable time.

Every token wait and refill goes through a :class:`Clock`, so tests and the simulator can run
a 5 tokens/minute plan at 60x (or 10,000x) without sleeping for real minutes.

All clocks speak *server-comparable* Unix milliseconds, the unit of Keepa's envelope
``timestamp``. A :class:`ScaledClock` is shared across processes by giving each process the same
``anchor_wall_s`` and ``scale`` (see :func:`clock_from_env`), which is how the demo's simulator
process and its ``dagster asset materialize`` processes agree on what time it is.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

from deals_pipeline.keepa.errors import ConfigError

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


def _env_float(env: dict[str, str] | os._Environ, name: str, *, positive: bool) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")) or (positive and value <= 0):
        raise ConfigError(f"{name} must be a finite number{' > 0' if positive else ''}, got {raw!r}")
    return value


def clock_from_env(environ: dict[str, str] | None = None) -> Clock:
    """The clock this process should use: scaled when ``DEALS_PIPELINE_TIME_SCALE`` is set.

    Raises :class:`ConfigError` (one line) on a scale or anchor that is not a positive finite number.
    """
    env = os.environ if environ is None else environ
    scale = _env_float(env, TIME_SCALE_ENV, positive=True)
    anchor = _env_float(env, TIME_ANCHOR_ENV, positive=False)
    if scale is None or scale == 1.0:
        return SystemClock()
    raw_anchor = env.get(TIME_ANCHOR_ENV, "").strip()
    clock = ScaledClock(scale, anchor)
    if not raw_anchor and environ is None:
        # Pin the anchor so every later clock of this process (and its children) reads the same time.
        os.environ[TIME_ANCHOR_ENV] = repr(clock.anchor_wall_s)
    return clock


# ---------------------------------------------------------------------------------------------
# The clock a database was made on
# ---------------------------------------------------------------------------------------------

#: ``meta`` key holding the clock a database was made on, as JSON ``{"scale": .., "anchor_wall_s": ..}``.
CLOCK_META_KEY = "clock"


class ClockMismatch(ConfigError):
    """A database made on one clock was opened by a process running another (one clear line)."""


class _HasConnect(Protocol):
    path: Any

    def connect(self) -> AbstractContextManager[Any]: ...


def clock_record(clock: Clock) -> dict[str, float] | None:
    """What a database records about ``clock``; None for a :class:`ManualClock` (tests), which is never recorded."""
    if isinstance(clock, ScaledClock):
        return {"scale": clock.scale, "anchor_wall_s": clock.anchor_wall_s}
    if isinstance(clock, SystemClock):
        return {"scale": 1.0, "anchor_wall_s": 0.0}
    return None


def describe_clock(clock: Clock) -> str:
    """``real time`` or ``simulated x600 since 2026-12-01 21:50 UTC`` (what status and errors print)."""
    if isinstance(clock, ScaledClock):
        since = datetime.fromtimestamp(clock.anchor_wall_s, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return f"simulated x{clock.scale:g} since {since}"
    if isinstance(clock, SystemClock):
        return "real time"
    return type(clock).__name__


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return abs(a["scale"] - b["scale"]) < 1e-9 and abs(a["anchor_wall_s"] - b["anchor_wall_s"]) < 1e-3


def clock_for_database(db: _HasConnect, clock: Clock) -> Clock:
    """The clock to read and write ``db`` with, recording ``clock`` in the database on first use.

    Stored times (watermarks, token statuses, deal minutes) only make sense on the clock that wrote
    them: a database made at x600 holds times hours "in the future" in real time. So:

    * a database made on a scaled clock is always read back on *that* clock: a process with no
      ``DEALS_PIPELINE_TIME_SCALE`` (``make status``, ``make ui``) gets the recorded clock back;
    * a process running a *different* clock (another scale or anchor, or a scaled clock on a
      real-time database) is refused with :class:`ClockMismatch`;
    * a :class:`ManualClock` (tests) is used as given and never recorded.
    """
    wanted = clock_record(clock)
    if wanted is None:
        return clock
    with db.connect() as con:
        con.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT DO NOTHING", [CLOCK_META_KEY, json.dumps(wanted)])
        row = con.execute("SELECT value FROM meta WHERE key = ?", [CLOCK_META_KEY]).fetchone()
    recorded = json.loads(row[0])
    if _same(recorded, wanted):
        return clock
    made_on: Clock = (SystemClock() if recorded["scale"] == 1.0
                      else ScaledClock(recorded["scale"], recorded["anchor_wall_s"]))
    if isinstance(clock, SystemClock) and isinstance(made_on, ScaledClock):
        return made_on  # read back on its own clock, never as real (future) times
    raise ClockMismatch(
        f"{db.path} was made on a clock {describe_clock(made_on)}; this process runs {describe_clock(clock)}. "
        f"Unset {TIME_SCALE_ENV}/{TIME_ANCHOR_ENV} to read it on its own clock, or point DEALS_DB_PATH at another file."
    )
