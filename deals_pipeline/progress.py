"""Progress a person can see: token waits and committed chunks, as events for the UI, the CLI and status.

Waits come from the budget's single sleep point.

The budget calls :func:`announce` once per wait it is about to start (before its first sleep). A wait
longer than :data:`VISIBLE_WAIT_MS` of timeline time logs one line (``waiting for 42 tokens until 14:05
UTC (refill: ...)``), is stored in the database's ``meta`` table so ``deals-pipeline status`` (another
process) can show it, and is passed to the listeners: a Dagster op records it as metadata so the UI
shows it on the executing step, and the CLI backfill prints it. A committed chunk is published as a
:class:`ChunkCommitted` by whoever ran it (the Dagster op). Plain Python, no Dagster.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

log = logging.getLogger("deals_pipeline.budget.waits")

#: Waits at least this long (timeline ms) are announced; shorter ones are routine pacing.
VISIBLE_WAIT_MS = 5_000
#: ``meta`` keys of the waits in progress, one per budget owner.
META_PREFIX = "wait:"


@dataclass(frozen=True)
class WaitNotice:
    """One wait for tokens, as the budget decided it.

    ``reason``: ``refill`` (the balance is below what the call needs; tokens come at the refill rate),
    ``recharge`` (a low-rate plan's backfill waits for the burst level before spending again) or
    ``share`` (tokens are held by requests in flight or reserved for the upserter).
    """

    owner: str
    purpose: str
    priority: str
    tokens: int  #: the request's cost
    level: int  #: projected balance it waits for
    balance: int  #: projected balance now
    refill_rate: int
    reason: str
    since_ms: int
    until_ms: int

    @property
    def wait_s(self) -> float:
        return (self.until_ms - self.since_ms) / 1000

    def until_text(self) -> str:
        return datetime.fromtimestamp(self.until_ms / 1000, tz=timezone.utc).strftime("%H:%M:%S UTC")

    def line(self) -> str:
        """``waiting for 42 tokens until 14:05:10 UTC (refill: balance 3 -> 45 at 5/min, backfill products)``."""
        return (f"waiting for {self.tokens} tokens until {self.until_text()} ({self.reason}: balance {self.balance}"
                f" -> {self.level} at {self.refill_rate}/min, {self.wait_s / 60:.1f} min, {self.purpose})")

    def metadata(self) -> dict[str, Any]:
        """Flat values for Dagster metadata (the UI shows ``waiting`` as the step's note)."""
        return {"waiting": self.line(), "waiting_for_tokens": self.tokens, "waiting_until": self.until_text(),
                "waiting_reason": self.reason}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WaitNotice":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ChunkCommitted:
    """A backfill chunk finished (its rows, done mark and spend committed together) or stopped."""

    page: int
    chunk_index: int  #: 0-based
    chunk_count: int
    status: str  #: done | deferred | failed | ...
    tokens_spent: int
    deals_stored: int
    chunks_done: int  #: chunks of the page done after this one


Event = WaitNotice | ChunkCommitted
Listener = Callable[[Event], None]
_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


def add_listener(listener: Listener) -> Callable[[], None]:
    """Call ``listener`` with every event published in this process; returns the function that removes it."""
    with _listeners_lock:
        _listeners.append(listener)

    def remove() -> None:
        with _listeners_lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return remove


def publish(event: Event) -> None:
    """Hand ``event`` to every listener of this process (none: nothing happens)."""
    with _listeners_lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(event)


def reason_for(decision: Any, priority_is_backfill: bool) -> str:
    """Why a :class:`~deals_pipeline.budget.state.Decision` waits (see :class:`WaitNotice`)."""
    proj, th = decision.projection, decision.thresholds
    if priority_is_backfill and proj.recharging and th.recharge_enabled:
        return "recharge"
    held_back = priority_is_backfill and th.upsert_reserve > 0 and proj.balance >= decision.level - th.upsert_reserve
    if proj.reserved_in_flight > 0 or held_back:
        return "share"
    return "refill"


def announce(budget: Any, decision: Any, *, tokens: int, purpose: str, priority: Any, now_ms: int) -> WaitNotice | None:
    """The budget's hook before a wait: log, store and broadcast it when it is long enough to be seen."""
    if decision.wait_ms is None or decision.wait_ms < VISIBLE_WAIT_MS:
        return None
    notice = WaitNotice(
        owner=budget.owner, purpose=purpose, priority=priority.name, tokens=int(tokens), level=int(decision.level),
        balance=int(decision.projection.balance), refill_rate=int(decision.projection.refill_rate),
        reason=reason_for(decision, priority.name == "BACKFILL"), since_ms=int(now_ms),
        until_ms=int(now_ms + decision.wait_ms),
    )
    log.info("%s [%s]", notice.line(), notice.owner)
    db = getattr(budget.store, "db", None)  # a DuckDB-backed budget: status (another process) reads it there
    try:
        if db is not None:
            with db.connect() as con:
                con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [META_PREFIX + notice.owner, notice.to_json()])
    except Exception as exc:  # noqa: BLE001 - showing a wait must never stop the wait itself
        log.warning("could not record the wait for status: %s", exc)
    publish(notice)
    return notice


def current_waits(con: Any, now_ms: int) -> list[WaitNotice]:
    """Waits recorded by any process that have not ended yet on the timeline (``until`` still ahead)."""
    rows = con.execute("SELECT value FROM meta WHERE key LIKE ?", [META_PREFIX + "%"]).fetchall()
    waits = [WaitNotice.from_json(r[0]) for r in rows]
    return sorted((w for w in waits if w.until_ms > now_ms), key=lambda w: w.until_ms)
