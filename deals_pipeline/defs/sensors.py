"""Sensors: decide from the database and the shared budget, never call Keepa, never hold a lock.

Both skip (with the reason) while a run of their job is in flight, while the database is busy,
or while the budget cannot pay for one chunk: a schedule that fires when nothing is affordable is
a no-op (HAZARDS #50).
"""


import json
import os

import dagster as dg

from deals_pipeline.defs.deal_pages import deal_pages_job
from deals_pipeline.budget import BudgetError, Priority
from deals_pipeline.clock import clock_from_env
from deals_pipeline.config import (
    DEFAULT_BACKFILL_SENSOR_INTERVAL_S,
    DEFAULT_UPSERT_INTERVAL_S,
    ENV_BACKFILL_SENSOR_INTERVAL_S,
    ENV_UPSERT_INTERVAL_S,
)
from deals_pipeline.keepa.errors import ConfigError
from deals_pipeline.keepa.models import MAX_DEAL_PAGE
from deals_pipeline.defs.resources import DealQueryResource, DealsDatabaseResource, KeepaResource, TokenBudgetResource
from deals_pipeline.storage import DatabaseBusy
from deals_pipeline.defs.recent_deals import recent_deals_job

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _in_flight(context: dg.SensorEvaluationContext, job_name: str) -> int:
    return len(context.instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT), limit=5))


def _budget_gate(keepa, database, token_budget, query, *, priority: Priority, with_page: bool):
    """(db, budget, cost, wait_ms) for one chunk (plus a deal page when ``with_page``). One short read."""
    db = database.database(data_mode=keepa.data_mode())
    budget = token_budget.budget(db, clock_from_env(), owner="sensor")
    cost = int(budget.costs.products(query.chunk_size, query.product_options()))
    if with_page:
        cost += int(budget.costs.deal_pages())
    return db, budget, cost, budget.wait_ms(cost, priority)


def next_backfill_page(db, fingerprint: str) -> tuple[int | None, str]:
    """The first page that is not complete, or None when the backfill reached the query's end."""
    with db.connect() as con:
        rows = con.execute(
            "SELECT s.page, s.is_last, coalesce(p.status, 'partial') FROM page_snapshots s "
            "LEFT JOIN page_summaries p USING (page, selection_fingerprint) "
            "WHERE s.selection_fingerprint = ? ORDER BY s.page",
            [fingerprint],
        ).fetchall()
    for page, is_last, status in rows:
        if status != "complete":
            return int(page), f"page {page} is incomplete"
        if is_last:
            return None, f"page {page} was the last (short) page: backfill complete"
    next_page = (rows[-1][0] + 1) if rows else 0
    if next_page > MAX_DEAL_PAGE:
        return None, f"reached page {MAX_DEAL_PAGE}, Keepa's last page"
    return int(next_page), f"page {next_page} is next"


@dg.sensor(
    job=deal_pages_job,
    minimum_interval_seconds=int(os.environ.get(ENV_BACKFILL_SENSOR_INTERVAL_S, DEFAULT_BACKFILL_SENSOR_INTERVAL_S)),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests the next unfinished deal page when no backfill run is in flight and a chunk is affordable.",
)
def deal_pages_sensor(
    context: dg.SensorEvaluationContext,
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
):
    if _in_flight(context, deal_pages_job.name):
        return dg.SkipReason("a backfill run is in flight")
    try:
        db, _, cost, wait_ms = _budget_gate(keepa, database, token_budget, query, priority=Priority.BACKFILL,
                                            with_page=False)
        page, why = next_backfill_page(db, query.selection().fingerprint())
    except (DatabaseBusy, ConfigError, BudgetError) as trouble:
        return dg.SkipReason(f"not launching: {trouble}")
    if page is None:
        return dg.SkipReason(why)
    if wait_ms > 0:
        return dg.SkipReason(f"budget: a chunk ({cost} tokens) is affordable in {wait_ms / 1000:.0f} s")
    cursor = json.loads(context.cursor) if context.cursor else {}
    attempt = int(cursor.get(str(page), 0)) + 1
    cursor[str(page)] = attempt
    context.update_cursor(json.dumps(cursor))
    return dg.RunRequest(
        run_key=f"deal-page-{page}-attempt-{attempt}",
        partition_key=str(page),
        tags={"deals_pipeline/reason": why, "deals_pipeline/attempt": str(attempt)},
    )


@dg.sensor(
    job=recent_deals_job,
    minimum_interval_seconds=int(os.environ.get(ENV_UPSERT_INTERVAL_S, DEFAULT_UPSERT_INTERVAL_S)),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests an upsert run when none is in flight and the budget can pay for one chunk.",
)
def recent_deals_sensor(
    context: dg.SensorEvaluationContext,
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
):
    if _in_flight(context, recent_deals_job.name):
        return dg.SkipReason("an upsert run is in flight")
    try:
        _, budget, cost, wait_ms = _budget_gate(keepa, database, token_budget, query, priority=Priority.UPSERT,
                                                with_page=True)
        batch = budget.max_new_deals_per_run(query.upsert_sizing_mode, interval_s=query.upsert_interval_s)
    except (DatabaseBusy, ConfigError, BudgetError) as trouble:
        return dg.SkipReason(f"not launching: {trouble}")
    if wait_ms > 0:
        return dg.SkipReason(f"budget: one page and one chunk ({cost} tokens) are affordable in {wait_ms / 1000:.0f} s")
    tick = int(context.cursor or 0) + 1
    context.update_cursor(str(tick))
    return dg.RunRequest(
        run_key=f"recent-deals-{tick}",
        tags={"deals_pipeline/batch_size": str(batch),
              "deals_pipeline/reason": f"refill {budget.projection().refill_rate}/min, a chunk is affordable"},
    )
