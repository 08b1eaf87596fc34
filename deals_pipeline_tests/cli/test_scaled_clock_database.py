"""A database made on a scaled clock is read back on that clock, never as future real times."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

from deals_pipeline.clock import ClockMismatch, ScaledClock, SystemClock, clock_for_database
from deals_pipeline.defs.resources import (
    DealQueryResource,
    DealsDatabaseResource,
    KeepaResource,
    TokenBudgetResource,
    build_runtime,
)
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig
from deals_pipeline.status import watermark_check
from deals_pipeline.storage import Database
from deals_pipeline_tests.cli._cli import clean_env, run_cli

pytestmark = pytest.mark.slow  # a simulator run and subprocesses of the console script

SCALE = 60.0


@pytest.fixture
def scaled_db(tmp_path):
    """A demo-like database: an upsert on a x60 clock anchored 3 h ago (its timeline is ~7 days ahead)."""
    clock = ScaledClock(SCALE, anchor_wall_s=time.time() - 3 * 3600)
    path = tmp_path / "deals.duckdb"
    with KeepaSimulator(SimulatorConfig(refill_rate=10, catalog_size=320), clock=clock) as sim:
        query = DealQueryResource()
        runtime = build_runtime(KeepaResource(mode="simulator", simulator_url=sim.base_url),
                                DealsDatabaseResource(path=str(path)), TokenBudgetResource(refill_rate_guess=10),
                                owner="test", clock=clock)
        report = runtime.recent_deals(query.upsert_settings()).run(deadline_ms=runtime.deadline_ms)
    assert report.status == "complete" and report.watermark_after is not None
    return path, clock


def test_the_database_records_its_clock_and_a_real_time_reader_gets_it_back(scaled_db):
    path, clock = scaled_db
    db = Database(path)
    back = clock_for_database(db, SystemClock())
    assert isinstance(back, ScaledClock)
    assert back.scale == SCALE and back.anchor_wall_s == pytest.approx(clock.anchor_wall_s)
    # The watermark is behind the pipeline's clock, and would be ~25 days "ahead" if read in real time.
    assert watermark_check(db, back)["passed"] is True
    leaked = watermark_check(db, SystemClock())
    assert leaked["passed"] is False and leaked["ahead_of_clock_minutes"] > 5 * 24 * 60


def test_status_in_real_time_shows_the_database_on_its_own_clock(scaled_db, tmp_path):
    path, _ = scaled_db
    done = run_cli(["status", "--json"], clean_env(tmp_path, DEALS_DB_PATH=str(path)), tmp_path)
    assert done.returncode == 0, done.stderr
    health = json.loads(done.stdout)
    assert health["clock"]["description"].startswith("simulated x60 since ")
    now = datetime.fromisoformat(health["clock"]["now"])
    shown = [health["tokens"]["server_status_at"], health["upsert"]["watermark"]["last_update"]]
    assert all(datetime.fromisoformat(t) <= now for t in shown), (shown, now)
    assert 0 <= health["upsert"]["newest_deal_age_minutes"] < 24 * 60
    assert health["tokens"]["projected_balance"] <= health["tokens"]["cap"]


def test_a_process_on_another_clock_is_refused_with_one_line(scaled_db, tmp_path):
    path, _ = scaled_db
    with pytest.raises(ClockMismatch, match="was made on a clock simulated x60 since"):
        clock_for_database(Database(path), ScaledClock(600.0))
    env = clean_env(tmp_path, DEALS_DB_PATH=str(path), DEALS_PIPELINE_TIME_SCALE="600")
    done = run_cli(["status"], env, tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "was made on a clock simulated x60 since" in done.stderr and "Traceback" not in done.stderr


def test_a_real_time_database_refuses_a_scaled_clock(tmp_path):
    db = Database(tmp_path / "real.duckdb")
    assert isinstance(clock_for_database(db, SystemClock()), SystemClock)
    with pytest.raises(ClockMismatch, match="real time"):
        clock_for_database(db, ScaledClock(600.0))
