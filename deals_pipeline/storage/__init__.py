"""DuckDB storage: one schema definition, short-lived connections, migrations at start. No Dagster."""

from deals_pipeline.storage.db import Database, DatabaseBusy

__all__ = ["Database", "DatabaseBusy"]
