"""The code location: thin wiring of assets, checks, sensors and resources defined elsewhere."""

import dagster as dg

from deals_pipeline.backfill.assets import deal_pages, deal_pages_job
from deals_pipeline.checks import ALL_CHECKS
from deals_pipeline.resources import default_resources
from deals_pipeline.sensors import deal_pages_sensor, recent_deals_sensor
from deals_pipeline.upsert.assets import recent_deals, recent_deals_job

defs = dg.Definitions(
    assets=[deal_pages, recent_deals],
    asset_checks=ALL_CHECKS,
    jobs=[deal_pages_job, recent_deals_job],
    sensors=[deal_pages_sensor, recent_deals_sensor],
    resources=default_resources(),
    executor=dg.in_process_executor,
)
