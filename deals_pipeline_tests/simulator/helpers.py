"""Helpers for the simulator tests (real HTTP to a running simulator)."""

from __future__ import annotations

import json
from typing import Any

import requests

from deals_pipeline.keepa.models import TokenStatus
from deals_pipeline.simulator import KeepaSimulator

START_MS = 1_757_873_538_842  # the b3f7397 sample's page-0 timestamp
ENVELOPE_KEYS = {
    "timestamp",
    "tokensLeft",
    "refillIn",
    "refillRate",
    "tokenFlowReduction",
    "tokensConsumed",
    "processingTimeInMs",
}


def selection(page_no: int = 0, **over: Any) -> dict[str, Any]:
    """A valid selection; ``over`` replaces fields (``page="0"`` sends a string on purpose)."""
    sel: dict[str, Any] = {"page": page_no, "domainId": 1, "priceTypes": [2], "sortType": 1, "dateRange": 3}
    sel.update(over)
    return sel


class Api:
    """Thin HTTP helper around a running simulator (one keep-alive session)."""

    def __init__(self, sim: KeepaSimulator, key: str) -> None:
        self.sim = sim
        self.key = key
        self.session = requests.Session()

    def get(self, endpoint: str, timeout: float = 10, **params: Any) -> requests.Response:
        params.setdefault("key", self.key)
        return self.session.get(f"{self.sim.base_url}/{endpoint}", params=params, timeout=timeout)

    def deal(self, page_no: int = 0, *, timeout: float = 10, **over: Any) -> requests.Response:
        return self.get("deal", timeout=timeout, selection=json.dumps(selection(page_no, **over)))

    def product(self, asins: list[str] | str, timeout: float = 10, **params: Any) -> requests.Response:
        asin = asins if isinstance(asins, str) else ",".join(asins)
        return self.get("product", timeout=timeout, domain=1, asin=asin, **params)

    def token(self) -> requests.Response:
        return self.get("token")

    def close(self) -> None:
        self.session.close()


def assert_envelope(body: dict[str, Any], now_ms: int | None = None, consumed: int | None = None) -> None:
    """Every response kind carries the full Keepa envelope."""
    missing = ENVELOPE_KEYS - body.keys()
    assert not missing, f"envelope fields missing: {missing}"
    status = TokenStatus.from_envelope(body)
    assert 0 < status.refill_in_ms <= 60_000
    assert body["tokenFlowReduction"] == 0.0
    assert isinstance(body["tokensLeft"], int) and isinstance(body["tokensConsumed"], int)
    if now_ms is not None:
        assert body["timestamp"] == now_ms
    if consumed is not None:
        assert body["tokensConsumed"] == consumed
