"""Models against the real Keepa samples (../shared/keepa-samples), plus the time and wait goldens."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deals_pipeline.keepa import keepa_time as kt
from deals_pipeline.keepa.errors import MalformedPayload, NotEnoughTokens
from deals_pipeline.keepa.models import (
    DEAL_PAGE_SIZE,
    Deal,
    DealPage,
    Product,
    ProductPage,
    SkippedDeal,
    TokenStatus,
    decode_image_name,
    image_url,
    is_valid_asin,
    refill_wait_ms,
    retry_after_ms,
)
from deals_pipeline_tests.keepa.conftest import FIRST_RUN, load_json


def _pages(samples_dir: Path) -> list[tuple[dict, Path]]:
    index = load_json(samples_dir / "deal_responses" / "index.json")
    return [(row, samples_dir / row["file"]) for row in index]


def test_every_deal_page_parses(samples_dir: Path) -> None:
    rows = _pages(samples_dir)
    assert len(rows) == 28
    total = 0
    for row, path in rows:
        body = load_json(path)
        page = DealPage.from_response(body, page=row["page"])
        assert page.skipped == (), (row["file"], page.skipped[:3])
        assert len(page.deals) == page.raw_count == row["deals"], row["file"]
        assert page.status.tokens_left == row["tokensLeft"]
        assert page.status.tokens_consumed == 5 == row["tokensConsumed"]
        assert page.status.timestamp_ms == row["timestamp"]
        assert page.status.refill_in_ms == row["refillIn"]
        assert page.is_last == (row["deals"] < DEAL_PAGE_SIZE)
        assert len(page.category_ids) == len(page.category_names) == len(page.category_counts) > 0
        if row["page"] == 6:
            assert page.is_last and page.deals == ()
        if row["page"] < 5:
            assert not page.is_last
        for deal in page.deals:
            assert len(deal.current) == 34 and len(deal.avg) == 4 and all(len(r) == 34 for r in deal.avg)
            assert deal.image_name and deal.image_name.rsplit(".", 1)[-1] in ("jpg", "gif", "png")
        total += len(page.deals)
    assert total == 778 + 793 + 755 + 769


def test_golden_times_and_image(samples_dir: Path) -> None:
    body = load_json(samples_dir / "deal_responses" / FIRST_RUN / "page_0.json")
    page = DealPage.from_response(body, page=0)
    assert page.status.timestamp_ms == 1757873538842
    assert kt.unix_ms_to_keepa_minute(page.status.timestamp_ms) == 7733892
    assert kt.unix_ms_to_datetime(1757873538842) == datetime(2025, 9, 14, 18, 12, 18, 842000, tzinfo=timezone.utc)
    first = page.deals[0]
    assert first.asin == "1598162152"
    assert first.last_update == 7733828
    assert first.last_update_utc == datetime(2025, 9, 14, 17, 8, tzinfo=timezone.utc)
    assert first.creation_date == 7733684
    assert first.creation_date_utc == datetime(2025, 9, 14, 14, 44, tzinfo=timezone.utc)
    assert decode_image_name([53, 49, 57, 53, 48, 75, 51, 67, 90, 53, 76, 46, 106, 112, 103]) == "51950K3CZ5L.jpg"
    assert first.image_name == "51950K3CZ5L.jpg"
    assert first.image_url == "https://m.media-amazon.com/images/I/51950K3CZ5L.jpg"
    assert first.price(2) == 2050 and first.price(0) is None  # -1 sentinel
    assert first.delta_percent_at(3, 2) == 81  # the sort key of the sortType=4 sample run
    # sortType 4 = percentage delta: non-increasing deltaPercent[3][2] (not recency), KEEPA_API.md §4.2
    keys = [d.delta_percent_at(3, 2) for d in page.deals]
    assert keys == sorted(keys, reverse=True)


@given(st.integers(min_value=-20_000_000, max_value=50_000_000))
def test_keepa_minute_round_trip(minute: int) -> None:
    dt = kt.keepa_minute_to_datetime(minute)
    assert kt.datetime_to_keepa_minute(dt) == minute
    ms = kt.keepa_minute_to_unix_ms(minute)
    assert kt.unix_ms_to_keepa_minute(ms) == minute
    assert kt.unix_ms_to_datetime(ms) == dt


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_unix_ms_floors_to_minute(ms: int) -> None:
    minute = kt.unix_ms_to_keepa_minute(ms)
    assert kt.keepa_minute_to_unix_ms(minute) <= ms < kt.keepa_minute_to_unix_ms(minute + 1)


def test_429_sample_and_wait_formula(body_429: bytes) -> None:
    status = TokenStatus.from_envelope(json.loads(body_429))
    assert status.tokens_left == -249 and status.tokens_consumed == 0 and status.refill_in_ms == 45592
    now = status.timestamp_ms
    assert refill_wait_ms(status, need=1, now_ms=now, margin_ms=0) == 2_985_592
    err = NotEnoughTokens("429", status)
    assert retry_after_ms(err, now, need=1, margin_ms=0) == 2_985_592
    assert retry_after_ms(status, now, margin_ms=0) == 2_985_592
    # Default margin is 1 s; no status (unreadable 429) means "one refill period".
    assert retry_after_ms(err, now) == 2_986_592
    assert retry_after_ms(NotEnoughTokens("429", None), now) == 61_000


def test_all_token_samples_parse(token_samples: list[dict]) -> None:
    assert len(token_samples) == 60
    for obj in token_samples:
        status = TokenStatus.from_envelope(obj)
        assert status.tokens_consumed == 0 and status.refill_rate == 5
        assert 0 <= status.refill_in_ms < 60_000
        assert status.tokens_left <= status.cap == 300


def test_both_product_objects_parse(product_objects: dict[str, dict]) -> None:
    a = Product.from_json(product_objects["1886940606"])
    assert a.asin == "1886940606" and a.title == "The Other Side of Suicide"
    assert a.last_update == 7833124
    assert a.last_update_utc == datetime(2025, 11, 22, 16, 4, tzinfo=timezone.utc)
    assert a.root_category == 283155 and a.categories == (12676, 12681)
    assert a.stats_current is not None and len(a.stats_current) == 34
    assert a.sales_rank == 287187 and a.used_price == 2243
    assert a.total_offer_count == 1 and a.live_offer_count == 1 and a.offers_successful is True
    assert a.buy_box_used_price is None
    # The underscore spelling was ignored: 121 historical offers for one live one (HAZARDS H6).
    assert len(a.raw["offers"]) == 121
    b = Product.from_json(product_objects["055299068X"])
    assert b.asin == "055299068X" and b.live_offer_count == 2 and b.buy_box_used_price == 2100
    assert b.used_price == 2100 and b.sales_rank == 1297709 and b.total_offer_count == 2


def test_product_page_from_response(product_objects: dict[str, dict], token_samples: list[dict]) -> None:
    body = dict(token_samples[0], tokensConsumed=12,
                products=[product_objects["1886940606"], {"asin": "bad"}, product_objects["055299068X"]])
    page = ProductPage.from_response(body)
    assert [p.asin for p in page.products] == ["1886940606", "055299068X"]
    assert page.skipped == (SkippedDeal(1, "bad", page.skipped[0].reason),)
    assert "asin" in page.skipped[0].reason
    assert page.status.tokens_consumed == 12
    assert set(page.by_asin()) == {"1886940606", "055299068X"}
    with pytest.raises(MalformedPayload) as ei:
        ProductPage.from_response(dict(token_samples[0]))
    assert ei.value.field == "products"


# -- validation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deal_obj(samples_dir: Path) -> dict:
    return load_json(samples_dir / "deal_responses" / FIRST_RUN / "page_0.json")["deals"]["dr"][0]


@pytest.mark.parametrize(
    "field, value",
    [
        ("asin", "159816215"),
        ("asin", "1598162152x"),
        ("asin", "b0031s36ja"),
        ("asin", None),
        ("current", "1,2,3"),
        ("current", [1, "2", 3]),
        ("current", [True] * 34),
        ("current", []),
        ("current", list(range(1001))),
        ("avg", [[1] * 34] * 3),
        ("avg", [[1] * 34, [1] * 34, [1] * 34, "x"]),
        ("deltaPercent", [[1.5] * 34] * 4),
        ("backInStock", ["yes"] * 34),
        ("lastUpdate", -5),
        ("lastUpdate", 10**12),
        ("lastUpdate", "7733828"),
        ("creationDate", 7733684.0),
        ("title", 12),
        ("image", {"a": 1}),
        ("image", [0, 1, 2]),
        ("rootCat", -1),
        ("salesRankDrops30", None),
    ],
)
def test_deal_validation_names_the_field(deal_obj: dict, field: str, value: object) -> None:
    bad = copy.deepcopy(deal_obj)
    bad[field] = value
    with pytest.raises(MalformedPayload) as ei:
        Deal.from_json(bad)
    assert ei.value.field is not None and ei.value.field.startswith(field)
    assert field in str(ei.value)


def test_deal_missing_required_and_optional_fields(deal_obj: dict) -> None:
    bad = copy.deepcopy(deal_obj)
    del bad["lastUpdate"]
    with pytest.raises(MalformedPayload, match="lastUpdate"):
        Deal.from_json(bad)
    ok = copy.deepcopy(deal_obj)
    for k in ("warehouseConditionComment", "parentAsin", "minRating", "dateIntervalIndex"):
        ok.pop(k, None)
    assert Deal.from_json(ok).parent_asin is None
    ok["warehouseConditionComment"] = "Light wear"
    ok["parentAsin"] = "B000000001"
    d = Deal.from_json(ok)
    assert d.warehouse_condition_comment == "Light wear" and d.parent_asin == "B000000001"


def test_title_html(deal_obj: dict) -> None:
    obj = dict(deal_obj, title="<b>Fish &amp; Chips</b><br/>Second&nbsp;Edition")
    d = Deal.from_json(obj)
    assert d.title == obj["title"]
    assert d.title_text == "Fish & Chips Second Edition"  # nbsp collapses to a space
    assert "<" not in d.title_text


def test_malformed_deal_is_skipped_not_fatal(samples_dir: Path) -> None:
    body = load_json(samples_dir / "deal_responses" / FIRST_RUN / "page_5.json")
    dr = body["deals"]["dr"]
    dr[3] = dict(dr[3], current="oops")
    dr[7] = "not a deal"
    page = DealPage.from_response(body, page=5)
    assert page.raw_count == 28 and len(page.deals) == 26 and page.is_last
    assert [s.index for s in page.skipped] == [3, 7]
    assert page.skipped[0].asin == dr[3]["asin"] and "current" in page.skipped[0].reason
    assert page.skipped[1].asin is None


@pytest.mark.parametrize("deals_value", [None, [], "x", {"dr": None}, {"dr": {}}])
def test_page_without_deal_list_is_malformed(token_samples: list[dict], deals_value: object) -> None:
    body = dict(token_samples[0])
    if deals_value is not None:
        body["deals"] = deals_value
    with pytest.raises(MalformedPayload) as ei:
        DealPage.from_response(body, page=0)
    assert ei.value.field in ("deals", "deals.dr")


def test_page_without_envelope_is_malformed() -> None:
    with pytest.raises(MalformedPayload):
        DealPage.from_response({"deals": {"dr": []}}, page=0)


def test_deal_equality_and_hash_ignore_raw(deal_obj: dict) -> None:
    a = Deal.from_json(deal_obj)
    b = Deal.from_json(dict(deal_obj, extra="x"))
    assert a == b and hash(a) == hash(b)
    assert "1598162152" in repr(a) and len(repr(a)) < 300


def test_small_helpers() -> None:
    assert is_valid_asin("B0031S36JA") and is_valid_asin("019848187X")
    assert not is_valid_asin("B0031S36J") and not is_valid_asin('="0006120725"') and not is_valid_asin(None)
    assert decode_image_name(None) is None and decode_image_name([]) is None
    assert decode_image_name("x.jpg") == "x.jpg"
    assert image_url(None) is None
