"""The budget state in the DuckDB file, shared by every process that spends on the key.

Tables (see :mod:`deals_pipeline.storage.schema`): ``token_server_status`` (the newest envelope),
``budget_state`` (recharge flag, sync request) and ``token_ledger`` (reservations and spends).
Every transaction is short: no connection is held while sleeping or during a Keepa request.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, TypeVar

import duckdb

from deals_pipeline.budget.state import BudgetSnapshot, Reservation
from deals_pipeline.budget.store import (
    IN_FLIGHT_STATES,
    OPEN_STATES,
    BudgetTransaction,
    FinalState,
    LedgerGroup,
    inferred_charge,
    split_charge,
)
from deals_pipeline.keepa.models import TokenStatus
from deals_pipeline.storage.db import Database

T = TypeVar("T")

#: Attempts of one transaction on a DuckDB write-write conflict (another process wrote the same rows).
CONFLICT_ATTEMPTS = 8

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


def _in(states: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{state}'" for state in states) + ")"


# In flight = not yet in the stored server status: no envelope of its own observed (server_ts_ms NULL),
# not released, not expired. Settled-without-envelope and failed rows count until the next stored status.
_PENDING_SQL = f"""
SELECT
    COALESCE(SUM(CASE WHEN state = 'settled' THEN COALESCE(actual, predicted) ELSE predicted END), 0),
    MIN(expires_ms)
FROM token_ledger
WHERE server_ts_ms IS NULL
  AND expires_ms > ?
  AND state IN {_in(IN_FLIGHT_STATES)}
"""


class _DuckDBTransaction:
    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con

    def snapshot(self, now_ms: int) -> BudgetSnapshot:
        status, recorded = self._status_row()
        srow = self.con.execute("SELECT recharging, since_ms, sync_requested_ms FROM budget_state WHERE id = 1").fetchone()
        prow = self.con.execute(_PENDING_SQL, [now_ms]).fetchone()
        return BudgetSnapshot(
            status=status,
            recorded_at_ms=recorded,
            recharging=bool(srow[0]) if srow else False,
            recharge_since_ms=int(srow[1]) if srow else now_ms,
            sync_requested_ms=(int(srow[2]) if srow and srow[2] is not None else None),
            pending=int(prow[0]) if prow else 0,
            earliest_pending_expiry_ms=(int(prow[1]) if prow and prow[1] is not None else None),
            has_state_row=srow is not None,
        )

    def _status_row(self) -> tuple[TokenStatus | None, int | None]:
        row = self.con.execute(
            "SELECT tokens_left, refill_in_ms, refill_rate, timestamp_ms, recorded_at_ms FROM token_server_status WHERE id = 1"
        ).fetchone()
        if row is None:
            return None, None
        status = TokenStatus(tokens_left=int(row[0]), refill_in_ms=int(row[1]), refill_rate=int(row[2]),
                             timestamp_ms=int(row[3]))
        return status, int(row[4])

    def stored_status(self) -> TokenStatus | None:
        return self._status_row()[0]

    def replace_status(self, status: TokenStatus, recorded_at_ms: int) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO token_server_status (id, tokens_left, refill_in_ms, refill_rate, timestamp_ms, recorded_at_ms)"
            " VALUES (1, ?, ?, ?, ?, ?)",
            [status.tokens_left, status.refill_in_ms, status.refill_rate, status.timestamp_ms, recorded_at_ms],
        )
        self.con.execute(
            "UPDATE token_ledger SET server_ts_ms = ? WHERE server_ts_ms IS NULL AND state IN ('settled', 'failed')",
            [status.timestamp_ms],
        )
        self.con.execute("UPDATE budget_state SET sync_requested_ms = NULL WHERE id = 1 AND sync_requested_ms IS NOT NULL")

    def infer_unknown_charges(self, new: TokenStatus, settled_ms: int) -> tuple[int, int]:
        unknown = self.con.execute(
            "SELECT reservation_id, predicted FROM token_ledger WHERE state = 'failed' AND server_ts_ms IS NULL "
            "ORDER BY created_ms, reservation_id"
        ).fetchall()
        previous = self.stored_status()
        if not unknown or previous is None:
            return 0, 0
        known = self.con.execute(
            "SELECT COALESCE(SUM(actual), 0) FROM token_ledger WHERE state NOT IN ('released', 'failed') "
            "AND actual IS NOT NULL AND ((server_ts_ms > ? AND server_ts_ms <= ?) OR (server_ts_ms IS NULL AND state = 'settled'))",
            [previous.timestamp_ms, new.timestamp_ms],
        ).fetchone()[0]
        total = inferred_charge(previous, new, int(known))
        for (rid, _), share in zip(unknown, split_charge(total, [int(r[1]) for r in unknown])):
            self.con.execute(
                "UPDATE token_ledger SET state = 'inferred', actual = ?, server_ts_ms = ?, "
                "settled_ms = COALESCE(settled_ms, ?) WHERE reservation_id = ?",
                [share, new.timestamp_ms, settled_ms, rid],
            )
        return len(unknown), total

    def write_recharging(self, recharging: bool, since_ms: int) -> None:
        if self.con.execute("SELECT 1 FROM budget_state WHERE id = 1").fetchone() is None:
            self.con.execute("INSERT INTO budget_state (id, recharging, since_ms) VALUES (1, ?, ?)", [recharging, since_ms])
        else:
            self.con.execute("UPDATE budget_state SET recharging = ?, since_ms = ? WHERE id = 1", [recharging, since_ms])

    def request_sync(self, now_ms: int) -> None:
        if self.con.execute("SELECT 1 FROM budget_state WHERE id = 1").fetchone() is None:
            self.con.execute("INSERT INTO budget_state (id, recharging, since_ms) VALUES (1, FALSE, ?)", [now_ms])
        self.con.execute("UPDATE budget_state SET sync_requested_ms = ? WHERE id = 1", [now_ms])

    def insert_reservation(self, reservation: Reservation) -> None:
        r = reservation
        self.con.execute(
            "INSERT INTO token_ledger (reservation_id, created_ms, expires_ms, settled_ms, owner, purpose, priority,"
            " detail, predicted, actual, state, server_ts_ms, units, cost_key)"
            " VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?, NULL, 'reserved', NULL, ?, ?)",
            [r.id, r.created_ms, r.expires_ms, r.owner, r.purpose, int(r.priority), r.detail, r.predicted, r.units,
             r.cost_key],
        )

    def record_response(self, reservation_id: str, *, actual: int | None, server_ts_ms: int | None,
                        final_state: FinalState | None, settled_ms: int) -> None:
        sets = ["actual = COALESCE(?, actual)"]
        params: list[Any] = [actual]
        if server_ts_ms is not None:
            sets.append("server_ts_ms = COALESCE(server_ts_ms, ?)")
            params.append(server_ts_ms)
        if final_state is not None:
            sets += ["state = ?", "settled_ms = ?"]
            params += [final_state, settled_ms]
        params.append(reservation_id)
        self.con.execute(
            f"UPDATE token_ledger SET {', '.join(sets)} WHERE reservation_id = ? AND state IN {_in(OPEN_STATES)}",
            params,
        )

    def answered_costs(self, cost_key: str, limit: int) -> list[tuple[int, int]]:
        rows = self.con.execute(
            """SELECT actual, units FROM (
                   SELECT actual, units, created_ms FROM token_ledger
                   WHERE cost_key = ? AND actual IS NOT NULL AND units > 0 AND state IN ('settled', 'reserved')
                   ORDER BY created_ms DESC LIMIT ?)
               ORDER BY created_ms""",
            [cost_key, int(limit)],
        ).fetchall()
        return [(int(actual), int(units)) for actual, units in rows]

    def ledger_totals(self, group_by: LedgerGroup | None) -> dict[str, dict[str, int]]:
        if group_by not in (None, "owner", "purpose"):
            raise ValueError(f"group_by must be None, 'owner' or 'purpose', got {group_by!r}")
        key = group_by or "'all'"
        rows = self.con.execute(
            f"""SELECT {key},
                      COUNT(*) FILTER (WHERE actual IS NOT NULL AND state <> 'released'),
                      COALESCE(SUM(actual) FILTER (WHERE state <> 'released'), 0),
                      COALESCE(SUM(predicted) FILTER (WHERE actual IS NOT NULL AND state <> 'released'), 0),
                      COUNT(*) FILTER (WHERE state = 'released'),
                      COUNT(*) FILTER (WHERE state = 'failed'),
                      COUNT(*) FILTER (WHERE state = 'reserved' AND actual IS NULL)
               FROM token_ledger GROUP BY {key} ORDER BY 1"""
        ).fetchall()
        names = ("calls", "actual", "predicted", "released", "failed", "unanswered")
        return {str(r[0]): {name: int(value) for name, value in zip(names, r[1:])} for r in rows}


class DuckDBBudgetStore:
    """The shared budget state in one DuckDB file (one short transaction per decision)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = _path_lock(db)

    def __repr__(self) -> str:
        return f"DuckDBBudgetStore({self.db!r})"

    def atomically(self, fn: Callable[[BudgetTransaction], T], con: Any | None = None) -> T:
        if con is not None:
            return fn(_DuckDBTransaction(con))
        for attempt in range(CONFLICT_ATTEMPTS):
            with self._lock:
                try:
                    with self.db.transaction() as c:
                        return fn(_DuckDBTransaction(c))
                except duckdb.TransactionException:
                    if attempt == CONFLICT_ATTEMPTS - 1:
                        raise
            time.sleep(0.005 * (attempt + 1))  # wall time: a conflict is real contention
        raise AssertionError("unreachable")  # pragma: no cover
