"""The janitor: a scheduled job that ages out deals that left Keepa's list (thin: the logic is in
deals_pipeline/lifecycle.py). Every 4 hours, as the production janitor ran: one full discovery pass
(deal pages only, 5 tokens a page, through the shared budget and the `keepa_api` pool), then the
retention sweep."""


import os

import dagster as dg

from deals_pipeline.defs.resources import (
    DealQueryResource,
    DealsDatabaseResource,
    KeepaResource,
    TokenBudgetResource,
    build_runtime,
)
from deals_pipeline.keepa.errors import ConfigError
from deals_pipeline.lifecycle import (
    ENV_INACTIVE_AFTER_HOURS,
    ENV_JANITOR_MODE,
    ENV_RETAIN_INACTIVE_DAYS,
    LifecyclePolicy,
    run_discovery_pass,
    run_janitor,
)

#: Cron of the janitor schedule (the production system ran it every 4 h).
JANITOR_CRON = "0 */4 * * *"


class DealLifecycleResource(dg.ConfigurableResource):
    """When a deal no longer listed becomes inactive, and how long inactive deals are kept."""

    inactive_after_hours: float = 72.0
    retain_inactive_days: float = 7.0
    mode: str = "archive"  #: 'archive' (to deals_archive, then delete) or 'delete'

    def policy(self) -> LifecyclePolicy:
        return LifecyclePolicy(self.inactive_after_hours, self.retain_inactive_days, self.mode)  # type: ignore[arg-type]


def lifecycle_resource_from_env() -> DealLifecycleResource:
    """``DEALS_INACTIVE_AFTER_HOURS`` / ``DEALS_RETAIN_INACTIVE_DAYS`` / ``DEALS_JANITOR_MODE``, else defaults."""
    values: dict[str, object] = {}
    for env, name in ((ENV_INACTIVE_AFTER_HOURS, "inactive_after_hours"), (ENV_RETAIN_INACTIVE_DAYS, "retain_inactive_days")):
        raw = os.environ.get(env, "").strip()
        if raw:
            try:
                values[name] = float(raw)
            except ValueError:
                raise ConfigError(f"{env} must be a number, got {raw!r}") from None
    mode = os.environ.get(ENV_JANITOR_MODE, "").strip()
    if mode:
        values["mode"] = mode
    resource = DealLifecycleResource(**values)
    resource.policy()  # validate now: a bad value fails at load time with the variable's meaning
    return resource


@dg.op(pool="keepa_api", description="Read the whole deal list; mark stored deals no longer listed inactive.")
def deal_discovery_pass(context: dg.OpExecutionContext, keepa: KeepaResource, database: DealsDatabaseResource,
                        token_budget: TokenBudgetResource, query: DealQueryResource,
                        lifecycle: DealLifecycleResource) -> dict:
    runtime = build_runtime(keepa, database, token_budget, owner=f"janitor:{context.run_id[:8]}")
    report = run_discovery_pass(runtime.db, runtime.client, runtime.budget, query.selection(), runtime.clock,
                                lifecycle.policy(), deadline_ms=runtime.deadline_ms)
    context.log.info(f"discovery pass: {report.pages} pages, {report.deals_listed} listed, "
                     f"{report.marked_inactive} marked inactive, {report.reactivated} active again")
    return {"complete": report.complete, "marked_inactive": report.marked_inactive, "pages": report.pages}


@dg.op(description="Archive or delete deals inactive longer than retain_inactive_days.")
def deal_retention_sweep(context: dg.OpExecutionContext, database: DealsDatabaseResource,
                         keepa: KeepaResource, lifecycle: DealLifecycleResource, discovery: dict) -> None:
    from deals_pipeline.clock import clock_from_env

    db = database.database(data_mode=keepa.data_mode())
    report = run_janitor(db, clock_from_env(), lifecycle.policy())
    context.log.info(f"janitor: {report.archived} archived, {report.deleted} deleted, "
                     f"{report.still_inactive} inactive kept")


@dg.job(description="The janitor: discovery pass, then retention sweep.", executor_def=dg.in_process_executor)
def deal_lifecycle_job() -> None:
    deal_retention_sweep(discovery=deal_discovery_pass())


deal_janitor_schedule = dg.ScheduleDefinition(
    name="deal_janitor_schedule", job=deal_lifecycle_job, cron_schedule=JANITOR_CRON,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every 4 h: deals a full pass no longer lists go inactive; inactive ones age out.",
)
