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
from deals_pipeline.defs.deal_pages import DEALS_COLUMN_SCHEMA, OWNERS, stored_deal_count
from deals_pipeline.defs.freshness import UpsertFreshness, upsert_freshness


UP_TO_DATE_STATUSES = ("complete", "nothing_new")


def upsert_brought_data_up_to_date(report) -> bool:
    """True when the run left no known backlog: every changed deal it found was committed."""
    return report.status in UP_TO_DATE_STATUSES and report.remaining_changed == 0 and report.scan_complete


def _upsert_metadata(report, freshness: UpsertFreshness, runtime) -> dict[str, object]:
    metadata: dict[str, object] = {**report.as_metadata(), "source": runtime.source,
                                   "pipeline_version": __version__, **freshness.as_metadata()}
    return metadata
from deals_pipeline.defs.waits import waits_shown_on


@dg.asset(
    name="recent_deals",
    pool="keepa_api",
    group_name="keepa_deals",
    kinds={"duckdb", "python"},
    description="The newest Keepa deals, upserted into DuckDB `deals` behind a ratcheting watermark. "
    "Materialized only when a run brought the data up to date (no backlog); otherwise observed with the reason, "
    "so the freshness policy measures how long the data has not been up to date.",
    code_version=__version__,
    owners=OWNERS,
    tags={"domain": "deals", "source": "keepa"},
    metadata={"dagster/column_schema": DEALS_COLUMN_SCHEMA, "dagster/table_name": "deals"},
    output_required=False,
    freshness_policy=dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=6), warn_window=timedelta(hours=1)),
)
def recent_deals(
    context: dg.AssetExecutionContext,
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
):
    owner = f"upsert:{context.run_id[:8]}"
    runtime = build_runtime(keepa, database, token_budget, owner=owner)
    updater = runtime.recent_deals(query.upsert_settings())

    def progress(report) -> None:
        context.log.info(
            f"upsert chunk {report.chunks_done}: {report.deals_new} new, {report.deals_updated} updated, "
            f"{report.tokens_spent} tokens, watermark {report.watermark_after}"
        )

    with waits_shown_on(context, owner, "recent_deals"):
        report = updater.run(deadline_ms=runtime.deadline_ms, run_id=context.run_id[:12], on_chunk=progress)
    freshness = upsert_freshness(runtime.db, runtime.clock, backlog=report.remaining_changed)
    metadata = _upsert_metadata(report, freshness, runtime)
    if report.status in ("deferred", "share_deferred") or not report.scan_complete:
        # Ends cleanly with progress saved and the pool slot released; the sensor relaunches it.
        context.log.warning(f"upsert {report.status}: {report.error or 'the scan resumes next run'}"
                            f" (scan next page {report.scan_next_page})")
    if report.status == "failed":
        raise dg.Failure(description=f"upsert failed after {report.chunks_done} committed chunks: {report.error}",
                         metadata=metadata)
    if not upsert_brought_data_up_to_date(report):
        why = (f"not up to date: {report.status}, {report.remaining_changed} changed deals still to upsert"
               + (f" ({report.error})" if report.error else ""))
        context.log.info(f"recent_deals {why}; recorded as an observation")
        context.log_event(dg.AssetObservation(asset_key="recent_deals", metadata={**metadata, "reason": why}))
        return
    yield dg.Output(None, metadata={**metadata, "dagster/row_count": stored_deal_count(runtime.db)})


recent_deals_job = dg.define_asset_job(
    "recent_deals_job", selection=[recent_deals], executor_def=dg.in_process_executor
)
