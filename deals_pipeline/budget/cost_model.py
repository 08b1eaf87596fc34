"""Predict what a Keepa request costs, and calibrate the prediction from what the server charged.

Static table (KEEPA_API.md §3.4):

* ``/deal`` page: 5 (empty pages too); ``/token``: 0.
* ``/product`` per ASIN: with ``offers`` (20..100): 6 per offer page found, at most ``ceil(offers/10)``
  pages; the *expected* prediction assumes 1 page. Without ``offers``: 1.
  Extras per ASIN: ``rating`` +1, ``buybox`` +2 (ignored with ``offers``), ``stock`` +2, ``update=0`` +1.
  ``stats``/``history``/``days``/``only_live_offers`` are free.

Calibration: every ledger row records ``units`` (ASINs, pages) and a ``cost_key`` built from the
cost-relevant options (e.g. ``product|offers=20|rating``). The per-unit prediction for a key is an
EWMA (alpha 0.3, last 50 answered rows, seeded with the static value) of ``actual / units``.
Predictions never exceed the bucket cap for a single request; use :meth:`CostModel.max_asins_affordable`
to shrink a batch that could never be afforded (HAZARDS #44/#48).

Options may be a ``ProductOptions`` dataclass, any object with those attribute names, or a dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from deals_pipeline.budget.policy import Priority, Thresholds
from deals_pipeline.clock import Clock

DEAL_PAGE_COST = 5
TOKEN_COST = 0
OFFER_PAGE_COST = 6
OFFERS_PER_PAGE = 10
MAX_ASINS_PER_REQUEST = 100

EWMA_ALPHA = 0.3
EWMA_WINDOW = 50


@dataclass(frozen=True)
class CostEstimate:
    """A predicted request cost. Pass it as ``cost=`` to ``acquire``/``call`` so the ledger records
    units and key (calibration). ``int(estimate)`` is the token count."""

    tokens: int
    units: int
    key: str
    per_unit: float
    calibrated: bool = False
    clamped: bool = False  #: the raw prediction exceeded the cap and was cut to it

    def __int__(self) -> int:
        return self.tokens


def _opt(options: Any, name: str, default: Any = None) -> Any:
    if options is None:
        return default
    if isinstance(options, Mapping):
        for k in (name, name.replace("_", "-")):
            if k in options:
                return options[k]
        return default
    return getattr(options, name, default)


def _flag(v: Any) -> bool:
    return bool(v) and v is not False


@dataclass(frozen=True)
class ProductCostShape:
    """Static per-ASIN cost of one /product option set."""

    key: str
    expected: int  #: per ASIN, assuming one offer page
    worst: int  #: per ASIN, every offer page found


def product_cost_shape(options: Any) -> ProductCostShape:
    """Per-ASIN static cost of ``options`` (see module docstring)."""
    offers = _opt(options, "offers")
    rating = _flag(_opt(options, "rating"))
    buybox = _flag(_opt(options, "buybox"))
    stock = _flag(_opt(options, "stock"))
    update = _opt(options, "update")
    update0 = update is not None and not isinstance(update, bool) and int(update) == 0
    extra = (1 if rating else 0) + (2 if stock else 0) + (1 if update0 else 0)
    parts = ["product"]
    if offers:
        offers = int(offers)
        pages_max = max(1, math.ceil(offers / OFFERS_PER_PAGE))
        expected = OFFER_PAGE_COST + extra
        worst = OFFER_PAGE_COST * pages_max + extra
        parts.append(f"offers={offers}")
    else:
        expected = worst = 1 + extra + (2 if buybox else 0)
        if buybox:
            parts.append("buybox")
    if rating:
        parts.append("rating")
    if stock:
        parts.append("stock")
    if update0:
        parts.append("update0")
    return ProductCostShape(key="|".join(parts), expected=expected, worst=worst)


class CostLedger(Protocol):
    """Where answered requests' real costs are read from (``TokenBudget`` is one)."""

    def answered_costs(self, cost_key: str, limit: int) -> list[tuple[int, int]]:
        """(actual, units) of the newest ``limit`` answered requests for ``cost_key``, oldest first."""


class CostModel:
    """Predictions for one budget: calibrated from its ledger, clamped to its live cap.

    Args:
        ledger: the calibration source (the budget's ledger).
        clock: the timeline the calibration cache expires on.
        limits: the policy at the live refill rate (one read of the shared state); used only when a
            caller does not pass ``cap=`` / ``thresholds=`` it already holds.
    """

    #: How long (timeline ms) a calibration read is reused. Every DuckDB open costs tens of ms and the
    #: EWMA moves slowly, so re-reading the ledger before every request would only add latency.
    CACHE_MS = 120_000

    def __init__(self, ledger: CostLedger, clock: Clock, limits: Callable[[], Thresholds]) -> None:
        self.ledger = ledger
        self.clock = clock
        self.limits = limits
        self._cache: dict[str, tuple[int, float, int]] = {}

    # -- calibration -------------------------------------------------------------------------

    def observed_per_unit(self, key: str, prior: float) -> tuple[float, int]:
        """(EWMA of actual/units for ``key`` seeded with ``prior``, number of samples); cached CACHE_MS."""
        now = self.clock.now_ms()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self.CACHE_MS:
            return cached[1], cached[2]
        value, n = self._read_per_unit(key, prior)
        self._cache[key] = (now, value, n)
        return value, n

    def invalidate(self, key: str | None) -> None:
        """Forget a cached calibration (this process just recorded a real cost for ``key``)."""
        self._cache.pop(key, None) if key is not None else self._cache.clear()

    def _read_per_unit(self, key: str, prior: float) -> tuple[float, int]:
        rows = self.ledger.answered_costs(key, EWMA_WINDOW)
        value = float(prior)
        for actual, units in rows:
            value = EWMA_ALPHA * (actual / units) + (1 - EWMA_ALPHA) * value
        return value, len(rows)

    def _estimate(self, key: str, units: int, prior: float, cap: int | None) -> CostEstimate:
        per_unit, n = self.observed_per_unit(key, prior) if units > 0 else (prior, 0)
        tokens = math.ceil(units * per_unit - 1e-9) if units > 0 else 0
        clamped = False
        cap = self.limits().cap if cap is None else cap
        if cap > 0 and tokens > cap:
            tokens, clamped = cap, True
        return CostEstimate(tokens=max(0, tokens), units=units, key=key, per_unit=per_unit, calibrated=n > 0, clamped=clamped)

    # -- predictions -------------------------------------------------------------------------

    def deal_pages(self, pages: int = 1, *, cap: int | None = None) -> CostEstimate:
        """/deal: 5 per page (calibrated per page under key ``deal_page``)."""
        return self._estimate("deal_page", int(pages), DEAL_PAGE_COST, cap)

    def token_status(self) -> CostEstimate:
        """/token is free."""
        return CostEstimate(tokens=TOKEN_COST, units=0, key="token", per_unit=0.0)

    def products(self, asins: int, options: Any, *, cap: int | None = None) -> CostEstimate:
        """/product for ``asins`` ASINs with ``options`` (calibrated per ASIN under the options' key)."""
        shape = product_cost_shape(options)
        return self._estimate(shape.key, int(asins), shape.expected, cap)

    def worst_case_products(self, asins: int, options: Any) -> int:
        """Upper bound from the static table (every offer page found)."""
        return int(asins) * product_cost_shape(options).worst

    def max_asins_affordable(
        self,
        options: Any,
        priority: Priority | int = Priority.BACKFILL,
        *,
        max_asins: int = MAX_ASINS_PER_REQUEST,
        thresholds: Thresholds | None = None,
    ) -> int:
        """Largest batch (1..max_asins) whose predicted cost the spending rule can ever allow.

        A call may start at most at the cap; with the controlled deficit a BACKFILL call of ``c``
        needs ``max(threshold + 1, c - max_deficit) + upsert_reserve <= cap``, and no prediction may
        exceed the cap. Always at least 1. ``thresholds``: the live limits if the caller holds them.
        """
        th = thresholds if thresholds is not None else self.limits()
        reserve = th.upsert_reserve if Priority(priority) == Priority.BACKFILL else 0
        limit = min(th.cap, th.cap - reserve + th.max_deficit)
        shape = product_cost_shape(options)
        per_unit, _ = self.observed_per_unit(shape.key, shape.expected)
        if per_unit <= 0:
            return max(1, int(max_asins))
        n = int(math.floor((limit + 1e-9) / per_unit))
        # ceil() in the prediction can push n * per_unit over the limit by < 1 token.
        while n > 1 and math.ceil(n * per_unit - 1e-9) > limit:
            n -= 1
        return max(1, min(int(max_asins), n))

    # -- two-stage enrichment (issue 10) --------------------------------------------------------

    def per_asin(self, options: Any) -> float:
        """Calibrated tokens per ASIN for ``options`` (EWMA of tokensConsumed, static prior)."""
        shape = product_cost_shape(options)
        return self.observed_per_unit(shape.key, shape.expected)[0]

    def two_stage_per_candidate(self, stage1_options: Any, stage2_options: Any, pass_rate: float) -> float:
        """Expected tokens per candidate deal when stage 1 screens and only ``pass_rate`` of the
        candidates get stage 2: ``stage1 + pass_rate * stage2`` (each calibrated per ASIN)."""
        rate = min(1.0, max(0.0, float(pass_rate)))
        return self.per_asin(stage1_options) + rate * self.per_asin(stage2_options)

    def per_viable_deal(self, stage1_options: Any | None, stage2_options: Any, pass_rate: float) -> float:
        """Expected tokens per deal that survives the stats rules and is enriched.

        Single stage (``stage1_options`` None) buys offers for every candidate and keeps ``pass_rate``
        of them: ``stage2 / pass_rate``. Two stages: ``(stage1 + pass_rate * stage2) / pass_rate``.
        """
        rate = min(1.0, max(1e-9, float(pass_rate)))
        if stage1_options is None:
            return self.per_asin(stage2_options) / rate
        return self.two_stage_per_candidate(stage1_options, stage2_options, rate) / rate
