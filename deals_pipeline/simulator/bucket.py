"""Keepa's token bucket, as observed (KEEPA_API.md §3).

* ``refill_rate`` tokens are added once per minute, at a fixed phase: ``next_refill_at`` advances by
  exactly 60,000 ms per refill, so refills happen only on those boundaries.
* The cap is one hour of refill (60 x rate); refill above the cap is lost.
* A request is served while the balance is > 0 and may drive it negative; at a balance <= 0 the server
  answers HTTP 429 and charges nothing.

The bucket never reads wall time itself: every method takes the server time in Unix ms (or reads the
optional injected clock when ``now_ms`` is omitted). Thread-safe.
"""

from __future__ import annotations

import threading

from deals_pipeline.clock import Clock
from deals_pipeline.keepa.models import CAP_MINUTES, REFILL_PERIOD_MS, TokenStatus


class TokenBucket:
    """One account's token bucket on the server side."""

    def __init__(
        self,
        refill_rate: int,
        initial_tokens: int | None = None,
        *,
        start_ms: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(refill_rate, bool) or int(refill_rate) != refill_rate or refill_rate < 0:
            raise ValueError(f"refill_rate must be a non-negative integer, got {refill_rate!r}")
        if start_ms is None:
            if clock is None:
                raise ValueError("TokenBucket needs start_ms or a clock")
            start_ms = clock.now_ms()
        self.refill_rate = int(refill_rate)
        self.cap = CAP_MINUTES * self.refill_rate
        self._clock = clock
        self._lock = threading.RLock()
        self.start_ms = int(start_ms)
        #: Server time (Unix ms) of the next refill. Phase is fixed: start + k * 60 s.
        self.next_refill_at = self.start_ms + REFILL_PERIOD_MS
        self._balance = self.cap if initial_tokens is None else min(int(initial_tokens), self.cap)
        #: Number of refills applied so far (for tests and stats).
        self.refills = 0

    # -- time --------------------------------------------------------------------------------
    def _now(self, now_ms: int | None) -> int:
        if now_ms is not None:
            return int(now_ms)
        if self._clock is None:
            raise ValueError("no now_ms given and the bucket has no clock")
        return self._clock.now_ms()

    def _advance(self, now_ms: int) -> None:
        """Apply every refill due at or before ``now_ms`` (lock held)."""
        if now_ms < self.next_refill_at:
            return
        n = (now_ms - self.next_refill_at) // REFILL_PERIOD_MS + 1
        # Iterating min(cap, b + rate) n times equals min(cap, b + n * rate) for b <= cap.
        self._balance = min(self.cap, self._balance + n * self.refill_rate) if self._balance <= self.cap else self.cap
        self.next_refill_at += n * REFILL_PERIOD_MS
        self.refills += n

    # -- queries -----------------------------------------------------------------------------
    def balance(self, now_ms: int | None = None) -> int:
        with self._lock:
            self._advance(self._now(now_ms))
            return self._balance

    def refill_in(self, now_ms: int | None = None) -> int:
        """Milliseconds to the next refill, always in (0, 60000]."""
        with self._lock:
            now = self._now(now_ms)
            self._advance(now)
            return self._refill_in_locked(now)

    def _refill_in_locked(self, now: int) -> int:
        # After _advance, now < next_refill_at <= now + 60 s unless the clock went backwards.
        return max(1, min(REFILL_PERIOD_MS, self.next_refill_at - now))

    def can_serve(self, now_ms: int | None = None) -> bool:
        """Keepa serves a request only while the balance is positive."""
        return self.balance(now_ms) > 0

    def status(self, now_ms: int | None = None, consumed: int = 0, processing_ms: int = 0) -> TokenStatus:
        """The envelope's token fields at ``now_ms`` (after any charge already applied)."""
        with self._lock:
            now = self._now(now_ms)
            self._advance(now)
            return TokenStatus(
                tokens_left=self._balance,
                refill_in_ms=self._refill_in_locked(now),
                refill_rate=self.refill_rate,
                timestamp_ms=now,
                tokens_consumed=int(consumed),
                token_flow_reduction=0.0,
                processing_time_ms=int(processing_ms),
            )

    # -- mutations ---------------------------------------------------------------------------
    def charge(self, cost: int, now_ms: int | None = None) -> int:
        """Subtract ``cost`` unconditionally (the balance may go negative). Returns the new balance."""
        if cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        with self._lock:
            self._advance(self._now(now_ms))
            self._balance -= int(cost)
            return self._balance

    def try_charge(self, cost: int, now_ms: int | None = None) -> bool:
        """Keepa's admission rule: if the balance is > 0, charge ``cost`` (maybe going negative) and
        return True; otherwise charge nothing and return False (the caller answers 429)."""
        with self._lock:
            now = self._now(now_ms)
            self._advance(now)
            if self._balance <= 0:
                return False
            self._balance -= int(cost)
            return True

    def set_balance(self, tokens: int, now_ms: int | None = None) -> None:
        """Force the balance (tests). Refills due before now are applied first; clamped to the cap."""
        with self._lock:
            if now_ms is not None or self._clock is not None:
                self._advance(self._now(now_ms))
            self._balance = min(int(tokens), self.cap)

    def __repr__(self) -> str:  # never includes anything secret
        return (
            f"TokenBucket(rate={self.refill_rate}, cap={self.cap}, balance={self._balance}, "
            f"next_refill_at={self.next_refill_at})"
        )
