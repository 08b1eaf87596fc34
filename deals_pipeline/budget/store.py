"""Where the shared budget state lives: the store protocol, and an in-memory store.

The arbiter (:class:`~deals_pipeline.budget.arbiter.TokenBudget`) reads and writes the state only
through :class:`BudgetStore.atomically`, one short transaction per decision. The state is:

* the newest server envelope (``status``) and when it was stored;
* the recharge-mode flag and a pending "sync requested" mark;
* the ledger: one row per reservation (``reserved`` -> ``settled`` | ``released`` | ``failed``),
  with the server timestamp of the envelope that includes its charge (``server_ts_ms``). ``failed``
  means the response never arrived intact: the charge is unknown until the next stored envelope
  re-bases it (:func:`inferred_charge`) and the row becomes ``inferred`` with what the server took.

:class:`~deals_pipeline.budget.duckdb_store.DuckDBBudgetStore` shares it between processes through
the DuckDB file. :class:`InMemoryBudgetStore` holds it in this process only: the unit tests of the
arbiter run on it in microseconds, so property tests can afford hundreds of examples.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Protocol, TypeVar

from deals_pipeline.budget.rules import project_server_balance
from deals_pipeline.budget.state import BudgetSnapshot, Reservation
from deals_pipeline.keepa.models import TokenStatus

T = TypeVar("T")

FinalState = Literal["settled", "released", "failed"]
#: Ledger states whose charge counts while it is not yet in the stored server status.
IN_FLIGHT_STATES = ("reserved", "settled", "failed")
#: Ledger states a response may still update (a released or settled row is final).
OPEN_STATES = ("reserved", "failed")
LedgerGroup = Literal["owner", "purpose"]


def inferred_charge(previous: TokenStatus, new: TokenStatus, known_charges: int) -> int:
    """Tokens charged between two envelopes by requests whose answer never arrived.

    Between ``previous`` (balance L0 at t0) and ``new`` (L1 at t1) the server refilled on its fixed
    schedule and charged every request answered in (t0, t1] (``known_charges``, from their envelopes)
    plus the unanswered ones: ``unknown = project(L0 -> t1) - known - L1``. Exact while the bucket stays
    below its cap (refill above the cap is lost, and the result is then a lower bound). Never negative.
    """
    projected, _ = project_server_balance(previous, new.timestamp_ms)
    return max(0, int(projected) - int(known_charges) - new.tokens_left)


def split_charge(total: int, predicted: list[int]) -> list[int]:
    """``total`` shared by rows in proportion to their predictions (the last takes the remainder)."""
    weights = [max(1, int(p)) for p in predicted]
    shares, left = [], total
    for i, w in enumerate(weights):
        share = left if i == len(weights) - 1 else total * w // sum(weights)
        shares.append(share)
        left -= share
    return shares


class BudgetTransaction(Protocol):
    """The operations of one budget transaction (all or nothing)."""

    def snapshot(self, now_ms: int) -> BudgetSnapshot:
        """The state at ``now_ms``: status, recharge flag, sync request, tokens in flight."""

    def stored_status(self) -> TokenStatus | None:
        """The newest stored server envelope."""

    def replace_status(self, status: TokenStatus, recorded_at_ms: int) -> None:
        """Store ``status`` as the newest envelope. Every answered (settled) or failed row without an
        envelope of its own is taken as included in it, and a pending sync request is cleared."""

    def infer_unknown_charges(self, new: TokenStatus, settled_ms: int) -> tuple[int, int]:
        """Before ``new`` replaces the stored status: settle every ``failed`` row (no envelope) at the
        charge the two envelopes imply (:func:`inferred_charge`), state ``inferred``. (rows, tokens)."""

    def write_recharging(self, recharging: bool, since_ms: int) -> None:
        """Persist the recharge-mode flag (creates the state row if missing)."""

    def request_sync(self, now_ms: int) -> None:
        """Mark the state unknown until the next stored status."""

    def insert_reservation(self, reservation: Reservation) -> None:
        """Add a ``reserved`` ledger row."""

    def record_response(
        self,
        reservation_id: str,
        *,
        actual: int | None,
        server_ts_ms: int | None,
        final_state: FinalState | None,
        settled_ms: int,
    ) -> None:
        """Update an open (reserved or failed) row: its actual cost if given, the timestamp of the envelope
        that includes it (kept if already set), and its final state if given. Final rows are untouched."""

    def answered_costs(self, cost_key: str, limit: int) -> list[tuple[int, int]]:
        """(actual, units) of the newest ``limit`` answered rows for ``cost_key`` with units, oldest first."""

    def ledger_totals(self, group_by: LedgerGroup | None) -> dict[str, dict[str, int]]:
        """Per group (or ``"all"``): calls, actual, predicted, released, failed, unanswered."""


class BudgetStore(Protocol):
    """Runs budget transactions against one shared state."""

    def atomically(self, fn: Callable[[BudgetTransaction], T], con: Any | None = None) -> T:
        """Run ``fn`` in one transaction and return its result (retried whole on a write conflict).

        ``con``: a DuckDB connection inside the caller's open transaction, so a chunk's rows and its
        settle commit together; stores that cannot join it run their own transaction.
        """


# ---------------------------------------------------------------------------------------------
# In memory
# ---------------------------------------------------------------------------------------------


@dataclass
class _LedgerRow:
    reservation: Reservation
    state: str = "reserved"
    actual: int | None = None
    server_ts_ms: int | None = None
    settled_ms: int | None = None


@dataclass
class _MemoryState:
    status: TokenStatus | None = None
    recorded_at_ms: int | None = None
    has_state_row: bool = False
    recharging: bool = False
    since_ms: int = 0
    sync_requested_ms: int | None = None
    ledger: dict[str, _LedgerRow] = field(default_factory=dict)

    def copy(self) -> "_MemoryState":
        """A working copy for one transaction (reservations are immutable, ledger rows are not)."""
        return replace(self, ledger={key: replace(row) for key, row in self.ledger.items()})


def ledger_totals_of(rows: list[tuple[str, str, int, int | None]]) -> dict[str, int]:
    """Totals of (state, key, predicted, actual) rows, the definition both stores implement."""
    counted = [(state, predicted, actual) for state, _, predicted, actual in rows if state != "released"]
    return {
        "calls": sum(1 for _, _, actual in counted if actual is not None),
        "actual": sum(actual for _, _, actual in counted if actual is not None),
        "predicted": sum(predicted for _, predicted, actual in counted if actual is not None),
        "released": sum(1 for state, *_ in rows if state == "released"),
        "failed": sum(1 for state, *_ in rows if state == "failed"),
        "unanswered": sum(1 for state, _, _, actual in rows if state == "reserved" and actual is None),
    }


class _MemoryTransaction:
    def __init__(self, state: _MemoryState) -> None:
        self.state = state

    def snapshot(self, now_ms: int) -> BudgetSnapshot:
        s = self.state
        in_flight = [
            row for row in s.ledger.values()
            if row.server_ts_ms is None and row.reservation.expires_ms > now_ms and row.state in IN_FLIGHT_STATES
        ]
        pending = sum(
            (row.actual if row.actual is not None else row.reservation.predicted)
            if row.state == "settled" else row.reservation.predicted
            for row in in_flight
        )
        return BudgetSnapshot(
            status=s.status,
            recorded_at_ms=s.recorded_at_ms,
            recharging=s.recharging if s.has_state_row else False,
            recharge_since_ms=s.since_ms if s.has_state_row else now_ms,
            sync_requested_ms=s.sync_requested_ms,
            pending=pending,
            earliest_pending_expiry_ms=min((row.reservation.expires_ms for row in in_flight), default=None),
            has_state_row=s.has_state_row,
        )

    def stored_status(self) -> TokenStatus | None:
        return self.state.status

    def replace_status(self, status: TokenStatus, recorded_at_ms: int) -> None:
        self.state.status = status
        self.state.recorded_at_ms = recorded_at_ms
        for row in self.state.ledger.values():
            if row.server_ts_ms is None and row.state in ("settled", "failed"):
                row.server_ts_ms = status.timestamp_ms
        self.state.sync_requested_ms = None

    def infer_unknown_charges(self, new: TokenStatus, settled_ms: int) -> tuple[int, int]:
        s = self.state
        unknown = sorted((row for row in s.ledger.values() if row.state == "failed" and row.server_ts_ms is None),
                         key=lambda row: (row.reservation.created_ms, row.reservation.id))
        if not unknown or s.status is None:
            return 0, 0
        t0, t1 = s.status.timestamp_ms, new.timestamp_ms
        known = sum(
            row.actual for row in s.ledger.values()
            if row.state not in ("released", "failed") and row.actual is not None
            and ((row.server_ts_ms is not None and t0 < row.server_ts_ms <= t1)
                 or (row.server_ts_ms is None and row.state == "settled"))
        )
        total = inferred_charge(s.status, new, known)
        for row, share in zip(unknown, split_charge(total, [row.reservation.predicted for row in unknown])):
            row.state, row.actual, row.server_ts_ms = "inferred", share, t1
            row.settled_ms = row.settled_ms if row.settled_ms is not None else settled_ms
        return len(unknown), total

    def write_recharging(self, recharging: bool, since_ms: int) -> None:
        self.state.recharging, self.state.since_ms, self.state.has_state_row = recharging, since_ms, True

    def request_sync(self, now_ms: int) -> None:
        if not self.state.has_state_row:
            self.write_recharging(False, now_ms)
        self.state.sync_requested_ms = now_ms

    def insert_reservation(self, reservation: Reservation) -> None:
        if reservation.id in self.state.ledger:
            raise ValueError(f"reservation {reservation.id} is already in the ledger")
        self.state.ledger[reservation.id] = _LedgerRow(reservation)

    def record_response(self, reservation_id: str, *, actual: int | None, server_ts_ms: int | None,
                        final_state: FinalState | None, settled_ms: int) -> None:
        row = self.state.ledger.get(reservation_id)
        if row is None or row.state not in OPEN_STATES:
            return
        if actual is not None:
            row.actual = actual
        if server_ts_ms is not None and row.server_ts_ms is None:
            row.server_ts_ms = server_ts_ms
        if final_state is not None:
            row.state, row.settled_ms = final_state, settled_ms

    def answered_costs(self, cost_key: str, limit: int) -> list[tuple[int, int]]:
        rows = [
            row for row in self.state.ledger.values()
            if row.reservation.cost_key == cost_key and row.actual is not None
            and (row.reservation.units or 0) > 0 and row.state in ("settled", "reserved")
        ]
        rows.sort(key=lambda row: row.reservation.created_ms)
        return [(int(row.actual), int(row.reservation.units)) for row in rows[-limit:] if row.actual is not None
                and row.reservation.units is not None]

    def ledger_totals(self, group_by: LedgerGroup | None) -> dict[str, dict[str, int]]:
        groups: dict[str, list[tuple[str, str, int, int | None]]] = {}
        for row in self.state.ledger.values():
            key = "all" if group_by is None else str(getattr(row.reservation, group_by))
            groups.setdefault(key, []).append((row.state, key, row.reservation.predicted, row.actual))
        return {key: ledger_totals_of(rows) for key, rows in sorted(groups.items())}


class InMemoryBudgetStore:
    """The budget state in this process's memory: one lock, copy-on-write transactions (a transaction
    that raises leaves nothing behind). Budgets sharing one instance share one state, as processes
    sharing one DuckDB file do."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._state = _MemoryState()
        self._working: _MemoryState | None = None  #: the open transaction's copy (nested calls join it)

    def __repr__(self) -> str:
        return "InMemoryBudgetStore()"

    def atomically(self, fn: Callable[[BudgetTransaction], T], con: Any | None = None) -> T:
        with self._lock:
            if self._working is not None:
                return fn(_MemoryTransaction(self._working))
            self._working = self._state.copy()
            try:
                result = fn(_MemoryTransaction(self._working))
                self._state = self._working
            finally:
                self._working = None
            return result
