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

DEAL_COLUMNS = [
    "asin", "domain_id", "title", "price_type", "current_price", "avg90_price", "delta90",
    "delta_percent90", "current_amazon", "current_new", "current_used", "sales_rank", "categories",
    "root_cat", "image_url", "warehouse_condition", "sales_rank_drops30", "sales_rank_drops90",
    "creation_date", "last_update", "last_update_minute", "viability", "filter_reason",
    "product_title", "product_sales_rank", "product_used_price", "product_total_offers",
    "product_live_offers", "product_last_update", "enriched_at", "enriched_minute", "raw_deal",
    "raw_product", "first_seen", "last_seen", "source", "origin",
]


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
) -> pd.DataFrame:
    """Deals (+ optional /product enrichment) as a DataFrame in the ``deals`` table's layout."""
    products = products or {}
    viability = viability or {}
    records: list[dict[str, Any]] = []
    for deal in deals:
        product = products.get(deal.asin)
        verdict = viability.get(deal.asin, Viability(True))
        records.append(
            {
                "asin": deal.asin,
                "domain_id": domain_id,
                "title": deal.title_text,
                "price_type": price_type,
                "current_price": _value(deal.current, price_type),
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
                "viability": "viable" if verdict.viable else "filtered",
                "filter_reason": verdict.reason,
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
                "enriched_minute": int(deal.last_update) if product else None,
                "raw_deal": json.dumps(deal.raw, separators=(",", ":")),
                "raw_product": json.dumps(product.raw, separators=(",", ":")) if product else None,
                "first_seen": seen_at,
                "last_seen": seen_at,
                "source": source,
                "origin": origin,
            }
        )
    frame = pd.DataFrame.from_records(records, columns=DEAL_COLUMNS)
    for column in ("creation_date", "last_update", "product_last_update", "enriched_at", "first_seen", "last_seen"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


_UPDATABLE = [c for c in DEAL_COLUMNS if c not in ("asin", "first_seen")]
_ENRICHMENT = {
    "product_title", "product_sales_rank", "product_used_price", "product_total_offers",
    "product_live_offers", "product_last_update", "enriched_at", "enriched_minute", "raw_product",
}


def upsert_deals(con: duckdb.DuckDBPyConnection, frame: pd.DataFrame) -> tuple[int, int]:
    """Insert or update deals in one statement. Returns (new, updated).

    A row never goes back in time: an incoming deal older than the stored one (by lastUpdate) is
    ignored, so the backfill's older snapshot cannot overwrite what the upserter stored. Enrichment
    is only replaced by new enrichment, never erased by an unenriched row.
    """
    if frame.empty:
        return 0, 0
    con.register("incoming_deals", frame)
    try:
        existing = con.execute(
            "SELECT count(*) FROM deals WHERE asin IN (SELECT asin FROM incoming_deals)"
        ).fetchone()[0]
        assignments = []
        for column in _UPDATABLE:
            if column in _ENRICHMENT:
                assignments.append(
                    f"{column} = CASE WHEN excluded.enriched_at IS NOT NULL THEN excluded.{column} ELSE deals.{column} END"
                )
            else:
                assignments.append(f"{column} = excluded.{column}")
        assignments.append("inactive_since = NULL")  # listed again (deal page or upsert): active (lifecycle.py)
        con.execute(
            f"INSERT INTO deals BY NAME SELECT * FROM incoming_deals "
            f"ON CONFLICT (asin) DO UPDATE SET {', '.join(assignments)} "
            f"WHERE excluded.last_update_minute >= deals.last_update_minute"
        )
    finally:
        try:
            con.unregister("incoming_deals")
        except duckdb.Error:
            pass  # the transaction already failed: keep the original error, not "transaction aborted"
    return len(frame) - int(existing), int(existing)


@dataclass(frozen=True)
class StoredDeal:
    asin: str
    last_update_minute: int
    enriched_minute: int | None
    viability: str

    def covers(self, last_update_minute: int) -> bool:
        """True when this row already holds the deal at (or after) that version: nothing to pay for."""
        if self.last_update_minute < last_update_minute:
            return False
        if self.viability == "filtered":
            return True
        return self.enriched_minute is not None and self.enriched_minute >= last_update_minute


def stored_deals(con: duckdb.DuckDBPyConnection, asins: Sequence[str]) -> dict[str, StoredDeal]:
    if not asins:
        return {}
    rows = con.execute(
        "SELECT asin, last_update_minute, enriched_minute, viability FROM deals WHERE list_contains(?, asin)",
        [list(asins)],
    ).fetchall()
    return {r[0]: StoredDeal(r[0], int(r[1]), None if r[2] is None else int(r[2]), r[3]) for r in rows}


def deal_count(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute("SELECT count(*) FROM deals").fetchone()[0])
