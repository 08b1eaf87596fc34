"""The README's cost table, measured on the calibrated simulator over real HTTP: ``python benchmarks/cost_table.py``.

Uses the pipeline's own client and default options (``ProductOptions()``: offers=20, rating=1, stats=90,
only-live-offers=1) and the production query (``DEFAULT_SELECTION``), with the default seed: figures repeat.
Prints the markdown rows (min-max over every chunk / page / upsert batch measured, median in brackets).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deals_pipeline.clock import ManualClock  # noqa: E402
from deals_pipeline.config import DEFAULT_SELECTION  # noqa: E402
from deals_pipeline.keepa.client import KeepaClient  # noqa: E402
from deals_pipeline.keepa.query import DealSelection, ProductOptions  # noqa: E402
from deals_pipeline.simulator import CALIBRATED_CHURN, KeepaSimulator, SimulatorConfig  # noqa: E402

KEY = "cost-table-key"


def _spread(values: list[int]) -> str:
    return f"{min(values):,}–{max(values):,} (median {statistics.median(values):,.0f})"


def main() -> None:
    clock = ManualClock()
    config = SimulatorConfig(refill_rate=100_000, expected_key=KEY, **CALIBRATED_CHURN)
    with KeepaSimulator(config, clock=clock) as sim:
        client = KeepaClient(KEY, base_url=sim.base_url, clock=clock)
        options = ProductOptions()
        query = DealSelection.from_mapping(DEFAULT_SELECTION)
        chunks, pages = [], []
        for page_no in range(5):  # the five full pages of the production query
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
        for _ in range(12):  # an upsert every 5 minutes for an hour: the 20 newest deals each time
            asins = [d.asin for d in client.deals(newest).deals[:20]]
            upserts.append(client.products(asins, options).status.tokens_consumed)
            clock.advance(300_000)
    per_asin = sum(chunks) / (4 * len(chunks))  # over full chunks
    print(f"| one chunk: 4 deals, `/product` with `offers=20`, `rating=1` | {_spread(chunks)} | "
          f"{min(chunks) / 5:.1f}–{max(chunks) / 5:.1f} min |")
    print(f"| one full page of 150 deals | {_spread(pages)} | {min(pages) / 300:.1f}–{max(pages) / 300:.1f} h |")
    print(f"| the upserter (20 deals per run) | {_spread(upserts)} per run | leaves the rest to the backfill |")
    print(f"per ASIN: {per_asin:.2f} tokens over {4 * len(chunks)} ASINs")


if __name__ == "__main__":
    main()
