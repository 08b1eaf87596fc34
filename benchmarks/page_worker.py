"""One deal page in a fresh process, plain Python or through Dagster (a helper of run_benchmarks.py).

    python benchmarks/page_worker.py {plain|dagster} SIMULATOR_URL DB_PATH PAGE

The simulator runs in the parent (benchmark) process on a SystemClock; this process only talks to it
over HTTP. ``plain`` builds the services directly (no Dagster import at all, so its RSS is the plain
layer's) with the values the Dagster resources below resolve to; ``dagster`` runs ``deal_pages_job``
with those resources. The parent checks both runs charged the same tokens and stored the same ASINs.
Prints one JSON line: wall seconds of the page run (imports excluded), DuckDB opens, RSS figures.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Real time for the ops (clock_from_env() reads these).
os.environ.pop("DEALS_PIPELINE_TIME_SCALE", None)
os.environ.pop("DEALS_PIPELINE_TIME_ANCHOR", None)

REFILL_RATE_GUESS = 100_000


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM of /proc/self/status (getrusage's ru_maxrss would not do: on Linux it
    survives exec, so a child started from a big parent reports at least the parent's RSS at fork time)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def instrument() -> dict:
    """Count and time DuckDB opens and stored-snapshot loads (``PageBackfill.load_snapshot``: the cached
    read + JSON parse of the page). Patches public entry points only, so a rename fails here at once."""
    from deals_pipeline.backfill.service import PageBackfill
    from deals_pipeline.storage import db as db_module

    stats = {"n": 0, "s": 0.0, "snap_n": 0, "snap_s": 0.0}
    real_open = db_module.Database._open
    real_load = PageBackfill.load_snapshot

    def counting_open(self):
        t = time.perf_counter()
        try:
            return real_open(self)
        finally:
            stats["n"] += 1
            stats["s"] += time.perf_counter() - t

    def timed_load(self, page):
        t = time.perf_counter()
        try:
            return real_load(self, page)
        finally:
            stats["snap_n"] += 1
            stats["snap_s"] += time.perf_counter() - t

    db_module.Database._open = counting_open
    PageBackfill.load_snapshot = timed_load
    return stats


def run_plain(sim_url: str, db_path: str, page: int, stats: dict) -> dict:
    from deals_pipeline.backfill.service import BackfillSettings, PageBackfill
    from deals_pipeline.budget import BudgetPolicy, TokenBudget
    from deals_pipeline.clock import SystemClock
    from deals_pipeline.config import DEFAULT_SELECTION
    from deals_pipeline.enrichment import ViabilityRules
    from deals_pipeline.keepa.client import KeepaClient
    from deals_pipeline.keepa.query import DealSelection, ProductOptions
    from deals_pipeline.storage import Database

    # What KeepaResource(mode="simulator") / DealsDatabaseResource / TokenBudgetResource / DealQueryResource()
    # resolve to (defs/resources.py), built without Dagster.
    clock = SystemClock()
    client = KeepaClient("simulator-demo-key", base_url=sim_url, domain=1, clock=clock, timeout_s=(5.0, 60.0),
                         max_attempts=4)
    db = Database(db_path, busy_timeout_s=60.0, data_mode="simulator")
    budget = TokenBudget(db, clock, BudgetPolicy(initial_refill_rate=REFILL_RATE_GUESS), owner="bench-plain",
                         sync=client.token_status)
    settings = BackfillSettings(selection=DealSelection.from_mapping(DEFAULT_SELECTION),
                                product_options=ProductOptions(stats=90, offers=20, rating=True),
                                rules=ViabilityRules(), chunk_size=4)
    backfill = PageBackfill(db, client, budget, settings, clock=clock, source="simulator")
    deadline_ms = clock.now_ms() + 120 * 60_000
    t0 = time.perf_counter()
    summary = backfill.run_page(page, deadline_ms=deadline_ms)
    out = {"wall_s": time.perf_counter() - t0}
    out.update(duckdb_opens=stats["n"], duckdb_open_s=stats["s"], snapshot_loads=stats["snap_n"],
               snapshot_load_s=stats["snap_s"])
    out.update(complete=summary.complete, chunks_total=summary.chunks_total, chunks_done=summary.chunks_done)
    return out


def run_dagster(sim_url: str, db_path: str, page: int, stats: dict) -> dict:
    import dagster as dg

    from deals_pipeline.defs.deal_pages import deal_pages, deal_pages_job
    from deals_pipeline.defs.resources import DealQueryResource, DealsDatabaseResource, KeepaResource, TokenBudgetResource
    from deals_pipeline.storage import Database

    resources = {
        "keepa": KeepaResource(mode="simulator", simulator_url=sim_url),
        "database": DealsDatabaseResource(path=db_path),
        "token_budget": TokenBudgetResource(refill_rate_guess=REFILL_RATE_GUESS),
        # The plain run's settings: single-stage enrichment (no stats rules) and no in-slot wait bound,
        # so both runs buy the same products and the ratio measures orchestration only.
        "query": DealQueryResource(stats_max_out_of_stock_pct90=None, max_wait_in_slot_s=24 * 3600),
    }
    defs = dg.Definitions(assets=[deal_pages], jobs=[deal_pages_job], resources=resources)
    job = defs.get_job_def("deal_pages_job")
    instance = dg.DagsterInstance.ephemeral()
    t0 = time.perf_counter()
    result = job.execute_in_process(partition_key=str(page), instance=instance, raise_on_error=False)
    out = {"wall_s": time.perf_counter() - t0}
    out.update(duckdb_opens=stats["n"], duckdb_open_s=stats["s"], snapshot_loads=stats["snap_n"],
               snapshot_load_s=stats["snap_s"])
    out["success"] = bool(result.success)
    with Database(db_path).connect() as con:
        total, done = con.execute(
            "SELECT count(*), count(*) FILTER (status = 'done') FROM page_chunks WHERE page = ?", [page]).fetchone()
    out.update(complete=bool(result.success and total == done), chunks_total=int(total), chunks_done=int(done))
    instance.dispose()
    return out


def main() -> None:
    mode, sim_url, db_path, page = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import psutil

    stats = instrument()
    # Import everything the run needs before the clock starts.
    if mode == "dagster":
        import dagster  # noqa: F401

        import deals_pipeline.defs.deal_pages  # noqa: F401
        import deals_pipeline.defs.resources  # noqa: F401
    import deals_pipeline.enrichment  # noqa: F401
    import deals_pipeline.keepa.client  # noqa: F401

    rss_before = psutil.Process().memory_info().rss
    if mode == "plain":
        out = run_plain(sim_url, db_path, page, stats)
    elif mode == "dagster":
        out = run_dagster(sim_url, db_path, page, stats)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    out.update(mode=mode, page=page, dagster_imported="dagster" in sys.modules)

    from deals_pipeline.storage import Database

    with Database(db_path).connect() as con:
        out["deals_stored"] = int(con.execute("SELECT count(*) FROM deals WHERE enriched_at IS NOT NULL").fetchone()[0])
        out["asins"] = sorted(r[0] for r in con.execute("SELECT asin FROM deals").fetchall())
    out["rss_before_run_mb"] = rss_before / 2**20
    out["rss_after_run_mb"] = psutil.Process().memory_info().rss / 2**20
    out["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
