"""The pure scheduling rules (no simulator, no database)."""

from __future__ import annotations

import pytest

from deals_pipeline.scheduling import (
    chunk_retry_at_ms,
    poll_interval,
    should_quarantine,
    slot_deadline_ms,
    upsert_share_decision,
)


def test_share_caps_the_upserter_only_while_the_backfill_has_work():
    common = dict(cost=40, refill_rate=5, upsert_share=0.35, window_min=120)  # allowance 210 tokens
    assert upsert_share_decision(upsert_spent=0, backfill_has_work=True, **common).allowed
    assert upsert_share_decision(upsert_spent=209, backfill_has_work=True, **common).allowed
    capped = upsert_share_decision(upsert_spent=210, backfill_has_work=True, **common)
    assert not capped.allowed and "210 of its 210" in capped.reason
    assert upsert_share_decision(upsert_spent=10_000, backfill_has_work=False, **common).allowed
    with pytest.raises(ValueError):
        upsert_share_decision(upsert_spent=0, backfill_has_work=True, **{**common, "upsert_share": 0})


def test_slot_deadline_is_the_nearer_of_the_bound_and_the_run_deadline():
    assert slot_deadline_ms(1_000, None, 120) == 121_000
    assert slot_deadline_ms(1_000, 50_000, 120) == 50_000
    assert slot_deadline_ms(1_000, 10_000_000, 120) == 121_000


def test_poll_interval_keeps_polls_within_their_share_and_the_lag_target():
    at5 = poll_interval(refill_rate=5, arrivals_per_hour=60, max_poll_share=0.10, lag_target_min=30)
    assert at5.interval_s == 600  # 5 tokens / (10% of 5/min) = 10 min
    assert 5 / (at5.interval_s / 60) <= 0.10 * 5 + 1e-9
    # Few arrivals: polling more often than one new deal per poll buys empty pages.
    assert poll_interval(refill_rate=500, arrivals_per_hour=6, lag_target_min=30).interval_s == 600
    # The lag target caps the interval even when the cost floor would stretch it.
    assert poll_interval(refill_rate=1, arrivals_per_hour=60, lag_target_min=30).interval_s == 1800
    assert "poll every" in at5.reason


def test_retry_backoff_doubles_and_quarantine_after_n_attempts():
    assert [chunk_retry_at_ms(0, n, 60) for n in (1, 2, 3, 4, 9)] == [60_000, 120_000, 240_000, 480_000, 480_000]
    assert not should_quarantine(2, 3) and should_quarantine(3, 3)
