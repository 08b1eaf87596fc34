"""Asset checks: invariants of the stored data, evaluated in the UI and in CI.

Each costs little per run: a constraint lookup, the chunks of the page just summarized, one-row
reads, or the metadata the last run recorded in the instance. None scans the whole `deals` table.
"""

import dagster as dg

from deals_pipeline.clock import clock_for_database, clock_from_env
from deals_pipeline.defs.freshness import MAX_DISCOVERY_LAG_MINUTES, upsert_freshness
from deals_pipeline.defs.resources import DealsDatabaseResource, KeepaResource, TokenBudgetResource
from deals_pipeline.status import watermark_check

RECENT_DEALS_KEY = dg.AssetKey("recent_deals")


def _db(keepa: KeepaResource, database: DealsDatabaseResource):
    """The database as stored: checks only read, so they run in the UI on any data (demo data included)."""
    return database.database()


# A row whose key is not a valid ASIN, or whose raw deal / raw product JSON names another ASIN, holds
# another deal's data (a mis-keyed write). `asin` is the primary key, so duplicates cannot exist; this is
# what "each ASIN stored once, with its own data" can still get wrong.
MISKEYED_ROWS_SQL = """
SELECT asin FROM deals
WHERE NOT regexp_full_match(asin, '[0-9A-Z]{10}')
   OR json_extract_string(raw_deal, '$.asin') IS DISTINCT FROM asin
   OR (raw_product IS NOT NULL AND json_extract_string(raw_product, '$.asin') IS DISTINCT FROM asin)
ORDER BY asin
"""


@dg.asset_check(asset="deal_pages", description="Each row holds its own deal: a valid ASIN, the one in its raw "
                "deal and raw product JSON.", blocking=False)
def rows_hold_their_own_asin(keepa: KeepaResource, database: DealsDatabaseResource) -> dg.AssetCheckResult:
    with _db(keepa, database).connect() as con:
        rows = con.execute("SELECT count(*) FROM deals").fetchone()[0]
        miskeyed = [r[0] for r in con.execute(MISKEYED_ROWS_SQL).fetchall()]
    return dg.AssetCheckResult(passed=not miskeyed, metadata={"rows": rows, "miskeyed_rows": len(miskeyed),
                                                              "miskeyed_examples": dg.MetadataValue.json(miskeyed[:5])})


@dg.asset_check(asset="deal_pages", description="Every ASIN of every done chunk of the page last summarized is in `deals`.")
def chunk_progress_matches_deals(keepa: KeepaResource, database: DealsDatabaseResource) -> dg.AssetCheckResult:
    with _db(keepa, database).connect() as con:
        latest = con.execute(
            "SELECT page, selection_fingerprint FROM page_summaries ORDER BY updated_at DESC LIMIT 1"
        ).fetchone()
        if latest is None:
            return dg.AssetCheckResult(passed=True, metadata={"pages_checked": 0})
        missing = con.execute(
            "SELECT c.chunk_index, a.asin FROM page_chunks c, unnest(c.asins) AS a(asin) "
            "WHERE c.page = ? AND c.selection_fingerprint = ? AND c.status = 'done' "
            "AND a.asin NOT IN (SELECT asin FROM deals WHERE asin IN (SELECT unnest(asins) FROM page_chunks "
            "  WHERE page = ? AND selection_fingerprint = ?)) LIMIT 20",
            [latest[0], latest[1], latest[0], latest[1]],
        ).fetchall()
        done = con.execute(
            "SELECT count(*) FROM page_chunks WHERE page = ? AND selection_fingerprint = ? AND status = 'done'",
            [latest[0], latest[1]],
        ).fetchone()[0]
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"page": int(latest[0]), "done_chunks": int(done), "missing_shown": len(missing),
                  "missing_examples": dg.MetadataValue.json([{"chunk": int(c), "asin": a} for c, a in missing[:5]])},
    )


@dg.asset_check(asset="deal_pages", description="The token deficit stays within the budget's bound.")
def token_deficit_within_bounds(
    keepa: KeepaResource, database: DealsDatabaseResource, token_budget: TokenBudgetResource
) -> dg.AssetCheckResult:
    with _db(keepa, database).connect() as con:
        row = con.execute("SELECT tokens_left, refill_rate FROM token_server_status").fetchone()
    bound = -token_budget.policy().max_deficit - 60  # one chunk's prediction error of slack
    if row is None:
        return dg.AssetCheckResult(passed=True, metadata={"lower_bound": bound, "server_status_known": False})
    return dg.AssetCheckResult(passed=row[0] >= bound, metadata={"tokens_left": row[0], "lower_bound": bound,
                                                                  "refill_rate": row[1]})


def _last_recorded_backlog(instance: dg.DagsterInstance) -> int | None:
    """The backlog the last recent_deals run recorded (materialization or observation), from the instance."""
    records = [*instance.fetch_materializations(RECENT_DEALS_KEY, limit=1).records,
               *instance.fetch_observations(RECENT_DEALS_KEY, limit=1).records]
    if not records:
        return None
    latest = max(records, key=lambda record: record.storage_id)
    event = latest.asset_materialization or latest.asset_observation
    value = event.metadata.get("backlog_deals") if event is not None else None
    return int(value.value) if value is not None else None


@dg.asset_check(asset="recent_deals", description="The upserter is caught up: discovery lag within the "
                "freshness window and no backlog left by its last run.")
def discovery_lag_and_backlog(
    context: dg.AssetCheckExecutionContext, keepa: KeepaResource, database: DealsDatabaseResource
) -> dg.AssetCheckResult:
    db = _db(keepa, database)
    freshness = upsert_freshness(db, clock_for_database(db, clock_from_env()),
                                 backlog=_last_recorded_backlog(context.instance))
    return dg.AssetCheckResult(
        passed=freshness.up_to_date(),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={**freshness.as_metadata(), "max_discovery_lag_minutes": MAX_DISCOVERY_LAG_MINUTES,
                  "upserter_has_run": freshness.discovery_lag_minutes is not None},
    )


@dg.asset_check(asset="recent_deals",
                description="The watermark is never ahead of the stored data nor of the pipeline's clock.")
def watermark_not_ahead(keepa: KeepaResource, database: DealsDatabaseResource) -> dg.AssetCheckResult:
    db = _db(keepa, database)
    result = watermark_check(db, clock_for_database(db, clock_from_env()))
    return dg.AssetCheckResult(passed=result.pop("passed"), metadata=result)


@dg.asset_check(asset="deal_pages", description="No chunk is quarantined (failed max_chunk_attempts times).")
def no_quarantined_chunks(keepa: KeepaResource, database: DealsDatabaseResource) -> dg.AssetCheckResult:
    from deals_pipeline.backfill.service import quarantined_chunks

    chunks = quarantined_chunks(_db(keepa, database))
    names = ", ".join(f"page {c.page} chunk {c.chunk_index}" for c in chunks[:20])
    return dg.AssetCheckResult(
        passed=not chunks,
        metadata={"quarantined_count": len(chunks), "quarantined_chunks": names or "none",
                  "first_error": (chunks[0].error or "") if chunks else "",
                  "fix": "`deals-pipeline retry-quarantined` puts them back"},
        description=f"quarantined: {names}" if chunks else None,
    )


ALL_CHECKS = [no_quarantined_chunks, rows_hold_their_own_asin, chunk_progress_matches_deals, token_deficit_within_bounds,
              discovery_lag_and_backlog,
              watermark_not_ahead]
