"""The README's cost table, measured on the calibrated simulator over real HTTP: ``python benchmarks/cost_table.py``
(or as the ``cost_table`` section of ``run_benchmarks.py``).

Uses the pipeline's own client and default options (``ProductOptions()``: offers=20, rating=1, stats=90,
only-live-offers=1) and the production query (``DEFAULT_SELECTION``), with the default seed: figures repeat.
Prints the markdown rows (min-max over every chunk / page / upsert batch measured, median in brackets).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deals_pipeline.clock import ManualClock  # noqa: E402
from deals_pipeline.config import DEFAULT_SELECTION  # noqa: E402
from deals_pipeline.keepa.client import KeepaClient  # noqa: E402
from deals_pipeline.keepa.query import DealSelection, ProductOptions  # noqa: E402
from deals_pipeline.simulator import CALIBRATED_CHURN, KeepaSimulator, SimulatorConfig  # noqa: E402
from sections import BenchContext, Section  # noqa: E402  (benchmarks/ is on sys.path)

KEY = "cost-table-key"


def _spread(values: list[int]) -> str:
    return f"{min(values):,}–{max(values):,} (median {statistics.median(values):,.0f})"


def measure(ctx: BenchContext | None = None) -> dict:
    """Token spend per full chunk, per full page and per upsert batch on the production query."""
    clock = ManualClock()
    config = SimulatorConfig(refill_rate=100_000, expected_key=KEY, **CALIBRATED_CHURN)
    quick = ctx is not None and ctx.quick
    with KeepaSimulator(config, clock=clock) as sim:
        client = KeepaClient(KEY, base_url=sim.base_url, clock=clock)
        options = ProductOptions()
        query = DealSelection.from_mapping(DEFAULT_SELECTION)
        chunks, pages = [], []
        for page_no in range(1 if quick else 5):  # the five full pages of the production query
            page = client.deals(query.with_page(page_no))
            asins = [d.asin for d in page.deals]
            page_tokens = page.status.tokens_consumed
            for i in range(0, len(asins), 4):
                batch = asins[i : i + 4]
                spent = client.products(batch, options).status.tokens_consumed
                if len(batch) == 4:  # a page's last chunk holds 150 mod 4 = 2 deals
                    chunks.append(spent)
                page_tokens += spent
            pages.append(page_tokens)
            clock.advance(61_000)
        newest = DealSelection.from_mapping({**DEFAULT_SELECTION, "sortType": 1})
        upserts = []
        for _ in range(2 if quick else 12):  # an upsert every 5 minutes for an hour: the 20 newest deals
            asins = [d.asin for d in client.deals(newest).deals[:20]]
            upserts.append(client.products(asins, options).status.tokens_consumed)
            clock.advance(300_000)
    return {"chunks": chunks, "pages": pages, "upserts": upserts,
            "per_asin": sum(chunks) / (4 * len(chunks))}  # over full chunks


def render(result: dict) -> list[str]:
    chunks, pages, upserts = result["chunks"], result["pages"], result["upserts"]
    return [
        "## Cost table (README), calibrated simulator",
        "",
        "| unit of work | tokens | at 5 tokens/min |",
        "|---|---|---|",
        "| one deal page (even an empty one) | 5 | 1 min |",
        f"| one chunk: 4 deals, `/product` with `offers=20`, `rating=1` | {_spread(chunks)} | "
        f"{min(chunks) / 5:.1f}–{max(chunks) / 5:.1f} min |",
        f"| one full page of 150 deals | {_spread(pages)} | {min(pages) / 300:.1f}–{max(pages) / 300:.1f} h |",
        f"| the upserter (20 deals per run) | {_spread(upserts)} per run | leaves the rest to the backfill |",
        "",
        f"{result['per_asin']:.2f} tokens per ASIN over {4 * len(chunks)} ASINs (observed in real logs: 6–7.7).",
        "",
    ]


def check(result: dict) -> list[str]:
    """The calibration holds: 6-7.7 tokens per ASIN as in the real logs (KEEPA_API.md §3.4)."""
    return [] if 6.0 <= result["per_asin"] <= 7.7 else [f"{result['per_asin']:.2f} tokens per ASIN, outside 6-7.7"]


SECTIONS = [Section("cost_table", "README cost table on the calibrated simulator", measure, render, check)]


if __name__ == "__main__":
    print("\n".join(render(measure())))
