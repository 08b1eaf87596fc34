"""Asset checks: invariants of the stored data, evaluated in the UI and in CI."""


import dagster as dg

from deals_pipeline.clock import clock_for_database, clock_from_env
from deals_pipeline.defs.resources import DealsDatabaseResource, KeepaResource, TokenBudgetResource
from deals_pipeline.status import newest_deal_age_minutes, watermark_check

NEWEST_DEAL_MAX_AGE_MINUTES = 24 * 60


def _db(keepa: KeepaResource, database: DealsDatabaseResource):
    """The database as stored: checks only read, so they run in the UI on any data (demo data included)."""
    return database.database()


@dg.asset_check(asset="deal_pages", description="Every ASIN is stored once.", blocking=False)
def no_duplicate_asins(keepa: KeepaResource, database: DealsDatabaseResource) -> dg.AssetCheckResult:
    with _db(keepa, database).connect() as con:
        total, distinct = con.execute("SELECT count(*), count(DISTINCT asin) FROM deals").fetchone()
    return dg.AssetCheckResult(passed=total == distinct, metadata={"rows": total, "distinct_asins": distinct})


@dg.asset_check(asset="deal_pages", description="Every ASIN of every done chunk is in `deals`.")
def chunk_progress_matches_deals(keepa: KeepaResource, database: DealsDatabaseResource) -> dg.AssetCheckResult:
    with _db(keepa, database).connect() as con:
        missing = con.execute(
            "SELECT c.page, c.chunk_index, a.asin FROM page_chunks c, unnest(c.asins) AS a(asin) "
            "WHERE c.status = 'done' AND a.asin NOT IN (SELECT asin FROM deals) LIMIT 20"
        ).fetchall()
        done = con.execute("SELECT count(*) FROM page_chunks WHERE status = 'done'").fetchone()[0]
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"done_chunks": done, "missing_examples": str(missing[:5]), "missing_count_shown": len(missing)},
    )


@dg.asset_check(asset="deal_pages", description="The token deficit stays within the budget's bound.")
def token_deficit_within_bounds(
    keepa: KeepaResource, database: DealsDatabaseResource, token_budget: TokenBudgetResource
) -> dg.AssetCheckResult:
    with _db(keepa, database).connect() as con:
        row = con.execute("SELECT tokens_left, refill_rate FROM token_server_status").fetchone()
    bound = -token_budget.policy().max_deficit - 60  # one chunk's prediction error of slack
    if row is None:
        return dg.AssetCheckResult(passed=True, metadata={"note": "no server status yet"})
    return dg.AssetCheckResult(passed=row[0] >= bound, metadata={"tokens_left": row[0], "lower_bound": bound,
                                                                  "refill_rate": row[1]})


@dg.asset_check(asset="recent_deals", description="The newest stored deal is recent.")
def newest_deal_age(keepa: KeepaResource, database: DealsDatabaseResource) -> dg.AssetCheckResult:
    db = _db(keepa, database)
    age = newest_deal_age_minutes(db, clock_for_database(db, clock_from_env()))
    return dg.AssetCheckResult(
        passed=age is not None and age <= NEWEST_DEAL_MAX_AGE_MINUTES,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"newest_deal_age_minutes": age if age is not None else -1,
                  "max_age_minutes": NEWEST_DEAL_MAX_AGE_MINUTES},
    )


@dg.asset_check(asset="recent_deals",
                description="The watermark is never ahead of the stored data nor of the pipeline's clock.")
def watermark_not_ahead(keepa: KeepaResource, database: DealsDatabaseResource) -> dg.AssetCheckResult:
    db = _db(keepa, database)
    result = watermark_check(db, clock_for_database(db, clock_from_env()))
    return dg.AssetCheckResult(passed=result.pop("passed"), metadata=result)


ALL_CHECKS = [no_duplicate_asins, chunk_progress_matches_deals, token_deficit_within_bounds, newest_deal_age,
              watermark_not_ahead]
