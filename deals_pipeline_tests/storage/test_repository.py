"""Storage against real DuckDB files and real Keepa sample pages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest

from deals_pipeline.keepa.errors import ConfigError
from deals_pipeline.keepa.models import DealPage, Product
from deals_pipeline.storage import Database, DatabaseBusy
from deals_pipeline.storage.db import DataModeMismatch
from deals_pipeline.storage.repository import Viability, deal_rows, stored_deals, upsert_deals, utcnow

RUN = "deal_responses/run_2025-09-14T18-12Z_commit_b3f7397"


@pytest.fixture
def sample_page(samples_dir) -> DealPage:
    return DealPage.from_response(json.loads((samples_dir / RUN / "page_0.json").read_text()), page=0)


def _rows(deals, **kw):
    args = dict(domain_id=1, price_type=2, source="keepa", origin="backfill", seen_at=utcnow())
    args.update(kw)
    return deal_rows(deals, **args)


def test_real_page_round_trips_through_the_deals_table(tmp_path, sample_page):
    db = Database(tmp_path / "d.duckdb")
    with db.transaction() as con:
        new, updated = upsert_deals(con, _rows(sample_page.deals))
    assert (new, updated) == (150, 0)
    with db.connect() as con:
        first = sample_page.deals[0]
        row = con.execute(
            "SELECT last_update, creation_date, image_url, current_price, delta_percent90, last_update_minute "
            "FROM deals WHERE asin = ?", [first.asin]
        ).fetchone()
    # Golden values from KEEPA_API.md §7: 2025-09-14 17:08 and 14:44 UTC, image 51950K3CZ5L.jpg.
    assert row[0].isoformat().startswith("2025-09-14T17:08:00")
    assert row[1].isoformat().startswith("2025-09-14T14:44:00")
    assert row[2].endswith("/51950K3CZ5L.jpg")
    assert row[3] == first.current[2]
    assert row[4] == first.delta_percent[3][2] == 81
    assert row[5] == 7733828


def test_upsert_never_goes_back_in_time_and_keeps_enrichment(tmp_path, sample_page, samples_dir):
    db = Database(tmp_path / "d.duckdb")
    deal = sample_page.deals[0]
    product = Product.from_json(json.loads((samples_dir / "product_object_1886940606.json").read_text()))
    product = replace(product, asin=deal.asin)
    newer = replace(deal, last_update=deal.last_update + 10, title="newer")
    with db.transaction() as con:
        upsert_deals(con, _rows([newer], products={deal.asin: product}, origin="upsert"))
        # The backfill's older snapshot arrives later: it must not overwrite the newer row.
        assert upsert_deals(con, _rows([deal])) == (0, 1)
    with db.connect() as con:
        title, minute, enriched, origin = con.execute(
            "SELECT title, last_update_minute, enriched_minute, origin FROM deals"
        ).fetchone()
    assert (title, minute, origin) == ("newer", deal.last_update + 10, "upsert")
    # The version an enrichment covers is the newer of the deal's and the product's lastUpdate (issue 10).
    assert enriched == max(deal.last_update + 10, product.last_update)
    # A newer unenriched version updates the deal fields but does not erase the enrichment.
    newest = replace(deal, last_update=deal.last_update + 20, title="newest")
    with db.transaction() as con:
        upsert_deals(con, _rows([newest]))
    with db.connect() as con:
        title, product_title = con.execute("SELECT title, product_title FROM deals").fetchone()
    assert title == "newest" and product_title == product.title
    with db.connect() as con:
        stored = stored_deals(con, [deal.asin])[deal.asin]
    assert stored.covers(deal.last_update + 20)  # the product itself is newer than both listings
    assert not stored.covers(product.last_update + 1)  # a listing newer than the product is not covered
    assert stored.state == "enriched"


def test_filtered_deals_are_stored_without_enrichment(tmp_path, sample_page):
    db = Database(tmp_path / "d.duckdb")
    deal = sample_page.deals[1]
    with db.transaction() as con:
        upsert_deals(con, _rows([deal], viability={deal.asin: Viability(False, "too cheap")}))
        stored = stored_deals(con, [deal.asin])[deal.asin]
    assert stored.viability == "filtered" and stored.covers(deal.last_update)


def test_a_failed_transaction_leaves_stored_rows_untouched(tmp_path, sample_page):
    db = Database(tmp_path / "d.duckdb")
    with db.transaction() as con:
        upsert_deals(con, _rows(sample_page.deals[:10]))
    with pytest.raises(RuntimeError):
        with db.transaction() as con:
            upsert_deals(con, _rows(sample_page.deals[10:20]))
            raise RuntimeError("write failed half way")
    with db.connect() as con:
        assert con.execute("SELECT count(*) FROM deals").fetchone()[0] == 10


def test_demo_data_cannot_be_opened_as_real_data(tmp_path):
    with Database(tmp_path / "d.duckdb", data_mode="simulator").connect():
        pass
    with pytest.raises(DataModeMismatch, match="simulator data"):
        with Database(tmp_path / "d.duckdb", data_mode="keepa").connect():
            pass


def test_unwritable_database_path_fails_with_a_clear_message(tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    # Works as root too: nobody can create a folder below a regular file.
    with pytest.raises(ConfigError, match="cannot create the database folder"):
        Database(a_file / "sub" / "d.duckdb")


HOLDER = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1])
    con.execute("CREATE TABLE IF NOT EXISTS hold(x INT)")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.close()
    """
)


def _hold_lock(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_briefly_locked_file_is_waited_for(tmp_path):
    path = tmp_path / "d.duckdb"
    holder = _hold_lock(path, 1.0)
    started = time.monotonic()
    with Database(path, busy_timeout_s=20).connect() as con:
        assert con.execute("SELECT 1").fetchone() == (1,)
    assert time.monotonic() - started >= 0.5
    holder.wait()


def test_a_file_locked_too_long_raises_database_busy(tmp_path):
    path = tmp_path / "d.duckdb"
    holder = _hold_lock(path, 4.0)
    try:
        with pytest.raises(DatabaseBusy, match="locked by another process"):
            with Database(path, busy_timeout_s=1.0).connect():
                pass
    finally:
        holder.kill()
        holder.wait()
