"""The public keepa client against the simulator over real HTTP on 127.0.0.1.

The simulator runs on the real clock (``SystemClock``, what the simulator CLI now defaults to): keepa computes its
waits from the server ``timestamp`` and its own ``time.time()``, so a scaled server clock would make it plan
absurd sleeps. The bucket is big enough that no test meets a 429, so keepa never sleeps.
"""

from __future__ import annotations

from typing import Iterator

import pytest

keepa = pytest.importorskip("keepa")

from deals_pipeline.clock import SystemClock  # noqa: E402
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig  # noqa: E402
from deals_pipeline_tests.keepa_client.redirect import KeepaRedirect  # noqa: E402


@pytest.fixture
def sim(sentinel_key: str) -> Iterator[KeepaSimulator]:
    config = SimulatorConfig(refill_rate=10_000, expected_key=sentinel_key)  # strict key: any other gets 400
    with KeepaSimulator(config, clock=SystemClock()) as simulator:
        yield simulator


@pytest.fixture
def redirect(sim: KeepaSimulator, monkeypatch: pytest.MonkeyPatch) -> KeepaRedirect:
    shim = KeepaRedirect(sim.base_url)
    monkeypatch.setattr(keepa.keepa_sync, "requests", shim)
    return shim


@pytest.fixture
def api(redirect: KeepaRedirect, sentinel_key: str):
    return keepa.Keepa(sentinel_key, timeout=30.0, logging_level="WARNING")
