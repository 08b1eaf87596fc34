"""/product costs against the observed batches, and product/deal objects against the real samples.

Observed with the production options offers=20, rating=1 (KEEPA_API.md §3.4): 1 ASIN 6 (34 times), 3 ASINs 14-24,
5 ASINs 30-38, 10 ASINs 68-74, 50 ASINs 292-356 (also 371, 386).
"""

from __future__ import annotations

import json
import random
import statistics

import pytest

OBSERVED = {1: (6, 6), 3: (14, 24), 5: (30, 38), 10: (68, 74), 50: (292, 356)}


@pytest.fixture
def sim(make_sim):
    return make_sim()


@pytest.fixture
def real(samples_dir):
    return {
        0: json.loads((samples_dir / "product_object_1886940606.json").read_text()),
        1: json.loads((samples_dir / "product_object_055299068X.json").read_text()),
    }


def test_batch_costs_fall_in_the_observed_ranges(make_sim, api_for):
    """Real HTTP batches of catalog ASINs with the production options: the mean batch of each size is inside
    the observed range, and a single ASIN most often costs 6."""
    sim = make_sim(refill_rate=1_000)  # a bucket big enough for every batch
    api = api_for(sim)
    rng = random.Random(11)
    asins = sim.catalog.asins()
    for n, (lo, hi) in OBSERVED.items():
        costs = []
        for _ in range(40 if n < 50 else 6):
            r = api.product(rng.sample(asins, n), offers=20, rating=1, stats=90, history=0, **{"only-live-offers": 1})
            assert r.status_code == 200
            costs.append(r.json()["tokensConsumed"])
        if n == 1:
            assert statistics.mode(costs) == 6, costs
        else:
            assert lo <= statistics.mean(costs) <= hi, (n, costs)
        assert min(costs) >= 6 * n  # at least one offer page per product
        print(n, sorted(costs))
    # Per ASIN, the budget KEEPA_API.md gives: 6-13.
    assert all(6 <= sim.catalog.product_cost(a, _req()) <= 13 for a in asins)


def _req():
    from deals_pipeline.simulator import ProductRequest

    return ProductRequest(offers=20, rating=True, stats="90", history=False, only_live_offers=True)


def test_history_0_product_has_the_real_samples_keys(api, sim, real):
    asin = sim.catalog.asins()[0]
    p = api.product(asin, stats=365, offers=20, rating=1, history=0).json()["products"][0]
    assert set(p) == set(real[0])
    assert p["csv"] is None and p["buyBoxSellerIdHistory"] is None and p["salesRankReferenceHistory"] is None
    # As in the history=0 sample, salesRanks keeps one [minute, rank] pair per category.
    assert all(len(v) == 2 for v in p["salesRanks"].values())
    assert p["salesRanks"][str(p["rootCategory"])][1] == p["stats"]["current"][3]


def test_history_1_product_adds_the_history_fields(api, sim, real):
    asin = sim.catalog.asins()[0]
    p = api.product(asin, stats=365, offers=20, rating=1, history=1).json()["products"][0]
    # 055299068X is a book with other formats ("formats") and no gtinList; otherwise the same keys.
    assert set(p) == set(real[0]) | {"buyBoxUsedHistory"} == (set(real[1]) - {"formats"}) | {"gtinList"}
    assert len(p["csv"]) == 34
    for i, series in enumerate(p["csv"]):
        if series is not None:
            assert len(series) % (3 if i in (7, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 32) else 2) == 0
    assert all(isinstance(v, str) for v in p["buyBoxUsedHistory"]) and len(p["buyBoxUsedHistory"]) % 4 == 0
    assert all(isinstance(v, str) for v in p["buyBoxSellerIdHistory"])
    assert all(len(v) % 2 == 0 and len(v) > 2 for v in p["salesRanks"].values())


def test_stats_carry_the_real_fields(api, sim, real):
    real_stats = set(real[0]["stats"]) | set(real[1]["stats"])
    used_bb = {"buyBoxUsedCondition", "buyBoxUsedIsFBA", "buyBoxUsedPrice", "buyBoxUsedSellerId", "buyBoxUsedShipping"}
    seen_used_bb = False
    for asin in sim.catalog.asins()[:40]:
        s = api.product(asin, stats=90, offers=20).json()["products"][0]["stats"]
        has_used_bb = s["current"][32] > 0
        assert set(s) == (real_stats if has_used_bb else real_stats - used_bb)
        for k in ("outOfStockPercentage30", "outOfStockPercentage90", "outOfStockPercentage180",
                  "outOfStockPercentage365", "isLowest", "isLowest90", "min", "max", "avg30", "avg365"):
            assert len(s[k]) == 34, k
        assert all(isinstance(s[f"salesRankDrops{d}"], int) for d in (30, 90, 180, 365))
        if has_used_bb:
            seen_used_bb = True
            assert s["buyBoxUsedPrice"] + s["buyBoxUsedShipping"] == s["current"][32]
            assert s["buyBoxUsedSellerId"] in s["buyBoxUsedStats"]
        assert s["current"] == sim.catalog.deal(asin)["current"]  # consistent with the deal list
    assert seen_used_bb


def test_offers_include_historical_ones_unless_only_live(api, sim, real):
    real_offer_keys = set().union(*(set(o) for o in real[0]["offers"]))
    asin = next(a for a in sim.catalog.asins() if sim.catalog.offer_count(a) > sim.catalog.live_offer_count(a) + 20)
    p = api.product(asin, offers=20, stats=90).json()["products"][0]
    live = p["liveOffersOrder"]
    assert len(p["offers"]) > 20 >= len(live)  # beyond the offers value, as the real 121-offer sample
    assert p["stats"]["totalOfferCount"] == sim.catalog.live_offer_count(asin)
    for o in p["offers"]:
        assert set(o) <= real_offer_keys and len(o["offerCSV"]) % 3 == 0
    historical = [o for i, o in enumerate(p["offers"]) if i not in live]
    assert all(o["lastSeen"] < p["lastUpdate"] and o["lastStockUpdate"] == 0 for o in historical)
    only = api.product(asin, offers=20, stats=90, **{"only-live-offers": 1}).json()["products"][0]
    assert len(only["offers"]) == len(only["liveOffersOrder"]) == len(live)


def test_sentinels_where_the_samples_have_them(api, sim):
    """-2 in avg at most price types (28 in the samples; always at 6, 27, 33), -2 at current[31] for ~19 %."""
    deals = sim.catalog.ordered(1, 0, 0)
    minus2_types = {i for d in deals for row in d["avg"] for i, v in enumerate(row) if v == -2}
    assert len(minus2_types) >= 24 and {6, 27, 33} <= minus2_types
    assert all(d["avg"][r][i] == -2 for d in deals for r in range(4) for i in (6, 27))
    rent = sum(d["current"][31] == -2 for d in deals) / len(deals)
    assert 0.12 <= rent <= 0.26
    assert all(-1 in d["current"] for d in deals)
