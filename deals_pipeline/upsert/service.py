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
    max_pages_per_run: int = MAX_DEAL_PAGE + 1
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
        projection = self.budget.projection()
        rate = projection.refill_rate
        per_deal = max(1, int(self.enricher.predicted_cost(1, cap=projection.cap)))
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
        self._record_run(report, started=False)
        if report.status == "failed":
            log.warning("upsert run %s failed after %d chunks: %s", report.run_id, report.chunks_done, report.error)
        return report

    def _fetch_changed(self, report: UpsertReport, deadline_ms: int | None) -> tuple[list[Deal], int]:
        """Changed deals since the watermark (deduped by ASIN, newest version), and the server minute."""
        watermark = report.watermark_before
        newest: dict[str, Deal] = {}
        server_minute = 0
        for page in range(min(self.settings.max_pages_per_run, MAX_DEAL_PAGE + 1)):
            deal_page, _ = self.budget.call(
                lambda p=page: self.client.deals(self.settings.selection.with_page(p)),
                cost=self.budget.costs.deal_pages(),
                purpose="deal_page",
                priority=Priority.UPSERT,
                deadline_ms=deadline_ms,
                detail=f"recent page {page}",
            )
            report.pages_fetched += 1
            report.tokens_spent += deal_page.status.tokens_consumed
            server_minute = max(server_minute, unix_ms_to_keepa_minute(deal_page.status.timestamp_ms))
            for deal in deal_page.deals:
                known = newest.get(deal.asin)
                if known is None or deal.last_update > known.last_update:
                    newest[deal.asin] = deal
            if deal_page.is_last:
                break
            if watermark is None:
                if len(newest) >= report.batch_size:
                    break
            elif any(d.last_update < watermark.last_update_minute - self.settings.overlap_minutes
                     for d in deal_page.deals):
                break
        if watermark is None:
            changed = list(newest.values())
        else:
            overlap = Watermark(watermark.last_update_minute - self.settings.overlap_minutes, "")
            first_batch = read_watermark(self.db, FLOOR_NAME) or overlap
            changed = [d for d in newest.values() if Watermark.of(d) > overlap and Watermark.of(d) >= first_batch]
            with self.db.connect() as con:
                stored = stored_deals(con, [d.asin for d in changed])
            # Below the watermark only what is not stored yet at that version (a late arrival).
            changed = [
                d for d in changed
                if Watermark.of(d) > watermark or not (d.asin in stored and stored[d.asin].covers(d.last_update))
            ]
        changed.sort(key=Watermark.of)
        return changed, server_minute

    def _run(self, report: UpsertReport, deadline_ms: int | None, on_chunk) -> None:
        changed, server_minute = self._fetch_changed(report, deadline_ms)
        report.candidates = len(changed)
        if report.watermark_before is None:
            selected = changed[-report.batch_size :]  # first run: the newest batch
        else:
            selected = changed[: report.batch_size]  # backlog: oldest first, nothing skipped
        report.selected = len(selected)
        report.remaining_changed = len(changed) - len(selected) if report.watermark_before is not None else 0
        if not selected:
            report.status = "nothing_new"
            return
        size = self.settings.chunk_size
        for start in range(0, len(selected), size):
            chunk = selected[start : start + size]
            plan = self.enricher.plan(chunk)
            fetched = self.enricher.fetch(
                plan.to_fetch, deadline_ms=deadline_ms, detail=f"upsert {report.run_id} chunk {start // size}"
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
