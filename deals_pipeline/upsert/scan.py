"""Bounded, resumable newest-first scans for the upserter (plain Python).

One run reads at most ``max_pages_per_run`` pages of the sortType-1 list. A backlog deeper than that
is not re-paid from page 0 by the next run: the scan's position is stored (``upsert_scans``) and the
deals it paid for wait in ``upsert_backlog`` until the scan is complete; only then are they committed,
oldest first, so the watermark never passes a deal the scan has not reached yet.

Nothing here depends on what sortType 1 sorts by (``lastUpdate`` or ``creationDate``; no real sample
settles it, and the simulator offers both):

* **Stop rule.** A scan is complete at a page holding a deal with ``lastUpdate < bound``. Under
  lastUpdate order everything below is older. Under creationDate order everything below was created
  before ``bound`` (creationDate <= lastUpdate), so no new deal is below it. The bound is the start of
  the previous complete scan minus the overlap (every change above it was seen), else the watermark
  minus the overlap.
* **Resume rule.** The list moves between runs (new deals push it down; expiries and, under lastUpdate
  order, updates moving to the top pull it up). A resume reads the stored next page and requires it to
  share an ASIN with the last page read: unchanged deals keep their relative order under either
  ordering, so if one of them is still at or below the boundary, every deal that was below it still is
  (a deal that changed is newer than the scan's start and the next scan from page 0 finds it).
  Without an overlap the list moved up: the resume steps back a page (paying once more), and after
  ``MAX_STEP_BACKS`` restarts at page 0. A deal is never skipped; the common case re-pays nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb

from deals_pipeline.keepa.models import Deal
from deals_pipeline.storage import Database
from deals_pipeline.storage.repository import utcnow

#: Pages a resume may step back before restarting the scan at page 0.
MAX_STEP_BACKS = 3


@dataclass(frozen=True)
class ScanPosition:
    """Where an unfinished scan resumes."""

    next_page: int
    started_minute: int
    seen_asins: tuple[str, ...]


def read_position(con: duckdb.DuckDBPyConnection, name: str) -> ScanPosition | None:
    row = con.execute("SELECT next_page, started_minute, seen_asins FROM upsert_scans WHERE name = ?", [name]).fetchone()
    return None if row is None else ScanPosition(int(row[0]), int(row[1]), tuple(row[2]))


def save_position(con: duckdb.DuckDBPyConnection, name: str, position: ScanPosition) -> None:
    con.execute(
        "INSERT OR REPLACE INTO upsert_scans VALUES (?, ?, ?, ?, ?)",
        [name, position.next_page, position.started_minute, list(position.seen_asins), utcnow()],
    )


def finish_scan(con: duckdb.DuckDBPyConnection, name: str, started_minute: int) -> None:
    """The scan reached its bound: drop its position and move the coverage to its start minute."""
    con.execute("DELETE FROM upsert_scans WHERE name = ?", [name])
    con.execute("INSERT OR REPLACE INTO upsert_coverage VALUES (?, ?, ?)", [name, started_minute, utcnow()])


def read_coverage(con: duckdb.DuckDBPyConnection, name: str) -> int | None:
    row = con.execute("SELECT covered_minute FROM upsert_coverage WHERE name = ?", [name]).fetchone()
    return None if row is None else int(row[0])


def add_to_backlog(con: duckdb.DuckDBPyConnection, deals: list[Deal]) -> None:
    """Remember paid-for deals (newest version per ASIN wins)."""
    if not deals:
        return
    now = utcnow()
    con.executemany(
        "INSERT INTO upsert_backlog VALUES (?, ?, ?, ?) ON CONFLICT (asin) DO UPDATE SET "
        "last_update_minute = excluded.last_update_minute, raw_deal = excluded.raw_deal, found_at = excluded.found_at "
        "WHERE excluded.last_update_minute > upsert_backlog.last_update_minute",
        [[d.asin, int(d.last_update), json.dumps(d.raw, separators=(",", ":")), now] for d in deals],
    )


def read_backlog(db: Database) -> list[Deal]:
    with db.connect() as con:
        rows = con.execute("SELECT raw_deal FROM upsert_backlog").fetchall()
    return [Deal.from_json(json.loads(r[0])) for r in rows]


def drop_from_backlog(con: duckdb.DuckDBPyConnection, deals: list[Deal]) -> None:
    """Committed (or no longer wanted) deals leave the backlog, unless a newer version arrived since."""
    if deals:
        con.executemany("DELETE FROM upsert_backlog WHERE asin = ? AND last_update_minute <= ?",
                        [[d.asin, int(d.last_update)] for d in deals])


def overlaps(page_asins: list[str], position: ScanPosition) -> bool:
    """A resumed page is trusted only when it shares an ASIN with the last page the scan read."""
    return bool(set(page_asins) & set(position.seen_asins)) or not position.seen_asins


def reached_bound(deals: tuple[Deal, ...], bound_minute: int) -> bool:
    """The stop rule (module docstring): a deal older than the bound ends the scan, under either ordering."""
    return any(d.last_update < bound_minute for d in deals)
