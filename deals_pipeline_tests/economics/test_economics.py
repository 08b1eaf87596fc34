"""Issue 10: every deal seen is stored, refreshes are free, /product only by policy, two-stage enrichment.

Real parts: the simulator over HTTP, real DuckDB files, the injected ManualClock (no sleeps). The
kill test SIGKILLs a real worker process at an event it observes (stage-1 verdicts in the DB and the
stage-2 request held by the simulator), never after a sleep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from deals_pipeline.enrichment import EnrichmentPolicy, StatsRules
from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig
from deals_pipeline.storage import Database, DatabaseBusy
from deals_pipeline_tests.harness.processes import worker_env

NO_PRICE_TRIGGER = 10_000.0  # percent: the price rule never fires


def _product_tokens(stack) -> int:
    with stack.db.connect() as con:
        return int(con.execute(
            "SELECT coalesce(sum(actual), 0) FROM token_ledger WHERE purpose = 'product' AND actual IS NOT NULL"
        ).fetchone()[0])


def _rows(stack, columns: str) -> dict[str, tuple]:
    with stack.db.connect() as con:
        return {r[0]: tuple(r[1:]) for r in con.execute(f"SELECT asin, {columns} FROM deals").fetchall()}


# -- lossless discovery ------------------------------------------------------------------------

def test_every_deal_of_a_fetched_page_is_stored_even_when_its_chunk_is_never_enriched(make_stack):
    stack = make_stack(config=SimulatorConfig(refill_rate=5, catalog_size=400))
    backfill = stack.backfill()
    snapshot = backfill.snapshot(0)  # the page only: no chunk runs
    page_asins = {d.asin for d in snapshot.deals}
    rows = _rows(stack, "state, used_current, used_avg90, used_delta_pct90, rank_current, last_update_minute, "
                        "creation_date, categories")
    assert set(rows) == page_asins and len(page_asins) == 150
    assert {r[0] for r in rows.values()} == {"discovered"}
    by_asin = {d.asin: d for d in snapshot.deals}
    for asin, (_, used, avg90, pct90, rank, minute, created, categories) in rows.items():
        deal = by_asin[asin]
        assert used == deal.price(2) and avg90 == deal.avg[3][2] and pct90 == deal.delta_percent[3][2]
        assert rank == deal.price(3) and minute == deal.last_update
        assert created is not None and list(categories) == list(deal.categories)
    assert backfill.unfinished_chunks(0) == list(range(snapshot.chunk_count))
    assert _product_tokens(stack) == 0

    # The upserter's pages too, even when the budget stops it before any enrichment.
    stack.clock.advance(60 * 60_000)
    report = stack.updater().run(deadline_ms=stack.clock.now_ms() + 1)
    newest = {d["asin"] for d in stack.sim.catalog.newest(150, stack.clock.now_ms())}
    assert report.pages_fetched >= 1
    assert newest <= set(_rows(stack, "state"))


# -- free refresh ------------------------------------------------------------------------------

def test_a_bump_refreshes_the_price_fields_at_zero_product_tokens(make_stack):
    config = SimulatorConfig(refill_rate=500, catalog_size=40, drift_updates_per_hour=120, future_minute_fraction=0)
    stack = make_stack(config=config)
    policy = EnrichmentPolicy(reenrich_after_hours=1_000, reenrich_price_change_pct=NO_PRICE_TRIGGER)
    updater = stack.updater(policy=policy)
    stack.budget.sync()  # learn the 500/min refill first: the batch (200) then covers all 40 deals
    updater.run()
    before = _rows(stack, "state, enriched_at_ms, last_update_minute, used_current, last_seen_ms")
    assert {r[0] for r in before.values()} == {"enriched"}
    tokens_before = _product_tokens(stack)
    fetches_before = stack.sim.stats().product_fetches

    stack.clock.advance(30 * 60_000)  # ~60 updates over 40 deals
    report = updater.run()
    after = _rows(stack, "state, enriched_at_ms, last_update_minute, used_current, last_seen_ms")
    now_ms = stack.clock.now_ms()
    bumped = [a for a in before if after[a][2] > before[a][2]]
    assert len(bumped) >= 10, "drift should have bumped many deals"
    assert report.deals_updated == len(bumped)
    for asin in bumped:
        live = stack.sim.catalog.deal(asin, now_ms)
        assert after[asin][2] == live["lastUpdate"]            # deal-page fields refreshed in place
        assert after[asin][3] == live["current"][2]
        assert after[asin][0] == "enriched" and after[asin][1] == before[asin][1]  # enrichment kept
        assert after[asin][4] > before[asin][4]                # last_seen moved
    assert _product_tokens(stack) == tokens_before             # 0 /product tokens
    assert stack.sim.stats().product_fetches == fetches_before


# -- the re-enrichment policy ------------------------------------------------------------------

def test_policy_unit_each_trigger_fires_and_nothing_else_does():
    policy = EnrichmentPolicy(reenrich_after_hours=24, reenrich_price_change_pct=10)
    hour = 3_600_000
    assert policy.stale_reason(0, 1000, 1000, 23 * hour) is None
    assert policy.stale_reason(0, 1000, 1099, 23 * hour) is None   # 9.9 % move
    assert "old" in policy.stale_reason(0, 1000, 1000, 24 * hour)
    assert "moved" in policy.stale_reason(0, 1000, 1100, 1)        # +10 %
    assert "moved" in policy.stale_reason(0, 1000, 900, 1)         # -10 %
    assert policy.stale_reason(None, None, 1000, 0) == "never bought"
    with pytest.raises(Exception):
        EnrichmentPolicy(reenrich_after_hours=0)


def test_the_age_trigger_rebuys_exactly_the_old_enrichments(make_stack):
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=40))
    updater = stack.updater(policy=EnrichmentPolicy(reenrich_after_hours=1, reenrich_price_change_pct=NO_PRICE_TRIGGER))
    stack.budget.sync()
    updater.run()
    first = stack.sim.stats().product_fetches
    assert len(first) == 40
    stack.clock.advance(59 * 60_000)
    updater.run()
    assert stack.sim.stats().product_fetches == first, "nothing is due before the hour"
    stack.clock.advance(2 * 60_000)
    report = updater.run()
    second = stack.sim.stats().product_fetches
    assert {a: second[a] - first[a] for a in second} == {a: 1 for a in first}, "every enrichment is an hour old"
    assert report.selected == 40


def test_the_price_trigger_rebuys_exactly_the_deals_whose_price_moved(make_stack):
    # A simulator refresh moves a price with p=0.1 by at most 5 %: ~15 refreshes per deal move some by >= 2 %.
    config = SimulatorConfig(refill_rate=500, catalog_size=40, drift_updates_per_hour=600, future_minute_fraction=0)
    stack = make_stack(config=config)
    updater = stack.updater(policy=EnrichmentPolicy(reenrich_after_hours=1_000, reenrich_price_change_pct=2))
    stack.budget.sync()
    updater.run()
    enriched_price = {a: r[0] for a, r in _rows(stack, "enriched_price").items()}
    first = stack.sim.stats().product_fetches
    stack.clock.advance(60 * 60_000)
    updater.run()
    now_ms = stack.clock.now_ms()
    moved = {a for a, p in enriched_price.items()
             if p is not None and abs(stack.sim.catalog.deal(a, now_ms)["current"][2] - p) * 100 >= 2 * p}
    second = stack.sim.stats().product_fetches
    rebought = {a for a in second if second[a] > first.get(a, 0)}
    assert moved, "drift should have moved some prices by 2 %"
    assert rebought == moved
    assert len(moved) < 40, "the trigger must leave some deals alone"


def test_the_backfill_obeys_the_policy_for_a_deal_the_upserter_enriched(make_stack):
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=150))
    policy = EnrichmentPolicy(reenrich_after_hours=1_000, reenrich_price_change_pct=NO_PRICE_TRIGGER)
    stack.updater(policy=policy, chunk_size=20).run()  # enriches the 150... or its batch of the newest
    first = stack.sim.stats().product_fetches
    stack.backfill(policy=policy).run_page(0)
    second = stack.sim.stats().product_fetches
    assert all(second[a] == 1 for a in first), "the backfill re-bought deals the policy did not call for"


# -- two-stage enrichment ----------------------------------------------------------------------

def test_stage_one_screens_before_offers_are_bought(make_stack):
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=150))
    rules = StatsRules(max_out_of_stock_pct90=50)
    summary = stack.backfill(policy=EnrichmentPolicy(stats_rules=rules)).run_page(0)
    assert summary.complete
    rows = _rows(stack, "state, stage1_passed, stats_out_of_stock_pct90, filter_stage, raw_product IS NOT NULL")
    assert len(rows) == 150
    for state, passed, oos, stage, enriched in rows.values():
        assert passed == (oos is not None and oos <= 50)
        assert (state == "enriched") == passed == enriched
        assert passed or stage == "stats"
    with stack.db.connect() as con:
        by_key = dict(con.execute("SELECT cost_key, sum(units) FROM token_ledger WHERE purpose = 'product' "
                                  "GROUP BY ALL").fetchall())
    survivors = sum(1 for r in rows.values() if r[1])
    assert by_key == {"product": 150, "product|offers=20|rating": survivors}, by_key


class HoldingSimulator(KeepaSimulator):
    """Holds /product requests that ask for offers (stage 2) while ``hold`` is set, then answers them
    with a 500 (not charged); counts stage-1 and delivered stage-2 requests per ASIN."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold = threading.Event()
        self.release = threading.Event()
        self.held = threading.Event()
        self.stage1: dict[str, int] = {}
        self.stage2: dict[str, int] = {}

    def _process(self, method, endpoint, params, body):
        if endpoint == "product":
            asins = [a for v in params.get("asin", []) for a in v.split(",")]
            offers = "offers" in params
            if offers and self.hold.is_set():
                self.held.set()
                self.release.wait(120)
                return self._error_reply(500, self.clock.now_ms(), "serverError", "held by the test")
            reply = super()._process(method, endpoint, params, body)
            if reply.status == 200:
                counts = self.stage2 if offers else self.stage1
                for a in asins:
                    counts[a] = counts.get(a, 0) + 1
            return reply
        return super()._process(method, endpoint, params, body)


def _wait_for(predicate, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except DatabaseBusy:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_kill_between_the_two_stages_rebuys_neither_stage(tmp_path):
    from deals_pipeline.clock import SystemClock

    db_path = tmp_path / "two_stage_kill.duckdb"
    config = SimulatorConfig(refill_rate=3000, catalog_size=40)
    rules = {"max_out_of_stock_pct90": 100}  # every deal with a known value passes: stage 2 always follows
    with HoldingSimulator(config, clock=SystemClock()) as sim:
        env = worker_env(sim.base_url, db_path, extra={"STATS_RULES": json.dumps(rules)})
        cmd = [sys.executable, "-m", "deals_pipeline_tests.harness.worker", "backfill", "--pages", "0"]
        sim.hold.set()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        db = Database(db_path, data_mode="simulator")

        def screened() -> int:
            if not db_path.exists() or proc.poll() is not None:
                return 0
            with db.connect() as con:
                return con.execute("SELECT count(*) FROM deals WHERE stage1_at_ms IS NOT NULL").fetchone()[0]

        try:
            _wait_for(screened, "stage-1 verdicts committed")
            _wait_for(sim.held.is_set, "the stage-2 request")
        finally:
            proc.kill()
            proc.wait()
        with db.connect() as con:
            screened_before = {r[0] for r in con.execute(
                "SELECT asin FROM deals WHERE stage1_at_ms IS NOT NULL").fetchall()}
            assert con.execute("SELECT count(*) FROM deals WHERE state = 'enriched'").fetchone()[0] == 0
        sim.hold.clear()
        sim.release.set()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    assert screened_before and len(screened_before) <= 4, "the kill landed after the first chunk's stage 1"
    with db.connect() as con:
        states = dict(con.execute("SELECT asin, state FROM deals").fetchall())
        chunks = dict(con.execute("SELECT status, count(*) FROM page_chunks GROUP BY ALL").fetchall())
    assert chunks == {"done": 10}
    assert all(n == 1 for n in sim.stage1.values()) and len(sim.stage1) == 40, "stage 1 bought twice"
    assert all(n == 1 for n in sim.stage2.values()), "stage 2 bought twice"
    assert set(sim.stage2) == {a for a, s in states.items() if s == "enriched"}
    assert screened_before <= set(sim.stage2), "the killed chunk's survivors went straight to stage 2"
