"""Shares: an upsert launched while the backfill is starved gets its share, and no more."""

from __future__ import annotations

import pytest

from deals_pipeline.budget import BudgetDeadline, Priority
from deals_pipeline.scheduling import spent_by_priority
from deals_pipeline.simulator import SimulatorConfig
from deals_pipeline_tests.harness.scheduled import simulate_scheduled

SHARE = 0.35
BOUND_S = 120


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_an_upsert_launched_during_a_starved_backfill_gets_its_share(make_stack):
    config = SimulatorConfig(refill_rate=5, initial_tokens=0, catalog_size=2000,
                             drift_new_per_hour=60, drift_updates_per_hour=250)
    stack = make_stack(config=config)
    backfill = stack.backfill(max_wait_in_slot_s=BOUND_S)
    updater = stack.updater(max_wait_in_slot_s=BOUND_S, backfill_fingerprint=backfill.fingerprint,
                            upsert_share=SHARE, max_pages_per_run=10)
    # The backfill alone for half an hour: it takes every token and keeps waiting (starved), deferring chunks.
    snapshot = None
    while snapshot is None:
        try:
            snapshot = backfill.snapshot(0)
        except BudgetDeadline:  # deferred: not affordable within the bound; the sensor relaunches a minute later
            stack.clock.advance(60_000)
    end = stack.clock.now_ms() + 1_800_000
    deferred = 0
    while stack.clock.now_ms() < end:
        outcome = backfill.run_chunk(snapshot, backfill.unfinished_chunks(0)[0])
        if outcome.status == "deferred":
            deferred += 1
            stack.clock.advance(60_000)
    assert deferred > 0, "the backfill was never short of tokens"
    # Now the upsert sensor starts launching, in the production schedule (one slot, bounded waits).
    start = stack.clock.now_ms()
    hours = 3
    report = simulate_scheduled(stack, hours=hours, backfill=backfill, updater=updater)
    with stack.db.connect() as con:
        spent = spent_by_priority(con, since_ms=start)
    refill = 5 * 60 * hours
    upsert_share = spent[Priority.UPSERT] / refill
    backfill_share = spent[Priority.BACKFILL] / refill
    completed = [r for r in report.upsert_runs if r.chunks_done > 0]
    assert completed, report.statuses
    # Gets its share: at least half of it (the churn always gives the upserter more to do than it may buy)...
    assert upsert_share >= SHARE / 2, (upsert_share, report.statuses)
    # ...and not more than its share within the sliding window, plus what the rule lets through: the chunk
    # that crosses the allowance and the polls (pages are admitted by the poll interval, not the share).
    window = updater.settings.share_window_min
    with stack.db.connect() as con:
        last_window = spent_by_priority(con, since_ms=stack.clock.now_ms() - window * 60_000)[Priority.UPSERT]
    assert last_window / (5 * window) <= SHARE + 0.2, (last_window, report.statuses)
    assert backfill_share >= 1 - SHARE - 0.15, (backfill_share, spent)
    assert "share_deferred" in report.statuses
    assert not any(r.status == "budget_stopped" for r in report.upsert_runs)
