"""The code location: thin wiring of the assets, checks, sensors and resources in this package."""


import dagster as dg

from deals_pipeline.defs.checks import ALL_CHECKS
from deals_pipeline.defs.deal_pages import deal_pages, deal_pages_job
from deals_pipeline.defs.lifecycle import deal_janitor_schedule, deal_lifecycle_job, lifecycle_resource_from_env
from deals_pipeline.defs.recent_deals import recent_deals, recent_deals_job
from deals_pipeline.defs.resources import default_resources
from deals_pipeline.defs.sensors import deal_pages_sensor, maintenance_sensor, recent_deals_sensor


defs = dg.Definitions(
    # Code references: the UI links each asset to its source file (relative to the repository root).
    assets=dg.with_source_code_references([deal_pages, recent_deals]),
    asset_checks=ALL_CHECKS,
    jobs=[deal_pages_job, recent_deals_job, deal_lifecycle_job],
    sensors=[deal_pages_sensor, recent_deals_sensor, maintenance_sensor],
    schedules=[deal_janitor_schedule],
    resources={**default_resources(), "lifecycle": lifecycle_resource_from_env()},
    executor=dg.in_process_executor,
)
