"""SIGKILL a page run at events: every deal stored once, at most the in-flight chunk re-bought.

Each kill lands at an observed point of the run's work (a /product request received by the simulator,
or a chunk committed in the DuckDB file), never after a wall-clock sleep, so a busy machine only makes
the runs slower, not the kills land elsewhere; every test checks it made exactly the kills it asked for.

The worker is the plain-Python page runner (deals_pipeline_tests/harness/worker.py); the Dagster
ops call exactly the same service methods, and a separate test kills real
`dagster asset materialize` runs.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pytest

from deals_pipeline.clock import SystemClock
from deals_pipeline.simulator import FaultConfig, KeepaSimulator, SimulatorConfig
from deals_pipeline.storage import Database
from deals_pipeline_tests.harness.processes import (
    REPO,
    KillTally,
    done_chunks,
    product_requests,
    run_and_kill_at,
    run_to_completion,
    worker_env,
)
from deals_pipeline_tests.harness.waiting import GENEROUS_TIMEOUT_S

pytestmark = pytest.mark.slow  # SIGKILLed subprocesses

CHUNK = 4
#: Poll interval of an event read from the DuckDB file: slower than chunks commit, so the observer's
#: read-only opens do not keep the file from the worker.
DB_POLL_S = 0.2


def _kill_at_events(cmd, env, *, sim, db_path: Path, kills_wanted: int, rng: random.Random, max_runs: int,
                    timeout: float = GENEROUS_TIMEOUT_S) -> KillTally:
    """Start ``cmd`` again and again, each time SIGKILLing it at an event, until ``kills_wanted`` kills.

    The event is drawn per run: the run's n-th /product request reached the simulator (n in 1..2: the
    kill lands with that chunk in flight, paid or not yet recorded) or the run's first chunk is committed
    in the database (the kill lands between chunks, a chunk or two later at most). So a kill costs the
    pages (76 chunks) about 2 chunks of progress: they outlast the 22 kills, each of which can be made.
    """
    tally = KillTally(asked=kills_wanted)
    while tally.made < kills_wanted and tally.runs < max_runs:
        requests_before = product_requests(sim)
        done_before = done_chunks(db_path) or 0  # no worker runs now: the file is free (or not created yet)
        if rng.random() < 0.5:
            n = rng.randint(1, 2)
            what, poll_s = f"/product request {n} of run {tally.runs + 1} received", 0.02
            event = lambda n=n, base=requests_before: product_requests(sim) >= base + n  # noqa: E731
        else:
            what, poll_s = f"a chunk of run {tally.runs + 1} committed", DB_POLL_S
            event = lambda base=done_before: (done_chunks(db_path) or 0) > base  # noqa: E731
        started = time.monotonic()
        killed = run_and_kill_at(cmd, env, event=event, what=what, timeout=timeout, poll_s=poll_s)
        tally.made += killed
        tally.finished += not killed
        tally.events.append(what)
        print(f"run {tally.runs}: {'killed at' if killed else 'finished before'} {what} "
              f"after {time.monotonic() - started:.1f} s", flush=True)
    return tally


@pytest.mark.timeout(1800)  # a hang guard: ~1 min idle; each run waits for its first request, 35 s at load ~25
def test_twenty_plus_sigkills_mid_page_lose_nothing_and_rebuy_at_most_the_inflight_chunk(tmp_path):
    db_path = tmp_path / "kill.duckdb"
    config = SimulatorConfig(refill_rate=3000, catalog_size=600, faults=FaultConfig(latency_ms=15))
    with KeepaSimulator(config, clock=SystemClock()) as sim:
        env = worker_env(sim.base_url, db_path)
        cmd = [sys.executable, "-m", "deals_pipeline_tests.harness.worker", "backfill", "--pages", "0-1"]
        tally = _kill_at_events(cmd, env, sim=sim, db_path=db_path, kills_wanted=22, rng=random.Random(20261128),
                                max_runs=40)
        run_to_completion(cmd, env)
        stats = sim.stats()

    kills, runs = tally.made, tally.runs
    assert kills == tally.asked, f"asked for {tally.asked} kills, made {kills} in {runs} runs"
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
@pytest.mark.timeout(2400)  # a hang guard: ~1 min idle; 3 kills then a full page run took > 13 min at load ~30
def test_sigkilled_dagster_runs_resume_and_free_their_pool_slot(tmp_path):
    """The real CLI path: `dagster asset materialize` killed mid-page, then rerun to completion."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
    db_path = tmp_path / "dagster_kill.duckdb"
    config = SimulatorConfig(refill_rate=3000, catalog_size=400, faults=FaultConfig(latency_ms=20))
    with KeepaSimulator(config, clock=SystemClock()) as sim:
        env = worker_env(sim.base_url, db_path, extra=dict(DAGSTER_HOME=str(dagster_home),
                                                           DEALS_PIPELINE_MODE="simulator",
                                                           KEEPA_SIMULATOR_URL=sim.base_url))
        cmd = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m",
               "deals_pipeline.definitions", "--select", "deal_pages", "--partition", "0"]
        rng = random.Random(7)
        tally = KillTally(asked=3)
        for run in range(tally.asked):
            # Kill once the run has committed 1-4 chunks of its own (observed in the DuckDB file): the run
            # is surely mid-page (38 chunks), holding its pool slot, whatever the machine's load.
            base, m = done_chunks(db_path) or 0, rng.randint(1, 4)
            killed = run_and_kill_at(cmd, env, event=lambda base=base, m=m: (done_chunks(db_path) or 0) >= base + m,
                                     what=f"chunk {m} of dagster run {run + 1} committed", timeout=240,
                                     poll_s=DB_POLL_S)
            tally.made += killed
            tally.finished += not killed
        run_to_completion(cmd, env)  # would hang forever on the killed runs' pool slot without the reaper
        stats = sim.stats()
    kills = tally.made
    assert kills == tally.asked, f"asked for {tally.asked} kills, made {kills}; {tally.finished} runs ended first"
    with Database(db_path, data_mode="simulator").connect() as con:
        done = con.execute("SELECT count(*) FROM page_chunks WHERE status = 'done'").fetchone()[0]
        stored = con.execute("SELECT count(*) FROM deals").fetchone()[0]
        # The definitions' default query screens with stats rules: a deal is bought once for stage 1 (stats)
        # and, if it passes, once more for stage 2 (offers). Those are the fetches a run without kills makes.
        stage1_bought, stage2_bought = con.execute(
            "SELECT count(stage1_at_ms), count(enriched_at_ms) FROM deals").fetchone()
    assert done == 38 and stored == 150
    fetches = sum(stats.product_fetches.values())
    assert stage1_bought + stage2_bought > 0
    # A kill can only lose the chunk that was in flight: beyond one purchase per stage, at most a chunk per kill.
    assert fetches - (stage1_bought + stage2_bought) <= kills * CHUNK, (fetches, stage1_bought, stage2_bought)
