"""System Health: what the pipeline has done and where the token budget stands (plain Python)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deals_pipeline.budget import TokenBudget
from deals_pipeline.clock import Clock
from deals_pipeline.keepa.keepa_time import keepa_minute_to_datetime, unix_ms_to_keepa_minute
from deals_pipeline.storage import Database


def newest_deal_age_minutes(db: Database, clock: Clock) -> float | None:
    """Minutes between now (timeline) and the newest stored deal's lastUpdate; None when empty."""
    with db.connect() as con:
        newest = con.execute("SELECT max(last_update_minute) FROM deals").fetchone()[0]
    if newest is None:
        return None
    return round(max(0, unix_ms_to_keepa_minute(clock.now_ms()) - int(newest)), 1)


def collect_health(db: Database, budget: TokenBudget, clock: Clock) -> dict[str, Any]:
    """Everything `deals-pipeline status` shows, as plain data (the --json output)."""
    with db.connect() as con:
        deals, enriched, filtered = con.execute(
            "SELECT count(*), count(*) FILTER (enriched_at IS NOT NULL), count(*) FILTER (viability = 'filtered') FROM deals"
        ).fetchone()
        pages = con.execute(
            "SELECT s.page, s.is_last, s.deal_count, coalesce(p.status, 'partial'), "
            "(SELECT count(*) FROM page_chunks c WHERE c.page = s.page AND c.selection_fingerprint = s.selection_fingerprint), "
            "(SELECT count(*) FROM page_chunks c WHERE c.page = s.page AND c.selection_fingerprint = s.selection_fingerprint AND c.status = 'done') "
            "FROM page_snapshots s LEFT JOIN page_summaries p USING (page, selection_fingerprint) ORDER BY s.page"
        ).fetchall()
        failed = con.execute(
            "SELECT page, chunk_index, attempts, error FROM page_chunks WHERE status = 'failed' ORDER BY page, chunk_index"
        ).fetchall()
        wm = con.execute("SELECT last_update_minute, asin, updated_at FROM watermarks WHERE name = 'recent_deals'").fetchone()
        newest = con.execute("SELECT max(last_update_minute) FROM deals").fetchone()[0]
        total_matches = con.execute(
            "SELECT raw_response->'$.deals.categoryCount' FROM page_snapshots ORDER BY page LIMIT 1"
        ).fetchone()
        upserts = con.execute(
            "SELECT count(*), count(*) FILTER (status IN ('complete', 'nothing_new')), max(finished_at) FROM upsert_runs"
        ).fetchone()
    ledger = budget.ledger_summary()
    projection = budget.projection()
    chunks_total = sum(p[4] for p in pages)
    chunks_done = sum(p[5] for p in pages)
    in_flight = next(((p[0], p[5]) for p in pages if p[3] != "complete"), None)
    spent = int(ledger.get("tokens_spent", 0))
    import json as _json

    counts = _json.loads(total_matches[0]) if total_matches and total_matches[0] else []
    matches = sum(counts) if counts else None
    pages_total = None
    if matches is not None:
        from deals_pipeline.backfill.service import page_count_for

        pages_total = page_count_for(matches)
    last_page_done = any(p[1] and p[3] == "complete" for p in pages)
    pages_done = sum(1 for p in pages if p[3] == "complete")
    remaining_pages = 0 if last_page_done or pages_total is None else max(0, pages_total - pages_done)
    remaining_asins = (chunks_total - chunks_done) * 4 + remaining_pages * 150
    from deals_pipeline.keepa.query import ProductOptions

    forecast = budget.forecast(pages_remaining=remaining_pages, asins_remaining=remaining_asins, options=ProductOptions())
    now_minute = unix_ms_to_keepa_minute(clock.now_ms())
    return {
        "deals": {"stored": int(deals), "enriched": int(enriched), "filtered": int(filtered)},
        "backfill": {
            "pages_done": pages_done,
            "pages_total": pages_total,
            "complete": last_page_done,
            "in_flight_page": in_flight[0] if in_flight else None,
            "in_flight_chunks_done": in_flight[1] if in_flight else None,
            "chunks_done": int(chunks_done),
            "chunks_total": int(chunks_total),
            "failed_chunks": [
                {"page": f[0], "chunk": f[1], "attempts": f[2], "error": f[3]} for f in failed
            ],
            "eta_hours": round(forecast.eta_ms / 3_600_000, 2),
            "tokens_needed": forecast.tokens_needed,
        },
        "tokens": {
            "spent_total": spent,
            "per_stored_deal": round(spent / deals, 2) if deals else None,
            "by_owner": ledger.get("by_owner", {}),
            "predicted_vs_actual": ledger.get("predicted_vs_actual"),
            "server_balance": projection.server_balance if hasattr(projection, "server_balance") else None,
            "server_status_at": projection.as_of_ms,
            "projected_balance": projection.balance,
            "refill_rate_per_min": projection.refill_rate,
            "cap": projection.cap,
            "recharging": projection.recharging,
            "status_known": projection.status_known,
        },
        "upsert": {
            "runs": int(upserts[0]),
            "runs_ok": int(upserts[1]),
            "last_finished": upserts[2].isoformat() if upserts[2] else None,
            "watermark": None if wm is None else {
                "last_update": keepa_minute_to_datetime(wm[0]).isoformat(), "asin": wm[1]
            },
            "newest_deal_age_minutes": None if newest is None else max(0, now_minute - int(newest)),
        },
    }
