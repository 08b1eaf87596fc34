"""The arbiter on the in-memory store with a ManualClock: shared state, reservations, priorities, 429s.

What needs DuckDB itself (a settle inside the caller's transaction) runs on a real file."""

from __future__ import annotations

import logging
from typing import Callable

import pytest

from deals_pipeline.budget import (
    BudgetDeadline,
    BudgetNeedsSync,
    BudgetPolicy,
    BudgetStalled,
    Priority,
    TokenBudget,
    product_cost_shape,
)
from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.errors import NotEnoughTokens, TransientKeepaError
from deals_pipeline.keepa.models import TokenStatus, refill_wait_ms
from deals_pipeline.storage.db import Database
from deals_pipeline_tests.budget.conftest import status

MakeBudget = Callable[..., TokenBudget]
NO_RECHARGE = BudgetPolicy(low_rate_below=0)


class _Page:
    def __init__(self, st: TokenStatus) -> None:
        self.status = st


def test_observe_rebases_and_ignores_older(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget()
    assert b.needs_sync() and not b.projection().status_known
    b.observe(status(clock, 100, refill_in=10_000))
    p = b.projection()
    assert (p.balance, p.refill_rate, p.cap, p.status_known) == (100, 5, 300, True)
    assert p.next_refill_ms == clock.now_ms() + 10_000
    older = status(clock, -50, ts=clock.now_ms() - 1)
    b.observe(older)
    assert b.projection().balance == 100  # older status ignored
    clock.advance(10_000)  # at the refill instant: not trusted before margin_ms (1 s) has passed
    assert b.projection().balance == 100
    clock.advance(1_000)
    assert b.projection().balance == 105
    clock.advance(60_000 * 100)
    assert b.projection().balance == 300  # capped at 60 x rate
    b.observe(status(clock, 7, refill_in=1_000))
    assert b.projection().balance == 7 and not b.needs_sync()


def test_refill_rate_is_learned(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget(policy=BudgetPolicy(initial_refill_rate=25))
    assert b.projection().refill_rate == 25  # only a guess before any response
    b.observe(status(clock, 0, rate=5))
    assert b.projection().refill_rate == 5 and b.projection().cap == 300


def test_other_workers_reservations_survive_a_response(make_budget: MakeBudget, clock: ManualClock) -> None:
    """H7: one response's tokensLeft must not erase other workers' in-flight reservations."""
    a, b = make_budget("a", NO_RECHARGE), make_budget("b", NO_RECHARGE)
    a.observe(status(clock, 200))
    ra = a.acquire(50, purpose="product", priority=Priority.UPSERT)
    assert b.projection().balance == 150 and b.projection().reserved_in_flight == 50
    rb = b.acquire(30, purpose="deal_page", priority=Priority.BACKFILL)
    clock.advance(100)
    # b's response arrives first; the server has not processed a's request yet.
    b.settle(rb, 30, status(clock, 170, consumed=30))
    p = a.projection()
    assert p.server_balance == 170 and p.reserved_in_flight == 50 and p.balance == 120
    clock.advance(100)
    a.settle(ra, 47, status(clock, 123, consumed=47))
    p = b.projection()
    assert (p.balance, p.reserved_in_flight) == (123, 0)
    s = a.ledger_summary()
    assert s["spent"] == 77 and s["predicted"] == 80 and s["calls"] == 2
    assert s["by_owner"]["a"]["actual"] == 47 and s["by_owner"]["b"]["predicted"] == 30
    assert s["by_purpose"]["product"]["calls"] == 1


def test_late_response_older_than_stored_status_is_not_double_counted(make_budget: MakeBudget, clock: ManualClock) -> None:
    a, b = make_budget("a", NO_RECHARGE), make_budget("b", NO_RECHARGE)
    a.observe(status(clock, 200))
    ra = a.acquire(20, purpose="p", priority=Priority.UPSERT)
    rb = b.acquire(20, purpose="p", priority=Priority.UPSERT)
    t_a = clock.now_ms() + 10
    clock.advance(20)
    # Server processed a (t_a) then b (now); b's response is observed first and includes both spends.
    b.settle(rb, 20, status(clock, 160, consumed=20))
    a.settle(ra, 20, status(clock, 180, consumed=20, ts=t_a))  # older: ignored, but marks a as reflected
    p = a.projection()
    assert (p.balance, p.reserved_in_flight) == (160, 0)


def test_reservations_expire_after_ttl(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget(policy=BudgetPolicy(reservation_ttl_ms=300_000, low_rate_below=0))
    b.observe(status(clock, 100, refill_in=60_000))
    b.acquire(60, purpose="p", priority=Priority.UPSERT)  # the process is then SIGKILLed
    assert b.projection().balance == 40
    clock.advance(299_999)
    assert b.projection().reserved_in_flight == 60
    clock.advance(1)
    p = b.projection()
    assert p.reserved_in_flight == 0 and p.balance == 120  # 4 refills trusted since, reservation ignored


def test_backfill_leaves_the_upsert_reserve(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget(policy=BudgetPolicy(upsert_reserve=40, low_rate_below=0))
    b.observe(status(clock, 30, refill_in=20_000))
    assert b.wait_ms(20, Priority.UPSERT) == 0
    # BACKFILL needs projected - 40 > 0: 41 tokens, i.e. 3 refills.
    assert b.wait_ms(20, Priority.BACKFILL) == 20_000 + 2 * 60_000 + 1_000
    # Controlled deficit: projected - cost >= -max_deficit (60).
    assert b.wait_ms(90, Priority.UPSERT) == 0
    assert b.wait_ms(91, Priority.UPSERT) == 21_000
    assert b.decide(91, Priority.BACKFILL).level == 71


def test_upserter_goes_first_in_recharge_mode(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget()  # 5/min: recharge mode, burst 80, reserve 40
    b.observe(status(clock, -20, refill_in=60_000))
    assert b.projection().recharging
    up, back = b.decide(30, Priority.UPSERT), b.decide(30, Priority.BACKFILL)
    # Recharge mode holds back only the bulk spender: the upserter needs a positive balance, the backfill
    # the burst level plus the upserter's reserve.
    assert (up.level, back.level) == (1, 120)
    assert up.wait_ms < back.wait_ms
    clock.advance(up.wait_ms)
    assert b.wait_ms(30, Priority.UPSERT) == 0
    b.acquire(30, purpose="upsert", priority=Priority.UPSERT)  # 5 -> -25: still recharging
    assert b.projection().recharging
    assert b.decide(30, Priority.BACKFILL).level == 120


def test_reserve_is_clamped_to_half_the_cap(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget(policy=BudgetPolicy(upsert_reserve=10_000, burst_level=10_000, max_deficit=10_000))
    b.observe(status(clock, 0, rate=1))
    th = b.thresholds()
    assert (th.cap, th.upsert_reserve, th.burst_level, th.max_deficit) == (60, 30, 60, 60)
    assert b.decide(1_000, Priority.BACKFILL).level == 60  # never above the cap


def test_recharge_mode_is_shared_and_derived_from_state(make_budget: MakeBudget, clock: ManualClock) -> None:
    # Default 5/min < 10/min -> recharge mode with burst 80; it gates the backfill (no reserve here).
    a = make_budget("a", policy=BudgetPolicy(upsert_reserve=0))
    a.observe(status(clock, 50, refill_in=60_000))
    assert not a.projection().recharging
    r = a.acquire(60, purpose="p", priority=Priority.BACKFILL)  # takes the projection to -10
    b = make_budget("b", policy=BudgetPolicy(upsert_reserve=0))
    assert b.projection().recharging  # persisted: another process sees it
    clock.advance(1)
    a.settle(r, 60, status(clock, -10, refill_in=59_999, consumed=60))
    # Needs 80 again: 18 refills.
    assert b.wait_ms(5, Priority.BACKFILL) == 59_999 + 17 * 60_000 + 1_000
    clock.advance(59_999 + 16 * 60_000 + 1_000)
    assert b.projection().balance == 75 and b.projection().recharging
    clock.advance(60_000)
    assert b.projection().balance == 80 and not b.projection().recharging
    assert b.wait_ms(5, Priority.BACKFILL) == 0
    # Hovering above the threshold after that does not re-enter recharge mode...
    b.acquire(70, purpose="p", priority=Priority.BACKFILL)
    assert not b.projection().recharging and b.projection().balance == 10
    # ...but reaching it does, and a learned higher rate switches it off (not sticky, HAZARDS #41).
    b.acquire(10, purpose="p", priority=Priority.BACKFILL)
    assert b.projection().recharging
    clock.advance(1)
    b.observe(status(clock, 0, rate=20))
    assert not b.projection().recharging and b.wait_ms(5, Priority.BACKFILL) > 0
    assert b.decide(5, Priority.BACKFILL).level == 1


def test_unknown_state_needs_sync(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget()
    # A scheduler asking "worth starting a run?" is not blocked by the missing state (HAZARDS #52)...
    assert b.wait_ms(5, Priority.UPSERT) == 0 and not b.decide(5, Priority.UPSERT).status_known
    # ...but spending without a status and without a way to sync is refused.
    with pytest.raises(BudgetNeedsSync):
        b.acquire(5, purpose="p", priority=Priority.UPSERT)
    calls: list[int] = []

    def fetch() -> TokenStatus:
        calls.append(1)
        return status(clock, 300)

    s = make_budget(sync=fetch)
    r = s.acquire(5, purpose="p", priority=Priority.UPSERT)
    assert calls == [1] and r.predicted == 5
    s.acquire(5, purpose="p", priority=Priority.UPSERT)
    assert calls == [1]  # not polled again
    # A response without an envelope (H3): state unknown -> sync once.
    clock.advance(10)
    s.mark_unknown()
    assert s.needs_sync()
    clock.advance(10)
    s.acquire(5, purpose="p", priority=Priority.UPSERT)
    assert calls == [1, 1] and not s.needs_sync()
    # Long idle: needs_sync turns true again.
    clock.advance(3_600_001)
    assert s.needs_sync()


def test_rate_zero_never_recovers(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget()
    b.observe(status(clock, -5, rate=0))
    with pytest.raises(BudgetStalled):
        b.acquire(5, purpose="p", priority=Priority.UPSERT)
    with pytest.raises(BudgetDeadline) as ei:
        b.acquire(5, purpose="p", priority=Priority.UPSERT, deadline_ms=clock.now_ms() + 10**9)
    assert ei.value.wait_ms is None and clock.slept_ms == []


def test_acquire_waits_in_bounded_steps_and_logs_once(
    make_budget: MakeBudget, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    b = make_budget(policy=NO_RECHARGE)
    s = status(clock, -100, refill_in=5_000)
    b.observe(s)
    expected = refill_wait_ms(s, 1, clock.now_ms(), 1_000)
    with caplog.at_level(logging.INFO, logger="deals_pipeline.budget"):
        b.acquire(10, purpose="deal_page", priority=Priority.UPSERT, deadline_ms=clock.now_ms() + expected)
    assert sum(clock.slept_ms) == expected == 5_000 + 20 * 60_000 + 1_000
    assert max(clock.slept_ms) <= 60_000
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
    assert len(waits) == 1 and waits[0].startswith("waiting for 10 tokens until ") and "20.1 min" in waits[0]


def test_acquire_rereads_shared_state_while_waiting(make_budget: MakeBudget, clock: ManualClock) -> None:
    """Another process settling its reservation shortens our wait (we re-read after every step)."""
    a, b = make_budget("a", NO_RECHARGE), make_budget("b", NO_RECHARGE)
    a.observe(status(clock, 100, refill_in=60_000))
    big = a.acquire(150, purpose="p", priority=Priority.UPSERT)  # projection -50

    # a's response comes back after the first sleep step: it cost only 10.
    original = clock.sleep_ms

    def sleep_then_settle(ms: float) -> None:
        original(ms)
        if len(clock.slept_ms) == 1:
            a.settle(big, 10, status(clock, 90, refill_in=1_000, consumed=10))

    clock.sleep_ms = sleep_then_settle  # type: ignore[method-assign]
    b.acquire(20, purpose="p", priority=Priority.UPSERT)
    assert len(clock.slept_ms) == 1 and clock.slept_ms[0] == 60_000


def test_call_retries_the_same_request_after_429(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget(policy=NO_RECHARGE)
    b.observe(status(clock, 50))  # stale: somebody else spent the bucket
    sent: list[int] = []
    s429: list[TokenStatus] = []

    def fn() -> _Page:
        sent.append(clock.now_ms())
        if len(sent) == 1:
            s429.append(status(clock, -20, refill_in=12_000))
            raise NotEnoughTokens("429", s429[0])
        return _Page(status(clock, -3, consumed=7))

    page, res = b.call(fn, cost=7, purpose="deal_page", priority=Priority.UPSERT, deadline_ms=None)
    assert len(sent) == 2
    # Waited exactly what the 429's envelope says for the level 1: 5 refills.
    assert sent[1] - sent[0] == refill_wait_ms(s429[0], 1, sent[0], 1_000) == 12_000 + 4 * 60_000 + 1_000
    s = b.ledger_summary()
    assert s["released"] == 1 and s["calls"] == 1 and s["spent"] == 7 and s["in_flight"] == 0
    assert b.projection().balance == -3


def test_call_gives_up_after_max_429(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget(policy=NO_RECHARGE)
    b.observe(status(clock, 50))

    def fn() -> _Page:
        clock.advance(1)
        raise NotEnoughTokens("429", status(clock, 300))  # a lying server: positive but 429

    with pytest.raises(NotEnoughTokens):
        b.call(fn, cost=5, purpose="p", priority=Priority.UPSERT, deadline_ms=None, max_429=3)
    assert b.ledger_summary()["released"] == 3


def test_call_stops_at_deadline_after_429(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget(policy=NO_RECHARGE)
    b.observe(status(clock, 50))

    def fn() -> _Page:
        raise NotEnoughTokens("429", status(clock, -200, refill_in=30_000))

    with pytest.raises(BudgetDeadline) as ei:
        b.call(fn, cost=5, purpose="p", priority=Priority.UPSERT, deadline_ms=clock.now_ms() + 600_000)
    assert ei.value.wait_ms == 30_000 + 40 * 60_000 + 1_000 and clock.slept_ms == []


def test_failure_without_envelope_keeps_reservation_until_next_status(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget(policy=NO_RECHARGE)
    b.observe(status(clock, 100))

    def fn() -> _Page:
        raise TransientKeepaError("timeout", status=None)

    with pytest.raises(TransientKeepaError):
        b.call(fn, cost=30, purpose="p", priority=Priority.UPSERT, deadline_ms=None)
    clock.advance(5)
    assert b.needs_sync() and b.projection().balance == 70  # maybe charged: still counted
    b.observe(status(clock, 72))
    assert not b.needs_sync() and b.projection().balance == 72
    # Re-based from the next envelope: 100 -> 72 with no refill in between, so it was charged 28.
    summary = b.ledger_summary()
    assert summary["failed"] == 0 and summary["spent"] == 28


def test_error_with_envelope_is_settled_at_tokens_consumed(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget(policy=NO_RECHARGE)
    b.observe(status(clock, 100))

    def fn() -> _Page:
        clock.advance(5)
        raise TransientKeepaError("500", http_status=500, status=status(clock, 100, consumed=0))

    with pytest.raises(TransientKeepaError):
        b.call(fn, cost=30, purpose="p", priority=Priority.UPSERT, deadline_ms=None)
    assert b.projection().balance == 100 and not b.needs_sync()


def test_deferred_settle_in_callers_transaction(make_duckdb_budget: MakeBudget, clock: ManualClock, db: Database) -> None:
    b = make_duckdb_budget(policy=NO_RECHARGE)
    b.observe(status(clock, 100))
    with db.transaction() as con:
        con.execute("CREATE TABLE IF NOT EXISTS chunk_rows (x INTEGER)")

    def fn() -> _Page:
        clock.advance(5)
        return _Page(status(clock, 72, consumed=28))

    _, res = b.call(fn, cost=30, purpose="product", priority=Priority.BACKFILL, deadline_ms=None, settle_now=False)
    # The response is already in the shared state: not double counted while the caller writes.
    assert b.projection().balance == 72 and b.projection().reserved_in_flight == 0
    with pytest.raises(RuntimeError):
        with db.transaction() as con:
            con.execute("INSERT INTO chunk_rows VALUES (1)")
            b.settle(res, 28, con=con)
            raise RuntimeError("crash before commit")
    with db.connect() as con:
        assert con.execute("SELECT state, actual FROM token_ledger").fetchall() == [("reserved", 28)]
    with db.transaction() as con:
        con.execute("INSERT INTO chunk_rows VALUES (1)")
        b.settle(res, 28, con=con)
    with db.connect() as con:
        assert con.execute("SELECT state, actual FROM token_ledger").fetchall() == [("settled", 28)]
        assert con.execute("SELECT COUNT(*) FROM chunk_rows").fetchone() == (1,)
    assert b.projection().balance == 72
    b.settle(res, 999)  # settling twice is a no-op
    assert b.ledger_summary()["spent"] == 28


def test_cost_model_static_table(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget()
    b.observe(status(clock, 300))
    assert b.costs.deal_pages(1).tokens == 5 and b.costs.deal_pages(3).tokens == 15
    assert b.costs.token_status().tokens == 0
    assert b.costs.products(4, {"offers": None}).tokens == 4
    assert b.costs.products(4, {"offers": None, "rating": True, "buybox": True}).tokens == 16
    assert b.costs.products(4, {"offers": 20, "rating": True, "buybox": True}).tokens == 28  # buybox ignored
    assert b.costs.products(2, {"offers": 40, "stock": True, "rating": True}).tokens == 18
    assert product_cost_shape({"offers": 40, "stock": True, "rating": True}).worst == 27  # 4 pages
    assert b.costs.worst_case_products(4, {"offers": 20, "rating": True}) == 52
    big = b.costs.products(100, {"offers": 20, "rating": True})
    assert big.tokens == 300 and big.clamped  # never above the cap for one request
    # Largest affordable batch: BACKFILL c <= min(cap, cap - reserve + max_deficit) = 300 -> 42 at 7/ASIN.
    assert b.max_asins_affordable({"offers": 20, "rating": True}) == 42
    assert b.max_asins_affordable({"offers": None}) == 100


def test_cost_model_calibrates_from_ledger(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget(policy=NO_RECHARGE)
    b.observe(status(clock, 300))
    opts = {"offers": 20, "rating": True}
    left = 300
    for actual in (40, 44, 36, 40, 40, 40, 40, 40):  # 10 per ASIN observed vs 7 predicted
        est = b.costs.products(4, opts)
        clock.advance(1)
        left -= actual

        def fn(left: int = left, actual: int = actual) -> _Page:
            return _Page(status(clock, left, consumed=actual))

        b.call(fn, cost=est, purpose="product", priority=Priority.UPSERT, deadline_ms=None)
        b.observe(status(clock, 300, ts=clock.now_ms() + 1))
        clock.advance(2)
    est = b.costs.products(4, opts)
    assert est.calibrated and 9.5 < est.per_unit < 10.0 and est.tokens == 40
    s = b.ledger_summary()
    assert s["spent"] == 320 and s["predicted"] < 320  # predicted vs actual recorded
    assert b.max_asins_affordable(opts) == 30  # shrinks with the measured cost
    # A different option set has its own calibration.
    assert b.costs.products(4, {"offers": None}).tokens == 4


def test_forecast(make_budget: MakeBudget, clock: ManualClock) -> None:
    b = make_budget()
    b.observe(status(clock, 100, refill_in=30_000))
    f = b.forecast(2, 40, {"offers": 20, "rating": True})
    assert f.tokens_needed == 10 + 280 and f.balance == 100 and f.refill_rate == 5
    assert f.eta_ms == 30_000 + 37 * 60_000  # 190 tokens = 38 refills
    assert f.eta is not None and f.eta.total_seconds() == f.eta_ms / 1000
    assert b.forecast(0, 10, {"offers": None}).eta_ms == 0
    clock.advance(1)
    b.observe(status(clock, 100, rate=50))
    assert b.forecast(2, 40, {"offers": 20, "rating": True}).eta_ms == 30_000 + 3 * 60_000
