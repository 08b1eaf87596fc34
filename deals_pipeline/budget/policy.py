"""Who goes first, the knobs of the spending rule, and those knobs resolved against one refill rate."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Priority(IntEnum):
    """Who goes first. Lower value = higher priority."""

    UPSERT = 0
    BACKFILL = 1


@dataclass(frozen=True)
class BudgetPolicy:
    """Knobs of the spending rule. Every value is clamped against the *live* refill rate.

    Attributes:
        initial_refill_rate: the starting guess before any response was seen (then the learned rate wins).
        threshold: a call may start only while the projected balance is ``> threshold`` (0 = "positive").
            Clamped to ``[0, cap//2 - 1]``.
        max_deficit: a call may drive the projection to ``-max_deficit`` at most (``projected - cost >=
            -max_deficit``). Clamped to ``[0, cap]``.
        burst_level: low-rate recharge mode: after the projection falls to/below ``threshold``, nothing is
            spent until it is back at this level. Clamped to ``[threshold + 1, cap]``.
        low_rate_below: recharge mode is on only while the learned refill rate is below this.
        upsert_reserve: tokens a BACKFILL acquire must leave untouched for the upserter's next batch.
            Clamped to ``[0, cap//2]``.
        reservation_ttl_ms: a reservation whose response never arrived is ignored after this long
            (timeline ms), so a killed process cannot leak budget forever.
        margin_ms: added to every refill wait (clock skew between us and Keepa).
        max_sleep_ms: an acquire sleeps in steps of at most this long and re-reads the shared state
            after each step (other processes spend too). Never polls ``/token``.
        resync_after_ms: ``needs_sync()`` also turns true when the last status is older than this
            (long idle; KEEPA_API.md §10.11). 0 disables.
    """

    initial_refill_rate: int = 5
    threshold: int = 0
    max_deficit: int = 60
    burst_level: int = 80
    low_rate_below: int = 10
    upsert_reserve: int = 40
    reservation_ttl_ms: int = 300_000
    margin_ms: int = 1_000
    max_sleep_ms: int = 60_000
    resync_after_ms: int = 3_600_000

    def __post_init__(self) -> None:
        for name in ("initial_refill_rate", "reservation_ttl_ms", "margin_ms", "max_sleep_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"BudgetPolicy.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_sleep_ms == 0:
            raise ValueError("BudgetPolicy.max_sleep_ms must be > 0")


@dataclass(frozen=True)
class Thresholds:
    """The policy resolved against one refill rate (recomputed on every decision, HAZARDS #41/#52)."""

    refill_rate: int
    cap: int
    threshold: int
    max_deficit: int
    burst_level: int
    recharge_enabled: bool
    upsert_reserve: int
