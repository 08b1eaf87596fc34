"""Defaults and environment variables, in one place (the README's configuration table mirrors it)."""

from __future__ import annotations

#: The deal query: the production system's Books/used selection (KEEPA_API.md §4.1), with integers.
DEFAULT_SELECTION: dict = {
    "page": 0,
    "domainId": 1,
    "priceTypes": [2],
    "dateRange": 3,
    "sortType": 4,
    "isFilterEnabled": True,
    "isRangeEnabled": True,
    "deltaPercentRange": [50, 2147483647],
    "deltaRange": [1950, 9900],
    "currentRange": [2000, 30100],
    "salesRankRange": [50000, 1500000],
    "minRating": 10,
    "singleVariation": True,
    "includeCategories": [283155],
}

ENV_API_KEY = "KEEPA_API_KEY"
ENV_API_BASE_URL = "KEEPA_API_BASE_URL"
ENV_DOMAIN = "KEEPA_DOMAIN"
ENV_MODE = "DEALS_PIPELINE_MODE"              # 'keepa' | 'simulator' (unset: keepa when a key is set)
ENV_SIMULATOR_URL = "KEEPA_SIMULATOR_URL"     # a running `deals-pipeline simulator`; unset: embedded
ENV_SIM_REFILL_RATE = "KEEPA_SIMULATOR_REFILL_RATE"
ENV_DB_PATH = "DEALS_DB_PATH"
ENV_UPSERT_INTERVAL_S = "DEALS_UPSERT_INTERVAL_S"
ENV_BACKFILL_SENSOR_INTERVAL_S = "DEALS_BACKFILL_SENSOR_INTERVAL_S"
ENV_RUN_BUDGET_MINUTES = "DEALS_RUN_BUDGET_MINUTES"

DEFAULT_DB_PATH = "data/deals.duckdb"
DEFAULT_UPSERT_INTERVAL_S = 300
DEFAULT_BACKFILL_SENSOR_INTERVAL_S = 60
ENV_DAGSTER_HOME = "DAGSTER_HOME"

#: The one place for Dagster state (runs, partitions, checks) unless DAGSTER_HOME says otherwise. The demo,
#: `make ui`, `make status` and every `deals-pipeline` command use it and DEFAULT_DB_PATH, both relative to the
#: directory the command runs in (the Makefile passes the project root).
DEFAULT_DAGSTER_HOME = "dagster_home"
#: Pages Keepa serves for one query: 0..MAX_PAGE (the partitions of `deal_pages`).
MAX_PAGE = 66
