"""/deal, /token and error responses over real HTTP: envelope, paging, costs, validation, deal layout."""

from __future__ import annotations

import json
import re

import pytest
import requests

from deals_pipeline.simulator import MAX_PAGE, PAGE_SIZE
from deals_pipeline_tests.simulator.helpers import assert_envelope, selection

DEAL_KEYS = {
    "asin", "title", "current", "avg", "delta", "deltaPercent", "deltaLast", "currentSince", "backInStock",
    "categories", "rootCat", "creationDate", "lastUpdate", "lightningStart", "lightningEnd", "image",
    "warehouseCondition", "salesRankDrops30", "salesRankDrops90", "salesRankDrops180", "salesRankDrops365",
    "dateIntervalIndex",
}  # fmt: skip
ASIN_RE = re.compile(r"^[0-9A-Z]{10}$")


def test_token_envelope_is_free(api, clock):
    r = api.token()
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {
        "timestamp", "tokensLeft", "refillIn", "refillRate", "tokenFlowReduction", "tokensConsumed",
        "processingTimeInMs",
    }  # fmt: skip
    assert_envelope(body, now_ms=clock.now_ms(), consumed=0)
    assert body["tokensLeft"] == 300 and body["refillRate"] == 5
    assert api.token().json()["tokensLeft"] == 300


def test_every_response_kind_carries_the_envelope(api, sim, clock):
    assert_envelope(api.deal(0).json(), clock.now_ms(), consumed=5)  # 200
    r = api.deal(0, page="0")  # 400 (bad parameter)
    assert r.status_code == 400
    assert_envelope(r.json(), consumed=0)
    r = api.get("deal", key="", selection=json.dumps(selection()))  # 400 (missing key)
    assert r.status_code == 400
    assert_envelope(r.json(), consumed=0)
    r = api.get("nope")  # 404
    assert r.status_code == 404
    assert_envelope(r.json(), consumed=0)
    sim.inject("http_402")
    r = api.token()
    assert r.status_code == 402
    assert_envelope(r.json(), consumed=0)
    sim.inject("server_error")
    r = api.deal(0)
    assert r.status_code == 500
    assert_envelope(r.json(), consumed=0)
    assert "error" in r.json()
    sim.bucket.set_balance(0)
    r = api.deal(0)  # 429
    assert r.status_code == 429
    assert set(r.json()) == set(api.token().json())  # a 429 body is only the envelope
    assert_envelope(r.json(), consumed=0)


def test_missing_blank_or_wrong_key_is_400(make_sim, api_for, sentinel_key):
    sim = make_sim(expected_key=sentinel_key, catalog_size=10)
    api = api_for(sim)
    assert api.token().status_code == 200
    for key in ("", "   ", "wrong-key"):
        r = api.get("token", key=key)
        assert r.status_code == 400
        assert_envelope(r.json(), consumed=0)
    r = requests.get(f"{sim.base_url}/token", timeout=5)  # no key parameter at all
    assert r.status_code == 400
    assert sentinel_key not in repr(sim.config)


def test_pages_of_150_short_last_page_then_empty_page_each_cost_5(api, clock):
    sizes, asins, balance = [], [], 300
    for page in range(7):
        r = api.deal(page)
        assert r.status_code == 200
        body = r.json()
        assert_envelope(body, consumed=5)
        balance -= 5
        assert body["tokensLeft"] == balance  # the empty page costs 5 too
        assert body["dealsCached"] is False
        dr = body["deals"]["dr"]
        sizes.append(len(dr))
        asins += [d["asin"] for d in dr]
    assert sizes == [150, 150, 150, 150, 150, 50, 0]
    assert len(asins) == len(set(asins)) == 800
    empty = api.deal(6).json()["deals"]
    assert empty["dr"] == [] and empty["drDateIndex"] == []
    assert empty["categoryIds"] and len(empty["categoryIds"]) == len(empty["categoryNames"]) == len(empty["categoryCount"])
    assert sum(empty["categoryCount"]) == 800


def test_result_cap_is_10000_and_page_after_66_is_400(make_sim, api_for):
    sim = make_sim(catalog_size=10_050)
    api = api_for(sim)
    last = api.deal(MAX_PAGE)
    assert last.status_code == 200
    assert len(last.json()["deals"]["dr"]) == 10_000 - MAX_PAGE * PAGE_SIZE  # 100: the short page
    assert len(api.deal(MAX_PAGE - 1).json()["deals"]["dr"]) == PAGE_SIZE
    before = sim.bucket.balance()
    for bad_page in (MAX_PAGE + 1, -1):
        r = api.deal(bad_page)
        assert r.status_code == 400
        assert_envelope(r.json(), consumed=0)
    assert sim.bucket.balance() == before


@pytest.mark.parametrize(
    "over",
    [
        {"page": "0"},
        {"domainId": "1"},
        {"sortType": "4"},
        {"dateRange": "3"},
        {"page": 1.0},
        {"sortType": True},
        {"dateRange": 4},
        {"dateRange": -1},
        {"priceTypes": [1, 2]},
        {"priceTypes": []},
        {"priceTypes": ["2"]},
        {"priceTypes": 2},
        {"priceTypes": [4]},
        {"sortType": 0},
        {"sortType": 5},
        {"domainId": 12},
    ],
)
def test_selection_validation_rejects_with_400_and_costs_nothing(api, sim, over):
    r = api.deal(**over)
    assert r.status_code == 400, over
    assert_envelope(r.json(), consumed=0)
    assert r.json()["tokensLeft"] == 300
    assert sim.stats().tokens_consumed == 0


def test_missing_domain_or_price_types_or_bad_json_is_400(api):
    sel = selection()
    del sel["domainId"]
    assert api.get("deal", selection=json.dumps(sel)).status_code == 400
    sel = selection()
    del sel["priceTypes"]
    assert api.get("deal", selection=json.dumps(sel)).status_code == 400
    assert api.get("deal", selection="{not json").status_code == 400
    assert api.get("deal", selection="[1]").status_code == 400
    assert api.get("deal").status_code == 400


def test_post_deal_with_json_body_matches_get(api, sim):
    get = api.deal(1).json()["deals"]
    r = api.session.post(f"{sim.base_url}/deal", params={"key": api.key}, data=json.dumps(selection(1)), timeout=5)
    assert r.status_code == 200
    assert r.json()["deals"] == get
    assert r.json()["tokensConsumed"] == 5
    assert api.session.post(f"{sim.base_url}/product", params={"key": api.key}, timeout=5).status_code == 405


def test_deal_objects_have_the_real_layout(api, samples_dir):
    real_page = samples_dir / "deal_responses" / "run_2025-09-14T18-12Z_commit_b3f7397" / "page_0.json"
    real = json.loads(real_page.read_text())["deals"]["dr"][0]
    assert DEAL_KEYS <= set(real)  # the constant above matches the real samples
    deals = [d for p in range(6) for d in api.deal(p).json()["deals"]["dr"]]
    titles_with_markup = 0
    for d in deals:
        assert DEAL_KEYS <= set(d) <= DEAL_KEYS | {"warehouseConditionComment", "parentAsin"}
        assert ASIN_RE.match(d["asin"])
        for k in ("current", "deltaLast", "currentSince", "backInStock"):
            assert len(d[k]) == 34, k
        for k in ("avg", "delta", "deltaPercent"):
            assert len(d[k]) == 4 and all(len(row) == 34 for row in d[k]), k
            assert all(type(v) is int for row in d[k] for v in row)
        assert all(type(v) is bool for v in d["backInStock"])
        assert all(type(v) is int for v in d["current"])
        assert set(v for v in d["current"] if v < 0) <= {-1, -2}
        assert d["avg"][0][6] == -2 and d["avg"][3][33] == -2  # the -2 sentinel where real data has it
        assert d["lightningStart"] == 0 and d["lightningEnd"] == 0 and d["dateIntervalIndex"] == 0
        name = "".join(map(chr, d["image"]))
        assert re.match(r"^[0-9A-Za-z]{11}\.jpg$", name), name
        assert d["rootCat"] and d["categories"]
        for r in range(4):  # delta = avg - current, deltaPercent = delta / avg (observed sign)
            c, a, dl = d["current"][2], d["avg"][r][2], d["delta"][r][2]
            if c >= 0 and a > 0:
                assert dl == a - c
                assert d["deltaPercent"][r][2] == round(dl * 100 / a)
        assert d["salesRankDrops30"] <= d["salesRankDrops90"] <= d["salesRankDrops180"] <= d["salesRankDrops365"]
        titles_with_markup += "<" in d["title"] or "&amp;" in d["title"]
    assert titles_with_markup > 0
    assert any(-2 in d["current"] for d in deals)
    assert len({d["asin"] for d in deals}) == len(deals)


def test_lastupdate_is_keepa_minutes_near_the_response_timestamp(api):
    from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute

    body = api.deal(0).json()
    now_min = unix_ms_to_keepa_minute(body["timestamp"])
    for d in body["deals"]["dr"]:
        assert now_min - 1_340 <= d["lastUpdate"] <= now_min + 1
        assert d["currentSince"][2] <= d["lastUpdate"]


def test_unknown_path_404_and_stats_endpoint_needs_no_key(api, sim):
    assert api.get("product/extra").status_code == 404
    r = requests.get(f"{sim.base_url}/_sim/stats", timeout=5)
    assert r.status_code == 200
    assert r.json()["requests"] == {"other": 1}
    assert r.json()["bucket"]["tokens_left"] == 300
