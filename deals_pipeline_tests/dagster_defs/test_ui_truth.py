"""What the UI shows is true: a partition is green only for a complete page, `recent_deals` only when
up to date, and a killed run or a busy file never blocks a sensor tick.

Processes are raced on events (a run's pid recorded, a lock held), never on timing windows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from deals_pipeline.clock import SystemClock
from deals_pipeline.defs.deal_pages import deal_pages
from deals_pipeline.defs.recent_deals import recent_deals
from deals_pipeline.defs.resources import DealQueryResource, DealsDatabaseResource, KeepaResource, TokenBudgetResource
from deals_pipeline.defs.run_reaper import PID_TAG
from deals_pipeline.defs.sensors import SENSOR_DB_BUSY_TIMEOUT_S, deal_pages_sensor, maintenance_sensor
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig

ROOT = Path(__file__).resolve().parents[2]
PAGES = dg.AssetKey("deal_pages")


def _resources(sim, db_path, *, refill_guess: int, run_budget_minutes: float = 480.0):
    return {
        "keepa": KeepaResource(mode="simulator", simulator_url=sim.base_url),
        "database": DealsDatabaseResource(path=str(db_path)),
        "token_budget": TokenBudgetResource(refill_rate_guess=refill_guess, run_budget_minutes=run_budget_minutes),
        "query": DealQueryResource(),
    }


def _observations(result, key: str) -> list[dict]:
    return [{k: v.value for k, v in e.asset_observation_data.asset_observation.metadata.items()}
            for e in result.all_events
            if e.event_type_value == "ASSET_OBSERVATION" and e.asset_key == dg.AssetKey(key)]


@pytest.mark.parametrize("initial_tokens", [0, 120], ids=["deferred_before_fetch", "partial_page"])
def test_an_incomplete_page_is_observed_not_materialized(tmp_path, monkeypatch, initial_tokens):
    monkeypatch.delenv("DEALS_PIPELINE_TIME_SCALE", raising=False)
    config = SimulatorConfig(refill_rate=5, initial_tokens=initial_tokens, catalog_size=320)
    with KeepaSimulator(config, clock=SystemClock()) as slow, dg.instance_for_test() as instance:
        # A run budget of ~1 s at 5 tokens/min: whatever the initial tokens do not pay for is deferred.
        resources = _resources(slow, tmp_path / "d.duckdb", refill_guess=5, run_budget_minutes=0.02)
        result = dg.materialize([deal_pages], partition_key="2", instance=instance, resources=resources)
        assert result.success, "a deferred page is not a failure: its progress is kept for the next run"
        assert result.asset_materializations_for_node("deal_pages") == []
        assert "2" not in instance.get_materialized_partitions(PAGES)
        page_observations = [o for o in _observations(result, "deal_pages") if "complete" in o]
        assert page_observations and page_observations[-1]["complete"] is False
        assert page_observations[-1]["deferred"] is True


def test_a_complete_page_is_materialized_and_reruns_stay_materialized(tmp_path, monkeypatch):
    monkeypatch.delenv("DEALS_PIPELINE_TIME_SCALE", raising=False)
    with KeepaSimulator(SimulatorConfig(refill_rate=3000, catalog_size=320), clock=SystemClock()) as sim, \
            dg.instance_for_test() as instance:
        resources = _resources(sim, tmp_path / "d.duckdb", refill_guess=3000)
        first = dg.materialize([deal_pages], partition_key="2", instance=instance, resources=resources)
        meta = {k: v.value for k, v in first.asset_materializations_for_node("deal_pages")[0].metadata.items()}
        assert instance.get_materialized_partitions(PAGES) == {"2"}
        assert meta["dagster/row_count"] == meta["deals_on_page"] > 0  # only this page was stored
        assert all(v != -1 for v in meta.values()), "no -1 placeholders in the plots"


def test_recent_deals_not_brought_up_to_date_is_observed_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("DEALS_PIPELINE_TIME_SCALE", raising=False)
    config = SimulatorConfig(refill_rate=5, initial_tokens=10, catalog_size=320)
    with KeepaSimulator(config, clock=SystemClock()) as slow, dg.instance_for_test() as instance:
        resources = _resources(slow, tmp_path / "d.duckdb", refill_guess=5, run_budget_minutes=0.02)
        result = dg.materialize([recent_deals], instance=instance, resources=resources)
        assert result.success
        assert result.asset_materializations_for_node("recent_deals") == []
        observed = _observations(result, "recent_deals")
        assert observed and observed[-1]["status"] == "budget_stopped"
        assert "not up to date" in observed[-1]["reason"]


def _wait_for(predicate, *, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.mark.slow
def test_a_killed_cli_run_does_not_block_the_next_sensor_tick(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster_home" / "dagster.yaml").read_text())
    db_path = tmp_path / "cli.duckdb"
    with KeepaSimulator(SimulatorConfig(refill_rate=3000, catalog_size=800), clock=SystemClock()) as sim:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEALS_PIPELINE_TIME")}
        env.update(DAGSTER_HOME=str(home), DEALS_PIPELINE_MODE="simulator", KEEPA_SIMULATOR_URL=sim.base_url,
                   DEALS_DB_PATH=str(db_path))
        cli = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "deals_pipeline.definitions",
             "--select", "deal_pages", "--partition", "0"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )
        resources = _resources(sim, db_path, refill_guess=3000)
        try:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                def started_run():
                    records = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
                    return next((r.dagster_run for r in records if PID_TAG in r.dagster_run.tags), None)

                run = _wait_for(started_run, timeout_s=120, what="the CLI run to record its process")
                assert run.job_name == "__ASSET_JOB"
                while_alive = deal_pages_sensor(dg.build_sensor_context(instance=instance, resources=resources))
                if cli.poll() is None:  # the tick saw a live run: the __ASSET_JOB run counts as in flight
                    assert isinstance(while_alive, dg.SkipReason)
                    assert "in flight" in while_alive.skip_message
                cli.send_signal(signal.SIGKILL)
                cli.wait(timeout=60)

                tick = deal_pages_sensor(dg.build_sensor_context(instance=instance, resources=resources))
                assert isinstance(tick, dg.RunRequest), getattr(tick, "skip_message", tick)
                assert tick.partition_key == "0"
                assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
                # The maintenance sensor finds nothing left to reap.
                assert "no dead runs" in maintenance_sensor(dg.build_sensor_context(instance=instance)).skip_message
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()


def test_a_busy_database_is_a_sensor_skip_well_within_the_tick_deadline(tmp_path):
    db_path = tmp_path / "busy.duckdb"
    with KeepaSimulator(SimulatorConfig(refill_rate=3000), clock=SystemClock()) as sim:
        resources = _resources(sim, db_path, refill_guess=3000)
        holder = subprocess.Popen(
            [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
             "sys.stdin.read()", str(db_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            with dg.instance_for_test() as instance:
                tick = deal_pages_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)
    assert isinstance(tick, dg.SkipReason) and "not launching" in tick.skip_message
    # The sensors' short busy timeout, not the runs' 60 s one that equals the tick deadline.
    assert f"locked by another process for {SENSOR_DB_BUSY_TIMEOUT_S:.0f}s" in tick.skip_message
