"""The asset checks on a real DuckDB file: each passes on good data and fails on the fault it exists for."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from deals_pipeline.defs.checks import rows_hold_their_own_asin
from deals_pipeline.defs.resources import DealsDatabaseResource, KeepaResource
from deals_pipeline.keepa.models import DealPage
from deals_pipeline.storage import Database
from deals_pipeline.storage.repository import deal_rows, upsert_deals, utcnow

pytestmark = pytest.mark.slow  # imports Dagster


def _store_sample_deals(samples_dir: Path, db: Database, n: int = 5) -> list[str]:
    page_file = sorted(samples_dir.glob("deal_responses/run_*/page_*.json"))[0]
    deals = DealPage.from_response(json.loads(page_file.read_text()), page=0).deals[:n]
    with db.transaction() as con:
        upsert_deals(con, deal_rows(deals, domain_id=1, price_type=2, source="simulator", origin="backfill",
                                    seen_at=utcnow()))
    return [d.asin for d in deals]


def test_rows_hold_their_own_asin_fails_on_a_miskeyed_row(samples_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "checks.duckdb"
    db = Database(path, data_mode="simulator")
    asins = _store_sample_deals(samples_dir, db)
    resources = {"keepa": KeepaResource(mode="simulator", simulator_url="http://127.0.0.1:9"),
                 "database": DealsDatabaseResource(path=str(path))}

    good = rows_hold_their_own_asin(**resources)
    assert isinstance(good, dg.AssetCheckResult)
    assert good.passed and good.metadata["rows"].value == len(asins)

    # Another deal's data under this key: the raw deal JSON names a different ASIN.
    with db.transaction() as con:
        con.execute("UPDATE deals SET raw_deal = (SELECT raw_deal FROM deals WHERE asin = ?) WHERE asin = ?",
                    [asins[1], asins[0]])
    bad = rows_hold_their_own_asin(**resources)
    assert not bad.passed
    assert bad.metadata["miskeyed_rows"].value == 1 and asins[0] in bad.metadata["miskeyed_examples"].value
