"""The Dagster layer: definitions load, a partition materializes, sensors decide correctly."""

from __future__ import annotations

import json

import re

import dagster as dg
import pytest

from deals_pipeline.defs.deal_pages import DEAL_PAGE_PARTITIONS, deal_pages
from deals_pipeline.clock import SystemClock
from deals_pipeline.keepa.errors import ConfigError
from deals_pipeline.defs.resources import (
    DealQueryResource,
    DealsDatabaseResource,
    KeepaResource,
    TokenBudgetResource,
)
from deals_pipeline.defs.sensors import deal_pages_sensor, recent_deals_sensor
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig
from deals_pipeline.defs.recent_deals import recent_deals

pytestmark = pytest.mark.slow  # Dagster instances and in-process runs


def _page_run(partition_key, instance, resources):
    return dg.materialize([deal_pages], partition_key=partition_key, instance=instance, resources=resources)


def test_definitions_load_with_every_asset_check_sensor_and_resource():
    from deals_pipeline.definitions import defs

    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"deal_pages", "recent_deals"} <= keys
    assert {s.name for s in repo.sensor_defs} == {"deal_pages_sensor", "recent_deals_sensor", "maintenance_sensor"}
    checks = {k.name for k in repo.asset_graph.asset_check_keys}
    assert {"rows_hold_their_own_asin", "chunk_progress_matches_deals", "token_deficit_within_bounds",
            "discovery_lag_and_backlog", "watermark_not_ahead"} <= checks
    assert DEAL_PAGE_PARTITIONS.get_partition_keys() == [str(p) for p in range(67)]
    assert set(defs.resources) == {"keepa", "database", "token_budget", "query", "lifecycle"}


def test_no_key_and_no_simulator_mode_fails_with_both_options_named():
    with pytest.raises(ConfigError) as err:
        KeepaResource().resolved_mode()
    assert "KEEPA_API_KEY" in str(err.value) and "DEALS_PIPELINE_MODE=simulator" in str(err.value)
    assert KeepaResource(mode="simulator").resolved_mode() == "simulator"
    assert KeepaResource(api_key="k").resolved_mode() == "keepa"


@pytest.fixture
def sim():
    with KeepaSimulator(SimulatorConfig(refill_rate=3000, catalog_size=320), clock=SystemClock()) as simulator:
        yield simulator


def _resources(sim, db_path):
    return {
        "keepa": KeepaResource(mode="simulator", simulator_url=sim.base_url),
        "database": DealsDatabaseResource(path=str(db_path)),
        "token_budget": TokenBudgetResource(refill_rate_guess=3000),
        "query": DealQueryResource(),
    }


def test_a_partition_materializes_in_process_with_metadata(sim, tmp_path, monkeypatch):
    monkeypatch.delenv("DEALS_PIPELINE_TIME_SCALE", raising=False)
    with dg.instance_for_test() as instance:
        result = _page_run("2", instance, _resources(sim, tmp_path / "d.duckdb"))
        assert result.success
        materializations = result.asset_materializations_for_node("deal_pages")
        assert len(materializations) == 1
        meta = {k: v.value for k, v in materializations[0].metadata.items()}
        assert meta["page"] == 2 and meta["complete"] is True and meta["is_last_page"] is True
        # The short last page: every chunk done, every deal on it accounted for (its size is the simulator's
        # catalog's): the calibrated simulator's deals fail some viability rules, so stored + filtered + already
        # fresh covers the page, and some are stored.
        assert meta["chunks_done"] == meta["chunks_total"] == -(-meta["deals_on_page"] // 4) > 0
        assert meta["deals_stored_this_run"] > 0 and meta["tokens_spent_this_run"] > 0
        assert (meta["deals_stored_this_run"] + meta["filtered_out"] + meta["duplicates_skipped"]
                == meta["deals_on_page"]), meta
        observations = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
        assert len(observations) == meta["chunks_total"], "one live-progress observation per chunk"
        # A rerun pays nothing: the snapshot is reused and every chunk is done.
        fetched = sim.stats().deal_page_fetches[2]
        again = _page_run("2", instance, _resources(sim, tmp_path / "d.duckdb"))
        meta2 = {k: v.value for k, v in again.asset_materializations_for_node("deal_pages")[0].metadata.items()}
        assert meta2["tokens_spent_this_run"] == 0 and sim.stats().deal_page_fetches[2] == fetched


def test_recent_deals_materializes_with_batch_metadata(sim, tmp_path):
    with dg.instance_for_test() as instance:
        result = dg.materialize([recent_deals], instance=instance, resources=_resources(sim, tmp_path / "d.duckdb"))
        assert result.success
        meta = {k: v.value for k, v in result.asset_materializations_for_node("recent_deals")[0].metadata.items()}
        assert meta["status"] == "complete" and meta["batch_size"] >= 200  # learned 3000/min >= 20
        assert meta["deals_new"] > 0 and meta["watermark_after"] != "none"


def test_deal_pages_sensor_requests_the_next_page_and_stops_after_the_short_page(sim, tmp_path):
    resources = _resources(sim, tmp_path / "d.duckdb")
    resources["query"] = DealQueryResource(chunk_size=50)  # fewer ops: this test is about the sensor
    with dg.instance_for_test() as instance:
        requested = []
        cursor = None
        for _ in range(5):
            ctx = dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor)
            result = deal_pages_sensor(ctx)
            cursor = ctx.cursor
            if isinstance(result, dg.SkipReason):
                assert "backfill complete" in result.skip_message
                break
            assert isinstance(result, dg.RunRequest)
            requested.append(result.partition_key)
            run = _page_run(result.partition_key, instance, resources)
            assert run.success
        assert requested == ["0", "1", "2"]
        assert json.loads(cursor) == {"0": 1, "1": 1, "2": 1}


def test_sensors_skip_when_the_budget_cannot_pay_for_a_chunk(tmp_path):
    with KeepaSimulator(SimulatorConfig(refill_rate=5, initial_tokens=0), clock=SystemClock()) as slow:
        resources = _resources(slow, tmp_path / "d.duckdb")
        resources["token_budget"] = TokenBudgetResource(refill_rate_guess=5)
        # Learn the (empty) balance once, as any run's first response would.
        from deals_pipeline.defs.resources import build_runtime

        runtime = build_runtime(resources["keepa"], resources["database"], resources["token_budget"], owner="t")
        runtime.budget.sync()
        with dg.instance_for_test() as instance:
            backfill = deal_pages_sensor(dg.build_sensor_context(instance=instance, resources=resources))
            upsert = recent_deals_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert isinstance(backfill, dg.SkipReason) and "budget" in backfill.skip_message
    assert isinstance(upsert, dg.SkipReason) and "budget" in upsert.skip_message


def test_recent_deals_sensor_tags_batch_size_and_uses_fresh_run_keys(sim, tmp_path):
    resources = _resources(sim, tmp_path / "d.duckdb")
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources=resources)
        first = recent_deals_sensor(ctx)
        # Right after a launch the adaptive poll interval has not passed: the tick says when and why.
        early = recent_deals_sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=ctx.cursor))
        # Once it has passed (the last launch long ago), the next run gets a fresh key.
        elapsed = json.dumps({"tick": json.loads(ctx.cursor)["tick"], "last_launch_ms": 1})
        second = recent_deals_sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=elapsed))
    assert isinstance(first, dg.RunRequest) and isinstance(second, dg.RunRequest)
    assert isinstance(early, dg.SkipReason) and "next poll in" in early.skip_message
    assert "poll every" in early.skip_message
    assert first.run_key != second.run_key
    assert "deals_pipeline/batch_size" in first.tags and "deals_pipeline/poll_interval_s" in first.tags


@pytest.mark.slow
def test_cli_backfill_runs_a_range_in_order_and_stops_at_the_short_page(sim, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    home = tmp_path / "home"
    home.mkdir()
    root = Path(__file__).resolve().parents[2]
    (home / "dagster.yaml").write_text((root / "dagster_home" / "dagster.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALS_PIPELINE_TIME")}
    env.update(DAGSTER_HOME=str(home), DEALS_PIPELINE_MODE="simulator", KEEPA_SIMULATOR_URL=sim.base_url,
               DEALS_DB_PATH=str(tmp_path / "cli.duckdb"), COLUMNS="200")
    done = subprocess.run([str(Path(sys.executable).parent / "deals-pipeline"), "backfill", "--pages", "1-5"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    lines = [line for line in out if ": complete" in line or "last page" in line]
    assert lines[0].startswith("page 1: complete, 38/38 chunks, ")
    short = re.match(r"page 2: complete, (\d+)/(\d+) chunks, ", lines[1])
    assert short and short.group(1) == short.group(2) and int(short.group(2)) > 0, lines[1]
    short_chunks = int(short.group(2))
    assert lines[-1] == "page 2 is the query's last page: backfill complete"
    # One progress line per committed chunk, in order.
    assert [line.split(":")[0] for line in out if " chunk " in line] == (
        [f"page 1 chunk {i}/38" for i in range(1, 39)] + [f"page 2 chunk {i}/{short_chunks}" for i in range(1, short_chunks + 1)])
