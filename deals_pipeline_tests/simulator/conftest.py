"""Fixtures for the simulator tests: a running simulator on a ManualClock, talked to over real HTTP."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from deals_pipeline.clock import ManualClock
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig
from deals_pipeline_tests.simulator.helpers import START_MS, Api


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START_MS)


@pytest.fixture
def make_sim(clock: ManualClock, sentinel_key: str) -> Iterator[Callable[..., KeepaSimulator]]:
    """Build and start simulators (stopped at teardown). Keyword args go to SimulatorConfig. The key is strict
    (the sentinel key, what ``Api`` sends): any other key gets HTTP 400, as from Keepa."""
    started: list[KeepaSimulator] = []

    def _make(clock_: ManualClock | None = None, **cfg: Any) -> KeepaSimulator:
        cfg.setdefault("expected_key", sentinel_key)
        sim = KeepaSimulator(SimulatorConfig(**cfg), clock=clock_ or clock)
        sim.start()
        started.append(sim)
        return sim

    yield _make
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(make_sim: Callable[..., KeepaSimulator]) -> KeepaSimulator:
    return make_sim()


@pytest.fixture
def api(sim: KeepaSimulator, sentinel_key: str) -> Iterator[Api]:
    a = Api(sim, sentinel_key)
    yield a
    a.close()


@pytest.fixture
def api_for(sentinel_key: str) -> Iterator[Callable[[KeepaSimulator], Api]]:
    made: list[Api] = []

    def _api(sim: KeepaSimulator) -> Api:
        a = Api(sim, sentinel_key)
        made.append(a)
        return a

    yield _api
    for a in made:
        a.close()
