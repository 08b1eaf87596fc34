"""The in-memory store behaves exactly as the DuckDB store: the same operations, the same state.

The arbiter's unit and property tests run on :class:`InMemoryBudgetStore`; this is what lets them
stand for the DuckDB store the pipeline uses. Random sequences of budget operations run on two
budgets, one per store, on one clock; after every step both must report the same projection, sync
need and ledger summary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deals_pipeline.budget import BudgetPolicy, InMemoryBudgetStore, Priority, TokenBudget
from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.models import TokenStatus
from deals_pipeline.storage.db import Database
from deals_pipeline_tests.budget.conftest import START_MS

POLICY = BudgetPolicy(reservation_ttl_ms=120_000)

steps = st.lists(
    st.one_of(
        st.tuples(st.just("observe"), st.integers(-100, 300), st.integers(-2, 2)),
        st.tuples(st.just("acquire"), st.integers(0, 120), st.sampled_from(list(Priority))),
        st.tuples(st.just("settle"), st.integers(0, 120), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 0), st.booleans()),
        st.tuples(st.just("fail"), st.integers(0, 0), st.booleans()),
        st.tuples(st.just("unknown"), st.integers(0, 0), st.booleans()),
        st.tuples(st.just("advance"), st.integers(1, 200_000), st.booleans()),
    ),
    min_size=1,
    max_size=25,
)


def _view(budget: TokenBudget) -> tuple:
    proj = budget.projection()
    return proj, budget.needs_sync(), budget.ledger_summary()


def _apply(step: tuple, budget: TokenBudget, clock: ManualClock, open_reservations: list) -> None:
    kind, value, extra = step
    if kind == "observe":
        budget.observe(TokenStatus(tokens_left=value, refill_in_ms=20_000, refill_rate=5,
                                   timestamp_ms=clock.now_ms() + extra * 1_000, tokens_consumed=0))
    elif kind == "acquire":
        if budget.projection().status_known and budget.wait_ms(value, extra) == 0:
            open_reservations.append(budget.acquire(value, purpose=f"p{value % 3}", priority=extra,
                                                    deadline_ms=clock.now_ms()))
    elif open_reservations and kind in ("settle", "release", "fail"):
        reservation = open_reservations.pop(0)
        envelope = TokenStatus(tokens_left=value, refill_in_ms=10_000, refill_rate=5, timestamp_ms=clock.now_ms(),
                               tokens_consumed=value) if extra else None
        if kind == "settle":
            budget.settle(reservation, value, envelope)
        elif kind == "release":
            budget.release(reservation, envelope)
        else:
            budget.record_failure(reservation, envelope)
    elif kind == "unknown":
        budget.mark_unknown()


class _Pair:
    """A DuckDB file reused across examples (tables emptied per example) and a fresh in-memory store."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.db = Database(Path(self.dir.name) / "contract.duckdb")

    def fresh(self) -> tuple[TokenBudget, TokenBudget, ManualClock]:
        with self.db.transaction() as con:
            for table in ("token_server_status", "token_ledger", "budget_state"):
                con.execute(f"DELETE FROM {table}")
        clock = ManualClock(START_MS)
        return (TokenBudget(InMemoryBudgetStore(), clock, POLICY, "w"), TokenBudget(self.db, clock, POLICY, "w"),
                clock)


@pytest.fixture(scope="module")
def pair() -> _Pair:
    p = _Pair()
    yield p
    p.dir.cleanup()


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=steps)
def test_in_memory_and_duckdb_stores_agree(pair: _Pair, sequence: list[tuple]) -> None:
    memory, duck, clock = pair.fresh()
    memory_open: list = []
    duck_open: list = []
    for step in sequence:
        if step[0] == "advance":
            clock.advance(step[1])
            continue
        _apply(step, memory, clock, memory_open)
        _apply(step, duck, clock, duck_open)
        assert len(memory_open) == len(duck_open)
        assert _view(memory) == _view(duck), step


def test_a_failed_transaction_leaves_the_in_memory_state_untouched() -> None:
    store = InMemoryBudgetStore()
    clock = ManualClock(START_MS)
    budget = TokenBudget(store, clock, POLICY)
    budget.observe(TokenStatus(tokens_left=100, refill_in_ms=20_000, refill_rate=5, timestamp_ms=clock.now_ms()))
    before = _view(budget)

    def write_then_crash(tx) -> None:
        tx.request_sync(clock.now_ms())
        raise RuntimeError("crash before commit")

    with pytest.raises(RuntimeError):
        store.atomically(write_then_crash)
    assert _view(budget) == before and not budget.needs_sync()
