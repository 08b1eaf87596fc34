"""Bounded, resumable upsert scans: a backlog deeper than one run resumes, never re-pays page 0."""

from __future__ import annotations

from deals_pipeline.simulator import SimulatorConfig
from deals_pipeline.upsert.service import read_watermark


def test_the_upsert_scan_resumes_without_refetching_pages_it_already_paid_for(make_stack):
    config = SimulatorConfig(refill_rate=500, catalog_size=2000, drift_updates_per_hour=900, drift_new_per_hour=60)
    stack = make_stack(config=config)
    updater = stack.updater(max_pages_per_run=1, chunk_size=20)
    assert updater.run().status == "complete"
    stack.clock.advance(30 * 60_000)  # ~480 changed deals: a scan down to the watermark needs ~4 pages
    stack.sim.reset_stats()
    before = read_watermark(stack.db)
    reports = []
    for _ in range(12):
        report = updater.run()
        reports.append(report)
        if not report.scan_complete:
            assert read_watermark(stack.db) == before, "the watermark moved before the scan reached it"
        if report.scan_complete:
            break
    scanning = [r for r in reports if not r.scan_complete]
    assert len(scanning) >= 2, [(r.status, r.pages_fetched) for r in reports]
    # The page cap, plus the one page a resume re-reads to check the list did not move past its position.
    assert reports[0].pages_fetched == 1 and all(r.pages_fetched <= 2 for r in reports), "page cap exceeded"
    fetches = stack.sim.stats().deal_page_fetches
    # No page was paid from 0 again: each run resumed where the last one stopped. Page 0 was read once
    # (+1 resume check), every page at most twice, and the scan went deeper than one run could.
    assert fetches[0] <= 2 and max(fetches.values()) <= 2, dict(fetches)
    assert sorted(fetches) == list(range(len(fetches))) and len(fetches) >= 3, dict(fetches)
    done = reports[-1]
    assert done.scan_complete and done.status in ("complete", "budget_stopped")
    assert read_watermark(stack.db) > before, "the watermark moves once the scan reached it"

    stack.sim.reset_stats()
    after = updater.run()
    # A new scan from page 0 down to the moved watermark (minus its 15-min overlap), within the page cap.
    assert after.pages_fetched == 1 and after.scan_next_page in (0, 1)
    assert read_watermark(stack.db) is not None


def test_a_scan_with_nothing_new_stops_at_the_first_page(make_stack):
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=800))
    updater = stack.updater(max_pages_per_run=2)
    updater.run()
    stack.sim.reset_stats()
    report = updater.run()
    assert report.status == "nothing_new" and report.pages_fetched == 1
