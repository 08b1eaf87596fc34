"""System Health: what the pipeline has done and where the token budget stands (plain Python)."""

from __future__ import annotations

from typing import Any

from deals_pipeline.backfill.service import page_count_for
from deals_pipeline.budget import TokenBudget
from deals_pipeline.clock import Clock, describe_clock
from deals_pipeline.keepa.keepa_time import keepa_minute_to_datetime, unix_ms_to_datetime, unix_ms_to_keepa_minute
from deals_pipeline.keepa.models import DEAL_PAGE_SIZE
from deals_pipeline.keepa.query import ProductOptions
from deals_pipeline.scheduling import share_split
from deals_pipeline.storage import Database
from deals_pipeline.progress import current_waits
from deals_pipeline.upsert.service import Watermark


def newest_deal_age_minutes(db: Database, clock: Clock) -> float | None:
    """Minutes between now (timeline) and the newest stored deal's lastUpdate; None when empty."""
    with db.connect() as con:
        newest = con.execute("SELECT max(last_update_minute) FROM deals").fetchone()[0]
    if newest is None:
        return None
    return float(max(0, unix_ms_to_keepa_minute(clock.now_ms()) - int(newest)))


def watermark_check(db: Database, clock: Clock) -> dict[str, Any]:
    """Is the upsert watermark behind both the newest stored deal and the pipeline's clock? (plain data)

    ``passed`` is False when the watermark is ahead of the stored data, or ahead of ``clock`` (which must be
    the database's own clock, :func:`~deals_pipeline.clock.clock_for_database`): a watermark from a faster
    clock would make every later upsert see "nothing new".
    """
    with db.connect() as con:
        wm = con.execute("SELECT last_update_minute, asin FROM watermarks WHERE name = 'recent_deals'").fetchone()
        newest = con.execute("SELECT max(last_update_minute) FROM deals").fetchone()[0]
    now_minute = unix_ms_to_keepa_minute(clock.now_ms())
    if wm is None:
        return {"passed": True, "note": "no watermark yet", "now_minute": now_minute}
    return {
        "passed": newest is not None and wm[0] <= newest and wm[0] <= now_minute,
        "watermark": format_watermark(wm[0], wm[1]),
        "watermark_minute": int(wm[0]),
        "newest_stored_minute": int(newest) if newest is not None else -1,
        "now_minute": now_minute,
        "ahead_of_clock_minutes": max(0, int(wm[0]) - now_minute),
    }


def format_watermark(last_update_minute: int, asin: str) -> str:
    """``2026-12-01 20:16 UTC, ASIN B0VJ7YRFDL`` for a (Keepa minute, ASIN) watermark."""
    return str(Watermark(int(last_update_minute), asin))


def collect_health(
    db: Database, budget: TokenBudget, clock: Clock, *, chunk_size: int = 4, options: ProductOptions | None = None
) -> dict[str, Any]:
    """Everything `deals-pipeline status` shows, as plain data (the --json output). One short read."""
    with db.connect() as con:
        deals, enriched, filtered, newest = con.execute(
            "SELECT count(*), count(*) FILTER (enriched_at IS NOT NULL), count(*) FILTER (viability = 'filtered'), "
            "max(last_update_minute) FROM deals"
        ).fetchone()
        pages = con.execute(
            "SELECT s.page, s.is_last, coalesce(p.status, 'partial'), "
            "count(c.chunk_index), count(c.chunk_index) FILTER (c.status = 'done') "
            "FROM page_snapshots s LEFT JOIN page_summaries p USING (page, selection_fingerprint) "
            "LEFT JOIN page_chunks c USING (page, selection_fingerprint) "
            "GROUP BY ALL ORDER BY s.page"
        ).fetchall()
        failed = con.execute(
            "SELECT page, chunk_index, attempts, error FROM page_chunks WHERE status = 'failed' ORDER BY page, chunk_index"
        ).fetchall()
        watermark = con.execute(
            "SELECT last_update_minute, asin FROM watermarks WHERE name = 'recent_deals'"
        ).fetchone()
        # The newest page's estimate: later pages see more of the query (page 0 of a drifting query undercounts).
        total_matches = con.execute(
            "SELECT total_matches FROM page_snapshots WHERE total_matches IS NOT NULL ORDER BY page DESC LIMIT 1"
        ).fetchone()
        upserts = con.execute(
            "SELECT count(*), count(*) FILTER (status IN ('complete', 'nothing_new')), max(finished_at) FROM upsert_runs"
        ).fetchone()
        server = con.execute(
            "SELECT tokens_left, timestamp_ms, refill_rate FROM token_server_status WHERE id = 1"
        ).fetchone()
        waits = current_waits(con, clock.now_ms())
        quarantined = con.execute(
            "SELECT page, chunk_index, attempts, error FROM page_chunks WHERE status = 'quarantined' "
            "ORDER BY page, chunk_index"
        ).fetchall()
        split = share_split(con, now_ms=clock.now_ms(), refill_rate=budget.projection().refill_rate)
    ledger = budget.ledger_summary()
    projection = budget.projection()

    pages_done = sum(1 for p in pages if p[2] == "complete")
    complete = any(p[1] and p[2] == "complete" for p in pages)
    in_flight = next(((p[0], p[4], p[3]) for p in pages if p[2] != "complete"), None)
    chunks_total = sum(p[3] for p in pages)
    chunks_done = sum(p[4] for p in pages)
    pages_total = page_count_for(total_matches[0]) if total_matches else None
    if pages_total is not None and not complete and pages_done >= pages_total:
        pages_total = None  # the estimate is used up but no short page was seen: more pages exist, how many is unknown
    if complete:
        remaining_pages = 0
    elif pages_total is None:
        remaining_pages = 1 if pages else 0  # at least the next page (a lower bound: the ETA says so)
    else:
        remaining_pages = max(0, pages_total - len(pages))
    forecast = budget.forecast(
        pages_remaining=remaining_pages,
        asins_remaining=(chunks_total - chunks_done) * chunk_size + remaining_pages * DEAL_PAGE_SIZE,
        options=options or ProductOptions(),
    )
    spent = int(ledger.get("spent", 0))
    now_minute = unix_ms_to_keepa_minute(clock.now_ms())
    now_ms = clock.now_ms()
    return {
        "clock": {"description": describe_clock(clock), "now": unix_ms_to_datetime(now_ms).isoformat()},
        "waits": [{"owner": w.owner, "line": w.line(), "tokens": w.tokens, "until": unix_ms_to_datetime(w.until_ms).isoformat(),
                   "reason": w.reason} for w in waits],
        "deals": {"stored": int(deals), "enriched": int(enriched), "filtered": int(filtered)},
        "backfill": {
            "pages_done": pages_done,
            "pages_total": pages_total,
            "pages_total_text": (str(pages_total) if pages_total is not None
                                 else (f"at least {len(pages) + 1}" if pages and not complete else "?")),
            "eta_is_lower_bound": pages_total is None and not complete,
            "complete": complete,
            "in_flight_page": in_flight[0] if in_flight else None,
            "in_flight_chunks": f"{in_flight[1]}/{in_flight[2]}" if in_flight else None,
            "chunks_done": int(chunks_done),
            "chunks_total": int(chunks_total),
            "failed_chunks": [{"page": f[0], "chunk": f[1], "attempts": f[2], "error": f[3]} for f in failed],
            "quarantined_chunks": [{"page": q[0], "chunk": q[1], "attempts": q[2], "error": q[3]} for q in quarantined],
            "eta_hours": round(forecast.eta_ms / 3_600_000, 2) if forecast.eta_ms is not None else None,
            "tokens_needed": forecast.tokens_needed,
        },
        "tokens": {
            "spent_total": spent,
            "predicted_total": int(ledger.get("predicted", 0)),
            "per_stored_deal": round(spent / deals, 2) if deals else None,
            "by_purpose": {k: v["actual"] for k, v in ledger.get("by_purpose", {}).items()},
            "server_balance": server[0] if server else None,
            "server_status_at": unix_ms_to_datetime(server[1]).isoformat() if server else None,
            "projected_balance": projection.balance,
            "refill_rate_per_min": projection.refill_rate,
            "cap": projection.cap,
            "recharging": projection.recharging,
            "share": split,  # how the refill of the last window was split between upserter and backfill
        },
        "upsert": {
            "runs": int(upserts[0]),
            "runs_ok": int(upserts[1]),
            "last_finished": upserts[2].isoformat() if upserts[2] else None,
            "watermark": None
            if watermark is None
            else {"last_update": keepa_minute_to_datetime(watermark[0]).isoformat(), "asin": watermark[1],
                  "text": format_watermark(watermark[0], watermark[1])},
            "newest_deal_age_minutes": None if newest is None else max(0, now_minute - int(newest)),
        },
    }
