"""`deal_pages`: one partition per Keepa deal page, one op per chunk (thin: logic is in deals_pipeline/backfill/service.py).

Partitions are static, "0".."66": Keepa serves at most pages 0-66 for a query, so every key is
known up front, `dagster asset materialize --partition 4` works without registering keys first,
and the UI shows the whole range. Pages past the query's short page are never requested (the
sensor stops there).
"""


import dagster as dg

from deals_pipeline import __version__
from deals_pipeline.backfill.service import page_count_for
from deals_pipeline.budget import BudgetDeadline
from deals_pipeline.keepa.models import MAX_DEAL_PAGE
from deals_pipeline.runtime import Runtime
from deals_pipeline.defs.resources import (
    DealQueryResource,
    DealsDatabaseResource,
    KeepaResource,
    TokenBudgetResource,
    build_runtime,
)

DEAL_PAGE_PARTITIONS = dg.StaticPartitionsDefinition([str(p) for p in range(MAX_DEAL_PAGE + 1)])
NO_CHUNK = -1


def _runtime(context: dg.OpExecutionContext, keepa, database, token_budget) -> Runtime:
    return build_runtime(keepa, database, token_budget, owner=f"backfill:{context.run_id[:8]}")


@dg.op(pool="keepa_api", out=dg.DynamicOut(dict), tags={"kind": "keepa"})
def fetch_page_snapshot(
    context: dg.OpExecutionContext,
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
):
    """Fetch the page once (or reuse its stored snapshot) and fan out its unfinished chunks."""
    page = int(context.partition_key)
    runtime = _runtime(context, keepa, database, token_budget)
    backfill = runtime.page_backfill(query.backfill_settings())
    try:
        snapshot = backfill.snapshot(page, deadline_ms=runtime.deadline_ms)
    except BudgetDeadline as stop:
        context.log.warning(f"page {page}: the page fetch cannot be afforded before the run deadline ({stop})")
        yield dg.DynamicOutput({"chunk": NO_CHUNK, "deadline_ms": runtime.deadline_ms, "deferred": True},
                               mapping_key="none")
        return
    pending = backfill.unfinished_chunks(page)
    context.log.info(
        f"page {page}: {len(snapshot.deals)} deals in {snapshot.chunk_count} chunks, {len(pending)} unfinished"
        f" ({'reused stored snapshot, 0 tokens' if snapshot.reused else f'fetched, {snapshot.tokens_consumed} tokens'})"
    )
    for chunk_index in pending:
        yield dg.DynamicOutput({"chunk": chunk_index, "deadline_ms": runtime.deadline_ms},
                               mapping_key=f"chunk_{chunk_index}")
    if not pending:
        yield dg.DynamicOutput({"chunk": NO_CHUNK, "deadline_ms": runtime.deadline_ms}, mapping_key="none")


@dg.op(pool="keepa_api", tags={"kind": "keepa"})
def process_chunk(
    context: dg.OpExecutionContext,
    work: dict,
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
) -> dict:
    """Commit one chunk (rows + done mark + token spend in one transaction), or say why not."""
    if work["chunk"] == NO_CHUNK:
        return {"status": "none", "deferred": bool(work.get("deferred"))}
    page = int(context.partition_key)
    runtime = _runtime(context, keepa, database, token_budget)
    backfill = runtime.page_backfill(query.backfill_settings())
    snapshot = backfill.load_snapshot(page)
    if snapshot is None:  # pragma: no cover - fetch_page_snapshot always stores it first
        raise dg.Failure(f"page {page} has no stored snapshot")
    outcome = backfill.run_chunk(snapshot, work["chunk"], deadline_ms=work["deadline_ms"])
    context.log.info(
        f"page {page} chunk {outcome.chunk_index + 1}/{snapshot.chunk_count}: {outcome.status}"
        f", {outcome.tokens_spent} tokens, {outcome.deals_stored} stored, {outcome.fresh_skipped} already fresh"
        + (f", error: {outcome.error}" if outcome.error else "")
    )
    context.log_event(
        dg.AssetObservation(
            asset_key="deal_pages",
            partition=context.partition_key,
            metadata={"chunk": outcome.chunk_index, "chunk_status": outcome.status,
                      "tokens_spent": outcome.tokens_spent, "deals_stored": outcome.deals_stored},
        )
    )
    return {"status": outcome.status, "tokens": outcome.tokens_spent, "stored": outcome.deals_stored,
            "fresh": outcome.fresh_skipped, "filtered": outcome.filtered, "error": outcome.error}


@dg.op(tags={"kind": "duckdb"})
def write_page_summary(
    context: dg.OpExecutionContext,
    results: list[dict],
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
):
    """Write the page summary; fail the run (progress kept) when chunks failed, so they are retried."""
    page = int(context.partition_key)
    runtime = _runtime(context, keepa, database, token_budget)
    backfill = runtime.page_backfill(query.backfill_settings())
    snapshot = backfill.load_snapshot(page)
    if snapshot is None:
        yield dg.Output(None, metadata={"page": page, "complete": False, "note": "page not fetched: budget deadline"})
        return
    summary = backfill.summarize(snapshot)
    run_tokens = sum(r.get("tokens", 0) for r in results)
    stored = sum(r.get("stored", 0) for r in results)
    done = sum(1 for r in results if r["status"] == "done")
    deferred = sum(1 for r in results if r["status"] == "deferred")
    # Unknown match count (a non-root category filter): count only this page's remaining work.
    total_pages = page_count_for(snapshot.total_matches) if snapshot.total_matches is not None else page + 1
    remaining_pages = 0 if snapshot.is_last else max(0, total_pages - page - 1)
    remaining_chunks = summary.chunks_total - summary.chunks_done
    forecast = runtime.budget.forecast(
        pages_remaining=remaining_pages,
        asins_remaining=remaining_chunks * query.chunk_size + remaining_pages * 150,
        options=query.product_options(),
    )
    metadata = {
        **summary.as_metadata(),
        "deals_stored_this_run": stored,
        "chunks_done_this_run": done,
        "chunks_deferred_this_run": deferred,
        "tokens_spent_this_run": run_tokens,
        "tokens_per_stored_deal": round(run_tokens / stored, 2) if stored else 0.0,
        "duplicates_skipped": sum(r.get("fresh", 0) for r in results),
        "filtered_out": sum(r.get("filtered", 0) for r in results),
        "viability_rules": str(query.rules().describe() or "none"),
        "backfill_eta_hours": round(forecast.eta_ms / 3_600_000, 2) if forecast.eta_ms is not None else -1.0,
        "backfill_tokens_needed": forecast.tokens_needed,
        "source": runtime.source,
        "pipeline_version": __version__,  # which code ran (HAZARDS #20)
    }
    if summary.chunks_failed:
        raise dg.Failure(
            description=f"page {page}: {summary.chunks_failed} chunk(s) failed and will be retried by the next run: "
            + "; ".join(summary.failed_errors[:3]),
            metadata=metadata,
        )
    yield dg.Output(None, metadata=metadata)


@dg.graph_asset(
    name="deal_pages",
    partitions_def=DEAL_PAGE_PARTITIONS,
    group_name="keepa_deals",
    description="Keepa deal pages backfilled into DuckDB `deals`, one partition per page, exactly-once chunks.",
    kinds={"duckdb", "python"},
    code_version=__version__,
)
def deal_pages():
    chunks = fetch_page_snapshot()
    return write_page_summary(chunks.map(process_chunk).collect())


deal_pages_job = dg.define_asset_job(
    "deal_pages_job",
    selection=[deal_pages],
    partitions_def=DEAL_PAGE_PARTITIONS,
    executor_def=dg.in_process_executor,
    description="Backfill one deal page (in process: the chunk fan-out costs ~ms per op, not ~2 s).",
)
