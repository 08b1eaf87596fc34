"""The code location: thin wiring of the assets, checks, sensors and resources in this package."""

import dagster as dg

from deals_pipeline.defs.checks import ALL_CHECKS
from deals_pipeline.defs.deal_pages import deal_pages, deal_pages_job
from deals_pipeline.defs.recent_deals import recent_deals, recent_deals_job
from deals_pipeline.defs.resources import default_resources
from deals_pipeline.defs.sensors import deal_pages_sensor, recent_deals_sensor

defs = dg.Definitions(
    assets=[deal_pages, recent_deals],
    asset_checks=ALL_CHECKS,
    jobs=[deal_pages_job, recent_deals_job],
    sensors=[deal_pages_sensor, recent_deals_sensor],
    resources=default_resources(),
    executor=dg.in_process_executor,
)
