"""A chunk that fails every time is quarantined after N attempts; the page completes and the next one runs."""

from __future__ import annotations

import pytest

from deals_pipeline.backfill.service import quarantined_chunks, retry_quarantined
from deals_pipeline.scheduling import backfill_has_work
from deals_pipeline.simulator import SimulatorConfig


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_permanently_failing_chunk_is_quarantined_after_n_attempts_and_the_next_page_runs(make_stack):
    # 160 deals: page 0 is full, page 1 the short last page (10 deals), so "the next page" is quick.
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=160), max_attempts=2)
    backfill = stack.backfill(max_chunk_attempts=3, chunk_backoff_s=60)
    backfill.snapshot(0)
    fp = backfill.fingerprint
    attempts_seen = []
    for attempt in range(1, 4):
        stack.sim.inject("http_400", count=1, endpoint="product")  # the first chunk's request, every run
        summary = backfill.run_page(0)
        attempts_seen.append(summary.chunks_failed)
        if attempt < 3:
            assert not summary.complete and summary.chunks_failed == 1 and summary.chunks_quarantined == ()
            # Backing off: an immediate rerun pays nothing for it and does not count an attempt.
            spent = stack.sim.stats().tokens_consumed
            assert backfill.run_page(0).chunks_failed == 1
            assert stack.sim.stats().tokens_consumed == spent
            stack.clock.advance(60_000 * 2 ** (attempt - 1))
    assert summary.complete and summary.chunks_failed == 0 and summary.chunks_quarantined == (0,)
    assert summary.as_metadata()["quarantined_chunk_indexes"] == "0"
    [q] = quarantined_chunks(stack.db, fp)
    assert (q.page, q.chunk_index, q.attempts) == (0, 0, 3) and "400" in (q.error or "")
    assert backfill.unfinished_chunks(0) == []
    # The sensor's view moves on to page 1, and page 1 runs.
    from deals_pipeline.defs.sensors import next_backfill_page

    assert next_backfill_page(stack.db, fp)[0] == 1
    assert backfill.run_page(1).complete
    # `deals-pipeline retry-quarantined` puts it back; the sensor returns to page 0 and it completes.
    assert [(c.page, c.chunk_index) for c in retry_quarantined(stack.db, fp)] == [(0, 0)]
    assert next_backfill_page(stack.db, fp)[0] == 0
    with stack.db.connect() as con:
        assert backfill_has_work(con, fp)
    final = backfill.run_page(0)
    assert final.complete and final.chunks_quarantined == () and final.chunks_done == final.chunks_total
    assert quarantined_chunks(stack.db, fp) == []
