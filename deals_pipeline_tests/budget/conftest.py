"""Fixtures for the token-budget tests: a ManualClock (no real sleeping) and the shared state.

``make_budget`` builds budgets on one in-memory store per test (the arbiter's unit tests: every
budget it makes shares that state, as processes share a DuckDB file). ``make_duckdb_budget`` builds
them on a real DuckDB file, for what only DuckDB can show (joining the caller's transaction).
``test_store_contract.py`` holds both stores to the same behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from deals_pipeline.budget import BudgetPolicy, InMemoryBudgetStore, TokenBudget
from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.models import TokenStatus
from deals_pipeline.storage.db import Database

START_MS = 1_757_873_538_842


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START_MS)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "budget.duckdb")


@pytest.fixture
def store() -> InMemoryBudgetStore:
    return InMemoryBudgetStore()


@pytest.fixture
def make_budget(store: InMemoryBudgetStore, clock: ManualClock) -> Callable[..., TokenBudget]:
    def _make(owner: str = "test", policy: BudgetPolicy | None = None, **kw: Any) -> TokenBudget:
        return TokenBudget(store, clock, policy or BudgetPolicy(), owner, **kw)

    return _make


@pytest.fixture
def make_duckdb_budget(db: Database, clock: ManualClock) -> Callable[..., TokenBudget]:
    def _make(owner: str = "test", policy: BudgetPolicy | None = None, **kw: Any) -> TokenBudget:
        return TokenBudget(db, clock, policy or BudgetPolicy(), owner, **kw)

    return _make


def status(clock: ManualClock, left: int, refill_in: int = 30_000, rate: int = 5, consumed: int = 0,
           ts: int | None = None) -> TokenStatus:
    return TokenStatus(
        tokens_left=left, refill_in_ms=refill_in, refill_rate=rate,
        timestamp_ms=clock.now_ms() if ts is None else ts, tokens_consumed=consumed,
    )
