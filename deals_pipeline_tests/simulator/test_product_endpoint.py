"""/product costs (KEEPA_API.md §3.4) and product shape, over real HTTP."""

from __future__ import annotations

import json
import math

import pytest

from deals_pipeline_tests.simulator.helpers import assert_envelope


@pytest.fixture
def sim(make_sim):
    return make_sim(catalog_size=200, offers_pages_max=3)


def _asins_by_offer_pages(sim, n_each=2):
    """Catalog ASINs grouped by their live offer page count (1, 2, 3), with fresh and stale stock/rating."""
    groups: dict[int, list[str]] = {}
    for a in sim.catalog.asins():
        groups.setdefault(math.ceil(sim.catalog.live_offer_count(a) / 10), []).append(a)
    assert set(groups) == {1, 2, 3}
    return {k: v[:n_each] for k, v in groups.items()}


def _consumed(r):
    assert r.status_code == 200, r.text
    assert_envelope(r.json())
    return r.json()["tokensConsumed"]


def _pick(sim, clock, **want):
    """The first catalog ASIN whose traits today have the wanted values."""
    for a in sim.catalog.asins():
        t = sim.catalog.traits(a, clock.now_ms())
        if all(getattr(t, k) == v for k, v in want.items()):
            return a
    pytest.fail(f"no ASIN with {want}")


def test_base_cost_is_one_per_product_plus_rating_and_buybox(api, sim, clock):
    fresh = _pick(sim, clock, rating_fresh=True)
    stale = _pick(sim, clock, rating_fresh=False)
    asins = [fresh, stale, next(a for a in sim.catalog.asins() if a not in (fresh, stale))]
    assert _consumed(api.product(asins)) == 3
    assert _consumed(api.product(asins, stats=90, history=0, days=30, update=1)) == 3  # stats/history/days free
    assert _consumed(api.product([fresh], rating=1)) == 2  # rating costs up to 1: only when fresh (< 14 days)
    assert _consumed(api.product([stale], rating=1)) == 1
    assert _consumed(api.product(asins, buybox=1, stats=180)) == 9
    assert _consumed(api.product(asins, stock=1)) == 3  # stock needs offers: ignored, free
    assert _consumed(api.product([fresh], rating=1, buybox=1)) == 4


def test_offers_cost_six_per_live_offer_page_found(api, sim, clock):
    groups = _asins_by_offer_pages(sim)
    one, two, three = groups[1][0], groups[2][0], groups[3][0]
    assert _consumed(api.product(one, offers=20)) == 6
    assert _consumed(api.product(two, offers=20)) == 12
    assert _consumed(api.product(three, offers=20)) == 12  # capped by offers=20 -> at most 2 pages
    assert _consumed(api.product(three, offers=100)) == 18
    assert _consumed(api.product(three, offers=25)) == 18  # 25 offers need 3 pages of 10
    assert _consumed(api.product(one, offers=20, buybox=1)) == 6  # buybox is ignored with offers
    stock_fresh = _pick(sim, clock, stock_fresh=True, live_offers=sim.catalog.live_offer_count(one))
    stock_stale = _pick(sim, clock, stock_fresh=False, live_offers=sim.catalog.live_offer_count(one))
    assert _consumed(api.product(stock_fresh, offers=20, stock=1)) == 8  # +2 when lastStockUpdate < 7 days
    assert _consumed(api.product(stock_stale, offers=20, stock=1)) == 6
    # Historical offers are returned but not charged (the real sample: 121 offers for offers=20).
    p = api.product(one, offers=20).json()["products"][0]
    assert len(p["offers"]) == sim.catalog.offer_count(one) >= len(p["liveOffersOrder"])
    # The simulator's own accounting agrees with the envelopes.
    assert sim.stats().tokens_consumed == 6 + 12 + 12 + 18 + 18 + 6 + 8 + 6 + 6


def test_a_product_not_in_keepas_db_costs_zero(api, sim, clock):
    unknown = next(f"B0{i:08d}" for i in range(10_000) if not sim.catalog.traits(f"B0{i:08d}").in_db)
    r = api.product(unknown, offers=20, rating=1, stats=90)
    assert _consumed(r) == 0
    p = r.json()["products"][0]
    assert p["asin"] == unknown and p["title"] is None and p["stats"] is None and p["offers"] is None
    assert all(sim.catalog.traits(a).in_db for a in sim.catalog.asins())  # listed deals always are


@pytest.mark.parametrize("offers", ["0", "1", "10", "19", "101", "abc"])
def test_offers_outside_20_to_100_is_400_and_free(api, sim, offers):
    r = api.product(sim.catalog.asins()[:2], offers=offers)
    assert r.status_code == 400
    assert_envelope(r.json(), consumed=0)
    assert sim.bucket.balance() == 300


def test_more_than_100_asins_is_400(api, sim):
    asins = [f"B0{i:08d}" for i in range(101)]
    r = api.product(asins)
    assert r.status_code == 400
    assert_envelope(r.json(), consumed=0)
    in_db = sum(sim.catalog.traits(a).in_db for a in asins[:100])
    assert 85 <= in_db < 100  # ~5 % of unlisted ASINs are not in Keepa's DB: they cost 0
    assert _consumed(api.product(asins[:100])) == in_db
    assert api.get("product", domain=1).status_code == 400  # no asin
    assert api.get("product", asin="0000000000").status_code == 400  # no domain
    assert api.get("product", domain=1, code="9780000000002").status_code == 400


def test_malformed_asin_costs_zero_and_returns_no_product(api, sim):
    r = api.product('="0006120725"')
    assert _consumed(r) == 0
    assert r.json()["products"] == []
    good = sim.catalog.asins()[0]
    r = api.product([good, '="0006120725"', "short", "WAY-TOO-LONG-ASIN"])
    assert _consumed(r) == 1
    assert [p["asin"] for p in r.json()["products"]] == [good]
    assert sim.stats().product_fetches == {good: 1}


def test_product_shape_history_and_stats(api, sim, samples_dir):
    asin = sim.catalog.asins()[0]
    deal = sim.catalog.deal(asin)
    p = api.product(asin, stats=365, history=0).json()["products"][0]
    real = json.loads((samples_dir / "product_object_1886940606.json").read_text())
    core = {"asin", "domainId", "title", "rootCategory", "categories", "categoryTree", "lastUpdate", "csv", "stats",
            "offers", "liveOffersOrder", "offersSuccessful", "fbaFees", "imagesCSV", "parentAsin", "productType"}
    assert core <= set(real) and core <= set(p)
    assert p["asin"] == asin and p["csv"] is None and p["offers"] is None
    stats = p["stats"]
    for k in ("current", "avg", "avg30", "avg90", "avg180", "avg365", "min", "max", "outOfStockPercentage90"):
        assert len(stats[k]) == 34, k
        assert k in real["stats"], k
    assert stats["current"] == deal["current"]  # consistent with the deal list
    assert isinstance(stats["totalOfferCount"], int)
    p = api.product(asin, history=1, days=30).json()["products"][0]
    assert isinstance(p["csv"], list) and len(p["csv"]) == 34 and p["stats"] is None
    for i in (7, 18, 19, 32):  # *_SHIPPING types are [minute, price, shipping] triples
        if p["csv"][i] is not None:
            assert len(p["csv"][i]) % 3 == 0
    if p["csv"][2] is not None:
        assert len(p["csv"][2]) % 2 == 0


def test_offers_and_only_live_offers(api, sim):
    # Pick an ASIN that has historical (not live) offers.
    for asin in sim.catalog.asins():
        all_p = api.product(asin, offers=100, stats=1).json()["products"][0]
        if len(all_p["offers"]) > len(all_p["liveOffersOrder"]):
            break
    else:
        pytest.fail("no ASIN with historical offers")
    assert all_p["offersSuccessful"] is True
    assert len(all_p["offers"]) == sim.catalog.offer_count(asin)
    for o in all_p["offers"]:
        assert {"sellerId", "condition", "isFBA", "isPrime", "lastSeen", "offerCSV"} <= set(o)
        assert len(o["offerCSV"]) % 3 == 0 and o["offerCSV"]
    assert all_p["stats"]["totalOfferCount"] == len(all_p["liveOffersOrder"])

    live = api.product(asin, offers=100, stats=1, **{"only-live-offers": 1}).json()["products"][0]
    assert len(live["offers"]) == len(live["liveOffersOrder"]) == len(all_p["liveOffersOrder"])
    assert sorted(live["liveOffersOrder"]) == list(range(len(live["offers"])))
    assert live["stats"]["retrievedOfferCount"] == len(live["offers"])

    # The misspelled parameter is ignored, as observed in production (HAZARDS H6).
    under = api.product(asin, offers=100, only_live_offers=1).json()["products"][0]
    assert len(under["offers"]) == len(all_p["offers"])


def test_products_are_deterministic_for_any_valid_asin(api, sim):
    a = api.product("b000000001").json()
    b = api.product("B000000001").json()
    assert a["products"][0]["asin"] == "B000000001"
    assert a["products"] == b["products"]  # same clock minute -> same product
    assert a["products"][0]["title"]
