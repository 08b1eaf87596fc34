"""Real-API mode never starts afresh by accident: a missing database is refused unless `init` made it."""

from __future__ import annotations

import pytest

from deals_pipeline.defs.resources import (
    DealsDatabaseResource,
    KeepaResource,
    TokenBudgetResource,
    build_runtime,
)
from deals_pipeline.state_paths import MissingDatabase
from deals_pipeline_tests.cli._cli import clean_env, run_cli

pytestmark = pytest.mark.slow  # subprocesses of the console script and Dagster resources


def test_cli_backfill_refuses_a_missing_database_in_keepa_mode(tmp_path, sentinel_key):
    typo = tmp_path / "nonexistent" / "dir" / "x.duckdb"
    env = clean_env(tmp_path, KEEPA_API_KEY=sentinel_key, DEALS_DB_PATH=str(typo),
                    KEEPA_API_BASE_URL="http://127.0.0.1:9")  # nothing listens: no request may be needed
    done = run_cli(["backfill", "--pages", "2-3"], env, tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"no database at {typo}" in done.stderr and "deals-pipeline init" in done.stderr
    assert sentinel_key not in done.stderr + done.stdout
    assert not typo.parent.exists(), "the mistyped folder was not created"


def test_init_creates_the_database_then_it_is_accepted(tmp_path, sentinel_key):
    path = tmp_path / "real" / "deals.duckdb"
    env = clean_env(tmp_path, KEEPA_API_KEY=sentinel_key, DEALS_DB_PATH=str(path))
    done = run_cli(["init"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert path.exists() and "created" in done.stdout and "keepa data, real time" in done.stdout
    again = run_cli(["init"], env, tmp_path)
    assert again.returncode == 0 and "already there" in again.stdout
    status = run_cli(["status", "--json"], env, tmp_path)
    assert status.returncode == 0, status.stderr


def test_a_run_refuses_a_missing_database_in_keepa_mode_and_simulator_mode_creates_one(tmp_path):
    missing = tmp_path / "typo" / "deals.duckdb"
    with pytest.raises(MissingDatabase, match="deals-pipeline init"):
        build_runtime(KeepaResource(mode="keepa", api_key="k", base_url="http://127.0.0.1:9"),
                      DealsDatabaseResource(path=str(missing)), TokenBudgetResource(), owner="t")
    assert not missing.parent.exists()
    runtime = build_runtime(KeepaResource(mode="simulator", simulator_url="http://127.0.0.1:9"),
                            DealsDatabaseResource(path=str(missing)), TokenBudgetResource(), owner="t")
    assert runtime.source == "simulator" and missing.exists()
