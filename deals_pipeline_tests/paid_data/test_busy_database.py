"""A paid response arrives while another process holds the DuckDB file (issue 13).

Real parts: the simulator over HTTP, a second OS process that opens the DuckDB file read-write and
keeps it (as a reseller's notebook would), the pipeline's backfill and upserter. The holder is started
from inside the simulator's /product handler, so the file is taken exactly while the paid answer is on
its way. Then: nothing is lost, nothing is paid twice, and the data lands once the file is free.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from deals_pipeline.budget import BudgetPolicy
from deals_pipeline.simulator import SimulatorConfig
from deals_pipeline_tests.reliability._support import RecordingSimulator

HOLD_SCRIPT = (
    "import sys, duckdb\n"
    "con = duckdb.connect(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
    "con.close()\n"
)


class FileHolder:
    """Another process holding the DuckDB file read-write until :meth:`release`."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.proc: subprocess.Popen | None = None
        self.held = threading.Event()

    def take(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(self.db_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # the event: the other process has the file
        assert line.strip() == "held", self.proc.stderr.read()
        self.held.set()

    def release(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)


@pytest.fixture
def holder(tmp_path: Path):
    holders: list[FileHolder] = []

    def make(db_path: Path) -> FileHolder:
        h = FileHolder(db_path)
        holders.append(h)
        return h

    yield make
    for h in holders:
        h.release()


def _take_on_product_call(stack, holder: FileHolder, nth: int = 1) -> None:
    """Take the file while the nth /product response is being served (inside the simulator)."""
    calls = {"n": 0}

    def mutate(body):
        calls["n"] += 1
        if calls["n"] == nth:
            holder.take()
        return body

    stack.sim.mutate_product = mutate


def _fetch_counts(stack) -> Counter:
    return Counter(a for s in stack.sim.served_log() if s.endpoint == "product" for a in s.asins)


def _spent(stack) -> int:
    return stack.budget.ledger_summary()["spent"]


def test_backfill_chunk_paid_while_the_file_is_held(make_stack, holder) -> None:
    stack = make_stack(config=SimulatorConfig(refill_rate=5, seed=3, catalog_size=120), simulator_cls=RecordingSimulator)
    stack.db.busy_timeout_s = 1.0  # give up quickly while the other process holds the file
    backfill = stack.backfill()
    snapshot = backfill.snapshot(0)
    h = holder(stack.db_path)
    _take_on_product_call(stack, h)

    first = backfill.run_chunk(snapshot, 0)
    assert h.held.is_set() and first.status == "failed" and "DatabaseBusy" in (first.error or "")
    assert backfill.enricher.spool.pending_count() == 1  # the paid answer is on disk, fsynced
    paid_once = _fetch_counts(stack)
    assert set(paid_once) == set(snapshot.chunk_asins[0]) and set(paid_once.values()) == {1}

    h.release()
    second = backfill.run_chunk(snapshot, 0)
    assert second.status == "done" and second.deals_stored == 4
    assert _fetch_counts(stack) == paid_once, "the spooled response was replayed, not bought again"
    assert backfill.enricher.spool.pending_count() == 0
    stack.budget.sync()
    assert _spent(stack) == stack.sim.stats().tokens_consumed
    with stack.db.connect() as con:
        stored = {r[0] for r in con.execute("SELECT asin FROM deals WHERE enriched_at IS NOT NULL").fetchall()}
    assert stored == set(snapshot.chunk_asins[0])


def test_upserter_paid_while_the_file_is_held(make_stack, holder) -> None:
    stack = make_stack(config=SimulatorConfig(refill_rate=500, seed=4, catalog_size=60), simulator_cls=RecordingSimulator)
    stack.db.busy_timeout_s = 1.0
    updater = stack.updater()
    h = holder(stack.db_path)
    _take_on_product_call(stack, h, nth=2)  # the first chunk commits, the second is paid into a held file

    first = updater.run()
    assert h.held.is_set() and first.status == "failed" and first.chunks_done == 1
    assert updater.enricher.spool.pending_count() == 1
    paid_once = _fetch_counts(stack)
    assert set(paid_once.values()) == {1} and len(paid_once) == 8

    h.release()
    second = updater.run()
    assert second.status in ("complete", "nothing_new"), second.error
    counts = _fetch_counts(stack)
    assert all(counts[a] == 1 for a in paid_once), "the orphaned upsert response was stored, not bought again"
    assert updater.enricher.spool.pending_count() == 0
    with stack.db.connect() as con:
        stored = {r[0] for r in con.execute("SELECT asin FROM deals WHERE enriched_at IS NOT NULL").fetchall()}
    assert set(paid_once) <= stored
    stack.budget.sync()
    assert _spent(stack) == stack.sim.stats().tokens_consumed


def test_split_chunk_keeps_paid_batches_when_the_file_is_held(make_stack, holder) -> None:
    """chunk_size 50 at 5/min: split into 3 requests sized from the worst case (offers=20 and rating:
    every offer page found). The file is taken during the second request: the first two stay paid and
    spooled, the rerun buys only the last request's ASINs, and the balance never goes past -max_deficit."""
    stack = make_stack(config=SimulatorConfig(refill_rate=5, seed=8, catalog_size=200), simulator_cls=RecordingSimulator,
                       policy=BudgetPolicy())
    stack.db.busy_timeout_s = 1.0
    backfill = stack.backfill(chunk_size=50)
    snapshot = backfill.snapshot(0)
    asins = snapshot.chunk_asins[0]
    enricher = backfill.enricher
    limits = stack.budget.thresholds()
    requests = enricher.requests_for(list(asins), limits)
    limit = enricher.split_limit(limits)
    assert len(requests) == 3 and sum(map(len, requests)) == 50
    assert all(stack.budget.costs.worst_case_products(len(r), enricher.options) <= limit for r in requests)
    first_two = len(requests[0]) + len(requests[1])
    h = holder(stack.db_path)
    _take_on_product_call(stack, h, nth=2)

    first = backfill.run_chunk(snapshot, 0)
    assert h.held.is_set() and first.status == "failed"
    paid_once = _fetch_counts(stack)
    assert len(paid_once) == first_two and set(paid_once.values()) == {1}
    assert backfill.enricher.spool.pending_count() == 2

    h.release()
    second = backfill.run_chunk(snapshot, 0)
    assert second.status == "done" and second.deals_stored == 50
    counts = _fetch_counts(stack)
    assert len(counts) == 50 and set(counts.values()) == {1}, "each ASIN paid exactly once"
    assert backfill.enricher.spool.pending_count() == 0
    lowest = min(s.tokens_left for s in stack.sim.served_log())
    assert lowest >= -BudgetPolicy().max_deficit, f"balance went to {lowest}"
    stack.budget.sync()
    assert _spent(stack) == stack.sim.stats().tokens_consumed
