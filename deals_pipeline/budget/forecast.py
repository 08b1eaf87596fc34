"""How many tokens the remaining work needs and when the refill will have paid for it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from deals_pipeline.budget.cost_model import CostModel
from deals_pipeline.budget.state import Projection
from deals_pipeline.keepa.models import REFILL_PERIOD_MS


@dataclass(frozen=True)
class Forecast:
    """Tokens still needed and the time until the learned refill covers them (from the current projection)."""

    tokens_needed: int
    eta_ms: int | None  #: None = never (refill rate 0)
    refill_rate: int
    balance: int
    cap: int
    pages: int = 0
    asins: int = 0

    @property
    def eta(self) -> timedelta | None:
        return None if self.eta_ms is None else timedelta(milliseconds=self.eta_ms)


def eta_ms_for(tokens_needed: int, balance: int, refill_rate: int, next_refill_ms: int, now_ms: int) -> int | None:
    """ms until ``balance`` plus once-a-minute refills of ``refill_rate`` reach ``tokens_needed``.

    Assumes the work spends as it goes (so no refill is lost at the cap). None when never.
    """
    shortfall = int(tokens_needed) - int(balance)
    if shortfall <= 0:
        return 0
    if refill_rate <= 0:
        return None
    refills = math.ceil(shortfall / refill_rate)
    first = max(0, int(next_refill_ms) - int(now_ms))
    return first + (refills - 1) * REFILL_PERIOD_MS


def forecast_for(proj: Projection, costs: CostModel, pages_remaining: int, asins_remaining: int,
                 options: Any, *, stage1_options: Any | None = None, stage1_pass_rate: float = 1.0) -> Forecast:
    """Forecast for ``pages_remaining`` /deal pages and ``asins_remaining`` /product ASINs with ``options``
    from the projection ``proj`` (priced without the per-request cap clamp, so no clamp hides cost).

    Two-stage enrichment (``stage1_options`` set): every ASIN pays stage 1, and ``stage1_pass_rate``
    of them pay ``options`` (stage 2), each stage calibrated from tokensConsumed."""
    pages = max(0, int(pages_remaining))
    asins = max(0, int(asins_remaining))
    tokens = costs.deal_pages(pages, cap=10**12).tokens if pages else 0
    if asins and stage1_options is not None:
        tokens += costs.products(asins, stage1_options, cap=10**12).tokens
        survivors = math.ceil(asins * min(1.0, max(0.0, stage1_pass_rate)) - 1e-9)
        tokens += costs.products(survivors, options, cap=10**12).tokens if survivors else 0
    elif asins:
        tokens += costs.products(asins, options, cap=10**12).tokens
    eta = eta_ms_for(tokens, proj.balance, proj.refill_rate, proj.next_refill_ms, proj.as_of_ms)
    return Forecast(
        tokens_needed=tokens, eta_ms=eta, refill_rate=proj.refill_rate, balance=proj.balance, cap=proj.cap,
        pages=pages, asins=asins,
    )
