#!/usr/bin/env python
"""deals_pipeline benchmarks: writes benchmarks/RESULTS.md.  Run: ``make bench``.

Every headline figure is a RATIO of two quantities measured in the same run, so it holds on a noisy,
shared machine. Absolute wall times are reported for context only. Sections:

1. Token utilisation: 24 simulated hours at 5 tokens/min with drift, backfill and upserter sharing one
   budget (``harness.simulation.simulate`` on a ManualClock). Full token balance sheet.
2. Freshness: newest-deal age after every upsert run of that same simulation.
3. Orchestration overhead: one deal page through Dagster vs the same chunks through the plain layer.
4. Storage: ``upsert_deals`` of 100,000 deals vs a plain ``INSERT ... SELECT``; peak RSS of a page run.
5. Scaling: the same simulation at 5, 50 and 500 tokens/min.

Scenario modules in ``benchmarks/`` add sections after these (see ``benchmarks/sections.py``).

``--quick`` runs the same code paths on small windows (writes to /tmp unless ``--output`` is given);
CI runs it. Any section that raises or whose check finds a problem makes the run exit non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_DIR = ROOT / "benchmarks"
SAMPLES = ROOT.parent / "shared" / "keepa-samples"

# Real time unless a test harness says otherwise; the Dagster ops read this through clock_from_env().
os.environ.pop("DEALS_PIPELINE_TIME_SCALE", None)
os.environ.pop("DEALS_PIPELINE_TIME_ANCHOR", None)

import duckdb  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402

from deals_pipeline.budget import BudgetPolicy, TokenBudget  # noqa: E402
from deals_pipeline.clock import ManualClock, SystemClock  # noqa: E402
from deals_pipeline.keepa.client import KeepaClient  # noqa: E402
from deals_pipeline.keepa.models import DealPage  # noqa: E402
from deals_pipeline.simulator import CALIBRATED_CHURN, KeepaSimulator, SimulatorConfig  # noqa: E402
from deals_pipeline.storage import Database  # noqa: E402
from deals_pipeline.storage import db as db_module  # noqa: E402
from deals_pipeline.storage.repository import DEAL_COLUMNS, deal_rows, stored_deals, upsert_deals, utcnow  # noqa: E402
from deals_pipeline_tests.conftest import Stack  # noqa: E402
from deals_pipeline_tests.harness.simulation import simulate  # noqa: E402
from sections import BenchContext, Section, discover  # noqa: E402  (benchmarks/ is the script's directory)

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Instrumentation (benchmark process only; nothing in deals_pipeline/ is changed)
# ------------------------------------------------------------------------------------------------

class OpenCounter:
    """Counts DuckDB opens (Database._open) while active."""

    def __init__(self) -> None:
        self.n = 0
        self._real = None

    def __enter__(self) -> "OpenCounter":
        self._real = db_module.Database._open
        real = self._real
        counter = self

        def counting_open(db_self):
            counter.n += 1
            return real(db_self)

        db_module.Database._open = counting_open
        return self

    def __exit__(self, *exc) -> None:
        db_module.Database._open = self._real


ACTOR = {"who": "?"}  # who is talking to the simulator right now (the simulation is single-threaded)


class BackfillProxy:
    """Delegates to a PageBackfill; times each chunk and tags simulator calls as 'backfill'."""

    def __init__(self, inner, clock, opens: OpenCounter) -> None:
        self._inner, self._clock, self._opens = inner, clock, opens
        self.chunks: list[dict] = []

    def snapshot(self, page, **kw):
        ACTOR["who"] = "backfill"
        return self._inner.snapshot(page, **kw)

    def run_chunk(self, snapshot, chunk_index, **kw):
        ACTOR["who"] = "backfill"
        opens0, t0, sim0 = self._opens.n, time.perf_counter(), self._clock.now_ms()
        out = self._inner.run_chunk(snapshot, chunk_index, **kw)
        self.chunks.append({"page": snapshot.page, "status": out.status, "tokens": out.tokens_spent,
                            "stored": out.deals_stored, "wall_s": time.perf_counter() - t0,
                            "opens": self._opens.n - opens0, "sim_wait_ms": self._clock.now_ms() - sim0})
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)


class UpdaterProxy:
    """Delegates to a RecentDealsUpdater; times each run and tags simulator calls as 'upsert'."""

    def __init__(self, inner, clock, opens: OpenCounter) -> None:
        self._inner, self._clock, self._opens = inner, clock, opens
        self.runs: list[dict] = []

    def run(self, **kw):
        ACTOR["who"] = "upsert"
        opens0, t0 = self._opens.n, time.perf_counter()
        report = self._inner.run(**kw)
        self.runs.append({"report": report, "wall_s": time.perf_counter() - t0, "opens": self._opens.n - opens0})
        return report

    def __getattr__(self, name):
        return getattr(self._inner, name)


def instrument_products(sim: KeepaSimulator) -> list[tuple]:
    """Log every product the simulator delivers: (now_ms, asin, server lastUpdate, cost, actor)."""
    catalog = sim.catalog
    real = catalog.product
    log_rows: list[tuple] = []

    def product(asin, req, now_ms, domain_id=1):
        out = real(asin, req, now_ms, domain_id=domain_id)
        deal = catalog.deal(asin)
        log_rows.append((now_ms, asin, None if deal is None else int(deal["lastUpdate"]),
                         catalog.product_cost(asin, req, now_ms), ACTOR["who"]))
        return out

    catalog.product = product
    return log_rows


# ------------------------------------------------------------------------------------------------
# Simulation (sections 1, 2, 5)
# ------------------------------------------------------------------------------------------------

def build_stack(tmp: Path, config: SimulatorConfig, name: str) -> Stack:
    """Same wiring as the ``make_stack`` test fixture."""
    clock = ManualClock()
    sim = KeepaSimulator(config, clock=clock).start()
    db_path = tmp / f"{name}.duckdb"
    db = Database(db_path, data_mode="simulator")
    client = KeepaClient("bench-key", base_url=sim.base_url, clock=clock, max_attempts=4, timeout_s=(2.0, 5.0))
    budget = TokenBudget(db, clock, BudgetPolicy(), owner="bench", sync=client.token_status)
    return Stack(sim=sim, clock=clock, db=db, client=client, budget=budget, db_path=db_path)


def run_simulation(tmp: Path, *, name: str, rate: int, hours: float, catalog_size: int, churn_scale: float,
                   initial_tokens: int | None) -> dict:
    """``churn_scale`` multiplies the simulator's CALIBRATED_CHURN (60 new / 250 updated / 60 expired per hour)."""
    churn = {k: v * churn_scale for k, v in CALIBRATED_CHURN.items()}
    config = SimulatorConfig(refill_rate=rate, initial_tokens=initial_tokens, catalog_size=catalog_size, **churn)
    stack = build_stack(tmp, config, name)
    sim, clock = stack.sim, stack.clock
    try:
        products = instrument_products(sim)
        start_ms = clock.now_ms()
        initial = sim.bucket.balance(start_ms)
        with OpenCounter() as opens:
            backfill = BackfillProxy(stack.backfill(), clock, opens)
            updater = UpdaterProxy(stack.updater(), clock, opens)
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            # End 1 ms before the refill that lands on the window's last instant: the pipeline could not
            # spend it, and counting it would charge a short window with one unusable minute of refill.
            report = simulate(stack, hours=hours - 1 / 3_600_000, upsert_interval_min=5, backfill=backfill,
                              updater=updater)
            wall = time.perf_counter() - t0
            load1 = os.getloadavg()[0]
            total_opens = opens.n
        end_ms = clock.now_ms()
        balance_end = sim.bucket.balance(end_ms)
        refills = sim.bucket.refills
        stats = sim.stats()
        with stack.db.connect() as con:
            deals = con.execute(
                "SELECT asin, enriched_at IS NOT NULL, viability, origin, last_update_minute, enriched_minute "
                "FROM deals").fetchall()
            ledger = con.execute(
                "SELECT purpose, detail, state, coalesce(actual, 0), predicted FROM token_ledger").fetchall()
    finally:
        stack.sim.stop()

    sim_hours = (end_ms - start_ms) / 3_600_000
    refill_gross = refills * rate
    available = initial + refill_gross
    consumed = stats.tokens_consumed
    lost_to_cap = available - consumed - balance_end

    # -- /product fetches: new deal, new version of a deal, or nothing new -----------------------
    enriched_rows = {a for a, enriched, *_ in deals if enriched}
    by_asin: dict[str, list[tuple]] = defaultdict(list)
    for row in products:
        by_asin[row[1]].append(row)
    cls_tokens: Counter = Counter()
    cls_count: Counter = Counter()
    waste_pairs: Counter = Counter()
    for asin, fetches in by_asin.items():
        fetches.sort()
        prev = None
        for f in fetches:
            _, _, version, cost, actor = f
            if prev is None:
                kind = "new"
            elif version is not None and prev[2] is not None and version > prev[2]:
                kind = "update"
            else:
                kind = "refetch_same_version"
                waste_pairs[f"{prev[4]}->{actor}"] += cost
            if asin not in enriched_rows:
                kind = "dropped"
            cls_tokens[kind] += cost
            cls_count[kind] += 1
            prev = f
    product_tokens = sum(r[3] for r in products)
    product_fetches = len(products)
    # The brief's raw formula: sum over ASINs of (n - 1) x that ASIN's cost (includes legitimate updates).
    raw_refetch_tokens = sum((n - 1) * by_asin[a][0][3] for a, n in stats.product_fetches.items() if n > 1)

    # -- deal pages from the pipeline's own ledger -------------------------------------------------
    backfill_pages: Counter = Counter()
    upsert_page_tokens = 0
    ledger_states: Counter = Counter()
    for purpose, detail, state, actual, _pred in ledger:
        ledger_states[state] += 1
        if purpose != "deal_page" or state != "settled":
            continue
        if detail.startswith("recent page"):
            upsert_page_tokens += actual
        elif detail.startswith("page "):
            backfill_pages[int(detail.split()[1])] += 1
    backfill_page_tokens = 5 * sum(backfill_pages.values())
    backfill_page_refetch_tokens = 5 * sum(n - 1 for n in backfill_pages.values())
    runs = [r["report"] for r in updater.runs]
    nothing_new_poll_tokens = sum(r.tokens_spent for r in runs if r.status == "nothing_new")
    failed_or_unsettled = sum(1 for _, _, s, _, _ in ledger if s not in ("settled", "released"))

    enriched_stored = len(enriched_rows)
    useful_enrichments = cls_count["new"] + cls_count["update"]
    useful_tokens = cls_tokens["new"] + cls_tokens["update"]
    wasted_product = cls_tokens["refetch_same_version"] + cls_tokens["dropped"]
    tpd_all_in = consumed / enriched_stored if enriched_stored else float("nan")
    product_cost_per_asin = product_tokens / product_fetches if product_fetches else float("nan")
    limit_all_in = available / tpd_all_in if enriched_stored else float("nan")
    limit_physical = available / product_cost_per_asin if product_fetches else float("nan")

    chunk_rows = [c for c in backfill.chunks if c["status"] == "done"]
    upsert_chunks = sum(r.chunks_done for r in runs)
    all_chunks = len(chunk_rows) + upsert_chunks
    ages = report.ages_min
    statuses = Counter(r.status for r in runs)

    return {
        "name": name, "rate": rate, "hours_requested": hours, "sim_hours": sim_hours,
        "catalog_size": catalog_size, "churn": churn,
        "initial_tokens": initial, "refills": refills, "refill_tokens": refill_gross, "available": available,
        "consumed": consumed, "balance_end": balance_end, "lost_to_cap": lost_to_cap,
        "product_tokens": product_tokens, "product_fetches": product_fetches,
        "product_cost_per_asin": product_cost_per_asin,
        "cls_tokens": dict(cls_tokens), "cls_count": dict(cls_count), "waste_pairs": dict(waste_pairs),
        "raw_refetch_tokens": raw_refetch_tokens,
        "distinct_asins_fetched": len(stats.product_fetches),
        "backfill_pages_fetched": dict(backfill_pages), "backfill_page_tokens": backfill_page_tokens,
        "backfill_page_refetch_tokens": backfill_page_refetch_tokens,
        "upsert_page_tokens": upsert_page_tokens, "upsert_polls": sum(r.pages_fetched for r in runs),
        "nothing_new_poll_tokens": nothing_new_poll_tokens,
        "sim_deal_page_fetches": dict(stats.deal_page_fetches), "rejected_429": stats.rejected_429,
        "ledger_states": dict(ledger_states), "ledger_failed_or_unsettled": failed_or_unsettled,
        "deal_rows": len(deals), "enriched_stored": enriched_stored,
        "filtered_rows": sum(1 for d in deals if d[2] == "filtered"),
        "rows_by_origin": dict(Counter(d[3] for d in deals)),
        "useful_enrichments": useful_enrichments, "useful_tokens": useful_tokens,
        "wasted_tokens": wasted_product + backfill_page_refetch_tokens,
        "tokens_per_enriched_deal": tpd_all_in,
        "limit_all_in": limit_all_in, "util_all_in": enriched_stored / limit_all_in if enriched_stored else 0.0,
        "limit_physical": limit_physical,
        "util_physical": useful_enrichments / limit_physical if product_fetches else 0.0,
        "deals_per_hour": enriched_stored / sim_hours, "useful_enrichments_per_hour": useful_enrichments / sim_hours,
        "ages": ages, "age_max": max(ages) if ages else float("nan"),
        "age_p95": report.p95_age_min, "age_median": statistics.median(ages) if ages else float("nan"),
        "age_mean": statistics.fmean(ages) if ages else float("nan"),
        "upsert_runs": len(runs), "upsert_statuses": dict(statuses),
        "upsert_selected": sum(r.selected for r in runs), "upsert_chunks": upsert_chunks,
        "backfill_pages_complete": report.backfill_pages_complete, "backfill_chunks_done": report.backfill_chunks_done,
        "backfill_done": report.backfill_done,
        "wall_s": wall, "wall_per_sim_hour_s": wall / sim_hours, "duckdb_opens": total_opens,
        "chunks_total": all_chunks, "wall_per_chunk_ms_all": 1000 * wall / all_chunks if all_chunks else float("nan"),
        "backfill_chunk_wall_ms_median": 1000 * statistics.median(c["wall_s"] for c in chunk_rows) if chunk_rows else float("nan"),
        "backfill_chunk_opens_median": statistics.median(c["opens"] for c in chunk_rows) if chunk_rows else float("nan"),
        "upsert_run_wall_ms_median": 1000 * statistics.median(r["wall_s"] for r in updater.runs) if runs else float("nan"),
        "upsert_run_opens_median": statistics.median(r["opens"] for r in updater.runs) if runs else float("nan"),
        "chunk_wall_by_page": {p: 1000 * statistics.median(c["wall_s"] for c in chunk_rows if c["page"] == p)
                               for p in sorted({c["page"] for c in chunk_rows})},
        "loadavg_start": load0, "loadavg_end": load1,
        "age_by_block": _age_blocks(report, start_ms),
    }


def _age_blocks(report, start_ms: int, block_h: float = 6.0) -> list[tuple[str, float, float]]:
    blocks: dict[int, list[float]] = defaultdict(list)
    for t, age in zip(report.upsert_started_ms, report.ages_min):
        blocks[int((t - start_ms) // (block_h * 3_600_000))].append(age)
    return [(f"{int(b * block_h)}-{int((b + 1) * block_h)} h", max(v), statistics.median(v))
            for b, v in sorted(blocks.items())]


def first_runs_on_catalog(tmp: Path, catalog_size: int, rate: int = 5) -> dict:
    """Two upsert runs 5 simulated minutes apart with NO drift (nothing changes on the server in between)."""
    stack = build_stack(tmp, SimulatorConfig(refill_rate=rate, catalog_size=catalog_size), f"first_runs_{catalog_size}")
    try:
        updater = stack.updater()
        first = updater.run()
        stack.clock.advance(5 * 60_000)
        second = updater.run(deadline_ms=stack.clock.now_ms() + 5 * 60_000)
        per_deal = int(updater.enricher.predicted_cost(1))
    finally:
        stack.sim.stop()
    backlog_tokens = second.candidates * per_deal
    return {"catalog_size": catalog_size, "rate": rate, "first_selected": first.selected,
            "first_status": first.status, "second_status": second.status, "second_candidates": second.candidates,
            "second_selected": second.selected, "second_tokens": second.tokens_spent,
            "second_remaining": second.remaining_changed, "predicted_tokens_per_deal": per_deal,
            "backlog_tokens": backlog_tokens, "backlog_refill_hours": backlog_tokens / (rate * 60)}


# ------------------------------------------------------------------------------------------------
# Orchestration overhead and page-run RSS (sections 3, 4b)
# ------------------------------------------------------------------------------------------------

def page_run(mode: str, sim_url: str, db_path: Path, page: int = 0) -> dict:
    cmd = [sys.executable, str(BENCH_DIR / "page_worker.py"), mode, sim_url, str(db_path), str(page)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALS_PIPELINE_TIME")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} page run failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def orchestration(tmp: Path, pairs: int = 2) -> dict:
    sim = KeepaSimulator(SimulatorConfig(refill_rate=100_000), clock=SystemClock()).start()
    try:
        out: dict = {"runs": []}
        # Alternating, so a change in machine load hits both sides.
        for i, mode in enumerate(("plain", "dagster") * pairs):
            sim.reset_stats()
            res = page_run(mode, sim.base_url, tmp / f"orch_{i}_{mode}.duckdb")
            st = sim.stats()
            res["sim_tokens"] = st.tokens_consumed
            res["sim_product_fetches"] = sum(st.product_fetches.values())
            res["sim_max_fetches_per_asin"] = max(st.product_fetches.values()) if st.product_fetches else 0
            res["sim_requests"] = dict(st.requests)
            out["runs"].append(res)
            log(f"  {mode}: {res['wall_s']:.2f}s, {res['chunks_done']}/{res['chunks_total']} chunks, "
                f"{res['duckdb_opens']} DuckDB opens, peak RSS {res['peak_rss_mb']:.0f} MB")
    finally:
        sim.stop()
    plains = [r for r in out["runs"] if r["mode"] == "plain"]
    dags = [r for r in out["runs"] if r["mode"] == "dagster"]
    plain_wall = statistics.fmean(r["wall_s"] for r in plains)
    dag_wall = statistics.fmean(r["wall_s"] for r in dags)
    chunks = dags[0]["chunks_total"]
    out.update(
        plain_wall_s=plain_wall, dagster_wall_s=dag_wall, ratio=dag_wall / plain_wall,
        ratios_pairwise=[d["wall_s"] / p["wall_s"] for p, d in zip(plains, dags)],
        chunks=chunks, overhead_per_chunk_ms=1000 * (dag_wall - plain_wall) / chunks,
        plain_per_chunk_ms=1000 * plain_wall / chunks, dagster_per_chunk_ms=1000 * dag_wall / chunks,
        opens_plain=statistics.fmean(r["duckdb_opens"] for r in plains),
        opens_dagster=statistics.fmean(r["duckdb_opens"] for r in dags),
        same_asins=all(r["asins"] == plains[0]["asins"] for r in out["runs"]),
        same_tokens=len({r["sim_tokens"] for r in out["runs"]}) == 1,
    )
    if not (out["same_asins"] and out["same_tokens"] and all(r["complete"] for r in out["runs"])):
        raise RuntimeError(f"plain and Dagster page runs differ: {out}")
    for r in out["runs"]:
        r.pop("asins", None)
    return out


# ------------------------------------------------------------------------------------------------
# Storage (section 4a)
# ------------------------------------------------------------------------------------------------

def sample_deals() -> list:
    pages = sorted(SAMPLES.glob("deal_responses/run_*/page_*.json"))
    if not pages:
        raise SystemExit(f"no deal pages under {SAMPLES}/deal_responses")
    seen: dict = {}
    for path in pages:
        body = json.loads(path.read_text())
        for deal in DealPage.from_response(body, page=int(path.stem.split("_")[1])).deals:
            seen.setdefault(deal.asin, deal)
    return list(seen.values())


def synthetic_deals(n: int, base: list, start: int = 0) -> list:
    """n deals replicated from the real sample deals, each with its own ASIN (raw JSON patched too)."""
    out = []
    for i in range(start, start + n):
        d = base[i % len(base)]
        asin = f"B{i:09d}"
        out.append(dataclasses.replace(d, asin=asin, raw={**d.raw, "asin": asin}))
    return out


def fresh_db(path: Path) -> Database:
    db = Database(path, data_mode="simulator")
    with db.connect():
        pass  # migrate now, outside any timing
    return db


def storage(tmp: Path, n: int) -> dict:
    base = sample_deals()
    deals = synthetic_deals(n, base)
    t0 = time.perf_counter()
    frame = deal_rows(deals, domain_id=1, price_type=2, source="simulator", origin="backfill", seen_at=utcnow())
    build_s = time.perf_counter() - t0
    raw_mb = frame["raw_deal"].str.len().sum() / 2**20
    log(f"  built {len(frame):,} rows from {len(base)} real sample deals in {build_s:.1f}s ({raw_mb:.0f} MB raw_deal JSON)")

    res: dict = {"rows": len(frame), "base_deals": len(base), "build_rows_s": build_s, "raw_deal_mb": raw_mb}
    # The table holds DEAL_COLUMNS (the plain baseline inserts BY NAME, as upsert_deals does).
    with fresh_db(tmp / "cols.duckdb").connect() as con:
        cols = [r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                          "WHERE table_name = 'deals' ORDER BY ordinal_position").fetchall()]
    # The lifecycle's inactive_since is written by the janitor only, not by deal writes (INSERT BY NAME).
    assert cols == DEAL_COLUMNS + ["inactive_since"], "deals table columns differ from DEAL_COLUMNS"

    def plain_insert(path: Path) -> float:
        db = fresh_db(path)
        with db.transaction() as con:
            con.register("df", frame)
            t = time.perf_counter()
            con.execute("INSERT INTO deals BY NAME SELECT * FROM df")
            elapsed = time.perf_counter() - t
            con.unregister("df")
        return elapsed

    def pipeline_upsert(db: Database) -> tuple[float, tuple[int, int]]:
        with db.transaction() as con:
            t = time.perf_counter()
            counts = upsert_deals(con, frame)
            return time.perf_counter() - t, counts

    # Alternate the two (insert, upsert, insert, upsert) and keep each one's best time.
    inserts, upserts, reupserts = [], [], []
    upsert_db = None
    for rep in range(2):
        inserts.append(plain_insert(tmp / f"insert_{rep}.duckdb"))
        upsert_db = fresh_db(tmp / f"upsert_{rep}.duckdb")
        u, counts = pipeline_upsert(upsert_db)
        upserts.append(u)
        assert counts == (len(frame), 0), counts
    # Update path: the same 100k again into the filled table (every row conflicts).
    u2, counts2 = pipeline_upsert(upsert_db)
    reupserts.append(u2)
    assert counts2 == (0, len(frame)), counts2
    with upsert_db.connect() as con:
        assert con.execute("SELECT count(*) FROM deals").fetchone()[0] == len(frame)
    res.update(insert_s=min(inserts), upsert_s=min(upserts), reupsert_s=min(reupserts),
               insert_all=inserts, upsert_all=upserts)
    res["ratio_upsert_vs_insert"] = res["upsert_s"] / res["insert_s"]
    res["ratio_reupsert_vs_insert"] = res["reupsert_s"] / res["insert_s"]
    res["ratio_build_vs_insert"] = build_s / res["insert_s"]
    log(f"  insert {res['insert_s']:.2f}s, upsert {res['upsert_s']:.2f}s, re-upsert {res['reupsert_s']:.2f}s")

    # One chunk commit (open, look up 4 ASINs, upsert 4 rows, close) into an empty vs the 100k-row table.
    def chunk_commits(db: Database, offset: int, reps: int = 12) -> float:
        times = []
        for k in range(reps):
            chunk = synthetic_deals(4, base, start=offset + 4 * k)
            rows = deal_rows(chunk, domain_id=1, price_type=2, source="simulator", origin="backfill", seen_at=utcnow())
            t = time.perf_counter()
            with db.transaction() as con:
                stored_deals(con, [d.asin for d in chunk])
                upsert_deals(con, rows)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    empty_db = fresh_db(tmp / "chunk_empty.duckdb")
    c_empty = chunk_commits(empty_db, offset=n)
    c_full = chunk_commits(upsert_db, offset=n + 100)
    c_empty2 = chunk_commits(empty_db, offset=n + 200)
    res.update(chunk_empty_ms=1000 * min(c_empty, c_empty2), chunk_full_ms=1000 * c_full,
               ratio_chunk_full_vs_empty=c_full / min(c_empty, c_empty2))
    res["db_file_mb"] = upsert_db.path.stat().st_size / 2**20
    return res


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import dagster

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/RESULTS.md"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip()
        if changed:
            commit += " + uncommitted changes"
    except OSError:
        commit = "?"
    return {
        "cpu": model, "cores": os.cpu_count(), "ram_gb": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(), "duckdb": duckdb.__version__, "dagster": dagster.__version__,
        "pandas": pd.__version__, "platform": platform.platform(), "commit": commit,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def gap_items(r: dict) -> dict:
    ct = r["cls_tokens"]
    return {
        "upserter polls of the newest page": r["upsert_page_tokens"],
        "unused at the end": r["balance_end"],
        "lost to the cap": r["lost_to_cap"],
        "backfill pages": r["backfill_page_tokens"],
        "/product that bought nothing new": ct.get("refetch_same_version", 0) + ct.get("dropped", 0),
    }


def f(x, nd=2) -> str:
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def render(m: dict, main: dict, scaling: list[dict], dense: list[dict], orch: dict, store: dict, args,
           total_wall: float, command: str) -> str:
    L: list[str] = []
    a = L.append
    a("# deals_pipeline benchmarks")
    a("")
    a(f"Produced by `{command}` (`make bench`) on {m['date']}, commit `{m['commit']}`.")
    a(f"Whole run: {total_wall:.0f} s wall.{' **QUICK MODE: reduced sizes, not the real figures.**' if args.quick else ''}")
    a("")
    a("Machine: " + f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']:.1f} GiB RAM; {m['platform']}; Python {m['python']}, "
      f"duckdb {m['duckdb']}, dagster {m['dagster']}, pandas {m['pandas']}.")
    a("The machine is shared (another engineer's test suite ran at the same time): every headline figure is a ratio of "
      "two quantities measured in the same run; absolute wall times are context only. Simulated time runs on a "
      "`ManualClock` (tokens, refills and deal ages do not depend on machine speed; only wall times do).")
    a("")

    # -- headline ----------------------------------------------------------------------------------
    a("## Headline figures")
    a("")
    a("| Figure | Value | Target |")
    a("|---|---|---|")
    others = scaling[1:]

    def at_rates(key: str, fmt: str) -> str:
        return "; ".join(f"{r['rate']}/min {format(r[key], fmt)}" for r in others)

    a(f"| Token utilisation, 24 h @ 5/min (stored enriched deals ÷ physical limit, all-in tokens per deal) | "
      f"**{main['util_all_in']:.3f}** (scaling runs: {at_rates('util_all_in', '.3f')}) | ≥ 0.97 "
      f"{verdict(main['util_all_in'] >= 0.97)} |")
    a(f"| Token utilisation, strict (useful enrichments ÷ (available ÷ /product cost per ASIN)) | "
      f"**{main['util_physical']:.3f}** (scaling runs: {at_rates('util_physical', '.3f')}) | ≥ 0.97 "
      f"{verdict(main['util_physical'] >= 0.97)} |")
    a(f"| Tokens that bought nothing new (no faults), 24 h @ 5/min | **{f(main['wasted_tokens'])}** of "
      f"{f(main['consumed'])} spent (+ {f(main['nothing_new_poll_tokens'])} on upsert polls that found nothing); "
      f"scaling runs: {at_rates('wasted_tokens', ',')} | 0 "
      f"{verdict(main['wasted_tokens'] == 0)}{'' if all(r['wasted_tokens'] == 0 for r in others) else ' (missed at higher rates, §5)'} |")
    a(f"| Tokens unused at the end / lost to the cap | {f(main['balance_end'])} / {f(main['lost_to_cap'])} "
      f"(of {f(main['available'])} available) | |")
    a(f"| Freshness (newest-deal age after each upsert), 24 h @ 5/min | max **{main['age_max']:.0f} min**, "
      f"p95 **{main['age_p95']:.1f} min** | |")
    a(f"| Orchestration: Dagster page run ÷ plain page run | **{orch['ratio']:.2f}×**, "
      f"+{orch['overhead_per_chunk_ms']:.0f} ms per chunk | |")
    a(f"| Storage: `upsert_deals` ÷ plain `INSERT … SELECT` ({f(store['rows'])} rows) | "
      f"**{store['ratio_upsert_vs_insert']:.2f}×** (re-upsert of the same rows: {store['ratio_reupsert_vs_insert']:.2f}×) | |")
    peak = max(r["peak_rss_mb"] for r in orch["runs"] if r["mode"] == "plain")
    dpeak = max(r["peak_rss_mb"] for r in orch["runs"] if r["mode"] == "dagster")
    a(f"| Peak RSS of a page run (fresh process) | plain **{peak:.0f} MB**, Dagster **{dpeak:.0f} MB** | |")
    a("")

    # -- 1 ---------------------------------------------------------------------------------------
    a("## 1. Token utilisation (24 simulated hours, 5 tokens/min, drift on, backfill + upserter)")
    a("")
    a(f"Setup: `SimulatorConfig(refill_rate={main['rate']}, catalog_size={main['catalog_size']}, "
      + ", ".join(f"{k}={v:g}" for k, v in main["churn"].items()) + ")` (calibrated churn, full initial "
      f"bucket, no faults), `harness.simulation.simulate(stack, hours={main['hours_requested']:g}, upsert_interval_min=5)` "
      "on a `ManualClock`, stack wired like the `make_stack` fixture (default `BudgetPolicy`, chunk size 4, "
      "`/product` offers=20 + rating + stats=90). Simulated window actually covered: "
      f"{main['sim_hours']:.2f} h.")
    a("")
    a("**Token balance sheet** (every token that was physically available):")
    a("")
    a("| | tokens | share |")
    a("|---|---:|---:|")
    A = main["available"]
    ct, cc = main["cls_tokens"], main["cls_count"]
    rows = [
        (f"/product, new deals ({f(cc.get('new', 0))} ASINs)", ct.get("new", 0)),
        (f"/product, a newer version of a stored deal ({f(cc.get('update', 0))})", ct.get("update", 0)),
        (f"/product, same server version fetched again — nothing new ({f(cc.get('refetch_same_version', 0))})",
         ct.get("refetch_same_version", 0)),
        (f"/product, deal never stored with its enrichment ({f(cc.get('dropped', 0))})", ct.get("dropped", 0)),
        (f"/deal, backfill pages ({len(main['backfill_pages_fetched'])} pages, "
         f"{f(main['backfill_page_refetch_tokens'])} tokens of re-fetches)", main["backfill_page_tokens"]),
        (f"/deal, upserter polls of the newest page ({f(main['upsert_polls'])} polls; "
         f"{f(main['nothing_new_poll_tokens'])} tokens in runs that found nothing new)", main["upsert_page_tokens"]),
        ("unused at the end (bucket balance)", main["balance_end"]),
        ("lost to the cap (refill while the bucket was full)", main["lost_to_cap"]),
    ]
    accounted = sum(v for _, v in rows)
    for label, v in rows:
        a(f"| {label} | {f(v)} | {v / A:.1%} |")
    a(f"| **available** = initial bucket {f(main['initial_tokens'])} + {f(main['refills'])} refills × {main['rate']} "
      f"| **{f(A)}** | |")
    if accounted != A:
        a(f"| *unaccounted (rounding, see notes)* | {f(A - accounted)} | |")
    a("")
    a(f"- Tokens consumed (simulator): {f(main['consumed'])}; enriched deals stored: **{f(main['enriched_stored'])}** "
      f"({f(main['deal_rows'])} rows; {f(main['filtered_rows'])} filtered by viability; rows by last writer "
      f"{main['rows_by_origin']}).")
    a(f"- Actual tokens per enriched deal (all tokens ÷ enriched deals stored): **{main['tokens_per_enriched_deal']:.2f}**; "
      f"/product cost per ASIN: {main['product_cost_per_asin']:.2f}.")
    a(f"- Physical limit = available ÷ tokens per enriched deal = {f(A)} ÷ {main['tokens_per_enriched_deal']:.2f} = "
      f"{main['limit_all_in']:.0f} deals → utilisation **{main['util_all_in']:.3f}**. With the all-in cost per deal "
      "this ratio is the share of available tokens that were spent (tokens consumed ÷ available); it measures idle "
      "and capped tokens, not what the tokens bought.")
    a(f"- Strict variant: limit = available ÷ /product cost per ASIN = {main['limit_physical']:.0f} enrichments (every "
      f"token spent on /product); useful enrichments (new deals + newer versions) = {f(main['useful_enrichments'])} → "
      f"**{main['util_physical']:.3f}**. Where the rest went (share of available tokens): " + ", ".join(
          f"{label} {v / A:.1%}" for label, v in sorted(gap_items(main).items(), key=lambda kv: -kv[1])) + ".")
    a(f"- Tokens that bought nothing new: {f(main['wasted_tokens'])} = same-version /product re-fetches "
      f"{f(ct.get('refetch_same_version', 0))} (by who fetched first → again: {main['waste_pairs'] or 'none'}) + "
      f"dropped {f(ct.get('dropped', 0))} + backfill page re-fetches {f(main['backfill_page_refetch_tokens'])}. "
      f"The brief's raw formula Σ(n−1)×cost over `product_fetches` gives {f(main['raw_refetch_tokens'])} tokens, "
      f"which also counts paying again for a deal whose server version changed (drift updates: that buys the new "
      f"version, so it is not waste). Upserter polls that found nothing cost {f(main['nothing_new_poll_tokens'])} "
      f"tokens ({main['upsert_statuses'].get('nothing_new', 0)} of {main['upsert_runs']} runs).")
    a(f"- Ledger states: {main['ledger_states']}; 429s from the simulator: {main['rejected_429']}.")
    a(f"- Upsert runs: {main['upsert_statuses']}; backfill: {main['backfill_chunks_done']} chunks, "
      f"{main['backfill_pages_complete']} pages complete, pages snapshotted {sorted(main['backfill_pages_fetched'])}.")
    a("")

    # -- 2 ---------------------------------------------------------------------------------------
    a("## 2. Freshness (same run)")
    a("")
    a(f"Newest stored deal's age (server minute − max `last_update_minute`) sampled after each of the "
      f"{len(main['ages'])} upsert runs: **max {main['age_max']:.0f} min, p95 {main['age_p95']:.1f} min**, median "
      f"{main['age_median']:.1f} min, mean {main['age_mean']:.1f} min (p95 as `SimulationReport.p95_age_min`).")
    a("")
    a("| window | max age (min) | median age (min) |")
    a("|---|---:|---:|")
    for label, mx, med in main["age_by_block"]:
        a(f"| {label} | {mx:.0f} | {med:.1f} |")
    a("")

    a("**Sensitivity to the density of the deal list** (measured, not part of the 24 h run): two upsert runs 5 "
      "minutes apart at 5/min with drift OFF, i.e. nothing changes on the server between them.")
    a("")
    a("| catalog | run 1 | run 2: candidates / selected / status | backlog ≈ tokens (hours of refill) |")
    a("|---|---|---|---|")
    for d in dense:
        a(f"| {f(d['catalog_size'])} deals over ~22 h | {d['first_status']}, {d['first_selected']} stored | "
          f"{d['second_candidates']} / {d['second_selected']} / {d['second_status']} | "
          f"{d['backlog_tokens']:.0f} ({d['backlog_refill_hours']:.1f} h) |")
    a("")
    a("With the 800-deal catalog the second run finds nothing. With 10,000 deals (the size of Keepa's result window) "
      "the second run selects deals that never changed: the first run stored only the newest batch, and the "
      "15-minute `overlap_minutes` window below the watermark then treats every unstored deal in it as a late "
      "arrival, oldest first, ahead of genuinely new deals. The 24 h figures above use the 800-deal catalog and do "
      "not show this.")
    a("")

    # -- 3 ---------------------------------------------------------------------------------------
    a("## 3. Orchestration overhead (one deal page, Dagster vs plain Python)")
    a("")
    a("Simulator in the benchmark process on a `SystemClock`, `SimulatorConfig(refill_rate=100000)` (zero latency, "
      "budget effectively unlimited). Each page run is a fresh process (`benchmarks/page_worker.py`) on a fresh "
      "DuckDB file. Dagster: resources `KeepaResource(mode='simulator', simulator_url=…)`, "
      "`DealsDatabaseResource(path=…)`, `TokenBudgetResource(refill_rate_guess=100000)`, `DealQueryResource()`; "
      "plain: `PageBackfill(...).run_page(0)` built directly from the values those resources resolve to "
      "(same selection, chunk size 4, /product options, budget policy, client settings), without importing "
      "Dagster; the benchmark checks both charged the same tokens and stored the same ASINs. Dagster: "
      "`deal_pages_job` resolved from "
      "`Definitions(assets=[deal_pages], jobs=[deal_pages_job], resources=…)` then "
      "`execute_in_process(partition_key='0', instance=DagsterInstance.ephemeral())`. Timed: the page run only "
      "(imports done first). Order plain, Dagster, plain, Dagster; each side's figure is the mean of its two runs.")
    a("")
    a("| run | wall s | chunks done | DuckDB opens | tokens (simulator) | /product ASINs | peak RSS MB |")
    a("|---|---:|---:|---:|---:|---:|---:|")
    for r in orch["runs"]:
        a(f"| {r['mode']} | {r['wall_s']:.2f} | {r['chunks_done']}/{r['chunks_total']} | {r['duckdb_opens']} | "
          f"{r['sim_tokens']} | {r['sim_product_fetches']} | {r['peak_rss_mb']:.0f} |")
    a("")
    a(f"- **Dagster ÷ plain = {orch['ratio']:.2f}×** (pairwise: "
      + ", ".join(f"{x:.2f}×" for x in orch["ratios_pairwise"]) + f"); overhead **{orch['overhead_per_chunk_ms']:.0f} ms per chunk** "
      f"({orch['chunks']} chunks of 4 deals; plain {orch['plain_per_chunk_ms']:.0f} ms/chunk, Dagster "
      f"{orch['dagster_per_chunk_ms']:.0f} ms/chunk, fixed run start-up included).")
    a(f"- DuckDB opens per chunk: plain {orch['opens_plain'] / orch['chunks']:.1f}, Dagster "
      f"{orch['opens_dagster'] / orch['chunks']:.1f} (each op rebuilds its runtime and re-reads the snapshot).")
    dg_runs = [r for r in orch["runs"] if r["mode"] == "dagster"]
    dag = {k: statistics.fmean(r[k] for r in dg_runs) for k in ("duckdb_open_s", "snapshot_load_s", "snapshot_loads")}
    pl = [r for r in orch["runs"] if r["mode"] == "plain"]
    pl_open_s = statistics.fmean(r["duckdb_open_s"] for r in pl)
    pl_snap_s = statistics.fmean(r["snapshot_load_s"] for r in pl)
    a(f"- Where the extra time goes (measured in the workers): time inside `Database._open` "
      f"{pl_open_s:.2f} s plain vs {dag['duckdb_open_s']:.2f} s Dagster (closing a connection, which checkpoints, is "
      f"not included); stored-snapshot loads (`PageBackfill.load_snapshot`: read + parse the 150-deal page JSON, cached per process) "
      f"{statistics.fmean(r['snapshot_loads'] for r in pl):.0f} × = {pl_snap_s:.2f} s plain vs "
      f"{dag['snapshot_loads']:.0f} × = {dag['snapshot_load_s']:.2f} s Dagster (means per run). Together "
      f"{1000 * ((dag['duckdb_open_s'] - pl_open_s) + (dag['snapshot_load_s'] - pl_snap_s)) / orch['chunks']:.0f} ms of "
      f"the {orch['overhead_per_chunk_ms']:.0f} ms per chunk.")
    a(f"- Same ASINs stored by all runs: {orch['same_asins']}; same tokens charged: {orch['same_tokens']}; "
      "Dagster imported by the plain runs: "
      f"{any(r['dagster_imported'] for r in orch['runs'] if r['mode'] == 'plain')}.")
    a("")

    # -- 4 ---------------------------------------------------------------------------------------
    a("## 4. Storage")
    a("")
    a(f"{f(store['rows'])} deal rows built with `repository.deal_rows` from the {store['base_deals']} distinct real deals in "
      f"`keepa-samples/deal_responses` (4 runs × 7 pages), replicated with distinct ASINs (`B000000000`…; raw JSON "
      f"patched). Deal-page fields only (no `/product` enrichment: `raw_product` NULL); {store['raw_deal_mb']:.0f} MB of "
      "`raw_deal` JSON. Each write runs in one transaction on a fresh, migrated DuckDB file (the real `deals` table "
      "with its primary key); each variant was run twice, alternating, best time kept.")
    a("")
    a("| operation | s | ÷ plain insert |")
    a("|---|---:|---:|")
    a(f"| plain `INSERT INTO deals BY NAME SELECT * FROM df` | {store['insert_s']:.2f} | 1.00 |")
    a(f"| `upsert_deals(con, df)` into the empty table (all new) | {store['upsert_s']:.2f} | "
      f"**{store['ratio_upsert_vs_insert']:.2f}** |")
    a(f"| `upsert_deals` of the same rows again (all conflicts → update) | {store['reupsert_s']:.2f} | "
      f"{store['ratio_reupsert_vs_insert']:.2f} |")
    a(f"| building the DataFrame with `deal_rows` (Python) | {store['build_rows_s']:.2f} | {store['ratio_build_vs_insert']:.2f} |")
    a("")
    a(f"- One chunk commit (open, `stored_deals` for 4 ASINs, `upsert_deals` of 4 rows, commit, close): "
      f"{store['chunk_empty_ms']:.0f} ms into an empty table vs {store['chunk_full_ms']:.0f} ms into the "
      f"{f(store['rows'])}-row table → **{store['ratio_chunk_full_vs_empty']:.2f}×** "
      f"(DB file {store['db_file_mb']:.0f} MB).")
    a(f"- Peak RSS of one page run (150 deals, 38 chunks) in a fresh process: plain {peak:.0f} MB, Dagster {dpeak:.0f} MB "
      "(`VmHWM` of `/proc/self/status` in the worker; `getrusage().ru_maxrss` is not usable here because on Linux "
      "it survives `exec` and would report the parent's RSS). RSS after imports, before the run: "
      + ", ".join(f"{r['mode']} {r['rss_before_run_mb']:.0f} MB" for r in orch["runs"]) + ".")
    a("")

    # -- 5 ---------------------------------------------------------------------------------------
    a("## 5. Scaling with the refill rate")
    a("")
    a("Same simulation at 5, 50 and 500 tokens/min. The 5/min row is the 24 h run above. The faster rates use "
      "shorter windows to keep the whole benchmark under ~10 minutes (24 simulated hours would take about "
      + " and ".join(f"{r['wall_per_sim_hour_s'] * 24 / 60:.0f} min at {r['rate']}/min" for r in scaling[1:])
      + " on this machine) and start from an **empty bucket**, so a short window measures the refill and not a "
      "starting balance worth an hour of refill. Churn is the calibrated churn scaled with the rate, so the same share "
      "of the budget goes to changed deals. The catalog is the same 800 deals plus churn. Every window ends 1 ms before the refill "
      "that would land on its last instant, because the pipeline could not spend that refill.")
    a("")
    header = ["", *[f"{r['rate']}/min" for r in scaling]]
    a("| " + " | ".join(header) + " |")
    a("|" + "---|" * len(header))

    def row(label, fn):
        a("| " + label + " | " + " | ".join(fn(r) for r in scaling) + " |")

    row("simulated window", lambda r: f"{r['sim_hours']:.2f} h")
    row("initial bucket", lambda r: f(r["initial_tokens"]))
    row("churn (new + updated + expired deals / h)", lambda r: " + ".join(f"{v:g}" for v in r["churn"].values()))
    row("tokens available / consumed", lambda r: f"{f(r['available'])} / {f(r['consumed'])}")
    row("enriched deals stored", lambda r: f(r["enriched_stored"]))
    row("**tokens per enriched deal** (all-in)", lambda r: f"{r['tokens_per_enriched_deal']:.2f}")
    row("/product tokens per ASIN", lambda r: f"{r['product_cost_per_asin']:.2f}")
    row("/deal share of tokens (backfill pages + upsert polls)",
        lambda r: f"{(r['backfill_page_tokens'] + r['upsert_page_tokens']) / max(r['consumed'], 1):.1%}")
    row("utilisation all-in (target ≥ 0.97)", lambda r: f"{r['util_all_in']:.3f}")
    row("utilisation strict", lambda r: f"{r['util_physical']:.3f}")
    row("tokens that bought nothing new", lambda r: f(r["wasted_tokens"]))
    row("unused at end / lost to cap", lambda r: f"{f(r['balance_end'])} / {f(r['lost_to_cap'])}")
    row("**enriched deals per simulated hour**", lambda r: f"{r['deals_per_hour']:.0f}")
    row("newest-deal age max / p95 (min)", lambda r: f"{r['age_max']:.0f} / {r['age_p95']:.1f} ({len(r['ages'])} samples)")
    row("upsert runs", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r["upsert_statuses"].items())))
    row("backfill pages snapshotted / chunks done", lambda r: f"{len(r['backfill_pages_fetched'])} / {r['backfill_chunks_done']}")
    row("chunks (backfill + upsert)", lambda r: f(r["chunks_total"]))
    row("wall s", lambda r: f"{r['wall_s']:.0f}")
    row("**wall s per simulated hour**", lambda r: f"{r['wall_per_sim_hour_s']:.0f}")
    row("wall ms per chunk (whole run ÷ chunks)", lambda r: f"{r['wall_per_chunk_ms_all']:.0f}")
    row("DuckDB opens per chunk (whole run)", lambda r: f"{r['duckdb_opens'] / max(r['chunks_total'], 1):.1f}")
    row("backfill chunk: median wall ms / DuckDB opens", lambda r: f"{r['backfill_chunk_wall_ms_median']:.0f} / {r['backfill_chunk_opens_median']:g}")
    row("upsert run: median wall ms / DuckDB opens", lambda r: f"{r['upsert_run_wall_ms_median']:.0f} / {r['upsert_run_opens_median']:g}")
    row("load average (1 min) start → end", lambda r: f"{r['loadavg_start']:.1f} → {r['loadavg_end']:.1f}")
    a("")
    base = scaling[0]
    for r in scaling[1:]:
        a(f"- {r['rate']}/min vs {base['rate']}/min ({r['rate'] // base['rate']}× the rate): enriched deals per hour "
          f"×{r['deals_per_hour'] / base['deals_per_hour']:.1f}, tokens per enriched deal "
          f"×{r['tokens_per_enriched_deal'] / base['tokens_per_enriched_deal']:.2f}, wall per simulated hour "
          f"×{r['wall_per_sim_hour_s'] / base['wall_per_sim_hour_s']:.1f}.")
    top = scaling[-1]
    costs = ", ".join(f"{r['product_cost_per_asin']:.2f}" for r in scaling)
    shares = ", ".join(f"{(r['backfill_page_tokens'] + r['upsert_page_tokens']) / max(r['consumed'], 1):.1%}"
                       for r in scaling)
    chunk_ms = statistics.median(r["backfill_chunk_wall_ms_median"] for r in scaling)
    a(f"- How cost grows: a /product ASIN costs the same at every rate ({costs} tokens). The /deal overhead is "
      f"mostly the upserter's fixed 12 polls per hour (60 tokens/h), so its share falls as the rate rises "
      f"({shares}), and all-in tokens per enriched deal fall towards the /product cost. A backfill page costs 5 "
      f"tokens plus its 150 /product ASINs (~{5 + 150 * top['product_cost_per_asin']:.0f} tokens) whatever its "
      f"number, and a chunk's wall time does not grow with the page number (below) or with the table size (§4: one "
      f"chunk commit at 100k rows ÷ empty = {store['ratio_chunk_full_vs_empty']:.2f}). So wall time per simulated "
      f"hour grows with chunks per hour, roughly linearly in the rate once the rate is past the fixed polling cost. "
      f"Each backfill chunk takes ~{chunk_ms:.0f} ms of wall time with zero API latency, mostly spent opening and "
      f"closing DuckDB ({top['backfill_chunk_opens_median']:g} opens per chunk).")
    wasted = [r for r in scaling if r["wasted_tokens"]]
    if wasted:
        a("- Tokens that bought nothing new, by who paid first → who paid again (same server version of the deal): "
          + "; ".join(f"{r['rate']}/min {r['waste_pairs']}" for r in wasted)
          + ". Mechanism (checked by tracing the fetches): the backfill enriches a deal from its page snapshot "
            "after the server has moved the deal to a newer `lastUpdate`; the row is stored with the snapshot's "
            "`lastUpdate` as `enriched_minute`, so when the newer version turns up (the upserter's newest page, or "
            "the same deal re-sorted onto a later backfill page) `StoredDeal.covers()` is false and the same "
            "product is bought again.")
    a("- Backfill chunk wall time by page (median ms): " + "; ".join(
        f"{r['rate']}/min " + ", ".join(f"p{p} {v:.0f}" for p, v in r["chunk_wall_by_page"].items()) for r in scaling) + ".")
    a("")
    a("## Raw figures")
    a("")
    a("<details><summary>JSON</summary>")
    a("")
    a("```json")
    raw = {"machine": m, "main": {k: v for k, v in main.items() if k != "ages"},
           "main_ages_min": main["ages"],
           "scaling": [{k: v for k, v in r.items() if k != "ages"} for r in scaling[1:]],
           "dense_first_runs": dense, "orchestration": orch, "storage": store}
    a(json.dumps(raw, indent=1, default=str))
    a("```")
    a("")
    a("</details>")
    a("")
    return "\n".join(L)


def core_problems(main_run: dict, scaling: list[dict], dense: list[dict], orch: dict, store: dict) -> list[str]:
    """What would make the built-in sections' figures meaningless (checked in --quick mode too)."""
    problems = []
    for r in scaling:
        if r["enriched_stored"] <= 0 or r["consumed"] <= 0:
            problems.append(f"simulation at {r['rate']}/min stored {r['enriched_stored']} deals for {r['consumed']} tokens")
    if not main_run["ages"]:
        problems.append("no upsert run measured a newest-deal age")
    if any(d["first_selected"] <= 0 for d in dense):
        problems.append(f"an upsert first run selected nothing: {[d['first_selected'] for d in dense]}")
    if not all(r["complete"] for r in orch["runs"]):
        problems.append("a page run did not complete")
    if store["rows"] <= 0 or not store["insert_s"] > 0:
        problems.append(f"storage measured nothing: {store['rows']} rows")
    return problems


def run_sections(sections: list[Section], ctx: BenchContext) -> tuple[list[str], list[str]]:
    """(markdown lines, problems) of the scenario modules' sections."""
    lines: list[str] = []
    problems: list[str] = []
    for section in sections:
        log(f"{section.name}: {section.title}")
        try:
            result = section.measure(ctx)
            problems += [f"{section.name}: {p}" for p in section.check(result)]
            body = section.render(result)
        except Exception as exc:  # a broken section fails the run, after the others have run
            problems.append(f"{section.name}: {type(exc).__name__}: {exc}")
            body = [f"**Broken:** `{type(exc).__name__}: {exc}`"]
        lines += ["", f"## {section.title}", "", *body]
    return lines, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small windows, same code paths: CI's check that every benchmark still runs")
    parser.add_argument("--output", type=Path, default=None, help="where to write RESULTS.md")
    parser.add_argument("--only", default=None,
                        help="comma-separated scenario sections to run, without the built-in ones")
    args = parser.parse_args()
    output = args.output or (Path(tempfile.gettempdir()) / "deals_pipeline_RESULTS_quick.md" if args.quick
                             else BENCH_DIR / "RESULTS.md")
    q = args.quick
    sections = discover(BENCH_DIR)
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {s.name for s in sections})
        if unknown:
            raise SystemExit(f"unknown benchmark sections {unknown}; registered: {[s.name for s in sections]}")
        sections = [s for s in sections if s.name in wanted]
    command = "python benchmarks/run_benchmarks.py" + (" --quick" if q else "") + (
        f" --output {args.output}" if args.output else "") + (f" --only {args.only}" if args.only else "")
    m = machine()
    log(f"machine: {m['cpu']}, {m['cores']} cores; load {os.getloadavg()[0]:.1f}; commit {m['commit']}")
    log(f"scenario sections: {[s.name for s in sections] or 'none'}")
    with tempfile.TemporaryDirectory(prefix="deals_bench_") as tmpdir:
        tmp = Path(tmpdir)
        problems: list[str] = []
        text = ""
        if not args.only:
            text, problems = core(tmp, q, m, args, command)
        extra, extra_problems = run_sections(sections, BenchContext(tmp=tmp, quick=q, log=log))
    if args.only:
        text = (f"# deals_pipeline benchmarks (sections {args.only})\n\nProduced by `{command}` on {m['date']}, "
                f"commit `{m['commit']}`.{' **QUICK MODE: reduced sizes, not the real figures.**' if q else ''}\n")
    problems += extra_problems
    total = time.perf_counter() - T_START
    output.write_text(text + "\n".join(extra) + "\n")
    log(f"wrote {output} ({total:.0f}s total)")
    if problems:
        for problem in problems:
            log(f"BROKEN: {problem}")
        raise SystemExit(f"{len(problems)} benchmark problem(s); see above")


def core(tmp: Path, q: bool, m: dict, args: argparse.Namespace, command: str) -> tuple[str, list[str]]:
    """The built-in sections 1-5: (markdown, problems)."""
    log("1+2. 24 simulated hours at 5 tokens/min (backfill + upserter, calibrated churn)")
    main_run = run_simulation(tmp, name="main", rate=5, hours=0.25 if q else 24, catalog_size=800,
                              churn_scale=1.0, initial_tokens=None)
    log(f"  done: {main_run['wall_s']:.0f}s wall, utilisation {main_run['util_all_in']:.3f} / "
        f"{main_run['util_physical']:.3f}, age max {main_run['age_max']}")
    scaling = [main_run]
    for rate, hours in ((50, 1.0), (500, 1 / 6)):
        hours = hours / 10 if q else hours
        log(f"5. scaling: {rate} tokens/min for {hours * 60:.0f} simulated minutes")
        r = run_simulation(tmp, name=f"rate{rate}", rate=rate, hours=hours, catalog_size=800,
                           churn_scale=rate / 5, initial_tokens=0)
        log(f"  done: {r['wall_s']:.0f}s wall, {r['enriched_stored']} deals")
        scaling.append(r)
    log("2b. upserter's second run on a sparse vs dense deal list (no drift)")
    dense = [first_runs_on_catalog(tmp, size) for size in ((800, 2_000) if q else (800, 10_000))]
    log("  " + "; ".join(f"{d['catalog_size']}: {d['second_candidates']} candidates" for d in dense))
    log("3. orchestration overhead: one page, plain vs Dagster (fresh processes)")
    orch = orchestration(tmp, pairs=1 if q else 2)
    log("4. storage")
    store = storage(tmp, 5_000 if q else 100_000)
    total = time.perf_counter() - T_START
    return render(m, main_run, scaling, dense, orch, store, args, total, command), core_problems(
        main_run, scaling, dense, orch, store)


if __name__ == "__main__":
    main()
