"""Bounded, resumable upsert scans: a backlog deeper than one run resumes, never re-pays page 0."""

from __future__ import annotations

from deals_pipeline.simulator import SimulatorConfig
from deals_pipeline.upsert.service import read_watermark


def test_the_upsert_scan_resumes_without_refetching_pages_it_already_paid_for(make_stack):
    config = SimulatorConfig(refill_rate=500, catalog_size=2000, drift_updates_per_hour=900, drift_new_per_hour=30)
    stack = make_stack(config=config)
    updater = stack.updater(max_pages_per_run=2)
    assert updater.run().status == "complete"
    stack.clock.advance(60 * 60_000)  # ~930 changed deals: a scan down to the watermark needs ~7 pages
    stack.sim.reset_stats()
    reports = []
    for _ in range(12):
        report = updater.run()
        reports.append(report)
        if report.status != "scanning":
            break
    scanning = [r for r in reports if r.status == "scanning"]
    assert len(scanning) >= 2, [(r.status, r.pages_fetched) for r in reports]
    assert all(r.pages_fetched <= 2 for r in reports), "the page cap was exceeded"
    fetches = stack.sim.stats().deal_page_fetches
    # Page 0 was paid once for the whole multi-run scan; each later page at most twice (the resume
    # re-reads the page before its position to check the list did not move up past it).
    assert fetches[0] == 1, dict(fetches)
    assert max(fetches.values()) <= 2, dict(fetches)
    assert sum(fetches.values()) <= 2 * len(fetches)
    done = reports[-1]
    assert done.scan_complete and done.status in ("complete", "budget_stopped") and done.selected > 0
    # After the scan completed, the next run reads down only to where that scan started: 1-2 pages.
    stack.sim.reset_stats()
    after = updater.run()
    assert after.pages_fetched <= 2 and after.scan_complete
    assert read_watermark(stack.db) is not None


def test_a_scan_with_nothing_new_stops_at_the_first_page(make_stack):
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=800))
    updater = stack.updater(max_pages_per_run=2)
    updater.run()
    stack.sim.reset_stats()
    report = updater.run()
    assert report.status == "nothing_new" and report.pages_fetched == 1
