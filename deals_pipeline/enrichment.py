"""Turning a chunk of deals into stored rows: the one path both the backfill and the upserter use.

1. Plan (free): ASINs already stored at this version are skipped; the viability rules, applied
   to fields the deal page already carries, decide which of the rest are worth a paid /product call.
2. Fetch (paid): one /product request through the shared token budget.
3. Commit: the caller upserts the rows and settles the spend inside its own transaction, together
   with its own progress (a chunk's done mark, or the upsert watermark).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import duckdb
import pandas as pd

from deals_pipeline.budget import BudgetDeadline, CostEstimate, Priority, Reservation, Thresholds, TokenBudget
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import ConfigError
from deals_pipeline.keepa.models import Deal, Product, ProductPage, TokenStatus
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.storage import Database
from deals_pipeline.storage.repository import Viability, deal_rows, stored_deals, upsert_deals, utcnow


@dataclass(frozen=True)
class ViabilityRules:
    """Free pre-filter on deal-page fields (HAZARDS H5, #43, #45): only viable deals get a paid call.

    Values are cents (prices) and percent; ``None`` disables a rule. The defaults pass every deal that
    has a current price of the queried type, so nothing is dropped unless the operator says so.
    """

    require_price: bool = True
    min_delta_percent: int | None = None
    min_price: int | None = None
    max_price: int | None = None
    max_sales_rank: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_delta_percent", "min_price", "max_price", "max_sales_rank"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"viability rule {name} must be >= 0, got {value}")
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise ConfigError("viability rules: min_price is above max_price")

    def judge(self, deal: Deal, price_type: int) -> Viability:
        price = deal.price(price_type)
        if price is None:
            return Viability(not self.require_price, None if not self.require_price else "no current price")
        if self.min_price is not None and price < self.min_price:
            return Viability(False, f"price {price} < {self.min_price}")
        if self.max_price is not None and price > self.max_price:
            return Viability(False, f"price {price} > {self.max_price}")
        if self.min_delta_percent is not None:
            drop = deal.delta_percent[3][price_type] if len(deal.delta_percent) > 3 else 0
            if drop < self.min_delta_percent:
                return Viability(False, f"90-day drop {drop}% < {self.min_delta_percent}%")
        if self.max_sales_rank is not None:
            rank = deal.price(3)
            if rank is None or rank > self.max_sales_rank:
                return Viability(False, f"sales rank {rank} above {self.max_sales_rank}")
        return Viability(True)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ChunkPlan:
    """What a chunk needs: which ASINs to pay for and which are free."""

    deals: list[Deal]
    to_fetch: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    filtered: list[str] = field(default_factory=list)
    viability: dict[str, Viability] = field(default_factory=dict)


@dataclass
class FetchedProducts:
    """What /product returned for a chunk: one response, or several when the chunk had to be split."""

    pages: list[ProductPage] = field(default_factory=list)
    reservations: list[Reservation] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(p.status.tokens_consumed for p in self.pages)

    @property
    def status(self) -> TokenStatus | None:
        return self.pages[-1].status if self.pages else None

    def by_asin(self) -> dict[str, Product]:
        return {p.asin: p for page in self.pages for p in page.products}

    def raw(self) -> dict[str, Any]:
        """One response body holding every product (for staging), with the total tokensConsumed."""
        merged = dict(self.pages[-1].raw)
        merged["products"] = [p for page in self.pages for p in page.raw.get("products", [])]
        merged["tokensConsumed"] = self.tokens
        return merged

    @classmethod
    def from_staged(cls, body: dict[str, Any]) -> "FetchedProducts":
        return cls([ProductPage.from_response(body)], [])


class ChunkEnricher:
    """Plans, pays for and builds the rows of one chunk of deals."""

    def __init__(
        self,
        db: Database,
        client: KeepaClient,
        budget: TokenBudget,
        *,
        options: ProductOptions,
        rules: ViabilityRules,
        price_type: int,
        domain_id: int,
        source: str,
        origin: str,
        priority: Priority,
    ) -> None:
        self.db = db
        self.client = client
        self.budget = budget
        self.options = options
        self.rules = rules
        self.price_type = price_type
        self.domain_id = domain_id
        self.source = source
        self.origin = origin
        self.priority = priority

    @classmethod
    def for_selection(cls, db: Database, client: KeepaClient, budget: TokenBudget, selection: "DealSelection", *,
                      options: ProductOptions, rules: ViabilityRules, source: str, origin: str,
                      priority: Priority) -> "ChunkEnricher":
        """The enricher for deals of ``selection`` (its price type and domain)."""
        return cls(db, client, budget, options=options, rules=rules, price_type=selection.price_types[0],
                   domain_id=selection.domain_id, source=source, origin=origin, priority=priority)

    def plan(self, deals: Sequence[Deal], con: duckdb.DuckDBPyConnection | None = None) -> ChunkPlan:
        """Free: decide per ASIN (already stored at this version / filtered / to fetch)."""
        if con is None:
            with self.db.connect() as own:
                stored = stored_deals(own, [d.asin for d in deals])
        else:
            stored = stored_deals(con, [d.asin for d in deals])
        plan = ChunkPlan(deals=list(deals))
        for deal in deals:
            known = stored.get(deal.asin)
            if known is not None and known.covers(deal.last_update):
                plan.fresh.append(deal.asin)
                continue
            verdict = self.rules.judge(deal, self.price_type)
            plan.viability[deal.asin] = verdict
            (plan.to_fetch if verdict.viable else plan.filtered).append(deal.asin)
        return plan

    def predicted_cost(self, asin_count: int, *, cap: int | None = None) -> CostEstimate:
        """Predicted /product cost of ``asin_count`` ASINs (clamped to ``cap``, or to the live cap if None)."""
        return self.budget.costs.products(asin_count, self.options, cap=cap)

    def requests_for(self, asins: Sequence[str], limits: Thresholds) -> list[list[str]]:
        """Split ``asins`` so every request stays affordable within the bucket (HAZARDS #9/#44/#48).

        ``limits``: the policy at the live refill rate (``budget.thresholds()``). A chunk of 4 always
        fits; a configured chunk too big for the learned refill rate (say 100 ASINs with offers at
        5/min) is split instead of driving the balance hundreds of tokens negative.
        """
        per_request = len(asins)
        if int(self.predicted_cost(len(asins), cap=limits.cap)) * 2 > limits.cap:
            per_request = self.budget.max_asins_affordable(self.options, self.priority, max_asins=len(asins),
                                                           thresholds=limits)
        return [list(asins[i : i + per_request]) for i in range(0, len(asins), max(1, per_request))]

    def fetch(self, asins: Sequence[str], *, deadline_ms: int | None, detail: str) -> FetchedProducts:
        """Pay for /product. Raises BudgetDeadline (nothing spent) or a KeepaError."""
        fetched = FetchedProducts()
        if not asins:
            return fetched
        limits = self.budget.thresholds()
        for batch in self.requests_for(asins, limits):
            page, reservation = self.budget.call(
                lambda batch=batch: self.client.products(batch, self.options),
                cost=self.predicted_cost(len(batch), cap=limits.cap),
                purpose="product",
                priority=self.priority,
                deadline_ms=deadline_ms,
                detail=detail,
                settle_now=False,
            )
            fetched.pages.append(page)
            fetched.reservations.append(reservation)
        return fetched

    def rows(self, plan: ChunkPlan, fetched: FetchedProducts) -> pd.DataFrame:
        """Rows for the fetched and filtered deals (fresh ones are already stored)."""
        keep = set(plan.to_fetch) | set(plan.filtered)
        return deal_rows(
            [d for d in plan.deals if d.asin in keep],
            domain_id=self.domain_id,
            price_type=self.price_type,
            source=self.source,
            origin=self.origin,
            seen_at=utcnow(),
            products=fetched.by_asin(),
            viability=plan.viability,
        )

    def commit(self, con: duckdb.DuckDBPyConnection, plan: ChunkPlan, fetched: FetchedProducts) -> tuple[int, int]:
        """Upsert the rows and settle the spend on ``con`` (inside the caller's transaction)."""
        new, updated = upsert_deals(con, self.rows(plan, fetched))
        for page, reservation in zip(fetched.pages, fetched.reservations):
            self.budget.settle(reservation, page.status.tokens_consumed, page.status, con=con)
        return new, updated


__all__ = ["BudgetDeadline", "ChunkEnricher", "ChunkPlan", "FetchedProducts", "ViabilityRules"]
