"""Reads and writes of the pipeline's tables. Writes are vectorised (one DataFrame per statement).

Every function takes an open connection so callers can put several writes in ONE transaction
(a chunk's rows, its done mark and its token spend commit together).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import duckdb
import pandas as pd

from deals_pipeline.keepa.keepa_time import keepa_minute_to_datetime
from deals_pipeline.keepa.models import Deal, Product
from deals_pipeline.storage.schema import DEAL_PAGE_PRICE_TYPES, DEAL_PAGE_SUFFIXES

_BASE_COLUMNS = [
    "asin", "domain_id", "title", "price_type", "current_price", "avg90_price", "delta90",
    "delta_percent90", "current_amazon", "current_new", "current_used", "sales_rank", "categories",
    "root_cat", "image_url", "warehouse_condition", "sales_rank_drops30", "sales_rank_drops90",
    "creation_date", "last_update", "last_update_minute", "viability", "filter_reason",
    "product_title", "product_sales_rank", "product_used_price", "product_total_offers",
    "product_live_offers", "product_last_update", "enriched_at", "enriched_minute", "raw_deal",
    "raw_product", "first_seen", "last_seen", "source", "origin",
]
#: The per-price-type deal-page columns (schema v3), e.g. ``used_current``, ``used_delta_pct90``.
PRICE_TYPE_COLUMNS = [f"{prefix}_{suffix}" for prefix, _ in DEAL_PAGE_PRICE_TYPES for suffix in DEAL_PAGE_SUFFIXES]
_STAGE1_COLUMNS = [
    "stage1_at_ms", "stage1_minute", "stage1_passed", "stage1_price", "stats_sales_rank",
    "stats_sales_rank_drops90", "stats_used_offer_count", "stats_out_of_stock_pct90", "raw_stage1",
]
DEAL_COLUMNS = _BASE_COLUMNS + PRICE_TYPE_COLUMNS + [
    "state", "filter_stage", "first_seen_ms", "last_seen_ms", "enriched_at_ms", "enriched_price",
] + _STAGE1_COLUMNS

#: Columns that come from the deal page: refreshed in place (free) when a newer lastUpdate is seen.
DEAL_PAGE_COLUMNS = [
    "domain_id", "title", "price_type", "current_price", "avg90_price", "delta90", "delta_percent90",
    "current_amazon", "current_new", "current_used", "sales_rank", "categories", "root_cat", "image_url",
    "warehouse_condition", "sales_rank_drops30", "sales_rank_drops90", "creation_date", "last_update",
    "last_update_minute", "raw_deal", "source", "origin",
] + PRICE_TYPE_COLUMNS
#: Columns a /product purchase (stage 2) writes; never erased by a row without one.
ENRICHMENT_COLUMNS = [
    "product_title", "product_sales_rank", "product_used_price", "product_total_offers", "product_live_offers",
    "product_last_update", "enriched_at", "enriched_minute", "raw_product", "enriched_at_ms", "enriched_price",
]
#: The verdict columns: replaced by any row that carries a verdict (state other than 'discovered').
VERDICT_COLUMNS = ["state", "viability", "filter_reason", "filter_stage"]

DealState = str  # 'discovered' | 'enriched' | 'filtered'


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _value(seq: Sequence[int], index: int) -> int | None:
    """A price/rank from a Keepa array; None for missing entries and the -1/-2 sentinels."""
    if index >= len(seq):
        return None
    value = seq[index]
    return None if value is None or value < 0 else int(value)


def _interval_value(grid: Sequence[Sequence[int]], interval: int, index: int) -> int | None:
    if interval >= len(grid):
        return None
    row = grid[interval]
    if index >= len(row):
        return None
    return int(row[index])


@dataclass(frozen=True)
class Viability:
    viable: bool
    reason: str | None = None


def enrichment_version(deal: Deal, product: Product | None) -> int:
    """The version an enrichment covers: the newer of the deal's and the product's lastUpdate (issue 10),
    so a deal the backfill enriched is not bought again when the newer listing surfaces."""
    if product is None or product.last_update is None:
        return int(deal.last_update)
    return max(int(deal.last_update), int(product.last_update))


def _price_type_fields(deal: Deal) -> dict[str, int | None]:
    fields: dict[str, int | None] = {}
    for prefix, index in DEAL_PAGE_PRICE_TYPES:
        fields[f"{prefix}_current"] = _value(deal.current, index)
        fields[f"{prefix}_avg90"] = _interval_value(deal.avg, 3, index)
        fields[f"{prefix}_delta90"] = _interval_value(deal.delta, 3, index)
        fields[f"{prefix}_delta_pct90"] = _interval_value(deal.delta_percent, 3, index)
    return fields


def deal_rows(
    deals: Iterable[Deal],
    *,
    domain_id: int,
    price_type: int,
    source: str,
    origin: str,
    seen_at: datetime,
    products: Mapping[str, Product] | None = None,
    viability: Mapping[str, Viability] | None = None,
    seen_ms: int | None = None,
    filter_stage: str = "deal_page",
) -> pd.DataFrame:
    """Deals (+ optional /product enrichment) as a DataFrame in the ``deals`` table's layout.

    A deal without a product and without a verdict is a discovery row (state 'discovered'); with a
    product it is 'enriched'; with a negative verdict 'filtered'. ``seen_ms`` is the timeline time
    (the injected clock) the re-enrichment policy computes ages from; it defaults to ``seen_at``.
    """
    products = products or {}
    viability = viability or {}
    seen_ms = int(seen_at.timestamp() * 1000) if seen_ms is None else int(seen_ms)
    records: list[dict[str, Any]] = []
    for deal in deals:
        product = products.get(deal.asin)
        verdict = viability.get(deal.asin)
        if product is not None:
            state = "enriched"
        elif verdict is not None and not verdict.viable:
            state = "filtered"
        else:
            state = "discovered"
        watched = _value(deal.current, price_type)
        record = {
            "asin": deal.asin,
            "domain_id": domain_id,
            "title": deal.title_text,
            "price_type": price_type,
            "current_price": watched,
            "avg90_price": _interval_value(deal.avg, 3, price_type),
            "delta90": _interval_value(deal.delta, 3, price_type),
            "delta_percent90": _interval_value(deal.delta_percent, 3, price_type),
            "current_amazon": _value(deal.current, 0),
            "current_new": _value(deal.current, 1),
            "current_used": _value(deal.current, 2),
            "sales_rank": _value(deal.current, 3),
            "categories": [int(c) for c in deal.categories],
            "root_cat": int(deal.root_cat),
            "image_url": deal.image_url,
            "warehouse_condition": int(deal.warehouse_condition),
            "sales_rank_drops30": int(deal.sales_rank_drops30),
            "sales_rank_drops90": int(deal.sales_rank_drops90),
            "creation_date": keepa_minute_to_datetime(deal.creation_date),
            "last_update": keepa_minute_to_datetime(deal.last_update),
            "last_update_minute": int(deal.last_update),
            "viability": "filtered" if state == "filtered" else "viable",
            "filter_reason": verdict.reason if state == "filtered" and verdict is not None else None,
            "product_title": product.title if product else None,
            "product_sales_rank": product.sales_rank if product else None,
            "product_used_price": product.used_price if product else None,
            "product_total_offers": product.total_offer_count if product else None,
            "product_live_offers": product.live_offer_count if product else None,
            "product_last_update": (
                keepa_minute_to_datetime(product.last_update)
                if product is not None and product.last_update is not None
                else None
            ),
            "enriched_at": seen_at if product else None,
            "enriched_minute": enrichment_version(deal, product) if product else None,
            "raw_deal": json.dumps(deal.raw, separators=(",", ":")),
            "raw_product": json.dumps(product.raw, separators=(",", ":")) if product else None,
            "first_seen": seen_at,
            "last_seen": seen_at,
            "source": source,
            "origin": origin,
            "state": state,
            "filter_stage": filter_stage if state == "filtered" else None,
            "first_seen_ms": seen_ms,
            "last_seen_ms": seen_ms,
            "enriched_at_ms": seen_ms if product else None,
            "enriched_price": watched if product else None,
        }
        record.update(_price_type_fields(deal))
        records.append(record)
    frame = pd.DataFrame.from_records(records, columns=DEAL_COLUMNS)
    for column in ("creation_date", "last_update", "product_last_update", "enriched_at", "first_seen", "last_seen"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    for column in ["first_seen_ms", "last_seen_ms", "enriched_at_ms", "enriched_price", "enriched_minute",
                   "stage1_at_ms", "stage1_minute", "stage1_price", "stats_sales_rank", "stats_sales_rank_drops90",
                   "stats_used_offer_count", "stats_out_of_stock_pct90", *PRICE_TYPE_COLUMNS]:
        frame[column] = frame[column].astype("Int64")
    frame["stage1_passed"] = frame["stage1_passed"].astype("boolean")
    for column in ("raw_stage1", "filter_stage", "state", "filter_reason", "product_title", "raw_product"):
        frame[column] = frame[column].astype("object")
    return frame


@dataclass(frozen=True)
class UpsertCounts:
    """What one write did: rows inserted, rows whose deal-page fields were refreshed (a newer
    lastUpdate, free), and rows only seen again (same or older version: ``last_seen`` moved)."""

    new: int
    refreshed: int
    seen_again: int


def _assignments() -> str:
    newer = "excluded.last_update_minute >= deals.last_update_minute"
    parts = [f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE deals.{c} END" for c in DEAL_PAGE_COLUMNS]
    parts += [f"{c} = CASE WHEN excluded.enriched_at IS NOT NULL THEN excluded.{c} ELSE deals.{c} END"
              for c in ENRICHMENT_COLUMNS]
    parts += [f"{c} = CASE WHEN excluded.stage1_at_ms IS NOT NULL THEN excluded.{c} ELSE deals.{c} END"
              for c in _STAGE1_COLUMNS]
    parts += [f"{c} = CASE WHEN excluded.state <> 'discovered' OR deals.state IS NULL THEN excluded.{c} ELSE deals.{c} END"
              for c in VERDICT_COLUMNS]
    parts += ["last_seen = greatest(deals.last_seen, excluded.last_seen)",
              "last_seen_ms = greatest(deals.last_seen_ms, excluded.last_seen_ms)",
              "inactive_since = NULL"]  # listed again (a deal page or an upsert): active (lifecycle.py)
    return ", ".join(parts)


def write_deals(con: duckdb.DuckDBPyConnection, frame: pd.DataFrame) -> UpsertCounts:
    """Insert or update deals in one statement (the one write path for discovery, verdicts and enrichment).

    * Deal-page fields move forward only: an incoming version older than the stored one (by lastUpdate)
      leaves them alone, so the backfill's older snapshot cannot overwrite what the upserter stored.
      A newer version refreshes them in place: the free refresh, no /product call.
    * Enrichment and stage-1 results are only replaced by new ones, never erased by a row without.
    * A discovery row (state 'discovered') never overwrites a stored verdict or enrichment state.
    * ``last_seen`` always moves forward.
    """
    if frame.empty:
        return UpsertCounts(0, 0, 0)
    # ON CONFLICT cannot touch one row twice in a statement: keep each ASIN's newest version.
    frame = frame.sort_values("last_update_minute", kind="stable").drop_duplicates("asin", keep="last")
    con.register("incoming_deals", frame)
    try:
        existing, refreshed = con.execute(
            "SELECT count(*), count(*) FILTER (i.last_update_minute > d.last_update_minute) "
            "FROM deals d JOIN incoming_deals i USING (asin)"
        ).fetchone()
        # The common case, a deal seen again unchanged, only moves last_seen: a narrow UPDATE instead
        # of the full merge (most of a re-read page is unchanged; the merge evaluates ~100 columns).
        merge = ("i.last_update_minute > d.last_update_minute OR i.enriched_at IS NOT NULL "
                 "OR i.stage1_at_ms IS NOT NULL OR i.state <> 'discovered' OR d.state IS NULL")
        con.execute(
            "UPDATE deals SET last_seen = greatest(deals.last_seen, i.last_seen), "
            "last_seen_ms = greatest(deals.last_seen_ms, i.last_seen_ms), inactive_since = NULL FROM incoming_deals i "
            f"WHERE deals.asin = i.asin AND NOT ({merge.replace('d.', 'deals.')})"
        )
        con.execute(
            f"INSERT INTO deals BY NAME SELECT i.* FROM incoming_deals i LEFT JOIN deals d USING (asin) "
            f"WHERE d.asin IS NULL OR {merge} "
            f"ON CONFLICT (asin) DO UPDATE SET {_assignments()}"
        )
    finally:
        try:
            con.unregister("incoming_deals")
        except duckdb.Error:
            pass  # the transaction already failed: keep the original error, not "transaction aborted"
    return UpsertCounts(len(frame) - int(existing), int(refreshed), int(existing) - int(refreshed))


def upsert_deals(con: duckdb.DuckDBPyConnection, frame: pd.DataFrame) -> tuple[int, int]:
    """:func:`write_deals` as (new, updated): updated counts every stored row the write touched."""
    counts = write_deals(con, frame)
    return counts.new, counts.refreshed + counts.seen_again


@dataclass(frozen=True)
class Stage1Result:
    """What stage 1 (/product without offers) said about one deal, and the version it covers."""

    asin: str
    at_ms: int
    version_minute: int
    passed: bool
    reason: str | None
    watched_price: int | None
    sales_rank: int | None
    sales_rank_drops90: int | None
    used_offer_count: int | None
    out_of_stock_pct90: int | None
    raw: dict


def record_stage1(con: duckdb.DuckDBPyConnection, results: Sequence[Stage1Result]) -> int:
    """Store stage-1 results on their (already discovered) rows; rejected deals become 'filtered'."""
    if not results:
        return 0
    frame = pd.DataFrame.from_records(
        [
            {
                "asin": r.asin, "stage1_at_ms": r.at_ms, "stage1_minute": r.version_minute, "stage1_passed": r.passed,
                "stage1_price": r.watched_price, "stats_sales_rank": r.sales_rank,
                "stats_sales_rank_drops90": r.sales_rank_drops90, "stats_used_offer_count": r.used_offer_count,
                "stats_out_of_stock_pct90": r.out_of_stock_pct90, "reason": r.reason,
                "raw_stage1": json.dumps(r.raw, separators=(",", ":")),
            }
            for r in results
        ]
    )
    for column in ("stage1_at_ms", "stage1_minute", "stage1_price", "stats_sales_rank", "stats_sales_rank_drops90",
                   "stats_used_offer_count", "stats_out_of_stock_pct90"):
        frame[column] = frame[column].astype("Int64")
    frame["reason"] = frame["reason"].astype("object")
    con.register("stage1_results", frame)
    try:
        con.execute(
            "UPDATE deals SET stage1_at_ms = s.stage1_at_ms, stage1_minute = s.stage1_minute, "
            "stage1_passed = s.stage1_passed, stage1_price = s.stage1_price, stats_sales_rank = s.stats_sales_rank, "
            "stats_sales_rank_drops90 = s.stats_sales_rank_drops90, stats_used_offer_count = s.stats_used_offer_count, "
            "stats_out_of_stock_pct90 = s.stats_out_of_stock_pct90, raw_stage1 = s.raw_stage1, "
            "state = CASE WHEN s.stage1_passed THEN (CASE WHEN deals.state = 'filtered' THEN 'discovered' ELSE deals.state END) "
            "ELSE 'filtered' END, "
            "viability = CASE WHEN s.stage1_passed THEN 'viable' ELSE 'filtered' END, "
            "filter_reason = CASE WHEN s.stage1_passed THEN NULL ELSE s.reason END, "
            "filter_stage = CASE WHEN s.stage1_passed THEN NULL ELSE 'stats' END "
            "FROM stage1_results s WHERE deals.asin = s.asin"
        )
    finally:
        try:
            con.unregister("stage1_results")
        except duckdb.Error:
            pass
    return len(results)


@dataclass(frozen=True)
class StoredDeal:
    """What the planner needs to know about a stored deal (the freshest deal-page version and its verdicts)."""

    asin: str
    last_update_minute: int
    enriched_minute: int | None
    viability: str
    state: str = "discovered"
    filter_stage: str | None = None
    current_price: int | None = None
    enriched_at_ms: int | None = None
    enriched_price: int | None = None
    stage1_at_ms: int | None = None
    stage1_minute: int | None = None
    stage1_passed: bool | None = None
    stage1_price: int | None = None
    raw_deal: str | None = None

    def covers(self, last_update_minute: int) -> bool:
        """True when this row holds a verdict or an enrichment for that version (or a newer one)."""
        if self.last_update_minute < last_update_minute:
            return False
        if self.viability == "filtered":
            return True
        return self.enriched_minute is not None and self.enriched_minute >= last_update_minute

    def deal(self) -> Deal | None:
        """The freshest stored deal-page version, parsed (None for rows without one)."""
        return None if self.raw_deal is None else Deal.from_json(json.loads(self.raw_deal))


_STORED_FIELDS = ("asin, last_update_minute, enriched_minute, viability, coalesce(state, 'discovered'), filter_stage, "
                  "current_price, enriched_at_ms, enriched_price, stage1_at_ms, stage1_minute, stage1_passed, "
                  "stage1_price, raw_deal")


def _stored(row: Sequence[Any]) -> StoredDeal:
    ints = [v if v is None or isinstance(v, (str, bool)) else int(v) for v in row]
    return StoredDeal(
        asin=row[0], last_update_minute=int(row[1]), enriched_minute=ints[2], viability=row[3], state=row[4],
        filter_stage=row[5], current_price=ints[6], enriched_at_ms=ints[7], enriched_price=ints[8],
        stage1_at_ms=ints[9], stage1_minute=ints[10], stage1_passed=None if row[11] is None else bool(row[11]),
        stage1_price=ints[12], raw_deal=row[13],
    )


def stored_deals(con: duckdb.DuckDBPyConnection, asins: Sequence[str]) -> dict[str, StoredDeal]:
    if not asins:
        return {}
    rows = con.execute(f"SELECT {_STORED_FIELDS} FROM deals WHERE list_contains(?, asin)", [list(asins)]).fetchall()
    return {r[0]: _stored(r) for r in rows}


def discovered_backlog(con: duckdb.DuckDBPyConnection, *, since_minute: int, exclude: Sequence[str],
                       limit: int) -> list[StoredDeal]:
    """Discovered, not yet judged-out deals with lastUpdate >= ``since_minute``, oldest first: what an
    earlier run saw but could not afford to enrich."""
    rows = con.execute(
        f"SELECT {_STORED_FIELDS} FROM deals WHERE coalesce(state, 'discovered') = 'discovered' "
        "AND last_update_minute >= ? AND NOT list_contains(?, asin) ORDER BY last_update_minute, asin LIMIT ?",
        [int(since_minute), list(exclude), int(limit)],
    ).fetchall()
    return [_stored(r) for r in rows]


def deal_count(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute("SELECT count(*) FROM deals").fetchone()[0])
