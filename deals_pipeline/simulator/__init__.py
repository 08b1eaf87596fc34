"""Embedded Keepa simulator: a real HTTP server on 127.0.0.1 speaking Keepa's wire format.

Plain Python (no Dagster). Lets the whole pipeline run and be tested with no key and no network::

    from deals_pipeline.clock import ManualClock
    from deals_pipeline.simulator import CALIBRATED_CHURN, KeepaSimulator, SimulatorConfig

    clock = ManualClock()
    with KeepaSimulator(SimulatorConfig(refill_rate=5, seed=7, **CALIBRATED_CHURN), clock=clock) as sim:
        requests.get(f"{sim.base_url}/token", params={"key": "anything"})
        clock.advance(3_600_000)          # one simulated hour: ~60 new, ~250 updated, ~60 expired deals

Churn (a list that moves), for token-economics and scheduling tests and benchmarks:

* ``SimulatorConfig(drift_new_per_hour=, drift_updates_per_hour=, drift_expired_per_hour=)``: deals listed
  for the first time, refreshed (new ``lastUpdate`` and prices, so they move in every sort order) and taken
  off the list, per simulated hour. ``CALIBRATED_CHURN`` = 60 / 250 / 60 (KEEPA_API.md §4.6); ``QUIET`` =
  0 / 0 / 0, the Python default. The CLI (``python -m deals_pipeline.simulator``), the demo and the
  benchmarks default to ``CALIBRATED_CHURN``; ``--quiet`` turns it off, ``--drift-*-per-hour`` dial it.
* Page-boundary repeats and gaps follow from churn between page calls, as in the real samples: a deal
  inserted above a boundary pushes the last deal of page k to the head of page k+1 (seen twice), a deal
  moving up across a boundary is missed. Nothing else injects them.
* ``sort1_orders_by="lastUpdate"`` (default) or ``"creationDate"``: what sortType 1 orders by (unsettled
  by the samples, KEEPA_API.md §4.2). CLI: ``--sort1-orders-by``.
* Deterministic: every event derives from ``seed`` and the start time, and becomes visible when the
  injected clock (deals_pipeline/clock.py) passes its instant; the state at time t does not depend on how
  often the list was read before t. ``sim.catalog.versions()`` lists every (asin, lastUpdate, visible_from)
  ever served and ``sim.catalog.expired()`` every expiry, for exact accounting in tests.
* ``seed`` fixes the catalog and the churn, so figures repeat run to run.

Fidelity (what the real API does per KEEPA_API.md or the samples -> what this simulator does):

* selection filters (§4.1) -> honoured: categories, the five ranges (with ``isRangeEnabled``), ``minRating``,
  ``hasReviews``, ``isLowest``/``isLowest90``, Amazon-offer flags (with ``isFilterEnabled``), ``titleSearch``,
  ``priceTypes``/``dateRange``; ``categoryCount`` ignores only the category filters (filters.py).
* Books/used query: 726-793 deals, 5 full pages + a short one -> 764 of 800 deals (the catalog is drawn around
  that query: 96 % meet it, the rest miss exactly one filter).
* list movement: 20-47 % updated, 4-11 % new per hour; 0-2 repeats per run at page boundaries -> calibrated
  churn (CALIBRATED_CHURN); repeats at boundaries only (test_churn.py).
* /product cost: 1 ASIN 6, 5 ASINs 30-38, 10 ASINs 68-74 -> ~6.9 per ASIN, same ranges (products.py).
* product object: 85/86 keys, full stats, historical offers beyond ``offers`` -> the same key sets and stats
  fields, historical offers returned unless ``only-live-offers=1``.
* sentinels: -2 in avg at 28 price types, at current[31] for ~19 % -> the same shares.
* a dummy key -> HTTP 400 when ``expected_key`` is set (tests, the demo).

Still differs: the universe is the reference query's neighbourhood (800 deals, not Keepa's millions), so
``categoryCount`` of the Books/used query shows ~20 non-Books deals where the sample shows ~2,100; which fields
``isFilterEnabled`` gates, what sortType 1 orders by, ``isLowest`` (a seeded draw: deals carry no all-time
minimum) and the shape of a not-in-DB product are guesses; attribute filters (brand, author, ...) and
``singleVariation`` are accepted but not applied; histories are short synthetic series; the 120 s deal cache and
``dealsCached`` are not modelled; ``/seller``, ``/query`` and other endpoints do not exist.
"""

from deals_pipeline.simulator.bucket import TokenBucket
from deals_pipeline.simulator.catalog import (
    MAX_PAGE,
    MAX_RESULTS,
    PAGE_SIZE,
    SORT1_FIELDS,
    DealVersion,
    ProductRequest,
    SyntheticCatalog,
)
from deals_pipeline.simulator.server import (
    CALIBRATED_CHURN,
    FAULT_KINDS,
    QUIET,
    FaultConfig,
    KeepaSimulator,
    SimulatorConfig,
    SimulatorStats,
    redact,
)

__all__ = [
    "CALIBRATED_CHURN",
    "FAULT_KINDS",
    "QUIET",
    "SORT1_FIELDS",
    "MAX_PAGE",
    "MAX_RESULTS",
    "PAGE_SIZE",
    "DealVersion",
    "FaultConfig",
    "KeepaSimulator",
    "ProductRequest",
    "SimulatorConfig",
    "SimulatorStats",
    "SyntheticCatalog",
    "TokenBucket",
    "redact",
]
