"""`deal_pages`: one partition per Keepa deal page, one op per chunk (thin: logic is in deals_pipeline/backfill/service.py).

Partitions are static, "0".."66": Keepa serves at most pages 0-66 for a query, so every key is
known up front, `dagster asset materialize --partition 4` works without registering keys first,
and the UI shows the whole range. Pages past the query's short page are never requested (the
sensor stops there).
"""


from collections import OrderedDict

import dagster as dg

from deals_pipeline import __version__
from deals_pipeline.backfill.service import page_count_for
from deals_pipeline.budget import BudgetDeadline
from deals_pipeline.defs.waits import waits_shown_on
from deals_pipeline.enrichment import two_stage_forecast
from deals_pipeline.keepa.models import MAX_DEAL_PAGE
from deals_pipeline.progress import ChunkCommitted, publish
from deals_pipeline.runtime import Runtime
from deals_pipeline.storage import DatabaseBusy
from deals_pipeline.scheduling import share_split
from deals_pipeline.defs.resources import (
    DealQueryResource,
    DealsDatabaseResource,
    KeepaResource,
    TokenBudgetResource,
    build_runtime,
)

DEAL_PAGE_PARTITIONS = dg.StaticPartitionsDefinition([str(p) for p in range(MAX_DEAL_PAGE + 1)])
DEAL_PAGES_KEY = dg.AssetKey("deal_pages")
OWNERS = ["team:deals"]

# Transient trouble a chunk op raises (the service turns API and budget trouble into outcomes): a file
# held by another process past the busy timeout. A retry re-reads the chunk's state first, so it never
# pays twice; the budget wait happens inside the retry, not in Dagster's delay.
CHUNK_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)

# One runtime per run: the in-process executor runs every chunk op of a page in one process, so the
# client (and its HTTP session), database handle and budget are built once, not once per op.
_RUN_RUNTIMES: "OrderedDict[str, Runtime]" = OrderedDict()
_RUN_RUNTIMES_KEPT = 4
#: Runs of this process in which a chunk was deferred (in-process executor: one process per run).
#: The run's remaining chunk ops end at once instead of each waiting up to max_wait_in_slot_s again,
#: so the pool slot is free for the upserter and the sensor relaunches the page when it is affordable.
_DEFERRED_RUNS: set[str] = set()


def _owner(context: dg.OpExecutionContext) -> str:
    return f"backfill:{context.run_id[:8]}"


def run_runtime(context: dg.OpExecutionContext, keepa, database, token_budget) -> Runtime:
    """This run's runtime, built by its first op and reused by the others."""
    runtime = _RUN_RUNTIMES.get(context.run_id)
    if runtime is None:
        runtime = build_runtime(keepa, database, token_budget, owner=_owner(context))
        _RUN_RUNTIMES[context.run_id] = runtime
        while len(_RUN_RUNTIMES) > _RUN_RUNTIMES_KEPT:
            _RUN_RUNTIMES.popitem(last=False)
    return runtime


def release_run_runtime(run_id: str) -> None:
    _RUN_RUNTIMES.pop(run_id, None)


def _observe_page(context: dg.OpExecutionContext, metadata: dict[str, object]) -> None:
    """Progress of an incomplete page: the UI shows it, without marking the partition materialized."""
    context.log_event(dg.AssetObservation(asset_key=DEAL_PAGES_KEY, partition=context.partition_key,
                                          metadata=metadata))


@dg.op(pool="keepa_api", out={"chunks": dg.DynamicOut(dict), "page": dg.Out(int)},
       tags={"kind": "keepa"})
def fetch_page_snapshot(
    context: dg.OpExecutionContext,
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
):
    """Fetch the page once (or reuse its stored snapshot) and fan out its unfinished chunks with their ASINs."""
    page = int(context.partition_key)
    runtime = run_runtime(context, keepa, database, token_budget)
    backfill = runtime.page_backfill(query.backfill_settings())
    try:
        with waits_shown_on(context, _owner(context), "deal_pages", context.partition_key):
            snapshot = backfill.snapshot(page, deadline_ms=runtime.deadline_ms)
    except BudgetDeadline as stop:
        context.log.warning(f"page {page}: the page fetch cannot be afforded before the run deadline ({stop})")
        _observe_page(context, {"page": page, "complete": False, "deferred": True,
                                "reason": f"page fetch not affordable before the run deadline ({stop})"})
        yield dg.Output(page, output_name="page")
        return
    pending = backfill.unfinished_chunks(page)
    context.log.info(
        f"page {page}: {len(snapshot.deals)} deals in {snapshot.chunk_count} chunks, {len(pending)} unfinished"
        f" ({'reused stored snapshot, 0 tokens' if snapshot.reused else f'fetched, {snapshot.tokens_consumed} tokens'})"
    )
    for chunk_index in pending:
        yield dg.DynamicOutput(
            {"chunk": chunk_index, "asins": list(snapshot.chunk_asins[chunk_index]), "deadline_ms": runtime.deadline_ms},
            output_name="chunks", mapping_key=f"chunk_{chunk_index}",
        )
    yield dg.Output(page, output_name="page")


@dg.op(pool="keepa_api", tags={"kind": "keepa"}, retry_policy=CHUNK_RETRY)
def process_chunk(
    context: dg.OpExecutionContext,
    work: dict,
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
) -> dict:
    """Commit one chunk (rows + done mark + token spend in one transaction), or say why not."""
    if context.run_id in _DEFERRED_RUNS:  # an earlier chunk of this run was deferred: end at once
        return {"status": "deferred", "tokens": 0, "stored": 0}
    page = int(context.partition_key)
    runtime = run_runtime(context, keepa, database, token_budget)
    backfill = runtime.page_backfill(query.backfill_settings())
    try:
        snapshot = backfill.load_snapshot(page)
        if snapshot is None:  # pragma: no cover - fetch_page_snapshot always stores it first
            raise dg.Failure(f"page {page} has no stored snapshot")
        with waits_shown_on(context, _owner(context), "deal_pages", context.partition_key) as waits:
            outcome = backfill.run_chunk(snapshot, work["chunk"], deadline_ms=work["deadline_ms"])
    except DatabaseBusy as busy:
        raise dg.RetryRequested(max_retries=CHUNK_RETRY.max_retries, seconds_to_wait=5) from busy
    chunks_done = snapshot.chunk_count - len(backfill.unfinished_chunks(page))
    publish(ChunkCommitted(page=page, chunk_index=outcome.chunk_index, chunk_count=snapshot.chunk_count,
                           status=outcome.status, tokens_spent=outcome.tokens_spent,
                           deals_stored=outcome.deals_stored, chunks_done=chunks_done))
    if outcome.status == "deferred":
        _DEFERRED_RUNS.add(context.run_id)
        context.log.warning(
            f"page {page} chunk {outcome.chunk_index + 1}: deferred, not affordable within "
            f"{query.max_wait_in_slot_s:.0f} s (next tokens in {(outcome.wait_ms or 0) / 1000:.0f} s): the run ends "
            "with progress saved and releases the keepa_api slot; the sensor relaunches the page when affordable"
        )
    context.log.info(
        f"page {page} chunk {outcome.chunk_index + 1}/{snapshot.chunk_count}: {outcome.status}"
        f", {outcome.tokens_spent} tokens, {outcome.deals_stored} stored, {outcome.fresh_skipped} already fresh"
        + (f", error: {outcome.error}" if outcome.error else "")
    )
    chunk_meta: dict[str, object] = {"chunk": outcome.chunk_index, "chunk_status": outcome.status,
                                     "tokens_spent": outcome.tokens_spent, "deals_stored": outcome.deals_stored,
                                     "chunks_done": chunks_done, "token_waits": len(waits),
                                     "waited": waits[-1].line() if waits else "no visible wait"}
    _observe_page(context, chunk_meta)
    return {"status": outcome.status, "tokens": outcome.tokens_spent, "stored": outcome.deals_stored,
            "fresh": outcome.fresh_skipped, "filtered": outcome.filtered, "error": outcome.error}


def _page_metadata(summary, results: list[dict], forecast, query: DealQueryResource, runtime: Runtime,
                   stored_rows: int | None) -> dict[str, object]:
    """Typed metadata for a page: numbers stay numbers (plottable), unknowns are left out, not -1."""
    run_tokens = sum(r.get("tokens", 0) for r in results)
    stored = sum(r.get("stored", 0) for r in results)
    metadata: dict[str, object] = {
        key: value for key, value in summary.as_metadata().items()
        if not (key == "query_total_matches" and summary.total_matches is None)
    }
    metadata.update({
        "deals_stored_this_run": stored,
        "chunks_done_this_run": sum(1 for r in results if r["status"] == "done"),
        "chunks_deferred_this_run": sum(1 for r in results if r["status"] == "deferred"),
        "tokens_spent_this_run": run_tokens,
        "tokens_per_stored_deal": round(run_tokens / stored, 2) if stored else 0.0,
        "duplicates_skipped": sum(r.get("fresh", 0) for r in results),
        "filtered_out": sum(r.get("filtered", 0) for r in results),
        "viability_rules": dg.MetadataValue.json(query.rules().describe() or {}),
        "backfill_tokens_needed": forecast.tokens_needed,
        "source": runtime.source,
        "pipeline_version": __version__,  # which code ran (HAZARDS #20)
    })
    if forecast.eta_ms is not None:
        metadata["backfill_eta_hours"] = round(forecast.eta_ms / 3_600_000, 2)
    if stored_rows is not None:
        metadata["dagster/row_count"] = stored_rows
    return metadata


@dg.op(tags={"kind": "duckdb"}, out=dg.Out(is_required=False))
def write_page_summary(
    context: dg.OpExecutionContext,
    page: int,
    results: list[dict],
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
):
    """Materialize the page only when it is complete; otherwise observe its progress. Failed chunks fail the run."""
    runtime = run_runtime(context, keepa, database, token_budget)
    try:
        yield from _summarize_page(context, page, results, runtime, query)
    finally:
        release_run_runtime(context.run_id)


def _summarize_page(context, page: int, results: list[dict], runtime: Runtime, query: DealQueryResource):
    backfill = runtime.page_backfill(query.backfill_settings())
    snapshot = backfill.load_snapshot(page)
    if snapshot is None:  # deferred before the page fetch: already observed by fetch_page_snapshot
        return
    summary = backfill.summarize(snapshot)
    # Unknown match count (a non-root category filter): count only this page's remaining work.
    total_pages = page_count_for(snapshot.total_matches) if snapshot.total_matches is not None else page + 1
    remaining_pages = 0 if snapshot.is_last else max(0, total_pages - page - 1)
    remaining_chunks = summary.chunks_total - summary.chunks_done
    forecast = runtime.budget.forecast(
        pages_remaining=remaining_pages,
        asins_remaining=remaining_chunks * query.chunk_size + remaining_pages * 150,
        options=query.product_options(),
        **two_stage_forecast(runtime.db, query.policy(), query.product_options()),
    )
    stored_rows = stored_deal_count(runtime.db) if summary.complete else None
    metadata = {**_page_metadata(summary, results, forecast, query, runtime, stored_rows),
                **_share_split(runtime, query)}
    deferred = int(metadata["chunks_deferred_this_run"])
    metadata["deferred"] = bool(deferred)
    if deferred:
        context.log.warning(
            f"page {page}: {deferred} chunk(s) deferred (not affordable within {query.max_wait_in_slot_s:.0f} s while "
            "holding the keepa_api slot); progress is saved: the sensor relaunches the page when affordable, or "
            "run the same `dagster asset materialize` again"
        )
    if summary.chunks_failed:
        raise dg.Failure(
            description=f"page {page}: {summary.chunks_failed} chunk(s) failed and will be retried by the next run: "
            + "; ".join(summary.failed_errors[:3]),
            metadata=metadata,
        )
    if not summary.complete:
        context.log.info(f"page {page}: {summary.chunks_done}/{summary.chunks_total} chunks done; "
                         "recorded as an observation, the partition stays unmaterialized")
        _observe_page(context, {**metadata, "deferred": True})
        return
    yield dg.Output(None, metadata=metadata)


def stored_deal_count(db) -> int:
    """Rows in `deals` (a count, cheap on DuckDB's column store): the asset's dagster/row_count."""
    with db.connect() as con:
        return int(con.execute("SELECT count(*) FROM deals").fetchone()[0])


DEALS_COLUMN_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("asin", "VARCHAR", description="Amazon product id (one row per ASIN)"),
    dg.TableColumn("last_update_minute", "BIGINT", description="Keepa minute of the deal's lastUpdate"),
    dg.TableColumn("viability", "VARCHAR", description="'viable' or 'filtered' by the viability rules"),
    dg.TableColumn("enriched_at", "TIMESTAMPTZ", description="When the product data was stored"),
])


def _share_split(runtime: Runtime, query: DealQueryResource) -> dict:
    with runtime.db.connect() as con:
        return share_split(con, now_ms=runtime.clock.now_ms(), refill_rate=runtime.budget.projection().refill_rate,
                           window_min=query.share_window_min)


@dg.graph_asset(
    name="deal_pages",
    partitions_def=DEAL_PAGE_PARTITIONS,
    group_name="keepa_deals",
    description="Keepa deal pages backfilled into DuckDB `deals`, one partition per page, exactly-once chunks. "
    "A partition is materialized only when its page is complete; partial pages are observations.",
    kinds={"duckdb", "python"},
    code_version=__version__,
    owners=OWNERS,
    tags={"domain": "deals", "source": "keepa"},
    metadata={"dagster/column_schema": DEALS_COLUMN_SCHEMA, "dagster/table_name": "deals"},
)
def deal_pages():
    chunks, page = fetch_page_snapshot()
    return write_page_summary(page, chunks.map(process_chunk).collect())


deal_pages_job = dg.define_asset_job(
    "deal_pages_job",
    selection=[deal_pages],
    executor_def=dg.in_process_executor,
    description="Backfill one deal page (in process: the chunk fan-out costs ~ms per op, not ~2 s).",
)


def page_run_metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    """What a page run reported: its materialization's metadata, or for an incomplete page the last
    page-level observation (progress), so callers such as `deals-pipeline backfill` see both."""
    materializations = result.asset_materializations_for_node("deal_pages")
    if materializations:
        return {k: v.value for k, v in materializations[-1].metadata.items()}
    for event in reversed(result.all_events):
        if event.event_type_value == "ASSET_OBSERVATION" and event.asset_key == DEAL_PAGES_KEY:
            metadata = {k: v.value for k, v in event.asset_observation_data.asset_observation.metadata.items()}
            if "complete" in metadata:
                return metadata
    return {}
