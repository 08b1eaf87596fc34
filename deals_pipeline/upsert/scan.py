"""Bounded, resumable newest-first scans for the upserter (plain Python).

One run reads at most ``max_pages_per_run`` pages of the sortType-1 list. A backlog deeper than that
is not re-paid from page 0 by the next run: the scan's position is stored (``upsert_scans``); the deals
of every page it paid for are already in ``deals`` (lossless discovery, issue 10). The watermark moves
only when the scan reached its bound, so it never passes a deal the scan has not read yet.

Nothing here depends on what sortType 1 sorts by (``lastUpdate`` or ``creationDate``; no real sample
settles it, and the simulator offers both):

* **Stop rule.** A scan is complete at a page holding a deal with ``lastUpdate < bound``. Under
  lastUpdate order everything below is older. Under creationDate order everything below was created
  before ``bound`` (creationDate <= lastUpdate), so no new deal is below it. The bound is the watermark
  minus the overlap. (Under creationDate order a refresh of an old deal stays deep in the list: the
  upserter cannot see it without reading everything; the backfill's pages carry it.)
* **Resume rule.** The list moves between runs (new deals push it down; expiries and refreshes can
  pull it up). A resume re-reads the last page it read (one page, outside the page cap) and requires it
  to share an ASIN with what that page held: unchanged deals keep their relative order under either
  ordering, so if the list moved up by less than a page, the deals that crossed the boundary are on
  this very page, and if it moved down they are read again at no loss. Without an overlap the list
  moved a page or more: the scan restarts at page 0. A deal is never skipped; a resume re-pays one page.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from deals_pipeline.keepa.models import Deal
from deals_pipeline.storage.repository import utcnow

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


def overlaps(page_asins: list[str], position: ScanPosition) -> bool:
    """A resumed page is trusted only when it shares an ASIN with the last page the scan read."""
    return bool(set(page_asins) & set(position.seen_asins)) or not position.seen_asins


def reached_bound(deals: tuple[Deal, ...], bound_minute: int) -> bool:
    """The stop rule (module docstring): a deal older than the bound ends the scan, under either ordering."""
    return any(d.last_update < bound_minute for d in deals)
