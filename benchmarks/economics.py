"""Economics (issue 10): what the tokens buy, this design side by side with the seed's, in one run.

Every scenario: the backfill and the upserter sharing one budget (the harness's ``simulate``: an
upsert run every 5 simulated minutes, backfill chunks in between), the simulator's calibrated churn
(60 new / 250 updated / 60 expired deals per hour, KEEPA_API.md §4.6, fixed seed), a ManualClock.

"Seed design" is the code of the first landing (commit SEED_COMMIT), extracted with ``git archive``
into a scratch package ``seed_pipeline`` and run in this process against the same simulator build
and churn: today's design measured in the same run, not remembered.

Figures (per scenario):
* coverage: share of deal versions that appeared in the list during the run (up to 15 min before its
  end) and were in ``deals`` at that version or newer within 15 simulated minutes (sampled after
  every upsert run, i.e. every 5 min: a conservative measure).
* rebuys_not_called: /product purchases (stage 2) of a deal already enriched while the default
  policy (72 h, 10 % price move, judged on the simulator's own prices) did not call for one.
* tokens per enriched viable deal: /product tokens (both stages) / distinct deals enriched whose
  stats pass the rule set. Single stage = the no-rule run, its purchases judged by the same rules
  from the stats they bought; two-stage = the run with the rules on.

Run alone: ``python benchmarks/run_benchmarks.py --only economics`` (``--quick``: small windows).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from sections import BenchContext, Section

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deals_pipeline.budget import BudgetPolicy, TokenBudget  # noqa: E402
from deals_pipeline.clock import ManualClock  # noqa: E402
from deals_pipeline.enrichment import (  # noqa: E402
    DEFAULT_REENRICH_AFTER_HOURS, DEFAULT_REENRICH_PRICE_CHANGE_PCT, EnrichmentPolicy, StatsRules,
)
from deals_pipeline.keepa.client import KeepaClient  # noqa: E402
from deals_pipeline.keepa.models import Product  # noqa: E402
from deals_pipeline.simulator import CALIBRATED_CHURN, KeepaSimulator, SimulatorConfig  # noqa: E402
from deals_pipeline.storage import Database  # noqa: E402

#: The first landing (before issue 10): the "today's design" of the comparison.
SEED_COMMIT = "391bdea"
PRICE_TYPE = 2  # the benchmark query watches the used price
WINDOW_MS = 15 * 60_000
RULES = {
    "none": StatsRules(),
    "reject~50%": StatsRules(max_out_of_stock_pct90=50),
    "reject~80%": StatsRules(max_out_of_stock_pct90=20),
}


def seed_modules(tmp: Path):
    """The seed design's package, renamed ``seed_pipeline`` so it imports next to this one."""
    target = tmp / "seed_code"
    if not (target / "seed_pipeline").exists():
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", SEED_COMMIT, "deals_pipeline", "deals_pipeline_tests/__init__.py",
             "deals_pipeline_tests/conftest.py", "deals_pipeline_tests/harness"],
            capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target / "raw")
        for src in (target / "raw").rglob("*"):
            if src.is_file():
                rel = str(src.relative_to(target / "raw")).replace("deals_pipeline", "seed_pipeline")
                dst = target / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                text = src.read_text() if src.suffix == ".py" else None
                if text is not None:
                    dst.write_text(text.replace("deals_pipeline", "seed_pipeline"))
                else:
                    dst.write_bytes(src.read_bytes())
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    return importlib.import_module("seed_pipeline_tests.conftest"), importlib.import_module(
        "seed_pipeline_tests.harness.simulation")


def _stack(pkg: str, sim, clock, db_path: Path):
    """A stack of package ``pkg`` ('deals_pipeline' or 'seed_pipeline') on ``sim``."""
    storage = importlib.import_module(f"{pkg}.storage")
    client_mod = importlib.import_module(f"{pkg}.keepa.client")
    budget_mod = importlib.import_module(f"{pkg}.budget")
    tests = importlib.import_module(f"{pkg}_tests.conftest")
    db = storage.Database(db_path, data_mode="simulator")
    client = client_mod.KeepaClient("bench-key", base_url=sim.base_url, clock=clock, max_attempts=4, timeout_s=(2.0, 5.0))
    budget = budget_mod.TokenBudget(db, clock, budget_mod.BudgetPolicy(), owner="bench", sync=client.token_status)
    return tests.Stack(sim=sim, clock=clock, db=db, client=client, budget=budget, db_path=db_path)


def _instrument(stack, sim, purchases: list) -> None:
    """Log every /product purchase: (time, asins, with offers, tokens, watched price per ASIN)."""
    inner = stack.client.products

    def products(asins, options, *args, **kwargs):
        page = inner(asins, options, *args, **kwargs)
        now = stack.clock.now_ms()
        prices = {}
        for a in asins:
            live = sim.catalog.deal(a, now)
            prices[a] = None if live is None else live["current"][PRICE_TYPE]
        purchases.append((now, list(asins), options.offers is not None, page.status.tokens_consumed, prices,
                          {p.asin: p.raw for p in page.products}))
        return page

    stack.client.products = products


def _sampling(stack, samples: list):
    """Wrap an updater so every run ends with a sample of what ``deals`` holds (asin -> lastUpdate)."""

    def wrap(updater):
        inner = updater.run

        def run(*args, **kwargs):
            report = inner(*args, **kwargs)
            with stack.db.connect() as con:
                samples.append((stack.clock.now_ms(), dict(con.execute(
                    "SELECT asin, last_update_minute FROM deals").fetchall())))
            return report

        updater.run = run
        return updater

    return wrap


def run_scenario(tmp: Path, *, name: str, design: str, rate: int, hours: float, rules: StatsRules) -> dict:
    clock = ManualClock()
    config = SimulatorConfig(refill_rate=rate, catalog_size=800, initial_tokens=0, **CALIBRATED_CHURN)
    sim = KeepaSimulator(config, clock=clock).start()
    wall = time.perf_counter()
    try:
        purchases: list = []
        samples: list = []
        if design == "seed":
            _, harness = seed_modules(tmp)
            stack = _stack("seed_pipeline", sim, clock, tmp / f"{name}.duckdb")
            backfill, updater = stack.backfill(), stack.updater()
        else:
            harness = importlib.import_module("deals_pipeline_tests.harness.simulation")
            stack = _stack("deals_pipeline", sim, clock, tmp / f"{name}.duckdb")
            policy = EnrichmentPolicy(stats_rules=rules)
            backfill, updater = stack.backfill(policy=policy), stack.updater(policy=policy)
        _instrument(stack, sim, purchases)
        start = clock.now_ms()
        harness.simulate(stack, hours=hours, upsert_interval_min=5, backfill=backfill,
                         updater=_sampling(stack, samples)(updater))
        end = clock.now_ms()
        versions = [v for v in sim.catalog.versions() if start < v.visible_from_ms <= end - WINDOW_MS]
        with stack.db.connect() as con:
            product_tokens = int(con.execute(
                "SELECT coalesce(sum(actual), 0) FROM token_ledger WHERE purpose = 'product' AND actual IS NOT NULL"
            ).fetchone()[0])
            page_tokens = int(con.execute(
                "SELECT coalesce(sum(actual), 0) FROM token_ledger WHERE purpose = 'deal_page' AND actual IS NOT NULL"
            ).fetchone()[0])
            stored = int(con.execute("SELECT count(*) FROM deals").fetchone()[0])
    finally:
        sim.stop()
    return _figures(name, design, rate, hours, rules, versions, samples, purchases, product_tokens, page_tokens,
                    stored, time.perf_counter() - wall)


def _figures(name, design, rate, hours, rules, versions, samples, purchases, product_tokens, page_tokens, stored,
             wall_s) -> dict:
    covered = 0
    for v in versions:
        for t, rows in samples:
            if t < v.visible_from_ms:
                continue
            if t > v.visible_from_ms + WINDOW_MS:
                break
            if rows.get(v.asin, -1) >= v.last_update:
                covered += 1
                break
    hour_ms = 3_600_000
    last_buy: dict[str, tuple[int, int | None]] = {}
    rebuys_not_called = rebuys_called = 0
    tokens_on_enriched = 0.0
    enriched_stats: dict[str, dict] = {}
    for now, asins, offers, tokens, prices, raws in purchases:
        share = tokens / max(1, len(asins))
        for a in asins:
            if a in last_buy:
                tokens_on_enriched += share
            if not offers:
                continue
            if a in last_buy:
                at, price = last_buy[a]
                moved = (price is not None and prices[a] is not None and price > 0
                         and abs(prices[a] - price) * 100.0 / price >= DEFAULT_REENRICH_PRICE_CHANGE_PCT)
                if moved or now - at >= DEFAULT_REENRICH_AFTER_HOURS * hour_ms or (price is None) != (prices[a] is None):
                    rebuys_called += 1
                else:
                    rebuys_not_called += 1
            last_buy[a] = (now, prices[a])
            if a in raws:
                enriched_stats[a] = raws[a]
    viable = {}
    for label, rule in RULES.items():
        viable[label] = sum(1 for raw in enriched_stats.values() if rule.judge(Product.from_json(raw), PRICE_TYPE).viable)
    return {
        "name": name, "design": design, "rate": rate, "hours": hours, "rules": rules.describe() or "none",
        "coverage": covered / len(versions) if versions else float("nan"), "versions": len(versions),
        "stored": stored, "product_tokens": product_tokens, "page_tokens": page_tokens,
        "tokens_on_enriched": round(tokens_on_enriched), "rebuys_not_called": rebuys_not_called,
        "rebuys_called": rebuys_called, "enriched": len(enriched_stats), "viable": viable, "wall_s": wall_s,
    }


def measure(ctx: BenchContext) -> dict:
    """Env knobs (for a loaded machine): ECONOMICS_HOURS (5/min runs, default 24), ECONOMICS_SCALE_HOURS
    (50 and 500/min, default 4), ECONOMICS_RATES (default 5,50,500)."""
    hours_main = float(os.environ.get("ECONOMICS_HOURS", 0.5 if ctx.quick else 24.0))
    hours_scale = float(os.environ.get("ECONOMICS_SCALE_HOURS", 0.25 if ctx.quick else 4.0))
    # Quick mode: the 5/min runs only. 50 and 500/min take the same code paths, and their 0.25 h windows see
    # no churned deal version before the first poll (the check would flag an empty window, not a broken path).
    rates = [int(r) for r in os.environ.get("ECONOMICS_RATES", "5" if ctx.quick else "5,50,500").split(",")]
    runs: list[dict] = []
    plan = []
    for rate in rates:
        hours = hours_main if rate == 5 else hours_scale
        plan += [("seed", rate, hours, RULES["none"]), ("new", rate, hours, RULES["none"]),
                 ("new", rate, hours, RULES["reject~50%"]), ("new", rate, hours, RULES["reject~80%"])]
    for i, (design, rate, hours, rules) in enumerate(plan):
        name = f"econ{i}_{design}_{rate}"
        ctx.log(f"economics: {design} design, {rate}/min, {hours:g} h, rules {rules.describe() or 'none'}")
        r = run_scenario(ctx.tmp, name=name, design=design, rate=rate, hours=hours, rules=rules)
        ctx.log(f"  {r['wall_s']:.0f}s wall: coverage {r['coverage']:.3f}, enriched {r['enriched']}, "
                f"rebuys not called {r['rebuys_not_called']}, tokens on enriched {r['tokens_on_enriched']}")
        runs.append(r)
    result = {"runs": runs, "quick": ctx.quick}
    if os.environ.get("ECONOMICS_JSON"):  # raw figures, to render several partial runs together
        Path(os.environ["ECONOMICS_JSON"]).write_text(json.dumps(result, indent=1, default=str))
    return result


def _per_viable(run: dict, label: str) -> float:
    n = run["viable"][label]
    return run["product_tokens"] / n if n else float("inf")


def summary(result: dict) -> list[dict]:
    """Per rate: the seed run, the single-stage run and the two rule-set runs, with the ratios."""
    rows = []
    for rate in sorted({r["rate"] for r in result["runs"]}):
        at = [r for r in result["runs"] if r["rate"] == rate]
        seed = next(r for r in at if r["design"] == "seed")
        single = next(r for r in at if r["design"] == "new" and r["rules"] == "none")
        row = {"rate": rate, "hours": seed["hours"], "seed": seed, "new": single, "stages": {}}
        for label in ("reject~50%", "reject~80%"):
            two = next(r for r in at if r["design"] == "new" and r["rules"] == RULES[label].describe())
            cost_single, cost_two = _per_viable(single, label), _per_viable(two, label)
            per_hour = two["viable"][label] / two["hours"]
            row["stages"][label] = {
                "reject_share": 1 - single["viable"][label] / max(1, single["enriched"]),
                "single": cost_single, "two": cost_two, "ratio": cost_two / cost_single,
                "viable_per_hour": per_hour, "limit_per_hour": rate * 60 / cost_two,
                "seed_viable_per_hour": seed["viable"][label] / seed["hours"],
            }
        rows.append(row)
    return rows


def render(result: dict) -> list[str]:
    lines = ["## Economics (issue 10): every deal seen stored, free refresh, policy re-buys, two-stage enrichment", "",
             "Backfill + upserter sharing the budget, calibrated churn (60 new / 250 updated / 60 expired per hour),"
             " seed 7. `seed` = the first landing's code (commit " + SEED_COMMIT + ") in the same run.",
             "Reproduce: `python benchmarks/run_benchmarks.py --only economics`.", ""]
    if result["quick"]:
        lines += ["**QUICK MODE: short windows, not the real figures.**", ""]
    lines += ["| tokens/min | hours | design | coverage ≤15 min | deals stored | enriched | /product tokens | "
              "tokens on already-enriched | re-buys policy didn't call for | re-buys it called for |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary(result):
        for key in ("seed", "new"):
            r = row[key]
            lines.append(f"| {row['rate']} | {r['hours']:g} | {key} | {r['coverage']:.3f} ({r['versions']} versions) | "
                         f"{r['stored']} | {r['enriched']} | {r['product_tokens']} | {r['tokens_on_enriched']} | "
                         f"{r['rebuys_not_called']} | {r['rebuys_called']} |")
    lines += ["", "Tokens per enriched viable deal (viable = passes the stats rule set), single stage vs two stages:", "",
              "| tokens/min | rule set | rejected | single stage | two stages | ratio | viable/hour (two-stage) | "
              "physical limit/hour | seed viable/hour |", "|---|---|---|---|---|---|---|---|---|"]
    for row in summary(result):
        for label, s in row["stages"].items():
            lines.append(f"| {row['rate']} | {label} `{RULES[label].describe()}` | {s['reject_share']:.2f} | "
                         f"{s['single']:.1f} | {s['two']:.1f} | {s['ratio']:.2f} | {s['viable_per_hour']:.1f} | "
                         f"{s['limit_per_hour']:.1f} | {s['seed_viable_per_hour']:.1f} |")
    lines += ["", "Physical limit = refill per hour / two-stage tokens per viable deal. Wall time per run: "
              + ", ".join(f"{r['name']} {r['wall_s']:.0f}s" for r in result["runs"]), ""]
    return lines


def check(result: dict) -> list[str]:
    problems = []
    for r in result["runs"]:
        if not r["versions"]:
            problems.append(f"{r['name']}: churn produced no deal versions")
        if r["design"] == "new" and r["rebuys_not_called"]:
            problems.append(f"{r['name']}: {r['rebuys_not_called']} re-buys the policy did not call for")
    return problems


SECTIONS = [Section("economics", "Economics: what the tokens buy", measure, render, check)]
