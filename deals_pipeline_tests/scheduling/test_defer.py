"""Defer, don't sleep: no op waits for tokens longer than max_wait_in_slot_s while holding the slot."""

from __future__ import annotations

import pytest

from deals_pipeline.simulator import SimulatorConfig

BOUND_S = 120


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_no_chunk_or_upsert_op_waits_longer_than_the_bound_and_progress_is_kept(make_stack):
    # 5 tokens/min from an empty bucket: a chunk (~28-52 tokens) needs 6-10 minutes of refill.
    stack = make_stack(config=SimulatorConfig(refill_rate=5, initial_tokens=0))
    unbounded = stack.backfill()
    snapshot = unbounded.snapshot(0)
    # Another process spent the bucket: the server says 0 and the budget learns it (free /token call).
    stack.sim.bucket.set_balance(0, stack.clock.now_ms())
    stack.budget.sync()
    backfill = stack.backfill(max_wait_in_slot_s=BOUND_S)
    chunk = backfill.unfinished_chunks(0)[0]
    waits_before = list(stack.clock.slept_ms)
    spent = stack.sim.stats().tokens_consumed
    t0 = stack.clock.now_ms()
    outcome = backfill.run_chunk(snapshot, chunk)
    assert outcome.status == "deferred" and outcome.tokens_spent == 0
    assert stack.sim.stats().tokens_consumed == spent, "a deferred chunk pays nothing"
    assert stack.clock.now_ms() - t0 <= BOUND_S * 1000
    assert all(w <= BOUND_S * 1000 for w in stack.clock.slept_ms[len(waits_before):])
    assert backfill.unfinished_chunks(0)[0] == chunk, "a deferred chunk stays unfinished, not failed"
    # Later, when affordable, the relaunched chunk completes and pays once.
    stack.clock.advance(30 * 60_000)
    assert backfill.run_chunk(snapshot, chunk).status == "done"
    assert max(stack.sim.stats().product_fetches.values()) == 1

    updater = stack.updater(max_wait_in_slot_s=BOUND_S)
    stack.clock.advance(1)
    t1 = stack.clock.now_ms()
    report = updater.run(deadline_ms=t1 + 480 * 60_000)
    assert report.status in ("deferred", "complete"), report.error
    if report.status == "deferred":
        assert "pool slot released" in (report.error or "")
    # Every single wait of either bounded op stayed within the bound.
    assert all(w <= BOUND_S * 1000 for w in stack.clock.slept_ms[len(waits_before):])
