"""Property tests of the spending rule: caps, the §3.3 wait formula, learned-rate thresholds, deadlines."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deals_pipeline.budget import (
    BudgetDeadline,
    BudgetPolicy,
    Priority,
    InMemoryBudgetStore,
    TokenBudget,
    max_new_deals_per_run,
    project_server_balance,
    required_level,
    thresholds_for,
    wait_for_level,
)
from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.models import REFILL_PERIOD_MS, TokenStatus, refill_wait_ms
from deals_pipeline_tests.budget.conftest import START_MS, status

SAMPLE_429 = TokenStatus(tokens_left=-249, refill_in_ms=45_592, refill_rate=5, timestamp_ms=1_758_036_697_230)

rates = st.integers(min_value=1, max_value=250)
policies = st.builds(
    BudgetPolicy,
    initial_refill_rate=st.integers(0, 50),
    threshold=st.integers(-50, 20_000),
    max_deficit=st.integers(-10, 20_000),
    burst_level=st.integers(-10, 20_000),
    low_rate_below=st.integers(0, 300),
    upsert_reserve=st.integers(-10, 20_000),
    margin_ms=st.integers(0, 5_000),
)


@st.composite
def statuses(draw: st.DrawFn) -> TokenStatus:
    rate = draw(rates)
    return TokenStatus(
        tokens_left=draw(st.integers(-2_000, 60 * rate + 50)),
        refill_in_ms=draw(st.integers(1, 60_000)),
        refill_rate=rate,
        timestamp_ms=START_MS,
    )


def formula_wait(s: TokenStatus, need: int, now: int, margin: int) -> int:
    """KEEPA_API.md §3.3 discrete form, written out independently (valid for now <= next refill)."""
    if s.tokens_left >= need:
        return 0
    n = math.ceil((need - s.tokens_left) / s.refill_rate)
    return (s.timestamp_ms + s.refill_in_ms - now) + (n - 1) * 60_000 + margin


def test_sample_429_wait_is_2985592_ms() -> None:
    assert wait_for_level(SAMPLE_429, 1, SAMPLE_429.timestamp_ms, 0) == 2_985_592
    assert refill_wait_ms(SAMPLE_429, 1, SAMPLE_429.timestamp_ms, 0) == 2_985_592


def test_sample_429_through_the_budget() -> None:
    clock = ManualClock(SAMPLE_429.timestamp_ms)
    budget = TokenBudget(InMemoryBudgetStore(), clock, BudgetPolicy(margin_ms=0, low_rate_below=0))
    budget.observe(SAMPLE_429)
    assert budget.wait_ms(1, Priority.UPSERT) == 2_985_592
    # Recharge mode on (5/min < 10): the upserter still waits only for its own cost (it is not held back
    # by recharge mode); the backfill waits for the burst level 80 plus the upserter's reserve of 40.
    budget2 = TokenBudget(InMemoryBudgetStore(), clock, BudgetPolicy(margin_ms=0))
    budget2.observe(SAMPLE_429)
    assert budget2.wait_ms(1, Priority.UPSERT) == 2_985_592
    assert budget2.wait_ms(1, Priority.BACKFILL) == formula_wait(SAMPLE_429, 120, clock.now_ms(), 0) == 45_592 + 73 * 60_000


@settings(max_examples=400, deadline=None)
@given(s=statuses(), policy=policies, cost=st.integers(0, 50_000), prio=st.sampled_from(list(Priority)),
       recharging=st.booleans(), dt=st.integers(0, 3 * 3_600_000))
def test_levels_never_exceed_cap_and_waits_match_formula(
    s: TokenStatus, policy: BudgetPolicy, cost: int, prio: Priority, recharging: bool, dt: int
) -> None:
    th = thresholds_for(policy, s.refill_rate)
    cap = 60 * s.refill_rate
    assert th.cap == cap
    assert 0 <= th.threshold < cap and 0 <= th.upsert_reserve <= cap // 2 and th.burst_level <= cap
    assert 0 <= th.max_deficit <= cap
    level = required_level(th, cost, prio, recharging)
    assert level <= cap  # no wait target above the cap (HAZARDS #31)

    now = s.timestamp_ms + dt
    m = policy.margin_ms
    wait = wait_for_level(s, level, now, m)
    assert wait is not None
    # Never longer than waiting for a full bucket.
    assert wait <= wait_for_level(s, cap, now, m)
    # A refill is trusted m ms after its instant: the wait is refill_wait_ms at now - m ...
    bal, _ = project_server_balance(s, now - m)
    assert wait == (0 if bal >= level else refill_wait_ms(s, level, now - m, 0))
    # ... which is the library's §3.3 wait with margin m, except that one inside the margin window is
    # not yet trusted (library 0, ours <= m).
    lib = refill_wait_ms(s, level, now, m)
    assert wait == lib or (lib == 0 and wait <= m)
    # Before the next refill it is exactly the written-out §3.3 discrete form.
    if now <= s.next_refill_ms and s.tokens_left < level:
        assert wait == formula_wait(s, level, now, m)
    # Liveness: after waiting that long the level is there (as projected at now + wait - m).
    after, _ = project_server_balance(s, now + wait - m)
    assert after >= level
    # And not a moment earlier.
    if wait > 0:
        before, _ = project_server_balance(s, now + wait - m - 1)
        assert before < level


@settings(max_examples=300, deadline=None)
@given(s=statuses(), dt=st.integers(0, 10 * 3_600_000))
def test_projection_never_exceeds_cap(s: TokenStatus, dt: int) -> None:
    bal, next_refill = project_server_balance(s, s.timestamp_ms + dt)
    assert bal <= s.cap
    assert bal >= min(s.tokens_left, s.cap)
    assert s.timestamp_ms + dt < next_refill <= s.timestamp_ms + dt + REFILL_PERIOD_MS
    if s.tokens_left <= s.cap and dt >= 61 * REFILL_PERIOD_MS + 2_000 * 60_000 // s.refill_rate:
        assert bal == s.cap


class _Harness:
    """A fresh in-memory store per hypothesis example: the arbiter's rules, microseconds per decision.
    (test_store_contract.py holds the DuckDB store to the same behaviour.)"""

    def fresh(self, policy: BudgetPolicy, owner: str = "prop") -> tuple[TokenBudget, ManualClock]:
        self.store = InMemoryBudgetStore()
        clock = ManualClock(START_MS)
        return TokenBudget(self.store, clock, policy, owner), clock


@pytest.fixture(scope="module")
def harness() -> _Harness:
    return _Harness()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=statuses(), policy=policies, cost=st.integers(0, 2_000), prio=st.sampled_from(list(Priority)),
       inflight=st.lists(st.integers(0, 400), max_size=3))
def test_budget_waits_are_bounded_and_sufficient(
    harness: _Harness, s: TokenStatus, policy: BudgetPolicy, cost: int, prio: Priority, inflight: list[int]
) -> None:
    budget, clock = harness.fresh(policy)
    budget.observe(s)
    other = TokenBudget(harness.store, clock, policy, "other")
    for c in inflight:  # other workers' reservations, taken while they were affordable
        if other.wait_ms(c, Priority.UPSERT) == 0:
            other.acquire(c, purpose="other", priority=Priority.UPSERT)
    proj = budget.projection()
    assert proj.balance <= proj.cap and proj.server_balance <= proj.cap
    d = budget.decide(cost, prio)
    assert d.level <= proj.cap and d.need <= proj.cap
    wait = d.wait_ms
    full = wait_for_level(s, proj.cap, clock.now_ms(), policy.margin_ms)
    if proj.reserved_in_flight == 0:
        assert wait <= full
        assert wait == wait_for_level(s, d.level, clock.now_ms(), policy.margin_ms)
        clock.advance(wait)
        budget.acquire(cost, purpose="p", priority=prio)  # no further wait needed
        assert clock.slept_ms == []
    else:
        # In-flight reservations: the server level waited for is clamped to the cap as well.
        assert wait <= max(full, policy.reservation_ttl_ms)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=statuses(), cost=st.integers(1, 400), prio=st.sampled_from(list(Priority)), frac=st.floats(0.0, 0.999))
def test_unreachable_deadline_raises_without_sleeping(
    harness: _Harness, s: TokenStatus, cost: int, prio: Priority, frac: float
) -> None:
    budget, clock = harness.fresh(BudgetPolicy())
    budget.observe(s)
    wait = budget.wait_ms(cost, prio)
    if wait == 0:
        return
    deadline = clock.now_ms() + int(wait * frac)
    with pytest.raises(BudgetDeadline) as ei:
        budget.acquire(cost, purpose="p", priority=prio, deadline_ms=deadline)
    assert clock.slept_ms == []
    assert ei.value.wait_ms == wait
    assert ei.value.need == budget.decide(cost, prio).level
    assert budget.ledger_summary()["calls"] == 0 and budget.projection().reserved_in_flight == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.integers(1, 9), second=st.integers(20, 250), balance=st.integers(-100, 40))
def test_learned_rate_changes_thresholds_and_run_size(harness: _Harness, first: int, second: int, balance: int) -> None:
    budget, clock = harness.fresh(BudgetPolicy(initial_refill_rate=5))
    assert budget.projection().refill_rate == 5  # configured guess before any response
    budget.observe(status(clock, balance, rate=first))
    th1 = budget.thresholds()
    assert th1.cap == 60 * first and th1.recharge_enabled
    assert th1.burst_level == min(80, 60 * first) and th1.upsert_reserve == min(40, 30 * first)
    assert budget.max_new_deals_per_run() == 20
    # Balance at/below 0 at a low rate: recharge mode (persisted), waits for the burst level.
    assert budget.projection().recharging == (balance - 0 <= 0)
    clock.advance(1)
    budget.observe(status(clock, balance, rate=second))  # plan upgrade: effective at the next response
    th2 = budget.thresholds()
    assert th2.cap == 60 * second and not th2.recharge_enabled
    assert th2.burst_level == min(80, 60 * second)
    assert not budget.projection().recharging  # not sticky (HAZARDS #41)
    assert budget.max_new_deals_per_run() == 200
    assert budget.decide(1, Priority.UPSERT).level == 1
    assert budget.max_new_deals_per_run("derived", interval_s=900, tokens_per_deal=8) == max(
        4, min(second * 15 // 8, 60 * second // 8)
    )


def test_learned_rate_5_then_50_then_200() -> None:
    clock = ManualClock(START_MS)
    budget = TokenBudget(InMemoryBudgetStore(), clock, BudgetPolicy())
    budget.observe(status(clock, 0, rate=5))
    assert budget.thresholds().recharge_enabled and budget.thresholds().cap == 300
    assert budget.max_new_deals_per_run() == 20
    assert budget.decide(10, Priority.BACKFILL).level == 80 + 40  # recharge: burst level + upsert reserve
    assert budget.decide(10, Priority.UPSERT).level == 1  # recharge mode gates only the backfill
    clock.advance(1)
    budget.observe(status(clock, 0, rate=50))
    assert budget.thresholds().cap == 3000 and not budget.thresholds().recharge_enabled
    assert budget.max_new_deals_per_run() == 200
    assert budget.decide(10, Priority.UPSERT).level == 1
    clock.advance(1)
    budget.observe(status(clock, 0, rate=200))
    assert budget.thresholds().cap == 12_000
    assert budget.max_new_deals_per_run() == 200
    # Same balance, faster refill: the wait for the next unit shrinks with the learned rate.
    assert budget.wait_ms(10, Priority.UPSERT) == 30_000 + 1_000


def test_sizing_rules() -> None:
    assert max_new_deals_per_run(5) == 20 and max_new_deals_per_run(19) == 20
    assert max_new_deals_per_run(20) == 200 and max_new_deals_per_run(200) == 200
    # derived: floor(rate * interval_min / tokens_per_deal), >= 1 chunk, <= cap worth
    assert max_new_deals_per_run(5, "derived", interval_s=3600, tokens_per_deal=7.5) == 40
    assert max_new_deals_per_run(5, "derived", interval_s=60, tokens_per_deal=8) == 4  # one chunk
    assert max_new_deals_per_run(5, "derived", interval_s=6 * 3600, tokens_per_deal=10) == 30  # cap worth (300/10)
    assert max_new_deals_per_run(1, "derived", interval_s=60, tokens_per_deal=100) == 1  # a chunk > cap
    with pytest.raises(ValueError):
        max_new_deals_per_run(5, "other")
