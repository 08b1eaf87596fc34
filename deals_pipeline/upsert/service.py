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
from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute
from deals_pipeline.keepa.models import MAX_DEAL_PAGE, Deal
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.keepa.redact import redact
import duckdb

from deals_pipeline.storage import Database, DatabaseBusy
from deals_pipeline.storage.publish import DealPublisher, publish_quietly
from deals_pipeline.storage.repository import discovered_backlog, utcnow, write_deals

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


@dataclass(frozen=True)
class UpsertSettings:
    selection: DealSelection
    product_options: ProductOptions = field(default_factory=ProductOptions)
    rules: ViabilityRules = field(default_factory=ViabilityRules)
    chunk_size: int = 4
    sizing_mode: str = "default"
    interval_s: int = 300
    max_pages_per_run: int = MAX_DEAL_PAGE + 1
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


@dataclass
class UpsertReport:
    run_id: str
    status: str = "running"             # 'complete', 'budget_stopped', 'failed', 'nothing_new'
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

    def _discover_pages(self, report: UpsertReport, deadline_ms: int | None) -> tuple[list[Deal], int, bool]:
        """Read the newest-first list down to the watermark's overlap window. Every page's deals are
        written to ``deals`` (discovered, or refreshed in place when their lastUpdate is newer) in the
        transaction that settles the page: a paid page is never lost, even when nothing is enriched.

        Returns the newest version of every deal seen, the server minute, and whether the read reached
        the watermark (the list is covered down to it: the watermark may move past what was seen)."""
        watermark = report.watermark_before
        newest: dict[str, Deal] = {}
        server_minute = 0
        reached = False
        for page in range(min(self.settings.max_pages_per_run, MAX_DEAL_PAGE + 1)):
            deal_page, reservation = self.budget.call(
                lambda p=page: self.client.deals(self.settings.selection.with_page(p)),
                cost=self.budget.costs.deal_pages(),
                purpose="deal_page",
                priority=Priority.UPSERT,
                deadline_ms=deadline_ms,
                detail=f"recent page {page}",
                settle_now=False,
            )
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
            if deal_page.is_last:
                reached = True
                break
            if watermark is None:
                if len(newest) >= report.batch_size:
                    reached = True
                    break
            elif any(d.last_update < watermark.last_update_minute - self.settings.overlap_minutes
                     for d in deal_page.deals):
                reached = True
                break
        return list(newest.values()), server_minute, reached

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
        seen, server_minute, reached = self._discover_pages(report, deadline_ms)
        if report.watermark_before is None and seen:
            first = sorted(seen, key=Watermark.of)[-report.batch_size :][0]
            self._move_watermark(FLOOR_NAME, Watermark.of(first), only_if_unset=True)
        if reached and seen:
            # Everything down to the watermark's overlap window is stored (discovered): move it to the
            # newest deal seen, never ahead of the server clock (HAZARDS #17).
            target = max(Watermark.of(d) for d in seen)
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
            self._buy_chunk(report, selected[start : start + size], deadline_ms, start // size)
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
