"""Deal lifecycle: deals that left Keepa's list become inactive, then age out (plain Python).

* A **full discovery pass** reads the deal list from page 0 to its short last page (5 tokens a page,
  no /product calls) and records when each stored deal was last listed (``deals.last_seen``). Only a
  pass that reached the last page may mark deals inactive: a deal on a page a partial pass never read
  is not "gone". After a complete pass, a stored deal not listed within ``inactive_after_hours`` gets
  ``inactive_since``; a listed one is active again.
* The **janitor** archives deals inactive for longer than ``retain_inactive_days`` to
  ``deals_archive`` (the whole row as JSON) and deletes them from ``deals``; ``mode="delete"`` only
  deletes. Active deals are never touched. The published ``current_deals`` view shows active deals only.

Times come from the injected clock (the scaled or manual clock of tests), like every other wait.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

from deals_pipeline.budget import Priority, TokenBudget
from deals_pipeline.clock import Clock
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import ConfigError
from deals_pipeline.keepa.models import MAX_DEAL_PAGE
from deals_pipeline.keepa.query import DealSelection
from deals_pipeline.storage import Database
from deals_pipeline.storage.publish import DealPublisher, publish_quietly

log = logging.getLogger(__name__)

ENV_INACTIVE_AFTER_HOURS = "DEALS_INACTIVE_AFTER_HOURS"
ENV_RETAIN_INACTIVE_DAYS = "DEALS_RETAIN_INACTIVE_DAYS"
ENV_JANITOR_MODE = "DEALS_JANITOR_MODE"


@dataclass(frozen=True)
class LifecyclePolicy:
    """``inactive_after_hours``: a deal not listed by a full pass for this long is inactive (the production
    janitor used 72 h). ``retain_inactive_days``: inactive deals are kept this long, then archived or
    deleted (``mode``)."""

    inactive_after_hours: float = 72.0
    retain_inactive_days: float = 7.0
    mode: Literal["archive", "delete"] = "archive"

    def __post_init__(self) -> None:
        if self.inactive_after_hours < 0 or self.retain_inactive_days < 0:
            raise ConfigError("inactive_after_hours and retain_inactive_days must be >= 0")
        if self.mode not in ("archive", "delete"):
            raise ConfigError(f"janitor mode must be 'archive' or 'delete', got {self.mode!r}")


def timeline_now(clock: Clock) -> datetime:
    """The injected clock's now as an aware UTC datetime (what the deals table stores)."""
    return datetime.fromtimestamp(clock.now_ms() / 1000.0, tz=timezone.utc)


@dataclass
class DiscoveryPassReport:
    pass_id: str
    complete: bool = False
    pages: int = 0
    deals_listed: int = 0
    marked_inactive: int = 0
    reactivated: int = 0
    tokens_spent: int = 0
    listed: set[str] = field(default_factory=set, repr=False)


@dataclass(frozen=True)
class JanitorReport:
    archived: int
    deleted: int
    still_inactive: int


def run_discovery_pass(db: Database, client: KeepaClient, budget: TokenBudget, selection: DealSelection,
                       clock: Clock, policy: LifecyclePolicy, *, deadline_ms: int | None = None,
                       max_pages: int = MAX_DEAL_PAGE + 1, publisher: DealPublisher | None = None) -> DiscoveryPassReport:
    """Read the whole deal list and update the lifecycle of stored deals (see the module docstring).

    Raises BudgetDeadline / KeepaError as the budget and client do: an interrupted pass marks nothing.
    """
    report = DiscoveryPassReport(pass_id=uuid.uuid4().hex[:12])
    started = timeline_now(clock)
    for page in range(min(max_pages, MAX_DEAL_PAGE + 1)):
        deal_page, _ = budget.call(
            lambda p=page: client.deals(selection.with_page(p)),
            cost=budget.costs.deal_pages(), purpose="discovery_page", priority=Priority.BACKFILL,
            deadline_ms=deadline_ms, detail=f"discovery page {page}",
        )
        report.pages += 1
        report.tokens_spent += deal_page.status.tokens_consumed
        report.listed.update(d.asin for d in deal_page.deals)
        if deal_page.is_last:
            report.complete = True
            break
    report.deals_listed = len(report.listed)
    record_pass(db, report, started=started, now=timeline_now(clock), policy=policy)
    if report.marked_inactive or report.reactivated:
        publish_quietly(publisher if publisher is not None else DealPublisher(db), force=True)
    return report


def record_pass(db: Database, report: DiscoveryPassReport, *, started: datetime, now: datetime,
                policy: LifecyclePolicy) -> None:
    """Store what one pass listed: last_seen of listed deals, and (complete passes only) inactivity."""
    cutoff = now - timedelta(hours=policy.inactive_after_hours)
    now_ms, cutoff_ms = int(now.timestamp() * 1000), int(cutoff.timestamp() * 1000)
    # last_seen_ms: the timeline ms every deal-page write records (schema v3); rows older than it fall back
    # to the last_seen timestamp.
    seen_ms = "COALESCE(last_seen_ms, epoch_ms(last_seen))"
    listed = sorted(report.listed)
    with db.transaction() as con:
        if listed:
            report.reactivated = int(con.execute(
                "SELECT count(*) FROM deals WHERE inactive_since IS NOT NULL AND asin IN (SELECT unnest(?))",
                [listed]).fetchone()[0])
            con.execute("UPDATE deals SET last_seen = ?, last_seen_ms = ?, inactive_since = NULL "
                        "WHERE asin IN (SELECT unnest(?))", [now, now_ms, listed])
        if report.complete:
            report.marked_inactive = int(con.execute(
                f"SELECT count(*) FROM deals WHERE inactive_since IS NULL AND {seen_ms} < ? "
                "AND NOT list_contains(?, asin)", [cutoff_ms, listed]).fetchone()[0])
            con.execute(
                f"UPDATE deals SET inactive_since = ? WHERE inactive_since IS NULL AND {seen_ms} < ? "
                "AND NOT list_contains(?, asin)", [now, cutoff_ms, listed])
        con.execute(
            "INSERT INTO discovery_passes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [report.pass_id, started, now, report.complete, report.pages, report.deals_listed,
             report.marked_inactive, report.reactivated],
        )
    log.info("discovery pass %s: %d pages, %d deals listed, %d marked inactive, %d active again%s",
             report.pass_id, report.pages, report.deals_listed, report.marked_inactive, report.reactivated,
             "" if report.complete else " (incomplete: nothing marked inactive)")


def run_janitor(db: Database, clock: Clock, policy: LifecyclePolicy, *,
                publisher: DealPublisher | None = None) -> JanitorReport:
    """Archive (or delete) deals inactive for longer than ``retain_inactive_days``; active ones stay."""
    now = timeline_now(clock)
    cutoff = now - timedelta(days=policy.retain_inactive_days)
    with db.transaction() as con:
        expired = "inactive_since IS NOT NULL AND inactive_since < ?"
        archived = 0
        if policy.mode == "archive":
            archived = int(con.execute(f"SELECT count(*) FROM deals WHERE {expired}", [cutoff]).fetchone()[0])
            con.execute(
                f"INSERT INTO deals_archive SELECT asin, ?, inactive_since, last_seen, to_json(d) FROM deals d WHERE {expired}",
                [now, cutoff])
        deleted = int(con.execute(f"SELECT count(*) FROM deals WHERE {expired}", [cutoff]).fetchone()[0])
        con.execute(f"DELETE FROM deals WHERE {expired}", [cutoff])
        still = int(con.execute("SELECT count(*) FROM deals WHERE inactive_since IS NOT NULL").fetchone()[0])
    report = JanitorReport(archived=archived, deleted=deleted, still_inactive=still)
    log.info("janitor: %d archived, %d deleted (inactive > %.1f days), %d inactive kept", archived, deleted,
             policy.retain_inactive_days, still)
    if deleted:
        publish_quietly(publisher if publisher is not None else DealPublisher(db), force=True)
    return report


__all__ = ["DiscoveryPassReport", "JanitorReport", "LifecyclePolicy", "record_pass", "run_discovery_pass",
           "run_janitor", "timeline_now"]
