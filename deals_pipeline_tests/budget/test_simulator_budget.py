"""The budget against the Keepa simulator over real HTTP, on a shared ManualClock (no real sleeping)."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest

from deals_pipeline.budget import BudgetDeadline, BudgetPolicy, Priority, TokenBudget
from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.models import TokenStatus, refill_wait_ms
from deals_pipeline.keepa.query import ProductOptions
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig
from deals_pipeline.storage.db import Database
from deals_pipeline_tests.budget.conftest import START_MS

pytestmark = pytest.mark.slow  # the simulator over HTTP with a DuckDB budget

log = logging.getLogger(__name__)
OPTIONS = ProductOptions(stats=90, offers=20, rating=True)


def test_429_then_computed_wait_succeeds(tmp_path: Path, sentinel_key: str) -> None:
    clock = ManualClock(START_MS)
    # The backfill (bulk spender) is the one that recharges to the burst level; no reserve here.
    budget = TokenBudget(Database(tmp_path / "b.duckdb"), clock, BudgetPolicy(upsert_reserve=0), "backfill")
    seen: list[TokenStatus] = []

    def on_status(s: TokenStatus) -> None:
        seen.append(s)
        budget.observe(s)  # the client publishes every envelope; observing twice is harmless

    with KeepaSimulator(SimulatorConfig(refill_rate=5, initial_tokens=-40, seed=3), clock=clock) as sim, KeepaClient(
        sentinel_key, base_url=sim.base_url, clock=clock, on_status=on_status
    ) as client:
        # A stale belief (another app on the key spent the bucket since): the first send gets a 429.
        budget.observe(TokenStatus(tokens_left=200, refill_in_ms=30_000, refill_rate=5, timestamp_ms=clock.now_ms() - 5_000))
        asins = sim.catalog.asins()[:4]
        page, res = budget.call(
            lambda: client.products(asins, OPTIONS), cost=budget.costs.products(4, OPTIONS),
            purpose="product", priority=Priority.BACKFILL, deadline_ms=None,
        )
        stats = sim.stats()
    s429 = seen[0]
    assert s429.tokens_left == -40 and s429.tokens_consumed == 0
    assert stats.rejected_429 == 1 and stats.requests["product"] == 2
    # 5/min is a low rate: after the 429 the budget waits for the burst level 80 (clamped <= cap),
    # exactly the §3.3 discrete form from the 429's own envelope.
    expected = refill_wait_ms(s429, 80, s429.timestamp_ms, 1_000)
    assert expected == s429.refill_in_ms + 23 * 60_000 + 1_000
    assert sum(clock.slept_ms) == expected and max(clock.slept_ms) <= 60_000
    assert page.status.tokens_consumed > 0 and len(page.products) == 4
    assert page.status.tokens_left == 80 - page.status.tokens_consumed
    summary = budget.ledger_summary()
    assert summary["released"] == 1 and summary["spent"] == page.status.tokens_consumed and summary["in_flight"] == 0


def test_seed_scenario_two_hours_at_5_per_minute(tmp_path: Path, sentinel_key: str) -> None:
    """Product calls of 4 ASINs for 2 simulated hours: burst-and-wait cycles, spending ≈ refill."""
    clock = ManualClock(START_MS)
    end = START_MS + 2 * 3_600_000
    policy = BudgetPolicy()
    with KeepaSimulator(SimulatorConfig(refill_rate=5, seed=7, catalog_size=800), clock=clock) as sim, KeepaClient(
        sentinel_key, base_url=sim.base_url, clock=clock
    ) as client:
        budget = TokenBudget(Database(tmp_path / "b.duckdb"), clock, policy, "backfill", sync=client.token_status)
        asins = itertools.cycle(sim.catalog.asins())
        calls: list[tuple[int, int, int]] = []  # (sent at, waited, tokens)
        worst_excess = 0
        stop_wait = None
        while True:
            batch = [next(asins) for _ in range(4)]
            est = budget.costs.products(4, OPTIONS, cap=300)
            d = budget.decide(est.tokens, Priority.BACKFILL) if calls else None
            truth = sim.bucket.status(clock.now_ms())
            slept_before = len(clock.slept_ms)
            t0 = clock.now_ms()
            try:
                page, _ = budget.call(
                    lambda: client.products(batch, OPTIONS), cost=est, purpose="product",
                    priority=Priority.BACKFILL, deadline_ms=end,
                )
            except BudgetDeadline as exc:
                stop_wait = exc.wait_ms
                assert clock.now_ms() == t0 and len(clock.slept_ms) == slept_before  # no sleep first
                assert t0 + exc.wait_ms > end
                break
            waited = int(sum(clock.slept_ms[slept_before:]))
            if d is not None:
                # Never longer than §3.3 allows for the level from the server's real bucket.
                allowed = refill_wait_ms(truth, d.level, t0, policy.margin_ms)
                assert d.level <= 300
                worst_excess = max(worst_excess, waited - allowed)
            calls.append((clock.now_ms(), waited, page.status.tokens_consumed))
        stats = sim.stats()
        refilled = sim.bucket.refills * 5
        final_balance = sim.bucket.balance(clock.now_ms())
    spent = stats.tokens_consumed
    n = len(calls)
    waits = [w for _, w, _ in calls if w > 0]
    per_half_hour = [sum(1 for t, _, _ in calls if START_MS + k * 1_800_000 <= t < START_MS + (k + 1) * 1_800_000) for k in range(4)]
    log.warning(
        "seed scenario: %d calls, spent %d, refilled %d (+300 initial), final balance %d, 429s %d, waits %d "
        "(max %.0f s), worst wait minus formula %d ms, calls per 30 min %s, stop wait %s ms",
        n, spent, refilled, final_balance, stats.rejected_429, len(waits), max(waits) / 1000, worst_excess,
        per_half_hour, stop_wait,
    )
    assert stats.rejected_429 == 0
    assert stats.requests["token"] == 1  # one sync at start, never polled
    assert worst_excess <= 0
    assert spent == 300 + refilled - final_balance
    assert -60 - 52 <= final_balance <= 80  # deficit bounded; never idles at the cap
    assert spent >= 300 + refilled - 80
    assert all(k >= 2 for k in per_half_hour)  # steady progress (bursts of ~2 calls per ~20 min)
    assert len(waits) >= 4  # burst-and-wait cycles
