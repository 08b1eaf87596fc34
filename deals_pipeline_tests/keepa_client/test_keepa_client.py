"""The public ``keepa`` client (PyPI keepa 1.6) as a second real client of the simulator."""

from __future__ import annotations

import keepa
import pytest

from deals_pipeline.config import DEFAULT_SELECTION
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig
from deals_pipeline.clock import ScaledClock, SystemClock
from deals_pipeline_tests.keepa_client.redirect import KeepaRedirect


def test_update_status_reads_the_envelope(api, sim, redirect):
    api.update_status()
    assert redirect.calls == ["token"]
    assert api.tokens_left == sim.bucket.balance() == 600_000
    assert api.status.refillRate == 10_000 and 0 < api.status.refillIn <= 60_000
    assert 0 < api.time_to_refill <= 61.0  # keepa's estimate of the next refill, in real seconds


def test_deals_walks_the_production_query(api, sim):
    selection = {k: v for k, v in DEFAULT_SELECTION.items() if k != "page"}
    seen: list[str] = []
    page = 0
    while True:
        deals = api.deals({**selection, "page": page})
        seen += [d["asin"] for d in deals["dr"]]
        assert set(deals) >= {"dr", "categoryIds", "categoryNames", "categoryCount"}
        if len(deals["dr"]) < 150:
            break
        page += 1
    assert page == 5 and 740 <= len(seen) <= 800 and len(set(seen)) == len(seen)
    assert api.tokens_left == 600_000 - 5 * (page + 1)
    pct = [sim.catalog.deal(a)["deltaPercent"][3][2] for a in seen]
    assert pct == sorted(pct, reverse=True) and min(pct) >= 50


def test_typed_deals_validate_against_keepas_own_model(api):
    typed = api.deals({"page": 0, "domainId": 1, "priceTypes": [2], "dateRange": 3, "sortType": 4}, typed=True)
    assert len(typed.dr) == 150


def test_query_with_offers_rating_stats_and_no_history(api, sim):
    asins = [d["asin"] for d in sim.catalog.ordered(4, 3, 2)[:5]]
    before = sim.bucket.balance()
    products = api.query(asins, offers=20, rating=True, stats=90, history=False, progress_bar=False)
    assert [p["asin"] for p in products] == asins
    spent = before - sim.bucket.balance()
    assert 30 <= spent <= 65  # observed 30-38 for 5 ASINs; 6-13 per ASIN at most
    for p in products:
        assert p["csv"] is None and "data" not in p
        assert p["stats"]["current"] == sim.catalog.deal(p["asin"])["current"]
        assert "stats_parsed" in p and "current" in p["stats_parsed"]  # keepa parsed our stats object
        assert p["offersSuccessful"] and len(p["offers"]) >= len(p["liveOffersOrder"]) >= 1


def test_query_with_history_as_far_as_the_samples_allow(api, sim, samples_dir):
    """keepa 1.6's parse_csv reads 36 csv entries (up to COUNT_NEW_FBM); the real history=1 sample has 34, as the
    simulator does, so keepa's own parsing fails on both alike. With raw=True keepa returns the response unparsed."""
    import json

    real = json.loads((samples_dir / "product_object_055299068X.json").read_text())
    with pytest.raises(IndexError):
        keepa.parse_csv(real["csv"])
    asins = [d["asin"] for d in sim.catalog.ordered(4, 3, 2)[:3]]
    with pytest.raises(IndexError):
        api.query(asins, offers=20, rating=True, stats=90, history=True, progress_bar=False)
    raw = api.query(asins, offers=20, rating=True, stats=90, history=True, days=90, progress_bar=False, raw=True)
    products = raw[0].json()["products"]
    assert [p["asin"] for p in products] == asins
    for p in products:
        assert len(p["csv"]) == len(real["csv"]) == 34
        assert set(p) == (set(real) - {"formats"}) | {"gtinList"}
        padded = p["csv"] + [None, None]  # what keepa would need: then its parser reads our histories
        data = keepa.parse_csv(padded)
        assert len(data["USED"]) == len(data["USED_time"]) >= 2
        assert data["USED"][-1] == pytest.approx(p["stats"]["current"][2] / 100)


def test_a_wrong_key_is_http_400_for_keepa_too(redirect, sim):
    wrong = keepa.Keepa("not-the-key" * 6, logging_level="WARNING")
    with pytest.raises(RuntimeError, match="REQUEST_REJECTED"):
        wrong.update_status()
    assert sim.stats().responses[400] == 1


def test_keepa_plans_a_real_refill_wait_only_on_a_real_time_simulator(sentinel_key, monkeypatch):
    """keepa sleeps ``timestamp + refillIn - time.time()`` + 1 s + deficit/rate minutes after a 429, in wall time. On a
    real-time simulator (the CLI default now) that is the real wait; on a x60 clock (the old default) keepa plans
    ~60 times too long (the issue saw a 650 s plan for a refill 0.46 s away). Read with wait=False: nothing sleeps."""
    plans, needed = {}, {}
    for name, clock in (("real time", SystemClock()), ("x60", ScaledClock(60))):
        config = SimulatorConfig(refill_rate=5, initial_tokens=-20, expected_key=sentinel_key)
        with KeepaSimulator(config, clock=clock) as sim:
            monkeypatch.setattr(keepa.keepa_sync, "requests", KeepaRedirect(sim.base_url))
            api = keepa.Keepa(sentinel_key, logging_level="WARNING")
            with pytest.raises(RuntimeError, match="NOT_ENOUGH_TOKEN"):
                api.deals({"page": 0, "domainId": 1, "priceTypes": [2]}, wait=False)
            plans[name] = api.time_to_refill
            refills = -(-(1 - api.tokens_left) // 5)  # refills until the balance is positive again
            needed[name] = (api.status.refillIn + (refills - 1) * 60_000) / 1000 / clock.scale  # wall seconds
    assert needed["real time"] <= plans["real time"] <= needed["real time"] + 3  # + keepa's 1 s margin
    assert plans["x60"] > 20 * needed["x60"]
