"""One token budget for the whole Keepa key (plain Python, no Dagster).

Every process that spends tokens on the key goes through one :class:`TokenBudget` backed by the same
DuckDB file; the shared state lives in ``token_server_status`` (last server envelope),
``token_ledger`` (reservations and spends) and ``budget_state`` (recharge flag, sync request).
Each decision is one short transaction; no connection is held while sleeping or during a request.

Modules (each imports only those above it; ``deals_pipeline_tests/test_layers.py`` checks no circle)::

    policy.py       Priority, BudgetPolicy, Thresholds           the knobs
    state.py        BudgetSnapshot, Projection, Decision, Reservation   plain values
    errors.py       BudgetError, BudgetDeadline, BudgetStalled, BudgetNeedsSync
    rules.py        thresholds_for, project, decide, wait_for_level, ...  pure functions, no I/O
    sizing.py       max_new_deals_per_run                          upsert batch size from a rate
    store.py        BudgetStore protocol, InMemoryBudgetStore      where the shared state lives
    duckdb_store.py DuckDBBudgetStore                              ... shared by processes through DuckDB
    cost_model.py   CostModel, CostEstimate                        predictions, calibrated from the ledger
    forecast.py     Forecast, forecast_for                         tokens and ETA of the remaining work
    arbiter.py      TokenBudget                                    reserve / settle / release, 429 retry

API::

    class Priority(IntEnum): UPSERT = 0; BACKFILL = 1

    @dataclass(frozen=True)
    class BudgetPolicy:
        initial_refill_rate=5, threshold=0, max_deficit=60, burst_level=80, low_rate_below=10,
        upsert_reserve=40, reservation_ttl_ms=300_000, margin_ms=1_000,
        max_sleep_ms=60_000, resync_after_ms=3_600_000

    budget = TokenBudget(db, clock, policy=BudgetPolicy(), owner="backfill", sync=client.token_status)
    budget = TokenBudget(InMemoryBudgetStore(), clock)   # one process only (unit tests)
    budget.observe(status)          # re-base from any envelope (200/429/error); older ones are ignored
    budget.needs_sync() -> bool     # no status yet / envelope missing (H3) / long idle: call /token once
    budget.sync(fetch=None)         # fetch (or the constructor's sync=) + observe
    budget.projection() -> Projection(balance, server_balance, refill_rate, cap, next_refill_ms,
                                      reserved_in_flight, recharging, as_of_ms, status_known, ...)
    budget.thresholds() -> Thresholds(refill_rate, cap, threshold, max_deficit, burst_level,
                                      recharge_enabled, upsert_reserve)   # clamped to the live rate
    budget.decide(cost, priority) -> Decision(can_spend, wait_ms, level, need, projection, thresholds)
    budget.wait_ms(cost, priority) -> int                      # 0 = may spend now (or state unknown)
    budget.acquire(cost, *, purpose, priority, deadline_ms=None, detail="") -> Reservation
    budget.settle(reservation, actual, status=None, con=None)  # con: the caller's open transaction
    budget.release(reservation, status=None)                   # not sent, or 429 (costs 0)
    budget.record_failure(reservation, status=None)            # error; without envelope -> unknown
    budget.call(fn, *, cost, purpose, priority, deadline_ms, detail="", max_429=5, settle_now=True)
        -> (result, Reservation)
    budget.ledger_summary() -> {"spent", "predicted", "calls", "released", "failed", "in_flight",
                                "by_owner": {...}, "by_purpose": {...}}
    budget.record_answer(reservation, status, settle=True)     # a response with an envelope
    budget.costs: CostModel        # .deal_pages(n, cap=None), .products(n_asins, options, cap=None),
                                   # .token_status(), .max_asins_affordable(options, priority, thresholds=None)
                                   # cap/thresholds: the live limits if the caller holds them, else one read
    budget.max_asins_affordable(options, priority=BACKFILL, thresholds=None) -> int
    budget.answered_costs(cost_key, limit) -> [(actual, units)]   # the cost model's calibration input
    budget.forecast(pages_remaining, asins_remaining, options) -> Forecast(tokens_needed, eta_ms, eta,
                                                                          refill_rate, balance, cap)
    budget.max_new_deals_per_run(mode="default"|"derived", **kw) -> int   # at the learned rate
    sizing.max_new_deals_per_run(refill_rate, mode="default", *, interval_s=900, tokens_per_deal=8.0,
                                 chunk_size=4) -> int

``cost`` is an int or a :class:`CostEstimate` (from ``budget.costs``), which also records ASIN count
and option key in the ledger for calibration.

Rules:

* **Server is the truth.** The projection is the last server balance at its timestamp plus one refill
  of ``refillRate`` at ``timestamp + refillIn + k*60 s`` (capped at 60 x rate), minus in-flight
  reservations. A reservation stops counting once the envelope of its own response has been
  observed (its charge is in the server status from then on: ``token_ledger.server_ts_ms``), when it
  is released, or after ``reservation_ttl_ms`` (a killed process cannot leak budget). So one
  response's ``tokensLeft`` never erases other workers' in-flight reservations (H7). The refill rate
  is learned from every envelope; ``initial_refill_rate`` is only the guess before the first one.
* **Spending rule.** A call of cost ``c`` may start when the projection ``P`` satisfies
  ``P > threshold`` and ``P - c >= -max_deficit``; in recharge mode (learned rate < ``low_rate_below``,
  entered when ``P <= threshold``, left when ``P >= burst_level``; persisted in ``budget_state`` and
  re-derived every decision) also ``P >= burst_level``. BACKFILL applies all of these to
  ``P - upsert_reserve`` (the upserter's next batch stays untouched and it goes first). The level waited for is clamped to the cap, and the wait is KEEPA_API.md §3.3's
  discrete form (``refill_wait_ms``) for the server balance ``level + in-flight``.
* **Bounded runs.** ``acquire(deadline_ms=...)`` raises :class:`BudgetDeadline` (``wait_ms``, ``need``)
  without sleeping when the tokens cannot arrive in time. Each wait is logged once as
  "waiting N s for M tokens".
"""

from deals_pipeline.budget.arbiter import TokenBudget
from deals_pipeline.budget.cost_model import CostEstimate, CostModel, product_cost_shape
from deals_pipeline.budget.duckdb_store import DuckDBBudgetStore
from deals_pipeline.budget.errors import BudgetDeadline, BudgetError, BudgetNeedsSync, BudgetStalled
from deals_pipeline.budget.forecast import Forecast, eta_ms_for
from deals_pipeline.budget.policy import BudgetPolicy, Priority, Thresholds
from deals_pipeline.budget.rules import (
    decide,
    next_recharging,
    project,
    project_server_balance,
    required_level,
    thresholds_for,
    wait_for_level,
)
from deals_pipeline.budget.sizing import max_new_deals_per_run
from deals_pipeline.budget.state import BudgetSnapshot, Decision, Projection, Reservation
from deals_pipeline.budget.store import BudgetStore, InMemoryBudgetStore

__all__ = [
    "BudgetDeadline",
    "BudgetError",
    "BudgetNeedsSync",
    "BudgetPolicy",
    "BudgetSnapshot",
    "BudgetStalled",
    "BudgetStore",
    "CostEstimate",
    "CostModel",
    "Decision",
    "DuckDBBudgetStore",
    "Forecast",
    "InMemoryBudgetStore",
    "Priority",
    "Projection",
    "Reservation",
    "Thresholds",
    "TokenBudget",
    "decide",
    "eta_ms_for",
    "max_new_deals_per_run",
    "next_recharging",
    "product_cost_shape",
    "project",
    "project_server_balance",
    "required_level",
    "thresholds_for",
    "wait_for_level",
]
