"""The values the budget's rules read and produce: a snapshot of the shared state, a projection, a
decision, a reservation. Plain frozen data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from deals_pipeline.budget.policy import Priority, Thresholds
from deals_pipeline.keepa.models import TokenStatus


@dataclass(frozen=True)
class BudgetSnapshot:
    """The shared budget state as one transaction read it (from any :class:`BudgetStore`)."""

    status: TokenStatus | None  #: the newest server envelope stored, None before the first
    recorded_at_ms: int | None  #: when that envelope was stored (our clock)
    recharging: bool  #: the persisted recharge-mode flag
    recharge_since_ms: int
    sync_requested_ms: int | None  #: set when a response came back without an envelope
    pending: int  #: tokens of in-flight reservations (not yet in the stored status, not expired)
    earliest_pending_expiry_ms: int | None
    has_state_row: bool = False  #: False until the recharge flag was first written


@dataclass(frozen=True)
class Projection:
    """What the budget believes the balance is *now* (shared across processes)."""

    balance: int  #: server balance projected to now, minus in-flight reservations
    server_balance: int  #: last server balance + refills since, capped (no reservations)
    refill_rate: int
    cap: int
    next_refill_ms: int  #: next refill instant not yet counted (a refill counts ``margin_ms`` after it)
    reserved_in_flight: int  #: tokens of unexpired reservations not yet in the server's status
    recharging: bool
    as_of_ms: int
    status_known: bool
    status_timestamp_ms: int | None = None


@dataclass(frozen=True)
class Reservation:
    """A cost reserved in the shared ledger before a request is sent."""

    id: str
    owner: str
    purpose: str
    priority: Priority
    predicted: int
    created_ms: int
    expires_ms: int
    detail: str = ""
    units: int | None = None
    cost_key: str | None = None


@dataclass(frozen=True)
class Decision:
    """Outcome of the spending rule for one (cost, priority) at one instant."""

    can_spend: bool
    wait_ms: int | None  #: 0 when spendable; None = never (refill rate 0) or status unknown
    level: int  #: projected balance needed before the call may start (<= cap)
    need: int  #: server balance that has to be reached (level + in-flight, clamped to cap)
    projection: Projection
    thresholds: Thresholds
    status_known: bool = True
