"""KeepaClient over real HTTP on 127.0.0.1 against a scripted server (no mocks of requests)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import (
    ConfigError,
    InvalidRequest,
    MalformedPayload,
    NotEnoughTokens,
    PaymentRequired,
    RequestRejected,
    ResponseLost,
    RetriesExhausted,
    TransientKeepaError,
)
from deals_pipeline.keepa.models import DealPage, ProductPage, TokenStatus, retry_after_ms
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline_tests.keepa.http_fixture import Reply, ScriptedServer, refused_url

KEY = "testkey0123456789"
ENVELOPE = {"processingTimeInMs": 1, "refillIn": 4718, "refillRate": 5, "timestamp": 1758340069890,
            "tokenFlowReduction": 0.0, "tokensConsumed": 0, "tokensLeft": 300}


def make_client(base_url: str, **kw: Any) -> tuple[KeepaClient, ManualClock, list[TokenStatus]]:
    clock = ManualClock()
    seen: list[TokenStatus] = []
    kw.setdefault("max_attempts", 3)
    kw.setdefault("timeout_s", (1.0, 2.0))
    client = KeepaClient(KEY, base_url=base_url, clock=clock, on_status=seen.append, **kw)
    return client, clock, seen


def test_deal_page_success(server: ScriptedServer, first_page_bytes: bytes) -> None:
    server.script(Reply(200, first_page_bytes))
    client, clock, seen = make_client(server.url)
    sel = DealSelection(sort_type=4, include_categories=(283155,), current_range=(2000, 30100))
    page = client.deals(sel.with_page(0))
    assert isinstance(page, DealPage) and len(page.deals) == 150 and not page.is_last
    assert [s.tokens_left for s in seen] == [295] and client.last_status == page.status
    hit = server.hits[0]
    assert hit.path == "/deal" and hit.query["key"] == [KEY]
    sent = json.loads(hit.query["selection"][0])
    assert sent == sel.to_json()
    for k in ("page", "domainId", "sortType", "dateRange"):
        assert type(sent[k]) is int
    assert type(sent["priceTypes"][0]) is int
    assert "domain" not in hit.query
    assert clock.slept_ms == []
    assert client.stats.attempts["deal"] == 1 and client.stats.retries["deal"] == 0
    assert client.stats.successes["deal"] == 1 and client.stats.tokens_consumed["deal"] == 5


def test_empty_last_page(server: ScriptedServer, last_page_bytes: bytes) -> None:
    server.script(Reply(200, last_page_bytes))
    client, _, _ = make_client(server.url)
    page = client.deals(DealSelection(page=6))
    assert page.is_last and page.deals == () and page.page == 6 and page.status.tokens_consumed == 5


def test_429_raises_not_enough_tokens_at_once(server: ScriptedServer, body_429: bytes) -> None:
    server.script(Reply(429, body_429))
    client, clock, seen = make_client(server.url)
    with pytest.raises(NotEnoughTokens) as ei:
        client.deals(DealSelection())
    err = ei.value
    assert err.http_status == 429 and err.status is not None and err.status.tokens_left == -249
    assert seen == [err.status]  # the budget hears about the 429's envelope too
    assert len(server.hits) == 1 and clock.slept_ms == []  # no waiting, no retry inside the client
    assert retry_after_ms(err, err.status.timestamp_ms, need=1, margin_ms=0) == 2_985_592
    assert "-249" in str(err)


def test_429_without_envelope_still_not_enough_tokens(server: ScriptedServer) -> None:
    server.script(Reply(429, b"Too Many Requests", content_type="text/plain"))
    client, _, seen = make_client(server.url)
    with pytest.raises(NotEnoughTokens) as ei:
        client.token_status()
    assert ei.value.status is None and seen == []


@pytest.mark.parametrize(
    "code, exc_type",
    [(400, RequestRejected), (404, RequestRejected), (405, RequestRejected), (401, RequestRejected),
     (402, PaymentRequired)],
)
def test_client_errors_are_typed_and_not_retried(server: ScriptedServer, code: int, exc_type: type) -> None:
    server.script(Reply(code, dict(ENVELOPE, error={"type": "x"})))
    client, clock, seen = make_client(server.url)
    with pytest.raises(exc_type) as ei:
        client.deals(DealSelection())
    assert ei.value.http_status == code and ei.value.status == seen[0]
    assert not isinstance(ei.value, TransientKeepaError)
    assert len(server.hits) == 1 and clock.slept_ms == []
    assert client.stats.errors[exc_type.__name__] == 1


def _html() -> bytes:
    return b"<html><body><h1>502 Bad Gateway</h1></body></html>"


TRANSIENT = {
    "http_500": lambda page: Reply(500, dict(ENVELOPE, tokensConsumed=0)),
    "http_503": lambda page: Reply(503, _html(), content_type="text/html"),
    "truncated_json": lambda page: Reply(200, page[: len(page) // 2]),
    "non_json": lambda page: Reply(200, _html(), content_type="text/html"),
    "incomplete_body": lambda page: Reply(200, page[:1000], declared_length=len(page)),
    "timeout": lambda page: Reply(200, page, delay_s=0.6),
}


@pytest.mark.parametrize("kind", sorted(TRANSIENT))
def test_transient_failures_retried_and_bounded(server: ScriptedServer, first_page_bytes: bytes,
                                                kind: str) -> None:
    """On the free /token endpoint every transient failure is retried, bounded."""
    make_reply = TRANSIENT[kind]
    server.script(*[make_reply(first_page_bytes) for _ in range(5)])
    client, clock, seen = make_client(server.url, max_attempts=3, timeout_s=(1.0, 0.2),
                                      backoff_base_ms=500, backoff_cap_ms=30_000)
    with pytest.raises(RetriesExhausted) as ei:
        client.token_status()
    err = ei.value
    assert err.attempts == 3 and isinstance(err.last, TransientKeepaError)
    assert len(server.hits) == 3  # bounded: exactly max_attempts requests reached the server
    assert client.stats.attempts["token"] == 3 and client.stats.retries["token"] == 2
    assert client.stats.transient[kind] == 3
    # Exponential backoff with jitter (base 500 ms, jitter <= 500 ms), slept on the injected clock.
    assert len(clock.slept_ms) == 2
    assert 500 <= clock.slept_ms[0] <= 1000 and 1000 <= clock.slept_ms[1] <= 1500
    if kind == "http_500":
        assert len(seen) == 3 and err.status is not None  # parseable 5xx envelopes are published
        assert err.http_status == 500
    else:
        assert seen == []


@pytest.mark.parametrize("kind", sorted(set(TRANSIENT) - {"http_500"}))
def test_paid_request_that_may_be_charged_is_not_retried(server: ScriptedServer, first_page_bytes: bytes,
                                                         kind: str) -> None:
    """A paid request whose answer was lost after it was sent is never repeated inside one reservation:
    the server may have charged it (issue 13: retries were invisible to the ledger)."""
    server.script(*[TRANSIENT[kind](first_page_bytes) for _ in range(3)])
    client, clock, _ = make_client(server.url, max_attempts=3, timeout_s=(1.0, 0.2))
    with pytest.raises(ResponseLost) as ei:
        client.deals(DealSelection())
    assert ei.value.maybe_charged and len(server.hits) == 1 and clock.slept_ms == []
    assert client.stats.attempts["deal"] == 1 and client.stats.retries["deal"] == 0


def test_paid_5xx_with_envelope_retried_and_charges_summed(server: ScriptedServer, first_page_bytes: bytes) -> None:
    """A 5xx that carries an envelope says what it cost: retried, and the result's tokensConsumed is
    the sum over the attempts, so one reservation settles every charge."""
    server.script(Reply(500, dict(ENVELOPE, tokensConsumed=2)), Reply(503, dict(ENVELOPE, tokensConsumed=1)),
                  Reply(200, first_page_bytes))
    client, clock, seen = make_client(server.url, max_attempts=3)
    page = client.deals(DealSelection())
    single = json.loads(first_page_bytes)["tokensConsumed"]
    assert len(server.hits) == 3 and page.status.tokens_consumed == single + 3
    assert len(seen) == 3 and seen[-1].tokens_left == 295


def test_truncated_product_body_keeps_complete_products(server: ScriptedServer) -> None:
    """A truncated /product body: the complete products at its head are salvaged, the rest missing."""
    products = [{"asin": f"B00000000{i}", "title": "x" * 50, "csv": [[1, 2]] * 20} for i in range(4)]
    body = json.dumps({"products": products, **dict(ENVELOPE, tokensConsumed=24)}).encode()
    server.script(Reply(200, body[: int(len(body) * 0.6)]))
    client, _, _ = make_client(server.url)
    with pytest.raises(ResponseLost) as ei:
        client.products([p["asin"] for p in products], ProductOptions())
    kept = [p["asin"] for p in ei.value.partial_products]
    assert 1 <= len(kept) < 4 and kept == [p["asin"] for p in products[: len(kept)]]
    assert ei.value.status is None  # the envelope comes last in this body: the charge is unknown


def test_connection_refused_retried_and_bounded() -> None:
    client, clock, _ = make_client(refused_url(), max_attempts=4)
    with pytest.raises(RetriesExhausted) as ei:
        client.token_status()
    assert ei.value.attempts == 4 and client.stats.transient["connection_refused"] == 4
    assert client.stats.attempts["token"] == 4 and len(clock.slept_ms) == 3
    assert clock.slept_ms == sorted(clock.slept_ms)  # 500.., 1000.., 2000..


def test_paid_connection_refused_is_retried() -> None:
    """Nothing reached the server: a paid request is retried like any other."""
    client, clock, _ = make_client(refused_url(), max_attempts=3)
    with pytest.raises(RetriesExhausted):
        client.deals(DealSelection())
    assert client.stats.attempts["deal"] == 3


def test_backoff_is_capped(server: ScriptedServer) -> None:
    server.script(*[Reply(500, b"{}") for _ in range(6)])
    client, clock, _ = make_client(server.url, max_attempts=6, backoff_base_ms=1000, backoff_cap_ms=3000)
    with pytest.raises(RetriesExhausted):
        client.token_status()
    assert len(clock.slept_ms) == 5 and max(clock.slept_ms) <= 3000 and clock.slept_ms[-1] == 3000


def test_success_after_two_failures(server: ScriptedServer, first_page_bytes: bytes) -> None:
    server.script(Reply(503, _html()), Reply(200, first_page_bytes[:500]), Reply(200, first_page_bytes))
    client, clock, seen = make_client(server.url, max_attempts=3)
    page = client.token_status()
    assert page.tokens_left == 295 and len(server.hits) == 3 and len(clock.slept_ms) == 2
    assert client.stats.retries["token"] == 2 and client.stats.successes["token"] == 1
    assert [s.tokens_left for s in seen] == [295]


@pytest.mark.parametrize(
    "body",
    [
        dict(ENVELOPE, deals=[]),  # wrong type for deals
        dict(ENVELOPE, deals={"dr": "nope"}),
        [1, 2, 3],  # JSON but not an object
        {"deals": {"dr": []}},  # no envelope
    ],
)
def test_malformed_payload_not_retried(server: ScriptedServer, body: Any) -> None:
    server.script(Reply(200, body), Reply(200, body))
    client, clock, seen = make_client(server.url)
    with pytest.raises(MalformedPayload) as ei:
        client.deals(DealSelection())
    assert len(server.hits) == 1 and clock.slept_ms == []
    if isinstance(body, dict) and "timestamp" in body:
        assert ei.value.status is not None and seen == [ei.value.status]  # tokens were spent: publish
    else:
        assert seen == []


def test_on_status_sees_429_then_200(server: ScriptedServer, body_429: bytes) -> None:
    server.script(Reply(429, body_429), Reply(200, ENVELOPE))
    client, _, seen = make_client(server.url)
    with pytest.raises(NotEnoughTokens):
        client.token_status()
    status = client.token_status()
    assert [s.tokens_left for s in seen] == [-249, 300] and status == seen[-1]
    assert server.hits[1].path == "/token" and server.hits[1].query == {"key": [KEY]}


def test_products_request(server: ScriptedServer, product_objects: dict[str, dict]) -> None:
    body = dict(ENVELOPE, tokensConsumed=12, products=list(product_objects.values()))
    server.script(Reply(200, body))
    client, _, seen = make_client(server.url, domain=1)
    page = client.products(["1886940606", "055299068X", "1886940606"], ProductOptions(stats=365))
    assert isinstance(page, ProductPage) and [p.asin for p in page.products] == list(product_objects)
    q = server.hits[0].query
    assert server.hits[0].path == "/product"
    assert q["asin"] == ["1886940606,055299068X"] and q["domain"] == ["1"]
    assert q["only-live-offers"] == ["1"] and "only_live_offers" not in q
    assert q["offers"] == ["20"] and q["stats"] == ["365"] and q["history"] == ["0"] and q["rating"] == ["1"]
    assert seen[0].tokens_consumed == 12 and client.stats.tokens_consumed["product"] == 12


@pytest.mark.parametrize(
    "asins",
    [[], "B0031S36JA", ["b0031s36ja"], ['="0006120725"'], ["B0031S36JA", "TOO-SHORT"],
     [f"B{i:09d}" for i in range(101)]],
)
def test_products_validated_before_sending(server: ScriptedServer, asins: Any) -> None:
    client, _, _ = make_client(server.url)
    with pytest.raises(InvalidRequest):
        client.products(asins, ProductOptions())
    assert server.hits == []


def test_hundred_asins_is_fine(server: ScriptedServer) -> None:
    server.script(Reply(200, dict(ENVELOPE, products=[])))
    client, _, _ = make_client(server.url)
    client.products([f"B{i:09d}" for i in range(100)], ProductOptions(offers=None))
    assert len(server.hits[0].query["asin"][0].split(",")) == 100


def test_selection_domain_must_match_client(server: ScriptedServer) -> None:
    client, _, _ = make_client(server.url, domain=3)
    with pytest.raises(InvalidRequest, match="domain"):
        client.deals(DealSelection(domain_id=1))
    assert server.hits == []


def test_from_env() -> None:
    with pytest.raises(ConfigError, match="KEEPA_API_KEY"):
        KeepaClient.from_env({})
    with pytest.raises(ConfigError, match="KEEPA_API_KEY"):
        KeepaClient.from_env({"KEEPA_API_KEY": "   "})
    with pytest.raises(ConfigError, match="KEEPA_DOMAIN"):
        KeepaClient.from_env({"KEEPA_API_KEY": KEY, "KEEPA_DOMAIN": "0"})
    with pytest.raises(ConfigError, match="KEEPA_DOMAIN"):
        KeepaClient.from_env({"KEEPA_API_KEY": KEY, "KEEPA_DOMAIN": "us"})
    c = KeepaClient.from_env({"KEEPA_API_KEY": f" {KEY} "})
    assert c.base_url == "https://api.keepa.com" and c.domain == 1
    c = KeepaClient.from_env({"KEEPA_API_KEY": KEY, "KEEPA_API_BASE_URL": "http://127.0.0.1:9/",
                              "KEEPA_DOMAIN": "3"}, max_attempts=2)
    assert c.base_url == "http://127.0.0.1:9" and c.domain == 3 and c.max_attempts == 2
    assert KEY not in repr(c) and "***" in repr(c)


def test_constructor_validation() -> None:
    with pytest.raises(ConfigError):
        KeepaClient("")
    with pytest.raises(ConfigError):
        KeepaClient(KEY, base_url="ftp://x")
    with pytest.raises(ConfigError):
        KeepaClient(KEY, max_attempts=0)
    with pytest.raises(ConfigError):
        KeepaClient(KEY, domain=13)


class _ClosingRecorder(requests.Session):
    """A session that records how often it was closed."""

    closes = 0

    def close(self) -> None:
        self.closes += 1
        super().close()


def test_uses_given_session(server: ScriptedServer) -> None:
    server.script(Reply(200, ENVELOPE))
    session = _ClosingRecorder()
    session.headers["User-Agent"] = "deals-pipeline-test"
    with KeepaClient(KEY, base_url=server.url, session=session, clock=ManualClock()) as client:
        assert client.token_status().tokens_left == 300
    # The client did not close a session it does not own; its owner does.
    assert session.closes == 0
    session.close()
    assert session.closes == 1

