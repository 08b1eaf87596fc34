"""Deals that leave Keepa's list age out (issue 13): the simulator's churn expires deals, a full
discovery pass marks them inactive, the janitor archives them after the retention period, and active
deals are untouched. Real simulator over HTTP, real DuckDB file, the injected (manual) clock."""

from __future__ import annotations

import time

import duckdb
import pytest

from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.query import DealSelection
from deals_pipeline.lifecycle import LifecyclePolicy, run_discovery_pass, run_janitor
from deals_pipeline.simulator import SimulatorConfig
from deals_pipeline.storage.publish import published_path

HOUR_MS = 3_600_000


def _rows(stack, sql: str, params=None):
    with stack.db.connect() as con:
        return con.execute(sql, params or []).fetchall()


@pytest.mark.parametrize("mode", ["archive", "delete"])
def test_expired_deals_become_inactive_then_age_out(make_stack, mode: str) -> None:
    # The timeline starts at wall time: rows written by the enrichment carry wall-clock last_seen.
    clock = ManualClock(start_ms=int(time.time() * 1000))
    stack = make_stack(clock=clock, config=SimulatorConfig(refill_rate=500, seed=31, catalog_size=60,
                                                           drift_expired_per_hour=0.25))
    policy = LifecyclePolicy(inactive_after_hours=72, retain_inactive_days=7, mode=mode)
    backfill = stack.backfill()
    assert backfill.run_page(0).complete
    stored = {r[0] for r in _rows(stack, "SELECT asin FROM deals")}
    assert len(stored) >= 50

    clock.advance(80 * HOUR_MS)  # the list churns: some deals expire
    expired = {asin for asin, _ in stack.sim.catalog.expired(clock.now_ms())} & stored
    assert 3 <= len(expired) < len(stored)
    selection = backfill.settings.selection

    # An incomplete pass (page 0 only of a longer list would be) marks nothing: here max_pages=0 reads none.
    partial = run_discovery_pass(stack.db, stack.client, stack.budget, selection, clock, policy, max_pages=0)
    assert not partial.complete and partial.marked_inactive == 0

    report = run_discovery_pass(stack.db, stack.client, stack.budget, selection, clock, policy)
    assert report.complete and report.marked_inactive == len(expired)
    inactive = {r[0] for r in _rows(stack, "SELECT asin FROM deals WHERE inactive_since IS NOT NULL")}
    assert inactive == expired
    active_before = _rows(stack, "SELECT * FROM deals WHERE inactive_since IS NULL ORDER BY asin")
    # The published view shows active deals only.
    con = duckdb.connect(str(published_path(stack.db_path)), read_only=True)
    try:
        current = {r[0] for r in con.execute("SELECT asin FROM current_deals").fetchall()}
    finally:
        con.close()
    assert not current & expired and current <= stored - expired

    # Within the retention period nothing is removed.
    clock.advance(3 * 24 * HOUR_MS)
    assert run_janitor(stack.db, clock, policy).deleted == 0
    clock.advance(5 * 24 * HOUR_MS)  # now 8 days after they went inactive
    janitor = run_janitor(stack.db, clock, policy)
    assert janitor.deleted == len(expired) and janitor.still_inactive == 0
    assert janitor.archived == (len(expired) if mode == "archive" else 0)
    archived = {r[0] for r in _rows(stack, "SELECT asin FROM deals_archive")}
    assert archived == (expired if mode == "archive" else set())
    # Active deals are untouched, row for row.
    assert _rows(stack, "SELECT * FROM deals ORDER BY asin") == active_before
