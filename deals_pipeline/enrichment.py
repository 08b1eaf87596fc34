"""Turning a chunk of deals into stored rows: the one path both the backfill and the upserter use.

Every deal of a paid /deal page is already in ``deals`` (lossless discovery, committed with the page)
and a newer lastUpdate refreshed its deal-page fields for free. What is left here is what to BUY:

1. Plan (free): an enriched deal is bought again only when the :class:`EnrichmentPolicy` says so
   (enrichment older than ``reenrich_after_hours`` or the watched price moved by at least
   ``reenrich_price_change_pct``); the viability rules judge the rest on deal-page fields.
2. Stage 1 (paid, ~1 token/ASIN), only when a :class:`StatsRules` rule is set: /product without
   offers; the stats rules the deal page cannot answer reject deals before their offers are bought.
   Its results commit on their own (with their spend), so a kill before stage 2 never re-buys them.
3. Stage 2 (paid, ~6-13 tokens/ASIN): /product with the configured options for the survivors.
4. Commit: the caller writes the rows and settles the spend inside its own transaction, together
   with its own progress (a chunk's done mark, or the upsert watermark).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import duckdb
import pandas as pd

from deals_pipeline.budget import BudgetDeadline, CostEstimate, Priority, Reservation, Thresholds, TokenBudget
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import ConfigError, MalformedPayload, ResponseLost
from deals_pipeline.keepa.models import Deal, Product, ProductPage, TokenStatus
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.storage import Database
from deals_pipeline.storage.repository import (
    Stage1Result, StoredDeal, Viability, deal_rows, record_stage1, stored_deals, upsert_deals,
)
from deals_pipeline.storage.spool import PaidSpool, SpoolEntry

log = logging.getLogger(__name__)

#: Keepa's COUNT_USED price type: the used-offer count in ``current`` / ``stats.current``.
COUNT_USED = 12


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


@dataclass(frozen=True)
class StatsRules:
    """Stage-1 rules on /product stats the deal page does not carry (issue 10). ``None`` disables a rule;
    stage 1 runs only when at least one is set.

    ``max_out_of_stock_pct90`` reads ``outOfStockPercentage90`` at the query's price type (the share of
    the last 90 days without an offer of that type: a thin market).
    """

    min_sales_rank_drops90: int | None = None
    max_sales_rank: int | None = None
    min_used_offer_count: int | None = None
    max_out_of_stock_pct90: int | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"stats rule {name} must be an int >= 0, got {value!r}")
        if self.max_out_of_stock_pct90 is not None and self.max_out_of_stock_pct90 > 100:
            raise ConfigError(f"stats rule max_out_of_stock_pct90 is a percentage, got {self.max_out_of_stock_pct90}")

    @property
    def active(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def judge(self, product: Product, price_type: int) -> Viability:
        """Unknown values (no stats) fail a rule that needs them: the rule cannot vouch for the deal."""
        if self.min_sales_rank_drops90 is not None:
            drops = product.sales_rank_drops90
            if drops is None or drops < self.min_sales_rank_drops90:
                return Viability(False, f"sales rank drops (90 d) {drops} < {self.min_sales_rank_drops90}")
        if self.max_sales_rank is not None:
            rank = product.sales_rank
            if rank is None or rank > self.max_sales_rank:
                return Viability(False, f"sales rank {rank} above {self.max_sales_rank}")
        if self.min_used_offer_count is not None:
            used = product.stat_current(COUNT_USED)
            if used is None or used < self.min_used_offer_count:
                return Viability(False, f"used offers {used} < {self.min_used_offer_count}")
        if self.max_out_of_stock_pct90 is not None:
            oos = product.out_of_stock_pct90(price_type)
            if oos is None or oos > self.max_out_of_stock_pct90:
                return Viability(False, f"out of stock (90 d) {oos}% > {self.max_out_of_stock_pct90}%")
        return Viability(True)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


#: The operators' default stats rule (the Dagster resource's default; the library default is no rule):
#: skip deals whose used offers were out of stock more than half of the last 90 days (a thin market
#: that rarely sells). Measured effect: benchmarks/economics.py.
DEFAULT_STATS_RULES = StatsRules(max_out_of_stock_pct90=50)

#: Defaults of the re-enrichment policy (documented in README "Configuration").
DEFAULT_REENRICH_AFTER_HOURS = 72.0
DEFAULT_REENRICH_PRICE_CHANGE_PCT = 10.0


@dataclass(frozen=True)
class EnrichmentPolicy:
    """When a deal that was already bought is bought again, and what stage 1 checks.

    ``reenrich_after_hours``: an enrichment older than this (timeline hours) is bought again.
    ``reenrich_price_change_pct``: so is one whose watched price (``current[price_type]``) moved by at
    least this many percent since the enrichment. Nothing else re-buys: a newer lastUpdate only
    refreshes the deal-page fields, for free. ``stage1_rating`` adds ``rating`` (+1 token) to stage 1.
    """

    reenrich_after_hours: float = DEFAULT_REENRICH_AFTER_HOURS
    reenrich_price_change_pct: float = DEFAULT_REENRICH_PRICE_CHANGE_PCT
    stats_rules: StatsRules = field(default_factory=StatsRules)
    stage1_rating: bool = False

    def __post_init__(self) -> None:
        if not self.reenrich_after_hours > 0:
            raise ConfigError(f"reenrich_after_hours must be > 0, got {self.reenrich_after_hours}")
        if not self.reenrich_price_change_pct > 0:
            raise ConfigError(f"reenrich_price_change_pct must be > 0, got {self.reenrich_price_change_pct}")

    def stale_reason(self, bought_at_ms: int | None, bought_price: int | None, price_now: int | None,
                     now_ms: int) -> str | None:
        """Why a purchase made at ``bought_at_ms`` for ``bought_price`` must be made again; None: it holds."""
        if bought_at_ms is None:
            return "never bought"
        age_h = (now_ms - bought_at_ms) / 3_600_000
        if age_h >= self.reenrich_after_hours:
            return f"enrichment {age_h:.1f} h old >= {self.reenrich_after_hours:g} h"
        if bought_price is not None and price_now is not None and bought_price > 0:
            moved = abs(price_now - bought_price) * 100.0 / bought_price
            if moved >= self.reenrich_price_change_pct:
                return f"price moved {moved:.1f}% >= {self.reenrich_price_change_pct:g}%"
        elif (bought_price is None) != (price_now is None):
            return "watched price appeared or vanished"
        return None

    def reenrich_reason(self, stored: StoredDeal, now_ms: int) -> str | None:
        """For an enriched deal: why to buy it again, or None (the refresh stays free)."""
        return self.stale_reason(stored.enriched_at_ms, stored.enriched_price, stored.current_price, now_ms)

    def stage1_holds(self, stored: StoredDeal | None, now_ms: int) -> bool:
        """A stored stage-1 result still answers for the deal (same staleness rule as enrichment)."""
        return (stored is not None and stored.stage1_at_ms is not None
                and self.stale_reason(stored.stage1_at_ms, stored.stage1_price, stored.current_price, now_ms) is None)

    def stage1_options(self, options: ProductOptions) -> ProductOptions:
        """Stage 1: the configured request without offers (stats only, ~1 token/ASIN; HAZARDS H5)."""
        return ProductOptions(stats=options.stats or 90, offers=None, history=False, days=None,
                              rating=self.stage1_rating, buybox=False, update=options.update)


@dataclass
class ChunkPlan:
    """What a chunk needs: which ASINs to pay for and which are free."""

    deals: list[Deal]
    to_fetch: list[str] = field(default_factory=list)      #: stage 2 (offers)
    to_screen: list[str] = field(default_factory=list)     #: stage 1 first (stats), then stage 2 if it passes
    fresh: list[str] = field(default_factory=list)         #: nothing to buy (policy holds, or a verdict stands)
    filtered: list[str] = field(default_factory=list)      #: a free deal-page rule said no
    screened_out: list[str] = field(default_factory=list)  #: stage 1 said no (this run)
    viability: dict[str, Viability] = field(default_factory=dict)
    rebuy_reasons: dict[str, str] = field(default_factory=dict)  #: enriched deals bought again, and why


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
        policy: EnrichmentPolicy | None = None,
        spool: PaidSpool | None = None,
    ) -> None:
        self.policy = policy or EnrichmentPolicy()
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
                      priority: Priority, policy: EnrichmentPolicy | None = None) -> "ChunkEnricher":
        """The enricher for deals of ``selection`` (its price type and domain)."""
        return cls(db, client, budget, options=options, rules=rules, price_type=selection.price_types[0],
                   domain_id=selection.domain_id, source=source, origin=origin, priority=priority, policy=policy)

    @property
    def two_stage(self) -> bool:
        return self.policy.stats_rules.active

    @property
    def stage1_options(self) -> ProductOptions:
        return self.policy.stage1_options(self.options)

    def plan(self, deals: Sequence[Deal], con: duckdb.DuckDBPyConnection | None = None) -> ChunkPlan:
        """Free: decide per ASIN what (if anything) to buy, from the stored row and the policy."""
        if con is None:
            with self.db.connect() as own:
                stored = stored_deals(own, [d.asin for d in deals])
        else:
            stored = stored_deals(con, [d.asin for d in deals])
        now_ms = self.budget.clock.now_ms()
        plan = ChunkPlan(deals=[])
        for deal in deals:
            known = stored.get(deal.asin)
            if known is not None and known.last_update_minute > deal.last_update and known.raw_deal is not None:
                deal = known.deal() or deal  # judge the freshest version (the upserter's, not an old snapshot)
            plan.deals.append(deal)
            if known is not None and known.state == "enriched":
                reason = self.policy.reenrich_reason(known, now_ms)
                if reason is None:
                    plan.fresh.append(deal.asin)
                    continue
                plan.rebuy_reasons[deal.asin] = reason
            elif known is not None and known.state == "filtered" and known.filter_stage == "stats":
                if self.policy.stage1_holds(known, now_ms):
                    plan.fresh.append(deal.asin)
                    continue
            elif known is not None and known.state == "filtered" and known.last_update_minute >= deal.last_update:
                plan.fresh.append(deal.asin)  # a deal-page verdict on this version stands (judged again when it changes)
                continue
            verdict = self.rules.judge(deal, self.price_type)
            if not verdict.viable:
                plan.viability[deal.asin] = verdict
                if known is not None and known.state == "filtered" and known.last_update_minute >= deal.last_update:
                    plan.fresh.append(deal.asin)  # the stored verdict stands
                else:
                    plan.filtered.append(deal.asin)
                continue
            plan.viability[deal.asin] = verdict
            if self.two_stage and not (self.policy.stage1_holds(known, now_ms) and known.stage1_passed):
                plan.to_screen.append(deal.asin)
            else:
                plan.to_fetch.append(deal.asin)
        return plan

    def screen(self, plan: ChunkPlan, *, deadline_ms: int | None, detail: str, scope: str,
               deals: Sequence[Deal] | None = None) -> FetchedProducts:
        """Stage 1: pay for /product without offers for ``plan.to_screen`` (spooled under ``scope`` + "-s1",
        consumed by the caller after :meth:`commit_screen`). Raises BudgetDeadline or KeepaError."""
        return self.fetch(plan.to_screen, deadline_ms=deadline_ms, detail=f"{detail} stage 1", scope=f"{scope}-s1",
                          deals=deals, options=self.stage1_options)

    def commit_screen(self, con: duckdb.DuckDBPyConnection, plan: ChunkPlan, fetched: FetchedProducts) -> list[str]:
        """Store stage-1 verdicts and settle their spend on ``con``; move survivors to ``plan.to_fetch``.

        A screened ASIN the response lacks (malformed) goes on to stage 2 unjudged rather than being
        bought at stage 1 again; stage 2 then has the full picture.
        """
        now_ms = self.budget.clock.now_ms()
        products = fetched.by_asin()
        deals = {d.asin: d for d in plan.deals}
        results: list[Stage1Result] = []
        survivors: list[str] = []
        for asin in plan.to_screen:
            product = products.get(asin)
            if product is None:
                survivors.append(asin)
                continue
            verdict = self.policy.stats_rules.judge(product, self.price_type)
            deal = deals[asin]
            results.append(Stage1Result(
                asin=asin, at_ms=now_ms, version_minute=max(int(deal.last_update), int(product.last_update or 0)),
                passed=verdict.viable, reason=verdict.reason, watched_price=deal.price(self.price_type),
                sales_rank=product.sales_rank, sales_rank_drops90=product.sales_rank_drops90,
                used_offer_count=product.stat_current(COUNT_USED),
                out_of_stock_pct90=product.out_of_stock_pct90(self.price_type), raw=product.raw,
            ))
            if verdict.viable:
                survivors.append(asin)
            else:
                plan.screened_out.append(asin)
                plan.viability[asin] = verdict
        # Rows first (a screened deal the page-discovery did not store yet), then the verdicts.
        upsert_deals(con, self._rows([d for d in plan.deals if d.asin in set(plan.to_screen)], {}, {}))
        record_stage1(con, results)
        for reservation, status in fetched.settlements:
            self.budget.settle(reservation, status.tokens_consumed, status, con=con)
        plan.to_screen = []
        plan.to_fetch.extend(survivors)
        return survivors

    def predicted_cost(self, asin_count: int, options: ProductOptions | None = None, *,
                       cap: int | None = None) -> CostEstimate:
        """Predicted /product cost of ``asin_count`` ASINs with ``options`` (stage 2 by default), clamped
        to ``cap`` (or to the live cap if None)."""
        return self.budget.costs.products(asin_count, options or self.options, cap=cap)

    def expected_cost_per_deal(self) -> float:
        """Expected tokens to enrich one candidate deal: stage 1 plus stage 2 times the measured stage-1
        pass rate when two-stage, else the single-stage cost (calibrated per stage from tokensConsumed)."""
        if not self.two_stage:
            return self.budget.costs.products(1, self.options).per_unit
        return self.budget.costs.two_stage_per_candidate(self.stage1_options, self.options, self.stage1_pass_rate())

    def stage1_pass_rate(self) -> float:
        return stage1_pass_rate(self.db)

    def split_limit(self, limits: Thresholds) -> int:
        """Largest worst-case cost one request may plan: the spending rule's ceiling for this priority
        (``cap - upsert_reserve + max_deficit`` for the backfill), so even a request whose every offer
        page is found leaves the balance at or above ``-max_deficit``."""
        reserve = limits.upsert_reserve if self.priority == Priority.BACKFILL else 0
        return max(1, min(limits.cap, limits.cap - reserve + limits.max_deficit))

    def requests_for(self, asins: Sequence[str], limits: Thresholds, options: ProductOptions | None = None) -> list[list[str]]:
        """Split ``asins`` so every request stays affordable within the bucket (HAZARDS #9/#44/#48).

        ``limits``: the policy at the live refill rate (``budget.thresholds()``). Sized from the
        WORST-case cost (every offer page found), not the calibrated average: a 42-ASIN request
        predicted at 7 per ASIN once cost 408 tokens and took the balance to -113, past
        ``max_deficit``. A chunk of 4 always fits in one request.
        """
        options = options or self.options
        if not asins:
            return []
        limit = self.split_limit(limits)
        per_asin = max(1, self.budget.costs.worst_case_products(1, options))
        if per_asin * len(asins) <= limit:
            return [list(asins)]
        per_request = max(1, limit // per_asin)
        return [list(asins[i : i + per_request]) for i in range(0, len(asins), per_request)]

    def _cost_for(self, batch: Sequence[str], split: bool, limits: Thresholds, options: ProductOptions) -> CostEstimate:
        estimate = self.predicted_cost(len(batch), options, cap=limits.cap)
        if not split:
            return estimate
        # A split request reserves its worst case, so the plan never goes past max_deficit.
        worst = self.budget.costs.worst_case_products(len(batch), options)
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
              deals: Sequence[Deal] | None = None, options: ProductOptions | None = None) -> FetchedProducts:
        """Pay for /product (stage 2 unless ``options`` says otherwise), spooling every response before
        any database work.

        Unconsumed spool entries of ``scope`` (an earlier run paid, then could not commit) are replayed
        first; only ASINs none of them holds are requested. ``deals`` (the upserter's) are spooled with
        the products so an orphaned entry can be committed on its own. Raises BudgetDeadline (what was
        bought so far stays spooled) or a KeepaError.
        """
        options = options or self.options
        fetched = FetchedProducts()
        for entry in self.spool.entries(scope):
            fetched.absorb(entry, replayed=True)
        if fetched.replayed:
            log.info("%s: replaying %d spooled paid response(s) instead of paying again", detail, fetched.replayed)
        remaining = [a for a in asins if a not in fetched.products]
        limits = self.budget.thresholds()
        queue = self.requests_for(remaining, limits, options)
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
                    lambda batch=batch: self.client.products(batch, options),
                    cost=self._cost_for(batch, split, limits, options),
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

    def _rows(self, deals: Sequence[Deal], products: dict[str, Product], viability: dict[str, Viability]) -> pd.DataFrame:
        now_ms = self.budget.clock.now_ms()
        return deal_rows(deals, domain_id=self.domain_id, price_type=self.price_type, source=self.source,
                         origin=self.origin, seen_at=datetime.fromtimestamp(now_ms / 1000, timezone.utc),
                         seen_ms=now_ms, products=products, viability=viability)

    def discovery_rows(self, deals: Sequence[Deal]) -> pd.DataFrame:
        """Deal-page rows (state 'discovered') for every deal of a paid /deal page."""
        return self._rows(deals, {}, {})

    def rows(self, plan: ChunkPlan, fetched: FetchedProducts) -> pd.DataFrame:
        """Rows for the fetched and filtered deals (fresh ones are already stored)."""
        keep = set(plan.to_fetch) | set(plan.filtered)
        return self._rows([d for d in plan.deals if d.asin in keep], fetched.by_asin(), plan.viability)

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
            if scope.endswith("-s1"):
                # Stage-1 screens (no offers) are not rows on their own: an orphaned one is dropped and the
                # deal screened again (a stage-1 /product costs ~1-2 tokens per ASIN).
                stale = self.spool.entries(scope)
                if stale:
                    log.warning("dropping %d orphaned stage-1 screen response(s) of %s", len(stale), scope)
                self.spool.consume(stale)
                continue
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


def stage1_pass_rate(db: Database) -> float:
    """Share of stage-1 verdicts that passed (last 500 judged deals; 1.0 before any: the pessimistic prior)."""
    with db.connect() as con:
        row = con.execute(
            "SELECT count(*), count(*) FILTER (stage1_passed) FROM (SELECT stage1_passed FROM deals "
            "WHERE stage1_at_ms IS NOT NULL ORDER BY stage1_at_ms DESC LIMIT 500)"
        ).fetchone()
    return 1.0 if not row[0] else row[1] / row[0]


def two_stage_forecast(db: Database, policy: EnrichmentPolicy, options: ProductOptions) -> dict[str, Any]:
    """Keyword arguments that make ``TokenBudget.forecast`` price two-stage enrichment (empty for single stage)."""
    if not policy.stats_rules.active:
        return {}
    return {"stage1_options": policy.stage1_options(options), "stage1_pass_rate": stage1_pass_rate(db)}


__all__ = ["BudgetDeadline", "ChunkEnricher", "ChunkPlan", "EnrichmentPolicy", "FetchedProducts", "StatsRules",
           "ViabilityRules"]
