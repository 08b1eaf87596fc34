"""One token budget for the whole Keepa key, shared by every process through DuckDB.

See the package docstring (:mod:`deals_pipeline.budget`) for the API and the rules. This module has
two layers:

* pure functions (:func:`thresholds_for`, :func:`project_server_balance`, :func:`required_level`,
  :func:`next_recharging`, :func:`wait_for_level`) that hold all the arithmetic and are property-tested;
* :class:`TokenBudget`, which loads the shared state in one short DuckDB transaction per decision,
  applies the pure rules, and writes reservations / statuses back. No connection is ever held
  while sleeping or while a Keepa request is in flight.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, TypeVar

import duckdb

from deals_pipeline.clock import Clock
from deals_pipeline.keepa.errors import KeepaError, NotEnoughTokens
from deals_pipeline.keepa.models import CAP_MINUTES, REFILL_PERIOD_MS, TokenStatus, refill_wait_ms
from deals_pipeline.storage.db import Database

log = logging.getLogger(__name__)

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Public value types
# ---------------------------------------------------------------------------------------------


#: How far ahead of our clock a server timestamp may be (clock skew) before it is distrusted.
FUTURE_STATUS_TOLERANCE_MS = 5 * 60_000


class Priority(IntEnum):
    """Who goes first. Lower value = higher priority."""

    UPSERT = 0
    BACKFILL = 1


@dataclass(frozen=True)
class BudgetPolicy:
    """Knobs of the spending rule. Every value is clamped against the *live* refill rate.

    Attributes:
        initial_refill_rate: the starting guess before any response was seen (then the learned rate wins).
        threshold: a call may start only while the projected balance is ``> threshold`` (0 = "positive").
            Clamped to ``[0, cap//2 - 1]``.
        max_deficit: a call may drive the projection to ``-max_deficit`` at most (``projected - cost >=
            -max_deficit``). Clamped to ``[0, cap]``.
        burst_level: low-rate recharge mode: after the projection falls to/below ``threshold``, nothing is
            spent until it is back at this level. Clamped to ``[threshold + 1, cap]``.
        low_rate_below: recharge mode is on only while the learned refill rate is below this.
        upsert_reserve: tokens a BACKFILL acquire must leave untouched for the upserter's next batch.
            Clamped to ``[0, cap//2]``.
        reservation_ttl_ms: a reservation whose response never arrived is ignored after this long
            (timeline ms), so a killed process cannot leak budget forever.
        margin_ms: added to every refill wait (clock skew between us and Keepa).
        max_sleep_ms: an acquire sleeps in steps of at most this long and re-reads the shared state
            after each step (other processes spend too). Never polls ``/token``.
        resync_after_ms: ``needs_sync()`` also turns true when the last status is older than this
            (long idle; KEEPA_API.md §10.11). 0 disables.
    """

    initial_refill_rate: int = 5
    threshold: int = 0
    max_deficit: int = 60
    burst_level: int = 80
    low_rate_below: int = 10
    upsert_reserve: int = 40
    reservation_ttl_ms: int = 300_000
    margin_ms: int = 1_000
    max_sleep_ms: int = 60_000
    resync_after_ms: int = 3_600_000

    def __post_init__(self) -> None:
        for name in ("initial_refill_rate", "reservation_ttl_ms", "margin_ms", "max_sleep_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"BudgetPolicy.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_sleep_ms == 0:
            raise ValueError("BudgetPolicy.max_sleep_ms must be > 0")


@dataclass(frozen=True)
class Thresholds:
    """The policy resolved against one refill rate (recomputed on every decision, HAZARDS #41/#52)."""

    refill_rate: int
    cap: int
    threshold: int
    max_deficit: int
    burst_level: int
    recharge_enabled: bool
    upsert_reserve: int


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


class BudgetError(RuntimeError):
    """Base of the budget's own errors."""


class BudgetDeadline(BudgetError):
    """The tokens for the next request cannot arrive before the run's deadline (raised without sleeping).

    Attributes: ``wait_ms`` (None: never, e.g. refill rate 0), ``need`` (balance level waited for),
    ``cost``, ``deadline_ms``, ``now_ms``.
    """

    def __init__(self, message: str, *, wait_ms: int | None, need: int, cost: int, deadline_ms: int | None, now_ms: int):
        super().__init__(message)
        self.wait_ms = wait_ms
        self.need = need
        self.cost = cost
        self.deadline_ms = deadline_ms
        self.now_ms = now_ms


class BudgetStalled(BudgetDeadline):
    """The balance can never recover (learned refill rate is 0) and no deadline was given."""


class BudgetNeedsSync(BudgetError):
    """No server status is known: make one free ``/token`` call and ``observe()`` it (or pass ``sync=``)."""


# ---------------------------------------------------------------------------------------------
# Pure rules
# ---------------------------------------------------------------------------------------------


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(int(v), hi))


def thresholds_for(policy: BudgetPolicy, refill_rate: int) -> Thresholds:
    """Resolve the policy against a refill rate: every level is clamped to the cap (60 x rate)."""
    rate = max(int(refill_rate), 0)
    cap = CAP_MINUTES * rate
    cap_eff = max(cap, 1)
    threshold = _clamp(policy.threshold, 0, max(cap_eff // 2 - 1, 0))
    max_deficit = _clamp(policy.max_deficit, 0, cap_eff)
    burst = _clamp(policy.burst_level, min(threshold + 1, cap_eff), cap_eff)
    reserve = _clamp(policy.upsert_reserve, 0, cap_eff // 2)
    return Thresholds(
        refill_rate=rate,
        cap=cap,
        threshold=threshold,
        max_deficit=max_deficit,
        burst_level=burst,
        recharge_enabled=rate < policy.low_rate_below,
        upsert_reserve=reserve,
    )


def project_server_balance(status: TokenStatus, now_ms: int) -> tuple[int, int]:
    """(balance, next_refill_ms) at ``now_ms`` from one envelope.

    Refills of ``refillRate`` happen at ``timestamp + refillIn + k * 60 s``; the balance never
    exceeds the cap (a reported balance above 60 x rate, e.g. after a plan downgrade, is read as the
    cap: conservative, and no wait target is ever above the cap anyway).
    """
    next_refill = status.next_refill_ms
    refills = 0
    if now_ms >= next_refill:
        refills = (now_ms - next_refill) // REFILL_PERIOD_MS + 1
        next_refill += refills * REFILL_PERIOD_MS
    balance = min(status.cap, status.tokens_left + refills * status.refill_rate)
    return int(balance), int(next_refill)


def required_level(th: Thresholds, cost: int, priority: Priority, recharging: bool) -> int:
    """Projected balance a call of ``cost`` needs before it may start. Never above the cap.

    * ``projected > threshold`` and ``projected - cost >= -max_deficit`` (controlled deficit);
    * BACKFILL only: recharge mode (low rate, after falling to/below the threshold) waits for
      ``burst_level``, and every rule applies to ``projected - upsert_reserve``, so at any balance where
      the backfill may start, the upserter may too. The upserter's small, time-bound batches are not
      held back by recharge mode: at 5/min a burst of 80 takes 16 min, longer than an upsert interval,
      and the freshness of the newest deals is what the upserter exists for.
    """
    level = max(th.threshold + 1, int(cost) - th.max_deficit)
    if priority == Priority.BACKFILL:
        if recharging and th.recharge_enabled:
            level = max(level, th.burst_level)
        level += th.upsert_reserve
    return min(level, max(th.cap, 1))


def next_recharging(previous: bool, projected: int, th: Thresholds) -> bool:
    """Recharge mode from the persisted flag and the current projection (never sticky across rate changes)."""
    if not th.recharge_enabled:
        return False
    if projected <= th.threshold:
        return True
    if previous and projected >= th.burst_level:
        return False
    return previous


def wait_for_level(status: TokenStatus, need: int, now_ms: int, margin_ms: int) -> int | None:
    """ms until the *server* balance reaches ``need`` (clamped to the cap), KEEPA_API.md §3.3 discrete form.

    A refill is only trusted ``margin_ms`` after its instant (clock skew), consistently with the
    projection: the result is ``refill_wait_ms`` evaluated at ``now - margin`` with no extra margin,
    which equals ``(timestamp + refillIn - now) + (n - 1) * 60 s + margin`` whenever ``now`` is before
    the next refill. None when the balance never gets there (refill rate 0).
    """
    need = min(int(need), max(status.cap, 1))
    balance, _ = project_server_balance(status, now_ms - margin_ms)
    if balance >= need:
        return 0
    if status.refill_rate <= 0:
        return None
    return max(0, refill_wait_ms(status, need, now_ms - margin_ms, 0))


# ---------------------------------------------------------------------------------------------
# Shared state
# ---------------------------------------------------------------------------------------------

# Serialises this process's own budget transactions on one file (DuckDB shares one instance per
# file within a process; concurrent writers would hit write-write conflicts).
_PATH_LOCKS: dict[str, threading.RLock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def _path_lock(db: Database) -> threading.RLock:
    key = str(db.path)
    with _PATH_LOCKS_GUARD:
        lock = _PATH_LOCKS.get(key)
        if lock is None:
            lock = _PATH_LOCKS[key] = threading.RLock()
        return lock


@dataclass
class _State:
    status: TokenStatus | None
    recorded_at_ms: int | None
    recharging: bool
    recharge_since_ms: int
    sync_requested_ms: int | None
    pending: int
    earliest_pending_expiry_ms: int | None
    has_state_row: bool = False


# In flight = not yet in the stored server status: no envelope of its own observed (server_ts_ms NULL),
# not released, not expired. Settled-without-envelope and unknown rows count until the next stored status.
_PENDING_SQL = """
SELECT
    COALESCE(SUM(CASE WHEN state = 'settled' THEN COALESCE(actual, predicted) ELSE predicted END), 0),
    MIN(expires_ms)
FROM token_ledger
WHERE server_ts_ms IS NULL
  AND expires_ms > ?
  AND state IN ('reserved', 'settled', 'unknown', 'failed')
"""

#: Ledger states of a request whose response never arrived intact: its charge is unknown until the
#: next stored envelope re-bases it (``'failed'`` is the name older databases used).
UNKNOWN_STATES = ("unknown", "failed")


@dataclass(frozen=True)
class _ResponseOutcome:
    status: TokenStatus | None
    actual: int | None


class TokenBudget:
    """The one arbiter of Keepa token spending for a key (see the package docstring)."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        policy: BudgetPolicy = BudgetPolicy(),
        owner: str = "pipeline",
        *,
        sync: Callable[[], TokenStatus] | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.policy = policy
        self.owner = owner
        self._sync = sync
        self._lock = _path_lock(db)
        from deals_pipeline.budget.cost_model import CostModel  # local: cost_model imports this module

        self.costs = CostModel(self)
        #: Cap seen by this process's latest read of the shared state (None before the first).
        self.last_cap: int | None = None

    def __repr__(self) -> str:
        return f"TokenBudget({self.db!r}, owner={self.owner!r})"

    # -- transactions ------------------------------------------------------------------------

    def _tx(self, fn: Callable[[duckdb.DuckDBPyConnection], T], con: duckdb.DuckDBPyConnection | None = None) -> T:
        """Run ``fn`` in one short transaction (or inside the caller's ``con``)."""
        if con is not None:
            return fn(con)
        for attempt in range(8):
            with self._lock:
                try:
                    with self.db.transaction() as c:
                        return fn(c)
                except duckdb.TransactionException:
                    if attempt == 7:
                        raise
            time.sleep(0.005 * (attempt + 1))  # wall time: a conflict is real contention
        raise AssertionError("unreachable")  # pragma: no cover

    def _load(self, con: duckdb.DuckDBPyConnection, now_ms: int) -> _State:
        row = con.execute(
            "SELECT tokens_left, refill_in_ms, refill_rate, timestamp_ms, recorded_at_ms FROM token_server_status WHERE id = 1"
        ).fetchone()
        status = recorded = None
        if row is not None:
            status = TokenStatus(tokens_left=int(row[0]), refill_in_ms=int(row[1]), refill_rate=int(row[2]), timestamp_ms=int(row[3]))
            recorded = int(row[4])
        srow = con.execute("SELECT recharging, since_ms, sync_requested_ms FROM budget_state WHERE id = 1").fetchone()
        prow = con.execute(_PENDING_SQL, [now_ms]).fetchone()
        return _State(
            status=status,
            recorded_at_ms=recorded,
            recharging=bool(srow[0]) if srow else False,
            recharge_since_ms=int(srow[1]) if srow else now_ms,
            sync_requested_ms=(int(srow[2]) if srow and srow[2] is not None else None),
            pending=int(prow[0]) if prow else 0,
            earliest_pending_expiry_ms=(int(prow[1]) if prow and prow[1] is not None else None),
            has_state_row=srow is not None,
        )

    def _rate_of(self, st: _State) -> int:
        return st.status.refill_rate if st.status is not None else max(int(self.policy.initial_refill_rate), 0)

    def _project(self, st: _State, now_ms: int) -> tuple[Projection, Thresholds]:
        th = thresholds_for(self.policy, self._rate_of(st))
        self.last_cap = th.cap  # the cost model clamps predictions with it, without another read
        if st.status is None:
            proj = Projection(
                balance=-st.pending,
                server_balance=0,
                refill_rate=th.refill_rate,
                cap=th.cap,
                next_refill_ms=now_ms + REFILL_PERIOD_MS,
                reserved_in_flight=st.pending,
                recharging=st.recharging,
                as_of_ms=now_ms,
                status_known=False,
            )
            return proj, th
        # Refills are trusted margin_ms after their instant (skew): project at now - margin.
        server_balance, next_refill = project_server_balance(st.status, now_ms - self.policy.margin_ms)
        balance = server_balance - st.pending
        recharging = next_recharging(st.recharging, balance, th)
        proj = Projection(
            balance=balance,
            server_balance=server_balance,
            refill_rate=th.refill_rate,
            cap=th.cap,
            next_refill_ms=next_refill,
            reserved_in_flight=st.pending,
            recharging=recharging,
            as_of_ms=now_ms,
            status_known=True,
            status_timestamp_ms=st.status.timestamp_ms,
        )
        return proj, th

    def _persist_recharge(self, con: duckdb.DuckDBPyConnection, st: _State, proj: Projection, now_ms: int) -> None:
        if st.has_state_row and proj.recharging == st.recharging:
            return
        if proj.recharging != st.recharging:
            log.info(
                "recharge mode %s (balance %d, burst level %d, rate %d/min)",
                "on" if proj.recharging else "off",
                proj.balance,
                thresholds_for(self.policy, proj.refill_rate).burst_level,
                proj.refill_rate,
            )
        if st.has_state_row:
            con.execute("UPDATE budget_state SET recharging = ?, since_ms = ? WHERE id = 1", [proj.recharging, now_ms])
        else:
            con.execute("INSERT INTO budget_state (id, recharging, since_ms) VALUES (1, ?, ?)", [proj.recharging, now_ms])
        st.recharging = proj.recharging
        st.has_state_row = True

    def _refresh_recharge(self, con: duckdb.DuckDBPyConnection, now_ms: int) -> Projection:
        st = self._load(con, now_ms)
        proj, _ = self._project(st, now_ms)
        if st.status is not None:
            self._persist_recharge(con, st, proj, now_ms)
        return proj

    def _decide(self, st: _State, cost: int, priority: Priority, now_ms: int) -> Decision:
        proj, th = self._project(st, now_ms)
        level = required_level(th, cost, priority, proj.recharging)
        if st.status is None:
            return Decision(False, None, level, level, proj, th, status_known=False)
        if proj.balance >= level:
            return Decision(True, 0, level, level + st.pending, proj, th)
        need = min(level + st.pending, max(th.cap, 1))
        wait = wait_for_level(st.status, need, now_ms, self.policy.margin_ms)
        if wait == 0:
            # The server balance is at the cap but in-flight reservations still cover part of it:
            # wait for them to settle or expire (re-read after each step).
            expiry = st.earliest_pending_expiry_ms
            wait = max(1, (expiry - now_ms) if expiry is not None else self.policy.margin_ms)
        return Decision(False, wait, level, need, proj, th)

    def _store_status(self, con: duckdb.DuckDBPyConnection, status: TokenStatus, now_ms: int) -> bool:
        """Re-base the shared status unless ``status`` is older than the stored one. True if stored.

        On a timestamp tie the lower balance wins. A stored status is taken to include every request
        that was answered (settled) or failed before it, so those rows stop counting as in flight.
        """
        if status.timestamp_ms > now_ms + FUTURE_STATUS_TOLERANCE_MS:
            # A status from the future would make every truthful later one look "older" and freeze the
            # shared projection: ignore it (the next sane envelope re-bases the budget).
            log.warning("ignoring a token status stamped %d s ahead of this clock",
                        (status.timestamp_ms - now_ms) // 1000)
            return False
        row = con.execute("SELECT timestamp_ms, tokens_left FROM token_server_status WHERE id = 1").fetchone()
        if row is not None:
            ts, left = int(row[0]), int(row[1])
            stored_is_sane = ts <= now_ms + FUTURE_STATUS_TOLERANCE_MS
            if stored_is_sane and (status.timestamp_ms < ts or (status.timestamp_ms == ts and status.tokens_left > left)):
                return False
        if row is not None:
            self._infer_unknown_charges(con, status)
        con.execute(
            "INSERT OR REPLACE INTO token_server_status (id, tokens_left, refill_in_ms, refill_rate, timestamp_ms, recorded_at_ms)"
            " VALUES (1, ?, ?, ?, ?, ?)",
            [status.tokens_left, status.refill_in_ms, status.refill_rate, status.timestamp_ms, now_ms],
        )
        con.execute(
            "UPDATE token_ledger SET server_ts_ms = ? WHERE server_ts_ms IS NULL AND state = 'settled'",
            [status.timestamp_ms],
        )
        con.execute("UPDATE budget_state SET sync_requested_ms = NULL WHERE id = 1 AND sync_requested_ms IS NOT NULL")
        if row is None:
            log.info("token status known: balance %d, rate %d/min", status.tokens_left, status.refill_rate)
        return True

    def _infer_unknown_charges(self, con: duckdb.DuckDBPyConnection, new: TokenStatus) -> None:
        """Re-base requests whose response never arrived: their charge is what the balance says is missing.

        Between the stored status (balance L0 at t0) and ``new`` (L1 at t1) the server refilled on its
        fixed schedule and charged every request answered in (t0, t1] (their envelopes are in the
        ledger) plus the unanswered ones. So ``unknown = project(L0 -> t1) - known - L1``, exact while
        the bucket stays below its cap (refills above the cap are lost and the split is then a lower
        bound). Several unknown rows share it in proportion to their predictions.
        """
        unknown = con.execute(
            "SELECT reservation_id, predicted FROM token_ledger WHERE state IN ('unknown', 'failed') "
            "AND server_ts_ms IS NULL ORDER BY created_ms, reservation_id"
        ).fetchall()
        if not unknown:
            return
        old_row = con.execute("SELECT tokens_left, refill_in_ms, refill_rate, timestamp_ms FROM token_server_status WHERE id = 1").fetchone()
        old = TokenStatus(tokens_left=int(old_row[0]), refill_in_ms=int(old_row[1]), refill_rate=int(old_row[2]),
                          timestamp_ms=int(old_row[3]))
        projected, _ = project_server_balance(old, new.timestamp_ms)
        known = con.execute(
            "SELECT COALESCE(SUM(actual), 0) FROM token_ledger WHERE state NOT IN ('released', 'unknown', 'failed') "
            "AND actual IS NOT NULL AND ((server_ts_ms > ? AND server_ts_ms <= ?) OR (server_ts_ms IS NULL AND state = 'settled'))",
            [old.timestamp_ms, new.timestamp_ms],
        ).fetchone()[0]
        missing = max(0, int(projected) - int(known) - new.tokens_left)
        weights = [max(1, int(r[1])) for r in unknown]
        left = missing
        for i, (rid, _predicted) in enumerate(unknown):
            share = left if i == len(unknown) - 1 else missing * weights[i] // sum(weights)
            left -= share
            con.execute(
                "UPDATE token_ledger SET state = 'inferred', actual = ?, server_ts_ms = ?, settled_ms = COALESCE(settled_ms, ?) "
                "WHERE reservation_id = ?",
                [share, new.timestamp_ms, self.clock.now_ms(), rid],
            )
        log.info("re-based %d unanswered request(s) from the next envelope: %d tokens charged", len(unknown), missing)

    def _request_sync(self, con: duckdb.DuckDBPyConnection, now_ms: int) -> None:
        if con.execute("SELECT 1 FROM budget_state WHERE id = 1").fetchone() is None:
            con.execute("INSERT INTO budget_state (id, recharging, since_ms) VALUES (1, FALSE, ?)", [now_ms])
        con.execute("UPDATE budget_state SET sync_requested_ms = ? WHERE id = 1", [now_ms])

    # -- public API --------------------------------------------------------------------------

    def observe(self, status: TokenStatus | None, *, con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Re-base the shared state from one response envelope (200, 429 or error body).

        Older statuses than the stored one are ignored. ``None`` (a response without a usable
        envelope, H3) marks the state unknown: ``needs_sync()`` turns true until a newer status arrives.
        """
        now = self.clock.now_ms()
        if status is None:
            self.mark_unknown(con=con)
            return

        def run(c: duckdb.DuckDBPyConnection) -> None:
            self._store_status(c, status, now)
            self._refresh_recharge(c, now)

        self._tx(run, con)

    def mark_unknown(self, *, con: duckdb.DuckDBPyConnection | None = None) -> None:
        """A response came back without an envelope: the balance is unknown until the next status."""
        now = self.clock.now_ms()

        def run(c: duckdb.DuckDBPyConnection) -> None:
            self._refresh_recharge(c, now)
            self._request_sync(c, now)

        self._tx(run, con)

    def needs_sync(self) -> bool:
        """True when the caller should make one free ``/token`` call and ``observe()`` it:
        no status yet, a response without envelope since the last status, or a status older than
        ``policy.resync_after_ms`` (long idle)."""
        now = self.clock.now_ms()
        st = self._tx(lambda c: self._load(c, now))
        return self._sync_wanted(st, now)

    def _sync_wanted(self, st: _State, now_ms: int) -> bool:
        if st.status is None:
            return True
        if st.sync_requested_ms is not None:
            return True
        if self.policy.resync_after_ms and st.recorded_at_ms is not None:
            return now_ms - st.recorded_at_ms > self.policy.resync_after_ms
        return False

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
        return self._tx(lambda c: self._refresh_recharge(c, now))

    def thresholds(self) -> Thresholds:
        """The policy resolved against the learned refill rate."""
        return thresholds_for(self.policy, self.projection().refill_rate)

    def decide(self, cost: int, priority: Priority) -> Decision:
        """The spending rule for (cost, priority) now, without reserving anything."""
        now = self.clock.now_ms()

        def run(c: duckdb.DuckDBPyConnection) -> Decision:
            st = self._load(c, now)
            d = self._decide(st, int(cost), Priority(priority), now)
            if st.status is not None:
                self._persist_recharge(c, st, d.projection, now)
            return d

        return self._tx(run)

    def wait_ms(self, cost: int, priority: Priority) -> int:
        """ms to wait before a call of ``cost`` may start (0 = now).

        With no status known yet it returns 0: the state can only be learned by going ahead (the
        acquire makes the free /token sync first, ``needs_sync()``), so a scheduler asking "is a run
        worth starting?" must not be blocked by its own missing state (HAZARDS #52). Raises
        BudgetStalled when the learned refill rate is 0 and the balance is short."""
        d = self.decide(_tokens(cost), priority)
        if not d.status_known:
            return 0
        if d.wait_ms is None:
            raise BudgetStalled(
                "the learned refill rate is 0: the balance never recovers",
                wait_ms=None, need=d.level, cost=_tokens(cost), deadline_ms=None, now_ms=d.projection.as_of_ms,
            )
        return d.wait_ms

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
        tokens = _tokens(cost)
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

            def run(c: duckdb.DuckDBPyConnection) -> tuple[Decision, Reservation | None, bool]:
                st = self._load(c, now)
                if not synced and self._sync is not None and self._sync_wanted(st, now):
                    return self._decide(st, tokens, priority, now), None, True
                d = self._decide(st, tokens, priority, now)
                if st.status is not None:
                    self._persist_recharge(c, st, d.projection, now)
                if not d.can_spend:
                    return d, None, False
                res = Reservation(
                    id=uuid.uuid4().hex,
                    owner=self.owner,
                    purpose=purpose,
                    priority=priority,
                    predicted=tokens,
                    created_ms=now,
                    expires_ms=now + self.policy.reservation_ttl_ms,
                    detail=detail,
                    units=units,
                    cost_key=cost_key,
                )
                c.execute(
                    "INSERT INTO token_ledger (reservation_id, created_ms, expires_ms, settled_ms, owner, purpose, priority,"
                    " detail, predicted, actual, state, server_ts_ms, units, cost_key)"
                    " VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?, NULL, 'reserved', NULL, ?, ?)",
                    [res.id, res.created_ms, res.expires_ms, res.owner, res.purpose, int(res.priority), res.detail,
                     res.predicted, res.units, res.cost_key],
                )
                # Recharge mode starts as soon as this reservation takes the projection to/below the threshold.
                after = d.projection.balance - tokens
                rech = next_recharging(d.projection.recharging, after, d.thresholds)
                if rech != d.projection.recharging:
                    c.execute("UPDATE budget_state SET recharging = ?, since_ms = ? WHERE id = 1", [rech, now])
                return d, res, False

            decision, reservation, want_sync = self._tx(run)
            if reservation is not None:
                if tokens > decision.thresholds.cap + decision.thresholds.max_deficit and decision.thresholds.cap > 0:
                    log.warning(
                        "%s: cost %d exceeds cap %d + max deficit %d; size the request down (max_asins_affordable)",
                        purpose, tokens, decision.thresholds.cap, decision.thresholds.max_deficit,
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
            if not logged:
                log.info(
                    "waiting %.0f s for %d tokens (%s %s: balance %d, cost %d, in flight %d, rate %d/min%s)",
                    decision.wait_ms / 1000, decision.level, priority.name, purpose, decision.projection.balance,
                    tokens, decision.projection.reserved_in_flight, decision.projection.refill_rate,
                    ", recharging" if decision.projection.recharging else "",
                )
                logged = True
            self.clock.sleep_ms(min(decision.wait_ms, self.policy.max_sleep_ms))

    def _record_response(
        self,
        reservation: Reservation,
        status: TokenStatus | None,
        *,
        actual: int | None,
        final_state: str | None,
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> None:
        """Observe ``status`` and update the reservation's ledger row in one transaction."""
        now = self.clock.now_ms()

        def run(c: duckdb.DuckDBPyConnection) -> None:
            # The row first: a newer status re-bases unanswered requests from the charges it knows of.
            sets = ["actual = COALESCE(?, actual)"]
            params: list[Any] = [actual]
            if status is not None:
                sets.append("server_ts_ms = COALESCE(server_ts_ms, ?)")
                params.append(status.timestamp_ms)
            if final_state is not None:
                sets.append("state = ?")
                sets.append("settled_ms = ?")
                params += [final_state, now]
            params.append(reservation.id)
            c.execute(
                f"UPDATE token_ledger SET {', '.join(sets)} WHERE reservation_id = ? AND state IN ('reserved', 'unknown', 'failed')",
                params,
            )
            if status is not None:
                self._store_status(c, status, now)
            if final_state in UNKNOWN_STATES:
                self._request_sync(c, now)
            self._refresh_recharge(c, now)

        self._tx(run, con)
        if actual is not None:
            self.costs.invalidate(reservation.cost_key)

    def settle(
        self,
        reservation: Reservation,
        actual: int,
        status: TokenStatus | None = None,
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> None:
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
        the charge is unknown (state ``'unknown'``): the reservation keeps counting until a newer status
        arrives, which re-bases it to what the server really charged (state ``'inferred'``), and
        ``needs_sync()`` turns true (H3) so that status comes from the free ``/token`` call at once."""
        if status is not None:
            self._record_response(reservation, status, actual=status.tokens_consumed, final_state="settled")
        else:
            self._record_response(reservation, None, actual=None, final_state="unknown")

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
            if settle_now:
                self._record_response(res, status, actual=status.tokens_consumed, final_state="settled")
            else:
                self._record_response(res, status, actual=status.tokens_consumed, final_state=None)
            return result, res

    # -- reporting ---------------------------------------------------------------------------

    def ledger_summary(self) -> dict[str, Any]:
        """Tokens spent (actual) in total and by owner and purpose, with predicted vs actual."""
        now = self.clock.now_ms()

        def run(c: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            def group(col: str | None) -> Any:
                key = col if col else "'all'"
                rows = c.execute(
                    f"""SELECT {key},
                              COUNT(*) FILTER (WHERE actual IS NOT NULL AND state <> 'released'),
                              COALESCE(SUM(actual) FILTER (WHERE state <> 'released'), 0),
                              COALESCE(SUM(predicted) FILTER (WHERE actual IS NOT NULL AND state <> 'released'), 0),
                              COUNT(*) FILTER (WHERE state = 'released'),
                              COUNT(*) FILTER (WHERE state IN ('unknown', 'failed')),
                              COUNT(*) FILTER (WHERE state = 'reserved' AND actual IS NULL)
                       FROM token_ledger GROUP BY {key} ORDER BY 1"""
                ).fetchall()
                return {
                    str(r[0]): {
                        "calls": int(r[1]),
                        "actual": int(r[2]),
                        "predicted": int(r[3]),
                        "released": int(r[4]),
                        "failed": int(r[5]),
                        "unanswered": int(r[6]),
                    }
                    for r in rows
                }

            total = group(None).get("all", {"calls": 0, "actual": 0, "predicted": 0, "released": 0, "failed": 0, "unanswered": 0})
            st = self._load(c, now)
            return {
                "spent": total["actual"],
                "predicted": total["predicted"],
                "calls": total["calls"],
                "released": total["released"],
                "failed": total["failed"],
                "in_flight": st.pending,
                "by_owner": group("owner"),
                "by_purpose": group("purpose"),
            }

        return self._tx(run)

    # -- convenience (cost model, forecast, sizing at the learned rate) -----------------------

    def max_asins_affordable(self, options: Any, priority: Priority = Priority.BACKFILL, *, max_asins: int = 100) -> int:
        """Largest /product batch whose predicted cost the budget can ever afford (HAZARDS #44/#48)."""
        return self.costs.max_asins_affordable(options, priority=priority, max_asins=max_asins)

    def forecast(self, pages_remaining: int, asins_remaining: int, options: Any) -> "Any":
        from deals_pipeline.budget.forecast import forecast_for

        return forecast_for(self, pages_remaining, asins_remaining, options)

    def max_new_deals_per_run(self, mode: str = "default", **kwargs: Any) -> int:
        from deals_pipeline.budget.sizing import max_new_deals_per_run

        return max_new_deals_per_run(self.projection().refill_rate, mode, **kwargs)


def _tokens(cost: Any) -> int:
    if isinstance(cost, bool):
        raise TypeError("cost must be an int or a CostEstimate")
    if isinstance(cost, int):
        return cost
    tokens = getattr(cost, "tokens", None)
    if isinstance(tokens, int):
        return tokens
    raise TypeError(f"cost must be an int or a CostEstimate, got {type(cost).__name__}")


def _status_of(result: Any) -> TokenStatus | None:
    if isinstance(result, TokenStatus):
        return result
    status = getattr(result, "status", None)
    return status if isinstance(status, TokenStatus) else None
