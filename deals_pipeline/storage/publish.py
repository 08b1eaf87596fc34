"""A read-only copy of the deal data for people (plain Python, no Dagster).

DuckDB lets one process hold a database file, readers included, so a reseller's notebook on the
pipeline's own file would block the pipeline (and the pipeline it). Instead the pipeline publishes a
copy after commit batches: a new DuckDB file is built under a temporary name, checkpointed, fsynced
and atomically renamed over ``<db>.published.duckdb``. Readers open it read-only, any number at once;
one that holds it open across a publish keeps reading the copy it opened (POSIX rename keeps the old
inode alive) and sees the new rows when it reopens.

The copy holds ``deals`` (every column) and the ``current_deals`` view: active deals with the
columns a reseller filters on. One-liners::

    deals-pipeline query "SELECT asin, title, price_now, drop_pct_90d FROM current_deals ORDER BY drop_pct_90d DESC LIMIT 20"
    duckdb -readonly data/deals.duckdb.published.duckdb "FROM current_deals LIMIT 10"
    python -c "import duckdb; print(duckdb.connect('data/deals.duckdb.published.duckdb', read_only=True).sql('FROM current_deals').df())"
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb

from deals_pipeline.storage.db import Database

log = logging.getLogger(__name__)

#: Amazon site per Keepa domain id (KEEPA_API.md: 1 = .com ... 11 = .com.mx).
AMAZON_HOSTS = {1: "amazon.com", 2: "amazon.co.uk", 3: "amazon.de", 4: "amazon.fr", 5: "amazon.co.jp",
                6: "amazon.ca", 8: "amazon.it", 9: "amazon.es", 10: "amazon.in", 11: "amazon.com.mx",
                12: "amazon.com.br"}


def _current(index: int) -> str:
    """The deal page's ``current[index]`` (Keepa's -1/-2 "no value" sentinels become NULL)."""
    value = f"TRY_CAST(json_extract(raw_deal, '$.current[{index}]') AS INTEGER)"
    return f"CASE WHEN {value} >= 0 THEN {value} END"


_HOSTS_SQL = " ".join(f"WHEN {k} THEN '{v}'" for k, v in AMAZON_HOSTS.items())

#: Active deals, the columns a reseller filters on. Prices are cents (Keepa's unit); *_usd for people.
#: Used prices by condition and the rating come from the deal page's current[] (indices 19-22, 16),
#: the offer counts from current[11]/[12] or, when enriched, the /product offers.
CURRENT_DEALS_SQL = f"""
CREATE OR REPLACE VIEW current_deals AS
SELECT
    asin,
    coalesce(product_title, title) AS title,
    domain_id,
    current_price AS price_now,
    round(current_price / 100.0, 2) AS price_now_usd,
    avg90_price AS avg_price_90d,
    round(avg90_price / 100.0, 2) AS avg_price_90d_usd,
    delta_percent90 AS drop_pct_90d,
    delta90 AS drop_90d,
    current_amazon AS amazon_price,
    current_new AS new_price,
    coalesce(product_used_price, current_used) AS used_price,
    {_current(19)} AS used_like_new_price,
    {_current(20)} AS used_very_good_price,
    {_current(21)} AS used_good_price,
    {_current(22)} AS used_acceptable_price,
    coalesce(product_sales_rank, sales_rank) AS sales_rank,
    sales_rank_drops30,
    sales_rank_drops90,
    {_current(11)} AS new_offer_count,
    {_current(12)} AS used_offer_count,
    product_total_offers AS total_offers,
    product_live_offers AS live_offers,
    round({_current(16)} / 10.0, 1) AS rating,
    {_current(17)} AS review_count,
    root_cat,
    last_update,
    first_seen,
    last_seen,
    enriched_at,
    'https://www.' || CASE domain_id {_HOSTS_SQL} ELSE 'amazon.com' END || '/dp/' || asin AS amazon_url,
    'https://keepa.com/#!product/' || domain_id || '-' || asin AS keepa_url
FROM deals
WHERE viability = 'viable' AND {{active}}
"""


def published_path(db_path: str | os.PathLike[str]) -> Path:
    """Where the read-only copy of ``db_path`` is published: ``<db file>.published.duckdb``."""
    path = Path(db_path)
    return path.with_name(f"{path.name}.published.duckdb")


@dataclass(frozen=True)
class PublishResult:
    path: Path
    deals: int
    current_deals: int
    published_at: float  #: wall time (epoch s)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DealPublisher:
    """Publishes the read-only copy; :meth:`maybe_publish` at most every ``min_interval_s`` (wall)."""

    def __init__(self, db: Database, target: str | os.PathLike[str] | None = None, *,
                 min_interval_s: float = 30.0) -> None:
        self.db = db
        self.target = Path(target) if target is not None else published_path(db.path)
        self.min_interval_s = float(min_interval_s)
        self._last_publish: float | None = None

    def maybe_publish(self) -> PublishResult | None:
        """Publish unless the last publish of this publisher was less than ``min_interval_s`` ago."""
        if self._last_publish is not None and time.monotonic() - self._last_publish < self.min_interval_s:
            return None
        return self.publish()

    def publish(self) -> PublishResult:
        """Build the copy under a temporary name and atomically replace the published file."""
        self.target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.target.with_name(f".{self.target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with self.db.connect() as con:
                has_lifecycle = bool(con.execute(
                    "SELECT count(*) FROM information_schema.columns WHERE table_name = 'deals' AND column_name = 'inactive_since'"
                ).fetchone()[0])
                con.execute(f"ATTACH '{tmp}' AS published")
                try:
                    con.execute("CREATE TABLE published.deals AS SELECT * FROM deals")
                finally:
                    con.execute("DETACH published")
            out = duckdb.connect(str(tmp))
            try:
                active = "inactive_since IS NULL" if has_lifecycle else "TRUE"
                out.execute(CURRENT_DEALS_SQL.replace("{active}", active))
                out.execute("CREATE TABLE published_meta AS SELECT now() AS published_at, ? AS source_db",
                            [self.db.path.name])
                deals = int(out.execute("SELECT count(*) FROM deals").fetchone()[0])
                current = int(out.execute("SELECT count(*) FROM current_deals").fetchone()[0])
                out.execute("CHECKPOINT")
            finally:
                out.close()
            _fsync(tmp)
            os.replace(tmp, self.target)
            _fsync(self.target.parent)
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                try:
                    leftover.unlink()
                except FileNotFoundError:
                    pass
        self._last_publish = time.monotonic()
        result = PublishResult(self.target, deals, current, time.time())
        log.info("published %d deals (%d current) to %s", deals, current, self.target)
        return result


def publish_quietly(publisher: DealPublisher | None, *, force: bool) -> PublishResult | None:
    """Publish (``force``) or publish if due; a failure (busy file, full disk) is logged, never raised:
    the readers' copy is a convenience and must not fail the paid work that was just committed."""
    if publisher is None:
        return None
    try:
        return publisher.publish() if force else publisher.maybe_publish()
    except (duckdb.Error, OSError, RuntimeError) as exc:
        log.warning("could not publish the read-only copy (the next commit retries): %s", str(exc)[:200])
        return None


def query_published(path: str | os.PathLike[str], sql: str) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` on the published copy, read-only: (column names, rows)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description or []]
        return names, cursor.fetchall()
    finally:
        con.close()


__all__ = ["CURRENT_DEALS_SQL", "DealPublisher", "PublishResult", "publish_quietly", "published_path",
           "query_published"]
