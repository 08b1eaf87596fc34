"""SIGKILL a page run at random moments: every deal stored once, at most the in-flight chunk re-bought.

The worker is the plain-Python page runner (deals_pipeline_tests/harness/worker.py); the Dagster
ops call exactly the same service methods, and a separate test kills real
`dagster asset materialize` runs.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from deals_pipeline.clock import SystemClock
from deals_pipeline.simulator import FaultConfig, KeepaSimulator, SimulatorConfig
from deals_pipeline.storage import Database

pytestmark = pytest.mark.slow  # SIGKILLed subprocesses

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 4


def _worker_env(sim_url: str, db_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALS_PIPELINE_TIME")}
    env.update(SIM_URL=sim_url, DEALS_DB_PATH=str(db_path), PYTHONPATH=str(ROOT), **extra)
    return env


def _kill_loop(cmd, env, *, kills_wanted: int, rng: random.Random, window=(0.9, 2.6), max_runs=200) -> tuple[int, int]:
    """Start ``cmd`` again and again, SIGKILLing it at random moments, until ``kills_wanted`` kills."""
    kills = runs = 0
    while kills < kills_wanted and runs < max_runs:
        runs += 1
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=rng.uniform(*window))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return kills, runs


def _finish(cmd, env) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_twenty_plus_sigkills_mid_page_lose_nothing_and_rebuy_at_most_the_inflight_chunk(tmp_path):
    db_path = tmp_path / "kill.duckdb"
    config = SimulatorConfig(refill_rate=3000, catalog_size=600, faults=FaultConfig(latency_ms=15))
    with KeepaSimulator(config, clock=SystemClock()) as sim:
        env = _worker_env(sim.base_url, db_path)
        cmd = [sys.executable, "-m", "deals_pipeline_tests.harness.worker", "backfill", "--pages", "0-1"]
        kills, runs = _kill_loop(cmd, env, kills_wanted=22, rng=random.Random(20261128))
        _finish(cmd, env)
        stats = sim.stats()

    assert kills >= 20
    db = Database(db_path, data_mode="simulator")
    with db.connect() as con:
        snapshot_asins = {r[0] for r in con.execute("SELECT unnest(asins) FROM page_snapshots").fetchall()}
        stored = {r[0] for r in con.execute("SELECT asin FROM deals").fetchall()}
        chunk_states = dict(con.execute("SELECT status, count(*) FROM page_chunks GROUP BY ALL").fetchall())
        ledger_product = con.execute(
            "SELECT coalesce(sum(actual), 0) FROM token_ledger WHERE purpose = 'product' AND actual IS NOT NULL"
        ).fetchone()[0]
    assert chunk_states == {"done": 76}, chunk_states  # 2 pages x 38 chunks
    assert snapshot_asins == stored and len(stored) == 300, "every deal of the pages stored exactly once"
    refetched = sum(n - 1 for n in stats.product_fetches.values())
    page_refetches = sum(n - 1 for n in stats.deal_page_fetches.values())
    print(f"kills={kills} runs={runs} refetched_asins={refetched} page_refetches={page_refetches} "
          f"product_tokens={stats.tokens_consumed} ledger_product={ledger_product}")
    # A kill can only lose the chunk (or page fetch) that was in flight.
    assert refetched <= kills * CHUNK
    assert page_refetches <= kills
    assert set(stats.product_fetches) == stored


@pytest.mark.slow
def test_sigkilled_dagster_runs_resume_and_free_their_pool_slot(tmp_path):
    """The real CLI path: `dagster asset materialize` killed mid-page, then rerun to completion."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text((ROOT / "dagster_home" / "dagster.yaml").read_text())
    db_path = tmp_path / "dagster_kill.duckdb"
    config = SimulatorConfig(refill_rate=3000, catalog_size=400, faults=FaultConfig(latency_ms=20))
    with KeepaSimulator(config, clock=SystemClock()) as sim:
        env = _worker_env(sim.base_url, db_path, DAGSTER_HOME=str(dagster_home), DEALS_PIPELINE_MODE="simulator",
                          KEEPA_SIMULATOR_URL=sim.base_url)
        env.pop("KEEPA_API_KEY", None)
        cmd = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m",
               "deals_pipeline.definitions", "--select", "deal_pages", "--partition", "0"]
        kills, _ = _kill_loop(cmd, env, kills_wanted=3, rng=random.Random(7), window=(7.0, 10.0), max_runs=10)
        _finish(cmd, env)  # would hang forever on the killed runs' pool slot without the reaper
        stats = sim.stats()
    assert kills == 3
    with Database(db_path, data_mode="simulator").connect() as con:
        done = con.execute("SELECT count(*) FROM page_chunks WHERE status = 'done'").fetchone()[0]
        stored = con.execute("SELECT count(*) FROM deals").fetchone()[0]
    assert done == 38 and stored == 150
    assert sum(n - 1 for n in stats.product_fetches.values()) <= kills * CHUNK
