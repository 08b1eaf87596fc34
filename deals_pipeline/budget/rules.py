"""The spending rule as pure functions of a snapshot: projection, wait, admission, recharge mode.

No I/O and no clock: every function takes ``now_ms`` and the values it needs, so the rules are
property-tested directly and the arbiter (:mod:`deals_pipeline.budget.arbiter`) only loads state,
applies these and writes the outcome back. See :mod:`deals_pipeline.budget` for the rules in prose.
"""

from __future__ import annotations

from typing import Any

from deals_pipeline.budget.policy import BudgetPolicy, Priority, Thresholds
from deals_pipeline.budget.state import BudgetSnapshot, Decision, Projection
from deals_pipeline.keepa.models import CAP_MINUTES, REFILL_PERIOD_MS, TokenStatus, refill_wait_ms

#: How far ahead of our clock a server timestamp may be (clock skew) before it is distrusted.
FUTURE_STATUS_TOLERANCE_MS = 5 * 60_000


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(int(v), hi))


def thresholds_for(policy: BudgetPolicy, refill_rate: int) -> Thresholds:
    """Resolve the policy against a refill rate: every level is clamped to the cap (60 x rate)."""
    rate = max(int(refill_rate), 0)
    cap = CAP_MINUTES * rate
    cap_eff = max(cap, 1)
    threshold = _clamp(policy.threshold, 0, max(cap_eff // 2 - 1, 0))
    max_deficit = _clamp(policy.max_deficit, 0, cap_eff)
    burst = _clamp(policy.burst_level, min(threshold + 1, cap_eff), cap_eff)
    reserve = _clamp(policy.upsert_reserve, 0, cap_eff // 2)
    return Thresholds(
        refill_rate=rate,
        cap=cap,
        threshold=threshold,
        max_deficit=max_deficit,
        burst_level=burst,
        recharge_enabled=rate < policy.low_rate_below,
        upsert_reserve=reserve,
    )


def project_server_balance(status: TokenStatus, now_ms: int) -> tuple[int, int]:
    """(balance, next_refill_ms) at ``now_ms`` from one envelope.

    Refills of ``refillRate`` happen at ``timestamp + refillIn + k * 60 s``; the balance never
    exceeds the cap (a reported balance above 60 x rate, e.g. after a plan downgrade, is read as the
    cap: conservative, and no wait target is ever above the cap anyway).
    """
    next_refill = status.next_refill_ms
    refills = 0
    if now_ms >= next_refill:
        refills = (now_ms - next_refill) // REFILL_PERIOD_MS + 1
        next_refill += refills * REFILL_PERIOD_MS
    balance = min(status.cap, status.tokens_left + refills * status.refill_rate)
    return int(balance), int(next_refill)


def required_level(th: Thresholds, cost: int, priority: Priority, recharging: bool) -> int:
    """Projected balance a call of ``cost`` needs before it may start. Never above the cap.

    * ``projected > threshold`` and ``projected - cost >= -max_deficit`` (controlled deficit);
    * BACKFILL only: recharge mode (low rate, after falling to/below the threshold) waits for
      ``burst_level``, and every rule applies to ``projected - upsert_reserve``, so at any balance where
      the backfill may start, the upserter may too. The upserter's small, time-bound batches are not
      held back by recharge mode: at 5/min a burst of 80 takes 16 min, longer than an upsert interval,
      and the freshness of the newest deals is what the upserter exists for.
    """
    level = max(th.threshold + 1, int(cost) - th.max_deficit)
    if priority == Priority.BACKFILL:
        if recharging and th.recharge_enabled:
            level = max(level, th.burst_level)
        level += th.upsert_reserve
    return min(level, max(th.cap, 1))


def next_recharging(previous: bool, projected: int, th: Thresholds) -> bool:
    """Recharge mode from the persisted flag and the current projection (never sticky across rate changes)."""
    if not th.recharge_enabled:
        return False
    if projected <= th.threshold:
        return True
    if previous and projected >= th.burst_level:
        return False
    return previous


def wait_for_level(status: TokenStatus, need: int, now_ms: int, margin_ms: int) -> int | None:
    """ms until the *server* balance reaches ``need`` (clamped to the cap), KEEPA_API.md §3.3 discrete form.

    A refill is only trusted ``margin_ms`` after its instant (clock skew), consistently with the
    projection: the result is ``refill_wait_ms`` evaluated at ``now - margin`` with no extra margin,
    which equals ``(timestamp + refillIn - now) + (n - 1) * 60 s + margin`` whenever ``now`` is before
    the next refill. None when the balance never gets there (refill rate 0).
    """
    need = min(int(need), max(status.cap, 1))
    balance, _ = project_server_balance(status, now_ms - margin_ms)
    if balance >= need:
        return 0
    if status.refill_rate <= 0:
        return None
    return max(0, refill_wait_ms(status, need, now_ms - margin_ms, 0))


def refill_rate_of(snapshot: BudgetSnapshot, policy: BudgetPolicy) -> int:
    """The learned refill rate, or the policy's starting guess before any envelope was seen."""
    if snapshot.status is not None:
        return snapshot.status.refill_rate
    return max(int(policy.initial_refill_rate), 0)


def project(snapshot: BudgetSnapshot, policy: BudgetPolicy, now_ms: int) -> tuple[Projection, Thresholds]:
    """The projected balance now and the policy at the learned rate.

    Refills are trusted ``margin_ms`` after their instant (skew), so the server balance is projected
    at ``now - margin``. With no status known the balance is minus what is in flight.
    """
    th = thresholds_for(policy, refill_rate_of(snapshot, policy))
    if snapshot.status is None:
        proj = Projection(
            balance=-snapshot.pending,
            server_balance=0,
            refill_rate=th.refill_rate,
            cap=th.cap,
            next_refill_ms=now_ms + REFILL_PERIOD_MS,
            reserved_in_flight=snapshot.pending,
            recharging=snapshot.recharging,
            as_of_ms=now_ms,
            status_known=False,
        )
        return proj, th
    server_balance, next_refill = project_server_balance(snapshot.status, now_ms - policy.margin_ms)
    balance = server_balance - snapshot.pending
    proj = Projection(
        balance=balance,
        server_balance=server_balance,
        refill_rate=th.refill_rate,
        cap=th.cap,
        next_refill_ms=next_refill,
        reserved_in_flight=snapshot.pending,
        recharging=next_recharging(snapshot.recharging, balance, th),
        as_of_ms=now_ms,
        status_known=True,
        status_timestamp_ms=snapshot.status.timestamp_ms,
    )
    return proj, th


def decide(snapshot: BudgetSnapshot, policy: BudgetPolicy, cost: int, priority: Priority, now_ms: int) -> Decision:
    """Admission: may a call of ``cost`` at ``priority`` start now, and if not, how long to wait."""
    proj, th = project(snapshot, policy, now_ms)
    level = required_level(th, cost, priority, proj.recharging)
    if snapshot.status is None:
        return Decision(False, None, level, level, proj, th, status_known=False)
    if proj.balance >= level:
        return Decision(True, 0, level, level + snapshot.pending, proj, th)
    need = min(level + snapshot.pending, max(th.cap, 1))
    wait = wait_for_level(snapshot.status, need, now_ms, policy.margin_ms)
    if wait == 0:
        # The server balance is at the cap but in-flight reservations still cover part of it:
        # wait for them to settle or expire (the arbiter re-reads after each step).
        expiry = snapshot.earliest_pending_expiry_ms
        wait = max(1, (expiry - now_ms) if expiry is not None else policy.margin_ms)
    return Decision(False, wait, level, need, proj, th)


def sync_wanted(snapshot: BudgetSnapshot, policy: BudgetPolicy, now_ms: int) -> bool:
    """True when one free ``/token`` call should come first: no status yet, a response without an
    envelope since the last status, or a status older than ``policy.resync_after_ms`` (long idle)."""
    if snapshot.status is None or snapshot.sync_requested_ms is not None:
        return True
    if policy.resync_after_ms and snapshot.recorded_at_ms is not None:
        return now_ms - snapshot.recorded_at_ms > policy.resync_after_ms
    return False


def status_supersedes(new: TokenStatus, stored: TokenStatus | None, now_ms: int) -> bool:
    """Whether ``new`` replaces the stored envelope: not older (on a timestamp tie the lower balance
    wins), and not stamped so far ahead of our clock that it would freeze the projection. A stored
    status from the future does not block a sane new one."""
    if new.timestamp_ms > now_ms + FUTURE_STATUS_TOLERANCE_MS:
        return False
    if stored is None or stored.timestamp_ms > now_ms + FUTURE_STATUS_TOLERANCE_MS:
        return True
    if new.timestamp_ms != stored.timestamp_ms:
        return new.timestamp_ms > stored.timestamp_ms
    return new.tokens_left <= stored.tokens_left


def tokens_of(cost: Any) -> int:
    """The token count of ``cost``: an int, or anything with an int ``tokens`` (a CostEstimate)."""
    if isinstance(cost, bool):
        raise TypeError("cost must be an int or a CostEstimate")
    if isinstance(cost, int):
        return cost
    tokens = getattr(cost, "tokens", None)
    if isinstance(tokens, int):
        return tokens
    raise TypeError(f"cost must be an int or a CostEstimate, got {type(cost).__name__}")
