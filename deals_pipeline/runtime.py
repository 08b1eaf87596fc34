"""The services one run uses, as plain Python: what a Dagster asset (or a script) builds and drives.

`deals_pipeline.defs.resources.build_runtime` fills it from the Dagster resources; nothing here
imports Dagster, so the services can be wired the same way from a test or a benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

from deals_pipeline.backfill.service import BackfillSettings, PageBackfill
from deals_pipeline.budget import TokenBudget
from deals_pipeline.clock import Clock
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.storage import Database
from deals_pipeline.upsert.service import RecentDealsUpdater, UpsertSettings


@dataclass
class Runtime:
    """The database, client, budget and clock of one run, and the deadline its work must stop by."""

    db: Database
    client: KeepaClient
    budget: TokenBudget
    clock: Clock
    source: str
    deadline_ms: int

    def page_backfill(self, settings: BackfillSettings) -> PageBackfill:
        """The backfill service for one run, sharing this run's database, client and budget."""
        return PageBackfill(self.db, self.client, self.budget, settings, clock=self.clock, source=self.source)

    def recent_deals(self, settings: UpsertSettings) -> RecentDealsUpdater:
        """The upsert service for one run, sharing this run's database, client and budget."""
        return RecentDealsUpdater(self.db, self.client, self.budget, settings, clock=self.clock,
                                  source=self.source)
