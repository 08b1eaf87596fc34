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
    reports = []
    for _ in range(12):
        report = updater.run()
        reports.append(report)
        if report.status != "scanning":
            break
    scanning = [r for r in reports if r.status == "scanning"]
    assert len(scanning) >= 2, [(r.status, r.pages_fetched) for r in reports]
    assert all(r.pages_fetched <= 1 for r in reports), "the page cap was exceeded"
    fetches = stack.sim.stats().deal_page_fetches
    # Every page of the multi-run scan was paid once: each run resumed at the next unread page (the
    # list only moved down, new and refreshed deals entering at the top, so no step back was needed).
    assert fetches[0] == 1 and max(fetches.values()) == 1, dict(fetches)
    assert sorted(fetches) == list(range(len(fetches)))
    done = reports[-1]
    assert done.scan_complete and done.status in ("complete", "budget_stopped") and done.selected > 0
    # After the scan completed, the next run reads down only to where that scan started: 1-2 pages.
    stack.sim.reset_stats()
    after = updater.run()
    assert after.pages_fetched <= 2 and after.scan_complete  # the 15-min overlap at ~960 changes/h: 1-2 pages
    assert read_watermark(stack.db) is not None


def test_a_scan_with_nothing_new_stops_at_the_first_page(make_stack):
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=800))
    updater = stack.updater(max_pages_per_run=2)
    updater.run()
    stack.sim.reset_stats()
    report = updater.run()
    assert report.status == "nothing_new" and report.pages_fetched == 1
