"""Every wait longer than a few seconds is one line, a status record and step metadata."""

from __future__ import annotations

import logging

import dagster as dg
import pytest

from deals_pipeline.budget import BudgetPolicy, Priority, TokenBudget
from deals_pipeline.clock import ManualClock, ScaledClock, TIME_ANCHOR_ENV, TIME_SCALE_ENV
from deals_pipeline.defs.deal_pages import deal_pages
from deals_pipeline.defs.resources import DealQueryResource, DealsDatabaseResource, KeepaResource, TokenBudgetResource
from deals_pipeline.keepa.models import TokenStatus
from deals_pipeline.progress import VISIBLE_WAIT_MS, WaitNotice, add_listener, current_waits
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig
from deals_pipeline.status import collect_health
from deals_pipeline.storage import Database

START_MS = 1_764_626_400_000  # 2025-12-01 22:00:00 UTC


def _low_budget(tmp_path, clock: ManualClock, balance: int) -> TokenBudget:
    budget = TokenBudget(Database(tmp_path / "d.duckdb"), clock, BudgetPolicy(low_rate_below=0), owner="backfill:t1")
    budget.observe(TokenStatus(tokens_left=balance, refill_in_ms=30_000, refill_rate=5, timestamp_ms=clock.now_ms()))
    return budget


def test_a_long_wait_is_one_line_one_event_and_a_status_record(tmp_path, caplog):
    clock = ManualClock(START_MS)
    budget = _low_budget(tmp_path, clock, balance=10)
    seen: list[WaitNotice] = []
    remove = add_listener(lambda e: seen.append(e) if isinstance(e, WaitNotice) else None)
    try:
        with caplog.at_level(logging.INFO, logger="deals_pipeline.budget.waits"):
            budget.acquire(42, purpose="products", priority=Priority.BACKFILL)
    finally:
        remove()
    assert len(seen) == 1
    notice = seen[0]
    # 10 tokens would start the call (deficit allowed) but the backfill leaves the upserter's 40: a share wait.
    assert notice.tokens == 42 and notice.level == 41 and notice.reason == "share"
    assert notice.until_ms - notice.since_ms == sum(clock.slept_ms) >= VISIBLE_WAIT_MS
    assert notice.line().startswith(f"waiting for 42 tokens until {notice.until_text()} (share: balance 10 -> 41 at 5/min, ")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert lines == [f"{notice.line()} [backfill:t1]"]
    assert notice.metadata()["waiting"] == notice.line() and notice.metadata()["waiting_for_tokens"] == 42
    # Another process (status) sees the wait while it lasts, and not after.
    with budget.store.db.connect() as con:
        assert current_waits(con, notice.since_ms) == [notice]
        assert current_waits(con, notice.until_ms) == []


def test_status_shows_a_wait_in_progress(tmp_path):
    clock = ManualClock(START_MS)
    budget = _low_budget(tmp_path, clock, balance=-38)
    decision = budget.decide(42, Priority.UPSERT)
    from deals_pipeline.progress import announce

    notice = announce(budget, decision, tokens=42, purpose="products", priority=Priority.UPSERT, now_ms=clock.now_ms())
    assert notice is not None and notice.reason == "refill"
    health = collect_health(budget.store.db, budget, clock)
    assert [w["line"] for w in health["waits"]] == [notice.line()]


def test_short_waits_stay_quiet(tmp_path):
    clock = ManualClock(START_MS)
    budget = TokenBudget(Database(tmp_path / "d.duckdb"), clock, BudgetPolicy(low_rate_below=0), owner="o")
    budget.observe(TokenStatus(tokens_left=0, refill_in_ms=2_000, refill_rate=5, timestamp_ms=clock.now_ms()))
    seen: list[object] = []
    remove = add_listener(seen.append)
    try:
        budget.acquire(1, purpose="p", priority=Priority.UPSERT)
    finally:
        remove()
    assert 0 < sum(clock.slept_ms) < VISIBLE_WAIT_MS and seen == []


@pytest.mark.slow
def test_a_waiting_chunk_step_says_so_in_its_log_and_metadata(tmp_path, monkeypatch):
    """A real page run at 5 tokens/min from an empty balance: the steps log and observe their waits."""
    clock = ScaledClock(60.0)  # slow enough that refills cannot keep up with the steps
    monkeypatch.setenv(TIME_SCALE_ENV, repr(clock.scale))
    monkeypatch.setenv(TIME_ANCHOR_ENV, repr(clock.anchor_wall_s))
    with dg.instance_for_test() as instance:
        with KeepaSimulator(SimulatorConfig(refill_rate=5, initial_tokens=0, catalog_size=320), clock=clock) as sim:
            resources = {
                "keepa": KeepaResource(mode="simulator", simulator_url=sim.base_url),
                "database": DealsDatabaseResource(path=str(tmp_path / "d.duckdb")),
                "token_budget": TokenBudgetResource(refill_rate_guess=5, run_budget_minutes=10_000),
                # A full page (1) in chunks of 40: ~100 tokens a chunk with the calibrated costs (filtered deals are
                # free), 20 min of refill each, more than the page fetch's wait leaves. The in-slot wait limit is in
                # TIMELINE seconds: its default (2 min) would defer the page at once, so nothing would wait.
                "query": DealQueryResource(chunk_size=40, max_wait_in_slot_s=6 * 3600),
            }
            result = dg.materialize([deal_pages], partition_key="1", instance=instance, resources=resources)
        assert result.success
        observations = [e.event_specific_data.asset_observation for e in result.all_events
                        if e.event_type_value == "ASSET_OBSERVATION"]
        logs = [r.user_message for r in instance.all_logs(result.run_id) if r.user_message]
    waits = [{k: v.value for k, v in o.metadata.items()} for o in observations if "waiting" in o.metadata]
    assert waits, "an empty balance at 5/min makes the page wait"
    for meta in waits:
        assert meta["waiting"].startswith(f"waiting for {meta['waiting_for_tokens']} tokens until {meta['waiting_until']}")
        assert meta["waiting_reason"] in {"refill", "recharge", "share"}
    assert sum(1 for line in logs if line.startswith("waiting for ")) == len(waits)
    chunk_notes = [{k: v.value for k, v in o.metadata.items()} for o in observations if "chunk" in o.metadata]
    assert chunk_notes and any(n["token_waits"] > 0 and n["waited"].startswith("waiting for") for n in chunk_notes)
