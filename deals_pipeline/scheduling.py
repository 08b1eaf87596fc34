"""When to spend: the scheduling rules between the upserter and the backfill (plain Python, no Dagster).

Four rules, each a pure function plus (where it needs the shared state) one short read of the ledger:

* **Shares.** While the backfill has work, the upserter may spend at most ``upsert_share`` of the
  refill over a sliding window (:func:`upsert_share_decision`). While the upserter has nothing to do
  the backfill takes the rest, and the budget's UPSERT priority plus its ``upsert_reserve`` mean the
  upserter is never starved of its share by the backfill.
* **Defer, don't sleep.** An op holding the ``keepa_api`` pool slot waits at most
  ``max_wait_in_slot_s`` for tokens (:func:`slot_deadline_ms`); past that it ends cleanly, progress
  saved, and releases the slot. The sensors relaunch the work when it is affordable.
* **Adaptive polling.** :func:`poll_interval` picks the upserter's poll interval from the observed
  arrival rate of new deals and the refill rate: polls cost at most ``max_poll_share`` of the refill,
  and the interval never exceeds the discovery-lag target.
* **Quarantine.** A chunk that failed ``max_chunk_attempts`` times is quarantined; between attempts it
  backs off exponentially (:func:`chunk_retry_at_ms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import duckdb

from deals_pipeline.budget import Priority

#: Defaults (documented in README "Configuration"; resource options override them).
DEFAULT_UPSERT_SHARE = 0.35
DEFAULT_SHARE_WINDOW_MIN = 120
DEFAULT_MAX_WAIT_IN_SLOT_S = 120
DEFAULT_MAX_POLL_SHARE = 0.10
DEFAULT_DISCOVERY_LAG_TARGET_MIN = 30
DEFAULT_MIN_POLL_INTERVAL_S = 60
DEFAULT_MAX_CHUNK_ATTEMPTS = 4
DEFAULT_CHUNK_BACKOFF_S = 300
DEFAULT_MAX_PAGES_PER_RUN = 10


# ---------------------------------------------------------------------------------------------
# Shares
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShareDecision:
    """Whether the upserter may start spending ``cost`` now under its share."""

    allowed: bool
    upsert_spent: int  #: tokens the upserter spent (settled or in flight) in the window
    allowance: int  #: upsert_share x refill over the window
    window_min: int
    backfill_has_work: bool
    reason: str

    def as_metadata(self) -> dict[str, object]:
        return {
            "upsert_share_spent_window": self.upsert_spent,
            "upsert_share_allowance_window": self.allowance,
            "upsert_share_window_min": self.window_min,
            "upsert_share_measured": round(self.upsert_spent / self.allowance, 3) if self.allowance else 0.0,
        }


def upsert_share_decision(
    *,
    upsert_spent: int,
    cost: int,
    refill_rate: int,
    upsert_share: float,
    window_min: int,
    backfill_has_work: bool,
) -> ShareDecision:
    """The share rule. Without backfill work the upserter may use everything.

    The allowance is ``upsert_share x rate x window``; a call may start while what the upserter already
    spent in the window is below it (so one call may overshoot by at most its own cost, and the
    upserter always gets at least one call per window: it can never be starved to zero).
    """
    if not 0.0 < upsert_share <= 1.0:
        raise ValueError(f"upsert_share must be in (0, 1], got {upsert_share!r}")
    if window_min <= 0:
        raise ValueError(f"share window must be > 0 minutes, got {window_min!r}")
    allowance = int(upsert_share * max(refill_rate, 0) * window_min)
    if not backfill_has_work:
        return ShareDecision(True, upsert_spent, allowance, window_min, False, "no backfill work: the upserter may use it all")
    allowed = upsert_spent < allowance and upsert_spent + cost <= allowance + cost
    reason = (f"upserter spent {upsert_spent} of its {allowance} tokens ({upsert_share:.0%} of the refill) "
              f"in the last {window_min} min")
    return ShareDecision(allowed, upsert_spent, allowance, window_min, True, reason)


def spent_by_priority(con: duckdb.DuckDBPyConnection, *, since_ms: int) -> dict[Priority, int]:
    """Tokens spent per priority since ``since_ms`` (settled actuals, plus predictions still in flight)."""
    rows = con.execute(
        "SELECT priority, COALESCE(SUM(CASE WHEN state = 'settled' THEN COALESCE(actual, predicted) "
        "WHEN state IN ('reserved', 'failed') THEN COALESCE(actual, predicted) ELSE 0 END), 0) "
        "FROM token_ledger WHERE created_ms >= ? GROUP BY priority",
        [since_ms],
    ).fetchall()
    spent = {Priority.UPSERT: 0, Priority.BACKFILL: 0}
    for priority, tokens in rows:
        spent[Priority(int(priority))] = int(tokens)
    return spent


def backfill_has_work(con: duckdb.DuckDBPyConnection, fingerprint: str, max_page: int = 66) -> bool:
    """True while a page is unfinished, or the last stored page is neither short nor Keepa's last.

    Quarantined chunks are not work: a page waiting only on quarantined chunks is complete.
    """
    unfinished = con.execute(
        "SELECT count(*) FROM page_chunks WHERE selection_fingerprint = ? AND status NOT IN ('done', 'quarantined')",
        [fingerprint],
    ).fetchone()[0]
    if unfinished:
        return True
    last = con.execute(
        "SELECT page, is_last FROM page_snapshots WHERE selection_fingerprint = ? ORDER BY page DESC LIMIT 1",
        [fingerprint],
    ).fetchone()
    if last is None:
        return True
    return not bool(last[1]) and int(last[0]) < max_page


# ---------------------------------------------------------------------------------------------
# Defer, don't sleep
# ---------------------------------------------------------------------------------------------


def slot_deadline_ms(now_ms: int, run_deadline_ms: int | None, max_wait_in_slot_s: float) -> int:
    """The deadline for one acquire made while holding the pool slot: never more than the bound away."""
    if max_wait_in_slot_s <= 0:
        raise ValueError(f"max_wait_in_slot_s must be > 0, got {max_wait_in_slot_s!r}")
    bound = now_ms + int(max_wait_in_slot_s * 1000)
    return bound if run_deadline_ms is None else min(bound, run_deadline_ms)


# ---------------------------------------------------------------------------------------------
# Adaptive polling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PollPlan:
    interval_s: int
    reason: str


def poll_interval(
    *,
    refill_rate: int,
    arrivals_per_hour: float | None,
    page_cost: int = 5,
    max_poll_share: float = DEFAULT_MAX_POLL_SHARE,
    lag_target_min: float = DEFAULT_DISCOVERY_LAG_TARGET_MIN,
    min_interval_s: int = DEFAULT_MIN_POLL_INTERVAL_S,
) -> PollPlan:
    """The upserter's poll interval.

    * cost floor: one poll (one page) every ``page_cost / (max_poll_share x rate)`` minutes costs exactly
      ``max_poll_share`` of the refill (10 min at 5/min and 10 %);
    * arrival rate: polling more often than one new deal per poll only buys empty pages, so the interval
      is at least ``1 / arrival rate``;
    * the discovery-lag target caps it (a deal is found at most one interval after it appears).

    When the target and the cost floor conflict, the target wins: staying within the lag target is the
    point of polling, and the cost floor is reported in the reason.
    """
    if not 0.0 < max_poll_share <= 1.0:
        raise ValueError(f"max_poll_share must be in (0, 1], got {max_poll_share!r}")
    if lag_target_min <= 0:
        raise ValueError(f"lag_target_min must be > 0, got {lag_target_min!r}")
    target_s = int(lag_target_min * 60)
    rate = max(int(refill_rate), 0)
    cost_floor_s = math.inf if rate == 0 else 60.0 * page_cost / (max_poll_share * rate)
    arrival_floor_s = 0.0 if not arrivals_per_hour else 3600.0 / arrivals_per_hour
    wanted = max(float(min_interval_s), cost_floor_s, arrival_floor_s)
    interval = int(min(wanted, target_s))
    arrivals = "unknown" if arrivals_per_hour is None else f"{arrivals_per_hour:.0f}/h"
    floor_text = "never" if math.isinf(cost_floor_s) else f"{cost_floor_s:.0f}s"
    reason = (f"poll every {interval}s: refill {rate}/min, polls <= {max_poll_share:.0%} -> >= {floor_text}; "
              f"arrivals {arrivals}; lag target {target_s}s")
    return PollPlan(interval_s=max(interval, 1), reason=reason)


def observed_arrivals_per_hour(con: duckdb.DuckDBPyConnection, *, now_minute: int, window_min: int = 180) -> float | None:
    """New deals per hour in the last ``window_min`` minutes (by Keepa creationDate of stored deals)."""
    row = con.execute(
        "SELECT count(*) FROM deals WHERE epoch(creation_date) / 60 - 21564000 >= ?",
        [now_minute - window_min],
    ).fetchone()
    if row is None:
        return None
    return float(row[0]) * 60.0 / window_min


# ---------------------------------------------------------------------------------------------
# Quarantine
# ---------------------------------------------------------------------------------------------


def chunk_retry_at_ms(now_ms: int, attempts: int, backoff_s: float = DEFAULT_CHUNK_BACKOFF_S) -> int:
    """When a chunk that failed ``attempts`` times may be tried again: backoff x 2^(attempts-1), max 8x."""
    factor = 2 ** min(max(attempts - 1, 0), 3)
    return now_ms + int(backoff_s * 1000 * factor)


def should_quarantine(attempts: int, max_chunk_attempts: int) -> bool:
    """A chunk that failed this many times stops being retried (until `deals-pipeline retry-quarantined`)."""
    if max_chunk_attempts < 1:
        raise ValueError(f"max_chunk_attempts must be >= 1, got {max_chunk_attempts!r}")
    return attempts >= max_chunk_attempts


def share_split(con: duckdb.DuckDBPyConnection, *, now_ms: int, refill_rate: int,
                window_min: int = DEFAULT_SHARE_WINDOW_MIN) -> dict[str, object]:
    """How the refill of the last ``window_min`` minutes was split (for status and run metadata)."""
    spent = spent_by_priority(con, since_ms=now_ms - window_min * 60_000)
    refill = max(refill_rate, 0) * window_min
    return {
        "share_window_min": window_min,
        "share_refill_tokens": refill,
        "share_upsert_tokens": spent[Priority.UPSERT],
        "share_backfill_tokens": spent[Priority.BACKFILL],
        "share_upsert_of_refill": round(spent[Priority.UPSERT] / refill, 3) if refill else 0.0,
        "share_backfill_of_refill": round(spent[Priority.BACKFILL] / refill, 3) if refill else 0.0,
    }
