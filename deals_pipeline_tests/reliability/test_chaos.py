"""Chaos: 50+ random SIGKILLs across a multi-page backfill with the upserter interleaved.

Two lanes of worker processes (``harness/worker.py``) run side by side against ONE simulator (in this
process, real time, 2000 tokens/min, 10 ms latency) and ONE DuckDB file:

* ``bf``: ``worker backfill --pages 0-3``, each process SIGKILLed at a random moment while it works
  (0-2 s after its first request; startup takes 1.3-2.5 s here) or, for 10 %, during startup;
* ``up``: ``worker upsert --runs 100000``, likewise.

The chaos stops once there were 50 kills and the backfill is paying for chunks of page 1.

Every process gets its own API key, so the simulator's log says exactly which process was served
what. Afterwards the database, the ledger and the simulator must agree:

* nothing lost: every ASIN of a completed page's snapshot, and of every 'done' chunk, is stored;
* nothing duplicated: one row per ASIN; a page snapshot is fetched again only when the process that
  fetched it was killed before storing it;
* re-spend is at most one chunk per kill: a paid /product (or snapshot) request is paid again only
  when its ledger row was never committed, i.e. its process was killed with it in flight, and each
  killed process accounts for at most one chunk (<= chunk_size ASINs) or one page; so sum(n - 1) over
  the simulator's product_fetches <= kills x chunk_size, and likewise for deal pages. (The two lanes
  may also race for the same ASIN, since harness workers have no keepa_api pool; that is counted.)
* state invariants: the upsert watermark <= the newest stored lastUpdate and every deal between the
  upserter's oldest pick and the watermark is stored; orphaned 'reserved' ledger rows are at most one
  unit of work per killed process and stop counting once their TTL passes; the ledger's actual spend
  equals the simulator's tokens_consumed minus exactly the responses a killed process never recorded.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from deals_pipeline.budget import BudgetPolicy, TokenBudget
from deals_pipeline.clock import ManualClock, SystemClock
from deals_pipeline.simulator import FaultConfig, SimulatorConfig
from deals_pipeline.storage import Database
from deals_pipeline.upsert.service import Watermark, read_watermark
from deals_pipeline_tests.reliability._support import Lane, RecordingSimulator, match_ledger, query, run_lanes

CHUNK = 4  # the worker's chunk size (conftest.Stack.backfill / updater default)
MIN_KILLS = 50
#: Kill 0-2 s after the worker's first request (its startup takes 1.3-2.5 s here, so "1-3 s after start"
#: with the brief's ~1 s startup); 10 % of the workers instead die during startup (0.3-1.5 s).
WORK_WINDOW_S = (0.0, 2.0)
P_STARTUP_KILL = 0.1
#: A runaway guard only (about 90 s are needed on two idle shared cores, several times that on a
#: loaded box: each process's startup grows with the load); reaching it fails the test.
MAX_WALL_S = 600
#: A worker that has not reached the simulator this long after its start is killed anyway (a hang guard;
#: startup is 1.3-2.5 s idle, 10 s and more at a high load average).
GIVE_UP_S = 60.0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_chaos_loses_nothing_and_respends_at_most_one_request_per_kill(tmp_path: Path) -> None:
    seed = int(os.environ.get("RELIABILITY_SEED", str(time.time_ns() % 2**31)))
    rng = random.Random(seed)
    db_path = tmp_path / "chaos.duckdb"
    with Database(db_path, data_mode="simulator").connect():
        pass  # migrate once, before any worker races for it
    logs = tmp_path / "logs"
    logs.mkdir()
    config = SimulatorConfig(refill_rate=2000, catalog_size=800, seed=21, faults=FaultConfig(latency_ms=10))
    with RecordingSimulator(config, clock=SystemClock()) as sim:
        lanes = [
            Lane("bf", ["backfill", "--pages", "0-3"], sim_url=sim.base_url, db_path=db_path, log_dir=logs,
                 rng=rng, first_contact=sim.first_contact, work_window_s=WORK_WINDOW_S, p_startup=P_STARTUP_KILL,
                 give_up_s=GIVE_UP_S),
            Lane("up", ["upsert", "--runs", "100000"], sim_url=sim.base_url, db_path=db_path, log_dir=logs,
                 rng=rng, first_contact=sim.first_contact, work_window_s=WORK_WINDOW_S, p_startup=P_STARTUP_KILL,
                 give_up_s=GIVE_UP_S),
        ]

        def crossed_a_page() -> bool:
            # The worker fetches page 1 only after run_page(0) (no faults here: page 0 is complete);
            # a /product after that means chunks of page 1 are being paid for.
            log = sim.served_log()
            first = next((s.seq for s in log if s.who.startswith("bf") and s.endpoint == "deal" and s.page >= 1), None)
            return first is not None and any(s.seq > first and s.who.startswith("bf") and s.endpoint == "product"
                                             for s in log)

        # Stop on progress, not on time: 50 kills and the backfill working past its first page.
        wall = run_lanes(lanes, until=lambda: sum(lane.kills for lane in lanes) >= MIN_KILLS and crossed_a_page(),
                         max_wall_s=MAX_WALL_S)
        served = sim.served_log()
        stats = sim.stats()
        versions = {v.asin: v.last_update for v in sim.catalog.versions()}  # no drift: one version each

    runs = [r for lane in lanes for r in lane.runs]
    killed = {r.key for r in runs if r.killed}
    kills = len(killed)
    kills_by_lane = {lane.name: lane.kills for lane in lanes}
    startup_kills = sum(lane.startup_kills for lane in lanes)
    assert kills >= MIN_KILLS, f"only {kills} kills in {wall:.0f}s (seed {seed})"
    assert crossed_a_page(), f"the backfill never got past page 0 in {wall:.0f}s of chaos (seed {seed})"

    # -- every process that was not killed ended cleanly; none failed on a lock ------------------
    finished = [r for r in runs if not r.killed]
    assert all(r.returncode == 0 for r in finished), [(r.key, r.returncode, r.output()[-2000:]) for r in finished
                                                       if r.returncode != 0]
    for r in runs:
        text = r.output()
        assert "Traceback" not in text and "DatabaseBusy" not in text, (r.key, text[-2000:])

    # -- who paid for what ------------------------------------------------------------------------
    product_fetches: dict[str, list] = defaultdict(list)
    for s in served:
        if s.endpoint == "product":
            for asin in s.asins:
                product_fetches[asin].append(s)
    assert Counter({a: len(f) for a, f in product_fetches.items()}) == stats.product_fetches
    snapshot_fetches: dict[int, list] = defaultdict(list)
    for s in served:
        if s.endpoint == "deal" and s.who.startswith("bf"):
            assert s.sort_type == 4 and s.page in (0, 1, 2, 3), s
            snapshot_fetches[s.page].append(s)

    # Which served requests were committed, and which were charged but never recorded (see match_ledger).
    pid_of = {r.key: r.proc.pid for r in runs}
    committed, unrecorded_tokens = match_ledger(db_path, runs, served)

    # Paid twice: either the first payment was never committed (its process was killed with it in
    # flight), or the two lanes fetched the same ASIN at the same time (harness workers have no
    # keepa_api pool to serialise them); within one lane only the first can happen.
    uncommitted_repaid: dict[str, dict[int, object]] = defaultdict(dict)
    races = []
    for asin, fetches in product_fetches.items():
        for earlier, later in zip(fetches, fetches[1:]):
            if not committed[earlier.seq]:
                uncommitted_repaid[earlier.who][earlier.seq] = earlier
            else:
                assert earlier.who[:2] != later.who[:2], (
                    f"{asin} was paid twice by the {earlier.who[:2]} lane although the first payment was "
                    f"committed: {earlier.who} (request {earlier.seq}) then {later.who} (request {later.seq})"
                )
                races.append((asin, earlier.who, later.who))
    for page, fetches in snapshot_fetches.items():
        for earlier in fetches[:-1]:
            assert not committed[earlier.seq], f"page {page}: a stored snapshot was fetched again"
            uncommitted_repaid[earlier.who][earlier.seq] = earlier
    for who, requests in uncommitted_repaid.items():
        assert who in killed
        pages = [r for r in requests.values() if r.endpoint == "deal"]
        asins = {a for r in requests.values() if r.endpoint == "product" for a in r.asins}
        assert (len(pages) == 1 and not asins) or (not pages and len(asins) <= CHUNK), (
            f"{who} was killed once, but {len(pages)} page(s) and {len(asins)} ASINs it got were paid again"
        )

    product_respend = sum(n - 1 for n in stats.product_fetches.values())
    page_respend = sum(len(f) - 1 for f in snapshot_fetches.values())
    assert product_respend <= kills * CHUNK, (product_respend, kills)
    assert page_respend <= kills_by_lane["bf"], (page_respend, kills_by_lane)

    # -- the database ------------------------------------------------------------------------------
    n_rows, n_distinct = query(db_path, "SELECT count(*), count(DISTINCT asin) FROM deals")[0]
    assert n_rows == n_distinct
    stored = dict(query(db_path, "SELECT asin, last_update_minute FROM deals"))
    snapshots = {int(p): list(a) for p, a in query(db_path, "SELECT page, asins FROM page_snapshots")}
    assert sorted(snapshots) == list(range(len(snapshots))), f"snapshot pages have a gap: {sorted(snapshots)}"
    chunks = query(db_path, "SELECT page, chunk_index, asins, status FROM page_chunks ORDER BY page, chunk_index")
    assert not [c for c in chunks if c[3] == "failed"], "no faults were injected: no chunk may fail"
    by_page: dict[int, list] = defaultdict(list)
    for page, index, asins, status in chunks:
        by_page[int(page)].append((index, list(asins), status))
    complete_pages = []
    for page, asins in snapshots.items():
        # The stored snapshot is what the simulator last served for that page (a killed fetch is never stored).
        assert asins == list(snapshot_fetches[page][-1].asins)
        # Chunks partition the snapshot exactly: nothing dropped between snapshot and chunks.
        assert [a for _, chunk, _ in by_page[page] for a in chunk] == list(dict.fromkeys(asins))
        if all(status == "done" for _, _, status in by_page[page]):
            complete_pages.append(page)
            missing = set(asins) - set(stored)
            assert not missing, f"page {page} is complete but {len(missing)} of its deals are not stored"
    done_chunks = [(p, i, a) for p, i, a, s in chunks if s == "done"]
    assert done_chunks, "the backfill made no progress at all"
    for page, index, asins in done_chunks:
        assert set(asins) <= set(stored), f"page {page} chunk {index} is done but not stored"

    # -- the upsert watermark ------------------------------------------------------------------------
    db = Database(db_path, data_mode="simulator")
    wm = read_watermark(db)
    up_fetched = {a for s in served if s.endpoint == "product" and s.who.startswith("up") for a in s.asins}
    below_wm_checked = 0
    if wm is not None:
        assert wm.last_update_minute <= max(stored.values())
    if wm is not None and up_fetched:
        lowest = min(Watermark(versions[a], a) for a in up_fetched)
        for asin, minute in versions.items():
            if lowest <= Watermark(minute, asin) <= wm:
                below_wm_checked += 1
                assert stored.get(asin, -1) >= minute, f"{asin}@{minute} is at or below the watermark but not stored"

    # -- the ledger against the simulator --------------------------------------------------------------
    killed_owners = {f"worker:{pid_of[k]}" for k in killed}
    ledger_actual = query(db_path, "SELECT coalesce(sum(actual), 0) FROM token_ledger WHERE state <> 'released'")[0][0]
    gap = stats.tokens_consumed - int(ledger_actual)
    # Exactly the requests whose response never got recorded, each at most one per killed process.
    assert gap == unrecorded_tokens, (stats.tokens_consumed, ledger_actual, unrecorded_tokens)

    ttl = BudgetPolicy().reservation_ttl_ms
    orphans = query(db_path, "SELECT owner, created_ms, expires_ms, actual, server_ts_ms FROM token_ledger "
                             "WHERE state = 'reserved'")
    assert {o[0] for o in orphans} <= killed_owners, "a process that was not killed left a reservation open"
    # Open reservations of a killed process all belong to its last unit of work (nothing settled after them).
    late = query(db_path, "SELECT r.owner FROM token_ledger r JOIN token_ledger s USING (owner) "
                          "WHERE r.state = 'reserved' AND s.state = 'settled' AND s.created_ms > r.created_ms")
    assert not late, f"a reservation stayed open while its process went on: {late[:3]}"
    assert all(o[2] - o[1] == ttl for o in orphans)
    blocking_now = sum(1 for o in orphans if o[4] is None)
    latest_expiry = max((o[2] for o in orphans), default=0)
    probe = TokenBudget(db, ManualClock(latest_expiry + 1), BudgetPolicy(), owner="probe")
    assert probe.projection().reserved_in_flight == 0, "expired reservations still block spending"

    summary = {
        "seed": seed, "wall_s": round(wall, 1), "kills": kills, "kills_by_lane": kills_by_lane,
        "startup_kills": startup_kills, "processes": len(runs), "exited_cleanly": len(finished),
        "pages_snapshotted": sorted(snapshots), "pages_complete": complete_pages,
        "chunks_done": len(done_chunks), "chunks_total": len(chunks), "deals_stored": n_rows,
        "product_respend_asins": product_respend, "respend_bound": kills * CHUNK,
        "kills_that_cost_a_repeat": len(uncommitted_repaid),
        "snapshot_refetches": page_respend, "cross_lane_races": len(races),
        "tokens_sim": stats.tokens_consumed, "tokens_ledger": int(ledger_actual), "gap": gap,
        "orphan_reservations": len(orphans), "orphans_blocking_now": blocking_now,
        "watermark": None if wm is None else f"{wm.last_update_minute}/{wm.asin}",
        "deals_checked_below_watermark": below_wm_checked, "rejected_429": stats.rejected_429,
    }
    print("CHAOS", summary)
