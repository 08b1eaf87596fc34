"""Churn you can dial: new, updated and expired deals per hour, page-boundary repeats, sortType 1's field.

Calibrated on KEEPA_API.md §4.6 (the four real runs: 20-47 % updated and 4-11 % new per hour) and §4.3
(0-2 ASINs per run seen twice, always at a page boundary, pages fetched ~61 s apart).
"""

from __future__ import annotations

import pytest

from deals_pipeline.config import DEFAULT_SELECTION
from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute
from deals_pipeline.simulator import CALIBRATED_CHURN, QUIET, SimulatorConfig, SyntheticCatalog
from deals_pipeline.simulator.cli import build_parser
from deals_pipeline_tests.simulator.helpers import START_MS

HOUR_MS = 3_600_000


def _catalog(**kw) -> SyntheticCatalog:
    return SyntheticCatalog(seed=kw.pop("seed", 7), size=kw.pop("size", 800), start_ms=START_MS, **kw)


def _walk_pages(api, clock, gap_ms: int = 61_000, **sel) -> list[list[dict]]:
    pages: list[list[dict]] = []
    while True:
        dr = api.deal(len(pages), **sel).json()["deals"]["dr"]
        pages.append(dr)
        if len(dr) < 150:
            return pages
        clock.advance(gap_ms)


def _repeats(pages: list[list[dict]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    seen: dict[str, tuple[int, int]] = {}
    out = []
    for p, dr in enumerate(pages):
        for i, d in enumerate(dr):
            if d["asin"] in seen:
                out.append((seen[d["asin"]], (p, i)))
            seen[d["asin"]] = (p, i)
    return out


def test_calibrated_churn_rates_per_hour_match_the_real_runs():
    cat = _catalog(**CALIBRATED_CHURN)
    v0, n0 = len(cat.versions()), len(cat)
    end = START_MS + HOUR_MS
    cat.advance_to(end)
    new_versions = cat.versions()[v0:]
    end_min = unix_ms_to_keepa_minute(end)
    new = [v for v in new_versions if cat._statics[v.asin].creation_date >= end_min - 60]
    updated = len(new_versions) - len(new)
    expired = len(cat.expired())
    assert 45 <= len(new) <= 80, len(new)  # Poisson(60)
    assert 215 <= updated <= 290, updated  # Poisson(250)
    assert 45 <= expired <= 80, expired
    assert abs(len(cat) - n0) <= 40  # new and expired balance: the list keeps its size
    # The shares the real runs show for one ~770-deal query: 4-11 % new, 20-47 % updated in the last hour.
    listed = cat.ordered(1, 0, 0)
    fresh = sum(1 for d in listed if d["lastUpdate"] >= end_min - 60) / len(listed)
    born = sum(1 for d in listed if d["creationDate"] >= end_min - 60) / len(listed)
    assert 0.20 <= fresh <= 0.47, fresh
    assert 0.04 <= born <= 0.11, born


def test_expired_deals_leave_every_view_and_never_come_back():
    cat = _catalog(size=200, drift_expired_per_hour=120.0)
    cat.advance_to(START_MS + HOUR_MS)
    gone = {a for a, _ in cat.expired()}
    assert 90 <= len(gone) <= 150
    assert len(cat) == 200 - len(gone)
    listed = {d["asin"] for d in cat.ordered(4, 3, 2)}
    assert not gone & listed and not gone & set(cat.asins())
    assert all(cat.deal(a) is None for a in gone)
    assert all(t <= START_MS + HOUR_MS for _, t in cat.expired())


def test_quiet_is_the_python_default_and_nothing_moves():
    assert {k: getattr(SimulatorConfig(), k) for k in QUIET} == QUIET
    cat = _catalog(size=100)
    before = cat.ordered(1, 0, 0)
    cat.advance_to(START_MS + 6 * HOUR_MS)
    assert cat.ordered(1, 0, 0) == before and not cat.expired()


def test_churn_is_fixed_by_the_seed_whatever_the_read_pattern():
    a, b = _catalog(**CALIBRATED_CHURN), _catalog(**CALIBRATED_CHURN)
    end = START_MS + HOUR_MS + 777
    for t in range(START_MS, end, 61_000):
        a.page(0, sort_type=4, date_range=3, price_type=2, now_ms=t)
    b.advance_to(end)
    assert a.versions() == b.versions() and a.expired() == b.expired()
    assert a.ordered(4, 3, 2, end) == b.ordered(4, 3, 2, end)
    other = _catalog(seed=8, **CALIBRATED_CHURN)
    other.advance_to(end)
    assert other.versions() != a.versions()


@pytest.mark.parametrize("field", ["lastUpdate", "creationDate"])
def test_sort_type_1_orders_by_the_chosen_field(field):
    cat = _catalog(size=300, sort1_orders_by=field, **CALIBRATED_CHURN)
    listed = cat.ordered(1, 0, 0, START_MS + HOUR_MS)
    keys = [d[field] for d in listed]
    assert keys == sorted(keys, reverse=True)
    other = "creationDate" if field == "lastUpdate" else "lastUpdate"
    assert [d[other] for d in listed] != sorted((d[other] for d in listed), reverse=True)


def test_sort1_field_is_validated():
    with pytest.raises(ValueError, match="sort1_orders_by"):
        _catalog(sort1_orders_by="price")


def test_page_boundary_repeats_happen_with_calibrated_churn(make_sim, api_for, clock):
    """The production query's pages fetched 61 s apart: deals cross page boundaries, as in 6 of 7 real runs."""
    sim = make_sim(**CALIBRATED_CHURN)
    api = api_for(sim)
    query = {k: v for k, v in DEFAULT_SELECTION.items() if k != "page"}
    repeats = []
    for _ in range(3):  # three full walks of the query, like three production runs
        repeats += _repeats(_walk_pages(api, clock, **query))
        clock.advance(HOUR_MS)
    assert repeats, "calibrated churn should move deals across a page boundary"
    for (p1, i1), (p2, i2) in repeats:
        assert p2 == p1 + 1 and i1 >= 140 and i2 < 10, repeats  # always at a boundary, as observed
    assert len(repeats) <= 3 * 5  # a handful per run, not a reshuffle
    print("page-boundary repeats over 3 walks:", repeats)


def test_quiet_walk_has_no_repeats(make_sim, api_for, clock):
    api = api_for(make_sim())
    assert _repeats(_walk_pages(api, clock, sortType=4)) == []


def test_cli_defaults_are_real_time_with_calibrated_churn():
    args = build_parser().parse_args([])
    assert args.time_scale == 1.0
    assert (args.drift_new_per_hour, args.drift_updates_per_hour, args.drift_expired_per_hour) == (
        CALIBRATED_CHURN["drift_new_per_hour"],
        CALIBRATED_CHURN["drift_updates_per_hour"],
        CALIBRATED_CHURN["drift_expired_per_hour"],
    )
    args = build_parser().parse_args(["--quiet", "--sort1-orders-by", "creationDate"])
    assert args.quiet and args.sort1_orders_by == "creationDate"


def test_backfill_under_calibrated_churn_stores_each_deal_once(make_stack):
    """The production query backfilled page by page while the list moves: the page snapshots repeat deals at
    page boundaries, and still every ASIN is stored once and paid for once."""
    from collections import Counter

    config = SimulatorConfig(refill_rate=2_000, **CALIBRATED_CHURN)
    stack = make_stack(config=config)
    query = {k: v for k, v in DEFAULT_SELECTION.items() if k != "page"}
    backfill = stack.backfill(chunk_size=50, selection=query)
    snapshots = []
    for page in range(6):
        snapshots.append(backfill.snapshot(page))
        stack.clock.advance(20 * 60_000)  # the list moves between page fetches (a page takes ~20 min to enrich)
    pages = [[d.asin for d in snap.deals] for snap in snapshots]
    assert snapshots[-1].is_last and not any(s.is_last for s in snapshots[:-1])
    repeats = [a for a, n in Counter(a for p in pages for a in p).items() if n > 1]
    assert repeats, "churn should repeat deals across page boundaries"
    for snap in snapshots:
        for i in range(snap.chunk_count):
            assert backfill.run_chunk(snap, i).status == "done"
    with stack.db.connect() as con:
        stored = Counter(a for (a,) in con.execute("SELECT asin FROM deals").fetchall())
    assert set(stored) == {a for p in pages for a in p} and max(stored.values()) == 1
    # A repeat seen at the same version is paid for once; only a deal refreshed in between is bought again.
    versions = {}
    for snap in snapshots:
        for d in snap.deals:
            versions.setdefault(d.asin, set()).add(d.last_update)
    fetches = stack.sim.stats().product_fetches
    same_version = [a for a in repeats if len(versions[a]) == 1]
    assert same_version and all(fetches[a] <= 1 for a in same_version), "a repeated deal was paid for twice"
    print(f"{len(repeats)} repeats over {len(pages)} pages, {len(stored)} deals stored once each")
