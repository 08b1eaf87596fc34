"""Running the `deals-pipeline` console script as a user does: a subprocess with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CLI = str(Path(sys.executable).parent / "deals-pipeline")
#: Variables a test must not inherit from the developer's shell or from `make`.
STATE_VARS = ("KEEPA_API_KEY", "KEEPA_DOMAIN", "KEEPA_SIMULATOR_URL", "KEEPA_API_BASE_URL", "DEALS_PIPELINE_MODE",
              "DEALS_DB_PATH", "DAGSTER_HOME", "DEALS_PIPELINE_TIME_SCALE", "DEALS_PIPELINE_TIME_ANCHOR",
              "DEALS_RUN_BUDGET_MINUTES", "DEALS_UPSERT_INTERVAL_S", "DEALS_PIPELINE_CLI_WORKER")


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without pipeline state, with DAGSTER_HOME and the DB under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if k not in STATE_VARS}
    env.update(DAGSTER_HOME=str(tmp_path / "dagster_home"), DEALS_DB_PATH=str(tmp_path / "deals.duckdb"))
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
