"""A spending process for the multi-process budget test (run with ``python -m``).

Spends /product calls of 4 ASINs through a TokenBudget on a shared DuckDB file against a simulator
URL, on a ScaledClock rebuilt from (scale, anchor), until the budget says the deadline cannot be met.
Prints one JSON summary line on stdout: each call as [server timestamp, consumed, left, elapsed timeline ms,
slept timeline ms], the 429s, and where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from deals_pipeline.budget import BudgetDeadline, BudgetPolicy, Priority, TokenBudget
from deals_pipeline.clock import ScaledClock
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import NotEnoughTokens
from deals_pipeline.keepa.query import ProductOptions
from deals_pipeline.storage.db import Database


class _SleepCountingClock(ScaledClock):
    """The shared timeline, counting the time this process chose to sleep (budget waits, backoffs).

    Unlike the elapsed timeline time of a call, the slept time does not grow with the machine's load:
    at x120 one wall second of CPU or lock contention is two timeline minutes.
    """

    slept_total_ms: float = 0.0

    def sleep_ms(self, ms: float) -> None:
        self.slept_total_ms += max(0.0, ms)
        super().sleep_ms(ms)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--scale", type=float, required=True)
    ap.add_argument("--anchor", type=float, required=True)
    ap.add_argument("--owner", required=True)
    ap.add_argument("--priority", choices=[p.name for p in Priority], required=True)
    ap.add_argument("--start-ms", type=int, required=True)
    ap.add_argument("--end-ms", type=int, required=True)
    ap.add_argument("--asins", required=True)
    ap.add_argument("--ttl-ms", type=int, default=1_800_000)
    ap.add_argument("--idle-ms", type=int, default=0, help="pause after each call (a scheduled upserter)")
    args = ap.parse_args(argv)

    clock = _SleepCountingClock(args.scale, args.anchor)
    options = ProductOptions(stats=90, offers=20, rating=True)
    priority = Priority[args.priority]
    out: dict = {"owner": args.owner, "priority": args.priority, "calls": [], "r429": [], "gave_up": 0, "stop": None}
    with KeepaClient(args.key, base_url=args.base_url, clock=clock, timeout_s=(5.0, 20.0)) as client:
        # Time on the timeline: a reservation must outlive a request plus DuckDB lock waits, which are
        # real seconds (x scale on this clock).
        policy = BudgetPolicy(reservation_ttl_ms=args.ttl_ms)
        budget = TokenBudget(Database(args.db), clock, policy, args.owner, sync=client.token_status)
        clock.sleep_ms(args.start_ms - clock.now_ms())
        asins = itertools.cycle(args.asins.split(","))
        while True:
            batch = [next(asins) for _ in range(4)]

            def fn(batch: list[str] = batch):  # noqa: ANN202
                try:
                    return client.products(batch, options)
                except NotEnoughTokens as exc:
                    s = exc.status
                    out["r429"].append([s.timestamp_ms, s.next_refill_ms, s.tokens_left] if s else None)
                    raise

            t0, slept0 = clock.now_ms(), clock.slept_total_ms
            try:
                page, _ = budget.call(
                    fn, cost=budget.costs.products(4, options, cap=300), purpose="product",
                    priority=priority, deadline_ms=args.end_ms,
                )
            except BudgetDeadline as exc:
                out["stop"] = {"at": clock.now_ms(), "wait_ms": exc.wait_ms, "need": exc.need}
                break
            except NotEnoughTokens:
                out["gave_up"] += 1
                continue
            s = page.status
            out["calls"].append([s.timestamp_ms, s.tokens_consumed, s.tokens_left, clock.now_ms() - t0,
                                 int(clock.slept_total_ms - slept0)])
            if args.idle_ms:
                clock.sleep_ms(args.idle_ms)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
