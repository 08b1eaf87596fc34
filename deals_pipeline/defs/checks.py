"""Asset checks: invariants of the stored data, evaluated in the UI and in CI."""


import dagster as dg

from deals_pipeline.clock import clock_from_env
from deals_pipeline.defs.resources import DealsDatabaseResource, KeepaResource, TokenBudgetResource
from deals_pipeline.status import newest_deal_age_minutes

NEWEST_DEAL_MAX_AGE_MINUTES = 24 * 60


def _db(keepa: KeepaResource, database: DealsDatabaseResource):
    return database.database(data_mode=keepa.data_mode())


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
                                                              "miskeyed_examples": str(miskeyed[:5])})


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
    age = newest_deal_age_minutes(_db(keepa, database), clock_from_env())
    return dg.AssetCheckResult(
        passed=age is not None and age <= NEWEST_DEAL_MAX_AGE_MINUTES,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"newest_deal_age_minutes": age if age is not None else -1,
                  "max_age_minutes": NEWEST_DEAL_MAX_AGE_MINUTES},
    )


@dg.asset_check(asset="recent_deals", description="The watermark is never ahead of the stored data.")
def watermark_not_ahead(keepa: KeepaResource, database: DealsDatabaseResource) -> dg.AssetCheckResult:
    with _db(keepa, database).connect() as con:
        wm = con.execute("SELECT last_update_minute FROM watermarks WHERE name = 'recent_deals'").fetchone()
        newest = con.execute("SELECT max(last_update_minute) FROM deals").fetchone()[0]
    if wm is None:
        return dg.AssetCheckResult(passed=True, metadata={"note": "no watermark yet"})
    return dg.AssetCheckResult(passed=newest is not None and wm[0] <= newest,
                               metadata={"watermark_minute": wm[0], "newest_stored_minute": newest or -1})


ALL_CHECKS = [rows_hold_their_own_asin, chunk_progress_matches_deals, token_deficit_within_bounds, newest_deal_age,
              watermark_not_ahead]
