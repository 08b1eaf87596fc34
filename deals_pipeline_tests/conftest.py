"""Shared fixtures. Real parts only: the simulator over HTTP on 127.0.0.1, real DuckDB files."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLES = SHARED / "keepa-samples"

#: A sentinel key: tests assert it never shows up in logs, exceptions, the database or run metadata.
SENTINEL_KEY = "SENTINELKEY0123456789abcdefSENTINELKEY0123456789abcdefSENTINEL00"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not SAMPLES.is_dir():
        pytest.fail(f"Keepa samples not found at {SAMPLES} (expected ../shared/keepa-samples next to the checkout)")
    return SAMPLES


@pytest.fixture
def sentinel_key() -> str:
    return SENTINEL_KEY


# -- a whole stack: simulator over HTTP + client + DuckDB file + shared budget ------------------

import dataclasses  # noqa: E402
from dataclasses import dataclass, field as _field  # noqa: E402
from typing import Any  # noqa: E402


@dataclass
class Stack:
    """The real parts wired together, as the Dagster resources do it."""

    sim: Any
    clock: Any
    db: Any
    client: Any
    budget: Any
    db_path: Any
    extras: dict = _field(default_factory=dict)

    def backfill(self, *, chunk_size: int = 4, selection: dict | None = None, rules=None, options=None, policy=None,
                 **scheduling: Any):
        from deals_pipeline.backfill.service import BackfillSettings, PageBackfill
        from deals_pipeline.enrichment import EnrichmentPolicy, ViabilityRules
        from deals_pipeline.keepa.query import DealSelection, ProductOptions

        settings = BackfillSettings(
            policy=policy or EnrichmentPolicy(),
            selection=DealSelection.from_mapping(selection or {"domainId": 1, "priceTypes": [2], "dateRange": 3,
                                                               "sortType": 4}),
            product_options=options or ProductOptions(),
            rules=rules or ViabilityRules(),
            chunk_size=chunk_size,
            **scheduling,  # max_chunk_attempts, chunk_backoff_s
        )
        return PageBackfill(self.db, self.client, self.budget, settings, clock=self.clock, source="simulator")

    def updater(self, *, chunk_size: int = 4, sizing_mode: str = "default", options=None, rules=None, policy=None,
                **scheduling: Any):
        from deals_pipeline.enrichment import EnrichmentPolicy, ViabilityRules
        from deals_pipeline.keepa.query import DealSelection, ProductOptions
        from deals_pipeline.upsert.service import RecentDealsUpdater, UpsertSettings

        settings = UpsertSettings(
            policy=policy or EnrichmentPolicy(),
            selection=DealSelection.from_mapping({"domainId": 1, "priceTypes": [2], "dateRange": 3, "sortType": 1}),
            product_options=options or ProductOptions(),
            rules=rules or ViabilityRules(),
            chunk_size=chunk_size,
            sizing_mode=sizing_mode,
            **scheduling,  # max_pages_per_run, backfill_fingerprint, upsert_share, max_wait_in_slot_s, ...
        )
        return RecentDealsUpdater(self.db, self.client, self.budget, settings, clock=self.clock, source="simulator")


@pytest.fixture
def make_stack(tmp_path):
    """Build a stack; every simulator started here is stopped at teardown."""
    from deals_pipeline.budget import BudgetPolicy, TokenBudget
    from deals_pipeline.clock import ManualClock
    from deals_pipeline.keepa.client import KeepaClient
    from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig
    from deals_pipeline.storage import Database

    started = []

    def make(*, config: "SimulatorConfig | None" = None, clock=None, policy: "BudgetPolicy | None" = None,
             db_name: str = "deals.duckdb", db_path=None, key: str = "test-key", max_attempts: int = 4,
             read_timeout_s: float = 5.0, simulator_cls=KeepaSimulator):
        clock = clock or ManualClock()
        config = config or SimulatorConfig()
        if config.expected_key is None:  # a strict key, as Keepa: any other key gets HTTP 400
            config = dataclasses.replace(config, expected_key=key)
        sim = simulator_cls(config, clock=clock)
        sim.start()
        started.append(sim)
        db_path = db_path or tmp_path / db_name
        db = Database(db_path, data_mode="simulator")
        client = KeepaClient(key, base_url=sim.base_url, clock=clock, max_attempts=max_attempts,
                             timeout_s=(2.0, read_timeout_s))
        budget = TokenBudget(db, clock, policy or BudgetPolicy(), owner="test", sync=client.token_status)
        return Stack(sim=sim, clock=clock, db=db, client=client, budget=budget, db_path=db_path)

    yield make
    for sim in started:
        sim.stop()


# -- test layers: what `make test-fast` (-m "not slow") leaves out -----------------------------------

#: A test using one of these builds the whole stack (simulator + client + DuckDB file + budget) or a
#: Dagster instance: it proves the parts work together, and it is in the slow layer.
SLOW_FIXTURES = frozenset({"make_stack", "rec_stack", "seeded_db"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every whole-stack test ``slow`` (explicit ``@pytest.mark.slow`` covers the rest)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
