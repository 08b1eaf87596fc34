"""`recent_deals`: keep the newest deals fresh (thin: logic is in deals_pipeline/upsert/service.py)."""


from datetime import timedelta

import dagster as dg

from deals_pipeline import __version__
from deals_pipeline.defs.resources import (
    DealQueryResource,
    DealsDatabaseResource,
    KeepaResource,
    TokenBudgetResource,
    build_runtime,
)
from deals_pipeline.status import newest_deal_age_minutes


@dg.asset(
    name="recent_deals",
    pool="keepa_api",
    group_name="keepa_deals",
    kinds={"duckdb", "python"},
    description="The newest Keepa deals, upserted into DuckDB `deals` behind a ratcheting watermark.",
    code_version=__version__,
    freshness_policy=dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=6), warn_window=timedelta(hours=1)),
)
def recent_deals(
    context: dg.AssetExecutionContext,
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
) -> dg.MaterializeResult:
    runtime = build_runtime(keepa, database, token_budget, owner=f"upsert:{context.run_id[:8]}")
    updater = runtime.recent_deals(query.upsert_settings())

    def progress(report) -> None:
        context.log.info(
            f"upsert chunk {report.chunks_done}: {report.deals_new} new, {report.deals_updated} updated, "
            f"{report.tokens_spent} tokens, watermark {report.watermark_after}"
        )

    report = updater.run(deadline_ms=runtime.deadline_ms, run_id=context.run_id[:12], on_chunk=progress)
    age = newest_deal_age_minutes(runtime.db, runtime.clock)
    metadata = {**report.as_metadata(), "newest_deal_age_minutes": age if age is not None else -1.0,
                "source": runtime.source, "pipeline_version": __version__}
    if report.status == "failed":
        raise dg.Failure(description=f"upsert failed after {report.chunks_done} committed chunks: {report.error}",
                         metadata=metadata)
    return dg.MaterializeResult(metadata=metadata)


recent_deals_job = dg.define_asset_job(
    "recent_deals_job", selection=[recent_deals], executor_def=dg.in_process_executor
)
