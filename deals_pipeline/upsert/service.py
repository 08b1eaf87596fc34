"""Refreshing the newest deals with a watermark that never loses one (plain Python).

Each run reads the newest-first deal list (sortType 1; sortType 4 is percentage delta, not
recency: KEEPA_API.md §4.2) until it reaches deals at or below the watermark, a short page, or the
last page. It selects the deals changed since the watermark, oldest first, up to the batch size
sized from the learned refill rate, and commits them chunk by chunk. After each chunk the watermark
moves to that chunk's newest (lastUpdate, asin) in the SAME transaction as its rows (HAZARDS #12,
#36), and never ahead of the server clock (#17). A run stopped by the budget keeps what it
committed; the rest is picked up, oldest first, by the next run.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Callable

from deals_pipeline.budget import BudgetDeadline, Priority, TokenBudget
from deals_pipeline.budget.sizing import max_new_deals_per_run
from deals_pipeline.clock import Clock
from deals_pipeline.enrichment import ChunkEnricher, ViabilityRules
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import ConfigError, KeepaError
from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute
from deals_pipeline.keepa.models import MAX_DEAL_PAGE, Deal
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.keepa.redact import redact
import duckdb

from deals_pipeline.storage import Database, DatabaseBusy
from deals_pipeline.storage.repository import stored_deals, utcnow
from deals_pipeline.scheduling import (
    DEFAULT_MAX_PAGES_PER_RUN,
    DEFAULT_SHARE_WINDOW_MIN,
    DEFAULT_UPSERT_SHARE,
    ShareDecision,
    backfill_has_work,
    slot_deadline_ms,
    spent_by_priority,
    upsert_share_decision,
)
from deals_pipeline.upsert import scan

log = logging.getLogger(__name__)

WATERMARK_NAME = "recent_deals"
#: The oldest deal of the upserter's first batch. Older deals belong to the backfill: the overlap
#: re-read below the watermark never reaches under it (else the first runs would treat the whole
#: unstored history just below the first batch as "late arrivals").
FLOOR_NAME = "recent_deals_floor"


@dataclass(frozen=True, order=True)
class Watermark:
    """Position in (lastUpdate minute, asin) order: everything at or below it has been stored."""

    last_update_minute: int
    asin: str

    @classmethod
    def of(cls, deal: Deal) -> "Watermark":
        return cls(int(deal.last_update), deal.asin)


@dataclass(frozen=True)
class UpsertSettings:
    selection: DealSelection
    product_options: ProductOptions = field(default_factory=ProductOptions)
    rules: ViabilityRules = field(default_factory=ViabilityRules)
    chunk_size: int = 4
    sizing_mode: str = "default"
    interval_s: int = 300
    #: Pages one run may read; a deeper scan resumes next run from its stored position (upsert/scan.py).
    max_pages_per_run: int = DEFAULT_MAX_PAGES_PER_RUN
    #: While the backfill (of this selection fingerprint) has work, the upserter's share of the refill
    #: over the sliding window. None = no backfill to share with.
    backfill_fingerprint: str | None = None
    upsert_share: float = DEFAULT_UPSERT_SHARE
    share_window_min: int = DEFAULT_SHARE_WINDOW_MIN
    #: Longest wait for tokens while holding the pool slot; past it the run ends, progress saved
    #: (deferred). None = wait up to the run deadline (plain-Python callers without a pool slot);
    #: the Dagster resource sets DEFAULT_MAX_WAIT_IN_SLOT_S.
    max_wait_in_slot_s: float | None = None
    #: Deals can enter the list after newer ones were seen, with a lastUpdate at or below the
    #: watermark (the list is refreshed after the product). Each run re-reads this many minutes
    #: below the watermark; deals already stored at that version cost nothing (skipped as fresh).
    overlap_minutes: int = 15

    def __post_init__(self) -> None:
        if abs(self.selection.sort_type) != 1 or self.selection.sort_type < 0:
            raise ConfigError("the upserter needs sortType 1 (newest first); sortType 4 is % delta, not recency")
        if self.sizing_mode not in ("default", "derived"):
            raise ConfigError(f"sizing_mode must be 'default' or 'derived', got {self.sizing_mode!r}")
        if not 1 <= self.chunk_size <= 100:
            raise ConfigError(f"chunk_size must be 1..100, got {self.chunk_size}")
        if not 1 <= self.max_pages_per_run <= MAX_DEAL_PAGE + 1:
            raise ConfigError(f"max_pages_per_run must be 1..{MAX_DEAL_PAGE + 1}, got {self.max_pages_per_run}")
        if not 0.0 < self.upsert_share <= 1.0:
            raise ConfigError(f"upsert_share must be in (0, 1], got {self.upsert_share}")
        if self.share_window_min <= 0 or (self.max_wait_in_slot_s is not None and self.max_wait_in_slot_s <= 0):
            raise ConfigError("share_window_min and max_wait_in_slot_s must be > 0")


@dataclass
class UpsertReport:
    run_id: str
    status: str = "running"  # complete, budget_stopped, deferred, scanning, share_deferred, failed, nothing_new
    batch_size: int = 0
    batch_reason: str = ""
    pages_fetched: int = 0
    candidates: int = 0
    selected: int = 0
    deals_new: int = 0
    deals_updated: int = 0
    fresh_skipped: int = 0
    filtered: int = 0
    chunks_done: int = 0
    tokens_spent: int = 0
    watermark_before: Watermark | None = None
    watermark_after: Watermark | None = None
    remaining_changed: int = 0
    error: str | None = None
    scan_complete: bool = True
    scan_next_page: int = 0
    share: ShareDecision | None = None

    def as_metadata(self) -> dict[str, object]:
        return {
            "status": self.status,
            "batch_size": self.batch_size,
            "batch_reason": self.batch_reason,
            "pages_fetched": self.pages_fetched,
            "changed_candidates": self.candidates,
            "selected": self.selected,
            "deals_new": self.deals_new,
            "deals_updated": self.deals_updated,
            "fresh_skipped": self.fresh_skipped,
            "filtered": self.filtered,
            "chunks_done": self.chunks_done,
            "tokens_spent": self.tokens_spent,
            "watermark_before": _wm_text(self.watermark_before),
            "watermark_after": _wm_text(self.watermark_after),
            "remaining_changed": self.remaining_changed,
            "scan_complete": self.scan_complete,
            "scan_next_page": self.scan_next_page,
            **(self.share.as_metadata() if self.share is not None else {}),
        }


def _wm_text(wm: Watermark | None) -> str:
    return "none" if wm is None else f"{wm.last_update_minute}/{wm.asin}"


def read_watermark(db: Database, name: str = WATERMARK_NAME) -> Watermark | None:
    with db.connect() as con:
        row = con.execute("SELECT last_update_minute, asin FROM watermarks WHERE name = ?", [name]).fetchone()
    return None if row is None else Watermark(int(row[0]), row[1])


class RecentDealsUpdater:
    """One upsert run at a time (the `keepa_api` pool and the sensor's in-flight check see to that)."""

    def __init__(
        self,
        db: Database,
        client: KeepaClient,
        budget: TokenBudget,
        settings: UpsertSettings,
        *,
        clock: Clock,
        source: str,
    ) -> None:
        self.db = db
        self.client = client
        self.budget = budget
        self.settings = settings
        self.clock = clock
        self.enricher = ChunkEnricher.for_selection(
            db, client, budget, settings.selection, options=settings.product_options, rules=settings.rules,
            source=source, origin="upsert", priority=Priority.UPSERT,
        )

    def batch_size(self) -> tuple[int, str]:
        """Deals per run from the *learned* refill rate (a plan upgrade resizes with no config change)."""
        rate = self.budget.projection().refill_rate
        per_deal = max(1, int(self.enricher.predicted_cost(1)))
        size = max_new_deals_per_run(
            rate, mode=self.settings.sizing_mode, interval_s=self.settings.interval_s, tokens_per_deal=per_deal
        )
        if self.settings.sizing_mode == "default":
            reason = f"refill {rate}/min {'<' if rate < 20 else '>='} 20 -> {size}"
        else:
            reason = f"refill {rate}/min x {self.settings.interval_s}s / {per_deal} tokens per deal -> {size}"
        return size, reason

    def next_chunk_cost(self) -> int:
        return int(self.enricher.predicted_cost(self.settings.chunk_size))

    def run(
        self,
        *,
        deadline_ms: int | None = None,
        run_id: str | None = None,
        on_chunk: Callable[[UpsertReport], None] | None = None,
    ) -> UpsertReport:
        report = UpsertReport(run_id=run_id or uuid.uuid4().hex[:12])
        report.batch_size, report.batch_reason = self.batch_size()
        report.watermark_before = read_watermark(self.db)
        self._record_run(report, started=True)
        try:
            self._run(report, deadline_ms, on_chunk)
        except BudgetDeadline as stop:
            if deadline_ms is None or (stop.deadline_ms is not None and stop.deadline_ms < deadline_ms):
                # Not affordable within max_wait_in_slot_s: end now and free the pool slot (the sensor relaunches).
                report.status = "deferred"
                report.error = (f"tokens not affordable within {self.settings.max_wait_in_slot_s} s "
                                f"(wait {stop.wait_ms} ms): deferred, pool slot released")
            else:
                report.status = "budget_stopped"
                report.error = f"tokens would arrive after the run deadline (wait {stop.wait_ms} ms)"
        except (KeepaError, duckdb.Error, DatabaseBusy) as exc:
            # Progress committed so far stays; the watermark is where the last committed chunk put it.
            report.status = "failed"
            report.error = redact(f"{type(exc).__name__}: {exc}")[:500]
        self._record_run(report, started=False)
        if report.status == "failed":
            log.warning("upsert run %s failed after %d chunks: %s", report.run_id, report.chunks_done, report.error)
        return report

    # -- scheduling: slot-bounded waits and the upserter's share (rules in deals_pipeline/scheduling.py) --

    def _slot_deadline(self, deadline_ms: int | None) -> int | None:
        if self.settings.max_wait_in_slot_s is None:
            return deadline_ms
        return slot_deadline_ms(self.clock.now_ms(), deadline_ms, self.settings.max_wait_in_slot_s)

    def share_decision(self, cost: int) -> ShareDecision:
        """May the upserter start spending ``cost`` now, under its share of the refill?"""
        window = self.settings.share_window_min
        with self.db.connect() as con:
            spent = spent_by_priority(con, since_ms=self.clock.now_ms() - window * 60_000)
            has_work = (self.settings.backfill_fingerprint is not None
                        and backfill_has_work(con, self.settings.backfill_fingerprint))
        return upsert_share_decision(
            upsert_spent=spent[Priority.UPSERT], cost=cost, refill_rate=self.budget.projection().refill_rate,
            upsert_share=self.settings.upsert_share, window_min=window, backfill_has_work=has_work,
        )

    # -- the bounded, resumable scan (rules in upsert/scan.py) ---------------------------------------

    def _fetch_changed(self, report: UpsertReport, deadline_ms: int | None) -> tuple[list[Deal], int]:
        """Changed deals since the watermark (newest version per ASIN, oldest first) and the server minute.

        Empty while a scan deeper than ``max_pages_per_run`` is still under way: nothing is committed
        before the scan reached its bound, so the watermark never passes a deal not yet read.
        """
        watermark = report.watermark_before
        overlap = self.settings.overlap_minutes
        with self.db.connect() as con:
            position = scan.read_position(con, WATERMARK_NAME) if watermark is not None else None
            coverage = scan.read_coverage(con, WATERMARK_NAME) if watermark is not None else None
        bound = None
        if watermark is not None:
            bound = max(watermark.last_update_minute, coverage or 0) - overlap
        page = position.next_page if position is not None else 0
        started = position.started_minute if position is not None else None
        check_overlap = position is not None and page > 0
        step_backs = 0
        newest: dict[str, Deal] = {}
        server_minute = 0
        complete = False
        last_asins: list[str] = []
        stopped: BudgetDeadline | None = None
        while report.pages_fetched < self.settings.max_pages_per_run and page <= MAX_DEAL_PAGE:
            try:
                deal_page, _ = self.budget.call(
                    lambda p=page: self.client.deals(self.settings.selection.with_page(p)),
                    cost=self.budget.costs.deal_pages(), purpose="deal_page", priority=Priority.UPSERT,
                    deadline_ms=self._slot_deadline(deadline_ms), detail=f"recent page {page}",
                )
            except BudgetDeadline as stop:
                stopped = stop
                break
            report.pages_fetched += 1
            report.tokens_spent += deal_page.status.tokens_consumed
            server_minute = max(server_minute, unix_ms_to_keepa_minute(deal_page.status.timestamp_ms))
            if started is None:
                started = server_minute
            for deal in deal_page.deals:
                known = newest.get(deal.asin)
                if known is None or deal.last_update > known.last_update:
                    newest[deal.asin] = deal
            asins = [d.asin for d in deal_page.deals]
            if check_overlap and not scan.overlaps(asins, position):
                # The list moved up since the last run: step back (bounded), else restart at page 0.
                step_backs += 1
                page = page - 1 if step_backs <= scan.MAX_STEP_BACKS and page > 0 else 0
                check_overlap = page > 0
                if page == 0:
                    started = server_minute
                continue
            check_overlap = False
            last_asins = asins
            if deal_page.is_last or (bound is not None and scan.reached_bound(deal_page.deals, bound)):
                complete = True
                break
            if watermark is None and len(newest) >= report.batch_size:
                break
            page += 1
        if watermark is None:
            complete = True  # the first run takes the newest batch of what it read; older deals are the backfill's
        report.scan_complete = complete
        report.scan_next_page = 0 if complete else page  # the first unread page
        changed = self._remember_scan(report, watermark, list(newest.values()), complete, started, last_asins)
        if stopped is not None:
            raise stopped
        return (changed if complete else []), server_minute

    def _remember_scan(self, report: UpsertReport, watermark: Watermark | None, seen: list[Deal], complete: bool,
                       started: int | None, last_asins: list[str]) -> list[Deal]:
        """Store what the scan paid for (backlog + position, one transaction); the changed deals, oldest first."""
        if watermark is None:
            changed = sorted(seen, key=Watermark.of)[-report.batch_size:]
        else:
            overlap = Watermark(watermark.last_update_minute - self.settings.overlap_minutes, "")
            first_batch = read_watermark(self.db, FLOOR_NAME) or overlap
            candidates = {d.asin: d for d in scan.read_backlog(self.db)}
            for d in seen:
                if d.asin not in candidates or d.last_update > candidates[d.asin].last_update:
                    candidates[d.asin] = d
            changed = [d for d in candidates.values() if Watermark.of(d) > overlap and Watermark.of(d) >= first_batch]
            with self.db.connect() as con:
                stored = stored_deals(con, [d.asin for d in changed])
            # Below the watermark only what is not stored yet at that version (a late arrival).
            changed = [
                d for d in changed
                if Watermark.of(d) > watermark or not (d.asin in stored and stored[d.asin].covers(d.last_update))
            ]
        changed.sort(key=Watermark.of)
        keep = {d.asin for d in changed}
        with self.db.transaction() as con:
            scan.drop_from_backlog(con, [d for d in seen if d.asin not in keep])
            scan.add_to_backlog(con, changed)
            if started is not None:
                if complete:
                    scan.finish_scan(con, WATERMARK_NAME, started)
                else:
                    scan.save_position(con, WATERMARK_NAME, scan.ScanPosition(report.scan_next_page, started,
                                                                              tuple(last_asins)))
        return changed

    def _run(self, report: UpsertReport, deadline_ms: int | None, on_chunk) -> None:
        changed, server_minute = self._fetch_changed(report, deadline_ms)
        report.candidates = len(changed)
        if report.watermark_before is None:
            selected = changed[-report.batch_size :]  # first run: the newest batch
        else:
            selected = changed[: report.batch_size]  # backlog: oldest first, nothing skipped
        report.selected = len(selected)
        report.remaining_changed = len(changed) - len(selected) if report.watermark_before is not None else 0
        if not report.scan_complete:
            report.status = "scanning"  # the scan resumes next run; its pages are paid and kept
            return
        if not selected:
            report.status = "nothing_new"
            return
        size = self.settings.chunk_size
        for start in range(0, len(selected), size):
            chunk = selected[start : start + size]
            plan = self.enricher.plan(chunk)
            report.share = self.share_decision(int(self.enricher.predicted_cost(len(plan.to_fetch))) if plan.to_fetch else 0)
            if plan.to_fetch and not report.share.allowed:
                report.status = "share_deferred"  # committed chunks stay; the backlog waits for the share
                report.error = report.share.reason
                return
            fetched = self.enricher.fetch(
                plan.to_fetch, deadline_ms=self._slot_deadline(deadline_ms),
                detail=f"upsert {report.run_id} chunk {start // size}",
            )
            if fetched.status is not None:
                server_minute = max(server_minute, unix_ms_to_keepa_minute(fetched.status.timestamp_ms))
            target = Watermark.of(chunk[-1])
            if target.last_update_minute > server_minute:
                # Deals can run a minute ahead of the server clock (HAZARDS #17): never store a future
                # watermark. Deals at that minute are re-selected next run and skipped as fresh at 0 tokens.
                target = Watermark(server_minute, "")
            with self.db.transaction() as con:
                new, updated = self.enricher.commit(con, plan, fetched)
                scan.drop_from_backlog(con, chunk)
                current = con.execute(
                    "SELECT last_update_minute, asin FROM watermarks WHERE name = ?", [WATERMARK_NAME]
                ).fetchone()
                if current is None:
                    con.execute(
                        "INSERT OR REPLACE INTO watermarks VALUES (?, ?, ?, ?)",
                        [FLOOR_NAME, Watermark.of(selected[0]).last_update_minute, selected[0].asin, utcnow()],
                    )
                if current is None or Watermark(int(current[0]), current[1]) < target:
                    con.execute(
                        "INSERT OR REPLACE INTO watermarks VALUES (?, ?, ?, ?)",
                        [WATERMARK_NAME, target.last_update_minute, target.asin, utcnow()],
                    )
            report.deals_new += new
            report.deals_updated += updated
            report.fresh_skipped += len(plan.fresh)
            report.filtered += len(plan.filtered)
            report.tokens_spent += fetched.tokens
            report.chunks_done += 1
            report.watermark_after = max(target, report.watermark_after or target)
            if on_chunk is not None:
                on_chunk(report)
        report.status = "complete"

    def _record_run(self, report: UpsertReport, *, started: bool) -> None:
        with self.db.transaction() as con:
            if started:
                con.execute(
                    "INSERT OR REPLACE INTO upsert_runs (run_id, started_at, status, batch_size, batch_reason, "
                    "watermark_before) VALUES (?, ?, 'running', ?, ?, ?)",
                    [report.run_id, utcnow(), report.batch_size, report.batch_reason,
                     report.watermark_before.last_update_minute if report.watermark_before else None],
                )
            else:
                con.execute(
                    "UPDATE upsert_runs SET finished_at = ?, status = ?, deals_new = ?, deals_updated = ?, "
                    "tokens_spent = ?, watermark_after = ? WHERE run_id = ?",
                    [utcnow(), report.status, report.deals_new, report.deals_updated, report.tokens_spent,
                     report.watermark_after.last_update_minute if report.watermark_after else None, report.run_id],
                )
