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
from deals_pipeline.clock import clock_for_database, clock_from_env
from deals_pipeline.state_paths import require_database
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
from deals_pipeline.defs.run_reaper import reap_dead_runs

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


SENSOR_DB_BUSY_TIMEOUT_S = 5.0  # well under the 60 s tick deadline: a busy file is a skip, not a tick error


def _in_flight(context: dg.SensorEvaluationContext, asset_key: dg.AssetKey) -> list[str]:
    """Live runs that touch ``asset_key``, whatever their job (`__ASSET_JOB` from `dagster asset
    materialize` included). Runs whose process is gone are reaped first, so a killed run never blocks."""
    reap_dead_runs(context.instance)
    live = []
    for record in context.instance.get_run_records(dg.RunsFilter(statuses=IN_FLIGHT), limit=100):
        run = record.dagster_run
        if run.asset_selection is not None:
            touches = asset_key in run.asset_selection
        else:  # a job run (e.g. deal_pages_job from a sensor): ask the job which assets it targets
            touches = run.job_name in _JOBS_FOR_ASSET.get(asset_key, ())
        if touches:
            live.append(run.run_id)
    return live


_JOBS_FOR_ASSET = {
    dg.AssetKey("deal_pages"): (deal_pages_job.name,),
    dg.AssetKey("recent_deals"): (recent_deals_job.name,),
}


def _sensor_db(keepa, database):
    """The database with the sensors' short busy timeout."""
    return database.database(data_mode=keepa.data_mode(), busy_timeout_s=SENSOR_DB_BUSY_TIMEOUT_S)


def _budget_gate(keepa, database, token_budget, query, *, priority: Priority, with_page: bool):
    """(db, budget, cost, wait_ms) for one chunk (plus a deal page when ``with_page``). One short read."""
    require_database(database.path, keepa.data_mode())  # a sensor never creates a real-API database either
    db = _sensor_db(keepa, database)
    budget = token_budget.budget(db, clock_for_database(db, clock_from_env()), owner="sensor")
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
    live = _in_flight(context, dg.AssetKey("deal_pages"))
    if live:
        return dg.SkipReason(f"a backfill run is in flight ({live[0][:8]})")
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
    backoff = _backoff_ms(db, query, page)
    if backoff:
        return dg.SkipReason(f"page {page}: its unfinished chunks back off after failures for {backoff / 1000:.0f} s more")
    cursor = json.loads(context.cursor) if context.cursor else {}
    attempt = int(cursor.get(str(page), 0)) + 1
    cursor[str(page)] = attempt
    context.update_cursor(json.dumps(cursor))
    return dg.RunRequest(
        run_key=f"deal-page-{page}-attempt-{attempt}",
        partition_key=str(page),
        tags={"deals_pipeline/reason": why, "deals_pipeline/attempt": str(attempt)},
    )


def _backoff_ms(db, query: DealQueryResource, page: int) -> int:
    """ms until the page's next unfinished chunk may run again (0 = now): a retry backing off is not relaunched."""
    from deals_pipeline.backfill.service import PageBackfill

    clock = clock_from_env()
    retry_at = PageBackfill.next_retry_at(db, query.selection().fingerprint(), page, clock.now_ms())
    return 0 if retry_at is None else max(0, retry_at - clock.now_ms())


#: The upsert sensor ticks this often and launches when the adaptive poll interval has passed
#: (deals_pipeline/scheduling.py::poll_interval; the chosen interval is in every tick's log).
UPSERT_SENSOR_TICK_S = min(60, int(os.environ.get(ENV_UPSERT_INTERVAL_S, DEFAULT_UPSERT_INTERVAL_S)))


@dg.sensor(
    job=recent_deals_job,
    minimum_interval_seconds=UPSERT_SENSOR_TICK_S,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests an upsert run at the adaptive poll interval when none is in flight and a chunk is affordable.",
)
def recent_deals_sensor(
    context: dg.SensorEvaluationContext,
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    query: DealQueryResource,
):
    live = _in_flight(context, dg.AssetKey("recent_deals"))
    if live:
        return dg.SkipReason(f"an upsert run is in flight ({live[0][:8]})")
    clock = clock_from_env()
    try:
        db, budget, cost, wait_ms = _budget_gate(keepa, database, token_budget, query, priority=Priority.UPSERT,
                                                 with_page=True)
        batch = budget.max_new_deals_per_run(query.upsert_sizing_mode, interval_s=query.upsert_interval_s)
        plan = query.poll_plan(db, budget, clock)
    except (DatabaseBusy, ConfigError, BudgetError) as trouble:
        return dg.SkipReason(f"not launching: {trouble}")
    cursor = _upsert_cursor(context.cursor)
    since_s = (clock.now_ms() - cursor["last_launch_ms"]) / 1000 if cursor["last_launch_ms"] else None
    context.log.info(f"{plan.reason}; last launch {'never' if since_s is None else f'{since_s:.0f}s ago'}")
    if since_s is not None and since_s < plan.interval_s:
        return dg.SkipReason(f"next poll in {plan.interval_s - since_s:.0f}s ({plan.reason})")
    if wait_ms > 0:
        return dg.SkipReason(f"budget: one page and one chunk ({cost} tokens) are affordable in {wait_ms / 1000:.0f} s")
    tick = cursor["tick"] + 1
    context.update_cursor(json.dumps({"tick": tick, "last_launch_ms": clock.now_ms()}))
    return dg.RunRequest(
        run_key=f"recent-deals-{tick}",
        tags={"deals_pipeline/batch_size": str(batch), "deals_pipeline/poll_interval_s": str(plan.interval_s),
              "deals_pipeline/reason": f"refill {budget.projection().refill_rate}/min, a chunk is affordable; "
                                       f"{plan.reason}"},
    )


def _upsert_cursor(raw: str | None) -> dict:
    """The upsert sensor's cursor: {"tick", "last_launch_ms"} (a bare tick count from older versions)."""
    if not raw:
        return {"tick": 0, "last_launch_ms": 0}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {"tick": 0, "last_launch_ms": 0}
    if isinstance(value, int):
        return {"tick": value, "last_launch_ms": 0}
    return {"tick": int(value.get("tick", 0)), "last_launch_ms": int(value.get("last_launch_ms", 0))}


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks runs whose process is gone (SIGKILL, OOM, a closed terminal) as failed and frees their "
    "keepa_api pool slots, so a dead run never blocks the sensors or queued runs.",
)
def maintenance_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    reaped = reap_dead_runs(context.instance)
    if reaped:
        return dg.SkipReason(f"reaped {len(reaped)} dead run(s): {', '.join(r[:8] for r in reaped)}")
    return dg.SkipReason("no dead runs")
