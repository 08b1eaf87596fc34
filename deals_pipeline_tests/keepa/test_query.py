"""What we send: selection JSON types (HAZARDS #11), validation before sending, product options (H6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deals_pipeline.keepa.errors import InvalidRequest
from deals_pipeline.keepa.query import (
    DEAL_PRICE_TYPES,
    MAX_ASINS_PER_PRODUCT_REQUEST,
    DealSelection,
    ProductOptions,
)
from deals_pipeline_tests.keepa.conftest import FIRST_RUN, load_json


def test_defaults_are_ints_on_the_wire() -> None:
    j = DealSelection().to_json()
    assert j == {"page": 0, "domainId": 1, "priceTypes": [2], "dateRange": 3, "sortType": 1}
    for k in ("page", "domainId", "sortType", "dateRange"):
        assert type(j[k]) is int, k
    assert type(j["priceTypes"][0]) is int
    text = DealSelection(page=7).to_query_param()
    assert '"page":7' in text and '"7"' not in text


def test_sample_selection_round_trip(samples_dir: Path) -> None:
    raw = load_json(samples_dir / "deal_responses" / FIRST_RUN / "request_selection_page0.json")
    assert raw["dateRange"] == "3" and raw["domainId"] == "1"  # the production system sent strings
    sel = DealSelection.from_mapping(raw)
    j = sel.to_json()
    assert j["dateRange"] == 3 and j["domainId"] == 1 and type(j["dateRange"]) is int
    fixed = dict(raw, dateRange=3, domainId=1)
    assert j == fixed  # every other field survives unchanged
    assert sel.sort_type == 4 and sel.delta_percent_range == (50, 2147483647)
    assert DealSelection.from_mapping(json.loads(sel.to_query_param())) == sel


def test_snake_case_mapping_and_conflicts() -> None:
    a = DealSelection.from_mapping({"domain_id": 2, "price_types": [1], "sales_rank_range": [1, -1]})
    b = DealSelection.from_mapping({"domainId": 2, "priceTypes": [1], "salesRankRange": [1, -1]})
    assert a == b and a.sales_rank_range == (1, -1)
    with pytest.raises(InvalidRequest, match="given twice"):
        DealSelection.from_mapping({"domain_id": 2, "domainId": 2})
    with pytest.raises(InvalidRequest, match="unknown"):
        DealSelection.from_mapping({"sortTyp": 1})
    with pytest.raises(InvalidRequest):
        DealSelection.from_mapping({"dateRange": "three"})


def test_fingerprint_ignores_page_only() -> None:
    s = DealSelection(sort_type=4, include_categories=[283155], current_range=(2000, 30100))
    assert s.with_page(5).fingerprint() == s.fingerprint()
    assert s.with_page(5).page == 5 and s.page == 0
    assert DealSelection(sort_type=1).fingerprint() != s.fingerprint()
    assert DealSelection(domain_id=2).fingerprint() != DealSelection().fingerprint()
    assert len(s.fingerprint()) == 64
    assert DealSelection().fingerprint() == DealSelection.from_mapping({"page": 3}).fingerprint()
    # Stable across processes and releases (stored snapshots are keyed by it): pinned value.
    assert DealSelection().fingerprint() == "38118b6193d702e3656102e5c5d15cb92d9cea6f2440c7eae99864635f19dacc"


def test_lists_become_tuples_and_selection_is_hashable() -> None:
    s = DealSelection(price_types=[2], include_categories=[1, 2], brand=["x"])
    assert s.price_types == (2,) and s.include_categories == (1, 2) and s.brand == ("x",)
    assert hash(s) == hash(DealSelection(price_types=(2,), include_categories=(1, 2), brand=("x",)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"page": -1}, {"page": 67}, {"page": "1"}, {"page": True}, {"page": 1.0},
        {"domain_id": 0}, {"domain_id": 12}, {"domain_id": 13}, {"domain_id": "1"},
        {"price_types": ()}, {"price_types": (1, 2)}, {"price_types": (4,)}, {"price_types": (11,)},
        {"price_types": ("2",)}, {"price_types": 2},
        {"date_range": 4}, {"date_range": -1}, {"date_range": "3"},
        {"sort_type": 0}, {"sort_type": 5}, {"sort_type": -1}, {"sort_type": "4"},
        {"current_range": (1,)}, {"current_range": (1, 2, 3)}, {"current_range": (5, 1)},
        {"current_range": ("1", 2)}, {"delta_range": (0, 2**31)}, {"sales_rank_range": (10, -2)},
        {"min_rating": 51}, {"min_rating": -2},
        {"include_categories": list(range(501))}, {"include_categories": "283155"},
        {"is_filter_enabled": 1}, {"single_variation": "true"},
        {"warehouse_conditions": (7,)},
        {"title_search": 5}, {"title_search": " ".join(["w"] * 51)},
        {"brand": "Acme"},
    ],
)
def test_invalid_selection_rejected(kwargs: dict) -> None:
    with pytest.raises(InvalidRequest):
        DealSelection(**kwargs)


def test_invalid_page_via_with_page() -> None:
    with pytest.raises(InvalidRequest):
        DealSelection().with_page(67)
    assert DealSelection().with_page(66).page == 66


@given(
    page=st.integers(0, 66),
    domain=st.integers(1, 11),
    price_type=st.sampled_from(sorted(DEAL_PRICE_TYPES)),
    date_range=st.integers(0, 3),
    sort_type=st.sampled_from([1, 2, 3, 4, -2, -3, -4]),
)
def test_valid_selections_serialize_as_ints(page: int, domain: int, price_type: int, date_range: int,
                                            sort_type: int) -> None:
    s = DealSelection(page=page, domain_id=domain, price_types=(price_type,), date_range=date_range,
                      sort_type=sort_type)
    j = json.loads(s.to_query_param())
    assert [type(j[k]) for k in ("page", "domainId", "dateRange", "sortType")] == [int] * 4
    assert type(j["priceTypes"][0]) is int
    assert DealSelection.from_mapping(j) == s


def test_product_options_params() -> None:
    p = ProductOptions().to_params()
    assert p == {"stats": "90", "offers": "20", "only-live-offers": "1", "history": "0", "rating": "1"}
    assert "only_live_offers" not in p  # HAZARDS H6: the underscore form is ignored by Keepa
    assert all(isinstance(v, str) for v in p.values())
    q = ProductOptions(stats=None, offers=None, history=True, days=365, rating=False, buybox=True, update=0).to_params()
    assert q == {"history": "1", "days": "365", "rating": "0", "buybox": "1", "update": "0"}
    assert ProductOptions(offers=100, stock=True, only_live_offers=False).to_params()["only-live-offers"] == "0"
    assert ProductOptions(offers=100, stock=True).to_params()["stock"] == "1"
    assert ProductOptions.from_mapping({"only-live-offers": False, "offers": "40"}).offers == 40
    assert MAX_ASINS_PER_PRODUCT_REQUEST == 100


@pytest.mark.parametrize(
    "kwargs",
    [
        {"offers": 0}, {"offers": 1}, {"offers": 10}, {"offers": 19}, {"offers": 101}, {"offers": "20"},
        {"stats": 0}, {"stats": -5}, {"days": 0}, {"update": -2}, {"history": 1}, {"rating": "1"},
        {"stock": True, "offers": None},
    ],
)
def test_invalid_product_options(kwargs: dict) -> None:
    with pytest.raises(InvalidRequest):
        ProductOptions(**kwargs)
