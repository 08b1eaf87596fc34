"""The arbiter: every token spent on the key is reserved, then settled or released, here.

:class:`TokenBudget` loads the shared state in one short transaction per decision (through a
:class:`~deals_pipeline.budget.store.BudgetStore`), applies the pure rules of
:mod:`deals_pipeline.budget.rules`, and writes reservations and statuses back. It sleeps only on its
clock, never inside a transaction or during a request. See :mod:`deals_pipeline.budget` for the API.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable, TypeVar

from deals_pipeline.budget.cost_model import CostModel
from deals_pipeline.budget.duckdb_store import DuckDBBudgetStore
from deals_pipeline.budget.errors import BudgetDeadline, BudgetNeedsSync, BudgetStalled
from deals_pipeline.budget.forecast import Forecast, forecast_for
from deals_pipeline.budget.policy import BudgetPolicy, Priority, Thresholds
from deals_pipeline.budget.rules import (
    FUTURE_STATUS_TOLERANCE_MS,
    decide,
    next_recharging,
    project,
    status_supersedes,
    sync_wanted,
    thresholds_for,
    tokens_of,
)
from deals_pipeline.budget.sizing import max_new_deals_per_run
from deals_pipeline.budget.state import BudgetSnapshot, Decision, Projection, Reservation
from deals_pipeline.budget.store import BudgetStore, BudgetTransaction, FinalState
from deals_pipeline.clock import Clock
from deals_pipeline.keepa.errors import KeepaError, NotEnoughTokens
from deals_pipeline.keepa.models import TokenStatus
from deals_pipeline.progress import announce as announce_wait
from deals_pipeline.storage.db import Database

log = logging.getLogger(__name__)

T = TypeVar("T")


class TokenBudget:
    """The one arbiter of Keepa token spending for a key (see the package docstring).

    Args:
        store: the shared state: a :class:`Database` (shared through its DuckDB file) or any
            :class:`BudgetStore` (e.g. ``InMemoryBudgetStore()`` in unit tests).
        clock: the timeline every wait and expiry is measured on.
        policy: the knobs of the spending rule.
        owner: recorded on every ledger row (who spent).
        sync: the free ``/token`` call, made when the state is unknown.
    """

    def __init__(
        self,
        store: Database | BudgetStore,
        clock: Clock,
        policy: BudgetPolicy = BudgetPolicy(),
        owner: str = "pipeline",
        *,
        sync: Callable[[], TokenStatus] | None = None,
    ) -> None:
        self.store: BudgetStore = DuckDBBudgetStore(store) if isinstance(store, Database) else store
        self.clock = clock
        self.policy = policy
        self.owner = owner
        self._sync = sync
        self.costs = CostModel(self, clock, self.thresholds)

    def __repr__(self) -> str:
        return f"TokenBudget({self.store!r}, owner={self.owner!r})"

    # -- state transitions (inside one transaction) --------------------------------------------

    def _persist_recharge(self, tx: BudgetTransaction, snapshot: BudgetSnapshot, proj: Projection, now_ms: int) -> None:
        """Write the recharge flag the projection derived, if it changed (or was never written)."""
        if snapshot.has_state_row and proj.recharging == snapshot.recharging:
            return
        if proj.recharging != snapshot.recharging:
            log.info(
                "recharge mode %s (balance %d, burst level %d, rate %d/min)",
                "on" if proj.recharging else "off", proj.balance,
                thresholds_for(self.policy, proj.refill_rate).burst_level, proj.refill_rate,
            )
        tx.write_recharging(proj.recharging, now_ms)

    def _refresh_recharge(self, tx: BudgetTransaction, now_ms: int) -> Projection:
        snapshot = tx.snapshot(now_ms)
        proj, _ = project(snapshot, self.policy, now_ms)
        if snapshot.status is not None:
            self._persist_recharge(tx, snapshot, proj, now_ms)
        return proj

    def _store_status(self, tx: BudgetTransaction, status: TokenStatus, now_ms: int) -> bool:
        """Re-base the shared status unless ``status`` is older than the stored one. True if stored."""
        stored = tx.stored_status()
        if not status_supersedes(status, stored, now_ms):
            if status.timestamp_ms > now_ms + FUTURE_STATUS_TOLERANCE_MS:
                # A status from the future would make every truthful later one look "older" and freeze
                # the shared projection: it is ignored (the next sane envelope re-bases the budget).
                log.warning("ignoring a token status stamped %d s ahead of this clock",
                            (status.timestamp_ms - now_ms) // 1000)
            return False
        if stored is not None:
            rows, tokens = tx.infer_unknown_charges(status, now_ms)
            if rows:
                log.info("re-based %d unanswered request(s) from the next envelope: the server charged %d tokens",
                         rows, tokens)
        tx.replace_status(status, now_ms)
        if stored is None:
            log.info("token status known: balance %d, rate %d/min", status.tokens_left, status.refill_rate)
        return True

    # -- the shared state ------------------------------------------------------------------------

    def observe(self, status: TokenStatus | None, *, con: Any | None = None) -> None:
        """Re-base the shared state from one response envelope (200, 429 or error body).

        Older statuses than the stored one are ignored. ``None`` (a response without a usable
        envelope, H3) marks the state unknown: ``needs_sync()`` turns true until a newer status arrives.
        """
        now = self.clock.now_ms()
        if status is None:
            self.mark_unknown(con=con)
            return

        def run(tx: BudgetTransaction) -> None:
            self._store_status(tx, status, now)
            self._refresh_recharge(tx, now)

        self.store.atomically(run, con)

    def mark_unknown(self, *, con: Any | None = None) -> None:
        """A response came back without an envelope: the balance is unknown until the next status."""
        now = self.clock.now_ms()

        def run(tx: BudgetTransaction) -> None:
            self._refresh_recharge(tx, now)
            tx.request_sync(now)

        self.store.atomically(run, con)

    def needs_sync(self) -> bool:
        """True when the caller should make one free ``/token`` call and ``observe()`` it:
        no status yet, a response without envelope since the last status, or a status older than
        ``policy.resync_after_ms`` (long idle)."""
        now = self.clock.now_ms()
        return sync_wanted(self.store.atomically(lambda tx: tx.snapshot(now)), self.policy, now)

    def sync(self, fetch_status: Callable[[], TokenStatus] | None = None) -> TokenStatus:
        """Make the free status call (``fetch_status`` or the constructor's ``sync``) and observe it."""
        fetch = fetch_status or self._sync
        if fetch is None:
            raise BudgetNeedsSync("no status fetcher: pass sync= to TokenBudget or a callable here")
        status = fetch()
        self.observe(status)
        return status

    def projection(self) -> Projection:
        """Projected balance now: last server balance + refills since (capped) - in-flight reservations."""
        now = self.clock.now_ms()
        return self.store.atomically(lambda tx: self._refresh_recharge(tx, now))

    def thresholds(self) -> Thresholds:
        """The policy resolved against the learned refill rate (one read of the shared state)."""
        return thresholds_for(self.policy, self.projection().refill_rate)

    def decide(self, cost: int, priority: Priority) -> Decision:
        """The spending rule for (cost, priority) now, without reserving anything."""
        now = self.clock.now_ms()

        def run(tx: BudgetTransaction) -> Decision:
            snapshot = tx.snapshot(now)
            d = decide(snapshot, self.policy, int(cost), Priority(priority), now)
            if snapshot.status is not None:
                self._persist_recharge(tx, snapshot, d.projection, now)
            return d

        return self.store.atomically(run)

    def wait_ms(self, cost: int, priority: Priority) -> int:
        """ms to wait before a call of ``cost`` may start (0 = now).

        With no status known yet it returns 0: the state can only be learned by going ahead (the
        acquire makes the free /token sync first, ``needs_sync()``), so a scheduler asking "is a run
        worth starting?" must not be blocked by its own missing state (HAZARDS #52). Raises
        BudgetStalled when the learned refill rate is 0 and the balance is short."""
        tokens = tokens_of(cost)
        d = self.decide(tokens, priority)
        if not d.status_known:
            return 0
        if d.wait_ms is None:
            raise BudgetStalled(
                "the learned refill rate is 0: the balance never recovers",
                wait_ms=None, need=d.level, cost=tokens, deadline_ms=None, now_ms=d.projection.as_of_ms,
            )
        return d.wait_ms

    # -- reserve / settle / release ----------------------------------------------------------------

    def acquire(
        self,
        cost: "int | Any",
        *,
        purpose: str,
        priority: Priority,
        deadline_ms: int | None = None,
        detail: str = "",
    ) -> Reservation:
        """Reserve ``cost`` tokens, waiting (``clock.sleep_ms`` in steps <= ``policy.max_sleep_ms``, re-reading
        the shared state after each) until the spending rule allows it.

        ``cost`` is an int or a :class:`~deals_pipeline.budget.cost_model.CostEstimate` (which also records
        units and cost key for calibration). Raises :class:`BudgetDeadline` *before sleeping* when the
        tokens cannot arrive by ``deadline_ms`` (timeline ms), :class:`BudgetNeedsSync` when no status is
        known and no ``sync`` fetcher was given.
        """
        tokens = tokens_of(cost)
        units = getattr(cost, "units", None)
        cost_key = getattr(cost, "key", None)
        if tokens < 0:
            raise ValueError(f"cost must be >= 0, got {tokens}")
        priority = Priority(priority)
        logged = False
        synced = False
        while True:
            now = self.clock.now_ms()
            if deadline_ms is not None and now > deadline_ms:
                # The run's time is up even if tokens are there: stop cleanly, progress saved (HAZARDS #38).
                raise BudgetDeadline(
                    f"{purpose}: the run deadline has passed", wait_ms=0, need=tokens, cost=tokens,
                    deadline_ms=deadline_ms, now_ms=now,
                )

            def run(tx: BudgetTransaction) -> tuple[Decision, Reservation | None, bool]:
                snapshot = tx.snapshot(now)
                d = decide(snapshot, self.policy, tokens, priority, now)
                if not synced and self._sync is not None and sync_wanted(snapshot, self.policy, now):
                    return d, None, True
                if snapshot.status is not None:
                    self._persist_recharge(tx, snapshot, d.projection, now)
                if not d.can_spend:
                    return d, None, False
                res = Reservation(
                    id=uuid.uuid4().hex, owner=self.owner, purpose=purpose, priority=priority, predicted=tokens,
                    created_ms=now, expires_ms=now + self.policy.reservation_ttl_ms, detail=detail, units=units,
                    cost_key=cost_key,
                )
                tx.insert_reservation(res)
                # Recharge mode starts as soon as this reservation takes the projection to/below the threshold.
                after = next_recharging(d.projection.recharging, d.projection.balance - tokens, d.thresholds)
                if after != d.projection.recharging:
                    tx.write_recharging(after, now)
                return d, res, False

            decision, reservation, want_sync = self.store.atomically(run)
            if reservation is not None:
                th = decision.thresholds
                if tokens > th.cap + th.max_deficit and th.cap > 0:
                    log.warning(
                        "%s: cost %d exceeds cap %d + max deficit %d; size the request down (max_asins_affordable)",
                        purpose, tokens, th.cap, th.max_deficit,
                    )
                return reservation
            if want_sync:
                synced = True
                self.sync()
                continue
            if not decision.status_known:
                raise BudgetNeedsSync(
                    "no Keepa token status known yet: call /token once and observe() it (budget.needs_sync())"
                )
            if decision.wait_ms is None:
                exc_cls = BudgetDeadline if deadline_ms is not None else BudgetStalled
                raise exc_cls(
                    f"{purpose}: the learned refill rate is 0, {tokens} tokens never become available",
                    wait_ms=None, need=decision.level, cost=tokens, deadline_ms=deadline_ms, now_ms=now,
                )
            if deadline_ms is not None and now + decision.wait_ms > deadline_ms:
                raise BudgetDeadline(
                    f"{purpose}: need balance {decision.level} for {tokens} tokens in {decision.wait_ms / 1000:.0f} s,"
                    f" past the deadline in {(deadline_ms - now) / 1000:.0f} s",
                    wait_ms=decision.wait_ms, need=decision.level, cost=tokens, deadline_ms=deadline_ms, now_ms=now,
                )
            if not logged:  # one line, status record and listener call per wait (deals_pipeline.progress)
                announce_wait(self, decision, tokens=tokens, purpose=purpose, priority=priority, now_ms=now)
                logged = True
            self.clock.sleep_ms(min(decision.wait_ms, self.policy.max_sleep_ms))

    def _record_response(
        self,
        reservation: Reservation,
        status: TokenStatus | None,
        *,
        actual: int | None,
        final_state: FinalState | None,
        con: Any | None = None,
    ) -> None:
        """Observe ``status`` and update the reservation's ledger row in one transaction."""
        now = self.clock.now_ms()

        def run(tx: BudgetTransaction) -> None:
            # The row first: a newer status re-bases unanswered requests from the charges it knows of.
            tx.record_response(reservation.id, actual=actual,
                               server_ts_ms=status.timestamp_ms if status is not None else None,
                               final_state=final_state, settled_ms=now)
            if status is not None:
                self._store_status(tx, status, now)
            if final_state == "failed":
                tx.request_sync(now)
            self._refresh_recharge(tx, now)

        self.store.atomically(run, con)
        if actual is not None:
            self.costs.invalidate(reservation.cost_key)

    def settle(self, reservation: Reservation, actual: int, status: TokenStatus | None = None,
               con: Any | None = None) -> None:
        """Record what the request really cost (the response's ``tokensConsumed``).

        ``con``: an open connection inside the caller's transaction (e.g. the backfill commits a chunk's
        rows, its done mark and this settle together); if None, a short transaction of its own.
        Settling a released or already settled reservation is a no-op.
        """
        self._record_response(reservation, status, actual=int(actual), final_state="settled", con=con)

    def release(self, reservation: Reservation, status: TokenStatus | None = None) -> None:
        """The request was not sent, or was rejected with 429 (costs 0): free the reservation."""
        self._record_response(reservation, status, actual=0, final_state="released")

    def record_failure(self, reservation: Reservation, status: TokenStatus | None = None) -> None:
        """The request failed. With an envelope, it is settled at its ``tokensConsumed``. Without one
        the charge is unknown (``failed``): the reservation keeps counting until a newer status arrives,
        which re-bases it to what the server really charged (``inferred``), and ``needs_sync()`` turns
        true (H3) so that status comes at once from the free ``/token`` call."""
        if status is not None:
            self._record_response(reservation, status, actual=status.tokens_consumed, final_state="settled")
        else:
            self._record_response(reservation, None, actual=None, final_state="failed")

    def record_answer(self, reservation: Reservation, status: TokenStatus, *, settle: bool = True) -> None:
        """A response with an envelope arrived: record its status and ``tokensConsumed`` now, and settle
        the row unless ``settle=False`` (the caller settles later, inside its own transaction)."""
        self._record_response(reservation, status, actual=status.tokens_consumed,
                              final_state="settled" if settle else None)

    def call(
        self,
        fn: Callable[[], T],
        *,
        cost: "int | Any",
        purpose: str,
        priority: Priority,
        deadline_ms: int | None,
        detail: str = "",
        max_429: int = 5,
        settle_now: bool = True,
        on_result: Callable[[T, Reservation], None] | None = None,
    ) -> tuple[T, Reservation]:
        """acquire -> ``fn()`` -> observe its status -> settle (unless ``settle_now=False``).

        ``fn`` returns an object with a ``.status`` TokenStatus (DealPage, ProductPage) or a TokenStatus.
        On 429 (:class:`NotEnoughTokens`): observe its envelope, release, wait as that envelope says
        (bounded by ``deadline_ms``) and retry the same request; after ``max_429`` of them the last
        429 is re-raised. With ``settle_now=False`` the response's status and ``tokensConsumed`` are
        recorded at once (so the spend is never double-counted) and the caller settles later in its
        own transaction: ``settle(reservation, actual, con=con)``. ``on_result(result, reservation)`` runs
        as soon as a response is in hand, before any database work (the paid-response spool writes it
        to disk there, so a busy database cannot lose it).
        """
        n429 = 0
        while True:
            res = self.acquire(cost, purpose=purpose, priority=priority, deadline_ms=deadline_ms, detail=detail)
            try:
                result = fn()
            except NotEnoughTokens as err:
                n429 += 1
                log.warning("%s: HTTP 429 (%d of at most %d), balance %s", purpose, n429, max_429,
                            err.status.tokens_left if err.status is not None else "unknown")
                self.release(res, err.status)
                if err.status is None:
                    self.mark_unknown()
                if n429 >= max_429:
                    raise
                continue
            except KeepaError as err:
                self.record_failure(res, err.status)
                raise
            except BaseException:
                self.record_failure(res, None)
                raise
            if on_result is not None:
                on_result(result, res)
            status = _status_of(result)
            if status is None:
                log.warning("%s: response without a token envelope; state unknown until the next status", purpose)
                self.record_failure(res, None)
                return result, res
            self.record_answer(res, status, settle=settle_now)
            return result, res

    # -- reporting and sizing ----------------------------------------------------------------------

    def answered_costs(self, cost_key: str, limit: int) -> list[tuple[int, int]]:
        """(actual, units) of the newest ``limit`` answered requests for ``cost_key`` (the cost model's input)."""
        return self.store.atomically(lambda tx: tx.answered_costs(cost_key, limit))

    def ledger_summary(self) -> dict[str, Any]:
        """Tokens spent (actual) in total and by owner and purpose, with predicted vs actual."""
        now = self.clock.now_ms()
        empty = {"calls": 0, "actual": 0, "predicted": 0, "released": 0, "failed": 0, "unanswered": 0}

        def run(tx: BudgetTransaction) -> dict[str, Any]:
            total = tx.ledger_totals(None).get("all", empty)
            return {
                "spent": total["actual"],
                "predicted": total["predicted"],
                "calls": total["calls"],
                "released": total["released"],
                "failed": total["failed"],
                "in_flight": tx.snapshot(now).pending,
                "by_owner": tx.ledger_totals("owner"),
                "by_purpose": tx.ledger_totals("purpose"),
            }

        return self.store.atomically(run)

    def max_asins_affordable(self, options: Any, priority: Priority = Priority.BACKFILL, *, max_asins: int = 100,
                             thresholds: Thresholds | None = None) -> int:
        """Largest /product batch whose predicted cost the budget can ever afford (HAZARDS #44/#48)."""
        return self.costs.max_asins_affordable(options, priority=priority, max_asins=max_asins, thresholds=thresholds)

    def forecast(self, pages_remaining: int, asins_remaining: int, options: Any, *,
                 stage1_options: Any | None = None, stage1_pass_rate: float = 1.0) -> Forecast:
        """Tokens the remaining work needs and when the learned refill will have paid for it (two-stage
        enrichment when ``stage1_options`` is given: see :func:`forecast_for`)."""
        return forecast_for(self.projection(), self.costs, pages_remaining, asins_remaining, options,
                            stage1_options=stage1_options, stage1_pass_rate=stage1_pass_rate)

    def max_new_deals_per_run(self, mode: str = "default", **kwargs: Any) -> int:
        """Upsert batch size at the learned refill rate (:func:`~deals_pipeline.budget.sizing.max_new_deals_per_run`)."""
        return max_new_deals_per_run(self.projection().refill_rate, mode, **kwargs)


def _status_of(result: Any) -> TokenStatus | None:
    if isinstance(result, TokenStatus):
        return result
    status = getattr(result, "status", None)
    return status if isinstance(status, TokenStatus) else None
