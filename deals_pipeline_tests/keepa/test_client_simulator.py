"""KeepaClient <-> embedded KeepaSimulator over real HTTP, sharing one ManualClock."""

from __future__ import annotations

from typing import Iterator

import pytest

from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import MalformedPayload, NotEnoughTokens, ResponseLost
from deals_pipeline.keepa.models import MAX_DEAL_PAGE, Deal, TokenStatus, retry_after_ms
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig

START_MS = 1_757_873_538_842


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START_MS)


@pytest.fixture
def sim(clock: ManualClock) -> Iterator[KeepaSimulator]:
    with KeepaSimulator(SimulatorConfig(refill_rate=5, seed=11, catalog_size=400), clock=clock) as s:
        yield s


@pytest.fixture
def seen() -> list[TokenStatus]:
    return []


@pytest.fixture
def client(sim: KeepaSimulator, clock: ManualClock, sentinel_key: str,
           seen: list[TokenStatus]) -> Iterator[KeepaClient]:
    with KeepaClient(sentinel_key, base_url=sim.base_url, clock=clock, max_attempts=3,
                     timeout_s=(2.0, 10.0), on_status=seen.append) as c:
        yield c


def test_token(client: KeepaClient, seen: list[TokenStatus]) -> None:
    status = client.token_status()
    assert status.tokens_left == status.cap == 300 and status.tokens_consumed == 0
    assert status.timestamp_ms == START_MS and 0 < status.refill_in_ms <= 60_000
    assert seen == [status]


def test_deal_pages_until_short_page(client: KeepaClient, seen: list[TokenStatus]) -> None:
    sel = DealSelection(sort_type=1)
    asins: set[str] = set()
    pages = []
    for n in range(MAX_DEAL_PAGE + 1):
        page = client.deals(sel.with_page(n))
        pages.append(page)
        assert page.page == n and page.skipped == (), page.skipped[:3]  # simulator output validates
        assert page.status.tokens_consumed == 5
        assert all(isinstance(d, Deal) for d in page.deals)
        asins.update(d.asin for d in page.deals)
        if page.is_last:
            break
    assert pages[-1].is_last and all(not p.is_last for p in pages[:-1])
    assert 0 < len(asins) <= 400
    assert [s.tokens_left for s in seen] == [300 - 5 * (i + 1) for i in range(len(pages))]


def test_products(client: KeepaClient, sim: KeepaSimulator) -> None:
    asins = [d.asin for d in client.deals(DealSelection()).deals[:5]]
    assert len(asins) == 5
    page = client.products(asins, ProductOptions(stats=90, offers=20))
    assert page.skipped == () and [p.asin for p in page.products] == asins
    assert page.status.tokens_consumed >= 5 * 6  # offers: 6 per offer page per product
    for p in page.products:
        assert p.stats_current is not None and p.live_offer_count is not None
        assert p.live_offer_count == len(p.raw["offers"])  # only-live-offers (hyphenated) was honoured
    cheap = client.products(asins, ProductOptions(stats=None, offers=None, rating=False))
    assert cheap.status.tokens_consumed == 5


def test_429_then_wait_retry_after_then_success(client: KeepaClient, clock: ManualClock,
                                                seen: list[TokenStatus]) -> None:
    sel = DealSelection(sort_type=1)
    asins = [d.asin for d in client.deals(sel).deals][:100]
    # Drive the balance negative the way production did (an expensive /product call).
    while client.last_status is not None and client.last_status.tokens_left > 0:
        client.products(asins, ProductOptions(offers=100))
    deficit = client.last_status.tokens_left
    assert deficit <= 0
    with pytest.raises(NotEnoughTokens) as ei:
        client.deals(sel)
    err = ei.value
    assert err.status is not None and err.status.tokens_left == deficit and err.status.tokens_consumed == 0
    assert seen[-1] == err.status and clock.slept_ms == []  # the client itself never waits
    exact = retry_after_ms(err, clock.now_ms(), need=1, margin_ms=0)
    assert exact > 0
    # One millisecond early is still a (free) 429; the formula is exact against the simulator's bucket.
    clock.advance(exact - 1)
    with pytest.raises(NotEnoughTokens):
        client.deals(sel)
    clock.advance(1)
    page = client.deals(sel)  # the same request, now served
    assert page.status.tokens_consumed == 5 and len(page.deals) > 0


def test_429_then_default_margin_wait(client: KeepaClient, clock: ManualClock) -> None:
    sel = DealSelection()
    asins = [d.asin for d in client.deals(sel).deals][:100]
    while client.last_status is not None and client.last_status.tokens_left > 0:
        client.products(asins, ProductOptions(offers=100))
    with pytest.raises(NotEnoughTokens) as ei:
        client.deals(sel)
    clock.sleep_ms(retry_after_ms(ei.value, clock.now_ms()))  # as the token budget would
    assert client.deals(sel).status.tokens_consumed == 5


def test_injected_faults(client: KeepaClient, sim: KeepaSimulator, clock: ManualClock) -> None:
    sim.inject("server_error", count=2, endpoint="token")
    assert client.token_status().tokens_left == 300
    assert client.stats.retries["token"] == 2 and len(clock.slept_ms) == 2
    sim.inject("truncated", count=1, endpoint="deal")
    with pytest.raises(ResponseLost):  # paid and maybe charged: not retried inside the call
        client.deals(DealSelection())
    assert client.stats.transient["truncated_json"] + client.stats.transient["incomplete_body"] == 1
    assert len(client.deals(DealSelection()).deals) > 0
    sim.inject("malformed", count=1, endpoint="deal")
    with pytest.raises(MalformedPayload):
        client.deals(DealSelection())
    assert client.stats.retries["deal"] == 0  # neither the truncated nor the malformed page was retried
