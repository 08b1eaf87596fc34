"""Catalog determinism, orderings and drift (KEEPA_API.md §4.2, §4.3)."""

from __future__ import annotations

import pytest

from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute
from deals_pipeline.simulator import SyntheticCatalog
from deals_pipeline_tests.simulator.helpers import START_MS

DRIFT = dict(catalog_size=400, drift_new_per_hour=120.0, drift_updates_per_hour=480.0)


@pytest.fixture
def sim(make_sim):
    return make_sim(catalog_size=400)


def _walk(api, clock=None, gap_ms=0, **sel):
    """Fetch pages until a short one; optionally let time pass between pages. Returns [(page, dr, timestamp)]."""
    out = []
    page = 0
    while True:
        body = api.deal(page, **sel).json()
        dr = body["deals"]["dr"]
        out.append((page, dr, body["timestamp"]))
        if len(dr) < 150:
            return out
        page += 1
        if clock is not None:
            clock.advance(gap_ms)


def test_same_seed_and_clock_give_identical_pages(make_sim, api_for):
    a = api_for(make_sim(clock_=ManualClock(START_MS), seed=11, catalog_size=500))
    b = api_for(make_sim(clock_=ManualClock(START_MS), seed=11, catalog_size=500))
    c = api_for(make_sim(clock_=ManualClock(START_MS), seed=12, catalog_size=500))
    for page in (0, 3):
        for sort in (1, -4):
            pa = a.deal(page, sortType=sort).json()
            pb = b.deal(page, sortType=sort).json()
            assert pa["deals"] == pb["deals"]
            assert {k: v for k, v in pa.items() if k != "deals"} == {k: v for k, v in pb.items() if k != "deals"}
    assert a.deal(0).json()["deals"]["dr"] != c.deal(0).json()["deals"]["dr"]


def test_sort_type_1_is_newest_lastupdate_first_with_asin_tiebreak(api):
    deals = [d for _, dr, _ in _walk(api, sortType=1) for d in dr]
    assert len(deals) == 400
    keys = [(-d["lastUpdate"], d["asin"]) for d in deals]
    assert keys == sorted(keys)


def test_sort_type_4_is_percentage_delta_descending_and_negative_inverts(api):
    for date_range, pt in ((3, 2), (0, 1)):
        deals = [d for _, dr, _ in _walk(api, sortType=4, dateRange=date_range, priceTypes=[pt]) for d in dr]
        pct = [d["deltaPercent"][date_range][pt] for d in deals]
        assert pct == sorted(pct, reverse=True)
        assert len(set(pct)) > 5
        inv = [d for _, dr, _ in _walk(api, sortType=-4, dateRange=date_range, priceTypes=[pt]) for d in dr]
        assert [d["asin"] for d in inv] == [d["asin"] for d in reversed(deals)]
    # lastUpdate is not ordered under sortType 4 (the production hazard).
    lu = [d["lastUpdate"] for d in deals]
    assert lu != sorted(lu, reverse=True)


def test_sort_types_2_and_3(api):
    deals = [d for _, dr, _ in _walk(api, sortType=2, dateRange=1, priceTypes=[1]) for d in dr]
    delta = [d["delta"][1][1] for d in deals]
    assert delta == sorted(delta, reverse=True)
    deals = [d for _, dr, _ in _walk(api, sortType=3) for d in dr]
    ranks = [d["current"][3] for d in deals]
    ranked = [r for r in ranks if r >= 0]
    assert ranked == sorted(ranked) and ranks[: len(ranked)] == ranked  # unranked last


def test_no_drift_by_default(sim, api, clock):
    first = api.deal(0).json()["deals"]["dr"]
    clock.advance(6 * 3_600_000)
    assert api.deal(0).json()["deals"]["dr"] == first
    assert len(sim.catalog.versions()) == 400


def test_drift_moves_deals_across_page_boundaries(make_sim, api_for, clock):
    sim = make_sim(**DRIFT)
    api = api_for(sim)
    v0 = len(sim.catalog.versions())
    pages = _walk(api, clock, gap_ms=61_000, sortType=1)  # pages ~61 s apart, like production
    seen: dict[str, tuple[int, int]] = {}
    repeats = []
    for page, dr, ts in pages:
        keys = [(-d["lastUpdate"], d["asin"]) for d in dr]
        assert keys == sorted(keys)  # sortType 1 order holds within every response
        now_min = unix_ms_to_keepa_minute(ts)
        assert all(d["lastUpdate"] <= now_min + 1 for d in dr)  # never more than 1 min ahead
        for idx, d in enumerate(dr):
            if d["asin"] in seen:
                repeats.append((seen[d["asin"]], (page, idx)))
            seen[d["asin"]] = (page, idx)
    assert len(sim.catalog.versions()) > v0
    # New and refreshed deals enter at the front, so the tail of page k reappears at the head of page k+1.
    assert repeats, "expected deals to cross a page boundary"
    for (p1, i1), (p2, i2) in repeats:
        assert p2 == p1 + 1 and i1 >= 130 and i2 < 20, repeats
    print("page-boundary repeats:", repeats)


def test_versions_grow_and_lastupdate_never_runs_ahead(make_sim, clock):
    sim = make_sim(**DRIFT)
    cat = sim.catalog
    start = len(cat.versions())
    assert start == 400
    clock.advance(30 * 60_000)
    now = clock.now_ms()
    versions = cat.versions(now)
    new = versions[start:]
    # ~2 new + ~8 updates per minute for 30 minutes.
    assert 200 <= len(new) <= 400
    assert len(cat) > 400
    last_per_asin: dict[str, int] = {}
    prev_visible = 0
    for v in versions:
        assert v.visible_from_ms >= prev_visible and v.visible_from_ms <= now
        prev_visible = v.visible_from_ms
        assert v.last_update <= unix_ms_to_keepa_minute(v.visible_from_ms) + 1
        assert v.last_update >= last_per_asin.get(v.asin, -(10**9))  # never back in time per ASIN
        last_per_asin[v.asin] = v.last_update
    newest = cat.newest(5, now)
    assert [d["lastUpdate"] for d in newest] == sorted((d["lastUpdate"] for d in newest), reverse=True)
    assert newest[0]["lastUpdate"] == max(v.last_update for v in versions)
    # The current version of every deal is its last generated version.
    for asin, lu in last_per_asin.items():
        assert cat.deal(asin)["lastUpdate"] == lu


def test_drift_is_deterministic_whatever_the_read_pattern():
    kw = dict(seed=5, size=300, start_ms=START_MS, drift_new_per_hour=90.0, drift_updates_per_hour=300.0)
    a = SyntheticCatalog(**kw)
    b = SyntheticCatalog(**kw)
    end = START_MS + 45 * 60_000 + 12_345
    for t in range(START_MS, end, 17_000):  # read often ...
        a.page(0, sort_type=1, now_ms=t)
    a.advance_to(end)
    b.advance_to(end)  # ... or once
    assert a.versions() == b.versions()
    for page in range(3):
        assert a.page(page, sort_type=1, now_ms=end) == b.page(page, sort_type=1, now_ms=end)
        assert a.page(page, sort_type=4, date_range=3, price_type=2, now_ms=end) == b.page(
            page, sort_type=4, date_range=3, price_type=2, now_ms=end
        )


def test_drift_updates_refresh_prices_and_reorder_sort_4(make_sim, api_for, clock):
    sim = make_sim(catalog_size=300, drift_updates_per_hour=600.0)
    api = api_for(sim)
    before = [d["asin"] for d in api.deal(0, sortType=4).json()["deals"]["dr"]]
    clock.advance(60 * 60_000)
    after_body = api.deal(0, sortType=4).json()
    after = [d["asin"] for d in after_body["deals"]["dr"]]
    pct = [d["deltaPercent"][3][2] for d in after_body["deals"]["dr"]]
    assert pct == sorted(pct, reverse=True)
    assert before != after
    assert len(sim.catalog) == 300  # updates only: no new ASINs
