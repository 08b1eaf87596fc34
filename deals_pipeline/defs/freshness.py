"""How fresh `recent_deals` is, measured as the upserter sees it: discovery lag and backlog.

`max(last_update_minute)` over `deals` would include backfilled rows, which are often newer than
what a stuck upserter last saw, so it hides an upserter hours behind. The upserter's own watermark
(the newest change it committed) is the measure instead, plus the backlog it knew it left.
"""

from __future__ import annotations

from dataclasses import dataclass

from deals_pipeline.clock import Clock
from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute
from deals_pipeline.storage import Database
from deals_pipeline.upsert.service import WATERMARK_NAME

MAX_DISCOVERY_LAG_MINUTES = 6 * 60  # the freshness policy's fail window


@dataclass(frozen=True)
class UpsertFreshness:
    """discovery_lag_minutes: now minus the newest change the upserter committed (None: never ran).
    backlog: changed deals the last upsert run found but left for the next one (None: unknown)."""

    discovery_lag_minutes: int | None
    backlog: int | None

    def as_metadata(self) -> dict[str, object]:
        metadata: dict[str, object] = {}
        if self.discovery_lag_minutes is not None:
            metadata["discovery_lag_minutes"] = self.discovery_lag_minutes
        if self.backlog is not None:
            metadata["backlog_deals"] = self.backlog
        return metadata

    def up_to_date(self, max_lag_minutes: int = MAX_DISCOVERY_LAG_MINUTES) -> bool:
        return (self.discovery_lag_minutes is not None and self.discovery_lag_minutes <= max_lag_minutes
                and not self.backlog)


def upsert_freshness(db: Database, clock: Clock, *, backlog: int | None) -> UpsertFreshness:
    """One single-row read of the upserter's watermark."""
    with db.connect() as con:
        row = con.execute("SELECT last_update_minute FROM watermarks WHERE name = ?", [WATERMARK_NAME]).fetchone()
    if row is None:
        return UpsertFreshness(discovery_lag_minutes=None, backlog=backlog)
    lag = max(0, unix_ms_to_keepa_minute(clock.now_ms()) - int(row[0]))
    return UpsertFreshness(discovery_lag_minutes=lag, backlog=backlog)
