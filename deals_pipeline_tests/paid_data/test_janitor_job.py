"""The janitor's Dagster wiring: the job runs in process (discovery pass, then retention sweep) and its
schedule is in the code location. The lifecycle rules themselves are tested in test_lifecycle.py."""

from __future__ import annotations

import dagster as dg

from deals_pipeline.clock import SystemClock
from deals_pipeline.defs.lifecycle import JANITOR_CRON, DealLifecycleResource, deal_lifecycle_job
from deals_pipeline.defs.resources import DealQueryResource, DealsDatabaseResource, KeepaResource, TokenBudgetResource
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig
from deals_pipeline.storage import Database


def test_janitor_job_runs_and_is_scheduled(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DEALS_PIPELINE_TIME_SCALE", raising=False)
    db_path = tmp_path / "d.duckdb"
    with KeepaSimulator(SimulatorConfig(refill_rate=3000, catalog_size=40), clock=SystemClock()) as sim:
        resources = {
            "keepa": KeepaResource(mode="simulator", simulator_url=sim.base_url),
            "database": DealsDatabaseResource(path=str(db_path)),
            "token_budget": TokenBudgetResource(refill_rate_guess=3000),
            "query": DealQueryResource(),
            "lifecycle": DealLifecycleResource(inactive_after_hours=72, retain_inactive_days=7),
        }
        with dg.instance_for_test() as instance:
            result = deal_lifecycle_job.execute_in_process(instance=instance, resources=resources)
        assert result.success
        assert result.output_for_node("deal_discovery_pass")["complete"] is True
        assert sim.stats().requests["product"] == 0  # a discovery pass reads deal pages only
    with Database(db_path, data_mode="simulator").connect() as con:
        assert con.execute("SELECT count(*) FROM discovery_passes WHERE complete").fetchone()[0] == 1

    from deals_pipeline.definitions import defs

    schedule = defs.get_schedule_def("deal_janitor_schedule")
    assert schedule.cron_schedule == JANITOR_CRON and schedule.job_name == "deal_lifecycle_job"
