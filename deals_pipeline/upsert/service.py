"""Refreshing the newest deals with a watermark that never loses one (plain Python).

Each run reads the newest-first deal list (sortType 1; sortType 4 is percentage delta, not
recency: KEEPA_API.md §4.2) until it reaches deals below the watermark's overlap window, a short
page, or the last page. Every deal of every page read is written to ``deals`` in the transaction
that settles the page (lossless discovery; a newer lastUpdate refreshes the stored deal-page fields
for free). Only then does the watermark move, to the newest deal seen and never ahead of the server
clock (HAZARDS #17): everything at or below it is stored (#12, #36).

What the run then BUYS is decided by the planner (enrichment.py): new viable deals, and enriched
deals only when the re-enrichment policy calls for it, oldest first, up to the batch size sized
from the learned refill rate and the two-stage cost. A run stopped by the budget keeps what it
committed; discovered deals it could not afford are picked up, oldest first, by the next run.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Callable

from deals_pipeline.budget import BudgetDeadline, Priority, TokenBudget
from deals_pipeline.budget.sizing import max_new_deals_per_run
from deals_pipeline.clock import Clock
from deals_pipeline.enrichment import ChunkEnricher, ChunkPlan, EnrichmentPolicy, FetchedProducts, ViabilityRules
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import ConfigError, KeepaError
from deals_pipeline.keepa.keepa_time import keepa_minute_to_datetime, unix_ms_to_keepa_minute
from deals_pipeline.keepa.models import MAX_DEAL_PAGE, Deal
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.keepa.redact import redact
import duckdb

from deals_pipeline.storage import Database, DatabaseBusy
from deals_pipeline.storage.publish import DealPublisher, publish_quietly
from deals_pipeline.storage.repository import discovered_backlog, utcnow, write_deals
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
#: Spool scopes of the upserter's paid responses (one per run and chunk).
SPOOL_PREFIX = "upsert-"


@dataclass(frozen=True, order=True)
class Watermark:
    """Position in (lastUpdate minute, asin) order: everything at or below it has been stored."""

    last_update_minute: int
    asin: str

    @classmethod
    def of(cls, deal: Deal) -> "Watermark":
        return cls(int(deal.last_update), deal.asin)

    def __str__(self) -> str:
        """``2026-12-01 20:16 UTC, ASIN B0VJ7YRFDL``: what logs, metadata and status show."""
        when = keepa_minute_to_datetime(self.last_update_minute).strftime("%Y-%m-%d %H:%M UTC")
        return f"{when}, ASIN {self.asin}"


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
    policy: EnrichmentPolicy = field(default_factory=EnrichmentPolicy)

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
    status: str = "running"  # complete, budget_stopped, deferred, share_deferred, failed, nothing_new
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
    return "none" if wm is None else str(wm)


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
        publisher: DealPublisher | None = None,
    ) -> None:
        self.db = db
        #: Publishes the read-only copy for readers at the end of every run that stored something.
        self.publisher = publisher if publisher is not None else DealPublisher(db)
        self.client = client
        self.budget = budget
        self.settings = settings
        self.clock = clock
        self.enricher = ChunkEnricher.for_selection(
            db, client, budget, settings.selection, options=settings.product_options, rules=settings.rules,
            source=source, origin="upsert", priority=Priority.UPSERT, policy=settings.policy,
        )

    def batch_size(self) -> tuple[int, str]:
        """Deals per run from the *learned* refill rate (a plan upgrade resizes with no config change)."""
        rate = self.budget.projection().refill_rate
        per_deal = max(1, math.ceil(self.enricher.expected_cost_per_deal() - 1e-9))
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
        try:
            self._record_run(report, started=False)
        except DatabaseBusy as exc:  # the run's outcome is in its report; its paid data is spooled
            log.warning("upsert run %s: could not record its end (%s)", report.run_id, redact(str(exc))[:200])
        if report.deals_new or report.deals_updated:
            publish_quietly(self.publisher, force=True)
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

    def _discover_pages(self, report: UpsertReport, deadline_ms: int | None) -> tuple[list[Deal], int, Watermark | None]:
        """Read the newest-first list down to the watermark's overlap window, at most ``max_pages_per_run``
        pages per run, resuming a deeper scan where the last run stopped (upsert/scan.py). Every page's deals
        are written to ``deals`` (discovered, or refreshed in place when their lastUpdate is newer) in the
        transaction that settles the page: a paid page is never lost, even when nothing is enriched.

        Returns the newest version of every deal seen, the server minute, and — when the scan reached the
        watermark — the watermark it may move to (None while the scan is still under way)."""
        watermark = report.watermark_before
        bound = None if watermark is None else watermark.last_update_minute - self.settings.overlap_minutes
        with self.db.connect() as con:
            position = scan.read_position(con, WATERMARK_NAME) if watermark is not None else None
        # A resume re-reads the last page read (outside the page cap) to check the list has not moved past it.
        page = max(0, position.next_page - 1) if position is not None else 0
        check_overlap = position is not None
        page_cap = self.settings.max_pages_per_run + (1 if position is not None else 0)
        newest: dict[str, Deal] = {}
        top: Watermark | None = None  # the newest deal of the scan's page 0
        if position is not None:
            top = Watermark(position.started_minute, "")
        server_minute = 0
        reached = False
        last_asins: list[str] = []
        stopped: BudgetDeadline | None = None
        while report.pages_fetched < page_cap and page <= MAX_DEAL_PAGE:
            try:
                deal_page, reservation = self.budget.call(
                    lambda p=page: self.client.deals(self.settings.selection.with_page(p)),
                    cost=self.budget.costs.deal_pages(), purpose="deal_page", priority=Priority.UPSERT,
                    deadline_ms=self._slot_deadline(deadline_ms), detail=f"recent page {page}", settle_now=False,
                )
            except BudgetDeadline as stop:
                stopped = stop
                break
            with self.db.transaction() as con:
                counts = write_deals(con, self.enricher.discovery_rows(deal_page.deals))
                self.budget.settle(reservation, deal_page.status.tokens_consumed, deal_page.status, con=con)
            report.deals_new += counts.new
            report.deals_updated += counts.refreshed
            report.pages_fetched += 1
            report.tokens_spent += deal_page.status.tokens_consumed
            server_minute = max(server_minute, unix_ms_to_keepa_minute(deal_page.status.timestamp_ms))
            for deal in deal_page.deals:
                known = newest.get(deal.asin)
                if known is None or deal.last_update > known.last_update:
                    newest[deal.asin] = deal
            if page == 0 and deal_page.deals:
                top = max(Watermark.of(d) for d in deal_page.deals)
            asins = [d.asin for d in deal_page.deals]
            if check_overlap and not scan.overlaps(asins, position):
                # The list moved a whole page or more since the last run: restart the scan at page 0.
                check_overlap = False
                if page > 0:
                    page = 0
                    continue
            check_overlap = False
            last_asins = asins
            if deal_page.is_last or (bound is not None and scan.reached_bound(deal_page.deals, bound)):
                reached = True
                break
            if watermark is None and len(newest) >= report.batch_size:
                reached = True
                break
            page += 1
        if watermark is None:
            reached = True  # the first run takes the newest batch of what it read; older deals are the backfill's
        report.scan_complete = reached
        report.scan_next_page = 0 if reached else page  # the first unread page
        with self.db.transaction() as con:
            if reached:
                con.execute("DELETE FROM upsert_scans WHERE name = ?", [WATERMARK_NAME])
            elif top is not None:
                scan.save_position(con, WATERMARK_NAME,
                                   scan.ScanPosition(page, top.last_update_minute, tuple(last_asins)))
        if stopped is not None and not newest:
            raise stopped
        if not reached or top is None:
            return list(newest.values()), server_minute, None
        return list(newest.values()), server_minute, top

    def _purchase_queue(self, report: UpsertReport, seen: list[Deal]) -> list[Deal]:
        """The deals worth buying, oldest first: seen deals the planner would pay for (new ones, and
        enriched ones the re-enrichment policy calls for), plus discovered deals an earlier run could not
        afford. Free verdicts (deal-page rules) are written here, at 0 tokens."""
        floor = read_watermark(self.db, FLOOR_NAME)
        if report.watermark_before is None:
            candidates = sorted(seen, key=Watermark.of)[-report.batch_size :]  # first run: the newest batch
        else:
            candidates = [d for d in seen if floor is None or Watermark.of(d) >= floor]
        with self.db.connect() as con:
            if floor is not None:
                backlog = discovered_backlog(con, since_minute=floor.last_update_minute,
                                             exclude=[d.asin for d in candidates], limit=2 * report.batch_size)
                candidates += [d for d in (b.deal() for b in backlog) if d is not None and Watermark.of(d) >= floor]
            plan = self.enricher.plan(candidates, con)
        if plan.filtered:
            with self.db.transaction() as con:
                self.enricher.commit(con, ChunkPlan(deals=plan.deals, filtered=plan.filtered,
                                                    viability=plan.viability), FetchedProducts())
        report.filtered += len(plan.filtered)
        report.fresh_skipped += len(plan.fresh)
        buy = set(plan.to_fetch) | set(plan.to_screen)
        return sorted((d for d in plan.deals if d.asin in buy), key=Watermark.of)

    def _run(self, report: UpsertReport, deadline_ms: int | None, on_chunk) -> None:
        # Paid responses an earlier run could not commit (busy database, killed run) are stored first,
        # so they are skipped as fresh below instead of bought again.
        _, replay_new, replay_updated = self.enricher.replay_orphans(SPOOL_PREFIX)
        report.deals_new += replay_new
        report.deals_updated += replay_updated
        seen, server_minute, top = self._discover_pages(report, deadline_ms)
        if report.watermark_before is None and seen:
            first = sorted(seen, key=Watermark.of)[-report.batch_size :][0]
            self._move_watermark(FLOOR_NAME, Watermark.of(first), only_if_unset=True)
        if top is not None and seen:
            # Everything down to the watermark's overlap window is stored (discovered): move it to the
            # newest deal the scan saw on its page 0, never ahead of the server clock (HAZARDS #17).
            target = top
            if target.last_update_minute > server_minute:
                target = Watermark(server_minute, "")
            self._move_watermark(WATERMARK_NAME, target)
            report.watermark_after = target
        queue = self._purchase_queue(report, seen)
        report.candidates = len(queue)
        selected = queue[: report.batch_size]
        report.selected = len(selected)
        report.remaining_changed = len(queue) - len(selected)
        if not selected:
            report.status = "nothing_new" if report.deals_new + report.deals_updated == 0 else "complete"
            return
        size = self.settings.chunk_size
        for start in range(0, len(selected), size):
            chunk = selected[start : start + size]
            report.share = self.share_decision(int(self.enricher.predicted_cost(len(chunk))))
            if not report.share.allowed:
                report.status = "share_deferred"  # committed chunks stay; the discovered deals wait for the share
                report.error = report.share.reason
                return
            self._buy_chunk(report, chunk, self._slot_deadline(deadline_ms), start // size)
            if on_chunk is not None:
                on_chunk(report)
        report.status = "complete"

    def _buy_chunk(self, report: UpsertReport, chunk: list[Deal], deadline_ms: int | None, index: int) -> None:
        """Stage 1 (committed on its own) then stage 2 for one chunk; each commit settles its spend."""
        detail = f"upsert {report.run_id} chunk {index}"
        plan = self.enricher.plan(chunk)
        # Every paid response is spooled before any database work; an orphan (busy file, killed run) is
        # stored by the next run's replay_orphans instead of being bought again.
        scope = f"{SPOOL_PREFIX}{report.run_id}-c{index}"
        if plan.to_screen:
            screened = self.enricher.screen(plan, deadline_ms=deadline_ms, detail=detail, scope=scope, deals=chunk)
            with self.db.transaction() as con:
                self.enricher.commit_screen(con, plan, screened)
            self.enricher.consumed(screened)
            report.tokens_spent += screened.tokens
        fetched = self.enricher.fetch(plan.to_fetch, deadline_ms=deadline_ms, detail=detail, scope=scope, deals=chunk)
        with self.db.transaction() as con:
            self.enricher.commit(con, plan, fetched)
        self.enricher.consumed(fetched)
        report.filtered += len(plan.filtered) + len(plan.screened_out)
        report.fresh_skipped += len(plan.fresh)
        report.tokens_spent += fetched.tokens
        report.chunks_done += 1

    def _move_watermark(self, name: str, target: Watermark, *, only_if_unset: bool = False) -> None:
        with self.db.transaction() as con:
            current = con.execute("SELECT last_update_minute, asin FROM watermarks WHERE name = ?", [name]).fetchone()
            if current is not None and (only_if_unset or Watermark(int(current[0]), current[1]) >= target):
                return
            con.execute("INSERT OR REPLACE INTO watermarks VALUES (?, ?, ?, ?)",
                        [name, target.last_update_minute, target.asin, utcnow()])

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
