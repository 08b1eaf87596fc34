"""Embedded Keepa simulator: a real HTTP server on 127.0.0.1 speaking Keepa's wire format.

Plain Python (no Dagster). Lets the whole pipeline run and be tested with no key and no network::

    from deals_pipeline.clock import ManualClock
    from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig

    with KeepaSimulator(SimulatorConfig(refill_rate=5, seed=7), clock=ManualClock()) as sim:
        requests.get(f"{sim.base_url}/token", params={"key": "anything"})
"""

from deals_pipeline.simulator.bucket import TokenBucket
from deals_pipeline.simulator.catalog import (
    MAX_PAGE,
    MAX_RESULTS,
    PAGE_SIZE,
    DealVersion,
    ProductRequest,
    SyntheticCatalog,
)
from deals_pipeline.simulator.server import (
    FAULT_KINDS,
    FaultConfig,
    KeepaSimulator,
    SimulatorConfig,
    SimulatorStats,
    redact,
)

__all__ = [
    "FAULT_KINDS",
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
