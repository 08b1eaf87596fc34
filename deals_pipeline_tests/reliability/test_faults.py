"""Faults: 5 % 5xx, 2 % truncated bodies, 1 % timeouts from the simulator, and 429s on /deal.

* The client's attempts are bounded (``max_attempts`` per request) and every one is counted: each
  fault the simulator injected shows up as exactly one transient attempt in ``client.stats``.
* Backfill and upsert runs complete under those rates: a chunk or run that exhausts its retries is
  re-run, as the next scheduled run would; nothing is skipped, and re-spend is bounded by the
  responses that were charged but lost (timeouts, truncated bodies).
* A 429 never ends pagination early: the run waits and still gets the page; if the 429s outlast
  ``max_429`` the run fails (typed), it never reports a short page as "the end".
"""

from __future__ import annotations

from collections import Counter

import pytest

from deals_pipeline.backfill.service import PageBackfill
from deals_pipeline.keepa.errors import KeepaError, NotEnoughTokens, ResponseLost, RetriesExhausted
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.simulator import FaultConfig, SimulatorConfig
from deals_pipeline.upsert.service import read_watermark

RATES = dict(p_server_error=0.05, p_truncated=0.02, p_timeout=0.01)
# The counts below equate client timeouts with injected timeout faults, so an ordinary answer must never
# be slow enough to time out: on a loaded 2-core box one can take several hundred ms (a 0.2 s read
# timeout made that a wall-clock race). Each injected timeout costs the test READ_TIMEOUT_S of waiting.
HOLD_S = 3.0  # a "timeout" fault answers after 3 s ...
READ_TIMEOUT_S = 1.5  # ... and the client gives up after 1.5 s
CALLS = 200
LOST_KINDS = ("timeout", "incomplete_body", "truncated_json", "non_json")  # charged by the server, never seen


def _stored(stack) -> dict[str, int]:
    with stack.db.connect() as con:
        return dict(con.execute("SELECT asin, last_update_minute FROM deals").fetchall())


def _states(stack, asins: set[str]) -> Counter:
    with stack.db.connect() as con:
        return Counter(s for (s,) in con.execute("SELECT state FROM deals WHERE asin IN (SELECT unnest(?))",
                                                 [sorted(asins)]).fetchall())


def _ledger_actual(stack) -> int:
    with stack.db.connect() as con:
        return int(con.execute(
            "SELECT coalesce(sum(actual), 0) FROM token_ledger WHERE state <> 'released'").fetchone()[0])


def _check_client_counts(stack, *, max_attempts: int) -> dict:
    """Every attempt counted once; every injected fault is one transient attempt; retries bounded."""
    s = stack.client.stats.snapshot()
    faults = stack.sim.stats().faults_injected
    transient = Counter(s["transient"])
    exhausted = s["errors"].get("RetriesExhausted", 0)
    # A paid answer lost after it may have been charged is not retried inside its reservation (issue 13).
    lost = s["errors"].get("ResponseLost", 0)
    assert transient["http_500"] + transient["http_503"] == faults["server_error"]
    assert transient["timeout"] == faults["timeout"]
    assert transient["incomplete_body"] + transient["truncated_json"] + transient["non_json"] == faults["truncated"]
    # A transient attempt is retried unless it was the request's last allowed attempt.
    assert sum(transient.values()) == sum(s["retries"].values()) + exhausted + lost
    for endpoint, attempts in s["attempts"].items():
        requests_made = attempts - s["retries"].get(endpoint, 0)
        assert attempts <= max_attempts * requests_made
    # Every backoff went through the client's clock, and each one is bounded.
    slept = [ms for ms in stack.clock.slept_ms if ms <= stack.client.backoff_cap_ms]
    assert len(slept) >= sum(s["retries"].values())
    return {"attempts": s["attempts"], "retries": s["retries"], "transient": dict(transient),
            "exhausted": exhausted, "faults_injected": dict(faults)}


def test_client_attempts_are_bounded_and_every_fault_is_counted(rec_stack) -> None:
    faults = FaultConfig(**RATES, timeout_hold_s=HOLD_S, seed=1234)
    stack = rec_stack(config=SimulatorConfig(refill_rate=2000, catalog_size=400, faults=faults),
                      read_timeout_s=READ_TIMEOUT_S, max_attempts=4)
    asins = stack.sim.catalog.asins()
    cheap = ProductOptions(stats=None, offers=None, rating=False)  # 1 token per ASIN
    outcomes: Counter = Counter()
    for i in range(CALLS):
        try:
            if i % 4 == 0:
                stack.client.deals(DealSelection(page=(i // 4) % 2, sort_type=4))
            else:
                stack.client.products(asins[(3 * i) % 390:(3 * i) % 390 + 3], cheap)
            outcomes["ok"] += 1
        except RetriesExhausted as exc:
            assert exc.attempts == 4
            outcomes["exhausted"] += 1
        except ResponseLost:
            outcomes["lost"] += 1
    counts = _check_client_counts(stack, max_attempts=4)
    stats = stack.sim.stats()
    assert sum(counts["faults_injected"].values()) > 0
    assert outcomes["ok"] + outcomes["exhausted"] + outcomes["lost"] == CALLS
    assert sum(counts["attempts"].values()) - sum(counts["retries"].values()) == CALLS
    # Tokens: the server charged exactly what the client saw, plus the responses it never saw.
    client_tokens = sum(stack.client.stats.tokens_consumed.values())
    lost = sum(counts["transient"].get(k, 0) for k in LOST_KINDS)
    assert 0 <= stats.tokens_consumed - client_tokens <= lost * 5
    assert stats.rejected_429 == 0
    print("FAULTS client", {"outcomes": dict(outcomes), **counts, "tokens_sim": stats.tokens_consumed,
                            "tokens_client": client_tokens})


def test_backfill_and_upsert_runs_complete_under_random_faults(rec_stack) -> None:
    faults = FaultConfig(**RATES, timeout_hold_s=HOLD_S, seed=12)
    config = SimulatorConfig(refill_rate=500, catalog_size=200, seed=4, drift_new_per_hour=12,
                             drift_updates_per_hour=6, faults=faults)
    stack = rec_stack(config=config, read_timeout_s=READ_TIMEOUT_S, max_attempts=2)
    chunk = 20

    # -- backfill pages 0 and 1: rerun a page until it is complete (what the next run would do) ---------
    backfill = stack.backfill(chunk_size=chunk)
    stack.sim.inject("server_error", count=2, endpoint="product")  # one chunk surely exhausts its 2 attempts
    page_runs: dict[int, int] = {}
    chunk_failures = 0
    for page in (0, 1):
        summary = None
        for run in range(1, 8):
            try:
                summary = backfill.run_page(page, on_chunk=None)
            except KeepaError:  # the page fetch itself exhausted its retries: the run fails, the next one retries
                continue
            chunk_failures += summary.chunks_failed
            if summary.complete:
                break
            # A failed chunk backs off before it is retried: the next run comes once the backoff is over.
            retry_at = PageBackfill.next_retry_at(stack.db, backfill.fingerprint, page, stack.clock.now_ms())
            assert retry_at is not None, "an incomplete page with no chunk backing off"
            stack.clock.advance(retry_at - stack.clock.now_ms())
        page_runs[page] = run
        assert summary is not None and summary.complete, f"page {page} still incomplete after {run} runs"
    with stack.db.connect() as con:
        snap_asins = {a for (a,) in con.execute("SELECT unnest(asins) FROM page_snapshots").fetchall()}
        failed_left = con.execute("SELECT count(*) FROM page_chunks WHERE status <> 'done'").fetchone()[0]
    assert failed_left == 0
    assert chunk_failures >= 1, "the scripted 5xx pair should have failed one chunk"
    assert snap_asins <= set(_stored(stack))

    # -- upsert runs every 10 simulated minutes while deals drift in; a failed run is simply followed by the next
    updater = stack.updater(chunk_size=chunk)
    statuses = []
    stack.sim.inject("timeout", count=2, endpoint="deal")  # the first run surely fails reading its first page
    # (a timed-out /deal may have been charged: ResponseLost at once, the next run reads the page again)
    watching_since = None  # once a watermark exists, every later version must be picked up
    last_look = None
    for step in range(12):
        if step < 4:
            stack.clock.advance(10 * 60_000)
        last_look = stack.clock.now_ms()
        report = updater.run()
        statuses.append(report.status)
        assert report.status in ("complete", "nothing_new", "failed"), report
        if report.status == "failed":
            # Retries exhausted, or a paid answer lost after it may have been charged (never re-sent).
            assert report.error and report.error.startswith(("RetriesExhausted", "ResponseLost")), report.error
        if watching_since is None and read_watermark(stack.db) is not None:
            watching_since = stack.clock.now_ms()
        if step >= 4 and report.status == "nothing_new":
            break
    assert statuses[0] == "failed" and statuses[-1] == "nothing_new", statuses
    wm = read_watermark(stack.db)
    stored = _stored(stack)
    versions = [v for v in stack.sim.catalog.versions() if watching_since < v.visible_from_ms <= last_look]
    behind = [(v.asin, v.last_update) for v in versions
              if v.last_update <= wm.last_update_minute and stored.get(v.asin, -1) < v.last_update]
    assert versions and not behind, behind[:5]

    counts = _check_client_counts(stack, max_attempts=2)
    stats = stack.sim.stats()
    lost = sum(counts["transient"].get(k, 0) for k in LOST_KINDS)
    # Re-spend comes only from charged-but-lost responses (and their chunk) or a newer deal version.
    product_served = [s for s in stack.sim.served_log() if s.endpoint == "product"]
    respend = sum(n - 1 for n in stats.product_fetches.values())
    max_cost = max((s.tokens for s in product_served), default=0)
    gap = stats.tokens_consumed - _ledger_actual(stack)
    assert 0 <= gap <= lost * max(max_cost, 5)
    new_versions = sum(1 for v in versions if v.asin in stats.product_fetches)
    assert respend <= lost * chunk + new_versions, (respend, lost, new_versions)
    print("FAULTS runs", {"page_runs": page_runs, "chunk_failures": chunk_failures, "upsert_statuses": statuses,
                          **counts, "respend_asins": respend, "lost_responses": lost, "ledger_gap": gap,
                          "tokens_sim": stats.tokens_consumed, "rejected_429": stats.rejected_429})


def test_a_429_on_a_later_page_never_ends_upsert_pagination(rec_stack) -> None:
    stack = rec_stack(config=SimulatorConfig(refill_rate=500, catalog_size=400, seed=8))
    stack.budget.sync()  # learned rate 500/min -> batch 200 -> the first run must read pages 0 and 1
    updater = stack.updater(chunk_size=50)
    stack.sim.inject("not_enough_tokens", count=2, endpoint="deal")  # the simulator's own 429s: page 0, twice
    stack.sim.deal_429[1] = 3  # and page 1 answers 429 three times
    report = updater.run()
    assert report.status == "complete" and report.pages_fetched == 2 and report.selected == 200
    # The newest 200 in (lastUpdate, asin) order among the two pages read (ties at the cut go by ASIN).
    two_pages = stack.sim.catalog.newest(300, stack.clock.now_ms())
    newest = {d["asin"] for d in sorted(two_pages, key=lambda d: (d["lastUpdate"], d["asin"]))[-200:]}
    # Lossless discovery: every deal of both paid pages is stored; only the newest 200 are bought.
    assert set(_stored(stack)) == {d["asin"] for d in two_pages}
    assert set(stack.sim.stats().product_fetches) == newest
    assert set(_states(stack, set(_stored(stack)) - newest)) == {"discovered"}
    stats = stack.sim.stats()
    assert stats.rejected_429 == 5 and stack.sim.hook_hits["deal_429"] == 3
    assert stats.deal_page_fetches == Counter({0: 1, 1: 1})  # each page paid once: the 429s cost nothing
    with stack.db.connect() as con:
        released = con.execute("SELECT count(*), coalesce(sum(actual), 0) FROM token_ledger "
                               "WHERE state = 'released'").fetchone()
    assert released == (5, 0)


def test_429s_beyond_max_429_fail_the_upsert_run_instead_of_ending_it_short(rec_stack) -> None:
    stack = rec_stack(config=SimulatorConfig(refill_rate=500, catalog_size=400, seed=8))
    stack.budget.sync()
    updater = stack.updater(chunk_size=50)
    stack.sim.deal_429[1] = 5  # budget.call's max_429
    report = updater.run()
    assert report.status == "failed" and "NotEnoughTokens" in report.error
    # A short read moves no watermark and buys nothing; the paid page 0 is kept (lossless discovery).
    assert read_watermark(stack.db) is None, "a short read must not move the watermark"
    page0 = {d["asin"] for d in stack.sim.catalog.newest(150, stack.clock.now_ms())}
    assert set(_stored(stack)) == page0 and set(_states(stack, page0)) == {"discovered"}
    assert not stack.sim.stats().product_fetches, "a short read bought products"
    again = updater.run()
    assert again.status == "complete" and again.pages_fetched == 2 and again.selected == 200


def test_a_429_on_a_backfill_snapshot_still_gets_the_page(rec_stack) -> None:
    stack = rec_stack(config=SimulatorConfig(refill_rate=500, catalog_size=400, seed=8))
    backfill = stack.backfill(chunk_size=50)
    stack.sim.inject("not_enough_tokens", count=3, endpoint="deal")  # the simulator's own 429 injection
    snapshot = backfill.snapshot(0)
    assert len(snapshot.deals) == 150 and not snapshot.is_last and snapshot.chunk_count == 3
    assert stack.sim.stats().faults_injected["not_enough_tokens"] == 3

    # Past max_429 the snapshot fails (typed) and nothing about page 1 is stored: no "last page" either.
    stack.sim.deal_429[1] = 5
    with pytest.raises(NotEnoughTokens):
        backfill.snapshot(1)
    with stack.db.connect() as con:
        assert con.execute("SELECT count(*) FROM page_snapshots WHERE page = 1").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM page_chunks WHERE page = 1").fetchone()[0] == 0
    later = backfill.snapshot(1)
    assert len(later.deals) == 150 and not later.reused
    assert stack.sim.stats().deal_page_fetches == Counter({0: 1, 1: 1})
