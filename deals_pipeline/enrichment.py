"""Turning a chunk of deals into stored rows: the one path both the backfill and the upserter use.

1. Plan (free): ASINs already stored at this version are skipped; the viability rules, applied
   to fields the deal page already carries, decide which of the rest are worth a paid /product call.
2. Fetch (paid): one /product request through the shared token budget.
3. Commit: the caller upserts the rows and settles the spend inside its own transaction, together
   with its own progress (a chunk's done mark, or the upsert watermark).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import duckdb
import pandas as pd

from deals_pipeline.budget import BudgetDeadline, CostEstimate, Priority, Reservation, Thresholds, TokenBudget
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import ConfigError, MalformedPayload, ResponseLost
from deals_pipeline.keepa.models import Deal, Product, ProductPage, TokenStatus
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.storage import Database
from deals_pipeline.storage.repository import Viability, deal_rows, stored_deals, upsert_deals, utcnow
from deals_pipeline.storage.spool import PaidSpool, SpoolEntry

log = logging.getLogger(__name__)


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
    """What /product returned for a chunk: its own responses and the spooled ones it replays.

    ``settlements`` are the responses whose ledger rows the chunk's commit settles; ``entries`` the
    spool files that commit consumes; ``tokens`` what those responses' envelopes say was charged.
    """

    products: dict[str, Product] = field(default_factory=dict)
    settlements: list[tuple[Reservation, TokenStatus]] = field(default_factory=list)
    entries: list[SpoolEntry] = field(default_factory=list)
    tokens: int = 0
    replayed: int = 0  #: spool entries reused instead of paying again

    @property
    def status(self) -> TokenStatus | None:
        return self.settlements[-1][1] if self.settlements else None

    def by_asin(self) -> dict[str, Product]:
        return dict(self.products)

    def absorb(self, entry: SpoolEntry, *, replayed: bool = False) -> None:
        """Take one spooled response's products and settlement."""
        payload = entry.payload
        for obj in payload.get("products") or []:
            try:
                product = Product.from_json(obj)
            except MalformedPayload:
                continue  # reported as missing by the caller, fetched again
            self.products.setdefault(product.asin, product)
        status = _status_from(payload.get("status"))
        reservation = _reservation_from(payload.get("reservation"))
        if status is not None:
            self.tokens += status.tokens_consumed
            if reservation is not None:
                self.settlements.append((reservation, status))
        self.entries.append(entry)
        if replayed:
            self.replayed += 1


def _status_from(obj: Any) -> TokenStatus | None:
    if not obj:
        return None
    return TokenStatus.from_envelope(obj)


def _status_to(status: TokenStatus | None) -> dict[str, Any] | None:
    if status is None:
        return None
    return {**status.to_envelope(), "tokensConsumed": status.tokens_consumed}


def _reservation_from(obj: Any) -> Reservation | None:
    if not obj:
        return None
    return Reservation(**{**obj, "priority": Priority(int(obj["priority"]))})


#: A /product answer lost in transit (ResponseLost) is not retried blindly: what arrived is kept and
#: only the missing ASINs are requested again, at most this many times per chunk.
MAX_LOST_REREQUESTS = 2


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
        spool: PaidSpool | None = None,
    ) -> None:
        self.db = db
        #: Paid responses are staged here before any database work (default: beside the DB file).
        self.spool = spool if spool is not None else PaidSpool.beside(db.path)
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

    def split_limit(self, limits: Thresholds) -> int:
        """Largest worst-case cost one request may plan: the spending rule's ceiling for this priority
        (``cap - upsert_reserve + max_deficit`` for the backfill), so even a request whose every offer
        page is found leaves the balance at or above ``-max_deficit``."""
        reserve = limits.upsert_reserve if self.priority == Priority.BACKFILL else 0
        return max(1, min(limits.cap, limits.cap - reserve + limits.max_deficit))

    def requests_for(self, asins: Sequence[str], limits: Thresholds) -> list[list[str]]:
        """Split ``asins`` so every request stays affordable within the bucket (HAZARDS #9/#44/#48).

        ``limits``: the policy at the live refill rate (``budget.thresholds()``). Sized from the
        WORST-case cost (every offer page found), not the calibrated average: a 42-ASIN request
        predicted at 7 per ASIN once cost 408 tokens and took the balance to -113, past
        ``max_deficit``. A chunk of 4 always fits in one request.
        """
        if not asins:
            return []
        limit = self.split_limit(limits)
        per_asin = max(1, self.budget.costs.worst_case_products(1, self.options))
        if per_asin * len(asins) <= limit:
            return [list(asins)]
        per_request = max(1, limit // per_asin)
        return [list(asins[i : i + per_request]) for i in range(0, len(asins), per_request)]

    def _cost_for(self, batch: Sequence[str], split: bool, limits: Thresholds) -> CostEstimate:
        estimate = self.predicted_cost(len(batch), cap=limits.cap)
        if not split:
            return estimate
        # A split request reserves its worst case, so the plan never goes past max_deficit.
        worst = self.budget.costs.worst_case_products(len(batch), self.options)
        return dataclasses.replace(estimate, tokens=max(int(estimate), worst))

    def _spool_payload(self, batch: Sequence[str], status: TokenStatus | None, reservation: Reservation | None,
                       products: list[dict], deals: Sequence[Deal] | None, detail: str) -> dict[str, Any]:
        # Only deals whose product arrived: an orphaned entry then stores complete rows, and the rest
        # are selected (and paid for) again rather than stored unenriched.
        wanted = set(batch) & {p.get("asin") for p in products if isinstance(p, dict)}
        return {
            "kind": "product",
            "detail": detail,
            "asins": list(batch),
            "status": _status_to(status),
            "reservation": None if reservation is None else {**asdict(reservation), "priority": int(reservation.priority)},
            "products": products,
            "deals": [d.raw for d in deals if d.asin in wanted] if deals else [],
        }

    def fetch(self, asins: Sequence[str], *, deadline_ms: int | None, detail: str, scope: str,
              deals: Sequence[Deal] | None = None) -> FetchedProducts:
        """Pay for /product, spooling every response before any database work.

        Unconsumed spool entries of ``scope`` (an earlier run paid, then could not commit) are replayed
        first; only ASINs none of them holds are requested. ``deals`` (the upserter's) are spooled with
        the products so an orphaned entry can be committed on its own. Raises BudgetDeadline (what was
        bought so far stays spooled) or a KeepaError.
        """
        fetched = FetchedProducts()
        for entry in self.spool.entries(scope):
            fetched.absorb(entry, replayed=True)
        if fetched.replayed:
            log.info("%s: replaying %d spooled paid response(s) instead of paying again", detail, fetched.replayed)
        remaining = [a for a in asins if a not in fetched.products]
        limits = self.budget.thresholds()
        queue = self.requests_for(remaining, limits)
        split = len(queue) > 1
        lost = 0
        while queue:
            batch = queue.pop(0)

            def spool_response(page: ProductPage, reservation: Reservation, batch: list[str] = batch) -> None:
                entry = self.spool.append(scope, self._spool_payload(
                    batch, page.status, reservation, list(page.raw.get("products") or []), deals, detail))
                fetched.absorb(entry)

            try:
                self.budget.call(
                    lambda batch=batch: self.client.products(batch, self.options),
                    cost=self._cost_for(batch, split, limits),
                    purpose="product",
                    priority=self.priority,
                    deadline_ms=deadline_ms,
                    detail=detail,
                    settle_now=False,
                    on_result=spool_response,
                )
            except ResponseLost as err:
                # The budget has settled it from a salvaged envelope, or recorded it as unknown (re-based
                # by the next envelope). Keep what arrived; ask again only for what is missing.
                if err.partial_products or err.status is not None:
                    entry = self.spool.append(scope, self._spool_payload(
                        batch, None, None, err.partial_products, deals, detail))
                    fetched.absorb(entry)
                    if err.status is not None:
                        fetched.tokens += err.status.tokens_consumed
                missing = [a for a in batch if a not in fetched.products]
                lost += 1
                if missing and lost <= MAX_LOST_REREQUESTS:
                    log.warning("%s: response lost in transit (%d of %d products arrived); requesting the %d"
                                " missing", detail, len(batch) - len(missing), len(batch), len(missing))
                    queue.insert(0, missing)
                    continue
                raise
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
        """Upsert the rows and settle the spend on ``con`` (inside the caller's transaction).

        Call :meth:`consumed` once that transaction has committed, to delete the spool entries."""
        new, updated = upsert_deals(con, self.rows(plan, fetched))
        for reservation, status in fetched.settlements:
            self.budget.settle(reservation, status.tokens_consumed, status, con=con)
        return new, updated

    def consumed(self, fetched: FetchedProducts) -> None:
        """The commit holding ``fetched`` is durable: its spool entries are no longer needed."""
        self.spool.consume(fetched.entries)

    def settle_unstored(self, fetched: FetchedProducts, con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Record the spend of responses whose rows are not committed yet (a failed chunk); their
        spool entries stay for the rerun (settling again later is a no-op)."""
        for reservation, status in fetched.settlements:
            self.budget.settle(reservation, status.tokens_consumed, status, con=con)

    def replay_orphans(self, scope_prefix: str) -> tuple[int, int, int]:
        """Commit spooled responses that carry their own deals (the upserter's) and were never stored:
        (entries, new, updated). Each entry commits alone and is consumed after its commit."""
        entries = total_new = total_updated = 0
        for scope in self.spool.scopes(scope_prefix):
            for entry in self.spool.entries(scope):
                deals = []
                for raw in entry.payload.get("deals") or []:
                    try:
                        deals.append(Deal.from_json(raw))
                    except MalformedPayload:
                        continue
                fetched = FetchedProducts()
                fetched.absorb(entry, replayed=True)
                with self.db.transaction() as con:
                    plan = self.plan(deals, con)
                    new, updated = self.commit(con, plan, fetched)
                self.consumed(fetched)
                entries += 1
                total_new += new
                total_updated += updated
        if entries:
            log.info("stored %d spooled paid response(s) from an earlier run: %d new, %d updated deals",
                     entries, total_new, total_updated)
        return entries, total_new, total_updated


__all__ = ["BudgetDeadline", "ChunkEnricher", "ChunkPlan", "FetchedProducts", "ViabilityRules"]
