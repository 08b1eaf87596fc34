"""Hazards from ../shared/HAZARDS.md that the code handles but no other test proved (docs/HAZARDS_MAP.md).

Real parts only: the Keepa samples (``samples_dir``), the simulator + DuckDB + budget on a ManualClock
(``make_stack``), a scripted HTTP server replaying real sample bytes. No mocks. Each test names the
hazard ids it proves. Three tests reproduce product bugs found while mapping (rows #18, #40, #44/#48 of the map); they were
fixed and the tests now guard them.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from deals_pipeline.budget import BudgetPolicy, Priority, TokenBudget, required_level, thresholds_for
from deals_pipeline.clock import ManualClock
from deals_pipeline.enrichment import ChunkEnricher, ViabilityRules
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import ConfigError, InvalidRequest, NotEnoughTokens
from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute
from deals_pipeline.keepa.models import Deal, DealPage, Product, TokenStatus
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.simulator import SimulatorConfig
from deals_pipeline.storage import Database
from deals_pipeline.storage.repository import DEAL_COLUMNS, Viability, deal_rows, stored_deals, upsert_deals, utcnow
from deals_pipeline.storage.schema import SCHEMA_VERSION
from deals_pipeline.upsert.service import RecentDealsUpdater, UpsertSettings, Watermark, read_watermark

REPO = Path(__file__).resolve().parents[1]
RUN = "deal_responses/run_2025-09-14T18-12Z_commit_b3f7397"
NEWEST_FIRST = {"domainId": 1, "priceTypes": [2], "dateRange": 3, "sortType": 1}
#: /product without offers (1 token per ASIN): for tests about paging, cursors and accounting, not offers.
LEAN = ProductOptions(offers=None, rating=False)


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sample_page(samples_dir: Path) -> DealPage:
    """Real /deal page 0 of run b3f7397 (Books, USED, sortType 4): 150 deals."""
    return DealPage.from_response(_json(samples_dir / RUN / "page_0.json"), page=0)


@pytest.fixture(scope="module")
def sample_product(samples_dir: Path) -> Product:
    return Product.from_json(_json(samples_dir / "product_object_1886940606.json"))


@pytest.fixture(scope="module")
def sample_status(samples_dir: Path) -> dict:
    """A real /token envelope (refillRate 5)."""
    return _json(samples_dir / "token_status_samples.json")[0]


def _ledger(stack, sql: str):
    with stack.db.connect() as con:
        return con.execute(sql).fetchall()


def _stored(stack) -> dict[str, int]:
    with stack.db.connect() as con:
        return dict(con.execute("SELECT asin, last_update_minute FROM deals").fetchall())


def _updater(stack, **settings) -> RecentDealsUpdater:
    return RecentDealsUpdater(stack.db, stack.client, stack.budget,
                              UpsertSettings(selection=DealSelection.from_mapping(NEWEST_FIRST), **settings),
                              clock=stack.clock, source="simulator")


# -- 1. Token accounting ------------------------------------------------------------------------


def test_h2_offers_10_is_rejected_before_anything_is_sent() -> None:
    """#2: `offers=10` (valid range 20..100) cost ~95 tokens per book. Every config path refuses it."""
    from deals_pipeline.defs.resources import DealQueryResource

    for bad in (0, 10, 19, 101):
        with pytest.raises(InvalidRequest, match="offers"):
            ProductOptions(offers=bad)
        with pytest.raises(InvalidRequest, match="offers"):
            ProductOptions.from_mapping({"offers": str(bad)})
        with pytest.raises(InvalidRequest, match="offers"):
            DealQueryResource(offers=bad).backfill_settings()  # the Dagster resource: fails at run start
    assert ProductOptions(offers=20).to_params()["offers"] == "20"
    assert "offers" not in ProductOptions(offers=None).to_params()  # "no offers" is the only way below 20


def test_h9_h44_the_default_chunk_worst_case_fits_the_5_per_minute_bucket(make_stack, sample_status) -> None:
    """#9/#44: size each /product batch so its worst-case cost fits (4 ASINs ≈ 24–52 tokens at 5/min)."""
    from deals_pipeline.defs.resources import DealQueryResource

    stack = make_stack()
    stack.budget.observe(TokenStatus.from_envelope(sample_status))  # a real envelope: 5/min, cap 300
    query = DealQueryResource()
    options = query.product_options()
    th = stack.budget.thresholds()
    assert (th.refill_rate, th.cap) == (5, 300)
    worst = stack.budget.costs.worst_case_products(query.chunk_size, options)
    assert worst == 52
    # The spending rule can start it without clamping: a BACKFILL call in recharge mode needs
    # max(threshold + 1, cost - max_deficit, burst_level) + upsert_reserve, which must fit in the cap.
    unclamped = max(th.threshold + 1, worst - th.max_deficit, th.burst_level) + th.upsert_reserve
    assert unclamped == required_level(th, worst, Priority.BACKFILL, recharging=True) == 120 <= th.cap
    assert query.chunk_size <= stack.budget.max_asins_affordable(options, Priority.BACKFILL)


def test_h44_h48_a_chunk_bigger_than_the_bucket_is_refused_or_shrunk(make_stack) -> None:
    stack = make_stack(config=SimulatorConfig(refill_rate=5))
    backfill = stack.backfill(chunk_size=100)
    snapshot = backfill.snapshot(0)
    backfill.run_chunk(snapshot, 0)
    balance = stack.sim.bucket.balance(stack.clock.now_ms())
    # Today: predicted 300 (clamped), actually charged ~1000, balance ~ -720 (max_deficit is 60).
    assert balance >= -stack.budget.thresholds().max_deficit


def test_h7_h15_upserter_pages_are_capped_and_every_request_is_admitted_and_accounted(make_stack) -> None:
    """#7: cap pages per run and admit every request against the balance; #15: no call bypasses the budget."""
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=400))
    stack.budget.sync()  # the refill rate is learned from the envelope (500/min), not configured
    report = _updater(stack, max_pages_per_run=1, chunk_size=100, product_options=LEAN).run()
    # A 200-deal batch over 400 matching deals needs a second page; the page cap stops the run at one.
    assert report.batch_size == 200
    assert report.pages_fetched == 1 and report.selected == 150
    stats = stack.sim.stats()
    assert stats.requests["deal"] == 1
    # Every request reached Keepa only through the budget: one ledger row per request, same spend.
    rows = dict(_ledger(stack, "SELECT purpose, count(*) FROM token_ledger WHERE state = 'settled' GROUP BY ALL"))
    assert rows["deal_page"] == stats.requests["deal"]
    assert rows["product"] == stats.requests["product"] == report.chunks_done
    spent = _ledger(stack, "SELECT sum(actual) FROM token_ledger WHERE state = 'settled'")[0][0]
    assert spent == stats.tokens_consumed == report.tokens_spent


def test_h29_tokens_are_integers_and_the_balance_has_one_owner(make_stack) -> None:
    """#29: count tokens as integers, keep no balance copies: one row of server status for every process."""
    stack = make_stack()
    stack.budget.sync()
    with pytest.raises(TypeError):
        stack.budget.acquire(5.5, purpose="p", priority=Priority.UPSERT)
    with pytest.raises(TypeError):
        stack.budget.acquire(True, purpose="p", priority=Priority.UPSERT)
    types = dict(_ledger(stack, "SELECT column_name, data_type FROM information_schema.columns "
                                "WHERE table_name IN ('token_ledger', 'token_server_status') "
                                "AND column_name IN ('predicted', 'actual', 'tokens_left', 'refill_rate')"))
    assert set(types.values()) == {"INTEGER"}
    other = TokenBudget(stack.db, stack.clock, BudgetPolicy(), owner="another-process")  # no /token fetcher
    assert not other.needs_sync()  # a restarted process reads the shared status: no sync (#41)
    other.acquire(7, purpose="p", priority=Priority.UPSERT)
    assert _ledger(stack, "SELECT count(*) FROM token_server_status") == [(1,)]
    assert stack.budget.projection().reserved_in_flight == 7  # the first budget sees the other's spend


def test_h27_h32_the_backfill_never_outranks_the_upserter() -> None:
    """#27/#32: explicit priority in one arbiter: at every rate, cost and mode the backfill waits for at least
    the upserter's level, so a backfill target can never sit above the upserter's (no priority inversion)."""
    policy = BudgetPolicy()
    for rate in (1, 2, 5, 9, 10, 25, 60, 250):
        th = thresholds_for(policy, rate)
        for cost in (0, 1, 5, 28, 52, 100, 300, 5_000):
            for recharging in (False, True):
                up = required_level(th, cost, Priority.UPSERT, recharging)
                back = required_level(th, cost, Priority.BACKFILL, recharging)
                assert up <= back <= max(th.cap, 1), (rate, cost, recharging)


@pytest.mark.slow  # imports Dagster (the run reaper)
def test_h27_liveness_comes_from_the_process_table_not_from_process_names() -> None:
    """#27: `pgrep` matched `tail -f` (a false "running"); the run reaper checks the pid recorded in the
    run's tags against the process table instead of matching process names."""
    from deals_pipeline.defs.run_reaper import process_alive

    assert process_alive(os.getpid())
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert not process_alive(pid_max)  # pids are always below pid_max: this one never exists


# -- 2. Cursors, watermarks and page drift -------------------------------------------------------


def test_h12_a_failed_upsert_run_advances_the_watermark_only_over_committed_chunks(make_stack) -> None:
    """#12/#36: the watermark moves in the chunk's transaction; an aborted run leaves no gap."""
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=30), max_attempts=2)
    updater = _updater(stack, chunk_size=10, product_options=LEAN)
    # No status known yet: the batch is sized from the configured guess (5/min -> 20 deals).
    batch = sorted(Watermark(d["lastUpdate"], d["asin"]) for d in stack.sim.catalog.newest(20, stack.clock.now_ms()))

    def break_the_next_chunk(report) -> None:
        if report.chunks_done == 1:  # after chunk 1 committed: two 5xx in a row exhaust max_attempts=2
            stack.sim.inject("server_error", count=2, endpoint="product")

    report = updater.run(on_chunk=break_the_next_chunk)
    assert report.status == "failed" and "RetriesExhausted" in report.error
    assert report.chunks_done == 1 and report.selected == 20
    chunk1 = batch[:10]  # the first run takes the newest batch, committed oldest first
    # Issue 10: the watermark is the discovery watermark. Every deal of the paid page was stored in the
    # page's transaction, so it moves to the newest deal seen; what the failed run did not buy stays
    # 'discovered' and is bought by the next run (nothing lost, nothing bought twice).
    wm = read_watermark(stack.db)
    assert wm == report.watermark_after == batch[-1]
    stored = _stored(stack)
    assert set(stored) == {d["asin"] for d in stack.sim.catalog.newest(30, stack.clock.now_ms())}
    assert all(Watermark(m, a) <= wm for a, m in stored.items())
    with stack.db.connect() as con:
        enriched = {r[0] for r in con.execute("SELECT asin FROM deals WHERE state = 'enriched'").fetchall()}
        assert con.execute("SELECT status, watermark_after FROM upsert_runs").fetchall() == [
            ("failed", wm.last_update_minute)]
    assert enriched == {w.asin for w in chunk1}, "only the committed chunk is enriched"
    again = updater.run()
    assert again.status == "complete"
    with stack.db.connect() as con:
        enriched = {r[0] for r in con.execute("SELECT asin FROM deals WHERE state = 'enriched'").fetchall()}
    assert {w.asin for w in batch} <= enriched
    assert all(n == 1 for a, n in stack.sim.stats().product_fetches.items() if a in {w.asin for w in chunk1})


def test_h17_the_watermark_is_clamped_to_the_server_clock(make_stack) -> None:
    """#17: deals run up to 1 min ahead of the server `timestamp`; a future watermark would freeze ingestion."""
    config = SimulatorConfig(refill_rate=500, catalog_size=20, drift_new_per_hour=600, future_minute_fraction=1.0)
    stack = make_stack(config=config)
    stack.clock.advance(4 * 60_000)  # ~40 new deals, every one stamped one minute ahead of the server
    server_minute = unix_ms_to_keepa_minute(stack.clock.now_ms())
    newest = stack.sim.catalog.newest(1, stack.clock.now_ms())[0]
    assert newest["lastUpdate"] == server_minute + 1
    stack.budget.sync()  # learned 500/min: one batch (200) takes every deal
    updater = _updater(stack, chunk_size=100, product_options=LEAN)
    report = updater.run()
    assert report.status == "complete" and report.selected == len(stack.sim.catalog)
    wm = read_watermark(stack.db)
    assert wm == Watermark(server_minute, "")  # clamped: not the newest deal's (minute + 1, asin)
    assert wm.last_update_minute < max(_stored(stack).values())
    # The deals at the future minute are selected again next run and cost nothing (already stored).
    spent = stack.sim.stats().tokens_consumed
    second = updater.run()
    assert second.fresh_skipped > 0 and second.deals_new == 0
    assert stack.sim.stats().tokens_consumed - spent == second.pages_fetched * 5


def test_h21_h42_the_upserter_refuses_any_sort_type_but_newest_first() -> None:
    """#21/#42: sortType 4 is percentage delta, not recency; a watermark needs sortType 1."""
    from deals_pipeline.defs.resources import DealQueryResource

    for sort_type in (4, -4, 2, -2, 3, -3):
        with pytest.raises(ConfigError, match="sortType 1"):
            UpsertSettings(selection=DealSelection(sort_type=sort_type))
    assert UpsertSettings(selection=DealSelection(sort_type=1)).selection.sort_type == 1
    # The shipped default query is the production one (sortType 4, fine for a page snapshot backfill);
    # the resource derives the upserter's selection with sortType 1 and nothing else changed.
    query = DealQueryResource()
    backfill, upsert = query.backfill_settings().selection, query.upsert_settings().selection
    assert backfill.sort_type == 4 and upsert.sort_type == 1
    assert replace(upsert, sort_type=4) == backfill


def test_h1_a_page_snapshot_is_reused_while_the_live_list_drifts(make_stack) -> None:
    """H1/#37: resuming a page re-reads the stored snapshot, never the live (shifted) list."""
    config = SimulatorConfig(refill_rate=500, catalog_size=40, drift_new_per_hour=600)
    stack = make_stack(config=config)
    backfill = stack.backfill(selection=NEWEST_FIRST, chunk_size=20, options=LEAN)
    first = backfill.snapshot(0)
    assert backfill.run_chunk(first, 0).status == "done"  # then the run is killed
    stack.clock.advance(30 * 60_000)  # ~300 new deals arrive at the front of the newest-first list
    live = [d["asin"] for d in stack.sim.catalog.page(0, sort_type=1, date_range=3, price_type=2,
                                                        now_ms=stack.clock.now_ms())]
    assert not set(live) & {d.asin for d in first.deals}, "the live page 0 should have moved on"
    resumed = backfill.snapshot(0)
    assert resumed.reused and resumed.chunk_asins == first.chunk_asins
    assert backfill.unfinished_chunks(0) == [1]
    summary = backfill.run_page(0)
    assert summary.complete and set(_stored(stack)) == {d.asin for d in first.deals}
    assert stack.sim.stats().deal_page_fetches[0] == 1  # the page was paid for once


def test_h18_the_match_count_is_read_from_the_page(make_stack) -> None:
    """#18/#19: the query's match count comes from the fetched page (simulator: counts without filters)."""
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=320))
    snapshot = stack.backfill().snapshot(0)
    assert snapshot.total_matches == 320
    from deals_pipeline.backfill.service import page_count_for

    assert page_count_for(snapshot.total_matches) == 3


def test_h18_the_match_count_of_a_real_category_filtered_page(tmp_path, samples_dir) -> None:
    from deals_pipeline.backfill.service import BackfillSettings, PageBackfill, page_count_for
    from deals_pipeline_tests.keepa.http_fixture import Reply, ScriptedServer

    page0 = (samples_dir / RUN / "page_0.json").read_bytes()
    selection = DealSelection.from_mapping(_json(samples_dir / RUN / "request_selection_page0.json"))
    clock = ManualClock(1_757_873_538_842)
    with ScriptedServer() as server:
        server.script(Reply(200, page0))
        client = KeepaClient("testkey0123456789", base_url=server.url, clock=clock)
        db = Database(tmp_path / "real.duckdb", data_mode="keepa")
        budget = TokenBudget(db, clock, BudgetPolicy(), owner="test")
        budget.observe(DealPage.from_response(json.loads(page0), page=0).status)
        backfill = PageBackfill(db, client, budget, BackfillSettings(selection=selection), clock=clock,
                                source="keepa")
        snapshot = backfill.snapshot(0)
    assert len(snapshot.deals) == 150 and not snapshot.is_last
    # The run matched 778 deals on pages 0-5 (150 x 5 + 28); Books' own count says 779.
    assert 778 <= snapshot.total_matches <= 779
    assert page_count_for(snapshot.total_matches) == 6


# -- 3. Error handling --------------------------------------------------------------------------


def test_h16_h8_a_429_on_the_deal_page_is_waited_out_and_never_read_as_the_end(make_stack) -> None:
    """#16/H8: a 429 on /deal means "wait and retry the same request", never "no more deals"."""
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=400))
    backfill = stack.backfill()
    stack.sim.inject("not_enough_tokens", count=1, endpoint="deal")
    snapshot = backfill.snapshot(0)
    assert len(snapshot.deals) == 150 and not snapshot.is_last
    assert stack.sim.stats().rejected_429 == 1
    assert _ledger(stack, "SELECT state, count(*) FROM token_ledger GROUP BY ALL ORDER BY 1") == [
        ("released", 1), ("settled", 1)]  # a 429 costs 0: its reservation was released
    # A 429 storm longer than the bounded retries fails loudly; nothing is stored as "the end".
    stack.sim.inject("not_enough_tokens", count=5, endpoint="deal")
    with pytest.raises(NotEnoughTokens):
        backfill.snapshot(1)
    assert _ledger(stack, "SELECT page FROM page_snapshots") == [(0,)]


def test_h16_h8_the_upserter_retries_a_429_and_a_storm_fails_the_run(make_stack) -> None:
    """H8: the upserter read a 429 as "abort". Here it is waited out; a storm is a failed run, not "nothing new"."""
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=30))
    updater = _updater(stack, chunk_size=100, product_options=LEAN)
    stack.sim.inject("not_enough_tokens", count=1, endpoint="deal")
    first = updater.run()
    # Lossless discovery: the whole paid page (30 deals) is stored; the newest batch of 20 is enriched.
    assert first.status == "complete" and first.deals_new == 30 and first.selected == 20, first
    assert first.chunks_done == 1 and stack.sim.stats().rejected_429 == 1
    stack.sim.inject("not_enough_tokens", count=5, endpoint="deal")
    report = updater.run()
    assert report.status == "failed" and "NotEnoughTokens" in report.error
    assert read_watermark(stack.db) == first.watermark_after


def test_h40_a_write_failure_after_paying_never_pays_twice(make_stack) -> None:
    """#40: schema drift (a column missing) made every insert fail and the batch was re-bought forever.
    The paid /product response is spooled raw (files beside the DB); once the schema is repaired the rerun
    pays nothing."""
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=20))
    backfill = stack.backfill(options=LEAN)
    snapshot = backfill.snapshot(0)
    with stack.db.transaction() as con:
        con.execute("ALTER TABLE deals DROP COLUMN product_live_offers")  # "columns missing in production"
    failed = backfill.run_chunk(snapshot, 0)
    assert failed.status == "failed"
    assert backfill.enricher.spool.pending_count() == 1
    fetches = dict(stack.sim.stats().product_fetches)
    assert set(fetches) == set(snapshot.chunk_asins[0]) and set(fetches.values()) == {1}
    with stack.db.transaction() as con:
        con.execute("ALTER TABLE deals ADD COLUMN product_live_offers INTEGER")
    # The failed chunk backs off (scheduling.py) before it is retried; held back, it pays nothing.
    held = backfill.run_chunk(snapshot, 0)
    assert held.status == "backoff" and held.wait_ms is not None and held.wait_ms > 0, held
    assert dict(stack.sim.stats().product_fetches) == fetches
    stack.clock.advance(held.wait_ms)
    done = backfill.run_chunk(snapshot, 0)
    assert done.status == "done" and done.deals_stored == 4
    assert dict(stack.sim.stats().product_fetches) == fetches, "the staged response was re-used, not re-bought"
    assert backfill.enricher.spool.pending_count() == 0
    # Lossless discovery stored the whole page at the snapshot; the chunk's four are enriched from the spool.
    assert set(_stored(stack)) == {d.asin for d in snapshot.deals}
    enriched = {r[0] for r in _ledger(stack, "SELECT asin FROM deals WHERE state = 'enriched' AND raw_product IS NOT NULL")}
    assert enriched == set(snapshot.chunk_asins[0])
    spent = _ledger(stack, "SELECT sum(actual) FROM token_ledger WHERE state = 'settled'")[0][0]
    assert spent == stack.sim.stats().tokens_consumed  # the one payment is accounted once


def test_h40_the_recorded_error_names_the_schema_problem(make_stack) -> None:
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=8))
    backfill = stack.backfill(options=LEAN)
    snapshot = backfill.snapshot(0)
    with stack.db.transaction() as con:
        con.execute("ALTER TABLE deals DROP COLUMN product_live_offers")
    failed = backfill.run_chunk(snapshot, 0)
    assert failed.status == "failed" and "product_live_offers" in failed.error


def test_h40_a_database_from_newer_code_is_refused(tmp_path) -> None:
    """#40: the schema is migrated at open; a file written by newer code is refused, never half-used."""
    import duckdb

    path = tmp_path / "newer.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    con.close()
    with pytest.raises(ConfigError, match="newer than this code"):
        with Database(path).connect():
            pass
    fresh = Database(tmp_path / "fresh.duckdb")
    with fresh.connect() as c:
        assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)


def test_h51_a_run_that_cannot_afford_its_next_unit_ends_cleanly_and_records_the_wait(make_stack) -> None:
    """#51/#38: bounded by the run's deadline, the unit is deferred (nothing spent) and the wait is recorded."""
    stack = make_stack(config=SimulatorConfig(refill_rate=5, catalog_size=20))
    backfill = stack.backfill()
    snapshot = backfill.snapshot(0)
    # Another worker on the key spends the bucket (a real reservation in the shared ledger): 5/min, recharging.
    other = TokenBudget(stack.db, stack.clock, BudgetPolicy(), owner="other-worker")
    other.acquire(stack.budget.projection().balance + 50, purpose="product", priority=Priority.UPSERT)
    assert stack.budget.projection().recharging
    slept = list(stack.clock.slept_ms)
    outcome = backfill.run_chunk(snapshot, 0, deadline_ms=stack.clock.now_ms() + 60_000)
    assert outcome.status == "deferred" and outcome.wait_ms is not None and outcome.wait_ms > 60_000
    assert stack.clock.slept_ms == slept, "it gave up before sleeping"
    assert stack.sim.stats().requests["product"] == 0
    assert backfill.unfinished_chunks(0)[0] == 0  # still pending for the next run
    report = _updater(stack).run(deadline_ms=stack.clock.now_ms() + 60_000)
    assert report.status == "budget_stopped" and "wait" in report.error
    with stack.db.connect() as con:
        assert con.execute("SELECT status FROM upsert_runs").fetchall() == [("budget_stopped",)]


# -- 5. Data correctness ------------------------------------------------------------------------


def test_h43_viability_rules_reject_the_sample_deals_that_must_be_rejected(sample_page) -> None:
    """#43: the pre-filter is not a placeholder. Expected verdicts are computed from the raw JSON."""
    deals = sample_page.deals
    assert all(ViabilityRules().judge(d, 2).viable for d in deals)  # defaults: keep every priced deal
    cases = [
        (ViabilityRules(min_delta_percent=70), lambda raw: raw["deltaPercent"][3][2] >= 70),
        (ViabilityRules(max_sales_rank=500_000), lambda raw: 0 <= raw["current"][3] <= 500_000),
        (ViabilityRules(min_price=5_000), lambda raw: raw["current"][2] >= 5_000),
        (ViabilityRules(max_price=3_000), lambda raw: 0 <= raw["current"][2] <= 3_000),
    ]
    for rules, expected in cases:
        verdicts = {d.asin: rules.judge(d, 2) for d in deals}
        want = {d.asin: expected(d.raw) for d in deals}
        assert {a: v.viable for a, v in verdicts.items()} == want, rules
        assert 0 < sum(want.values()) < len(deals), f"{rules}: the sample must hold both kinds"
        assert all(v.reason for v in verdicts.values() if not v.viable)
    # A deal without a current price of the queried type is rejected (no -1 read as a price).
    raw = copy.deepcopy(deals[0].raw)
    raw["current"][2] = -1
    verdict = ViabilityRules().judge(Deal.from_json(raw), 2)
    assert not verdict.viable and verdict.reason == "no current price"
    with pytest.raises(ConfigError):
        ViabilityRules(min_price=10, max_price=5)


def test_h5_h8_h36_filtered_deals_are_never_paid_for_and_the_rejection_rate_is_visible(make_stack) -> None:
    """H5/#36: the pre-filter uses free deal-page fields, so a rejected deal costs 0; #8: rejections are
    monitored (page chunk counts and System Health)."""
    from deals_pipeline.status import collect_health

    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=20))
    page = stack.sim.catalog.page(0, sort_type=4, date_range=3, price_type=2, now_ms=stack.clock.now_ms())
    drops = sorted(d["deltaPercent"][3][2] for d in page)
    cut = drops[len(drops) // 2]
    rejected = {d["asin"] for d in page if d["deltaPercent"][3][2] < cut}  # from the raw deal JSON
    assert 0 < len(rejected) < len(page) == 20
    backfill = stack.backfill(rules=ViabilityRules(min_delta_percent=cut), chunk_size=20)
    summary = backfill.run_page(0)
    assert summary.complete
    fetched = set(stack.sim.stats().product_fetches)
    assert fetched == {d["asin"] for d in page} - rejected, "a filtered deal was paid for"
    with stack.db.connect() as con:
        rows = dict(con.execute("SELECT asin, viability FROM deals").fetchall())
        per_chunk = con.execute("SELECT sum(filtered) FROM page_chunks").fetchone()[0]
    assert {a for a, v in rows.items() if v == "filtered"} == rejected  # stored, not dropped
    assert per_chunk == len(rejected)
    health = collect_health(stack.db, stack.budget, stack.clock)
    assert health["deals"] == {"stored": 20, "enriched": 20 - len(rejected), "filtered": len(rejected)}


def test_h45_the_query_price_type_drives_the_prefilter_and_the_stored_price(make_stack, sample_page) -> None:
    """#45: one price type for the query (`priceTypes`), the pre-filter and the stored price; #30: -1/-2
    sentinels are never read as prices."""
    from deals_pipeline.defs.resources import DealQueryResource

    no_new = next(d for d in sample_page.deals if d.raw["current"][1] == -1)  # used offer only
    assert ViabilityRules().judge(no_new, 2).viable
    assert not ViabilityRules().judge(no_new, 1).viable  # a NEW query must not buy it
    stack = make_stack()
    new_query = DealSelection(price_types=(1,))
    enricher = ChunkEnricher.for_selection(stack.db, stack.client, stack.budget, new_query,
                                           options=ProductOptions(), rules=ViabilityRules(), source="keepa",
                                           origin="backfill", priority=Priority.BACKFILL)
    assert enricher.price_type == 1
    plan = enricher.plan([no_new])
    assert plan.filtered == [no_new.asin] and plan.to_fetch == []
    frame = enricher.rows(plan, enricher.fetch([], deadline_ms=None, detail="", scope="h45"))
    row = frame.iloc[0]
    assert row["price_type"] == 1 and row["current_price"] is None and row["viability"] == "filtered"
    assert row["current_used"] == no_new.raw["current"][2] and row["current_amazon"] is None  # -1 -> NULL
    # Backfill and upserter are built from one selection: same price type (only sortType differs).
    query = DealQueryResource(selection_json=json.dumps({"domainId": 1, "priceTypes": [1], "sortType": 4}))
    assert query.backfill_settings().selection.price_types == query.upsert_settings().selection.price_types == (1,)
    with pytest.raises(InvalidRequest, match="exactly one"):
        DealSelection(price_types=(1, 2))


def test_h53_h9_the_existing_asin_check_reads_a_stored_row(make_stack, sample_page, sample_product) -> None:
    """#53/H9: one schema, typed rows. Both paths' existing-ASIN check (ChunkEnricher.plan) is tested
    against a row really stored from a real sample deal, not against the code's own idea of a row."""
    stack = make_stack()
    with stack.db.connect() as con:
        table = [r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'deals' ORDER BY ordinal_position"
        ).fetchall()]
    # The DataFrame layout is the table's layout, plus the lifecycle's own column (schema v5, lifecycle.py):
    # written only by the lifecycle pass, never by a deal row (an upsert sets it back to NULL).
    assert table == DEAL_COLUMNS + ["inactive_since"]
    deal, kept_out = sample_page.deals[0], sample_page.deals[1]
    product = replace(sample_product, asin=deal.asin)
    with stack.db.transaction() as con:
        rows = deal_rows([deal, kept_out], domain_id=1, price_type=2, source="keepa", origin="backfill",
                         seen_at=utcnow(), products={deal.asin: product},
                         viability={kept_out.asin: Viability(False, "test rule")})
        assert upsert_deals(con, rows) == (2, 0)
    backfill_enricher = stack.backfill().enricher
    upsert_enricher = stack.updater().enricher
    for enricher in (backfill_enricher, upsert_enricher):
        plan = enricher.plan([deal, kept_out])
        assert plan.fresh == [deal.asin, kept_out.asin] and plan.to_fetch == []  # 0 tokens
        newer = replace(deal, last_update=deal.last_update + 7)
        # Issue 10: a newer listing alone buys nothing (a free refresh); only the re-enrichment policy re-buys.
        assert enricher.plan([newer]).fresh == [deal.asin]
    with stack.db.connect() as con:
        stored = stored_deals(con, [deal.asin, kept_out.asin])
        product_price = con.execute("SELECT product_used_price FROM deals WHERE asin = ?", [deal.asin]).fetchone()[0]
    assert stored[deal.asin].enriched_minute == max(deal.last_update, product.last_update)
    assert stored[kept_out.asin].viability == "filtered"
    assert product_price == 2243  # the real product object's USED price, read by column name


def test_h6_only_live_offers_reach_the_database(make_stack) -> None:
    """H6: the hyphenated `only-live-offers=1` is sent and honoured: stored offers == liveOffersOrder."""
    stack = make_stack(config=SimulatorConfig(refill_rate=500, catalog_size=30, offers_pages_max=2))
    backfill = stack.backfill(chunk_size=30)
    assert backfill.settings.product_options.to_params()["only-live-offers"] == "1"
    snapshot = backfill.snapshot(0)
    assert backfill.run_chunk(snapshot, 0).status == "done"
    with stack.db.connect() as con:
        rows = con.execute(
            "SELECT asin, product_live_offers, json_array_length(raw_product->'$.offers'), "
            "json_array_length(raw_product->'$.liveOffersOrder') FROM deals"
        ).fetchall()
    assert len(rows) == 30
    assert all(live == offers == order for _, live, offers, order in rows)
    # Not vacuous: some of these ASINs have historical offers the underscore spelling would have returned.
    assert any(min(stack.sim.catalog.offer_count(asin), 20) > live for asin, live, _, _ in rows)


# -- 6. Operations ------------------------------------------------------------------------------


@pytest.mark.slow  # imports Dagster
def test_h20_every_run_records_the_code_version() -> None:
    """#20: a stale worker ran old code unnoticed. Each asset carries the package version as code_version
    (and every run's metadata repeats it as `pipeline_version`)."""
    import deals_pipeline
    from deals_pipeline.defs.deal_pages import deal_pages
    from deals_pipeline.defs.recent_deals import recent_deals

    for asset in (deal_pages, recent_deals):
        assert set(asset.code_versions_by_key.values()) == {deals_pipeline.__version__}
    for module in ("defs/deal_pages.py", "defs/recent_deals.py"):
        assert '"pipeline_version": __version__' in (REPO / "deals_pipeline" / module).read_text()


def test_h46_runtime_state_stays_out_of_git() -> None:
    """#46: state files tracked in git caused deploy conflicts. Every runtime path is git-ignored."""
    from deals_pipeline.config import DEFAULT_DB_PATH
    from deals_pipeline.storage.db import DEMO_DB_PATH

    ignored = {line.strip() for line in (REPO / ".gitignore").read_text().splitlines()}
    assert {"data/", "*.duckdb", "*.duckdb.wal", "dagster_home/*", "!dagster_home/dagster.yaml"} <= ignored
    assert DEFAULT_DB_PATH.startswith("data/") and DEMO_DB_PATH.startswith("data/")
