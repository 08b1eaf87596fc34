"""Fixtures of the reliability suite: in-process stacks on the recording simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deals_pipeline.budget import BudgetPolicy, TokenBudget
from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.simulator import SimulatorConfig
from deals_pipeline.storage import Database
from deals_pipeline_tests.conftest import Stack
from deals_pipeline_tests.reliability._support import RecordingSimulator


@pytest.fixture
def rec_stack(tmp_path: Path):
    """Like the suite's ``make_stack``, on a :class:`RecordingSimulator`, with an optional existing DB file."""
    started: list[RecordingSimulator] = []

    def make(*, config: SimulatorConfig | None = None, clock: Any = None, db_path: Path | None = None,
             key: str = "test-key", max_attempts: int = 4, read_timeout_s: float = 5.0,
             policy: BudgetPolicy | None = None) -> Stack:
        clock = clock or ManualClock()
        sim = RecordingSimulator(config or SimulatorConfig(), clock=clock)
        sim.start()
        started.append(sim)
        db_path = db_path or tmp_path / "deals.duckdb"
        db = Database(db_path, data_mode="simulator")
        client = KeepaClient(key, base_url=sim.base_url, clock=clock, max_attempts=max_attempts,
                             timeout_s=(2.0, read_timeout_s))
        budget = TokenBudget(db, clock, policy or BudgetPolicy(), owner="test", sync=client.token_status)
        return Stack(sim=sim, clock=clock, db=db, client=client, budget=budget, db_path=db_path)

    yield make
    for sim in started:
        sim.stop()
