"""A pipeline process for kill tests: backfill pages or run an upsert, then exit.

Plain Python (no Dagster import) so it starts in well under a second and a test can SIGKILL many
runs. The Dagster ops call exactly the same service methods.

    python -m deals_pipeline_tests.harness.worker backfill --pages 0-3
    python -m deals_pipeline_tests.harness.worker upsert

Configured by env: SIM_URL, DEALS_DB_PATH, and the clock variables of deals_pipeline.clock; optional
SELECTION (JSON deal selection) and STATS_RULES (JSON StatsRules: turns on two-stage enrichment).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from deals_pipeline.budget import BudgetPolicy, TokenBudget
from deals_pipeline.clock import clock_from_env
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.storage import Database
from deals_pipeline_tests.conftest import Stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["backfill", "upsert"])
    parser.add_argument("--pages", default="0")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    clock = clock_from_env()
    db = Database(os.environ["DEALS_DB_PATH"], data_mode="simulator")
    client = KeepaClient(os.environ.get("SIM_KEY", "worker-key"), base_url=os.environ["SIM_URL"], clock=clock,
                         timeout_s=(2.0, 10.0), max_attempts=4)
    budget = TokenBudget(db, clock, BudgetPolicy(), owner=f"worker:{os.getpid()}", sync=client.token_status)
    stack = Stack(sim=None, clock=clock, db=db, client=client, budget=budget, db_path=db.path)
    if args.mode == "backfill":
        lo, _, hi = args.pages.partition("-")
        policy = None
        if "STATS_RULES" in os.environ:  # two-stage enrichment (economics kill test)
            from deals_pipeline.enrichment import EnrichmentPolicy, StatsRules

            policy = EnrichmentPolicy(stats_rules=StatsRules(**json.loads(os.environ["STATS_RULES"])))
        backfill = stack.backfill(selection=json.loads(os.environ["SELECTION"]) if "SELECTION" in os.environ else None,
                                  policy=policy)
        for page in range(int(lo), int(hi or lo) + 1):
            summary = backfill.run_page(page)
            print(json.dumps({"page": page, "complete": summary.complete, "is_last": summary.is_last}), flush=True)
            if summary.is_last:
                break
    else:
        updater = stack.updater()
        for _ in range(args.runs):
            report = updater.run()
            print(json.dumps({"upsert": report.status, "chunks": report.chunks_done}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
