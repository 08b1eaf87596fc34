"""When to spend, measured: 24 simulated hours at 5 tokens/min with churn, scheduled as production runs it.

Two sensors and ONE keepa_api slot (deals_pipeline_tests/harness/scheduled.py): the upserter polls at the
adaptive interval and may use at most ``upsert_share`` of the refill while the backfill has work; every op
waits at most ``max_wait_in_slot_s`` for tokens, else defers (nothing paid) and is relaunched.

Reported per run: backfill chunks/hour, the upserter's measured share vs ``upsert_share``, p95 and max
discovery lag for new deals, the poll share of tokens, and strict utilisation (useful enrichments ÷
(available tokens ÷ /product cost per ASIN)), under both sortType-1 orderings when the simulator offers them.

    .venv/bin/python benchmarks/scheduling.py [--hours 24] [--out benchmarks/SCHEDULING.md]

``run_benchmarks.py`` picks it up through ``SECTIONS`` (benchmarks/sections.py, on the arch branch) and
appends :func:`section` to RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from deals_pipeline.budget import Priority  # noqa: E402
from deals_pipeline.scheduling import DEFAULT_UPSERT_SHARE  # noqa: E402
from deals_pipeline.simulator import SimulatorConfig  # noqa: E402
from deals_pipeline_tests.harness.scheduled import discovery_lags_min, p95, simulate_scheduled  # noqa: E402

#: The token-economics issue's realistic churn at 5/min (per simulated hour).
CHURN = {"drift_new_per_hour": 60.0, "drift_updates_per_hour": 250.0, "drift_expired_per_hour": 60.0}
ORDERINGS = ("lastUpdate", "creationDate")


def _config(rate: int, ordering: str | None) -> tuple[SimulatorConfig, dict]:
    fields = {f.name for f in dataclasses.fields(SimulatorConfig)}
    kwargs = {k: v for k, v in CHURN.items() if k in fields}
    if ordering is not None and "sort1_orders_by" in fields:
        kwargs["sort1_orders_by"] = ordering
    return SimulatorConfig(refill_rate=rate, catalog_size=2000, initial_tokens=0, **kwargs), kwargs


def run_one(tmp: Path, *, hours: float, rate: int = 5, ordering: str | None = None,
            upsert_share: float = DEFAULT_UPSERT_SHARE) -> dict:
    from run_benchmarks import build_stack, instrument_products

    config, applied = _config(rate, ordering)
    stack = build_stack(tmp, config, f"scheduling_{ordering or 'default'}")
    try:
        products = instrument_products(stack.sim)
        backfill = stack.backfill(max_wait_in_slot_s=120)
        updater = stack.updater(max_wait_in_slot_s=120, backfill_fingerprint=backfill.fingerprint,
                                upsert_share=upsert_share, max_pages_per_run=10)
        start = stack.clock.now_ms()
        initial = stack.sim.bucket.balance(start)
        t0 = time.perf_counter()
        report = simulate_scheduled(stack, hours=hours - 1 / 3_600_000, backfill=backfill, updater=updater)
        wall = time.perf_counter() - t0
        end = stack.clock.now_ms()
        refill = stack.sim.bucket.refills * rate
        consumed = stack.sim.stats().tokens_consumed
        with stack.db.connect() as con:
            by_priority = dict(con.execute(
                "SELECT priority, coalesce(sum(actual), 0) FROM token_ledger WHERE state = 'settled' GROUP BY 1"
            ).fetchall())
            poll_tokens = con.execute(
                "SELECT coalesce(sum(actual), 0) FROM token_ledger WHERE state = 'settled' AND purpose = 'deal_page' "
                "AND detail LIKE 'recent page%'").fetchone()[0]
            enriched = {r[0] for r in con.execute("SELECT asin FROM deals WHERE enriched_at IS NOT NULL").fetchall()}
        lags = discovery_lags_min(stack, report, start, end)
    finally:
        stack.sim.stop()
    # Useful /product fetches: a new deal, or a newer version of one (not a re-fetch of the same version).
    useful = 0
    product_tokens = 0
    last_version: dict[str, object] = {}
    for row in sorted(products):
        _, asin, version, cost, _actor = row
        product_tokens += cost
        if asin in enriched and (asin not in last_version or (version is not None and last_version[asin] is not None
                                                              and version > last_version[asin])):
            useful += 1
        last_version[asin] = version
    available = initial + refill
    per_asin = product_tokens / len(products) if products else float("nan")
    sim_h = (end - start) / 3_600_000
    upsert_tokens = int(by_priority.get(int(Priority.UPSERT), 0))
    return {
        "ordering": ordering or "simulator default", "churn": applied, "hours": sim_h, "rate": rate,
        "upsert_share": upsert_share, "available": available, "consumed": consumed,
        "backfill_chunks_per_hour": report.backfill_chunks_done / sim_h,
        "backfill_chunks_deferred": report.backfill_chunks_deferred,
        "backfill_pages_complete": report.backfill_pages_complete,
        "upsert_share_measured": upsert_tokens / refill if refill else float("nan"),
        "backfill_share_measured": int(by_priority.get(int(Priority.BACKFILL), 0)) / refill if refill else float("nan"),
        "poll_share": poll_tokens / refill if refill else float("nan"),
        "lag_p95_min": p95(lags), "lag_max_min": max(lags) if lags else float("nan"),
        "lag_median_min": statistics.median(lags) if lags else float("nan"), "new_deals": len(lags),
        "poll_interval_median_s": statistics.median(report.poll_intervals_s) if report.poll_intervals_s else 0,
        "upsert_runs": len(report.upsert_runs), "upsert_statuses": report.statuses,
        "util_strict": useful / (available / per_asin) if products else 0.0,
        "useful_enrichments": useful, "age_max_min": max(report.ages_min) if report.ages_min else float("nan"),
        "wall_s": wall,
    }


def section(results: list[dict]) -> str:
    """The RESULTS.md section (Markdown)."""
    out = ["## When to spend: shares, deferral, adaptive polling (benchmarks/scheduling.py)", "",
           f"{results[0]['hours']:.0f} simulated hours at 5 tokens/min from an empty bucket, catalog 2,000 deals, churn "
           + ", ".join(f"{k}={v}" for k, v in results[0]["churn"].items() if k != "sort1_orders_by")
           + ". One keepa_api slot shared by the two sensors' runs; every op waits at most 120 s in the slot, "
           "else defers. Discovery lag = minutes from a new deal becoming visible in the simulator to the pipeline "
           "holding it in `deals` (lossless discovery stores every deal of a paid page); never-discovered deals count until the end.",
           "", "| figure | " + " | ".join(r["ordering"] for r in results) + " | target |",
           "|---|" + "---|" * len(results) + "---|"]

    def row(label: str, key: str, fmt: str, target: str = "") -> None:
        out.append(f"| {label} | " + " | ".join(format(r[key], fmt) for r in results) + f" | {target} |")

    row("backfill chunks / hour", "backfill_chunks_per_hour", ".2f")
    row("upserter share of refill (measured)", "upsert_share_measured", ".3f",
        f"≤ upsert_share {results[0]['upsert_share']:.2f}")
    row("backfill share of refill (measured)", "backfill_share_measured", ".3f")
    row("poll share of tokens (upsert pages ÷ refill)", "poll_share", ".3f", "≤ 0.10")
    row("median poll interval s", "poll_interval_median_s", ".0f")
    row("new deals", "new_deals", "d")
    row("discovery lag p95 min", "lag_p95_min", ".1f", "≤ 30 (lag target)")
    row("discovery lag max min", "lag_max_min", ".1f")
    row("strict utilisation", "util_strict", ".3f", "≥ 0.95")
    row("upsert runs", "upsert_runs", "d")
    row("backfill chunks deferred (no tokens within the bound)", "backfill_chunks_deferred", "d")
    row("wall s", "wall_s", ".0f")
    out.append("")
    out += [f"- {r['ordering']}: upsert run statuses {r['upsert_statuses']}" for r in results]
    out.append("")
    return "\n".join(out)


def run_all(tmp: Path, *, hours: float) -> list[dict]:
    """Both sortType-1 orderings when the simulator offers the knob, else its one ordering."""
    fields = {f.name for f in dataclasses.fields(SimulatorConfig)}
    orderings = list(ORDERINGS) if "sort1_orders_by" in fields else [None]
    results = []
    for ordering in orderings:
        results.append(run_one(tmp, hours=hours, ordering=ordering))
        print({k: v for k, v in results[-1].items() if k != "churn"}, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "SCHEDULING.md")
    parser.add_argument("--ordering", choices=ORDERINGS, help="one sortType-1 ordering only (default: both)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.ordering:
            results = [run_one(Path(tmp), hours=args.hours, ordering=args.ordering)]
            print({k: v for k, v in results[-1].items() if k != "churn"}, flush=True)
        else:
            results = run_all(Path(tmp), hours=args.hours)
    text = section(results)
    args.out.write_text(text)
    print(text)



def _measure(ctx) -> dict:
    return {"results": run_all(ctx.tmp, hours=0.5 if ctx.quick else 24)}


def _render(result: dict) -> list[str]:
    return section(result["results"]).splitlines()


def _check(result: dict) -> list[str]:
    """What would make the figures meaningless (not targets: those are reported against, not asserted)."""
    problems = []
    for r in result["results"]:
        if not r["upsert_runs"] or r["consumed"] <= 0:
            problems.append(f"{r['ordering']}: nothing ran (upsert runs {r['upsert_runs']}, consumed {r['consumed']})")
        if r["new_deals"] == 0:
            problems.append(f"{r['ordering']}: no new deals appeared: churn is off, the lag figures mean nothing")
    return problems


try:  # the extensible harness (benchmarks/sections.py) lands with the arch branch
    from sections import Section
except ImportError:  # pragma: no cover - before that merge: run this file directly
    SECTIONS: list = []
else:
    SECTIONS = [Section("scheduling", "When to spend: shares, deferral, adaptive polling", _measure, _render, _check)]

if __name__ == "__main__":
    main()
