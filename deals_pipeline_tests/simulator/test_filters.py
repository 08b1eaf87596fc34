"""/deal selection filters, one test per filter (KEEPA_API.md §4.1, §4.4), over real HTTP.

Each test compares what the server returns with a brute-force pass over the catalog written out here,
independently of deals_pipeline.simulator.filters.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from deals_pipeline.config import DEFAULT_SELECTION
from deals_pipeline.simulator.filters import is_lowest

BOOKS = 283155
BIG = 2147483647


@pytest.fixture
def sim(make_sim):
    return make_sim()  # the default 800-deal catalog


def _all(api, **sel: Any) -> tuple[list[dict], list[dict]]:
    """Every deal of a query (pages until a short one) and the page-0 ``deals`` payload."""
    deals, first, page = [], None, 0
    while True:
        r = api.deal(page, **sel)
        assert r.status_code == 200, r.text
        payload = r.json()["deals"]
        first = first or payload
        deals += payload["dr"]
        if len(payload["dr"]) < 150:
            return deals, first
        page += 1


def _expect(sim, keep: Callable[[dict], bool]) -> set[str]:
    return {d["asin"] for d in sim.catalog.ordered(1, 0, 0) if keep(d)}


def _asins(deals: list[dict]) -> set[str]:
    return {d["asin"] for d in deals}


RANGES = {"isRangeEnabled": True}
FILTERS = {"isFilterEnabled": True}


def test_reference_query_matches_like_the_samples(api):
    """The samples' Books/used query returned 755-793 deals over 6 pages (5 full + a short one)."""
    sel = {k: v for k, v in DEFAULT_SELECTION.items() if k != "page"}
    deals, payload = _all(api, **sel)
    assert 740 <= len(deals) <= 800
    assert [len(deals[i : i + 150]) for i in range(0, len(deals), 150)][:5] == [150] * 5
    pct = [d["deltaPercent"][3][2] for d in deals]
    assert pct == sorted(pct, reverse=True) and pct[-1] >= 50 and pct[0] <= 81
    for d in deals:
        assert d["rootCat"] == BOOKS
        assert 2000 <= d["current"][2] <= 30100
        assert 1950 <= d["delta"][3][2] <= 9900
        assert d["delta"][3][2] == d["avg"][3][2] - d["current"][2]  # average - current
        assert 50_000 <= d["current"][3] <= 1_500_000 and d["current"][16] >= 10
    # Few deals pass the same filters on the shorter intervals (samples: 18-203 of ~770).
    for date_range in (0, 1, 2):
        shorter, _ = _all(api, **{**sel, "dateRange": date_range})
        assert len(shorter) < len(deals) * 0.4


def test_include_categories(sim, api):
    deals, _ = _all(api, includeCategories=[BOOKS])
    expected = _expect(sim, lambda d: d["rootCat"] == BOOKS or BOOKS in d["categories"])
    assert _asins(deals) == expected and 0 < len(expected) < len(sim.catalog)
    sub = sim.catalog.ordered(1, 0, 0)[0]["categories"][0]  # a sub-category id matches deals listed in it
    deals, _ = _all(api, includeCategories=[sub])
    assert _asins(deals) == _expect(sim, lambda d: sub in d["categories"] or d["rootCat"] == sub)


def test_exclude_categories(sim, api):
    deals, _ = _all(api, excludeCategories=[BOOKS])
    assert _asins(deals) == _expect(sim, lambda d: d["rootCat"] != BOOKS and BOOKS not in d["categories"])
    assert deals and all(d["rootCat"] != BOOKS for d in deals)


def test_delta_percent_range_on_the_chosen_interval_and_type(sim, api):
    deals, _ = _all(api, deltaPercentRange=[60, BIG], **RANGES)
    assert _asins(deals) == _expect(sim, lambda d: d["deltaPercent"][3][2] >= 60)
    deals, _ = _all(api, deltaPercentRange=[2, BIG], **RANGES)  # the documented 10 % minimum applies
    assert _asins(deals) == _expect(sim, lambda d: d["deltaPercent"][3][2] >= 10)


def test_current_range(sim, api):
    deals, _ = _all(api, currentRange=[2000, 5000], **RANGES)
    assert _asins(deals) == _expect(sim, lambda d: 2000 <= d["current"][2] <= 5000)


def test_delta_range(sim, api):
    deals, _ = _all(api, deltaRange=[1950, 9900], **RANGES)
    expected = _expect(sim, lambda d: 1950 <= d["delta"][3][2] <= 9900)
    assert _asins(deals) == expected and len(expected) < len(sim.catalog)


def test_sales_rank_range_and_open_max(sim, api):
    deals, _ = _all(api, salesRankRange=[50_000, 1_500_000], **RANGES)
    assert _asins(deals) == _expect(sim, lambda d: 50_000 <= d["current"][3] <= 1_500_000)
    deals, _ = _all(api, salesRankRange=[1_000_000, -1], **RANGES)
    assert _asins(deals) == _expect(sim, lambda d: d["current"][3] >= 1_000_000)


def test_ranges_need_is_range_enabled(sim, api):
    deals, _ = _all(api, deltaPercentRange=[70, BIG], currentRange=[2000, 2100])
    assert len(deals) == len(sim.catalog)


def test_min_rating(sim, api):
    deals, _ = _all(api, minRating=10, **FILTERS)
    expected = _expect(sim, lambda d: d["current"][16] >= 10)
    assert _asins(deals) == expected and len(expected) < len(sim.catalog)
    assert len(_all(api, minRating=10)[0]) == len(sim.catalog)  # a filter option: needs isFilterEnabled


def test_has_reviews(sim, api):
    deals, _ = _all(api, hasReviews=True, **FILTERS)
    assert _asins(deals) == _expect(sim, lambda d: d["current"][17] > 0)


def test_is_lowest(sim, api):
    deals, _ = _all(api, isLowest=True, **FILTERS)

    def lowest(d: dict) -> bool:
        avgs = [row[2] for row in d["avg"] if row[2] > 0]
        return bool(avgs) and d["current"][2] <= min(avgs)

    at_or_below_averages = _expect(sim, lowest)
    assert _asins(deals) == _expect(sim, lambda d: is_lowest(d, 2))
    assert _asins(deals) <= at_or_below_averages and 0 < len(deals) < len(at_or_below_averages)


def test_title_search_all_keywords_case_insensitive(sim, api):
    title = sim.catalog.ordered(1, 0, 0)[0]["title"]
    words = [w for w in title.replace(":", " ").split() if w.isalpha()][:2]
    query = " ".join(w.upper() for w in words)
    deals, _ = _all(api, titleSearch=query)
    expected = _expect(sim, lambda d: all(w.lower() in d["title"].lower() for w in words))
    assert _asins(deals) == expected and 1 <= len(expected) < len(sim.catalog)


def test_price_type_and_date_range_pick_the_filtered_cell(sim, api):
    deals, _ = _all(api, priceTypes=[0])  # AMAZON: only deals with an Amazon offer are Amazon deals
    assert _asins(deals) == _expect(sim, lambda d: d["current"][0] >= 0) and len(deals) < len(sim.catalog)
    for date_range in (0, 3):
        deals, _ = _all(api, dateRange=date_range, deltaPercentRange=[50, BIG], **RANGES)
        assert _asins(deals) == _expect(sim, lambda d: d["deltaPercent"][date_range][2] >= 50)


def test_category_count_ignores_only_the_category_filters(sim, api):
    def counts(payload: dict) -> dict[int, int]:
        return dict(zip(payload["categoryIds"], payload["categoryCount"]))

    _, plain = _all(api)
    _, books = _all(api, includeCategories=[BOOKS])
    assert counts(books) == counts(plain) and len(counts(plain)) > 1
    assert sum(counts(plain).values()) == len(sim.catalog)
    deals, ranged = _all(api, includeCategories=[BOOKS], deltaPercentRange=[60, BIG], **RANGES)
    expected: dict[int, int] = {}
    for d in sim.catalog.ordered(1, 0, 0):
        if d["deltaPercent"][3][2] >= 60:
            expected[d["rootCat"]] = expected.get(d["rootCat"], 0) + 1
    assert counts(ranged) == expected
    assert counts(ranged)[BOOKS] == len(deals)
    assert len(ranged["categoryIds"]) == len(ranged["categoryNames"])


@pytest.mark.parametrize(
    "over",
    [{"includeCategories": "283155"}, {"currentRange": [1, "2"]}, {"deltaRange": [1]}, {"minRating": 60},
     {"titleSearch": 5}, {"isLowest": "yes"}],
)
def test_malformed_filters_are_http_400_and_free(sim, api, over):
    before = sim.bucket.balance()
    r = api.deal(0, isRangeEnabled=True, isFilterEnabled=True, **over)
    assert r.status_code == 400
    assert sim.bucket.balance() == before
