"""An upsert run SIGKILLed mid-batch loses nothing, re-buys at most one chunk, and never leaves the
watermark ahead of stored data.

Each kill lands at an event (the run's n-th /product request reached the simulator), never after a
wall-clock sleep, and the test checks it made every kill it asked for.
"""

from __future__ import annotations

import random
import sys

import pytest

import pytest

from deals_pipeline.clock import ScaledClock
from deals_pipeline.simulator import FaultConfig, KeepaSimulator, SimulatorConfig
from deals_pipeline.storage import Database
from deals_pipeline.upsert.service import UpsertSettings, Watermark, read_watermark
from deals_pipeline_tests.harness.processes import product_requests, run_and_kill_at, run_to_completion, worker_env

pytestmark = pytest.mark.slow  # SIGKILLed subprocesses

CHUNK = 4
KILLS = 6
OVERLAP = UpsertSettings.__dataclass_fields__["overlap_minutes"].default


@pytest.mark.timeout(1200)  # a hang guard: ~40 s idle; each killed run waits for its own paid request
def test_killed_upserts_lose_nothing_and_rebuy_at_most_one_chunk_per_kill(tmp_path):
    clock = ScaledClock(60.0)  # one real second is one simulated minute: ~10 new deals per second
    db_path = tmp_path / "upsert_kill.duckdb"
    config = SimulatorConfig(refill_rate=3000, catalog_size=400, drift_new_per_hour=600, drift_updates_per_hour=0,
                             future_minute_fraction=0.0, faults=FaultConfig(latency_ms=10))
    with KeepaSimulator(config, clock=clock) as sim:
        env = worker_env(sim.base_url, db_path, extra=clock.env())
        cmd = [sys.executable, "-m", "deals_pipeline_tests.harness.worker", "upsert", "--runs", "50"]
        run_to_completion([sys.executable, "-m", "deals_pipeline_tests.harness.worker", "upsert"], env)  # the watermark
        db = Database(db_path, data_mode="simulator")
        first = read_watermark(db)
        start_ms = clock.now_ms()
        rng = random.Random(5)
        kills = 0
        for run in range(KILLS):
            # Kill with the run's n-th /product request (chunk n) in flight: paid or not, not yet recorded.
            # At ~10 new deals per wall second every run has chunks to buy, however slow the machine.
            base, n = product_requests(sim), rng.randint(1, 3)
            kills += run_and_kill_at(cmd, env, event=lambda base=base, n=n: product_requests(sim) >= base + n,
                                     what=f"/product request {n} of upsert run {run + 1} received", poll_s=0.02)
            # The invariant after every kill: the watermark is never ahead of stored data.
            with db.connect() as con:
                newest = con.execute("SELECT max(last_update_minute) FROM deals").fetchone()[0]
                stored = dict(con.execute("SELECT asin, last_update_minute FROM deals").fetchall())
            wm = read_watermark(db)
            assert wm.last_update_minute <= newest
            # Deals can still arrive with a lastUpdate just below the watermark after it moved; each run
            # re-reads OVERLAP minutes below it for them. Everything deeper must already be stored.
            settled = Watermark(wm.last_update_minute - OVERLAP, wm.asin)
            below = [v for v in sim.catalog.versions()
                     if v.visible_from_ms > start_ms and Watermark(v.last_update, v.asin) <= settled]
            assert all(stored.get(v.asin, -1) >= v.last_update for v in below), "a deal below the watermark is missing"
        cutoff = clock.now_ms()
        run_to_completion([sys.executable, "-m", "deals_pipeline_tests.harness.worker", "upsert", "--runs", "2"], env)
        stats = sim.stats()
        versions = [v for v in sim.catalog.versions() if start_ms < v.visible_from_ms <= cutoff]

    with db.connect() as con:
        stored = dict(con.execute("SELECT asin, last_update_minute FROM deals").fetchall())
    missing = [(v.asin, v.last_update) for v in versions if stored.get(v.asin, -1) < v.last_update]
    assert kills == KILLS, f"asked for {KILLS} kills, made {kills}: the other runs ended before their event"
    assert first is not None
    assert versions and not missing, f"lost deals: {missing[:10]}"
    refetched = sum(n - 1 for n in stats.product_fetches.values())  # no updates: every refetch is a re-spend
    print(f"kills={kills} new deal versions={len(versions)} refetched_asins={refetched}")
    assert refetched <= kills * CHUNK
