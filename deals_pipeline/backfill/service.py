"""Exactly-once page backfill, in plain Python (the Dagster graph only calls these methods).

A page is fetched once and its deal list stored as a snapshot (HAZARDS H1), split into chunks of
``chunk_size`` deals. Each chunk commits its deal rows, its done mark and its token spend in ONE
DuckDB transaction, so a run killed at any moment resumes at the next unfinished chunk and pays at
most for the chunk that was in flight. Failed chunks stay failed (not skipped) until a run
completes them (HAZARDS H2).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import duckdb

from deals_pipeline.budget import BudgetDeadline, Priority, TokenBudget
from deals_pipeline.clock import Clock
from deals_pipeline.enrichment import ChunkEnricher, ChunkPlan, EnrichmentPolicy, FetchedProducts, ViabilityRules
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import KeepaError, MalformedPayload
from deals_pipeline.keepa.models import DEAL_PAGE_SIZE, MAX_DEAL_PAGE, Deal, DealPage
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.keepa.redact import redact
from deals_pipeline.scheduling import (
    DEFAULT_CHUNK_BACKOFF_S,
    DEFAULT_MAX_CHUNK_ATTEMPTS,
    chunk_retry_at_ms,
    should_quarantine,
    slot_deadline_ms,
)
from deals_pipeline.storage import Database, DatabaseBusy
from deals_pipeline.storage.publish import DealPublisher, publish_quietly
from deals_pipeline.storage.repository import utcnow, write_deals

log = logging.getLogger(__name__)

#: ``backoff``: a failed chunk whose retry time has not come (nothing paid); ``quarantined``: failed
#: ``max_chunk_attempts`` times, left out until `deals-pipeline retry-quarantined`.
ChunkStatus = Literal["done", "already_done", "deferred", "failed", "backoff", "quarantined"]

#: A paid /product response that lacks some of the chunk's products (malformed entries) fails the
#: chunk so the next run fetches them again; after this many attempts the deals are stored without
#: enrichment rather than paying for the same broken product forever.
MAX_PRODUCT_ATTEMPTS = 3


@dataclass(frozen=True)
class BackfillSettings:
    selection: DealSelection
    product_options: ProductOptions = field(default_factory=ProductOptions)
    rules: ViabilityRules = field(default_factory=ViabilityRules)
    chunk_size: int = 4
    #: A chunk failing this many times is quarantined (the page completes without it).
    max_chunk_attempts: int = DEFAULT_MAX_CHUNK_ATTEMPTS
    #: Backoff before the 2nd attempt; doubles per attempt (at most 8x).
    chunk_backoff_s: float = DEFAULT_CHUNK_BACKOFF_S
    #: Longest wait for tokens while holding the pool slot; past it the chunk is deferred (nothing paid)
    #: and the op ends. None = wait up to the run deadline; the Dagster resource sets the default bound.
    max_wait_in_slot_s: float | None = None
    policy: EnrichmentPolicy = field(default_factory=EnrichmentPolicy)

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_size <= 100:
            raise ValueError(f"chunk_size must be 1..100 (a /product request takes at most 100), got {self.chunk_size}")
        if self.max_chunk_attempts < 1:
            raise ValueError(f"max_chunk_attempts must be >= 1, got {self.max_chunk_attempts}")
        if self.chunk_backoff_s < 0:
            raise ValueError(f"chunk_backoff_s must be >= 0, got {self.chunk_backoff_s}")


@dataclass(frozen=True)
class PageSnapshot:
    page: int
    fingerprint: str
    deals: tuple[Deal, ...]
    is_last: bool
    total_matches: int | None
    chunk_asins: tuple[tuple[str, ...], ...]
    tokens_consumed: int
    reused: bool

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_asins)


@dataclass(frozen=True)
class ChunkOutcome:
    page: int
    chunk_index: int
    status: ChunkStatus
    tokens_spent: int = 0
    deals_stored: int = 0
    fresh_skipped: int = 0
    filtered: int = 0
    fetched_asins: tuple[str, ...] = ()
    error: str | None = None
    wait_ms: int | None = None


@dataclass(frozen=True)
class PageSummary:
    page: int
    complete: bool
    is_last: bool
    chunks_total: int
    chunks_done: int
    chunks_failed: int
    failed_errors: tuple[str, ...]
    deals_on_page: int
    tokens_spent: int
    total_matches: int | None
    chunks_quarantined: tuple[int, ...] = ()

    def as_metadata(self) -> dict[str, object]:
        return {
            "page": self.page,
            "complete": self.complete,
            "is_last_page": self.is_last,
            "chunks_done": self.chunks_done,
            "chunks_total": self.chunks_total,
            "chunks_failed": self.chunks_failed,
            "chunks_quarantined": len(self.chunks_quarantined),
            "quarantined_chunk_indexes": ",".join(map(str, self.chunks_quarantined)) or "none",
            "deals_on_page": self.deals_on_page,
            "tokens_spent_page_total": self.tokens_spent,
            "query_total_matches": self.total_matches if self.total_matches is not None else -1,
        }


def estimate_total_matches(deal_page: DealPage, selection: DealSelection) -> int | None:
    """Deals the query matches, from the page's per-root-category counts (KEEPA_API.md §4.4).

    Category filters do not affect ``categoryCount``, the other filters do. So with
    ``includeCategories`` only the included roots count (minus excluded roots); when an included id
    is not a root category the count cannot be known (None). Capped at Keepa's 10,000.
    """
    counts = dict(zip(deal_page.category_ids, deal_page.category_counts))
    if not counts:
        return None
    if selection.include_categories:
        if not all(c in counts for c in selection.include_categories):
            return None
        total = sum(counts[c] for c in set(selection.include_categories))
    else:
        total = sum(counts.values())
    total -= sum(counts.get(c, 0) for c in set(selection.exclude_categories or ()))
    return min(max(total, 0), 10_000)


#: (database path, page, selection fingerprint) -> PageSnapshot; insertion-ordered, at most 8 pages.
_SNAPSHOT_CACHE: dict[tuple[str, int, str], "PageSnapshot"] = {}


def page_count_for(total_matches: int) -> int:
    """Pages a query needs (Keepa serves at most 10,000 deals, pages 0..66)."""
    return min(MAX_DEAL_PAGE + 1, max(1, math.ceil(min(total_matches, 10_000) / DEAL_PAGE_SIZE)))


class PageBackfill:
    """Backfills deal pages for one selection into the database."""

    def __init__(
        self,
        db: Database,
        client: KeepaClient,
        budget: TokenBudget,
        settings: BackfillSettings,
        *,
        clock: Clock,
        source: str,
        publisher: DealPublisher | None = None,
    ) -> None:
        self.db = db
        #: Publishes the read-only copy for readers after commits (throttled) and at each page summary.
        self.publisher = publisher if publisher is not None else DealPublisher(db)
        self.client = client
        self.budget = budget
        self.settings = settings
        self.clock = clock
        self.fingerprint = settings.selection.fingerprint()
        self.price_type = settings.selection.price_types[0]
        self.enricher = ChunkEnricher.for_selection(
            db, client, budget, settings.selection, options=settings.product_options, rules=settings.rules,
            source=source, origin="backfill", priority=Priority.BACKFILL, policy=settings.policy,
        )

    # -- snapshot -------------------------------------------------------------------------------

    def snapshot(self, page: int, *, deadline_ms: int | None = None) -> PageSnapshot:
        """The page's deal list: the stored snapshot if there is one, else fetched once (5 tokens)."""
        stored = self.load_snapshot(page)
        if stored is not None:
            return stored
        selection = self.settings.selection.with_page(page)
        deal_page, reservation = self.budget.call(
            lambda: self.client.deals(selection),
            cost=self.budget.costs.deal_pages(),
            purpose="deal_page",
            priority=Priority.BACKFILL,
            deadline_ms=self.slot_deadline(deadline_ms),
            detail=f"page {page}",
            settle_now=False,
        )
        chunks = self._chunk(deal_page.deals)
        now = utcnow()
        with self.db.transaction() as con:
            con.execute(
                "INSERT INTO page_snapshots BY NAME SELECT ? AS page, ? AS selection_fingerprint, ? AS fetched_at, "
                "? AS server_timestamp_ms, ? AS raw_count, ? AS deal_count, ? AS skipped_count, ? AS is_last, "
                "? AS asins, ? AS tokens_consumed, ? AS raw_response, ? AS total_matches ON CONFLICT DO NOTHING",
                [
                    page, self.fingerprint, now, deal_page.status.timestamp_ms, deal_page.raw_count,
                    len(deal_page.deals), len(deal_page.skipped), deal_page.is_last,
                    [d.asin for d in deal_page.deals], deal_page.status.tokens_consumed,
                    json.dumps(deal_page.raw, separators=(",", ":")),
                    estimate_total_matches(deal_page, self.settings.selection),
                ],
            )
            if chunks:
                con.executemany(
                    "INSERT INTO page_chunks (page, selection_fingerprint, chunk_index, asins, status, updated_at) "
                    "VALUES (?, ?, ?, ?, 'pending', ?) ON CONFLICT DO NOTHING",
                    [[page, self.fingerprint, i, list(asins), now] for i, asins in enumerate(chunks)],
                )
            # Lossless discovery: every deal of the paid page is stored with the page (issue 10).
            write_deals(con, self.enricher.discovery_rows(deal_page.deals))
            self.budget.settle(reservation, deal_page.status.tokens_consumed, deal_page.status, con=con)
        for skipped in deal_page.skipped:
            log.warning("page %d: skipped deal #%d (%s): %s", page, skipped.index, skipped.asin, skipped.reason)
        return self._snapshot_from(page, deal_page, chunks, deal_page.status.tokens_consumed, reused=False)

    def _chunk(self, deals: tuple[Deal, ...]) -> list[tuple[str, ...]]:
        # Dedupe within the page by ASIN (a drifting list can repeat one), keeping the first.
        seen: set[str] = set()
        asins = [d.asin for d in deals if not (d.asin in seen or seen.add(d.asin))]
        size = self.settings.chunk_size
        return [tuple(asins[i : i + size]) for i in range(0, len(asins), size)]

    def _snapshot_from(self, page: int, deal_page: DealPage, chunks, tokens: int, *, reused: bool) -> PageSnapshot:
        return PageSnapshot(
            page=page,
            fingerprint=self.fingerprint,
            deals=deal_page.deals,
            is_last=deal_page.is_last,
            total_matches=estimate_total_matches(deal_page, self.settings.selection),
            chunk_asins=tuple(tuple(c) for c in chunks),
            tokens_consumed=tokens,
            reused=reused,
        )

    def load_snapshot(self, page: int) -> PageSnapshot | None:
        """The stored snapshot of ``page``, or None. Cached per process: a snapshot never changes once
        written, and each chunk op of a Dagster page run needs it (one read and parse per run, not per op)."""
        key = (str(self.db.path), page, self.fingerprint)
        cached = _SNAPSHOT_CACHE.get(key)
        if cached is not None:
            return cached
        snapshot = self._read_snapshot(page)
        if snapshot is not None:
            if len(_SNAPSHOT_CACHE) >= 8:
                _SNAPSHOT_CACHE.pop(next(iter(_SNAPSHOT_CACHE)))
            _SNAPSHOT_CACHE[key] = snapshot
        return snapshot

    def _read_snapshot(self, page: int) -> PageSnapshot | None:
        with self.db.connect() as con:
            row = con.execute(
                "SELECT raw_response, tokens_consumed FROM page_snapshots WHERE page = ? AND selection_fingerprint = ?",
                [page, self.fingerprint],
            ).fetchone()
            if row is None:
                return None
            chunk_rows = con.execute(
                "SELECT asins FROM page_chunks WHERE page = ? AND selection_fingerprint = ? ORDER BY chunk_index",
                [page, self.fingerprint],
            ).fetchall()
        deal_page = DealPage.from_response(json.loads(row[0]), page=page)
        return self._snapshot_from(page, deal_page, [tuple(r[0]) for r in chunk_rows], int(row[1]), reused=True)

    # -- chunks ---------------------------------------------------------------------------------

    def unfinished_chunks(self, page: int) -> list[int]:
        with self.db.connect() as con:
            rows = con.execute(
                "SELECT chunk_index FROM page_chunks WHERE page = ? AND selection_fingerprint = ? "
                "AND status NOT IN ('done', 'quarantined') "
                "ORDER BY chunk_index",
                [page, self.fingerprint],
            ).fetchall()
        return [int(r[0]) for r in rows]

    def chunk_scope(self, page: int, chunk_index: int) -> str:
        """Spool scope of one chunk: its paid responses wait there until the chunk commits."""
        return f"backfill-{self.fingerprint[:16]}-p{page}-c{chunk_index}"

    def run_chunk(self, snapshot: PageSnapshot, chunk_index: int, *, deadline_ms: int | None = None) -> ChunkOutcome:
        """Process one chunk exactly once. Never raises for budget or API trouble: the outcome says.

        Every paid response is spooled (fsynced files beside the database) before any database work;
        a rerun replays the chunk's unconsumed entries and pays only for ASINs none of them holds, so a
        busy database, a failed write or a split request that failed half-way never pays twice.
        """
        page = snapshot.page
        with self.db.connect() as con:
            row = con.execute(
                "SELECT status, attempts, next_attempt_ms FROM page_chunks "
                "WHERE page = ? AND selection_fingerprint = ? AND chunk_index = ?",
                [page, self.fingerprint, chunk_index],
            ).fetchone()
            if row is None:
                raise ValueError(f"page {page} has no chunk {chunk_index}")
            if row[0] == "done":
                self.enricher.spool.consume(self.enricher.spool.entries(self.chunk_scope(page, chunk_index)))
                return ChunkOutcome(page, chunk_index, "already_done")
            held = self._held_back(page, chunk_index, row[0], row[2])
            if held is not None:
                return held
            by_asin = {d.asin: d for d in snapshot.deals}
            plan = self.enricher.plan([by_asin[a] for a in snapshot.chunk_asins[chunk_index]], con)
        detail = f"page {page} chunk {chunk_index}"
        scope = self.chunk_scope(page, chunk_index)
        screen_tokens = 0
        if plan.to_screen:
            try:
                screen_tokens = self._screen(page, chunk_index, plan, deadline_ms=self.slot_deadline(deadline_ms),
                                             detail=detail, scope=scope)
            except BudgetDeadline as stop:
                return ChunkOutcome(page, chunk_index, "deferred", wait_ms=stop.wait_ms)
            except (KeepaError, DatabaseBusy, duckdb.Error) as exc:
                return self._record_failure(page, chunk_index, exc)
        try:
            fetched = self.enricher.fetch(plan.to_fetch, deadline_ms=self.slot_deadline(deadline_ms), detail=detail, scope=scope)
        except BudgetDeadline as stop:
            return ChunkOutcome(page, chunk_index, "deferred", wait_ms=stop.wait_ms)
        except (KeepaError, DatabaseBusy, duckdb.Error) as exc:
            return self._record_failure(page, chunk_index, exc)
        tokens = fetched.tokens
        missing = [a for a in plan.to_fetch if a not in fetched.by_asin()]
        if missing:
            message = (f"{len(missing)} paid product(s) came back malformed or missing: {', '.join(missing[:4])}"
                       f" (attempt {int(row[1]) + 1} of {MAX_PRODUCT_ATTEMPTS})")
            if int(row[1]) + 1 < MAX_PRODUCT_ATTEMPTS:
                return self._record_failure(page, chunk_index, MalformedPayload(message), fetched)
            log.warning("page %d chunk %d: storing without enrichment after %d attempts: %s",
                        page, chunk_index, MAX_PRODUCT_ATTEMPTS, message)
        try:
            with self.db.transaction() as con:
                new, updated = self.enricher.commit(con, plan, fetched)
                con.execute(
                    "UPDATE page_chunks SET status = 'done', attempts = attempts + 1, tokens_spent = tokens_spent + ?, "
                    "deals_stored = ?, fresh_skipped = ?, filtered = ?, error = NULL, updated_at = ? "
                    "WHERE page = ? AND selection_fingerprint = ? AND chunk_index = ?",
                    [tokens, new + updated, len(plan.fresh), len(plan.filtered) + len(plan.screened_out), utcnow(), page,
                     self.fingerprint, chunk_index],
                )
        except Exception as exc:
            # The paid responses stay spooled: the rerun stores them without paying again.
            return self._record_failure(page, chunk_index, exc)
        self.enricher.consumed(fetched)
        publish_quietly(self.publisher, force=False)
        return ChunkOutcome(
            page, chunk_index, "done", tokens_spent=tokens + screen_tokens, deals_stored=new + updated,
            fresh_skipped=len(plan.fresh), filtered=len(plan.filtered) + len(plan.screened_out),
            fetched_asins=tuple(plan.to_fetch),
        )

    def _screen(self, page: int, chunk_index: int, plan: ChunkPlan, *, deadline_ms: int | None, detail: str,
                scope: str) -> int:
        """Stage 1 of a chunk, committed on its own with its spend and the chunk's stage-1 token count:
        a run killed before stage 2 finds the verdicts stored and never buys stage 1 again."""
        fetched = self.enricher.screen(plan, deadline_ms=deadline_ms, detail=detail, scope=scope)
        with self.db.transaction() as con:
            self.enricher.commit_screen(con, plan, fetched)
            con.execute(
                "UPDATE page_chunks SET tokens_spent = tokens_spent + ?, updated_at = ? "
                "WHERE page = ? AND selection_fingerprint = ? AND chunk_index = ?",
                [fetched.tokens, utcnow(), page, self.fingerprint, chunk_index],
            )
        self.enricher.consumed(fetched)
        return fetched.tokens

    def _record_failure(
        self, page: int, chunk_index: int, exc: Exception, fetched: FetchedProducts | None = None
    ) -> ChunkOutcome:
        message = redact(f"{type(exc).__name__}: {exc}")[:500]
        status = "failed"
        try:
            with self.db.transaction() as con:
                attempts = int(con.execute(
                    "SELECT attempts FROM page_chunks WHERE page = ? AND selection_fingerprint = ? AND chunk_index = ?",
                    [page, self.fingerprint, chunk_index],
                ).fetchone()[0]) + 1
                status, retry_at = self._after_failure(attempts)
                con.execute(
                    "UPDATE page_chunks SET status = ?, attempts = ?, error = ?, next_attempt_ms = ?, updated_at = ? "
                    "WHERE page = ? AND selection_fingerprint = ? AND chunk_index = ?",
                    [status, attempts, message, retry_at, utcnow(), page, self.fingerprint, chunk_index],
                )
                if fetched is not None:
                    self.enricher.settle_unstored(fetched, con)
        except (DatabaseBusy, duckdb.Error) as db_exc:
            # Nothing is lost: the paid responses are spooled and the chunk is still not done.
            log.warning("page %d chunk %d: could not record the failure (%s); the rerun replays its spool",
                        page, chunk_index, redact(str(db_exc))[:200])
            return ChunkOutcome(page, chunk_index, "failed", error=message)
        if status == "quarantined":
            log.warning("page %d chunk %d quarantined after %d failed attempts (the page completes without it; "
                        "`deals-pipeline retry-quarantined` puts it back): %s", page, chunk_index, attempts, message)
        else:
            log.warning("page %d chunk %d failed (attempt %d of %d, retried after backoff): %s", page, chunk_index,
                        attempts, self.settings.max_chunk_attempts, message)
        return ChunkOutcome(page, chunk_index, status, error=message)

    # -- retry backoff and quarantine (rules in deals_pipeline/scheduling.py) --------------------

    def slot_deadline(self, deadline_ms: int | None) -> int | None:
        """The deadline of one acquire made while holding the pool slot (defer, don't sleep)."""
        if self.settings.max_wait_in_slot_s is None:
            return deadline_ms
        return slot_deadline_ms(self.clock.now_ms(), deadline_ms, self.settings.max_wait_in_slot_s)

    def _after_failure(self, attempts: int) -> tuple[str, int | None]:
        """(status, retry time) of a chunk that has now failed ``attempts`` times."""
        if should_quarantine(attempts, self.settings.max_chunk_attempts):
            return "quarantined", None
        return "failed", chunk_retry_at_ms(self.clock.now_ms(), attempts, self.settings.chunk_backoff_s)

    def _held_back(self, page: int, chunk_index: int, status: str, next_attempt_ms: int | None) -> ChunkOutcome | None:
        """A quarantined chunk, or a failed one still backing off: an outcome without paying anything."""
        if status == "quarantined":
            return ChunkOutcome(page, chunk_index, "quarantined")
        if status == "failed" and next_attempt_ms is not None and self.clock.now_ms() < int(next_attempt_ms):
            return ChunkOutcome(page, chunk_index, "backoff", wait_ms=int(next_attempt_ms) - self.clock.now_ms())
        return None

    @staticmethod
    def next_retry_at(db: Database, fingerprint: str, page: int, now: int) -> int | None:
        """When the page's next unfinished chunk may run: None = now (or nothing left), else the backoff end."""
        with db.connect() as con:
            rows = con.execute(
                "SELECT status, next_attempt_ms FROM page_chunks WHERE page = ? AND selection_fingerprint = ? "
                "AND status NOT IN ('done', 'quarantined')",
                [page, fingerprint],
            ).fetchall()
        waits = [int(r[1]) for r in rows if r[0] == "failed" and r[1] is not None and int(r[1]) > now]
        if not rows or len(waits) < len(rows):
            return None
        return min(waits)

    # -- summary --------------------------------------------------------------------------------

    def summarize(self, snapshot: PageSnapshot) -> PageSummary:
        page = snapshot.page
        with self.db.transaction() as con:
            counts = con.execute(
                "SELECT count(*), count(*) FILTER (status = 'done'), count(*) FILTER (status = 'failed'), "
                "coalesce(sum(tokens_spent), 0), list(error) FILTER (status = 'failed'), "
                "list(chunk_index ORDER BY chunk_index) FILTER (status = 'quarantined') "
                "FROM page_chunks WHERE page = ? AND selection_fingerprint = ?",
                [page, self.fingerprint],
            ).fetchone()
            total, done, failed, chunk_tokens, errors, quarantined = counts
            quarantined = tuple(int(c) for c in (quarantined or []))
            summary = PageSummary(
                page=page,
                # A quarantined chunk no longer holds the page back (the asset check names it).
                complete=int(done) + len(quarantined) == int(total),
                chunks_quarantined=quarantined,
                is_last=snapshot.is_last,
                chunks_total=int(total),
                chunks_done=int(done),
                chunks_failed=int(failed),
                failed_errors=tuple(e for e in (errors or []) if e),
                deals_on_page=len(snapshot.deals),
                tokens_spent=int(chunk_tokens) + snapshot.tokens_consumed,
                total_matches=snapshot.total_matches,
            )
            con.execute(
                "INSERT OR REPLACE INTO page_summaries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [page, self.fingerprint, "complete" if summary.complete else "partial", summary.chunks_total,
                 summary.chunks_done, summary.deals_on_page, summary.is_last, summary.tokens_spent, utcnow()],
            )
        publish_quietly(self.publisher, force=True)
        return summary

    # -- the whole page, for the CLI runner, tests and benchmarks --------------------------------

    def run_page(
        self,
        page: int,
        *,
        deadline_ms: int | None = None,
        on_chunk: Callable[[ChunkOutcome], None] | None = None,
    ) -> PageSummary:
        """Snapshot, then every unfinished chunk in order, then the summary. Stops at a budget deadline."""
        snapshot = self.snapshot(page, deadline_ms=deadline_ms)
        for chunk_index in self.unfinished_chunks(page):
            outcome = self.run_chunk(snapshot, chunk_index, deadline_ms=deadline_ms)
            if on_chunk is not None:
                on_chunk(outcome)
            if outcome.status == "deferred":
                break
        return self.summarize(snapshot)


@dataclass(frozen=True)
class QuarantinedChunk:
    page: int
    chunk_index: int
    attempts: int
    error: str | None


_QUARANTINED_SQL = (
    "SELECT page, chunk_index, attempts, error, selection_fingerprint FROM page_chunks "
    "WHERE status = 'quarantined' AND (? IS NULL OR selection_fingerprint = ?) ORDER BY page, chunk_index"
)


def quarantined_chunks(db: Database, fingerprint: str | None = None) -> list[QuarantinedChunk]:
    """Every quarantined chunk (of one selection, or all), in page order."""
    with db.connect() as con:
        rows = con.execute(_QUARANTINED_SQL, [fingerprint, fingerprint]).fetchall()
    return [QuarantinedChunk(int(r[0]), int(r[1]), int(r[2]), r[3]) for r in rows]


def retry_quarantined(db: Database, fingerprint: str | None = None) -> list[QuarantinedChunk]:
    """Put quarantined chunks back (attempts reset) and mark their pages partial so the sensor returns to them."""
    with db.transaction() as con:
        rows = con.execute(_QUARANTINED_SQL, [fingerprint, fingerprint]).fetchall()
        con.execute(
            "UPDATE page_chunks SET status = 'pending', attempts = 0, next_attempt_ms = NULL, updated_at = ? "
            "WHERE status = 'quarantined' AND (? IS NULL OR selection_fingerprint = ?)",
            [utcnow(), fingerprint, fingerprint],
        )
        for page, fp in {(int(r[0]), r[4]) for r in rows}:
            con.execute(
                "UPDATE page_summaries SET status = 'partial', updated_at = ? WHERE page = ? AND selection_fingerprint = ?",
                [utcnow(), page, fp],
            )
    return [QuarantinedChunk(int(r[0]), int(r[1]), int(r[2]), r[3]) for r in rows]
